"""ONNX -> TensorRT engine: the TensorRT route that works with any recent TensorFlow.

Consumes the ``onnx`` step's model, builds a serialized engine with the ``tensorrt`` package
(``pip install 'tfaccel[trt]'``, NVIDIA GPU) and hands the pipeline a runner, so the engine is
validated against the reference and measured like every other stage. A side artifact: the final
SavedModel stays the one before it.
"""

from __future__ import annotations

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.tensorrt.availability import import_cudart, import_tensorrt, require_gpu
from tfaccel.tensorrt.engine_build import ENGINE_FILE, build_engine
from tfaccel.tensorrt.trt_api import TrtApi, plan_build
from tfaccel.tensorrt.trt_config import TensorRTConfig, TrtStepBase, profiles_for

TENSORRT_TOLERANCES = {
    # TF32 is off for "fp32" engines: only kernel choice and summation order differ from onnxruntime.
    "fp32": Tolerance(max_abs_diff=1e-3, min_cosine=0.9999, max_accuracy_drop=0.0),
    # fp16 keeps ~3 significant digits: logits move by ~1e-3 relative; a decision may flip rarely.
    "fp16": Tolerance(max_abs_diff=None, min_cosine=0.999, max_accuracy_drop=0.01),
    # int8 Q/DQ: static, per-tensor, symmetric activation scales (TensorRT's requirement) are coarser than
    # onnxruntime's dynamic per-batch ones (ort-int8: 1 point). Measured on MiniLM + BBC News, 200 held-out
    # articles (0.5 point each): 0.93 -> 0.91-0.92 with 32-64 calibration articles. Allow 2 points.
    "int8": Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.02),
}
# fp32 with TF32 tensor cores: ~1e-3 relative error in matrix products.
TF32_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.9999, max_accuracy_drop=0.0)


class TensorRTStep(TrtStepBase):
    """ONNX model -> TensorRT engine (fp32, fp16 or int8), checked on the GPU. A side artifact.

    Args:
        precision: "fp32", "fp16" or "int8"; or pass ``config``. Other keyword arguments are
            :class:`TensorRTConfig` fields (max_workspace_bytes, profiles, max_batch, max_seq,
            optimization_level, allow_tf32, ...).
        config: a whole :class:`TensorRTConfig` instead of fields.
        calibration_inputs: your own int8 calibration data (name -> array); default: the source's
            eval split, else its sample inputs.
        tolerance, on_breach: see :class:`tfaccel.Step`; the default tolerance depends on the precision.

    Example:
        >>> from tfaccel import Pipeline
        >>> Pipeline(["export", "onnx", TensorRTStep("fp16")]).run(source, "out")  # doctest: +SKIP
    """

    name = "tensorrt"
    consumes = "onnx"
    produces = "tensorrt"
    side_artifact = True
    default_tolerance = TENSORRT_TOLERANCES["fp16"]
    standard_onnx_only = "TensorRT's ONNX parser has no importer for onnxruntime's contrib operators"

    config_cls = TensorRTConfig

    @classmethod
    def tolerance_for(cls, config: TensorRTConfig) -> Tolerance:
        if config.precision == "fp32" and config.allow_tf32:
            return TF32_TOLERANCE
        return TENSORRT_TOLERANCES[config.precision]

    route = "tensorrt"

    def check(self, source):
        """Fail before any work where the step cannot run: returns the imported ``tensorrt`` module.

        Raises:
            MissingDependencyError: ``tensorrt`` or ``cuda-python`` is not installed.
            StepError: no GPU, TensorRT older than 10, or a precision this TensorRT cannot build.
            ValueError: the profile limits are smaller than the source's sample inputs.
        """
        trt = import_tensorrt()
        import_cudart()
        require_gpu("The tensorrt step")
        plan_build(self.config.precision, TrtApi.of(trt), allow_tf32=self.config.allow_tf32)
        profiles_for(self.config, source)
        return trt

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        trt = self.check(ctx.source)
        self._note_route(ctx)
        plan = plan_build(self.config.precision, TrtApi.of(trt), allow_tf32=self.config.allow_tf32)
        ctx.note(plan.description)
        profiles = profiles_for(self.config, ctx.source)
        ctx.note("profiles: " + "; ".join(p.describe() for p in profiles))
        calibration = self._calibration(ctx) if plan.onnx_transform == "int8-qdq" else None
        info = build_engine(artifact.path, ctx.stage_dir / ENGINE_FILE, self.config, profiles=profiles,
                            calibration_batches=calibration, log=ctx.log)
        ctx.note(f"engine built in {info['build_seconds']:.1f}s with TensorRT {info['tensorrt']}; it runs only "
                 "with that TensorRT version on the same GPU model")
        return Artifact(kind="tensorrt", path=str(ctx.stage_dir / ENGINE_FILE),
                                 input_names=artifact.input_names, info=info)

