"""keras-hub CausalLM -> ONNX decoder with an explicit KV cache: one merged graph for prefill and decode.

Two ways to write the decode step (``export_decoder(graph=...)``):

- ``native`` (GPT-2 and the Llama class: Llama, Llama 3, Mistral, Qwen; the default where
  :func:`tfaccel.onnx.decoder_graph.native_refusal` allows): the step written directly as an ONNX graph from
  the model's weights with onnxruntime's fused attention (``GroupQueryAttention``), layer norms and rotary
  embedding (:mod:`tfaccel.onnx.decoder_graph`). gpt2-small: 200 nodes, written in seconds without TensorFlow
  or tf2onnx; the tied embedding stored once.
- ``keras-layers`` (every supported family): the step traced through the model's own keras-hub layers as a
  ``tf.function``, exported as a SavedModel into a temporary folder and converted with tf2onnx
  (:func:`convert_saved_model`): ~2,300 nodes for gpt2-small, plain ONNX ops (what TensorRT parses).

Inputs and outputs (``decoder.json`` says which cache layout, ``"cache"``):

    inputs   input_ids        int32 [batch, new]              the new tokens (the prompt, or one token)
             attention_mask   int32 [batch, past + new]       1 on positions a token may attend to
             keras-layers:  past_{i}        float [batch, 2, past, kv_heads, head_dim]
             native:        past_key_{i}, past_value_{i}   float [batch, kv_heads, past, head_dim]
    outputs  logits           float [batch, new, vocab]
             present_{i} / present_key_{i}, present_value_{i}: the same with past + new positions

Batch, ``new`` and ``past`` are dynamic. Prefill is the same graph with ``past = 0``. Positions start at
``past`` (right-padded prompts, as keras-hub's ``generate`` uses them). With the attention mask equal to
the padding mask and no past, ``logits`` equal the Keras model's forward pass at every position, so the
pipeline compares the decoder with the Keras model on its usual sample inputs.

In the traced graph each layer's cache is the past with ``new`` empty slots appended; the keras-hub layer
writes the new keys/values into them at index ``past`` (its own ``call_with_cache`` arithmetic, including
rotary positions and grouped KV heads), so the decoder computes what keras-hub's ``generate`` computes.
The native graph computes the same arithmetic with onnxruntime's kernels; tests check both token for token
against keras-hub's ``generate``.

The folder written holds ``decoder.onnx`` and ``decoder.json`` (the layout: layers, KV heads, head size,
vocabulary, maximum length, dtype, cache layout, and which ``graph``), which the generation runner
(:mod:`tfaccel.generation`) reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tfaccel.errors import SourceError, StepError

DECODER_FILE = "decoder.onnx"
LAYOUT_FILE = "decoder.json"
LAYOUT_FORMAT = "tfaccel-onnx-decoder/1"

# keras-hub CausalLM classes whose call_with_cache is "embed -> decoder layers with a per-layer cache ->
# layer_norm -> reverse token embedding"; the value says how tokens are embedded.
_FAMILIES = {
    "GPT2CausalLM": "token+position",
    "LlamaCausalLM": "token",
    "Llama3CausalLM": "token",
    "MistralCausalLM": "token",
    "QwenCausalLM": "token",
}


@dataclasses.dataclass(frozen=True)
class DecoderLayout:
    """What a runner needs to know to drive an exported decoder.

    Attributes:
        family: the keras-hub class name (``GPT2CausalLM``, ``LlamaCausalLM``...).
        num_layers: decoder layers, one ``past_{i}`` / ``present_{i}`` pair each.
        num_kv_heads: key/value heads (fewer than the query heads for grouped-query attention).
        head_dim: size of one head.
        vocabulary_size: logits width; prompt ids must be in ``[0, vocabulary_size)``.
        max_length: the model's longest sequence (prompt + new tokens), None if unbounded (rotary).
        dtype: the cache dtype (``float32``, or ``float16`` for an fp16 graph).
        cache: ``"stacked"``: one ``past_{i}`` ``[batch, 2, past, kv_heads, head_dim]`` per layer (the graphs
            traced from TensorFlow); ``"bnsh"``: ``past_key_{i}`` and ``past_value_{i}``
            ``[batch, kv_heads, past, head_dim]`` (the native graphs of :mod:`tfaccel.onnx.decoder_graph`).
    """

    family: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocabulary_size: int
    max_length: int | None
    dtype: str = "float32"
    cache: str = "stacked"

    def past_names(self) -> list[str]:
        if self.cache == "bnsh":
            return [f"past_{kv}_{i}" for i in range(self.num_layers) for kv in ("key", "value")]
        return [f"past_{i}" for i in range(self.num_layers)]

    def present_names(self) -> list[str]:
        return [n.replace("past_", "present_", 1) for n in self.past_names()]

    def past_shape(self, batch: int, length: int = 0) -> tuple[int, ...]:
        """The shape of each past tensor for ``batch`` rows and ``length`` positions."""
        if self.cache == "bnsh":
            return (batch, self.num_kv_heads, length, self.head_dim)
        return (batch, 2, length, self.num_kv_heads, self.head_dim)

    @property
    def past_axis(self) -> int:
        """The axis of a past tensor that grows by one per decoded token."""
        return 2

    def to_dict(self) -> dict[str, Any]:
        return {"format": LAYOUT_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderLayout:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def decoder_layout(causal_lm) -> DecoderLayout:
    """The cache layout of a supported keras-hub CausalLM (read by :func:`tfaccel.causal_lm_spec.causal_lm_spec`,
    the one place that knows each family's cache).

    Raises:
        StepError: the model is not a CausalLM family this export knows.
    """
    from tfaccel.causal_lm_spec import causal_lm_spec

    family = type(causal_lm).__name__
    if family not in _FAMILIES or not hasattr(causal_lm, "call_with_cache"):
        raise StepError(f"The ONNX decoder export supports the keras-hub CausalLM classes {', '.join(_FAMILIES)}. "
                        f"Received: {family}. Use the 'generate' step (SavedModel) for other models.")
    spec = causal_lm_spec(causal_lm)
    if spec.refusal:
        raise StepError(spec.refusal)
    return DecoderLayout(family=family, num_layers=int(spec.num_layers), num_kv_heads=int(spec.num_kv_heads),
                         head_dim=int(spec.head_dim), vocabulary_size=int(causal_lm.backbone.vocabulary_size),
                         max_length=spec.max_length, dtype=spec.cache_dtype)


# The token embedding and the LM head enter the traced graph as inputs and become ONNX initializers after
# conversion: tf2onnx 1.17 with TF 2.21 peaks at ~16 GB on one 50257 x 768 constant (measured: a Gather plus a
# MatMul on it), which no 2-core, 24 GiB machine here survives; the transformer's own matrices are small.
EMBEDDING_INPUT = "tfaccel_token_embedding"
LM_HEAD_INPUT = "tfaccel_lm_head"


def make_decoder_step(causal_lm, external_embeddings: bool = False):
    """The decode step as a function of a dict of tensors (see the module docstring), and its signature.

    Args:
        causal_lm: a supported keras-hub CausalLM.
        external_embeddings: take the token embedding ``[vocab, hidden]`` and the LM head ``[hidden, vocab]``
            as inputs (``EMBEDDING_INPUT``, ``LM_HEAD_INPUT``) instead of reading the model's variables.

    Returns:
        (fn, input_signature): ``fn(inputs) -> {"logits": ..., "present_0": ..., ...}``.

    Example:
        >>> fn, sig = make_decoder_step(gpt2_causal_lm)  # doctest: +SKIP
        >>> out = tf.function(fn, input_signature=sig)({"input_ids": ids, "attention_mask": mask, **pasts})  # doctest: +SKIP
    """
    import tensorflow as tf

    layout = decoder_layout(causal_lm)
    bb = causal_lm.backbone
    dtype = tf.as_dtype(layout.dtype)
    embed = _FAMILIES[layout.family]
    emb_layer = bb.token_embedding

    def lookup(ids, inputs):
        if not external_embeddings:
            return emb_layer(ids)
        return tf.cast(tf.gather(inputs[EMBEDDING_INPUT], ids), dtype)

    def lm_head(x, inputs):
        if not external_embeddings:
            return emb_layer(x, reverse=True)
        kernel = inputs[LM_HEAD_INPUT]
        if emb_layer.reverse_dtype is not None:
            x, kernel = tf.cast(x, emb_layer.reverse_dtype), tf.cast(kernel, emb_layer.reverse_dtype)
        logits = tf.matmul(x, tf.cast(kernel, x.dtype))
        if emb_layer.logit_soft_cap is not None:
            logits = tf.tanh(logits / emb_layer.logit_soft_cap) * emb_layer.logit_soft_cap
        return logits

    def step(inputs):
        ids = inputs["input_ids"]
        mask = inputs["attention_mask"]
        batch, new = tf.shape(ids)[0], tf.shape(ids)[1]
        past_len = tf.shape(inputs["past_0"])[2]
        total = past_len + new
        x = lookup(ids, inputs)
        if embed == "token+position":
            positions = bb.position_embedding(x, start_index=past_len)
            x = bb.embeddings_add((x, positions))
        # [batch, new, past + new]: which positions each new token may see (the layer adds the causal part)
        attn = tf.broadcast_to(tf.cast(mask, tf.int32)[:, None, :], tf.stack([batch, new, total]))
        empty = tf.zeros(tf.stack([batch, 2, new, layout.num_kv_heads, layout.head_dim]), dtype)
        out = {}
        for i, layer in enumerate(bb.transformer_layers):
            cache = tf.concat([inputs[f"past_{i}"], empty], axis=2)
            x, cache = layer(x, decoder_attention_mask=attn, self_attention_cache=cache,
                             self_attention_cache_update_index=past_len)
            out[f"present_{i}"] = tf.identity(cache, name=f"present_{i}")
        x = bb.layer_norm(x)
        out["logits"] = tf.cast(lm_head(x, inputs), tf.float32)
        return out

    sig = {"input_ids": tf.TensorSpec([None, None], tf.int32, name="input_ids"),
           "attention_mask": tf.TensorSpec([None, None], tf.int32, name="attention_mask")}
    for name in layout.past_names():
        sig[name] = tf.TensorSpec([None, 2, None, layout.num_kv_heads, layout.head_dim], dtype, name=name)
    if external_embeddings:
        # shapes only (the arrays are read once, by export_decoder): table [vocab, hidden], head [hidden, vocab]
        table = emb_layer.embeddings
        head_dtype = table.dtype if emb_layer.tie_weights else emb_layer.reverse_embeddings.dtype
        vocab, width = (int(d) for d in table.shape)
        sig[EMBEDDING_INPUT] = tf.TensorSpec([vocab, width], tf.as_dtype(table.dtype), name=EMBEDDING_INPUT)
        sig[LM_HEAD_INPUT] = tf.TensorSpec([width, vocab], tf.as_dtype(head_dtype), name=LM_HEAD_INPUT)
    return step, [sig]


def embedding_weights(causal_lm):
    """(token embedding ``[vocab, hidden]``, LM head ``[hidden, vocab]``) as numpy arrays."""
    import numpy as np

    layer = causal_lm.backbone.token_embedding
    table = np.asarray(layer.embeddings)
    head = table.T if layer.tie_weights else np.asarray(layer.reverse_embeddings)
    return table, np.ascontiguousarray(head)


def _attach_initializers(onnx_path: Path, values: dict[str, Any]) -> None:
    """Turn inputs of a converted decoder into initializers holding ``values`` (name -> numpy array)."""
    import onnx
    from onnx import numpy_helper

    from tfaccel.core.files import atomic_file

    model = onnx.load(str(onnx_path))
    graph = model.graph
    missing = set(values) - {i.name for i in graph.input}
    if missing:
        raise StepError(f"The converted decoder has no inputs {sorted(missing)[:5]}; tf2onnx renamed them.")
    keep = [i for i in graph.input if i.name not in values]
    del graph.input[:]
    graph.input.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in values.items())
    with atomic_file(onnx_path) as tmp:
        onnx.save(model, str(tmp))


@contextlib.contextmanager
def _onnx_friendly_slice_update():
    """While tracing: keras ``ops.slice_update`` as slices + concat instead of ``XlaDynamicUpdateSlice``,
    which tf2onnx 1.17 cannot convert. keras-hub's attention layers call it with one non-zero start (the
    cache index along the sequence axis); other calls keep the original op."""
    import tensorflow as tf
    from keras.src import backend

    core = backend.core
    original = core.slice_update

    def slice_update(inputs, start_indices, updates):
        moving = [a for a, s in enumerate(start_indices) if not (isinstance(s, int) and s == 0)]
        if len(moving) != 1:
            return original(inputs, start_indices, updates)
        axis = moving[0]
        inputs, updates = tf.convert_to_tensor(inputs), tf.convert_to_tensor(updates)
        start = tf.cast(start_indices[axis], tf.int32)
        end = start + tf.shape(updates)[axis]
        size = tf.shape(inputs)[axis]
        rank = len(inputs.shape)
        begin0, begin1 = [0] * rank, [0] * rank
        len0, len1 = [-1] * rank, [-1] * rank
        len0[axis] = start
        begin1[axis] = end
        len1[axis] = size - end
        head = tf.slice(inputs, tf.stack(begin0), tf.stack(len0))
        tail = tf.slice(inputs, tf.stack(begin1), tf.stack(len1))
        return tf.concat([head, tf.cast(updates, inputs.dtype), tail], axis=axis)

    core.slice_update = slice_update
    try:
        yield
    finally:
        core.slice_update = original


NATIVE = "native"
GRAPHS = ("auto", NATIVE, "keras-layers")


def resolve_graph(causal_lm, graph: str = "auto") -> tuple[str, str | None]:
    """The decoder graph :func:`export_decoder` writes for ``graph`` (one of :data:`GRAPHS`), and why the
    native graph does not cover this model (None when it does).

    Raises:
        StepError: an unknown ``graph``, or ``native`` for a model it does not cover (the reason).
    """
    from tfaccel.onnx.decoder_graph import native_refusal

    if graph not in GRAPHS:
        raise StepError(f"graph must be one of {', '.join(GRAPHS)}. Received: graph={graph!r}")
    refusal = native_refusal(causal_lm)
    if graph == NATIVE and refusal:
        raise StepError(f"The native decoder graph does not cover this model: {refusal}. "
                        "Use graph='auto' (or 'keras-layers').")
    if graph == "auto":
        graph = NATIVE if refusal is None else "keras-layers"
    return graph, refusal


#: Above this many bytes of weights a decoder's initializers go to ``decoder.onnx.data`` (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000


def save_decoder_model(model, path: str | os.PathLike) -> None:
    """Write an ONNX decoder so it appears only when complete; past :data:`EXTERNAL_DATA_BYTES` of weights the
    initializers go to ``<name>.data`` beside it (protobuf cannot hold more than 2 GB)."""
    import onnx

    path = Path(path)
    size = sum(len(i.raw_data) for i in model.graph.initializer)
    tmp = Path(tempfile.mkdtemp(prefix=".decoder-", dir=path.parent))
    try:
        if size <= EXTERNAL_DATA_BYTES:
            onnx.save(model, str(tmp / path.name))
        else:
            onnx.save(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=path.name + ".data", size_threshold=1024)
            os.replace(tmp / (path.name + ".data"), path.with_name(path.name + ".data"))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_decoder(causal_lm, folder: str | os.PathLike, *, opset: int = 17, graph: str = "auto",
                   log=None) -> DecoderLayout:
    """Write ``folder/decoder.onnx`` and ``folder/decoder.json`` for a keras-hub CausalLM.

    Args:
        causal_lm: a keras-hub CausalLM (GPT-2, Llama, Llama 3, Mistral, Qwen).
        folder: where to write (created if missing); the files appear only when complete.
        opset: ONNX opset (17 or later for the native graph).
        graph: ``"native"`` (the step written directly in ONNX with onnxruntime's fused attention and norms,
            :mod:`tfaccel.onnx.decoder_graph`: GPT-2 and the Llama class, no TensorFlow conversion),
            ``"keras-layers"`` (the step traced through keras-hub's own layers and converted by tf2onnx: every
            supported family, and the graph TensorRT can parse), or ``"auto"``: native where
            :func:`tfaccel.onnx.decoder_graph.native_refusal` allows.
        log: optional progress callable.

    Returns:
        The decoder's cache layout.

    Raises:
        StepError: an unsupported model or graph, or tf2onnx failed (the message names the ops).

    Example:
        >>> layout = export_decoder(gpt2_causal_lm, "gpt2-decoder")  # doctest: +SKIP
        >>> layout.num_layers  # doctest: +SKIP
        12
    """
    import tensorflow as tf

    from tfaccel.core.artifact import output_names_of

    layout = decoder_layout(causal_lm)
    graph, _ = resolve_graph(causal_lm, graph)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = output_names_of(causal_lm) or ["logits"]
    if graph == NATIVE:
        from tfaccel.onnx.decoder_graph import build_native_decoder

        if log:
            log(f"  writing the {layout.family} decode step as an ONNX graph ({layout.num_layers} layers, native)")
        model, layout = build_native_decoder(causal_lm, layout, opset=max(opset, 17))
        save_decoder_model(model, folder / DECODER_FILE)
        write_layout(folder, layout, output_name=names[0], onnx_file=DECODER_FILE, opset=max(opset, 17),
                     graph=graph)
        return layout
    from tfaccel.onnx.onnx_convert import convert_saved_model
    from tfaccel.saved_model import write_keras_endpoints

    tmp = Path(tempfile.mkdtemp(prefix=".decoder-savedmodel-", dir=folder))
    # Saving traces again every tf.function the tracked model holds: keras-hub's compiled generate function
    # would be retraced under the slice_update patch (and cached so). Keep it out of the export.
    generate_function = getattr(causal_lm, "generate_function", None)
    causal_lm.generate_function = None
    try:
        step, sig = make_decoder_step(causal_lm, external_embeddings=True)
        table, head = embedding_weights(causal_lm)
        weights = {EMBEDDING_INPUT: table, LM_HEAD_INPUT: head}
        with _onnx_friendly_slice_update():  # each weight stored once: tf2onnx's memory peak halves
            write_keras_endpoints(causal_lm, tmp / "saved_model",
                                  {"serving_default": tf.function(step, input_signature=sig)})
        if log:
            log(f"  tf2onnx: converting the {layout.family} decode step ({layout.num_layers} layers, {graph} graph)")
        convert_saved_model(tmp / "saved_model", folder / DECODER_FILE, opset=opset, log=None)
        _attach_initializers(folder / DECODER_FILE, weights)
    finally:
        causal_lm.generate_function = generate_function
        shutil.rmtree(tmp, ignore_errors=True)
    write_layout(folder, layout, output_name=names[0], onnx_file=DECODER_FILE, opset=opset, graph=graph)
    return layout


def write_layout(folder: str | os.PathLike, layout: DecoderLayout, **extra) -> None:
    """Write ``decoder.json`` atomically (the layout plus ``extra`` facts such as the quantization)."""
    from tfaccel.core.files import atomic_file

    with atomic_file(Path(folder) / LAYOUT_FILE) as tmp:
        tmp.write_text(json.dumps({**layout.to_dict(), **extra}, indent=2))


def read_layout(folder: str | os.PathLike) -> tuple[DecoderLayout, dict[str, Any]]:
    """The layout and the whole ``decoder.json`` of a decoder folder."""
    from tfaccel.core.files import read_json_file

    d = read_json_file(Path(folder) / LAYOUT_FILE, "the decoder layout")
    try:
        return DecoderLayout.from_dict(d), d
    except TypeError as exc:  # a field missing
        raise SourceError(f"The decoder layout {str(Path(folder) / LAYOUT_FILE)!r} is incomplete ({exc}). Write the "
                          "decoder folder again with the onnx-decoder step.") from exc
