"""Pipeline step `xla`: Keras model -> SavedModel with an XLA-compiled, bucketed serving function; or
SavedModel -> SavedModel with every signature XLA-compiled."""

from __future__ import annotations

from tfaccel.core.artifact import Artifact, SavedModelRunner
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.xla.xla_export import (
    DEFAULT_BUCKETS,
    bucket_for,
    validate_buckets,
    write_xla_saved_model,
    write_xla_saved_model_from_saved_model,
)


class CompileCountingRunner(SavedModelRunner):
    """Runs the XLA SavedModel and counts the XLA compilations it caused.

    XLA compiles a cluster once per distinct input shape, so the count is the number of distinct
    (batch, padded length) shapes this runner dispatched.
    """

    def __init__(self, path: str, buckets):
        super().__init__(path)
        self.buckets = buckets
        self.shapes: set[tuple[int, int]] = set()

    def __call__(self, inputs):
        x = next(iter(inputs.values()))
        seq = x.shape[1] if self.buckets is None else bucket_for(x.shape[1], self.buckets)
        self.shapes.add((int(x.shape[0]), int(seq)))
        return super().__call__(inputs)

    def stats(self) -> dict:
        return {"xla_compilations": len(self.shapes), "compiled_shapes": sorted(self.shapes)}


class XlaArtifact(Artifact):
    def runner(self):
        return CompileCountingRunner(self.path, self.info.get("buckets"))


class XlaStep(Step):
    """Keras model -> SavedModel whose serving function is XLA-compiled (survives reload; TF Serving ok).

    From a SavedModel source (one tfaccel did not make, e.g. ``tfaccel optimize path/to/saved_model
    --steps xla``) it consumes the SavedModel instead: every signature is XLA-compiled, variables kept,
    compiled per exact input shape (a SavedModel does not record its maximum sequence length).

    Args:
        buckets: sequence lengths to pad inputs to, so XLA compiles once per bucket and batch size rather
            than per length; None to compile per exact shape (and for models without token inputs).

    Measured on bert-base, seq 128, batch 1, 2 Zen 3 cores: 1.22x the plain export (shared FACTS.md).
    """

    name = "xla"
    consumes = "keras"
    produces = "saved_model"
    # XLA fuses and reorders float32 math; padding to a bucket changes reduction order slightly.
    default_tolerance = Tolerance(max_abs_diff=1e-3, min_cosine=0.9999, max_accuracy_drop=0.0)

    # For models computing in float16/bfloat16: XLA re-fuses half-precision math, so outputs move by
    # half-precision rounding (measured: cosine 0.99988 on a bf16 MiniLM); predictions must not.
    half_precision_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.999, max_accuracy_drop=0.01)

    def __init__(self, buckets=DEFAULT_BUCKETS, **kwargs):
        super().__init__(**kwargs)
        self.buckets = validate_buckets(buckets) if buckets is not None else None

    def params(self):
        return {"buckets": list(self.buckets) if self.buckets else None, "jit_compile": True}

    def unavailable(self, caps) -> str:
        return "" if caps.xla_available else "XLA does not compile on this TensorFlow build"

    def bind(self, source) -> None:
        """Take the SavedModel itself for a SavedModel source (no Keras model exists in that pipeline),
        the Keras model otherwise."""
        self.consumes = "saved_model" if source.kind == "saved_model" else "keras"

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        if artifact.kind == "saved_model":
            return self._apply_saved_model(artifact, ctx)
        token_model = all(s.is_token_input for s in ctx.source.input_specs)
        buckets = self.buckets if token_model else None
        if self.buckets and not token_model:
            ctx.note("model has no token inputs: compiled per exact input shape, no sequence buckets")
        half = {lay.compute_dtype for lay in artifact.model._flatten_layers()} & {"float16", "bfloat16"}
        if half and self.bound_by(self.half_precision_tolerance):
            ctx.note(f"model computes in {'/'.join(sorted(half))}: tolerance set to {self.tolerance.get_config()}")
        ctx.log("  writing SavedModel with an XLA-compiled serving_default")
        info = write_xla_saved_model(artifact.model, ctx.stage_dir, buckets=buckets)
        if info["buckets"]:
            ctx.note(f"sequence lengths are padded to buckets {info['buckets']}; one XLA compilation per "
                     "(batch, bucket), paid on the first call of each")
        return XlaArtifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names,
                           info=info)

    def _apply_saved_model(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        ctx.log("  writing SavedModel with every signature XLA-compiled")
        info = write_xla_saved_model_from_saved_model(artifact.path, ctx.stage_dir)
        _check_compiles(ctx.stage_dir, ctx.source.sample_inputs)
        ctx.note(f"SavedModel source: signatures {info['signatures']} XLA-compiled over the loaded functions, "
                 "variables kept; compiled per exact input shape (no sequence buckets: a SavedModel does not "
                 "record its maximum sequence length)")
        return XlaArtifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names,
                           info=info)


def _check_compiles(path, inputs) -> None:
    """Run serving_default once: raise a StepError naming the op XLA cannot compile, if any."""
    import tensorflow as tf

    from tfaccel.errors import StepError

    try:
        SavedModelRunner(str(path))(inputs)
    except tf.errors.OpError as exc:
        import re

        text = str(exc.message)
        ops = re.search(r"Detected unsupported operations when trying to compile graph \S+ on \S+: ([^(\n]+)", text)
        what = f"ops without an XLA kernel: {ops.group(1).strip()}" if ops else text.strip().splitlines()[-1][:300]
        raise StepError(
            f"XLA cannot compile this SavedModel's serving_default ({what}). Drop 'xla' from --steps for this "
            "model; the other steps need no XLA."
        ) from exc
