"""Pipeline steps `mixed_float16` and `mixed_bfloat16`: cast a trained float32 model for inference."""

from __future__ import annotations

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.precision.mixed_precision import apply_mixed_precision, precision_summary


class MixedPrecisionStep(Step):
    """Keras float32 model -> the same weights computing in float16/bfloat16 (softmax, layer norm and the
    classifier head in float32). The pipeline exports it after this step.

    Args:
        policy: "mixed_float16" or "mixed_bfloat16".
    """

    consumes = produces = "keras"

    def __init__(self, policy: str = "mixed_float16", **kwargs):
        if policy not in ("mixed_float16", "mixed_bfloat16"):
            raise ValueError(f"policy must be mixed_float16 or mixed_bfloat16. Received: policy={policy!r}")
        self.policy = policy
        super().__init__(**kwargs)
        if kwargs.get("tolerance") is None:
            # float16 keeps ~3 significant digits, bfloat16 ~2: outputs move, predictions should not.
            self.tolerance = Tolerance(max_abs_diff=None, min_cosine=0.999 if policy == "mixed_float16" else 0.99,
                                       max_accuracy_drop=0.01)

    @property
    def name(self):  # one class, two registered step names
        return self.policy

    def params(self):
        return {"policy": self.policy}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.compat import capabilities

        fast, why = capabilities().half_precision(self.policy)
        if not fast:  # still runs when asked for; the pipeline adds the slowdown it measures
            ctx.warn_hardware(f"{self.policy} has no native support here: {why}")
        model = apply_mixed_precision(artifact.model, self.policy)
        summary = precision_summary(model)
        ctx.note(f"variables {summary['variable_dtypes']}; layer compute dtypes {summary['compute_dtypes']}")
        model.save(ctx.stage_dir / "model.keras")
        return Artifact(kind="keras", path=str(ctx.stage_dir / "model.keras"), model=model,
                        dict_inputs=artifact.dict_inputs, input_names=artifact.input_names)
