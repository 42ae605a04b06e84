"""ONNX graph rewrites that carry precision into strongly typed TensorRT networks.

- :func:`convert_onnx_to_fp16`: float32 -> float16 everywhere inside the graph; inputs and outputs
  keep their types (int32 token ids in, float32 logits out), so callers do not change.
- :func:`quantize_onnx_qdq_int8`: explicit int8 Q/DQ nodes on the MatMul/Gemm layers with weights,
  with symmetric scales (zero points 0, as TensorRT requires) calibrated on a representative dataset.

Both use onnxruntime's tooling (a default dependency), and the results still run in onnxruntime
on the CPU, so they can be checked without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tfaccel.core.files import atomic_file
from tfaccel.errors import StepError

#: The int8 route quantizes the matrix products: that is where the time and the int8 kernels are.
QDQ_OP_TYPES = ("MatMul", "Gemm")


def _save(model, output_path: Path) -> str:
    import onnx

    with atomic_file(output_path) as tmp:
        onnx.save(model, str(tmp))
    return str(output_path)


def convert_onnx_to_fp16(onnx_path: str | os.PathLike, output_path: str | os.PathLike, *,
                         keep_fp32_ops: Sequence[str] = ()) -> str:
    """Convert an ONNX model's float32 math and weights to float16, keeping its I/O types.

    Args:
        onnx_path: the float32 model.
        output_path: where to write the float16 model.
        keep_fp32_ops: op types to leave in float32 (besides onnxruntime's default block list),
            e.g. ``["Softmax"]`` if a model overflows in fp16.

    Returns:
        The path written.

    Example:
        >>> convert_onnx_to_fp16("model.onnx", "model.fp16.onnx")  # doctest: +SKIP
        'model.fp16.onnx'
    """
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(onnx_path))
    try:
        fp16 = convert_float_to_float16(model, keep_io_types=True,
                                        op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(keep_fp32_ops))
    except Exception as exc:
        raise StepError(f"Converting {onnx_path} to fp16 failed: {type(exc).__name__}: {exc}") from exc
    return _save(fp16, Path(output_path))


class _BatchReader:
    """An onnxruntime CalibrationDataReader over a list of input dicts."""

    def __init__(self, batches, input_types):
        self._batches = [{k: np.asarray(v).astype(input_types.get(k, np.asarray(v).dtype), copy=False)
                          for k, v in b.items()} for b in batches]
        self._it = iter(self._batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._batches)


def _onnx_input_types(model) -> dict[str, type]:
    import onnx

    out = {}
    for inp in model.graph.input:
        try:
            out[inp.name] = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
        except Exception:  # noqa: S112 - unknown element types keep the data's own dtype
            continue
    return out


_PASS_THROUGH = ("Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze")


def activation_matmuls(model, op_types: Sequence[str] = QDQ_OP_TYPES) -> list[str]:
    """Names of MatMul/Gemm nodes with no constant operand (attention's Q.K^T and P.V products).

    A constant operand is an initializer or a Constant node, possibly behind Identity/Cast/Transpose/
    Reshape/Squeeze/Unsqueeze.

    Example:
        >>> activation_matmuls(onnx.load("bert.onnx"))  # doctest: +SKIP
        ['StatefulPartitionedCall/.../einsum/MatMul', ...]
    """
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def constant(name: str, depth: int = 0) -> bool:
        if name in inits:
            return True
        node = producers.get(name)
        if node is None or depth > 8:
            return False
        if node.op_type == "Constant":
            return True
        return node.op_type in _PASS_THROUGH and bool(node.input) and constant(node.input[0], depth + 1)

    return [n.name for n in model.graph.node
            if n.op_type in op_types and not any(constant(i) for i in n.input if i)]


def quantize_onnx_qdq_int8(onnx_path: str | os.PathLike, output_path: str | os.PathLike,
                           calibration_batches: Sequence[dict[str, np.ndarray]], *, per_channel: bool = True,
                           op_types: Sequence[str] = QDQ_OP_TYPES, quantize_activation_matmuls: bool = False) -> str:
    """Insert int8 QuantizeLinear/DequantizeLinear pairs with calibrated, symmetric scales.

    Weights get int8 initializers (per output channel with ``per_channel``); activations get
    per-tensor scales from min/max calibration over ``calibration_batches``. TensorRT builds this
    graph in explicit-quantization mode (int8 kernels where the Q/DQ nodes say so); onnxruntime runs
    it on the CPU.

    Only the layers with weights are quantized by default: attention's activation-by-activation
    products (Q.K^T, P.V) stay in float. On MiniLM fine-tuned on BBC News (200 held-out articles),
    quantizing them too cost one more point of accuracy (0.92 -> 0.91, fp32 0.93).

    Args:
        onnx_path: the float32 model.
        output_path: where to write the quantized model.
        calibration_batches: representative input dicts (see
            :func:`tfaccel.tensorrt.calibration.representative_batches`).
        per_channel: one weight scale per output channel.
        op_types: ONNX op types to quantize.
        quantize_activation_matmuls: also quantize MatMuls whose operands are both activations.

    Returns:
        The path written.

    Example:
        >>> quantize_onnx_qdq_int8("model.onnx", "model.int8.onnx", batches)  # doctest: +SKIP
        'model.int8.onnx'
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration_batches:
        raise StepError("int8 quantization needs at least one calibration batch; none were given.")
    output_path = Path(output_path)
    graph_only = onnx.load(str(onnx_path), load_external_data=False)
    reader = _BatchReader(calibration_batches, _onnx_input_types(graph_only))
    exclude = [] if quantize_activation_matmuls else activation_matmuls(graph_only, op_types)
    try:
        with atomic_file(output_path) as tmp:
            quantize_static(
                str(onnx_path), str(tmp), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(op_types),
                nodes_to_exclude=exclude,
                per_channel=per_channel, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                # TensorRT takes symmetric int8 only (zero point 0). DefaultTensorType: tf2onnx graphs leave some
                # tensor types unknown to onnxruntime's quantizer (shared FACTS.md).
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                               "DefaultTensorType": onnx.TensorProto.FLOAT},
            )
    except StepError:
        raise
    except Exception as exc:
        raise StepError(f"int8 Q/DQ quantization of {onnx_path} failed: {type(exc).__name__}: {exc}") from exc
    return str(output_path)


def qdq_check_runner(path: str | os.PathLike):
    """An onnxruntime runner for checking a Q/DQ int8 graph on this CPU's terms.

    TensorRT computes a Q/DQ graph's products exactly (int8 x int8 -> int32). onnxruntime fuses the graph
    into u8s8 kernels, which sum exactly with VNNI/AMX but saturate without it (bert-tiny cosine 0.905 on
    AVX2 fused, 0.9999 unfused; QEMU EPYC-Milan). So the check runs fused where that is exact and unfused
    elsewhere (:meth:`tfaccel.compat.Capabilities.ort_qdq_fused`); ``runner.qdq_fused`` says which.
    """
    from tfaccel.compat import capabilities
    from tfaccel.onnx.onnx_runner import OnnxRunner

    fused, why = capabilities().ort_qdq_fused()
    runner = OnnxRunner(str(path), fuse_qdq=fused)
    runner.qdq_fused, runner.qdq_reason = fused, why
    return runner
