"""Running steps: one step (:func:`run_step`), and chains of steps from one source with shared
prefixes (:class:`ChainBuilder`). The pipeline runs its stages with :func:`run_step`; ``--auto`` and the
benchmarks build their candidates with a :class:`ChainBuilder`, so two chains that start with the same
steps (same settings) build them once: ``prune-structured`` once for ``prune-structured+xla`` and
``prune-structured+int8``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tfaccel.core.artifact import Artifact, kind_name
from tfaccel.core.source import ModelSource
from tfaccel.core.step import Step, StepContext
from tfaccel.errors import OverBudget, PlanError, StepError, TfaccelError, first_line


def step_key(step: Step) -> str:
    """A step's identity for sharing built prefixes (its name and settings, :meth:`Step.get_config`)."""
    return json.dumps(step.get_config(), sort_keys=True, default=str)


def fit_to_consumers(steps: Sequence[Step], inputs: dict[int, int | None]) -> list[Step]:
    """``steps`` with each producer replaced by what it should be for the steps that start from its artifact
    (:meth:`Step.feeding`, e.g. an ``onnx`` step that feeds ``tensorrt`` writes standard ONNX).

    Args:
        steps: the steps in order.
        inputs: consumer position -> the position of the step whose artifact it starts from (0-based), or None
            for the source.

    Raises:
        PlanError: a producer's settings that one of its consumers cannot take.
    """
    out = list(steps)
    for k in sorted(inputs):
        j = inputs[k]
        if j is not None:
            out[j] = out[j].feeding(out[k])
    return out


def _linear(steps: Sequence[Step]) -> list[Step]:
    """A chain's steps fitted to their consumers: each starts from the one before it."""
    return fit_to_consumers(steps, {k: k - 1 for k in range(1, len(steps))})


@dataclasses.dataclass
class StepRun:
    """What :func:`run_step` gives: the artifact, the seconds ``apply`` took, and the step's notes."""

    artifact: Artifact
    seconds: float
    notes: list[str]
    hardware_warning: str | None = None


def run_step(step: Step, artifact: Artifact, source: ModelSource, stage_dir: Path, *,
             log: Callable[[str], None], shapes: Sequence[tuple[int, int]] = (), deadline: float | None = None) -> StepRun:
    """Apply one step to ``artifact``, writing into ``stage_dir`` (created here, removed if the step fails).

    Raises:
        PlanError: ``artifact`` is not the kind the step consumes.
        TfaccelError: the step's own errors, as they are (StepError, OverBudget, ...).
        StepError: any other exception from the step, with the step's name.
    """
    if step.consumes != artifact.kind:
        raise PlanError(f"step '{step.name}' needs {kind_name(step.consumes)}, the step before it gives "
                        f"{kind_name(artifact.kind)}")
    stage_dir.mkdir(parents=True)
    notes: list[str] = []
    ctx = StepContext(source=source, stage_dir=stage_dir, log=log, notes=notes, shapes=list(shapes), deadline=deadline)
    step.own_bound()  # a bound the step set for an earlier input does not carry over to this one
    t0 = time.perf_counter()
    try:
        out = step.apply(artifact, ctx)
    except TfaccelError:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    except Exception as exc:
        shutil.rmtree(stage_dir, ignore_errors=True)
        err = StepError(f"Step '{step.name}' failed: {type(exc).__name__}: {exc}")
        err.unexpected = True  # the CLI writes its traceback to a log file (exit 1)
        raise err from exc
    return StepRun(out, time.perf_counter() - t0, notes, ctx.hardware_warning)


@dataclasses.dataclass
class Built:
    """A chain's artifact: ``seconds`` of all its steps (cached ones count what they took), their notes
    prefixed with the step's name."""

    artifact: Artifact
    seconds: float
    notes: list[str]


class ChainBuilder:
    """Builds chains of steps from one source, each step once per distinct prefix.

    A prefix that failed keeps its failure: a later chain that needs it fails at once, naming the step
    and the first line of its error (an :class:`~tfaccel.errors.OverBudget` stays an OverBudget).

    Args:
        source: the model source every chain starts from (:meth:`Artifact.of_source`).
        work: where stage folders go (``work/<chain name>/<NN>-<step>``).
        log: progress lines.

    Example:
        >>> b = ChainBuilder(source, Path("work"), print)  # doctest: +SKIP
        >>> b.build("int8-xla", [get_step("int8", kernel="xla")]).artifact.kind  # doctest: +SKIP
        'saved_model'
    """

    def __init__(self, source: ModelSource, work: Path, log: Callable[[str], None]):
        self.source, self.work, self.log = source, Path(work), log
        self.reference = Artifact.of_source(source)
        self._cache: dict[tuple[str, ...], Built | BaseException] = {}
        #: step name -> seconds its last build took here (what later chains' times are estimated from)
        self.step_seconds: dict[str, float] = {}

    def unbuilt(self, steps: Sequence[Step]) -> list[Step]:
        """The steps of a chain whose artifacts are not built (or failed) yet."""
        steps = _linear(steps)
        keys = [step_key(s) for s in steps]
        return [s for k, s in enumerate(steps) if tuple(keys[: k + 1]) not in self._cache]

    def build(self, name: str, steps: Sequence[Step],
              deadline_for: Callable[[int], float | None] = lambda k: None) -> Built:
        """The artifact after ``steps`` (the reference for an empty chain).

        Args:
            name: the chain's name (its stage folders go under ``work/name``).
            steps: the steps, in order.
            deadline_for: ``deadline_for(k)`` is the ``time.perf_counter()`` by which step ``k`` should be
                done, or None; steps that can stop long work (distillation) stop when they would not.

        Raises:
            PlanError: a step's settings that the step after it cannot take (:meth:`Step.feeding`).
        """
        steps = _linear(steps)  # before the keys: a step fitted to its consumer builds another artifact
        keys = [step_key(s) for s in steps]
        built = Built(self.reference, 0.0, [])
        for k, step in enumerate(steps):
            prefix = tuple(keys[: k + 1])
            cached = self._cache.get(prefix)
            if isinstance(cached, OverBudget):
                raise cached
            if isinstance(cached, BaseException):
                raise StepError(f"step '{step.name}' failed earlier in this run: {first_line(cached)}")
            if cached is not None:  # cumulative: the seconds and notes of every step up to this one
                built = Built(cached.artifact, cached.seconds, list(cached.notes))
                continue
            stage = self.work / name / f"{k + 1:02d}-{step.name}"
            self.log(f"  {step.name}: {kind_name(step.consumes)} -> {kind_name(step.produces)}")
            try:
                run = run_step(step, built.artifact, self.source, stage, log=self.log, deadline=deadline_for(k))
            except BaseException as exc:
                self._cache[prefix] = exc
                raise
            self.step_seconds[step.name] = run.seconds
            built = Built(run.artifact, built.seconds + run.seconds,
                          built.notes + [f"{step.name}: {n}" for n in run.notes])
            self._cache[prefix] = built
        return built

    def forget_keras(self, still_needed: set[tuple[str, ...]]) -> None:
        """Drop in-memory Keras models no later chain builds on (their files stay on disk)."""
        for prefix, value in list(self._cache.items()):
            if isinstance(value, Built) and value.artifact.kind == "keras" and prefix not in still_needed:
                del self._cache[prefix]

