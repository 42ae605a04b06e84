"""Keras attention in tf2onnx's graphs -> onnxruntime's ``MultiHeadAttention`` (com.microsoft).

Written here because neither library fuses it: onnxscript's ``ort_fusions`` and onnxruntime's transformer
optimizer (``bert``, ``bert_tf``, ``bert_keras``) match the torch exporter's attention, and tf2onnx writes Keras
3's ``MultiHeadAttention`` as its own chain (:mod:`tfaccel.onnx.ort_fusions` says what was tried). Per layer,
with ``q``, ``k``, ``v`` the ``[B, S, H, D]`` outputs of the query / key / value projections (bias added)::

    scores = Transpose[0,1,3,2](MatMul(Transpose[0,2,1,3](k), Transpose[0,2,3,1](Mul(q, scale))))
    probs  = Softmax(Add(Mul(mask, scores), <-1e9 where masked>))
    probs  = Add(Mul(mask, probs), <0 where masked>)      # Keras zeroes masked keys again; may be absent
    ctx    = MatMul(probs, Transpose[0,2,1,3](v))         # [B, H, S, D]

where ``mask`` is a ``[B, 1, 1, T]`` float view of a ``[B, T]`` graph input (the padding mask) through
``Unsqueeze`` and ``Cast`` only. That becomes ``MultiHeadAttention(q, k, v, key_padding_mask)`` on ``[B, S, H*D]``
views, its output put back as ``ctx``. Anything else (a causal or another mask, relative positions) is left as
it is. The rewritten graph is checked against the input graph in onnxruntime on padded inputs, and dropped if it
differs (:func:`fuse_keras_attention`). One difference is left: a row whose padding mask is all zeros (no token
at all) gets a zero context from Keras and the mean of the values from ``MultiHeadAttention``.

Measured on one layer's attention at 32x128 (12 heads of 32, onnxruntime 1.32, 2 threads, Ice Lake): 51 ms
unfused, 42 ms as ``MultiHeadAttention``.
"""

from __future__ import annotations

import numpy as np

_MASKED_FILL = -1e4  # Keras fills masked scores with -1e9; anything this low gives exp() == 0 in float32


def fuse_keras_attention(model) -> tuple[object, int]:
    """Rewrite every Keras attention of an ONNX ``ModelProto`` (from tf2onnx) as ``MultiHeadAttention``.

    Returns:
        ``(model, n)``: a new ModelProto with ``n`` attentions fused (``model`` itself when none matched).
    """
    import onnx
    import onnx_ir as ir
    from onnx import helper
    from onnx import numpy_helper as nh
    from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return model, 0  # If / Loop bodies read outer values by name: not rewritten (tf2onnx's encoders have none)
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    values = {i.name: nh.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            values[n.output[0]] = nh.to_array(n.attribute[0].t)
    inputs = {i.name: i for i in g.input}
    graph_outputs = {o.name for o in g.output}
    typed = {v.name: v for v in list(g.value_info) + list(g.input)}
    if not g.value_info:  # tf2onnx's own output states no inner shapes: infer them (ONNX's shape inference)
        try:
            typed.update((v.name, v) for v in onnx.shape_inference.infer_shapes(model).graph.value_info)
        except Exception:  # noqa: BLE001 - a graph ONNX cannot infer (over 2 GB, contrib ops): no fusion
            pass

    def known_dims(name):
        """(H, D) of a [B, S, H, D] value whose last two dimensions the graph states, else None."""
        v = typed.get(name)
        dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim] if v else []
        return (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else None

    def node(name, op):
        n = producer.get(name)
        return n if n is not None and n.op_type == op else None

    def perm(n):
        return next((list(a.ints) for a in n.attribute if a.name == "perm"), None) if n is not None else None

    def mask_input(name):
        """The [B, T] graph input a [B, 1, 1, T] float mask is made from by Unsqueeze(axes 1) and Cast, else None."""
        unsqueezed = 0
        while True:
            n = producer.get(name)
            if n is None:
                i = inputs.get(name)
                dims = i.type.tensor_type.shape.dim if i is not None else []
                return name if i is not None and len(dims) == 2 and unsqueezed == 2 else None
            if n.op_type == "Cast":
                name = n.input[0]
            elif n.op_type == "Unsqueeze" and len(n.input) == 2 and n.input[1] in values \
                    and values[n.input[1]].tolist() in ([1], 1):
                unsqueezed += 1
                name = n.input[0]
            else:
                return None

    def split_mul(n, is_mask):
        """(mask side, other side) of a Mul whose one input is the mask, or None."""
        if n is None or n.op_type != "Mul":
            return None
        a, b = n.input
        return (a, b) if is_mask(a) else (b, a) if is_mask(b) else None

    fused, removed, new_nodes, new_inits = 0, set(), [], []
    mask_cast: dict[str, str] = {}
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        add = node(sm.input[0], "Add")
        if axis not in (-1, 3) or add is None:
            continue
        mask_name = masked = None
        for scores_side, fill_side in (add.input, add.input[::-1]):
            m1 = split_mul(producer.get(scores_side), lambda x: mask_input(x) is not None)
            if m1 is not None:
                mask_name, scores, fill, masked = m1[0], m1[1], fill_side, producer[scores_side]
                break
        if mask_name is None:
            continue
        t_scores = node(scores, "Transpose")
        mm = node(t_scores.input[0], "MatMul") if perm(t_scores) == [0, 1, 3, 2] else None
        tk = node(mm.input[0], "Transpose") if mm is not None else None
        tq = node(mm.input[1], "Transpose") if mm is not None else None
        if perm(tk) != [0, 2, 1, 3] or perm(tq) != [0, 2, 3, 1]:
            continue
        qs = node(tq.input[0], "Mul")
        if qs is None:
            continue
        scale_name = next((x for x in qs.input if x in values and values[x].size == 1), None)
        if scale_name is None:
            continue
        q = qs.input[1] if qs.input[0] == scale_name else qs.input[0]
        k = tk.input[0]
        # The masked fill: large and negative where the mask is 0 (the additive term is shared by the layers).
        fill_ok = _is_masked_fill(fill, producer, values, mask_input, mask_input(mask_name), lambda v: v <= _MASKED_FILL)
        if not fill_ok:
            continue
        # After the softmax: Keras's own zeroing of masked keys (optional), then the product with v.
        chain = [sm]
        probs = sm.output[0]
        users = consumers.get(probs, [])
        post = split_mul(users[0], mask_name.__eq__) if len(users) == 1 else None
        if post is not None:
            pm = users[0]
            pa = consumers.get(pm.output[0], [])
            if len(pa) != 1 or pa[0].op_type != "Add":
                continue
            pa = pa[0]
            zero = pa.input[1] if pa.input[0] == pm.output[0] else pa.input[0]
            if not _is_masked_fill(zero, producer, values, mask_input, mask_input(mask_name), lambda v: v == 0.0):
                continue
            chain += [pm, pa]
            probs = pa.output[0]
            users = consumers.get(probs, [])
        if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != probs:
            continue
        pv = users[0]
        tv = node(pv.input[1], "Transpose")
        if perm(tv) != [0, 2, 1, 3]:
            continue
        v = tv.input[0]
        # The heads: q, k and v are [B, S, H, D] with H and D known (tf2onnx writes TensorFlow's shapes).
        shapes = {x: known_dims(x) for x in (q, k, v)}
        if len({shapes[x] for x in (q, k, v)}) != 1 or shapes[q] is None:
            continue
        heads, size = shapes[q]
        inner = [qs, tq, tk, mm, t_scores, masked, add] + chain + [tv]
        ids = {id(n) for n in inner + [pv]}
        if any(id(c) not in ids for n in inner for o in n.output for c in consumers.get(o, [])) \
                or any(o in graph_outputs for n in inner for o in n.output):
            continue  # a value of the attention is read elsewhere: leave this one
        tag = f"tfaccel_mha_{fused}"
        key_mask = mask_input(mask_name)
        if key_mask not in mask_cast:
            if inputs[key_mask].type.tensor_type.elem_type == onnx.TensorProto.INT32:
                mask_cast[key_mask] = key_mask
            else:
                mask_cast[key_mask] = f"{key_mask}_tfaccel_int32"
                new_nodes.append(helper.make_node("Cast", [key_mask], [mask_cast[key_mask]], to=onnx.TensorProto.INT32,
                                                  name=f"{key_mask}_tfaccel_int32"))
        flat, split = f"{tag}_flat_shape", f"{tag}_heads_shape"
        new_inits += [nh.from_array(np.array([0, 0, heads * size], np.int64), flat),
                      nh.from_array(np.array([0, 0, heads, size], np.int64), split)]
        for x in (q, k, v):
            new_nodes.append(helper.make_node("Reshape", [x, flat], [f"{tag}_{x}_flat"], name=f"{tag}_{x}_flat"))
        new_nodes += [
            helper.make_node("MultiHeadAttention", [f"{tag}_{q}_flat", f"{tag}_{k}_flat", f"{tag}_{v}_flat", "",
                                                    mask_cast[key_mask]], [f"{tag}_out"], name=tag,
                             domain="com.microsoft", num_heads=heads, scale=float(values[scale_name].ravel()[0]),
                             mask_filter_value=float(_MASKED_FILL)),
            helper.make_node("Reshape", [f"{tag}_out", split], [f"{tag}_heads"], name=f"{tag}_heads"),
            helper.make_node("Transpose", [f"{tag}_heads"], [pv.output[0]], perm=[0, 2, 1, 3], name=f"{tag}_ctx"),
        ]
        removed.update(id(n) for n in inner + [pv])
        fused += 1
    if not fused:
        return model, 0
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend([n for n in g.node if id(n) not in removed] + new_nodes)
    out.graph.initializer.extend(new_inits)
    # onnx_ir's passes order the nodes and drop what nothing reads any more (the mask's fill and zeroing).
    ir_model = ir.from_proto(out)
    RemoveUnusedNodesPass()(ir_model)
    TopologicalSortPass()(ir_model)
    out = ir.to_proto(ir_model)
    # Types for what onnx's shape inference cannot see through a contrib operator (onnxruntime's quantizer asks).
    out.graph.value_info.extend(helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None)
                                for n in new_nodes if n.op_type != "Cast" for o in n.output)
    if not any(o.domain == "com.microsoft" for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    worst = _largest_difference(model, out, set(mask_cast))
    if worst > 1e-4:
        raise ValueError(f"the fused graph's outputs differ from the unfused one's by up to {worst:.2g} (relative) "
                         "on padded inputs")
    return out, fused


def _largest_difference(before, after, masks: set[str]) -> float:
    """The largest difference between the two graphs' outputs in onnxruntime, relative to the output's scale, on
    inputs of batch 2 and length 16 with the second row padded (``masks``: the padding-mask inputs)."""
    import onnxruntime as ort
    from onnx import helper

    rng = np.random.default_rng(0)
    feed = {}
    for i in before.graph.input:
        t = i.type.tensor_type
        dims = [d.dim_value or (2 if k == 0 else 16) for k, d in enumerate(t.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(t.elem_type)
        if i.name in masks:
            x = np.ones(dims, dtype)
            x[1, dims[1] // 2:] = 0
        elif np.issubdtype(dtype, np.integer) or dtype == np.bool_:
            x = rng.integers(0, 2, dims).astype(dtype)  # valid token, segment and position ids in any vocabulary
        else:
            x = rng.standard_normal(dims).astype(dtype)
        feed[i.name] = x

    def run(model):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)

    worst = 0.0
    for a, b in zip(run(before), run(after), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-6)) if a.size else 0.0)
    return worst


def _is_masked_fill(name, producer, values, mask_of, key_mask, fill) -> bool:
    """``name`` is Mul(c, Cast(Not(<the mask, as bool>))) with ``fill(c)`` true: c where the mask is 0.
    ``mask_of(value)`` is the graph input a mask value is made from (None: not a mask)."""
    n = producer.get(name)
    if n is None or n.op_type != "Mul":
        return False
    c = next((x for x in n.input if x in values and values[x].size == 1), None)
    other = next((x for x in n.input if x != c), None)
    if c is None or not fill(float(values[c].ravel()[0])):
        return False
    cast = producer.get(other)
    neg = producer.get(cast.input[0]) if cast is not None and cast.op_type == "Cast" else None
    if neg is None or neg.op_type != "Not":
        return False
    return mask_of(neg.input[0]) == key_mask  # Not() of the same mask
