"""Step ``litert-dynamic``: a SavedModel -> LiteRT (TFLite) flatbuffer with dynamic-range quantization
(int8 weights; activations quantized on the fly by LiteRT's hybrid/XNNPACK kernels), checked in the
LiteRT interpreter (``ai-edge-litert``). A side artifact of the run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from tfaccel.core.artifact import Artifact, register_kind
from tfaccel.core.files import atomic_file
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import StepError

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

        # Threads set explicitly: the interpreter's default is one thread, which at batch 32 ran minilm-bbc at
        # 0.41x the two-thread speed on a 2-core Zen 4 (issue 20).
        self.num_threads = num_threads or os.cpu_count() or 1
        self.interpreter = Interpreter(model_path=str(path), num_threads=self.num_threads)
        sigs = self.interpreter.get_signature_list()
        if signature not in sigs:
            raise StepError(f"{str(path)!r} has no signature {signature!r}; it has {sorted(sigs)}.")
        self.runner = self.interpreter.get_signature_runner(signature)
        self.dtypes = {k: v["dtype"] for k, v in self.runner.get_input_details().items()}

    def stats(self) -> dict:
        """How the interpreter runs (stated in reports): its thread count."""
        return {"threads": self.num_threads, "runtime": "ai_edge_litert Interpreter (XNNPACK delegate on CPU)"}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(np.asarray(v).astype(self.dtypes[k], copy=False)) for k, v in inputs.items()}
        out = self.runner(**feed)
        return {k: np.array(v) for k, v in out.items()}


#: TensorFlow ops LiteRT has builtin kernels for in int32 but not in int64. keras-hub DeBERTa-v3 computes
#: its relative-position buckets with ``Abs`` and ``Sign`` on int64 positions (``ops.cast(ids, "int")``),
#: which the converter rejects ("'tf.Abs' op is neither a custom op nor a flex op"). Positions fit int32,
#: so these ops are rewritten to run in int32 (Cast in, op, Cast back) and the conversion is retried.
INT64_REWRITE_OPS = ("Abs", "Sign")


def _converter_ops(message: str) -> list[str]:
    """TensorFlow ops (and tensor types) the converter's diagnostics say it cannot handle."""
    ops = set(re.findall(r"'(?:tf|tfl)\.([A-Za-z0-9_]+)' op is neither a custom op nor a flex op", message))
    ops.update(re.findall(r"tf\.([A-Za-z0-9_]+)\s*\{", message))
    ops.update(f"type {t}" for t in re.findall(r"Failed to convert element type '!tf_type\.([a-z0-9]+)'", message))
    return sorted(ops)


def _rejected_signatures(message: str) -> list[str]:
    """The converter's ``Details:`` lines, e.g. ``Abs(tensor<?x?xi64>)``: which op on which tensor type."""
    return sorted(set(re.findall(r"tf\.([A-Za-z0-9_]+\(tensor<[^>]*>[^)]*\))", message)))


def _only_int64_rewritable(message: str) -> bool:
    details = _rejected_signatures(message)
    ops = [o for o in _converter_ops(message) if not o.startswith("type ")]
    return bool(details) and set(ops) <= set(INT64_REWRITE_OPS) and all(
        d.split("(")[0] in INT64_REWRITE_OPS and "xi64>" in d for d in details)


def _int32_rewritten_function(saved_model_dir: str, signature: str):
    """The SavedModel signature as a frozen concrete function (same input/output names) whose int64
    :data:`INT64_REWRITE_OPS` run in int32, and how many ops were rewritten."""
    import tensorflow as tf
    from tensorflow.core.framework import node_def_pb2, types_pb2
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    loaded = tf.saved_model.load(saved_model_dir)  # keep it alive: the signature refers to its variables
    fn = loaded.signatures[signature]
    frozen = convert_variables_to_constants_v2(fn)
    graph_def = frozen.graph.as_graph_def()

    def cast(name, source, src, dst):
        node = node_def_pb2.NodeDef(name=name, op="Cast", input=[source])
        node.attr["SrcT"].type, node.attr["DstT"].type = src, dst
        node.attr["Truncate"].b = False
        return node

    nodes, rewritten = [], 0
    for node in graph_def.node:
        if node.op in INT64_REWRITE_OPS and node.attr["T"].type == types_pb2.DT_INT64:
            inner = node_def_pb2.NodeDef()
            inner.CopyFrom(node)
            inner.name = f"{node.name}/int32"
            del inner.input[:]
            inner.input.append(f"{node.name}/to_int32")
            inner.attr["T"].type = types_pb2.DT_INT32
            nodes += [cast(f"{node.name}/to_int32", node.input[0], types_pb2.DT_INT64, types_pb2.DT_INT32), inner,
                      cast(node.name, inner.name, types_pb2.DT_INT32, types_pb2.DT_INT64)]
            rewritten += 1
        else:
            nodes.append(node)
    del graph_def.node[:]
    graph_def.node.extend(nodes)

    wrapped = tf.compat.v1.wrap_function(lambda: tf.graph_util.import_graph_def(graph_def, name=""), [])
    pruned = wrapped.prune(feeds=[wrapped.graph.get_tensor_by_name(t.name) for t in frozen.inputs],
                           fetches=[wrapped.graph.get_tensor_by_name(t.name) for t in frozen.outputs])
    specs = fn.structured_input_signature[1]
    order = [t.name.split(":")[0] for t in frozen.inputs]

    def serve(**inputs):
        outs = pruned(*[inputs[k] for k in order])
        return tf.nest.pack_sequence_as(fn.structured_outputs, tf.nest.flatten(outs))

    return tf.function(serve).get_concrete_function(**{k: specs[k] for k in order}), rewritten


def _convert(converter) -> bytes:
    import tensorflow as tf

    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


def _conversion_error(saved_model_dir, text: str) -> StepError:
    import tensorflow as tf

    ops = _converter_ops(text)
    details = _rejected_signatures(text)
    hint = (f" LiteRT has no kernel for: {', '.join(ops)}" if ops else "")
    hint += f" ({', '.join(details)})." if details else ("." if ops else "")
    if any(o.startswith("Quantized") or o in ("type qint8", "type quint8") for o in ops):
        hint += (" The SavedModel is already quantized (the int8 step's oneDNN form): run litert-dynamic on "
                 "the float export, i.e. put it before 'int8' or after a plain 'export'.")
    elif ops:
        hint += (" These ops would need TensorFlow's Flex delegate (SELECT_TF_OPS), which ai-edge-litert's "
                 "interpreter does not have; keep them out of the exported signature or use the onnx route.")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return StepError(
        f"The LiteRT converter (TensorFlow {tf.__version__}) cannot convert {saved_model_dir}.{hint} "
        f"Converter said: {' / '.join(lines[:2])[:300]}"
    )


def convert_dynamic_range(saved_model_dir: str | os.PathLike, output_path: str | os.PathLike, *,
                          signature: str = "serving_default", notes: list[str] | None = None) -> str:
    """Convert a SavedModel signature to a dynamic-range quantized LiteRT model.

    ``tf.lite.TFLiteConverter.from_saved_model`` with ``optimizations=[tf.lite.Optimize.DEFAULT]``
    and no representative dataset: weights of large constant tensors become int8 (per channel),
    activations stay float and are quantized at run time by the hybrid kernels. If the converter
    rejects only int64 ``Abs``/``Sign`` (keras-hub DeBERTa-v3's relative positions), the frozen graph
    is converted again with those ops in int32 (:data:`INT64_REWRITE_OPS`).

    Args:
        saved_model_dir: the SavedModel folder.
        output_path: the .tflite file to write.
        signature: the signature to convert.
        notes: if given, a line saying what was rewritten is appended to it.

    Returns:
        The path written.

    Raises:
        StepError: the converter failed; TensorFlow ops it has no LiteRT kernel for are named.

    Example:
        >>> convert_dynamic_range("out/saved_model", "model.tflite")  # doctest: +SKIP
        'model.tflite'
    """
    import tensorflow as tf

    try:
        blob = _convert(tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[signature]))
    except Exception as exc:  # ConverterError and friends carry the MLIR diagnostics
        text = str(exc)
        if not _only_int64_rewritable(text):
            raise _conversion_error(saved_model_dir, text) from exc
        function, rewritten = _int32_rewritten_function(str(saved_model_dir), signature)
        try:
            # A trackable object selects the converter path that keeps the signature (name and I/O names).
            blob = _convert(tf.lite.TFLiteConverter.from_concrete_functions([function], tf.Module()))
        except Exception as exc2:
            raise _conversion_error(saved_model_dir, str(exc2)) from exc2
        if notes is not None:
            notes.append(f"LiteRT has no int64 kernels for {', '.join(_rejected_signatures(text))}: {rewritten} "
                         "such op(s) run in int32 instead (values are positions, far inside int32)")
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

    def unavailable(self, caps) -> str:
        from tfaccel.compat import package_version

        return "" if package_version("ai-edge-litert") else "ai-edge-litert is not installed (pip install ai-edge-litert)"

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        from tfaccel.compat import require

        require("ai_edge_litert", pip_name="ai-edge-litert", purpose="checking LiteRT models (litert-dynamic step)")
        ctx.log("  TFLiteConverter.from_saved_model + Optimize.DEFAULT (dynamic range)")
        notes: list[str] = []
        path = convert_dynamic_range(artifact.path, ctx.stage_dir / "model.tflite", notes=notes)
        for note in notes:
            ctx.note(note)
        ctx.note(f"LiteRT model {Path(path).stat().st_size / 1e6:.1f} MB; runs in ai_edge_litert's Interpreter "
                 "(XNNPACK on CPU)")
        return Artifact(kind=TFLITE_KIND, path=path, input_names=artifact.input_names)


register_kind(TFLITE_KIND, "LiteRT model", lambda a: LiteRTRunner(a.path))
