"""The contract every technique implements: :class:`Step` (what it takes, what it gives, what it needs,
how it is validated) and :class:`StepContext` (what a step sees while it runs).

A step is one technique applied to one artifact. It says which artifact kind it consumes and which it
produces (kinds are registered in :mod:`tfaccel.core.artifact`), checks at plan time that it can run
here (:meth:`Step.check`), and writes its artifact into ``ctx.stage_dir``. The pipeline and ``--auto``
compose steps; a step never imports them.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from tfaccel.core.artifact import Artifact
from tfaccel.core.source import ModelSource
from tfaccel.core.validation import BREACH_POLICIES, Tolerance
from tfaccel.errors import PlanError


@dataclasses.dataclass
class StepContext:
    """What a step sees besides its input artifact."""

    source: ModelSource
    stage_dir: Path
    log: Callable[[str], None]
    notes: list[str] = dataclasses.field(default_factory=list)
    #: (batch, sequence) pairs the run measures at: steps that choose a form by timing use them.
    shapes: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    #: Set by a step that runs on hardware without native support for it (e.g. bfloat16 emulated on an
    #: AVX2 CPU): once the stage is measured, the pipeline adds a note with the slowdown it measured.
    hardware_warning: str | None = None
    #: ``time.perf_counter()`` value by which a step should be done, or None (no limit). Steps with
    #: long work they can size or stop use it (``prune-structured``'s distillation stops when its
    #: measured step time says it would not finish: ``--auto``'s time budget).
    deadline: float | None = None

    def note(self, message: str) -> None:
        """Record a note (a warning or a fact) for this stage's row in the report."""
        self.notes.append(message)
        self.log(f"  note: {message}")

    def warn_hardware(self, reason: str) -> None:
        """Flag this stage as running without native hardware support (see ``hardware_warning``)."""
        self.hardware_warning = reason
        self.note(f"WARNING: {reason}; the measured slowdown follows the timing")


class Step(abc.ABC):
    """One technique applied to an artifact.

    Subclasses set ``name``, ``consumes`` and ``produces`` (registered artifact kinds, see
    :func:`tfaccel.core.artifact.kinds`: "keras", "saved_model", "onnx", "tflite", "tensorrt",
    "onnx_decoder", ...), ``default_tolerance``, and implement :meth:`apply`, which writes its artifact
    into ``ctx.stage_dir`` and returns it. The contract, in the order a planner uses it:

    1. :meth:`bind`: a step that can take several kinds picks the one this source gives (``xla`` takes
       a Keras model or a SavedModel source); the default keeps ``consumes``.
    2. :meth:`check`: what the step needs to run here (an optional package, a GPU, settings that fit the
       source, the user's files), raised as a TfaccelError before any step runs. What depends only on the
       machine is :meth:`unavailable`, which ``--auto`` also reads to filter its recipes.
    3. :meth:`apply`: the work.

    Args:
        tolerance: limits against the reference; defaults to the step's ``default_tolerance``.
        on_breach: "fail" (raise), "warn" (keep the stage, flag it) or "skip" (drop it and go on);
            None takes the pipeline's policy.
    """

    name: ClassVar[str]
    consumes: ClassVar[str] = "keras"
    produces: ClassVar[str] = "keras"
    default_tolerance: ClassVar[Tolerance] = Tolerance()
    #: True for side artifacts (ONNX...) that do not become the final SavedModel.
    side_artifact: ClassVar[bool] = False
    #: True if the SavedModel this step gives holds quantized weights/ops that conversions (onnx,
    #: litert-dynamic) cannot take; artifacts recording ``info["quantization"]`` (int8, int4) count too.
    quantized_output: ClassVar[bool] = False
    #: For steps that convert a SavedModel: the names of the quantizing steps (``quantized_output``)
    #: whose SavedModel they can convert (``frozenset()``: none); None: any. The planner refuses a chain
    #: that would hand one a quantized SavedModel it cannot convert, before any work, with
    #: ``quantized_input_reason`` (why) in the message.
    takes_quantized: ClassVar[frozenset[str] | None] = None
    quantized_input_reason: ClassVar[str] = ""
    #: True for a step whose long work ends by ``StepContext.deadline`` (distillation): how long it took says
    #: how much time it was given, not how long another step will take (``--auto``'s time budget).
    stops_at_deadline: ClassVar[bool] = False
    #: Non-empty for a step that parses standard ONNX operators only: why (TensorRT's parser has no importer for
    #: onnxruntime's contrib operators). The step that writes its ONNX is asked for a standard graph
    #: (:meth:`feeding`).
    standard_onnx_only: ClassVar[str] = ""
    #: The earlier stage this step starts from (``STEP@FROM``: a step name or "reference"); None
    #: takes the default input (see :class:`tfaccel.Pipeline`).
    start_from: str | None = None

    def __init__(self, tolerance: Tolerance | None = None, on_breach: str | None = None):
        if on_breach is not None and on_breach not in BREACH_POLICIES:
            raise ValueError(f"on_breach must be one of {BREACH_POLICIES}. Received: on_breach={on_breach!r}")
        self.tolerance = tolerance or self.default_tolerance
        self.tolerance_given = tolerance is not None
        self.on_breach = on_breach

    def bound_by(self, tolerance: Tolerance) -> bool:
        """Bound this stage by ``tolerance`` instead of the step's default, where what :meth:`apply` found in its
        input makes the default the wrong bound (a model computing in half precision, carried 4-bit products);
        a tolerance the user gave stays. Call it from ``apply``: the pipeline reads ``self.tolerance`` after.
        The bound holds for this stage only: :func:`tfaccel.core.chain.run_step` restores the step's own bound
        (:meth:`own_bound`) before the step is applied again. Returns whether the bound changed."""
        if self.tolerance_given:
            return False
        self.__dict__.setdefault("_own_tolerance", self.tolerance)
        self.tolerance = tolerance
        return True

    def own_bound(self) -> None:
        """Undo :meth:`bound_by`: the step's tolerance is again the one it was built with."""
        if "_own_tolerance" in self.__dict__:
            self.tolerance = self.__dict__.pop("_own_tolerance")

    def feeding(self, consumer: Step) -> Step:
        """This step as it should run when ``consumer`` starts from its artifact: the step itself (the default),
        or a copy with other settings (the ``onnx`` step leaves onnxruntime's contrib operators out of the graph a
        :attr:`standard_onnx_only` step parses). A copy, never this object changed: a step object can feed other
        chains too. The planner and :class:`tfaccel.core.chain.ChainBuilder` call it before any work.

        Raises:
            PlanError: settings the user gave that ``consumer`` cannot take.
        """
        return self

    def bind(self, source: ModelSource) -> None:
        """Choose the artifact kind this step consumes for ``source`` (set ``self.consumes``), for steps
        that take more than one kind. Called by the planner before :meth:`check`; the default keeps the
        class's ``consumes``."""
        return None

    @abc.abstractmethod
    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        """Produce the next artifact from ``artifact``, writing it under ``ctx.stage_dir``."""

    def unavailable(self, caps) -> str:
        """Why this step cannot run on this machine, or "" when it can: a missing optional package, no
        GPU, a TensorFlow without XLA or TF-TRT, a kernel form this CPU lacks. Read from ``caps``
        (:func:`tfaccel.compat.capabilities`) only, so ``override_capabilities`` decides it in tests."""
        return ""

    def check(self, source: ModelSource) -> None:
        """Raise a TfaccelError if this step cannot run on ``source`` here (:meth:`unavailable` on this
        machine, settings that do not fit the source, a data file that cannot be used). The planner calls
        it for every step before any step runs. Subclasses that add checks call ``super().check(source)``."""
        from tfaccel.compat import capabilities

        reason = self.unavailable(capabilities())
        if reason:
            raise PlanError(f"Step '{self.name}' cannot run here: {reason}.")

    def same_as_another_at(self, shapes) -> str:
        """Why, at these (batch, seq) shapes, this step builds what a simpler setting of it builds (so
        ``--auto`` need not try it), or "" (the default). E.g. int8 ``kernel="by-batch"`` when every shape
        falls on the same side of its batch split."""
        return ""

    def params(self) -> dict[str, Any]:
        """The step's settings, as recorded in the report."""
        return {}

    def get_config(self) -> dict[str, Any]:
        """Everything that makes two steps build the same artifact (name, tolerance, settings)."""
        return {"name": self.name, "tolerance": self.tolerance.get_config(), "on_breach": self.on_breach, **self.params()}

    @property
    def spec(self) -> str:
        """The step as written in ``--steps``: ``name`` or ``name@from``."""
        return f"{self.name}@{self.start_from}" if self.start_from else self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()})"


def parse_step_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"litert-dynamic@export"`` into ``("litert-dynamic", "export")``; ``"onnx"`` gives ``("onnx", None)``.

    Raises:
        PlanError: an empty name or an empty FROM (``"onnx@"``), or more than one ``@``.
    """
    name, sep, start = spec.strip().partition("@")
    name, start = name.strip(), start.strip()
    if not name or (sep and (not start or "@" in start)):
        raise PlanError(
            f"Bad step {spec!r}: write STEP or STEP@FROM, where FROM is an earlier step's name or 'reference' "
            "(e.g. litert-dynamic@export)."
        )
    return name, (start if sep else None)
