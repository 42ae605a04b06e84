"""What a decode loop needs to know about a keras-hub CausalLM: its family, KV-cache layout, length
limit, and one ``call_with_cache`` step, read from the model the way keras-hub's own
``_build_cache`` reads it (not from GPT-2's attribute names).

keras-hub 0.32 families and their cache (``[batch, layers, 2, length, kv_heads, head_dim]`` unless noted):

| family | kv heads | head dim | max length |
|---|---|---|---|
| gpt2, gpt_neox, opt | ``num_heads`` | ``hidden_dim // num_heads`` | ``max_sequence_length`` |
| bloom | ``num_heads`` | ``hidden_dim // num_heads`` | None (ALiBi) |
| falcon | ``num_attention_heads`` | ``hidden_dim // num_attention_heads`` | None (ALiBi) |
| llama, llama3, qwen | ``num_key_value_heads`` (grouped) | ``hidden_dim // num_query_heads`` | None (rotary) |
| phi3 | ``num_key_value_heads`` | ``hidden_dim // num_query_heads`` | ``max_sequence_length`` |
| mistral | ``num_key_value_heads`` | ``head_dim or hidden_dim // num_query_heads`` | None (rotary, sliding window) |
| gemma, qwen3 | ``num_key_value_heads`` | ``head_dim`` | None (rotary) |
| gemma3 (text) | ``num_key_value_heads`` | ``head_dim`` | None; keras-hub keeps a tuple of (key, value) per layer |
| smollm3 | ``num_key_value_heads`` | ``hidden_dim // num_attention_heads`` | ``max_position_embeddings`` |

Sliding windows (Mistral, Gemma 2/3, Qwen), logit soft-capping (Gemma 2/3) and rotary/ALiBi positions
live inside each family's ``call_with_cache``; a spec only has to feed it the right cache and index.

The public API (stable; the ONNX decoder export builds on it):

    spec = causal_lm_spec(causal_lm)          # never raises for a keras-hub CausalLM
    if spec.refusal: raise PlanError(spec.refusal)
    cache = spec.empty_cache(batch, length)   # zeros, spec.cache_shape(batch, length), spec.cache_dtype
    logits, cache = spec.call_with_cache(token_ids, cache, index)               # seed with the prompt
    logits, cache = spec.call_with_cache(prev_token, cache, i - 1, update_mask)  # one decode step

The cache passed to and returned by ``spec.call_with_cache`` is always ONE stacked tensor
``[batch, num_layers, 2, length, num_kv_heads, head_dim]``; for Gemma3 (whose keras-hub cache is a tuple
of per-layer (key, value) tensors of ``[batch, length, kv_heads, head_dim]``) the spec converts
(``native_layout == "per_layer"``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

# keras-hub CausalLM class name -> family. Looked up along the class's MRO, so subclasses map to
# their keras-hub base (Llama3CausalLM is checked before its base LlamaCausalLM).
FAMILIES: dict[str, str] = {
    "GPT2CausalLM": "gpt2",
    "GPTNeoXCausalLM": "gpt_neox",
    "OPTCausalLM": "opt",
    "Llama3CausalLM": "llama3",
    "LlamaCausalLM": "llama",
    "MistralCausalLM": "mistral",
    "GemmaCausalLM": "gemma",
    "Gemma3CausalLM": "gemma3",
    "QwenCausalLM": "qwen",
    "Qwen3CausalLM": "qwen3",
    "Phi3CausalLM": "phi3",
    "FalconCausalLM": "falcon",
    "BloomCausalLM": "bloom",
    "SmolLM3CausalLM": "smollm3",
}


def _attr(backbone, name):
    value = getattr(backbone, name, None)
    if value is None:
        raise AttributeError(name)
    return int(value)


def _per_head(heads_attr):
    return lambda b: _attr(b, "hidden_dim") // _attr(b, heads_attr)


def _mistral_head_dim(b):
    head_dim = getattr(b, "head_dim", None)
    return int(head_dim) if head_dim else _attr(b, "hidden_dim") // _attr(b, "num_query_heads")


# family -> (kv heads, head dim, max length or None); each mirrors that family's _build_cache.
_LAYOUTS: dict[str, tuple[Callable, Callable, Callable]] = {
    "gpt2": (lambda b: _attr(b, "num_heads"), _per_head("num_heads"), lambda b: _attr(b, "max_sequence_length")),
    "gpt_neox": (lambda b: _attr(b, "num_heads"), _per_head("num_heads"), lambda b: _attr(b, "max_sequence_length")),
    "opt": (lambda b: _attr(b, "num_heads"), _per_head("num_heads"), lambda b: _attr(b, "max_sequence_length")),
    "bloom": (lambda b: _attr(b, "num_heads"), _per_head("num_heads"), lambda b: None),
    "falcon": (lambda b: _attr(b, "num_attention_heads"), _per_head("num_attention_heads"), lambda b: None),
    "llama": (lambda b: _attr(b, "num_key_value_heads"), _per_head("num_query_heads"), lambda b: None),
    "llama3": (lambda b: _attr(b, "num_key_value_heads"), _per_head("num_query_heads"), lambda b: None),
    "qwen": (lambda b: _attr(b, "num_key_value_heads"), _per_head("num_query_heads"), lambda b: None),
    "phi3": (lambda b: _attr(b, "num_key_value_heads"), _per_head("num_query_heads"),
             lambda b: _attr(b, "max_sequence_length")),
    "mistral": (lambda b: _attr(b, "num_key_value_heads"), _mistral_head_dim, lambda b: None),
    "gemma": (lambda b: _attr(b, "num_key_value_heads"), lambda b: _attr(b, "head_dim"), lambda b: None),
    "gemma3": (lambda b: _attr(b, "num_key_value_heads"), lambda b: _attr(b, "head_dim"), lambda b: None),
    "qwen3": (lambda b: _attr(b, "num_key_value_heads"), lambda b: _attr(b, "head_dim"), lambda b: None),
    "smollm3": (lambda b: _attr(b, "num_key_value_heads"), _per_head("num_attention_heads"),
                lambda b: _attr(b, "max_position_embeddings")),
}


@dataclasses.dataclass(frozen=True)
class CausalLMSpec:
    """How to drive one keras-hub CausalLM's KV-cache decoding.

    Attributes:
        family: keras-hub family ("gpt2", "llama", "gemma3", ...), or the class name when unknown.
        class_name: the model's class name.
        num_layers: transformer layers (one cache slot each).
        num_kv_heads: key/value heads per layer (fewer than query heads for grouped/multi-query attention).
        head_dim: size of one head.
        cache_dtype: the cache's dtype (the model's compute dtype, e.g. "float32", "bfloat16").
        max_length: the longest sequence (prompt + new tokens) the model supports; None when it has no
            fixed limit (rotary or ALiBi positions).
        native_layout: "stacked" (keras-hub's cache is the stacked tensor) or "per_layer" (Gemma3: a
            tuple of (key, value) per layer; :meth:`call_with_cache` converts).
        refusal: why tfaccel cannot export this model's decode loop, or None.
        model: the CausalLM (not compared, not shown).
    """

    family: str
    class_name: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    cache_dtype: str
    max_length: int | None
    native_layout: str = "stacked"
    refusal: str | None = None
    model: Any = dataclasses.field(default=None, compare=False, repr=False)

    def cache_shape(self, batch, length) -> tuple:
        """The stacked cache shape for ``batch`` rows of ``length`` positions (ints or scalar tensors)."""
        return (batch, self.num_layers, 2, length, self.num_kv_heads, self.head_dim)

    def empty_cache(self, batch, length):
        """A zero cache (a tf.Tensor) of :meth:`cache_shape` and :attr:`cache_dtype`."""
        import tensorflow as tf

        shape = tf.stack([tf.cast(d, tf.int32) for d in self.cache_shape(batch, length)])
        return tf.zeros(shape, dtype=self.cache_dtype)

    def call_with_cache(self, token_ids, cache, cache_update_index, update_mask=None):
        """Run the model on ``token_ids`` [batch, n] at positions ``cache_update_index ..`` with ``cache``.

        Args:
            token_ids: int tensor [batch, n] (the prompt when seeding at index 0, else one token).
            cache: the stacked cache tensor (see :meth:`cache_shape`).
            cache_update_index: int or scalar int tensor, the position of ``token_ids[:, 0]``.
            update_mask: optional bool [batch, n]: where False, keep the cache entry (Gemma3's
                ``cache_update_mask``: keras-hub's generate leaves prompt positions as seeded).
                Other families always write the cache, as their keras-hub generate does; it is ignored.

        Returns:
            (logits [batch, n, vocab], the updated stacked cache).
        """
        if self.refusal:
            from tfaccel.errors import PlanError

            raise PlanError(self.refusal)
        import tensorflow as tf

        lm = self.model
        # an int32 tensor for every family (SmolLM3's layers refuse a Python int beside tensor kwargs)
        cache_update_index = tf.convert_to_tensor(cache_update_index, dtype=tf.int32)
        if self.native_layout == "per_layer":
            from keras import ops

            native = tuple((cache[:, i, 0], cache[:, i, 1]) for i in range(self.num_layers))
            logits, _, native = lm.call_with_cache(token_ids=token_ids, cache=native,
                                                   cache_update_index=cache_update_index,
                                                   cache_update_mask=update_mask)
            cache = ops.stack([ops.stack([k, v], axis=1) for k, v in native], axis=1)
            return logits, cache
        logits, _, cache = lm.call_with_cache(token_ids, cache, cache_update_index)
        return logits, cache


def _family_of(causal_lm) -> tuple[str, str]:
    for cls in type(causal_lm).__mro__:
        if cls.__name__ in FAMILIES:
            return FAMILIES[cls.__name__], cls.__name__
    return "", type(causal_lm).__name__


def causal_lm_spec(causal_lm) -> CausalLMSpec:
    """Read a keras-hub CausalLM's cache layout and limits. Never raises for a model object: what
    tfaccel cannot drive comes back with ``refusal`` set to the reason (raise it as a PlanError).

    Args:
        causal_lm: a keras-hub CausalLM (GPT2CausalLM, LlamaCausalLM, Gemma3CausalLM, ...).

    Returns:
        A :class:`CausalLMSpec`.

    Example:
        >>> spec = causal_lm_spec(llama_causal_lm)  # doctest: +SKIP
        >>> spec.cache_shape(2, 40)  # doctest: +SKIP
        (2, 2, 2, 40, 1, 8)
    """
    name = type(causal_lm).__name__
    family, base = _family_of(causal_lm)
    backbone = getattr(causal_lm, "backbone", None)
    dtype = str(getattr(causal_lm, "compute_dtype", "float32"))
    supported = ", ".join(sorted(set(FAMILIES.values())))

    def refused(reason, **known):
        fields = dict(num_layers=0, num_kv_heads=0, head_dim=0, max_length=None)
        fields.update(known)
        return CausalLMSpec(family=family or name, class_name=name, cache_dtype=dtype, refusal=reason,
                            model=causal_lm, **fields)

    if not hasattr(causal_lm, "call_with_cache") or backbone is None:
        return refused(f"{name} has no call_with_cache() and backbone: the generate export needs a keras-hub "
                       f"CausalLM (families: {supported}).")
    if not family:
        return refused(f"{name} is a keras-hub model whose KV-cache layout tfaccel has not checked (its "
                       f"_build_cache may differ from the stacked [batch, layers, 2, length, heads, head_dim] "
                       f"layout). Supported families: {supported}.")
    kv_fn, head_fn, max_fn = _LAYOUTS[family]
    try:
        layers, kv, head, max_len = _attr(backbone, "num_layers"), kv_fn(backbone), head_fn(backbone), max_fn(backbone)
    except AttributeError as exc:
        return refused(f"{name}'s backbone {type(backbone).__name__} has no attribute {exc.args[0]!r}, which "
                       f"keras-hub's {base}._build_cache reads for the {family} cache; is it a modified backbone?")
    layout = "per_layer" if family == "gemma3" else "stacked"
    if family == "gemma3" and not getattr(backbone, "text_only_model", True):
        return refused(f"{name} has a vision encoder: tfaccel exports text-only Gemma3 decoding (the image "
                       "interleaving inputs are not part of the generate signature). Build the backbone with "
                       "vision_encoder=None.", num_layers=layers, num_kv_heads=kv, head_dim=head)
    return CausalLMSpec(family=family, class_name=name, num_layers=layers, num_kv_heads=kv, head_dim=head,
                        cache_dtype=dtype, max_length=max_len, native_layout=layout, model=causal_lm)
