"""What a stage produces, and how to run it: Keras models, SavedModels, ONNX files, TensorRT engines
and LiteRT (.tflite) models.

Every runner takes a dict of named numpy inputs and returns a dict of named numpy outputs, with the
same output names as the reference model, so any two stages can be compared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("keras", "saved_model", "onnx", "tensorrt", "tflite", "onnx_decoder", "tensorrt_decoder", "openvino")
KIND_NAMES = {"keras": "Keras model", "saved_model": "SavedModel", "onnx": "ONNX model",
              "tensorrt": "TensorRT engine", "tflite": "LiteRT model",
              "onnx_decoder": "ONNX KV-cache decoder", "tensorrt_decoder": "TensorRT KV-cache decoder",
              "openvino": "OpenVINO IR"}


def output_names_of(model) -> list[str] | None:
    names = getattr(model, "output_names", None)
    return list(names) if names else None


def normalize_outputs(out: Any, names: list[str] | None = None) -> dict[str, Any]:
    """Model outputs as a dict: dicts keep their keys; a tensor is named after the model's single
    output (``output_names``) or ``output_0``; a list/tuple gets ``output_<i>``."""
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (list, tuple)):
        if names and len(names) == len(out):
            return dict(zip(names, out, strict=False))
        return {f"output_{i}": o for i, o in enumerate(out)}
    if names and len(names) == 1:
        return {names[0]: out}
    return {"output_0": out}


def serving_signature(input_specs):
    """A dict of named TensorSpecs with a dynamic batch (and, for token inputs, sequence) dimension."""
    import tensorflow as tf

    sig = {}
    for s in input_specs:
        shape = [None] + [None if (s.is_token_input or d is None) else d for d in s.shape[1:]]
        sig[s.name] = tf.TensorSpec(shape, tf.as_dtype(s.dtype), name=s.name)
    return sig


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file through a hidden temporary beside it: yields the temporary's path; on success it
    replaces ``path``, on any error it is removed, so ``path`` never holds a half-written file.

    Example:
        >>> with atomic_file("model.onnx") as tmp:  # doctest: +SKIP
        ...     onnx.save(model, str(tmp))
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dir_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


@dataclasses.dataclass
class Artifact:
    """A stage's product. ``path`` is where it lives on disk (None for an unsaved Keras model)."""

    kind: str
    path: str | None = None
    model: Any = None  # the Keras model, for kind "keras"
    dict_inputs: bool = True
    input_names: list[str] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def size_bytes(self) -> int:
        if self.path and Path(self.path).exists():
            return dir_size(self.path)
        if self.model is not None:  # weights in memory
            return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in self.model.weights))
        return 0

    def runner(self):
        if self.kind == "keras":
            return KerasRunner(self.model, self.dict_inputs)
        if self.kind == "saved_model":
            return SavedModelRunner(self.path)
        if self.kind == "onnx":
            return OnnxRunner(self.path)
        if self.kind == "tensorrt":
            from tfaccel.tensorrt.engine_runner import TrtEngineRunner

            return TrtEngineRunner(self.path)
        if self.kind == "tflite":
            from tfaccel.quantization.litert import LiteRTRunner

            return LiteRTRunner(self.path)
        if self.kind == "openvino":
            from tfaccel.openvino.ir import OpenVINORunner

            return OpenVINORunner(self.path)
        if self.kind in ("onnx_decoder", "tensorrt_decoder"):
            from tfaccel.generation.generators import DecoderLogitsRunner

            return DecoderLogitsRunner(self.path)
        raise ValueError(f"Unknown artifact kind {self.kind!r}; expected one of {KINDS}")


class KerasRunner:
    """Calls a Keras model through one tf.function (graph mode, like a plain export)."""

    def __init__(self, model, dict_inputs: bool = True):
        import tensorflow as tf

        from tfaccel.sources import input_specs_of_keras

        self.model = model
        self.dict_inputs = dict_inputs
        self.names = output_names_of(model)
        specs, _ = input_specs_of_keras(model)
        self._sig = serving_signature(specs)
        self._fn = tf.function(lambda x: model(x if dict_inputs else x[specs[0].name], training=False),
                               input_signature=[self._sig])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        x = {k: tf.constant(inputs[k], dtype=spec.dtype) for k, spec in self._sig.items()}
        out = normalize_outputs(self._fn(x), self.names)
        return {k: np.asarray(v) for k, v in out.items()}


class SavedModelRunner:
    """Runs a SavedModel's serving signature, as a TensorFlow Serving client would."""

    def __init__(self, path: str, signature: str = "serving_default"):
        import tensorflow as tf

        self._tf = tf
        self._loaded = tf.saved_model.load(str(path))
        self.fn = self._loaded.signatures[signature]
        _, kw = self.fn.structured_input_signature
        self.dtypes = {k: v.dtype for k, v in kw.items()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = self._tf
        out = self.fn(**{k: tf.constant(v, dtype=self.dtypes[k]) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}


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
