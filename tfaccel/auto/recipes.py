"""THE table of named candidate recipes for ``tfaccel optimize MODEL --auto``.

A recipe is a list of step specs (a step name and its options), a predicate on
:class:`tfaccel.compat.Capabilities` that says whether this machine can run it (and why not), whether it
needs fine-tuning data, and the format of the artifact it serves. ``--auto`` builds every recipe that
passes its predicate, validates it against the reference and times it; nothing else decides which
techniques are tried (like optimum's O1-O4 optimization levels, kept in one place).

Order matters: recipes are built in table order, so when the run's time budget runs out the ones at
the end are the ones not tried. Cheap recipes that are often fastest come first; structured pruning
(minutes of distillation: width first, then depth) and the side artifacts (tf2onnx is minutes on BERT-base)
come last. Recipes that share a first step and whose remaining steps are another recipe (the
``prune-structured`` ones and the ``prune-depth`` ones: their counterparts are ``export``, ``xla``,
``int8-*``) are built together, one distillation per group, fastest counterpart first,
and the search skips the ones a within-budget sibling dominates (:func:`tfaccel.auto.optimize_auto`).

Example:
    >>> from tfaccel.auto.recipes import plan_candidates
    >>> [c.recipe.name for c in plan_candidates(capabilities()) if c.runnable]  # doctest: +SKIP
    ['export', 'xla', 'int8-xla', 'int8-onednn', 'int8-keras', 'mixed_bfloat16']
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

from tfaccel.errors import PlanError

#: The artifact formats a recipe can serve; ``formats="savedmodel"`` keeps only the first.
FORMATS = ("savedmodel", "onnx", "tflite", "tensorrt")
#: What ``--formats`` accepts.
FORMAT_CHOICES = ("savedmodel", "all")

Predicate = Callable[[Any], tuple[bool, str]]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One step of a recipe: a registered step name and its options.

    Args:
        name: a step name from :func:`tfaccel.available_steps`.
        options: keyword arguments for :func:`tfaccel.get_step`.

    Steps that depend on the hardware read :func:`tfaccel.capabilities` themselves (``ort-int8`` picks
    ``per_channel`` / ``reduce_range`` for the CPU), so a spec only names what differs between recipes.
    """

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, name: str, **options: Any) -> StepSpec:
        return cls(name, tuple(sorted(options.items())))

    def make(self, **extra: Any):
        """The Step object (``extra`` fills options the spec leaves unset)."""
        from tfaccel.steps import get_step

        return get_step(self.name, **{**extra, **dict(self.options)})

    def describe(self) -> str:
        opts = dict(self.options)
        shown = {k: v for k, v in opts.items() if k not in ("tolerance", "on_breach")}
        return self.name + (f"({', '.join(f'{k}={v}' for k, v in sorted(shown.items()))})" if shown else "")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named candidate: steps applied in order to the source (an ``export`` is appended when the
    last step leaves a Keras model, as :meth:`tfaccel.Pipeline.plan` does).

    Args:
        name: short unique name, shown in the report (e.g. ``"int8-xla"``).
        steps: the step specs, in order.
        description: one line for the report.
        requires: predicates on the capabilities; each returns ``(ok, reason)``. All must hold.
        needs_finetune_data: only a candidate when fine-tuning data is given (or the source has its own
            training split, like minilm-bbc).
        format: what the recipe serves: "savedmodel" (a candidate for ``DIR/saved_model``), or a side
            artifact format ("onnx", "tflite", "tensorrt").
    """

    name: str
    steps: tuple[StepSpec, ...]
    description: str = ""
    requires: tuple[Predicate, ...] = ()
    needs_finetune_data: bool = False
    format: str = "savedmodel"

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"Recipe.name must be a non-empty string. Received: name={self.name!r}")
        if not self.steps:
            raise ValueError(f"Recipe {self.name!r} has no steps. Give at least one StepSpec.")
        if self.format not in FORMATS:
            raise ValueError(f"Recipe.format must be one of {FORMATS}. Received: format={self.format!r}")

    def check(self, caps) -> tuple[bool, str]:
        """Whether this machine can run the recipe: ``(True, "")`` or ``(False, reason)``."""
        for predicate in self.requires:
            ok, reason = predicate(caps)
            if not ok:
                return False, reason
        return True, ""

    def make_steps(self, step_defaults: dict[str, dict[str, Any]] | None = None) -> list:
        """The Step objects; ``step_defaults`` (step name -> options) fills options a spec leaves unset,
        e.g. ``{"prune-structured": {"data": "train.npz"}}``."""
        return [spec.make(**(step_defaults or {}).get(spec.name, {})) for spec in self.steps]

    def describe_steps(self) -> str:
        return " -> ".join(spec.describe() for spec in self.steps)


# --------------------------------------------------------------------------------------------------
# Predicates: every one asks tfaccel.compat, the one place that probes the machine.


def _xla(caps) -> tuple[bool, str]:
    return (True, "") if caps.xla_available else (False, "XLA does not compile on this TensorFlow build")


def _int8_form(form: str) -> Predicate:
    def predicate(caps) -> tuple[bool, str]:
        runs, reason = caps.int8_kernel_forms()[form]
        return (True, "") if runs else (False, f"int8 kernel form '{form}' does not run here: {reason}")

    predicate.__name__ = f"int8_{form}"
    return predicate


def _half(policy: str) -> Predicate:
    def predicate(caps) -> tuple[bool, str]:
        native, reason = caps.half_precision(policy)
        return (True, "") if native else (False, f"{policy}: {reason}")

    predicate.__name__ = policy
    return predicate


def _onnx(caps) -> tuple[bool, str]:
    missing = [name for name, version in (("tf2onnx", caps.tf2onnx), ("onnxruntime", caps.onnxruntime)) if not version]
    return (False, f"{' and '.join(missing)} not installed") if missing else (True, "")


def _litert(caps) -> tuple[bool, str]:
    from tfaccel.compat import package_version

    return (True, "") if package_version("ai-edge-litert") else (False, "ai-edge-litert is not installed")


def _trt_route(route: str) -> Predicate:
    def predicate(caps) -> tuple[bool, str]:
        have, reason = caps.tensorrt_route
        if have == route:
            return True, ""
        return False, f"TensorRT route '{route}' is not available here ({reason})"

    predicate.__name__ = f"trt_{route}"
    return predicate


S = StepSpec.of
#: Depth pruning: half the transformer layers go, no feed-forward units (prune-structured's ``layers``).
_DEPTH = S("prune-structured", fraction=0.0, layers=0.5)

#: The one table. The first recipe is the baseline every speed-up is relative to: the plain export
#: (``model.export``'s ExportArchive SavedModel, float32); it is also a candidate, so the winner is
#: never slower than what the user had.
RECIPES: tuple[Recipe, ...] = (
    Recipe("export", (S("export"),), "float32 SavedModel, no XLA (the baseline: what model.export gives)"),
    Recipe("xla", (S("xla"),), "float32, XLA-compiled serving function", requires=(_xla,)),
    Recipe("int8-xla", (S("int8", kernel="xla"),), "Keras int8, int8 x int8 products in XLA",
           requires=(_xla, _int8_form("xla"))),
    Recipe("int8-onednn", (S("int8", kernel="onednn"),), "Keras int8, oneDNN's int8 inner product (no XLA)",
           requires=(_int8_form("onednn"),)),
    Recipe("int8-keras", (S("int8", kernel="keras"),), "Keras int8, Keras' own int8 calls (comparison form)",
           requires=(_int8_form("keras"),)),
    Recipe("mixed_bfloat16", (S("mixed_bfloat16"),), "bfloat16 compute, float32 head/softmax/norms",
           requires=(_half("mixed_bfloat16"),)),
    Recipe("mixed_float16", (S("mixed_float16"),), "float16 compute, float32 head/softmax/norms",
           requires=(_half("mixed_float16"),)),
    Recipe("prune-structured", (S("prune-structured"),),
           "half the feed-forward units removed, distilled on the fine-tuning data", needs_finetune_data=True),
    Recipe("prune-structured+xla", (S("prune-structured"), S("xla")), "pruned and distilled, then XLA",
           requires=(_xla,), needs_finetune_data=True),
    Recipe("prune-structured+int8-xla", (S("prune-structured"), S("int8", kernel="xla")),
           "pruned and distilled, then int8 in XLA", requires=(_xla, _int8_form("xla")), needs_finetune_data=True),
    Recipe("prune-structured+int8-onednn", (S("prune-structured"), S("int8", kernel="onednn")),
           "pruned and distilled, then int8 in oneDNN", requires=(_int8_form("onednn"),), needs_finetune_data=True),
    # Depth (the DistilBERT recipe): half the transformer layers, kept evenly spread, distilled like the width
    # recipes. One distillation per group: the +int8 rows reuse the distilled model.
    Recipe("prune-depth", (_DEPTH,), "half the transformer layers removed (evenly spread kept), distilled",
           needs_finetune_data=True),
    Recipe("prune-depth+int8-xla", (_DEPTH, S("int8", kernel="xla")), "half the layers removed and distilled, "
           "then int8 in XLA", requires=(_xla, _int8_form("xla")), needs_finetune_data=True),
    Recipe("prune-depth+int8-onednn", (_DEPTH, S("int8", kernel="onednn")), "half the layers removed and distilled, "
           "then int8 in oneDNN", requires=(_int8_form("onednn"),), needs_finetune_data=True),
    Recipe("tftrt-fp16", (S("export"), S("tftrt", precision="fp16")), "TF-TRT fp16 SavedModel (NVIDIA GPU)",
           requires=(_trt_route("tftrt"),)),
    Recipe("tftrt-int8", (S("export"), S("tftrt", precision="int8")), "TF-TRT int8 SavedModel (NVIDIA GPU)",
           requires=(_trt_route("tftrt"),)),
    Recipe("onnx", (S("export"), S("onnx", opset=17)), "ONNX (tf2onnx) in onnxruntime, float32",
           requires=(_onnx,), format="onnx"),
    Recipe("ort-int8", (S("export"), S("onnx", opset=17), S("ort-int8")),
           "onnxruntime dynamic int8 (the step picks per_channel/reduce_range for this CPU)", requires=(_onnx,), format="onnx"),
    Recipe("litert-dynamic", (S("export"), S("litert-dynamic")), "LiteRT dynamic-range int8 (.tflite)",
           requires=(_litert,), format="tflite"),
    Recipe("tensorrt-fp16", (S("export"), S("onnx", opset=17), S("tensorrt", precision="fp16")),
           "TensorRT fp16 engine from the ONNX model (NVIDIA GPU)", requires=(_onnx, _trt_route("tensorrt")),
           format="tensorrt"),
    Recipe("tensorrt-int8", (S("export"), S("onnx", opset=17), S("tensorrt", precision="int8")),
           "TensorRT int8 engine from the ONNX model (NVIDIA GPU)", requires=(_onnx, _trt_route("tensorrt")),
           format="tensorrt"),
)

BASELINE = RECIPES[0].name
#: The baseline of a SavedModel source: the SavedModel itself.
SOURCE_BASELINE = "source"


def recipe_table() -> dict[str, Recipe]:
    """Recipe name -> Recipe, in build order."""
    return {r.name: r for r in RECIPES}


@dataclasses.dataclass(frozen=True)
class PlannedCandidate:
    """A recipe and whether this run tries it: ``runnable`` False carries the reason."""

    recipe: Recipe
    runnable: bool
    reason: str = ""


def plan_candidates(
    caps,
    *,
    finetune_data: bool = False,
    formats: str = "savedmodel",
    recipes: Sequence[Recipe | str] | None = None,
) -> list[PlannedCandidate]:
    """Filter the recipe table by what this machine can run, the data given and the formats wanted.

    Args:
        caps: :func:`tfaccel.capabilities` (or a capabilities object under
            :func:`tfaccel.compat.override_capabilities`).
        finetune_data: fine-tuning data is available (recipes that need it are candidates).
        formats: "savedmodel" (SavedModel candidates only) or "all" (side artifacts too).
        recipes: a subset of recipe names from the table, or your own :class:`Recipe` objects (default:
            the whole table). The baseline (``export``) is always included, first.

    Returns:
        Every recipe considered, in build order, each runnable or not with the reason.

    Raises:
        PlanError: an unknown recipe name or format.

    Example:
        >>> [c.recipe.name for c in plan_candidates(capabilities(), formats="all") if not c.runnable]  # doctest: +SKIP
        ['int8-onednn', 'mixed_float16', 'prune-structured', ...]
    """
    if formats not in FORMAT_CHOICES:
        raise PlanError(f"formats must be one of {FORMAT_CHOICES}. Received: formats={formats!r}")
    table = recipe_table()
    if recipes is None:
        chosen = list(RECIPES)
    else:
        chosen = []
        for r in recipes:
            if isinstance(r, Recipe):
                chosen.append(r)
            elif isinstance(r, str) and r in table:
                chosen.append(table[r])
            else:
                raise PlanError(f"Unknown recipe {r!r}. Recipes: {', '.join(table)}.")
        if not any(r.name == BASELINE for r in chosen):
            chosen.insert(0, table[BASELINE])
        names = [r.name for r in chosen]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise PlanError(f"Recipe names must be unique; {dup} appear more than once.")
    out = []
    for r in chosen:
        if formats == "savedmodel" and r.format != "savedmodel":
            out.append(PlannedCandidate(r, False, f"serves {r.format}, not a SavedModel (--formats all tries it)"))
            continue
        if r.needs_finetune_data and not finetune_data:
            out.append(PlannedCandidate(r, False, "needs fine-tuning data (pass finetune_data= / --finetune-data "
                                                  "an .npz of inputs and labels)"))
            continue
        ok, reason = r.check(caps)
        out.append(PlannedCandidate(r, ok, reason))
    return out


def step_key(step) -> str:
    """A step's identity for sharing built prefixes between recipes (its name and settings)."""
    return json.dumps(step.get_config(), sort_keys=True, default=str)
