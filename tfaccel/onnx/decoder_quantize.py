"""Quantized ONNX decoders: 8-bit weight blocks (MatMulNBits, the int8 default) or onnxruntime dynamic int8
(MatMulInteger, ``method="dynamic"``), and int4 weight-only (MatMulNBits).

Decoding is bound by the weight bytes read per token, so smaller weights are the lever: int8 reads a
quarter of float32's bytes, int4 an eighth (plus a scale per block).

tf2onnx writes keras-hub's attention projections as ``Gemm`` (an ``EinsumDense`` reshaped to 2-D), and
neither onnxruntime's dynamic int8 quantizer (MatMul and Conv only) nor ``MatMulNBitsQuantizer``
(MatMul) takes Gemm. :func:`gemm_to_matmul` first rewrites every Gemm whose weight is a constant into
``MatMul`` (+ ``Add`` for a bias), with the weight folded to a ``[in, out]`` initializer, so every
weight matrix of the decoder is quantized. In a traced graph the token-embedding lookup (a Gather, one row
per token) stays float32; in a native graph with a tied embedding the MatMulNBits quantizers pack that table
once and the lookup becomes ``GatherBlockQuantized`` on it (:func:`matmul_to_nbits`).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from tfaccel.core.files import atomic_file
from tfaccel.onnx.decoder_export import DECODER_FILE, read_layout, write_layout
from tfaccel.onnx.decoder_graph import NBITS_BLOCK_SIZES

_FOLDABLE = {"Identity", "Transpose", "Reshape", "Shape", "Gather", "ReduceProd", "Concat", "Unsqueeze", "Squeeze",
             "Cast", "Slice", "Mul", "Add", "Sub", "Div"}


def _constant(name: str, inits: dict, producers: dict, memo: dict):
    """The value of ``name`` if it is an initializer or computed from initializers by shape/layout ops only
    (tf2onnx leaves ``Reshape(weight, Concat(Shape(weight)...))`` chains in front of some Gemms)."""
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    if name in memo:
        return memo[name]
    value = None
    if name in inits:
        value = numpy_helper.to_array(inits[name])
    elif (node := producers.get(name)) is not None and node.op_type in _FOLDABLE and not node.domain:
        args = [_constant(i, inits, producers, memo) if i else None for i in node.input]
        if all(a is not None for a, i in zip(args, node.input, strict=True) if i):
            feeds = {i: a for i, a in zip(node.input, args, strict=True) if i}
            outs = ReferenceEvaluator(node).run(None, feeds)
            value = outs[list(node.output).index(name)]
    memo[name] = value
    return value


def gemm_to_matmul(model, untie: bool = False):
    """Rewrite ``Gemm(A, B[, C])`` with a constant ``B`` as ``MatMul(A, B')`` (+ ``Add(C)``), in place.

    Only plain Gemms are rewritten (``transA = 0``; ``alpha``/``beta`` are folded into the weight and
    bias), and a ``B`` other nodes read too (a native graph's tied embedding) only with ``untie``.
    Returns the number of Gemms rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    memo: dict = {}
    new_nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if node.op_type == "Gemm" else {}
        # a weight other nodes read too (the tied embedding of a native graph) stays shared: matmul_to_nbits
        # quantizes such a Gemm in place
        shared = node.op_type == "Gemm" and readers.get(node.input[1], 0) > 1 and not untie
        w = _constant(node.input[1], inits, producers, memo) if node.op_type == "Gemm" and not shared else None
        if w is None or attrs.get("transA", 0) != 0 or w.ndim != 2:
            new_nodes.append(node)
            continue
        if attrs.get("transB", 0):
            w = w.T
        w = np.ascontiguousarray(w * attrs.get("alpha", 1.0), dtype=w.dtype)
        w_name = f"{node.name}_matmul_weight"
        graph.initializer.append(numpy_helper.from_array(w, w_name))
        beta = attrs.get("beta", 1.0)
        has_bias = len(node.input) > 2 and node.input[2] and beta != 0
        mm_out = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        new_nodes.append(helper.make_node("MatMul", [node.input[0], w_name], [mm_out], name=f"{node.name}_MatMul"))
        if has_bias:
            bias = node.input[2]
            if beta != 1.0:
                c = _constant(bias, inits, producers, memo)
                bias = f"{node.name}_bias"
                graph.initializer.append(numpy_helper.from_array(np.asarray(c * beta, dtype=w.dtype), bias))
            new_nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=f"{node.name}_Add"))
        count += 1
    del graph.node[:]
    graph.node.extend(_fold_shapes_of_constants(new_nodes, graph, inits))
    _drop_unused_initializers(model)
    return count


def _fold_shapes_of_constants(nodes, graph, inits):
    """``Shape(initializer)`` -> a constant, so a weight only read for its shape is not kept in float."""
    from onnx import helper, numpy_helper

    out = []
    for node in nodes:
        if node.op_type == "Shape" and node.input[0] in inits and not node.attribute:
            dims = np.array(list(inits[node.input[0]].dims), dtype=np.int64)
            graph.initializer.append(numpy_helper.from_array(dims, f"{node.output[0]}_folded"))
            out.append(helper.make_node("Identity", [f"{node.output[0]}_folded"], list(node.output), name=node.name))
        else:
            out.append(node)
    return out


def _drop_unused_initializers(model) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _prepare(src_folder, dst_folder, untie: bool = False):
    import onnx

    layout, info = read_layout(src_folder)
    model = onnx.load(str(Path(src_folder) / info.get("onnx_file", DECODER_FILE)))
    rewritten = gemm_to_matmul(model, untie=untie)
    dst = Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    return layout, info, model, rewritten, dst


def _carried(src_info: dict) -> dict:
    """Facts of the float decoder a quantized one keeps (output name, file, opset)."""
    return {k: src_info[k] for k in ("output_name", "onnx_file", "opset", "graph") if k in src_info}


def _count(model, op_type: str) -> int:
    return sum(1 for n in model.graph.node if n.op_type == op_type)


INT8_METHODS = ("blockwise", "dynamic")
#: Rows per 8-bit block of the blockwise int8 decoder (see quantize_decoder_int8).
INT8_BLOCK_SIZE = 64


def quantize_decoder_int8(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *,
                          method: str = "blockwise", block_size: int = INT8_BLOCK_SIZE,
                          head_block_size: int | None = None, per_channel: bool | None = True,
                          reduce_range: bool | None = None) -> dict:
    """An ONNX decoder folder -> int8 decoder folder.

    Two methods:

    - ``blockwise`` (default): 8-bit weights with one scale per ``block_size`` input rows in ``MatMulNBits``
      with ``accuracy_level=4``: int8 dot products on activations quantized per block inside the kernel, no
      quantization nodes in the graph (llama.cpp's Q8_0 scheme). The tied embedding of a native graph stays
      one table (``GatherBlockQuantized`` reads the same integers).
    - ``dynamic``: onnxruntime's dynamic int8 (``MatMulInteger``; activations quantized per call with one
      scale, weights per column). Faster from batch ~8 on CPUs with VNNI, less close to the float model.

    Args:
        src_folder: a decoder folder from :func:`tfaccel.onnx.decoder_export.export_decoder`.
        dst_folder: where to write ``decoder.onnx`` + ``decoder.json``.
        method: ``"blockwise"`` or ``"dynamic"``.
        block_size: ``blockwise``: rows per block, a power of two from 16 to 256.
        head_block_size: ``blockwise``: the LM head's block (default ``block_size``).
        per_channel: ``dynamic``: one scale per output column of each weight (default: on; token agreement
            matters more for a decoder than the few scales it costs); None: as ``tfaccel.compat`` says.
        reduce_range: ``dynamic``: 7-bit weights; None: as ``tfaccel.compat`` says for this CPU (on without
            VNNI, where onnxruntime's u8s8 products can saturate their 16-bit sums).

    Returns:
        What was done: the settings, Gemms rewritten, MatMuls quantized.

    Example:
        >>> quantize_decoder_int8("out/stages/01-onnx-decoder", "gpt2-int8")  # doctest: +SKIP
    """
    if method not in INT8_METHODS:
        raise ValueError(f"method must be one of {INT8_METHODS}. Received: method={method!r}")
    if method == "blockwise":
        return _quantize_nbits(src_folder, dst_folder, bits=8, block_size=block_size, symmetric=True,
                               accuracy_level=4, quantization="int8-blockwise", head_block_size=head_block_size)
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if reduce_range is None or per_channel is None:
        from tfaccel.compat import capabilities

        settings = capabilities().ort_int8_settings()
        reduce_range = settings["reduce_range"] if reduce_range is None else reduce_range
        per_channel = settings["per_channel"] if per_channel is None else per_channel
    # MatMulInteger takes a MatMul's [K, N] weight: a tied head becomes its own (transposed) int8 copy
    layout, src_info, model, rewritten, dst = _prepare(src_folder, dst_folder, untie=True)
    matmuls = _count(model, "MatMul")
    staged = dst / ".decoder.prepared.onnx"
    try:
        onnx.save(model, str(staged))
        with atomic_file(dst / DECODER_FILE) as tmp:
            quantize_dynamic(str(staged), str(tmp), weight_type=QuantType.QInt8, per_channel=per_channel,
                             reduce_range=reduce_range, op_types_to_quantize=["MatMul"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    finally:
        staged.unlink(missing_ok=True)
    quantized = _count(onnx.load(str(dst / DECODER_FILE), load_external_data=False), "MatMulInteger")
    info = {"quantization": "ort-dynamic-int8", "method": "dynamic", "per_channel": per_channel,
            "reduce_range": bool(reduce_range), "gemm_rewritten": rewritten, "matmuls": matmuls,
            "matmuls_quantized": quantized}
    write_layout(dst, layout, **_carried(src_info), **info)
    return info


def _pack_nbits(w: np.ndarray, bits: int, block_size: int, symmetric: bool):
    """``w [K, N]`` float32 -> (packed ``[N, k_blocks, blob]``, scales ``[N, k_blocks]``, zero points) in
    MatMulNBits' layout, packed by onnxruntime's own kernel (``quantize_matmul_{4,8}bits``, what
    ``MatMulNBitsQuantizer`` calls; this avoids the quantizer's extra dependency ``onnx_ir``, which
    onnxruntime 1.32 does not install)."""
    from onnxruntime.capi import _pybind_state

    pack = getattr(_pybind_state, f"quantize_matmul_{bits}bits")
    per_byte = 8 // bits
    rows, cols = w.shape
    k_blocks = (rows + block_size - 1) // block_size
    padded = np.pad(w, ((0, k_blocks * block_size - rows), (0, 0))) if k_blocks * block_size != rows else w
    packed = np.zeros((cols, k_blocks, block_size // per_byte), dtype=np.uint8)
    zero_points = np.zeros((cols, (k_blocks + per_byte - 1) // per_byte), dtype=np.uint8)
    scales = np.zeros((cols, k_blocks), dtype=np.float32)
    pack(packed, np.ascontiguousarray(padded, dtype=np.float32), scales, zero_points, block_size, cols, rows,
         symmetric)
    return packed, scales, zero_points


def matmul_to_nbits(model, *, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                    accuracy_level: int = 4, head_bits: int | None = None, head_block_size: int | None = None) -> int:
    """Replace every weight product by ``com.microsoft.MatMulNBits`` (4 or 8 bits, block-wise scales), in place.

    Quantized: ``MatMul`` with a 2-D float initializer, and ``Gemm(x, table, transB=1)`` without bias (the tied LM
    head of a native graph: the ``[vocab, hidden]`` table already is MatMulNBits' ``[N, K]`` layout). A
    ``Gather`` reading that same table becomes ``GatherBlockQuantized`` on the same packed integers, so the
    table is stored once.

    ``head_bits`` / ``head_block_size`` quantize the LM head (the tied table, or the product writing ``logits``)
    differently from the rest (8-bit beside a 4-bit body: the table is also every token's input embedding).
    Returns the number of products replaced.
    """
    from onnx import helper, numpy_helper

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8. Received: bits={bits!r}")
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    packed_tables: dict[str, tuple[str, str, int]] = {}  # float table -> (packed, gather scales, K)
    new_nodes, count = [], 0

    def weight_of(node):
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            return numpy_helper.to_array(inits[node.input[1]]), False
        if node.op_type == "Gemm" and len(node.input) == 2 and node.input[1] in inits:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transB") == 1 and not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0:
                return numpy_helper.to_array(inits[node.input[1]]).T, True
        return None, False

    head = {"bits": bits, "block": block_size}
    for node in graph.node:
        w, tied = weight_of(node)
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            new_nodes.append(node)
            continue
        rows, cols = w.shape
        nbits, block = bits, block_size
        if tied or "logits" in node.output:
            nbits, block = head_bits or bits, head_block_size or block_size
            head.update(bits=nbits, block=block)
        packed, scales, zero_points = _pack_nbits(w, nbits, block, symmetric)
        base = f"{node.input[1]}_{count}"
        graph.initializer.extend([numpy_helper.from_array(packed, f"{base}_Q{nbits}"),
                                  numpy_helper.from_array(scales, f"{base}_scales")])
        inputs = [node.input[0], f"{base}_Q{nbits}", f"{base}_scales"]
        if not symmetric:
            graph.initializer.append(numpy_helper.from_array(zero_points, f"{base}_zero_points"))
            inputs.append(f"{base}_zero_points")
        if tied:  # GatherBlockQuantized wants the scales with the packed data's rank
            graph.initializer.append(numpy_helper.from_array(scales[..., None], f"{base}_gather_scales"))
            packed_tables[node.input[1]] = (f"{base}_Q{nbits}", f"{base}_gather_scales", rows)
        attrs = {"K": rows, "N": cols, "bits": nbits, "block_size": block}
        if accuracy_level:
            attrs["accuracy_level"] = accuracy_level
        new_nodes.append(helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_Q{nbits}",
                                          domain="com.microsoft", **attrs))
        count += 1
    if packed_tables:
        new_nodes = _gathers_on_packed(new_nodes, graph, packed_tables, head["bits"], head["block"], symmetric)
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _drop_unused_initializers(model)
    return count


def _gathers_on_packed(nodes, graph, packed_tables, bits: int, block_size: int, symmetric: bool):
    """``Gather(table, ids)`` -> ``GatherBlockQuantized(packed, ids, scales)`` reshaped back to ``[.., K]``."""
    from onnx import helper, numpy_helper

    out = []
    for node in nodes:
        if node.op_type != "Gather" or node.input[0] not in packed_tables:
            out.append(node)
            continue
        packed, scales, k = packed_tables[node.input[0]]
        ins = [packed, node.input[1], scales]
        if not symmetric:  # symmetric blocks use the kernels' default zero point (8 for 4 bits, 128 for 8)
            raise ValueError("A tied embedding table is quantized symmetrically only (no zero points).")
        base = node.output[0]
        out.append(helper.make_node("GatherBlockQuantized", ins, [f"{base}_blocks"], name=f"{node.name}_Q{bits}",
                                    domain="com.microsoft", gather_axis=0, quantize_axis=2, block_size=block_size,
                                    bits=bits))
        graph.initializer.append(numpy_helper.from_array(np.array([k], np.int64), f"{base}_width"))
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), f"{base}_keep"))
        out.append(helper.make_node("Shape", [node.input[1]], [f"{base}_ids_shape"], name=f"{base}_ids_shape"))
        out.append(helper.make_node("Concat", [f"{base}_ids_shape", f"{base}_keep"], [f"{base}_flat_shape"], axis=0,
                                    name=f"{base}_flat_shape"))
        out.append(helper.make_node("Reshape", [f"{base}_blocks", f"{base}_flat_shape"], [f"{base}_flat"],
                                    name=f"{base}_flat"))
        # the last block may be padded past K
        out.append(helper.make_node("Slice", [f"{base}_flat", f"{base}_zero", f"{base}_width", f"{base}_keep"],
                                    list(node.output), name=f"{base}_unpad"))
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64), f"{base}_zero"))
    return out


def quantize_decoder_int4(src_folder: str | os.PathLike, dst_folder: str | os.PathLike, *,
                          block_size: int = 32, symmetric: bool = True, accuracy_level: int = 4,
                          head_bits: int = 4, head_block_size: int | None = None) -> dict:
    """An ONNX decoder folder -> int4 weight-only decoder (``MatMulNBits``: 4-bit weights in blocks of
    ``block_size`` input rows, one scale per block; round to nearest).

    Args:
        src_folder, dst_folder: as for :func:`quantize_decoder_int8`.
        block_size: rows per quantization block, a power of two from 16 to 256 (smaller: more accurate,
            more scales).
        symmetric: symmetric 4-bit blocks (no zero points).
        accuracy_level: MatMulNBits' compute type: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations
            (fastest on x86 CPUs).
        head_bits, head_block_size: the LM head's bits (4 or 8) and block (default ``block_size``); with a tied
            embedding the same table is every token's input embedding.

    Example:
        >>> quantize_decoder_int4("out/stages/01-onnx-decoder", "gpt2-int4", block_size=32)  # doctest: +SKIP
    """
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise ValueError(f"accuracy_level must be 0-4. Received: accuracy_level={accuracy_level!r}")
    if head_bits not in (4, 8):
        raise ValueError(f"head_bits must be 4 or 8. Received: head_bits={head_bits!r}")
    return _quantize_nbits(src_folder, dst_folder, bits=4, block_size=block_size, symmetric=bool(symmetric),
                           accuracy_level=accuracy_level, quantization="int4-weight-only", head_bits=head_bits,
                           head_block_size=head_block_size)


def _quantize_nbits(src_folder, dst_folder, *, bits: int, block_size: int, symmetric: bool, accuracy_level: int,
                    quantization: str, head_bits: int | None = None, head_block_size: int | None = None) -> dict:
    for name, b in (("block_size", block_size), ("head_block_size", head_block_size or block_size)):
        if b not in NBITS_BLOCK_SIZES:
            raise ValueError(f"{name} must be one of {NBITS_BLOCK_SIZES}. Received: {name}={b!r}")
    from tfaccel.onnx.decoder_export import save_decoder_model

    layout, src_info, model, rewritten, dst = _prepare(src_folder, dst_folder)
    matmuls = _count(model, "MatMul") + _count(model, "Gemm")
    already = _count(model, "MatMulNBits")  # carried GPTQ / AWQ products stay as they are
    quantized = matmul_to_nbits(model, bits=bits, block_size=block_size, symmetric=symmetric,
                                accuracy_level=accuracy_level, head_bits=head_bits, head_block_size=head_block_size)
    save_decoder_model(model, dst / DECODER_FILE)
    info = {"quantization": quantization, "bits": bits, "block_size": block_size, "symmetric": symmetric,
            "head_bits": head_bits or bits, "head_block_size": head_block_size or block_size,
            "accuracy_level": accuracy_level, "gemm_rewritten": rewritten, "matmuls": matmuls,
            "matmuls_quantized": quantized, "already_quantized": already,
            "tied_embedding": _count(model, "GatherBlockQuantized") > 0}
    if bits == 8:
        info["method"] = "blockwise"
    write_layout(dst, layout, **_carried(src_info), **info)
    return info


def copy_decoder(src_folder: str | os.PathLike, dst_folder: str | os.PathLike) -> None:
    """Copy a decoder folder's two files (for a stage that keeps the float graph)."""
    dst = Path(dst_folder)
    dst.mkdir(parents=True, exist_ok=True)
    for name in (DECODER_FILE, "decoder.json"):
        shutil.copy2(Path(src_folder) / name, dst / name)

