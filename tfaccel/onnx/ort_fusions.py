"""Transformer graph fusions for onnxruntime on tf2onnx's graphs.

What was tried on minilm-bbc's tf2onnx graph (opset 17; issue 20):

- onnxscript 0.7.2's ``optimize_for_ort`` rewriter: no fusion matched (its patterns follow the torch
  exporter's graphs), but its optimizer folds tf2onnx's shape arithmetic (724 -> 633 nodes: Shape 49 -> 25,
  Gather 62 -> 32, Concat 50 -> 32).
- onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer.optimize_model``) with
  ``model_type`` bert_keras, bert_tf or bert: only the gelu fuses (``FastGelu`` x 6); attention and layer
  norms stay unfused (onnxruntime#10359). Its ``opt_level`` >= 1 imports torch, so only its Python fusions
  (``opt_level=0``) run here; onnxruntime applies its own graph optimizations when the session loads.

Both are kept (:func:`fuse_for_onnxruntime`): dynamic int8 of the result ran 1.2-1.4x faster than of the
plain graph at 1x128 and 32x128 (minilm-bbc, interleaved, load 10), the same accuracy. Not fused by either:
tf2onnx's layer norms (GlobalAveragePool-based, 13 of them) and attention.

Attention is fused by tfaccel's own rewrite (:mod:`tfaccel.onnx.attention_fusion`: Keras' attention ->
``MultiHeadAttention``): on minilm-bbc's graph (6 of 6 layers, Ice Lake, 2 threads, interleaved) float32 ran
1.14x faster at 32x128 and level at 1x128; its dynamic int8 1.17x / 1.13x, outputs within 1e-6 of the unfused
graph. A rewritten graph that differs from its input on padded inputs is not kept.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from tfaccel.core.files import atomic_file
from tfaccel.onnx.attention_fusion import fuse_keras_attention


def fuse_for_onnxruntime(onnx_path: str | os.PathLike, output_path: str | os.PathLike | None = None) -> dict:
    """onnxscript's ``optimize_for_ort`` (its optimizer folds tf2onnx's shape arithmetic), then onnxruntime's
    transformer fusions (Python fusions only: ``opt_level=0``, no torch), on an ONNX file.

    The result holds onnxruntime's own operators (``com.microsoft``: :func:`contrib_operators`), which other
    runtimes' parsers (TensorRT's) do not read: the ``onnx`` step leaves them out where ``tensorrt`` follows.

    Args:
        onnx_path: the ONNX file (from tf2onnx).
        output_path: where to write the result (default: replace ``onnx_path``).

    Returns:
        What changed: the fused operators and their counts (e.g. ``{"FastGelu": 6}``), ``nodes_removed``, and
        ``skipped`` (library -> the error) for a library whose fusions raised on this graph (the graph it was
        given is kept).

    Example:
        >>> fuse_for_onnxruntime("model.onnx")  # doctest: +SKIP
        {'FastGelu': 6, 'nodes_removed': 115}
    """
    import logging

    import onnx
    import onnx_ir as ir
    from onnxruntime.transformers import optimizer
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)  # "Model producer not matched"
    fused: dict = {}
    skipped: dict[str, str] = {}
    # Each library's fusions are pattern matchers written for other exporters' graphs; on a graph they were
    # not written for they can raise (onnxruntime 1.2x's simplified-layer-norm fusion indexes a NodeProto on
    # Gemma3's tf2onnx graph). A fusion that raises is skipped and named; the graph it was given is kept.
    proto = onnx.load(str(onnx_path))  # read once: the node count, onnxscript's input and the fallback
    before = len(proto.graph.node)
    try:
        model, counts = optimize_for_ort(ir.from_proto(proto))
        result = ir.to_proto(model)
        # onnxscript 0.7's optimizer can write opset-18 attributes into an opset-17 graph (Split num_outputs,
        # seen on Gemma3's graph): a result onnxruntime cannot load is not kept.
        _check_loads(result)
        fused.update({k: int(v) for k, v in counts.items() if v})
        proto = result
    except Exception as exc:  # noqa: BLE001 - any failure of an optional rewrite keeps the input graph
        skipped["onnxscript"] = f"{type(exc).__name__}: {exc}"
    ort_model = None
    try:
        # optimize_model edits the proto it is given in place: give it a copy, so a failure keeps the input.
        # Its fusion modules log under their own names ("fusion_skiplayernorm: symbolic shape inference disabled
        # or failed" on ALBERT), warnings about a fusion that does not apply: not shown to the user.
        logging.disable(logging.WARNING)
        try:
            ort_model = optimizer.optimize_model(copy.deepcopy(proto), model_type="bert", num_heads=0, hidden_size=0,
                                                 opt_level=0)
        finally:
            logging.disable(logging.NOTSET)
        _check_loads(ort_model.model)
        fused.update({k: int(v) for k, v in ort_model.get_fused_operator_statistics().items() if v})
        proto = ort_model.model
    except Exception as exc:  # noqa: BLE001 - as above
        skipped["onnxruntime"] = f"{type(exc).__name__}: {exc}"
    try:
        proto, attentions = fuse_keras_attention(proto)
        if attentions:
            fused["MultiHeadAttention"] = attentions
            if ort_model is not None:
                ort_model.model = proto
    except Exception as exc:  # noqa: BLE001 - as above
        skipped["attention"] = f"{type(exc).__name__}: {exc}"
    fused["nodes_removed"] = before - len(proto.graph.node)
    if skipped:
        fused["skipped"] = skipped
    with atomic_file(Path(output_path or onnx_path)) as tmp:
        if ort_model is not None:
            ort_model.save_model_to_file(str(tmp))
        else:
            onnx.save(proto, str(tmp))
    return fused


def _check_loads(proto) -> None:
    """Raise if onnxruntime's CPU provider cannot load ``proto`` (graph optimizations off: only the graph's
    validity is checked). Not ``onnx.checker``: it rejects the com.microsoft contrib operators
    (FastGelu, ...) the fusions write without that domain's opset import, which onnxruntime accepts."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def contrib_operators(onnx_path: str | os.PathLike) -> dict[str, int]:
    """onnxruntime's own operators in an ONNX file (its ``com.microsoft`` domains: what :func:`fuse_for_onnxruntime`
    writes, e.g. ``FastGelu``), as ``"domain.Op" -> count``; empty for a graph another runtime can read. Other
    custom domains are not counted: TensorRT imports those through plugins a user registers. Reads the graph only
    (no external weights), including subgraphs (If / Loop bodies).

    Example:
        >>> contrib_operators("model.onnx")  # doctest: +SKIP
        {'com.microsoft.FastGelu': 6}
    """
    import onnx

    counts: dict[str, int] = {}

    def walk(graph) -> None:
        for node in graph.node:
            if node.domain == "com.microsoft" or node.domain.startswith("com.microsoft."):
                key = f"{node.domain}.{node.op_type}"
                counts[key] = counts.get(key, 0) + 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    walk(sub)

    walk(onnx.load(str(onnx_path), load_external_data=False).graph)
    return counts
