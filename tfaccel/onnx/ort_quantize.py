"""onnxruntime dynamic int8 quantization of an ONNX model (weights int8, activations quantized at run time)."""

from __future__ import annotations

import os

from tfaccel.artifacts import Artifact, atomic_file
from tfaccel.pipeline import Step, StepContext
from tfaccel.validation import Tolerance


def quantize_dynamic_int8(onnx_path: str | os.PathLike, output_path: str | os.PathLike, *,
                          per_channel: bool = False, reduce_range: bool = False) -> str:
    """Dynamic int8 quantization with onnxruntime.

    ``DefaultTensorType`` is set to float: on graphs from tf2onnx, onnxruntime otherwise fails with
    "Unable to find data type for weight_name=..." (shared FACTS.md).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_file(output_path) as tmp:
        quantize_dynamic(
            str(onnx_path), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
            reduce_range=reduce_range, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return str(output_path)


class OrtInt8Step(Step):
    """ONNX -> onnxruntime dynamic int8 ONNX. A side artifact of the run.

    Args:
        per_channel: one scale per output channel of each weight (usually more accurate).
        reduce_range: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate.
    """

    name = "ort-int8"
    consumes = "onnx"
    produces = "onnx"
    side_artifact = True
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.01)

    def __init__(self, per_channel: bool = False, reduce_range: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.per_channel, self.reduce_range = bool(per_channel), bool(reduce_range)

    def params(self):
        return {"per_channel": self.per_channel, "reduce_range": self.reduce_range, "weights": "int8"}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        ctx.log("  onnxruntime quantize_dynamic (int8 weights)")
        path = quantize_dynamic_int8(artifact.path, ctx.stage_dir / "model.int8.onnx",
                                     per_channel=self.per_channel, reduce_range=self.reduce_range)
        return Artifact(kind="onnx", path=path, input_names=artifact.input_names)
