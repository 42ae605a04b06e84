"""OpenVINO IR artifacts: converting a SavedModel with ``openvino.convert_model``, what tfaccel records beside
the IR, and the runner that compiles it for the CPU plugin with explicit settings.

An IR artifact is a folder::

    openvino/
      model.xml, model.bin       the IR (``openvino.save_model``; weights fp16 by default, as OpenVINO saves them)
      tfaccel_openvino.json      the inference precision, performance hint and threads it was validated with
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel.core.artifact import register_kind
from tfaccel.errors import PlanError, StepError

OPENVINO_KIND = "openvino"
IR_XML = "model.xml"
META_FILE = "tfaccel_openvino.json"
#: OpenVINO's CPU performance hints tfaccel exposes ("auto": latency for small batches, throughput for large).
HINTS = ("auto", "latency", "throughput")
#: The extra that installs OpenVINO and NNCF.
EXTRA = "openvino"


def require_openvino(purpose: str):
    """``import openvino``, or MissingDependencyError naming the ``openvino`` extra."""
    from tfaccel.compat import require

    return require("openvino", extra=EXTRA, purpose=purpose)


def ir_xml(path: str | os.PathLike) -> Path:
    """The ``.xml`` of an IR given its folder or the ``.xml`` itself.

    Raises:
        StepError: neither exists.
    """
    p = Path(path)
    xml = p / IR_XML if p.is_dir() else p
    if xml.suffix != ".xml" or not xml.exists() or not xml.with_suffix(".bin").exists():
        raise StepError(f"{str(path)!r} is not an OpenVINO IR (a folder with {IR_XML} and model.bin, or an .xml with "
                        "its .bin beside it).")
    return xml


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """What tfaccel recorded beside the IR (empty for an IR tfaccel did not write)."""
    meta = ir_xml(path).parent / META_FILE
    return json.loads(meta.read_text()) if meta.exists() else {}


def is_ir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an OpenVINO IR folder or ``.xml``."""
    try:
        ir_xml(path)
        return True
    except StepError:
        return False


# Ops tfaccel's own quantized SavedModels contain that OpenVINO's TensorFlow frontend has no rule for (the
# int8 step's oneDNN form), and int8 variables (its XLA and Keras forms: they convert, but the converted graph
# drifted 80x further from the reference than the SavedModel itself on bert-tiny).
_QUANTIZED_OPS = ("QuantizedMatMulWithBiasAndDequantize", "QuantizedMatMul", "Dequantize", "QuantizeV2")


def quantized_saved_model_reason(saved_model_dir: str | os.PathLike) -> str | None:
    """Why OpenVINO should not convert this SavedModel (it holds quantized weights or ops), or None.

    Reads ``saved_model.pb`` and the variables' dtypes from the object graph; nothing is loaded or run.

    Example:
        >>> quantized_saved_model_reason("out/stages/01-int8")  # doctest: +SKIP
        'it holds int8 weights (14 int8 variables)'
    """
    from tensorflow.core.protobuf import saved_model_pb2

    pb = Path(saved_model_dir) / "saved_model.pb"
    if not pb.exists():
        return None
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString(pb.read_bytes())
    ops: set[str] = set()
    n_int8 = 0
    for mg in sm.meta_graphs:
        ops.update(n.op for n in mg.graph_def.node)
        for fn in mg.graph_def.library.function:
            ops.update(n.op for n in fn.node_def)
        for obj in mg.object_graph_def.nodes:
            if obj.WhichOneof("kind") == "variable" and obj.variable.dtype in (6, 11):  # DT_INT8, DT_QINT8
                n_int8 += 1
    bad = sorted(ops & set(_QUANTIZED_OPS))
    if bad:
        return f"it holds quantized TensorFlow ops OpenVINO's frontend cannot convert ({', '.join(bad)})"
    if n_int8:
        return f"it holds int8 weights ({n_int8} int8 variables: a tfaccel int8/int4 SavedModel)"
    return None


QUANTIZED_INPUT_HINT = ("convert the float SavedModel instead (the export, or a pruned model's export) and "
                        "quantize in OpenVINO with 'ov-int8'")


def convert_saved_model(saved_model_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                        compress_to_fp16: bool = True, meta: dict[str, Any] | None = None, log=None) -> Path:
    """Convert a SavedModel's serving signature to an OpenVINO IR folder.

    ``openvino.convert_model`` reads the SavedModel directly (input and output names are the signature's);
    ``openvino.save_model`` writes the IR, its weights fp16 unless ``compress_to_fp16=False`` (the CPU
    plugin computes in f32 or bf16 either way). The folder appears only when everything was written.

    Args:
        saved_model_dir: the SavedModel folder.
        out_dir: the IR folder to create.
        compress_to_fp16: store weights in fp16 (half the size, OpenVINO's default).
        meta: what to record in ``tfaccel_openvino.json``.
        log: progress callable.

    Returns:
        The IR folder.

    Raises:
        MissingDependencyError: the ``openvino`` extra is not installed.
        StepError: OpenVINO's frontend could not convert it (the ops it lacks are named).

    Example:
        >>> convert_saved_model("out/saved_model", "out/openvino")  # doctest: +SKIP
        PosixPath('out/openvino')
    """
    ov = require_openvino("the openvino step")
    out_dir = Path(out_dir)
    if log:
        log(f"  openvino.convert_model({saved_model_dir})")
    try:
        model = ov.convert_model(str(saved_model_dir))
    except Exception as exc:
        raise StepError(_conversion_message(saved_model_dir, exc)) from exc
    return save_ir(model, out_dir, compress_to_fp16=compress_to_fp16, meta=meta)


def _conversion_message(saved_model_dir, exc: BaseException) -> str:
    import re

    text = str(exc)
    ops = re.findall(r"No conversion rule found for operations: ([^\n]*)", text)
    if ops:
        return (f"OpenVINO's TensorFlow frontend cannot convert {saved_model_dir}: no conversion rule for "
                f"{ops[0].strip()}. " + ("The SavedModel is quantized: " + QUANTIZED_INPUT_HINT + "."
                                         if "Quantized" in ops[0] else "Keep those ops out of the serving signature."))
    first = next((ln for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"openvino.convert_model failed on {saved_model_dir}: {first[:400]}"


def save_ir(model, out_dir: str | os.PathLike, *, compress_to_fp16: bool = True,
            meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (an ``openvino.Model``) and tfaccel's record as an IR folder, all or nothing."""
    import shutil

    import openvino as ov

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        ov.save_model(model, str(tmp / IR_XML), compress_to_fp16=compress_to_fp16)
        record = {"format": "openvino-ir", "xml": IR_XML, "openvino": ov.__version__,
                  "weights": "fp16" if compress_to_fp16 else "fp32", **(meta or {})}
        (tmp / META_FILE).write_text(json.dumps(record, indent=2, default=str))
        if out_dir.exists():
            raise StepError(f"{str(out_dir)!r} already exists; tfaccel does not overwrite it.")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def compile_config(precision: str, hint: str = "latency", threads: int | None = None) -> dict[str, str]:
    """The CPU plugin properties tfaccel compiles an IR with: every choice explicit.

    Args:
        precision: "f32" or "bf16" (``INFERENCE_PRECISION_HINT``).
        hint: "latency" or "throughput" (``PERFORMANCE_HINT``).
        threads: ``INFERENCE_NUM_THREADS`` (None: all cores).

    Example:
        >>> compile_config("f32", "latency", 2)["INFERENCE_NUM_THREADS"]
        '2'
    """
    if precision not in ("f32", "bf16"):
        raise PlanError(f"OpenVINO inference precision must be f32 or bf16. Received: {precision!r}")
    if hint not in ("latency", "throughput"):
        raise PlanError(f"A compiled model's performance hint is latency or throughput. Received: {hint!r}")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise PlanError(f"threads must be a positive int or None (all cores). Received: threads={threads!r}")
    return {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint.upper(),
            "INFERENCE_NUM_THREADS": str(threads or os.cpu_count() or 1)}


class OpenVINORunner:
    """Runs an OpenVINO IR on the CPU plugin: dict of named arrays in and out, output names as in the
    SavedModel it came from.

    The precision, hint and threads default to what tfaccel recorded beside the IR (the step's choices),
    else f32 / auto / all cores. Hints:

    - "latency": one infer request using every thread (OpenVINO's own default on CPU).
    - "throughput": the plugin's streams (e.g. 2 streams of 1 thread on 2 cores); a batch is split across as
      many infer requests, run concurrently, as a server does with concurrent requests (a chunk shape the
      requests have not run yet goes to them one at a time first: :meth:`_specialise`).
    - "auto": both compiled once; a batch smaller than the throughput streams runs latency-style, a larger one
      is split (measured on minilm-bbc int8 at 32x128: 1.5x the latency hint's speed, and the latency hint
      1.2x at 1x128).

    Args:
        path: the IR folder or its .xml.
        precision: "f32" or "bf16" (None: as recorded).
        hint: "latency", "throughput" or "auto" (None: as recorded).
        threads: inference threads (None: as recorded, else all cores).

    Example:
        >>> runner = OpenVINORunner("out/stages/02-openvino/openvino")  # doctest: +SKIP
        >>> runner.stats()["inference_precision"]  # doctest: +SKIP
        'bf16'
    """

    def __init__(self, path: str | os.PathLike, *, precision: str | None = None, hint: str | None = None,
                 threads: int | None = None):
        ov = require_openvino("running OpenVINO IR artifacts")
        xml = ir_xml(path)
        meta = read_meta(xml)
        precision = precision or meta.get("inference_precision") or "f32"
        self.hint = hint or meta.get("performance_hint") or "auto"
        threads = threads or meta.get("threads")
        core = ov.Core()
        model = core.read_model(str(xml))
        self._latency = self._throughput = None
        self._specialised: set[tuple] = set()  # chunk shapes every request of the throughput pool has run
        if self.hint in ("latency", "auto"):
            self._latency = core.compile_model(model, "CPU", compile_config(precision, "latency", threads))
            self._request = self._latency.create_infer_request()
        if self.hint in ("throughput", "auto"):
            self._throughput = core.compile_model(model, "CPU", compile_config(precision, "throughput", threads))
            self.requests = int(self._throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
            self._queue = ov.AsyncInferQueue(self._throughput, self.requests)
            self._parts: dict[int, dict[str, np.ndarray]] = {}
            self._queue.set_callback(self._collect)
        else:
            self.requests = 1
        compiled = self._latency or self._throughput
        self.input_types = {p.get_any_name(): _numpy_type(p.get_element_type()) for p in compiled.inputs}
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self._threading = {
            "inference_precision": _type_name(compiled.get_property("INFERENCE_PRECISION_HINT")),
            "performance_hint": self.hint, "threads": int(compiled.get_property("INFERENCE_NUM_THREADS")),
        }
        if self._throughput is not None:
            self._threading.update(streams=int(self._throughput.get_property("NUM_STREAMS")),
                                   infer_requests=self.requests,
                                   threads_per_stream=int(self._throughput.get_property("INFERENCE_NUM_THREADS"))
                                   // max(1, int(self._throughput.get_property("NUM_STREAMS"))))

    def _collect(self, request, index) -> None:
        if index < 0:  # a _specialise run: its outputs are not kept
            return
        self._parts[index] = {n: np.array(request.get_tensor(n).data) for n in self.output_names}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(np.asarray(v).astype(self.input_types.get(k, np.asarray(v).dtype), copy=False))
                for k, v in inputs.items()}
        batch = len(next(iter(feed.values())))
        if self._latency is None or (self._throughput is not None and batch >= self.requests > 1):
            chunks = np.array_split(np.arange(batch), max(1, min(self.requests, batch)))
            parts = [{k: v[idx[0]: idx[-1] + 1] for k, v in feed.items()} for idx in chunks]
            self._specialise(parts)
            self._parts = {}
            for i, part in enumerate(parts):
                self._queue.start_async(part, i)
            self._queue.wait_all()
            return {n: np.concatenate([self._parts[i][n] for i in range(len(chunks))]) for n in self.output_names}
        result = self._request.infer(feed)
        return {o.get_any_name(): np.array(result[o]) for o in self._latency.outputs}

    def _specialise(self, parts: list[dict[str, np.ndarray]]) -> None:
        """Run each new chunk shape on every request of the throughput pool, one request at a time.

        An infer request specialises to an input shape on its first inference there (allocation, shape
        inference, kernel choice); started together, the pool's requests do that concurrently. This path once
        gave wrong rows here (minilm-bbc's ``openvino`` stage scored 0.880 against 0.930 in one suite run while
        its outputs on the sample inputs were exact; not reproduced since, in 25 fresh runners and 30 calls of
        one beside other load), and others saw ``AsyncInferQueue.wait_all`` hang at a new shape
        (ultralytics/ultralytics#25921, #25923): the concurrent first inference is the suspected cause of both.
        So a new shape is first run request by request: the queue hands out idle requests in FIFO order, so
        ``requests`` one-at-a-time runs reach each request once. Later calls at that shape run concurrently.
        """
        for part in parts:
            shape = tuple(sorted((k, v.shape) for k, v in part.items()))
            if shape in self._specialised:
                continue
            for _ in range(self.requests):
                self._queue.start_async(part, -1)
                self._queue.wait_all()
            self._specialised.add(shape)

    def stats(self) -> dict[str, Any]:
        """How the plugin runs: inference precision, performance hint, threads (and streams, requests)."""
        return dict(self._threading)


def _numpy_type(element_type) -> Any:
    name = element_type.get_type_name()
    return {"i32": np.int32, "i64": np.int64, "f32": np.float32, "f16": np.float16, "boolean": np.bool_,
            "u8": np.uint8, "i8": np.int8, "f64": np.float64}.get(name, np.float32)


def _type_name(element_type) -> str:
    """OpenVINO's short name of an element type ("bf16", "f32")."""
    to_string = getattr(element_type, "to_string", None)
    return to_string() if callable(to_string) else str(element_type)


register_kind(OPENVINO_KIND, "OpenVINO IR", lambda a: OpenVINORunner(a.path))
