"""Native decoder graphs: a keras-hub CausalLM's decode step written directly as an ONNX graph from its weights,
with onnxruntime's fused operators, for GPT-2 and the Llama class (Llama, Llama 3, Mistral, Qwen).

Tracing keras-hub's layers through tf2onnx gives ~2,300 ONNX nodes for gpt2-small, and GPT-2's step written in
plain TensorFlow ops still ~730 (every layer norm, mask and head reshape is a handful of small nodes, and
onnxruntime's scheduling between nodes costs about as much as the weight MatMuls at batch 1). Here each
layer is a few fused nodes, and no TensorFlow or tf2onnx runs (seconds and a few hundred MB instead of a
minute and 4 GB for gpt2-small):

- GPT-2: ``LayerNormalization`` (opset 17), one q/k/v ``MatMul``, ``com.microsoft.GroupQueryAttention`` with as
  many KV heads as query heads and ``past_key`` / ``past_value`` (it appends the new keys/values and attends in
  one kernel), ``FastGelu`` (the tanh gelu GPT-2 uses).
- Llama class: ``SimplifiedLayerNormalization`` (RMSNorm), one q/k/v ``MatMul``, ``com.microsoft.RotaryEmbedding``
  with cos/sin tables read from the model's own rotary layer (so Llama 3's frequency scaling is keras-hub's),
  ``com.microsoft.GroupQueryAttention`` (grouped KV heads without repeating them), one gate/up ``MatMul``, SiLU.

Masks follow keras-hub exactly: an additive ``attention_bias`` ``[batch, 1, new, past + new]`` built once per
step from the causal positions, the attention mask and a sliding window (Mistral, Qwen with one), so padded
prompts give the logits the Keras model gives.

The cache is one key and one value tensor per layer, ``[batch, kv_heads, length, head_dim]`` (the layout both
attention kernels take), named ``past_key_{i}`` / ``past_value_{i}`` and ``present_key_{i}`` /
``present_value_{i}``; ``decoder.json`` says ``"cache": "bnsh"``.

The token embedding is stored once when the model ties it to the LM head: the head is a ``Gemm`` with
``transB=1`` on the embedding table, which the weight quantizers
(:func:`tfaccel.onnx.decoder_quantize.matmul_to_nbits`) turn into ``MatMulNBits`` on that same table, with the
lookup becoming ``GatherBlockQuantized`` on the packed integers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tfaccel.errors import StepError

#: keras-hub CausalLM classes (and subclasses) the native builder writes.
NATIVE_FAMILIES = {"GPT2CausalLM": "gpt2", "Llama3CausalLM": "llama", "LlamaCausalLM": "llama",
                   "MistralCausalLM": "llama", "QwenCausalLM": "llama"}
EMBEDDING = "tfaccel_token_embedding"
#: Input of the native graphs: int64 ``[1]``, logits only from this position on (0: every position).
LOGITS_FROM = "logits_from"
LM_HEAD = "tfaccel_lm_head"
#: Block sizes MatMulNBits takes (rows of K per scale).
NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)
#: Rotary tables of a Llama-class native graph cover this many positions unless told otherwise.
DEFAULT_MAX_POSITIONS = 4096
_LAYER_NORM_EPSILON = 1e-5  # GPT-2's
_MASKED = -1e9  # what keras-hub's softmax writes for masked scores (finite: a fully masked row stays finite)


@dataclasses.dataclass
class QuantizedMatrix:
    """A weight already quantized block-wise (GPTQ / AWQ), in ``MatMulNBits``' layout.

    Attributes:
        packed: uint8 ``[N, k_blocks, block_size * bits / 8]``, two 4-bit values a byte (low nibble first).
        scales: float32 ``[N, k_blocks]``.
        zero_points: uint8 ``[N, ceil(k_blocks * bits / 8)]`` packed like ``packed``, or None (symmetric).
        bits, block_size: 4 or 8; rows per block along K.
        k, n: the float weight's shape ``[K, N]`` (``x [.., K] @ W -> [.., N]``).
        input_scale: float32 ``[K]`` the input is multiplied by first (AWQ keeps ``W / s`` quantized), or None.
        source: what made it ("gptq", "awq").
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    block_size: int
    k: int
    n: int
    input_scale: np.ndarray | None = None
    source: str = ""


def native_family(causal_lm) -> str | None:
    """``"gpt2"`` or ``"llama"`` when the native builder writes this model's class, else None."""
    for cls in type(causal_lm).__mro__:
        if cls.__name__ in NATIVE_FAMILIES:
            return NATIVE_FAMILIES[cls.__name__]
    return None


def native_refusal(causal_lm) -> str | None:
    """Why :func:`build_native_decoder` cannot write this model (None: it can)."""
    family = native_family(causal_lm)
    if family is None:
        return f"{type(causal_lm).__name__} is not one of {', '.join(NATIVE_FAMILIES)}"
    bb = causal_lm.backbone
    if str(getattr(bb, "compute_dtype", "float32")) != "float32":
        return f"compute dtype {bb.compute_dtype} (the native graph computes in float32)"
    emb = bb.token_embedding
    if getattr(emb, "logit_soft_cap", None) is not None or getattr(emb, "reverse_dtype", None) not in (None, "float32"):
        return "the LM head is soft-capped or runs in another dtype"
    if getattr(getattr(emb, "dtype_policy", None), "quantization_mode", None):
        return "the token embedding is quantized"
    for layer in bb.transformer_layers:
        for d in _dense_layers(layer, family):
            mode = getattr(d, "quantization_mode", None)
            if mode not in (None, "gptq", "awq"):
                return f"{layer.name}: {mode} quantized layers (the native graph carries GPTQ and AWQ weights only)"
            if mode and not (getattr(d, "is_gptq_calibrated", False) or getattr(d, "is_awq_calibrated", False)):
                return f"{layer.name}: {mode} layers that were never calibrated"
    return _gpt2_refusal(causal_lm) if family == "gpt2" else _llama_refusal(causal_lm)


def _dense_layers(layer, family: str) -> list:
    attn = layer._self_attention_layer
    common = [attn._query_dense, attn._key_dense, attn._value_dense, attn._output_dense,
              layer._feedforward_intermediate_dense, layer._feedforward_output_dense]
    return common if family == "gpt2" else [*common, layer._feedforward_gate_dense]


def _gpt2_refusal(causal_lm) -> str | None:
    bb = causal_lm.backbone
    for layer in bb.transformer_layers:
        norms = (layer._self_attention_layer_norm, layer._feedforward_layer_norm)
        if not layer.normalize_first or layer._cross_attention_layer is not None:
            return f"{layer.name}: not a pre-norm self-attention decoder layer"
        if any(getattr(d, "bias", None) is None for d in _dense_layers(layer, "gpt2")):
            return f"{layer.name}: a projection without bias"
        if any(n.rms_scaling or not (n.center and n.scale) or abs(n.epsilon - _LAYER_NORM_EPSILON) > 1e-12
               for n in norms):
            return f"{layer.name}: a layer norm other than GPT-2's"
        act = layer._feedforward_intermediate_dense.activation
        if getattr(act, "__name__", "") != "gelu_approximate":
            return f"{layer.name}: feed-forward activation {getattr(act, '__name__', act)}"
    if bb.layer_norm.rms_scaling or abs(bb.layer_norm.epsilon - _LAYER_NORM_EPSILON) > 1e-12:
        return "the final layer norm is not GPT-2's"
    return None


def _llama_refusal(causal_lm) -> str | None:
    bb = causal_lm.backbone
    for layer in bb.transformer_layers:
        attn = layer._self_attention_layer
        if getattr(getattr(layer, "activation", None), "__name__", "") != "silu":
            return f"{layer.name}: feed-forward activation {getattr(layer.activation, '__name__', '?')} (not SiLU)"
        if getattr(attn, "rotary_embedding_layer", None) is None:
            return f"{layer.name}: no rotary embedding layer"
        if any(getattr(d, "bias", None) is not None for d in (attn._output_dense, layer._feedforward_gate_dense,
                                                               layer._feedforward_intermediate_dense,
                                                               layer._feedforward_output_dense)):
            return f"{layer.name}: biases on the output / feed-forward projections"
        if abs(float(attn._inv_norm_factor) - 1.0 / np.sqrt(_head_dim(causal_lm))) > 1e-9:
            return f"{layer.name}: attention scale other than 1/sqrt(head_dim)"
    return None


def _head_dim(causal_lm) -> int:
    from tfaccel.causal_lm_spec import causal_lm_spec

    return int(causal_lm_spec(causal_lm).head_dim)


# --------------------------------------------------------------------------------------------------
# weights


def _f32(v) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(v, np.float32))


def _kernel(dense, rows: int | None = None):
    """A Dense / EinsumDense layer's weight as ``[K, N]`` float32, or its :class:`QuantizedMatrix`."""
    mode = getattr(dense, "quantization_mode", None)
    if mode in ("gptq", "awq"):
        return keras_quantized_matrix(dense)
    w = np.asarray(dense.kernel, np.float32)
    return _f32(w.reshape(rows, -1) if rows else w.reshape(-1, w.shape[-1]))


def _bias(dense) -> np.ndarray | None:
    b = getattr(dense, "bias", None)
    return None if b is None else _f32(np.reshape(b, (-1,)))


def _concat_outputs(parts: list) -> Any:
    """``[K, N_i]`` weights side by side (one MatMul for q/k/v or gate/up); quantized ones only when they share
    their block layout and input scale (else None: keep them apart)."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return _f32(np.concatenate(parts, axis=1))
    if not all(isinstance(p, QuantizedMatrix) for p in parts):
        return None
    first = parts[0]
    same = all(p.bits == first.bits and p.block_size == first.block_size and p.k == first.k
               and (p.zero_points is None) == (first.zero_points is None) and p.input_scale is None
               and first.input_scale is None for p in parts)
    if not same:
        return None
    return QuantizedMatrix(packed=np.concatenate([p.packed for p in parts]),
                           scales=np.concatenate([p.scales for p in parts]),
                           zero_points=None if first.zero_points is None else np.concatenate(
                               [p.zero_points for p in parts]),
                           bits=first.bits, block_size=first.block_size, k=first.k, n=sum(p.n for p in parts),
                           source=first.source)


def _embedding(bb):
    emb = bb.token_embedding
    table = _f32(emb.embeddings)
    head = None if emb.tie_weights else _f32(emb.reverse_embeddings)
    return table, head


# --------------------------------------------------------------------------------------------------
# the graph


class _Graph:
    """Nodes and initializers of one ONNX graph, with fresh value names."""

    def __init__(self):
        self.nodes: list = []
        self.inits: dict[str, Any] = {}
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def init(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def const(self, value, dtype=np.int64) -> str:
        return self.init(self.fresh("const"), np.asarray(value, dtype))

    def op(self, op_type: str, inputs, n_out: int = 1, domain: str = "", outputs=None, **attrs):
        from onnx import helper

        outs = list(outputs) if outputs else [self.fresh(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=f"{outs[0]}_{op_type}", domain=domain,
                                           **attrs))
        return outs[0] if len(outs) == 1 else outs

    def linear(self, x: str, w, name: str, bias: np.ndarray | None = None) -> str:
        """``x @ w (+ bias)``: a MatMul on a float initializer, or MatMulNBits on carried GPTQ/AWQ integers."""
        if isinstance(w, QuantizedMatrix):
            if w.input_scale is not None:
                x = self.op("Mul", [x, self.init(f"{name}_input_scale", _f32(w.input_scale))])
            ins = [x, self.init(f"{name}_Q{w.bits}", w.packed), self.init(f"{name}_scales", _f32(w.scales))]
            if w.zero_points is not None:
                ins.append(self.init(f"{name}_zero_points", w.zero_points))
            y = self.op("MatMulNBits", ins, domain="com.microsoft", K=w.k, N=w.n, bits=w.bits,
                        block_size=w.block_size, accuracy_level=4)
        else:
            y = self.op("MatMul", [x, self.init(name, w)])
        if bias is not None:
            y = self.op("Add", [y, self.init(f"{name}_bias", bias)])
        return y


def _io(layout, vocab: int):
    from onnx import TensorProto, helper

    f, i = TensorProto.FLOAT, TensorProto.INT32
    inputs = [helper.make_tensor_value_info("input_ids", i, ["batch", "new"]),
              helper.make_tensor_value_info("attention_mask", i, ["batch", "total"]),
              helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("logits", f, ["batch", "new", vocab])]
    for li in range(layout.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past_{kind}_{li}", f,
                                                        ["batch", layout.num_kv_heads, "past", layout.head_dim]))
            outputs.append(helper.make_tensor_value_info(f"present_{kind}_{li}", f,
                                                         ["batch", layout.num_kv_heads, "total", layout.head_dim]))
    return inputs, outputs


def _step_shapes(g: _Graph):
    """(past_len, new, total) as int64 scalars, and positions ``past .. past + new - 1`` ``[new]`` (int64).

    The lengths come from the attention mask (``total`` columns), not from the past tensors, so a runner may
    bind past and present to one preallocated buffer longer than the cache's content (the attention kernels
    then write the new keys and values in place instead of copying the cache every step)."""
    total = g.op("Gather", [g.op("Shape", ["attention_mask"]), g.const(1)])
    new = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(1)])
    past_len = g.op("Sub", [total, new])
    positions = g.op("Range", [past_len, total, g.const(1)])
    return past_len, new, total, positions


def _attention_bias(g: _Graph, positions: str, total: str, window: int | None) -> str:
    """``[batch, 1, new, total]`` float: 0 where a query may attend to a key, -1e9 elsewhere (keras-hub's rule:
    causal, the attention mask, and a sliding window when the model has one)."""
    keys = g.op("Range", [g.const(0), total, g.const(1)])
    q = g.op("Unsqueeze", [positions, g.const([1])])  # [new, 1]
    k = g.op("Unsqueeze", [keys, g.const([0])])  # [1, total]
    allowed = g.op("LessOrEqual", [k, q])  # causal
    if window:
        allowed = g.op("And", [allowed, g.op("Less", [q, g.op("Add", [k, g.const(int(window))])])])
    mask = g.op("Greater", ["attention_mask", g.const(0, np.int32)])  # [batch, total]
    mask = g.op("Unsqueeze", [mask, g.const([1, 2])])  # [batch, 1, 1, total]
    allowed = g.op("And", [g.op("Unsqueeze", [allowed, g.const([0, 1])]), mask])
    return g.op("Where", [allowed, g.const(0.0, np.float32), g.const(_MASKED, np.float32)])


def _attention_inputs(g: _Graph, positions: str, total: str, window: int | None) -> tuple[str, str, str]:
    """What every layer's GroupQueryAttention reads: (seqlens_k, total length, attention bias).

    Every row's sequence is the whole cache (``seqlens_k = total - 1``); which keys a query sees is the attention
    bias's business, so padded prompts follow keras-hub's mask."""
    bias = _attention_bias(g, positions, total, window)
    batch = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(0)])
    seqlens = g.op("Cast", [g.op("Expand", [g.op("Sub", [total, g.const(1)]),
                                            g.op("Unsqueeze", [batch, g.const([0])])])], to=6)
    return seqlens, g.op("Cast", [total], to=6), bias


def _attention(g: _Graph, i: int, q: str, k: str, v: str, att, heads: int, kv_heads: int) -> list[str]:
    """Layer ``i``'s attention with its cache: ``com.microsoft.GroupQueryAttention`` (grouped KV heads without
    repeating them; for GPT-2 ``kv_heads == heads``). It appends the new keys/values to ``past_*_{i}``, or,
    when a runner binds past and present to one buffer, writes them in place (no copy of the cache)."""
    seqlens, total32, bias = att
    return g.op("GroupQueryAttention", [q, k, v, f"past_key_{i}", f"past_value_{i}", seqlens, total32, "", "", "",
                                        bias], n_out=3, domain="com.microsoft", num_heads=heads, kv_num_heads=kv_heads,
                outputs=[g.fresh("attn"), f"present_key_{i}", f"present_value_{i}"])


def _lm_head(g: _Graph, x: str, head: np.ndarray | None, vocab: int, hidden: int) -> str:
    """Logits ``[batch, new - logits_from, vocab]``: ``Gemm(x, table, transB=1)`` on the tied embedding (stored
    once), or a MatMul on an untied head ``[hidden, vocab]``, for the positions from the ``logits_from`` input on
    (0: every position; a prefill that only needs the next token passes ``new - 1``, which spares the largest
    product at every prompt position but the last)."""
    x = g.op("Slice", [x, LOGITS_FROM, g.const([2**62]), g.const([1])])
    if head is not None:
        return g.op("MatMul", [x, g.init(LM_HEAD, head)], outputs=["logits"])
    shape = g.op("Shape", [x])
    flat = g.op("Reshape", [x, g.const([-1, hidden])])
    logits = g.op("Gemm", [flat, EMBEDDING], transB=1)
    out_shape = g.op("Concat", [g.op("Slice", [shape, g.const([0]), g.const([2])]), g.const([vocab])], axis=0)
    return g.op("Reshape", [logits, out_shape], outputs=["logits"])


def _gpt2_graph(g: _Graph, causal_lm, layout) -> None:
    bb = causal_lm.backbone
    heads, head_dim = layout.num_kv_heads, layout.head_dim
    hidden = heads * head_dim
    table, head = _embedding(bb)
    g.init(EMBEDDING, table)
    _, _, total, positions = _step_shapes(g)
    wpe = g.init("tfaccel_position_embedding", _f32(bb.position_embedding.position_embeddings))
    x = g.op("Add", [g.op("Gather", [EMBEDDING, "input_ids"]), g.op("Gather", [wpe, positions])])
    att = _attention_inputs(g, positions, total, None)

    def norm(x, n, name):
        return g.op("LayerNormalization", [x, g.init(f"{name}_gamma", _f32(n.gamma)), g.init(f"{name}_beta", _f32(n.beta))],
                    axis=-1, epsilon=_LAYER_NORM_EPSILON)

    for i, layer in enumerate(bb.transformer_layers):
        p = f"tfaccel_l{i}_"
        attn = layer._self_attention_layer
        h = norm(x, layer._self_attention_layer_norm, p + "ln1")
        qkv_parts = [_kernel(d, hidden) for d in (attn._query_dense, attn._key_dense, attn._value_dense)]
        qkv_bias = np.concatenate([_bias(d) for d in (attn._query_dense, attn._key_dense, attn._value_dense)])
        q, k, v = _project_split(g, h, qkv_parts, p + "qkv", qkv_bias, [hidden] * 3)
        out = _attention(g, i, q, k, v, att, heads, heads)
        x = g.op("Add", [x, g.linear(out[0], _kernel(attn._output_dense, hidden), p + "out", _bias(attn._output_dense))])
        h = norm(x, layer._feedforward_layer_norm, p + "ln2")
        fc = layer._feedforward_intermediate_dense
        h = g.linear(h, _kernel(fc), p + "fc")
        h = g.op("FastGelu", [h, g.init(p + "fc_bias", _bias(fc))], domain="com.microsoft")
        proj = layer._feedforward_output_dense
        x = g.op("Add", [x, g.linear(h, _kernel(proj), p + "proj", _bias(proj))])
    x = norm(x, bb.layer_norm, "tfaccel_final_ln")
    _lm_head(g, x, head, int(bb.vocabulary_size), hidden)


def _project_split(g: _Graph, x: str, parts: list, name: str, bias: np.ndarray | None, sizes: list[int]) -> list[str]:
    """``x`` through several projections of one input: one MatMul + Split where the weights concatenate."""
    fused = _concat_outputs(parts)
    if fused is not None:
        y = g.linear(x, fused, name, bias)
        return g.op("Split", [y, g.const(sizes)], n_out=len(sizes), axis=-1)
    offsets = np.cumsum([0, *sizes])
    return [g.linear(x, w, f"{name}{j}", None if bias is None else bias[offsets[j]: offsets[j + 1]])
            for j, w in enumerate(parts)]


def rotary_tables(rotary_layer, head_dim: int, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cos, sin)`` ``[positions, head_dim / 2]`` as keras-hub's rotary layer computes them.

    Read by applying the layer itself to ``x = (1, .., 1, 0, .., 0)`` at every position: keras-hub rotates
    halves (``x * cos + (-x2, x1) * sin``), so the output's first half is ``cos`` and its second half
    ``sin`` (Llama 3's frequency scaling and any position scaling included)."""
    half = head_dim // 2
    probe = np.zeros((1, positions, 1, head_dim), np.float32)
    probe[..., :half] = 1.0
    out = np.asarray(rotary_layer(probe, start_index=0), np.float32)[0, :, 0]
    return _f32(out[:, :half]), _f32(out[:, half:])


def _llama_graph(g: _Graph, causal_lm, layout, max_positions: int) -> None:
    bb = causal_lm.backbone
    heads = int(bb.num_query_heads)
    kv_heads, head_dim = layout.num_kv_heads, layout.head_dim
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    hidden = int(bb.hidden_dim)
    table, head = _embedding(bb)
    g.init(EMBEDDING, table)
    _, new, total, positions = _step_shapes(g)
    first = bb.transformer_layers[0]._self_attention_layer
    cos, sin = rotary_tables(first.rotary_embedding_layer, head_dim, max_positions)
    cos_name, sin_name = g.init("tfaccel_rotary_cos", cos), g.init("tfaccel_rotary_sin", sin)
    x = g.op("Gather", [EMBEDDING, "input_ids"])
    batch = g.op("Gather", [g.op("Shape", ["input_ids"]), g.const(0)])
    pos_ids = g.op("Expand", [g.op("Unsqueeze", [positions, g.const([0])]),
                              g.op("Concat", [g.op("Unsqueeze", [batch, g.const([0])]),
                                              g.op("Unsqueeze", [new, g.const([0])])], axis=0)])
    att = _attention_inputs(g, positions, total, _sliding_window(first))

    def rms(x, n, name):
        return g.op("SimplifiedLayerNormalization", [x, g.init(f"{name}_scale", _f32(n.scale))], axis=-1,
                    epsilon=float(n.epsilon))

    for i, layer in enumerate(bb.transformer_layers):
        p = f"tfaccel_l{i}_"
        attn = layer._self_attention_layer
        h = rms(x, layer._self_attention_layernorm, p + "ln1")
        denses = (attn._query_dense, attn._key_dense, attn._value_dense)
        biases = [_bias(d) for d in denses]
        qkv_bias = None if all(b is None for b in biases) else np.concatenate(
            [b if b is not None else np.zeros(s, np.float32) for b, s in zip(biases, (q_size, kv_size, kv_size),
                                                                             strict=True)])
        q, k, v = _project_split(g, h, [_kernel(d, hidden) for d in denses], p + "qkv", qkv_bias,
                                 [q_size, kv_size, kv_size])
        q = g.op("RotaryEmbedding", [q, pos_ids, cos_name, sin_name], domain="com.microsoft", num_heads=heads)
        k = g.op("RotaryEmbedding", [k, pos_ids, cos_name, sin_name], domain="com.microsoft", num_heads=kv_heads)
        out = _attention(g, i, q, k, v, att, heads, kv_heads)
        x = g.op("Add", [x, g.linear(out[0], _kernel(attn._output_dense, q_size), p + "out")])
        h = rms(x, layer._feedforward_layernorm, p + "ln2")
        inter = int(layer._feedforward_gate_dense.units)
        gate, up = _project_split(g, h, [_kernel(layer._feedforward_gate_dense),
                                         _kernel(layer._feedforward_intermediate_dense)], p + "gate_up", None,
                                  [inter, inter])
        h = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        x = g.op("Add", [x, g.linear(h, _kernel(layer._feedforward_output_dense), p + "down")])
    x = rms(x, bb.layer_norm, "tfaccel_final_ln")
    _lm_head(g, x, head, int(bb.vocabulary_size), hidden)


def _sliding_window(attn) -> int | None:
    if getattr(attn, "use_sliding_window_attention", None) is not None:  # Qwen
        return int(attn.sliding_window_size) if attn.use_sliding_window_attention else None
    window = getattr(attn, "_sliding_window", None)  # Mistral
    return int(window) if window else None


def build_native_decoder(causal_lm, layout, *, opset: int = 17, max_positions: int | None = None):
    """The model's decode step as an ONNX ModelProto (module docstring), and its decoder layout.

    Args:
        causal_lm: a keras-hub GPT2CausalLM, LlamaCausalLM, Llama3CausalLM, MistralCausalLM or QwenCausalLM
            (float32, or with GPTQ / AWQ quantized layers, whose integers are carried unchanged).
        layout: its :class:`tfaccel.onnx.decoder_export.DecoderLayout` (``decoder_layout(causal_lm)``); the one
            returned has the native cache layout and, for the Llama class, the rotary tables' length.
        opset: the ONNX opset (17 or later: LayerNormalization).
        max_positions: Llama class: positions the rotary tables cover (default 4096), which becomes the
            decoder's maximum length.

    Raises:
        StepError: :func:`native_refusal` names a reason.

    Example:
        >>> model, layout = build_native_decoder(gpt2_causal_lm, decoder_layout(gpt2_causal_lm))  # doctest: +SKIP
        >>> len(model.graph.node) < 200  # doctest: +SKIP
        True
    """
    from onnx import helper

    reason = native_refusal(causal_lm)
    if reason:
        raise StepError(f"The native decoder graph does not cover this model: {reason}.")
    if opset < 17:
        raise StepError(f"The native decoder graph needs opset 17 or later (LayerNormalization). Received: {opset}")
    family = native_family(causal_lm)
    g = _Graph()
    if family == "gpt2":
        _gpt2_graph(g, causal_lm, layout)
    else:
        max_positions = int(max_positions or DEFAULT_MAX_POSITIONS)
        _llama_graph(g, causal_lm, layout, max_positions)
        layout = dataclasses.replace(layout, max_length=max_positions)
    layout = dataclasses.replace(layout, cache="bnsh")
    inputs, outputs = _io(layout, int(causal_lm.backbone.vocabulary_size))
    graph = helper.make_graph(g.nodes, f"tfaccel_{family}_decoder", inputs, outputs, list(g.inits.values()))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="tfaccel")
    model.ir_version = min(model.ir_version, 10)  # onnxruntime 1.2x reads IR 10
    return model, layout


def keras_quantized_matrix(layer):
    """A Keras GPTQ / AWQ quantized ``Dense`` / ``EinsumDense`` layer's integers, group scales and zero points in
    ``MatMulNBits``' layout, unchanged (not quantized again): a :class:`tfaccel.onnx.decoder_graph.QuantizedMatrix`.

    Keras keeps ``quantized_kernel`` ``[N (two 4-bit values a byte), K]`` with values ``0 .. 2**bits - 1``,
    ``kernel_scale`` / ``kernel_zero`` ``[N, groups]`` and ``g_idx`` (each input row's group); a weight is
    ``(q - zero) * scale`` (AWQ: divided by ``awq_scales`` per input row, which becomes a multiplication of the
    layer's input by ``1 / awq_scales``). ``MatMulNBits`` wants ``[N, k_blocks, block * bits / 8]`` with the
    same arithmetic, the blocks being contiguous runs of input rows.

    Raises:
        StepError: the groups are not contiguous runs of a power-of-two size from 16 to 256 (GPTQ's
            ``activation_order=True`` reorders them; ``group_size=-1`` is one group per column).
    """
    from keras import ops, quantizers

    mode = layer.quantization_mode
    bits = 4 if mode == "awq" else int(_policy_attr(layer, "weight_bits", 4))
    scale = np.asarray(layer.kernel_scale, np.float32)
    zero = np.asarray(layer.kernel_zero).astype(np.uint8)
    g_idx = np.asarray(layer.g_idx).astype(np.int64)
    n, groups = scale.shape
    k = int(g_idx.shape[0])
    packed = ops.convert_to_numpy(layer.quantized_kernel)
    q = np.asarray(ops.convert_to_numpy(quantizers.unpack_int4(packed, orig_len=n, axis=0, dtype="uint8"))
                   if bits == 4 else packed, np.uint8)  # [N, K]
    block = -(-k // groups)
    contiguous = np.array_equal(g_idx, np.arange(k) // block)
    if block not in NBITS_BLOCK_SIZES or not contiguous:
        raise StepError(f"{layer.path}: {mode} groups of {block} input rows{'' if contiguous else ' in activation order'}"
                        f" cannot be carried into MatMulNBits, which needs contiguous blocks of {NBITS_BLOCK_SIZES} "
                        "rows. Quantize with group_size in that list and activation_order=False.")
    limit = (1 << bits) - 1
    if int(zero.max()) > limit:
        raise StepError(f"{layer.path}: {mode} zero points up to {int(zero.max())} do not fit {bits} bits (Keras 3.15 does "
                        "not clamp asymmetric zero points, keras-team/keras#23512). Quantize with symmetric=True.")
    per_byte = 8 // bits
    k_blocks = -(-k // block)
    full = np.zeros((n, k_blocks * block), np.uint8)
    full[:, :k] = q
    full = full.reshape(n, k_blocks, block)
    zp = zero
    if bits == 4:
        full = (full[..., 0::2] | (full[..., 1::2] << 4)).astype(np.uint8)
        if k_blocks % 2:
            zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
        zp = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    assert full.shape == (n, k_blocks, block // per_byte)
    input_scale = None
    if mode == "awq":
        input_scale = (1.0 / np.asarray(layer.awq_scales, np.float32)).astype(np.float32)
    return QuantizedMatrix(packed=np.ascontiguousarray(full), scales=np.ascontiguousarray(scale),
                           zero_points=np.ascontiguousarray(zp), bits=bits, block_size=block, k=k, n=n,
                           input_scale=input_scale, source=mode)


def _policy_attr(layer, name: str, default):
    policy = getattr(layer, "dtype_policy", None)
    value = getattr(policy, name, None)
    if value is None and hasattr(policy, "__getitem__"):
        try:
            value = getattr(policy[layer.path], name, None)
        except (KeyError, TypeError):
            value = None
    return default if value is None else value
