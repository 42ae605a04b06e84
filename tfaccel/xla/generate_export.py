"""A SavedModel that generates text with a keras-hub CausalLM by itself: the whole decode loop, with a KV cache, runs
inside one TensorFlow function (a ``tf.while_loop``), so TF Serving or a plain ``tf.saved_model.load``
user generates without Python loops and without tfaccel or keras-hub.

Every keras-hub CausalLM family that :func:`tfaccel.causal_lm_spec.causal_lm_spec` knows works (GPT-2,
GPT-NeoX, OPT, Llama/Llama3, Mistral, Gemma/Gemma3 text, Qwen/Qwen3, Phi-3, Falcon, Bloom, SmolLM3): the
spec gives each family's cache layout (grouped KV heads, head size) and length limit, and the loop calls
the family's own ``call_with_cache``, so rotary/ALiBi positions, sliding windows and soft-capping are
keras-hub's. Greedy output is token-identical to keras-hub's ``generate`` (tests/test_generate.py).

The loop is XLA-compiled where that is faster. Measured on this project's 2-core AMD EPYC (Zen 5) CPU,
gpt2-small, batch 1, one process (2026-11-22): one single-token decode step takes 129 ms under XLA and
69 ms as a plain graph (XLA's CPU code for batch-1 matrix-vector products is slower than TensorFlow's
oneDNN kernels), so ``jit_compile="auto"`` compiles with XLA only when a GPU is visible. On the 2-core Intel
Xeon with AMX (2026-12-01, interleaved with keras-hub's ``generate``, load 5-6): graph mode 1.01-1.10x
keras-hub, XLA 0.61x, Keras int8 weights 0.87x, bfloat16 weights 0.94x. GPT-2's step written in plain
TensorFlow ops (the ONNX decoder's former ``gpt2-native`` graph, which onnxruntime ran 1.4x faster than the traced
one) took as long in TensorFlow as keras-hub's own step (129 vs 128 ms at past length 32, same process, load
~3): TensorFlow's per-op overhead is not what limits the loop, its batch-1 matrix-vector kernels are. The loop
computes what keras-hub's ``generate`` computes, and TensorFlow's CPU kernels do not turn fewer weight bytes or
fewer ops into a faster batch-1 step, so on CPUs the ONNX decoders (:mod:`tfaccel.onnx.decoder_export`) are
the faster route.

Signatures:
    serving_default(token_ids, padding_mask) -> logits                 (the forward pass, for validation)
    generate_greedy(token_ids, padding_mask, max_new_tokens, stop_token_id) -> token_ids, lengths
    generate(token_ids, padding_mask, max_new_tokens, stop_token_id, top_k, top_p, temperature, seed)
        -> token_ids, lengths

Prompts are right-padded (``padding_mask`` 1 on real tokens). Each row gets up to ``max_new_tokens``
tokens after its own prompt and stops after emitting ``stop_token_id`` (-1: never). The output
``token_ids`` is ``[batch, prompt_width + max_new_tokens]`` with 0 after each row's end; ``lengths`` is
each row's final length. ``top_k = 0`` and ``top_p = 1`` mean greedy; otherwise tokens are sampled at
``temperature`` from the top-k / nucleus set, reproducibly for a given ``seed``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from tfaccel.core.artifact import graph_function, normalize_outputs, output_names_of
from tfaccel.errors import PlanError
from tfaccel.xla.xla_export import validate_buckets

DEFAULT_PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512)
#: Written beside the graph: the export's limits (vocabulary size, maximum length, buckets, cap).
GENERATE_INFO_FILE = "assets.extra/tfaccel_generate.json"
DEFAULT_MAX_NEW_TOKENS_CAP = 128


def _sample(tf, logits, top_k, top_p, temperature, seed, step):
    """One token per row from float32 logits [B, V]: greedy, or top-k / top-p sampling."""
    greedy = tf.cast(tf.argmax(logits, axis=-1), tf.int32)

    def sampled():
        vocab = tf.shape(logits)[1]
        scaled = logits / tf.maximum(temperature, 1e-6)
        sorted_desc = tf.sort(scaled, axis=-1, direction="DESCENDING")
        k = tf.where(top_k > 0, tf.minimum(top_k, vocab), vocab)
        rank = tf.range(vocab)[None, :]
        sorted_desc = tf.where(rank < k, sorted_desc, -1e9)  # top-k
        probs = tf.nn.softmax(sorted_desc, axis=-1)
        before = tf.cumsum(probs, axis=-1, exclusive=True)
        # nucleus: the smallest prefix reaching top_p, inside the top-k (rank < k: float rounding can leave the
        # cumulative sum just under 1.0 and would otherwise re-admit the whole vocabulary)
        keep = ((before < top_p) & (rank < k)) | (rank == 0)
        threshold = tf.reduce_min(tf.where(keep, sorted_desc, 1e9), axis=-1, keepdims=True)
        masked = tf.where(scaled >= threshold, scaled, -1e9)
        draw = tf.random.stateless_categorical(masked, 1, seed=tf.stack([seed, step]), dtype=tf.int32)
        return draw[:, 0]

    return tf.cond((top_k > 0) | (top_p < 1.0), sampled, lambda: greedy)


def resolve_jit_compile(jit_compile) -> bool:
    """``"auto"``: XLA when a GPU is visible (faster there), graph mode on CPUs (measured faster here)."""
    if jit_compile == "auto":
        from tfaccel.compat import gpu_devices

        return bool(gpu_devices())
    if not isinstance(jit_compile, bool):
        raise ValueError(f"jit_compile must be True, False or 'auto'. Received: jit_compile={jit_compile!r}")
    return jit_compile


def resolve_generate_limits(spec, max_new_tokens_cap: int | None,
                            prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS) -> tuple[int, tuple[int, ...]]:
    """The cap on new tokens and the prompt buckets that fit the model's maximum length.

    ``max_new_tokens_cap=None`` picks ``min(128, max_length - b)`` with ``b`` the largest bucket of at
    most half the maximum length (so that prompts of up to ``b`` tokens still get that many new
    tokens); a model without a length limit (rotary, ALiBi) gets 128. Buckets that do not leave room
    for the cap are dropped.

    Raises:
        PlanError: the cap cannot fit, or no bucket fits with it; the message names the model's
            maximum length and the fix.
    """
    buckets = validate_buckets(prompt_buckets)
    max_len = spec.max_length
    if max_new_tokens_cap is None:
        if max_len is None:
            max_new_tokens_cap = DEFAULT_MAX_NEW_TOKENS_CAP
        else:
            half = [b for b in buckets if b <= max_len // 2] or [b for b in buckets if b < max_len]
            if not half:
                raise PlanError(f"No prompt bucket of {list(buckets)} is shorter than the maximum length {max_len} "
                                f"of this {spec.family} model. Pass smaller prompt_buckets.")
            max_new_tokens_cap = min(DEFAULT_MAX_NEW_TOKENS_CAP, max_len - max(half))
    if isinstance(max_new_tokens_cap, bool) or not isinstance(max_new_tokens_cap, int) or max_new_tokens_cap < 1:
        raise PlanError(f"max_new_tokens_cap must be a positive int. Received: max_new_tokens_cap={max_new_tokens_cap!r}")
    if max_len is not None:
        if max_new_tokens_cap >= max_len:
            raise PlanError(f"max_new_tokens_cap={max_new_tokens_cap} does not fit this {spec.family} model's maximum "
                            f"length of {max_len} tokens (prompt + new tokens). Pass max_new_tokens_cap below "
                            f"{max_len}, or leave it unset to get one that fits.")
        buckets = tuple(b for b in buckets if b + max_new_tokens_cap <= max_len)
        if not buckets:
            raise PlanError(f"No prompt bucket fits with max_new_tokens_cap={max_new_tokens_cap} under this "
                            f"{spec.family} model's maximum length {max_len}: lower max_new_tokens_cap or pass "
                            f"prompt_buckets of at most {max_len - max_new_tokens_cap}.")
    return max_new_tokens_cap, buckets


def make_decode_fn(causal_lm, prompt_len: int, max_new_cap: int, jit_compile: bool = True, spec=None):
    """The decode loop for prompts padded to ``prompt_len`` (static), as one tf.function."""
    import tensorflow as tf

    from tfaccel.causal_lm_spec import causal_lm_spec

    spec = spec or causal_lm_spec(causal_lm)
    total = prompt_len + max_new_cap

    @graph_function(jit_compile=jit_compile or None)
    def decode(token_ids, padding_mask, max_new_tokens, stop_token_id, top_k, top_p, temperature, seed):
        batch = tf.shape(token_ids)[0]
        ids = tf.pad(token_ids, [[0, 0], [0, max_new_cap]])
        lengths = tf.reduce_sum(tf.cast(padding_mask > 0, tf.int32), axis=1)
        cache = spec.empty_cache(batch, total)
        _, cache = spec.call_with_cache(token_ids, cache, 0)  # seed the cache with the prompt
        limit = lengths + max_new_tokens  # each row's end (exclusive)
        start = tf.maximum(tf.reduce_min(lengths), 1)
        end = tf.minimum(tf.reduce_max(limit), total)
        positions = tf.range(total)[None, :]

        def cond(i, ids, cache, done):
            return (i < end) & tf.logical_not(tf.reduce_all(done | (i >= limit)))

        def body(i, ids, cache, done):
            prev = tf.slice(ids, [0, i - 1], [batch, 1])
            # keras-hub's Gemma3 generate keeps seeded prompt entries (cache_update_mask); others rewrite them
            update = (i - 1 >= lengths)[:, None]
            logits, new_cache = spec.call_with_cache(prev, cache, i - 1, update_mask=update)
            nxt = _sample(tf, tf.cast(logits[:, 0, :], tf.float32), top_k, top_p, temperature, seed, i)
            active = (i >= lengths) & (i < limit) & tf.logical_not(done)
            current = tf.slice(ids, [0, i], [batch, 1])[:, 0]
            token = tf.where(active, nxt, current)
            new_ids = tf.where(positions == i, token[:, None], ids)
            new_done = done | (active & (nxt == stop_token_id))
            new_ids.set_shape(ids.shape)  # keep loop shapes static outside XLA too
            new_done.set_shape(done.shape)
            new_cache.set_shape(cache.shape)
            return i + 1, new_ids, new_cache, new_done

        done0 = tf.zeros([batch], tf.bool)
        _, ids, _, _ = tf.while_loop(cond, body, (start, ids, cache, done0), maximum_iterations=max_new_cap + prompt_len)
        written = (positions < limit[:, None]) & (positions >= lengths[:, None])
        # a row's length: its prompt plus tokens written up to and including a stop token
        is_stop = written & (ids == stop_token_id)
        first_stop = tf.reduce_min(tf.where(is_stop, positions, total), axis=1)
        out_len = tf.minimum(tf.minimum(limit, first_stop + 1), total)
        ids = tf.where(positions < out_len[:, None], ids, 0)
        return ids, out_len

    return decode


def write_generate_saved_model(causal_lm, folder: str | os.PathLike, *, max_new_tokens_cap: int | None = None,
                               prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS,
                               jit_compile: bool | str = "auto") -> dict:
    """Write a SavedModel with ``serving_default``, ``generate`` and ``generate_greedy`` signatures.

    Args:
        causal_lm: a keras-hub CausalLM (any family :func:`tfaccel.causal_lm_spec.causal_lm_spec` supports).
        folder: empty or absent folder.
        max_new_tokens_cap: the largest ``max_new_tokens`` a caller may ask for (sizes the KV cache).
            None: what fits the model (see :func:`resolve_generate_limits`).
        prompt_buckets: prompt widths are padded to these, so XLA compiles once per (batch, bucket).
        jit_compile: XLA-compile the decode loop: True, False or "auto" (XLA when a GPU is visible).

    Returns:
        What was set up: family, buckets, the cap, the maximum length and the vocabulary size (also
        written to ``assets.extra/tfaccel_generate.json`` in ``folder``).

    Raises:
        PlanError: the model's family cannot be exported (the reason), or the cap does not fit.

    Example:
        >>> write_generate_saved_model(gpt2_causal_lm, "gpt2-generate")  # doctest: +SKIP
        >>> gen = tf.saved_model.load("gpt2-generate").signatures["generate_greedy"]  # doctest: +SKIP
        >>> gen(token_ids=ids, padding_mask=mask, max_new_tokens=tf.constant(64), stop_token_id=tf.constant(50256))  # doctest: +SKIP
    """
    import tensorflow as tf

    from tfaccel.causal_lm_spec import causal_lm_spec

    spec = causal_lm_spec(causal_lm)
    if spec.refusal:
        raise PlanError(spec.refusal)
    max_new_tokens_cap, buckets = resolve_generate_limits(spec, max_new_tokens_cap, prompt_buckets)
    jit = resolve_jit_compile(jit_compile)
    decoders = {b: make_decode_fn(causal_lm, b, max_new_tokens_cap, jit, spec=spec) for b in buckets}

    vocab = int(causal_lm.backbone.vocabulary_size)

    def generate(token_ids, padding_mask, max_new_tokens, stop_token_id, top_k, top_p, temperature, seed):
        width = tf.shape(token_ids)[1]
        real = tf.boolean_mask(token_ids, padding_mask > 0)
        checks = [  # before any padding to a bucket uses the width, and before an id reaches the embedding
            tf.debugging.assert_less_equal(width, buckets[-1], message=(
                f"prompt is longer than the largest prompt bucket {buckets[-1]} of this export")),
            tf.debugging.assert_non_negative(real, message=f"token ids must be in [0, {vocab}) (the vocabulary)"),
            tf.debugging.assert_less(real, vocab, message=f"token ids must be in [0, {vocab}) (the vocabulary)"),
            tf.debugging.assert_less(stop_token_id, vocab, message=f"stop_token_id must be -1 or in [0, {vocab})"),
        ]
        with tf.control_dependencies(checks):
            width = tf.identity(width)
        max_new = tf.clip_by_value(max_new_tokens, 0, max_new_tokens_cap)
        mask = tf.cast(padding_mask, tf.int32)
        branches = []
        for b in buckets:
            def run(b=b):
                pad = [[0, 0], [0, b - width]]
                ids, lengths = decoders[b](tf.pad(token_ids, pad), tf.pad(mask, pad), max_new, stop_token_id,
                                           top_k, top_p, temperature, seed)
                return ids[:, : width + max_new], lengths
            branches.append(run)
        index = tf.reduce_sum(tf.cast(tf.constant(buckets) < width, tf.int32))
        ids, lengths = tf.switch_case(index, branches)
        return {"token_ids": ids, "lengths": lengths}

    ids_spec = tf.TensorSpec([None, None], tf.int32, name="token_ids")
    mask_spec = tf.TensorSpec([None, None], tf.int32, name="padding_mask")
    scalar = lambda name, dtype: tf.TensorSpec([], dtype, name=name)  # noqa: E731
    gen_sig = [ids_spec, mask_spec, scalar("max_new_tokens", tf.int32), scalar("stop_token_id", tf.int32),
               scalar("top_k", tf.int32), scalar("top_p", tf.float32), scalar("temperature", tf.float32),
               scalar("seed", tf.int32)]

    def generate_greedy(token_ids, padding_mask, max_new_tokens, stop_token_id):
        return generate(token_ids, padding_mask, max_new_tokens, stop_token_id, tf.constant(0), tf.constant(1.0),
                        tf.constant(1.0), tf.constant(0))

    names = output_names_of(causal_lm)

    def forward(inputs):
        return normalize_outputs(causal_lm(inputs, training=False), names)

    from tfaccel.saved_model import write_keras_endpoints

    write_keras_endpoints(causal_lm, folder, {  # each weight stored once (keras-team/keras#23553)
        "serving_default": graph_function(forward, input_signature=[{"token_ids": ids_spec, "padding_mask": mask_spec}]),
        "generate": graph_function(generate, input_signature=gen_sig),
        "generate_greedy": graph_function(generate_greedy, input_signature=gen_sig[:4]),
    })
    info = {"family": spec.family, "prompt_buckets": list(buckets), "max_new_tokens_cap": max_new_tokens_cap,
            "max_length": spec.max_length, "vocabulary_size": vocab, "jit_compile": jit}
    # What a caller must respect, beside the graph (TF Serving's place for extra files): tfaccel generate
    # checks token ids against it before calling (the graph's own assertions catch the rest).
    extra = Path(folder) / GENERATE_INFO_FILE
    extra.parent.mkdir(exist_ok=True)
    extra.write_text(json.dumps(info, indent=2))
    return info


def keras_hub_greedy(causal_lm, token_ids, padding_mask, max_new_tokens: int):
    """keras-hub's own greedy ``generate`` on right-padded prompts, cut to each row's prompt + max_new_tokens."""
    import numpy as np
    from keras_hub.samplers import GreedySampler

    if not isinstance(getattr(causal_lm, "sampler", None), GreedySampler):
        causal_lm.compile(sampler="greedy")  # compiling again would drop keras-hub's traced generate function
    ids = np.pad(token_ids, [[0, 0], [0, max_new_tokens]])
    mask = np.pad(padding_mask, [[0, 0], [0, max_new_tokens]]).astype(bool)
    inputs = {"token_ids": ids, "padding_mask": mask}
    if any(c.__name__ == "Gemma3CausalLM" for c in type(causal_lm).__mro__):
        # keras-hub 0.32's Gemma3CausalLM.generate fails on text-only models (it concatenates the
        # "images": None it returns); its compiled generate function, which generate() wraps, works.
        import tensorflow as tf

        fn = causal_lm.make_generate_function()
        out = np.asarray(fn({k: tf.constant(v) for k, v in inputs.items()}, stop_token_ids=None)["token_ids"])
    else:
        out = np.asarray(causal_lm.generate(inputs, stop_token_ids=None)["token_ids"])
    lengths = padding_mask.sum(1) + max_new_tokens
    return np.where(np.arange(out.shape[1])[None, :] < lengths[:, None], out, 0)
