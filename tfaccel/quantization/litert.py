"""Step ``litert-dynamic``: a SavedModel -> LiteRT (TFLite) flatbuffer with dynamic-range quantization
(int8 weights; activations quantized on the fly by LiteRT's hybrid/XNNPACK kernels), checked in the
LiteRT interpreter (``ai-edge-litert``). A side artifact of the run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from tfaccel.artifacts import Artifact, atomic_file
from tfaccel.errors import StepError
from tfaccel.pipeline import Step, StepContext
from tfaccel.validation import Tolerance

TFLITE_KIND = "tflite"


class LiteRTRunner:
    """Runs a .tflite model's signature in the LiteRT interpreter: dict of named arrays in and out.

    Args:
        path: the .tflite file.
        signature: the signature to run (a SavedModel's ``serving_default`` keeps its name).
        num_threads: interpreter threads (default: all cores, like the other runners).
    """

    def __init__(self, path: str | os.PathLike, signature: str = "serving_default", num_threads: int | None = None):
        from tfaccel.compat import require

        require("ai_edge_litert", pip_name="ai-edge-litert", purpose="running LiteRT (.tflite) artifacts")
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads or os.cpu_count() or 1)
        sigs = self.interpreter.get_signature_list()
        if signature not in sigs:
            raise StepError(f"{str(path)!r} has no signature {signature!r}; it has {sorted(sigs)}.")
        self.runner = self.interpreter.get_signature_runner(signature)
        self.dtypes = {k: v["dtype"] for k, v in self.runner.get_input_details().items()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(np.asarray(v).astype(self.dtypes[k], copy=False)) for k, v in inputs.items()}
        out = self.runner(**feed)
        return {k: np.array(v) for k, v in out.items()}


def _converter_ops(message: str) -> list[str]:
    """TensorFlow ops (and tensor types) the converter's diagnostics say it cannot handle."""
    ops = set(re.findall(r"'(?:tf|tfl)\.([A-Za-z0-9_]+)' op is neither a custom op nor a flex op", message))
    ops.update(re.findall(r"tf\.([A-Za-z0-9_]+)\s*\{", message))
    ops.update(f"type {t}" for t in re.findall(r"Failed to convert element type '!tf_type\.([a-z0-9]+)'", message))
    return sorted(ops)


def convert_dynamic_range(saved_model_dir: str | os.PathLike, output_path: str | os.PathLike, *,
                          signature: str = "serving_default") -> str:
    """Convert a SavedModel signature to a dynamic-range quantized LiteRT model.

    ``tf.lite.TFLiteConverter.from_saved_model`` with ``optimizations=[tf.lite.Optimize.DEFAULT]``
    and no representative dataset: weights of large constant tensors become int8 (per channel),
    activations stay float and are quantized at run time by the hybrid kernels.

    Returns:
        The path written.

    Raises:
        StepError: the converter failed; TensorFlow ops it has no LiteRT kernel for are named.

    Example:
        >>> convert_dynamic_range("out/saved_model", "model.tflite")  # doctest: +SKIP
        'model.tflite'
    """
    import tensorflow as tf

    conv = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[signature])
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        blob = conv.convert()
    except Exception as exc:  # ConverterError and friends carry the MLIR diagnostics
        text = str(exc)
        ops = _converter_ops(text)
        hint = (f" LiteRT cannot represent: {', '.join(ops)}." if ops else "")
        if any(o.startswith("Quantized") or o in ("type qint8", "type quint8") for o in ops):
            hint += (" The SavedModel is already quantized (the int8 step's oneDNN form): run litert-dynamic on "
                     "the float export, i.e. put it before 'int8' or after a plain 'export'.")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        raise StepError(
            f"The LiteRT converter (TensorFlow {tf.__version__}) cannot convert {saved_model_dir}.{hint} "
            f"Converter said: {' / '.join(lines[:3])[:600]}"
        ) from exc
    with atomic_file(output_path) as tmp:
        tmp.write_bytes(blob)
    return str(output_path)


class LiteRTDynamicStep(Step):
    """SavedModel -> dynamic-range quantized LiteRT model, checked in the LiteRT interpreter.
    A side artifact of the run.

    Example:
        >>> Pipeline(["export", "litert-dynamic"]).run(load_source("minilm-bbc"), "out")  # doctest: +SKIP
    """

    name = "litert-dynamic"
    consumes = "saved_model"
    produces = TFLITE_KIND
    side_artifact = True
    # int8 weights with activations quantized per call: like onnxruntime's dynamic int8.
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.01)

    def params(self):
        return {"optimizations": ["DEFAULT"], "representative_dataset": None, "weights": "int8 (per channel)",
                "activations": "float, quantized at run time"}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.compat import require

        require("ai_edge_litert", pip_name="ai-edge-litert", purpose="checking LiteRT models (litert-dynamic step)")
        ctx.log("  TFLiteConverter.from_saved_model + Optimize.DEFAULT (dynamic range)")
        path = convert_dynamic_range(artifact.path, ctx.stage_dir / "model.tflite")
        ctx.note(f"LiteRT model {Path(path).stat().st_size / 1e6:.1f} MB; runs in ai_edge_litert's Interpreter "
                 "(XNNPACK on CPU)")
        return Artifact(kind=TFLITE_KIND, path=path, input_names=artifact.input_names)
