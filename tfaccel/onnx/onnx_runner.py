"""onnxruntime on the CPU: the session tfaccel runs ONNX files in, and the runner of the ``onnx``
artifact kind (registered here)."""

from __future__ import annotations

import os

import numpy as np

from tfaccel.core.artifact import register_kind


def ort_cpu_session(path: str | os.PathLike, *, fuse_qdq: bool = True, intra_op_threads: int = 0,
                    spinning: bool | None = None, purpose: str = "running ONNX artifacts"):
    """An onnxruntime session on the CPU with every graph optimization: what tfaccel runs ONNX files in.

    Args:
        path: the .onnx file.
        fuse_qdq: False sets ``session.disable_quant_qdq`` (see :class:`OnnxRunner`).
        intra_op_threads: onnxruntime threads (0: all cores).
        spinning: whether idle threads spin between nodes (None: onnxruntime's default, which spins).
        purpose: what onnxruntime is needed for, in the error when it is not installed.
    """
    from tfaccel.compat import require

    ort = require("onnxruntime", purpose=purpose)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(intra_op_threads)
    if not fuse_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if spinning is not None:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """Runs an ONNX file with onnxruntime on the CPU (all cores).

    Args:
        path: the .onnx file.
        fuse_qdq: let onnxruntime fuse QuantizeLinear/DequantizeLinear groups into its int8 kernels
            (default). False runs them as written (float DequantizeLinear -> MatMul): the exact int8
            products, for checking a Q/DQ graph on CPUs whose fused kernels saturate
            (:meth:`tfaccel.compat.Capabilities.ort_qdq_fused`).
    """

    def __init__(self, path: str, fuse_qdq: bool = True):
        self.session = ort_cpu_session(path, fuse_qdq=fuse_qdq)
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._np_types = {i.name: _ort_type_to_numpy(i.type) for i in self.session.get_inputs()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.asarray(v).astype(self._np_types[k], copy=False) for k, v in inputs.items()}
        outs = self.session.run(self.output_names, feed)
        return dict(zip(self.output_names, outs, strict=False))


def _ort_type_to_numpy(t: str):
    return {
        "tensor(int32)": np.int32, "tensor(int64)": np.int64, "tensor(float)": np.float32,
        "tensor(float16)": np.float16, "tensor(bool)": np.bool_, "tensor(double)": np.float64,
    }.get(t, np.float32)


register_kind("onnx", "ONNX model", lambda a: OnnxRunner(a.path))
