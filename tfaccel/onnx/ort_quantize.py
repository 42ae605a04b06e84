"""onnxruntime dynamic int8 quantization of an ONNX model (weights int8, activations quantized at run time)."""

from __future__ import annotations

import os

from tfaccel.core.artifact import Artifact
from tfaccel.core.files import atomic_file
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance


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

    The defaults come from the CPU (:meth:`tfaccel.compat.Capabilities.ort_int8_settings`): full 8-bit
    per-tensor weights where the CPU has VNNI/AMX, 7-bit per-channel weights where it has not (onnxruntime's
    u8s8 kernels saturate there). The report records the settings and why.

    Args:
        per_channel: one scale per output channel of each weight; None: chosen for this CPU.
        reduce_range: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate; None: chosen
            for this CPU.
    """

    name = "ort-int8"
    consumes = "onnx"
    produces = "onnx"
    side_artifact = True
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.01)

    def __init__(self, per_channel: bool | None = None, reduce_range: bool | None = None, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("per_channel", per_channel), ("reduce_range", reduce_range)):
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"{name} must be true, false or unset (chosen for this CPU). "
                                 f"Received: {name}={value!r}")
        self.requested = {"per_channel": per_channel, "reduce_range": reduce_range}

    def unavailable(self, caps) -> str:
        return "" if caps.onnxruntime else "onnxruntime not installed (pip install onnxruntime)"

    def settings(self) -> dict:
        """The settings this step uses here: the requested ones, the CPU's choice for the rest."""
        from tfaccel.compat import capabilities

        chosen = capabilities().ort_int8_settings()
        out = {k: (v if v is not None else chosen[k]) for k, v in self.requested.items()}
        given = [k for k, v in self.requested.items() if v is not None]
        out["why"] = chosen["reason"] if len(given) < 2 else "set by the user"
        if given and len(given) < 2:
            out["why"] = f"{', '.join(given)} set by the user; the rest: {chosen['reason']}"
        return out

    def params(self):
        return {**self.settings(), "weights": "int8"}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        st = self.settings()
        ctx.log(f"  onnxruntime quantize_dynamic (int8 weights, per_channel={st['per_channel']}, "
                f"reduce_range={st['reduce_range']}: {st['why']})")
        path = quantize_dynamic_int8(artifact.path, ctx.stage_dir / "model.int8.onnx",
                                     per_channel=st["per_channel"], reduce_range=st["reduce_range"])
        return Artifact(kind="onnx", path=path, input_names=artifact.input_names)
