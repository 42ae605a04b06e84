"""THE table of named candidate recipes for ``tfaccel optimize MODEL --auto``.

A recipe is a list of step specs (a step name and its options), policy predicates on
:class:`tfaccel.compat.Capabilities` (what ``--auto`` chooses not to try, e.g. emulated half precision),
whether it needs fine-tuning data, and the format of the artifact it serves. Whether this machine can run
a recipe at all is each of its steps' :meth:`~tfaccel.core.step.Step.unavailable`. ``--auto`` builds every recipe that
passes its predicate, validates it against the reference and times it; nothing else decides which
techniques are tried (like optimum's O1-O4 optimization levels, kept in one place).

Order matters: recipes are built in table order, so when the run's time budget runs out the ones at
the end are the ones not tried. Cheap recipes that are often fastest come first (OpenVINO's among them:
a conversion and an NNCF quantization take seconds, and ov-int8 is the counterpart that orders the pruned
groups' ``+ov-int8`` rows); structured pruning (minutes of distillation: depth first, then width) and the
side artifacts (tf2onnx is minutes on BERT-base) come last. Recipes that share a first step and whose
remaining steps are another recipe (the ``prune-depth`` ones and the ``prune-structured`` ones: their
counterparts are ``export``, ``xla``, ``int8-*``, ``ov-int8``) are built together, one distillation per
group, fastest counterpart first, and the search skips the ones a within-budget sibling dominates
(:func:`tfaccel.auto.optimize_auto`).

Example:
    >>> from tfaccel.auto.recipes import plan_candidates
    >>> [c.recipe.name for c in plan_candidates(capabilities()) if c.runnable]  # doctest: +SKIP
    ['export', 'xla', 'int8-xla', 'int8-onednn', 'int8-keras', 'mixed_bfloat16']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from tfaccel.errors import PlanError

#: The artifact formats a recipe can serve; ``formats="savedmodel"`` keeps only the first.
FORMATS = ("savedmodel", "onnx", "tflite", "tensorrt", "openvino")
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
        requires: policy predicates on the capabilities (what --auto chooses not to try, e.g. emulated
            half precision); each returns ``(ok, reason)``. All must hold. What a step needs to run at
            all is the step's own :meth:`tfaccel.core.step.Step.unavailable`.
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
# Policy: what --auto chooses not to try even where the step could run. What a step needs to run at all
# (XLA, a kernel form, onnxruntime, a TensorRT route...) is the step's own Step.unavailable(caps), read by
# plan_candidates for every step of a recipe.


def _native_half(policy: str) -> Predicate:
    """No emulated half precision: mixed_float16 / mixed_bfloat16 run everywhere, but without native
    instructions they are slower than float32 (7.6x on an AVX2-only Zen 3), never a winner."""
    def predicate(caps) -> tuple[bool, str]:
        native, reason = caps.half_precision(policy)
        return (True, "") if native else (False, f"{policy}: {reason}")

    predicate.__name__ = policy
    return predicate


S = StepSpec.of
#: Depth pruning: half the transformer layers go, no feed-forward units (prune-structured's ``layers``).
_DEPTH = S("prune-structured", fraction=0.0, layers=0.5)

#: The one table. The first recipe is the baseline every speed-up is relative to: the plain export
#: (``model.export``'s ExportArchive SavedModel, float32); it is also a candidate, so the winner is
#: never slower than what the user had.
RECIPES: tuple[Recipe, ...] = (
    Recipe("export", (S("export"),), "float32 SavedModel, no XLA (the baseline: what model.export gives)"),
    Recipe("xla", (S("xla"),), "float32, XLA-compiled serving function"),
    Recipe("int8-xla", (S("int8", kernel="xla"),), "Keras int8, int8 x int8 products in XLA"),
    Recipe("int8-onednn", (S("int8", kernel="onednn"),), "Keras int8, oneDNN's int8 inner product (no XLA)"),
    Recipe("int8-keras", (S("int8", kernel="keras"),), "Keras int8, Keras' own int8 calls (comparison form)"),
    # XLA's int8 was the faster form at batch 1, oneDNN's at batch 32 (minilm-bbc, benchmarks/RESULTS.md): one
    # SavedModel with both, chosen by the batch size. Only a candidate where the run's shapes straddle the split.
    Recipe("int8-by-batch", (S("int8", kernel="by-batch"),),
           "Keras int8: XLA products at batch 1, oneDNN's int8 inner product above"),
    # The export after it writes the bfloat16 products as 2-D MatMuls (export products="auto"): 1.12x / 1.71x
    # model.export against 1.08x / 1.38x with Keras' einsums, minilm-bbc on a bf16 Zen 4 (benchmarks/RESULTS.md).
    Recipe("mixed_bfloat16", (S("mixed_bfloat16"),), "bfloat16 compute (products as 2-D MatMuls), float32 head/softmax/norms",
           requires=(_native_half("mixed_bfloat16"),)),
    Recipe("mixed_float16", (S("mixed_float16"),), "float16 compute, float32 head/softmax/norms",
           requires=(_native_half("mixed_float16"),)),
    Recipe("openvino", (S("export"), S("openvino")),
           "OpenVINO IR (openvino.convert_model) in OpenVINO's CPU plugin, in bf16 where the CPU has it (f32 on a "
           "bf16 CPU measured 0.6-0.8x as fast, so it is no candidate), else f32", format="openvino"),
    Recipe("ov-int8", (S("export"), S("openvino"), S("ov-int8")),
           "OpenVINO int8 (NNCF post-training quantization, ModelType.TRANSFORMER, 64 calibration samples)",
           format="openvino"),
    # Depth (the DistilBERT recipe): half the transformer layers, kept evenly spread, distilled like the width
    # recipes; one distillation per group, the +int8 rows reuse the distilled model. Before width: on minilm-bbc
    # it distils in about 2/3 of width's time and was faster (2.58x vs 1.89x model.export at 1x128) and as
    # accurate (0.953 vs 0.942 over 3 seeds; benchmarks/RESULTS.md), so a short budget should reach it first.
    Recipe("prune-depth", (_DEPTH,), "half the transformer layers removed (evenly spread kept), distilled",
           needs_finetune_data=True),
    Recipe("prune-depth+int8-xla", (_DEPTH, S("int8", kernel="xla")),
           "half the layers removed and distilled, then int8 in XLA", needs_finetune_data=True),
    Recipe("prune-depth+int8-onednn", (_DEPTH, S("int8", kernel="onednn")),
           "half the layers removed and distilled, then int8 in oneDNN", needs_finetune_data=True),
    Recipe("prune-depth+int8-by-batch", (_DEPTH, S("int8", kernel="by-batch")),
           "half the layers removed and distilled, then int8: XLA at batch 1, oneDNN above", needs_finetune_data=True),
    Recipe("prune-depth+ov-int8", (_DEPTH, S("export"), S("openvino"), S("ov-int8")),
           "half the layers removed and distilled, then OpenVINO int8 (NNCF)", needs_finetune_data=True,
           format="openvino"),
    Recipe("prune-structured", (S("prune-structured"),),
           "half the feed-forward units removed, distilled on the fine-tuning data", needs_finetune_data=True),
    Recipe("prune-structured+xla", (S("prune-structured"), S("xla")), "pruned and distilled, then XLA", needs_finetune_data=True),
    Recipe("prune-structured+int8-xla", (S("prune-structured"), S("int8", kernel="xla")),
           "pruned and distilled, then int8 in XLA", needs_finetune_data=True),
    Recipe("prune-structured+int8-onednn", (S("prune-structured"), S("int8", kernel="onednn")),
           "pruned and distilled, then int8 in oneDNN", needs_finetune_data=True),
    Recipe("prune-structured+int8-by-batch", (S("prune-structured"), S("int8", kernel="by-batch")),
           "pruned and distilled, then int8: XLA at batch 1, oneDNN above", needs_finetune_data=True),
    Recipe("prune-structured+ov-int8", (S("prune-structured"), S("export"), S("openvino"), S("ov-int8")),
           "pruned and distilled, then OpenVINO int8 (NNCF)", needs_finetune_data=True, format="openvino"),
    Recipe("tftrt-fp16", (S("export"), S("tftrt", precision="fp16")), "TF-TRT fp16 SavedModel (NVIDIA GPU)"),
    Recipe("tftrt-int8", (S("export"), S("tftrt", precision="int8")), "TF-TRT int8 SavedModel (NVIDIA GPU)"),
    # LiteRT before the onnxruntime recipes: its conversion takes a fraction of tf2onnx's (BERT-base: 40 s vs
    # 137 s), and on CPUs it was the faster of the two (BERT-base 3.89x vs 1.19x). Near the end of the time
    # budget the cheaper, likelier winner is tried first.
    Recipe("litert-dynamic", (S("export"), S("litert-dynamic")), "LiteRT dynamic-range int8 (.tflite)", format="tflite"),
    Recipe("onnx", (S("export"), S("onnx", opset=17)), "ONNX (tf2onnx) in onnxruntime, float32", format="onnx"),
    Recipe("ort-int8", (S("export"), S("onnx", opset=17), S("ort-int8")),
           "onnxruntime dynamic int8 (the step picks per_channel/reduce_range for this CPU)", format="onnx"),
    Recipe("tensorrt-fp16", (S("export"), S("onnx", opset=17), S("tensorrt", precision="fp16")),
           "TensorRT fp16 engine from the ONNX model (NVIDIA GPU)",
           format="tensorrt"),
    Recipe("tensorrt-int8", (S("export"), S("onnx", opset=17), S("tensorrt", precision="int8")),
           "TensorRT int8 engine from the ONNX model (NVIDIA GPU)",
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
        if ok:  # what each step needs to run here (Step.unavailable), then the recipe's policy
            reason = next((why for step in r.make_steps() if (why := step.unavailable(caps))), "")
            ok = not reason
        out.append(PlannedCandidate(r, ok, reason))
    return out
