"""How closely a generation artifact follows keras-hub's own greedy ``generate``: the checks the decoder
steps run and the benchmark reports."""

from __future__ import annotations

import numpy as np


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def token_agreement(want: np.ndarray, got: np.ndarray, prompt_lengths: np.ndarray, new_tokens: int) -> float:
    """Fraction of generated positions (each row's prompt end + ``new_tokens``) where the ids are equal.

    Free-running: after a first different token the two continuations usually differ, so this is the
    strict measure (what a user sees)."""
    width = min(want.shape[1], got.shape[1])
    pos = np.arange(width)[None, :]
    new = (pos >= prompt_lengths[:, None]) & (pos < prompt_lengths[:, None] + new_tokens)
    return float(np.mean(want[:, :width][new] == got[:, :width][new])) if new.any() else 1.0


def decoder_agreement(causal_lm, generator, token_ids: np.ndarray, padding_mask: np.ndarray,
                      new_tokens: int) -> dict:
    """Greedy agreement of a decoder generator with keras-hub's ``generate`` on right-padded prompts.

    Returns:
        ``token_agreement`` (free-running, position by position), ``next_token_agreement`` (teacher-forced:
        on keras-hub's own sequence, fed one decode step per token as greedy decoding runs, the share of
        generated positions where the decoder's argmax is keras-hub's token), ``next_token_cosine_min`` /
        ``_mean`` (cosine of the decoder's next-token logits with the Keras model's on that sequence), and ``first_difference`` (index of the first new
        token that differs in any row, None when all agree).
    """
    from tfaccel.xla.generate_export import keras_hub_greedy

    lengths = padding_mask.sum(1)
    want = keras_hub_greedy(causal_lm, token_ids, padding_mask, new_tokens)
    got = generator.generate(token_ids, new_tokens, -1, padding_mask=padding_mask).token_ids
    free = token_agreement(want, got, lengths, new_tokens)
    full_mask = (np.arange(want.shape[1])[None, :] < (lengths + new_tokens)[:, None]).astype(np.int32)
    # teacher-forced through decode steps, as greedy decoding runs (generators without steps: one forward pass)
    stepwise = getattr(generator, "stepwise_logits", None)
    start = max(int(lengths.min()), 1)
    dec_logits = stepwise(want, start) if stepwise else generator.logits(want, full_mask)
    ref_logits = np.asarray(causal_lm({"token_ids": want, "padding_mask": full_mask}, training=False))
    rows, cols = np.nonzero((np.arange(want.shape[1])[None, :] >= lengths[:, None]) & (full_mask > 0))
    pred_rows, pred_cols = rows, cols - 1  # logits at p-1 predict the token at p
    next_agree = float(np.mean(np.argmax(dec_logits[pred_rows, pred_cols], -1) == want[rows, cols]))
    cos = _cosines(dec_logits[pred_rows, pred_cols], ref_logits[pred_rows, pred_cols])
    diff = [int(c - lengths[r]) for r, c in zip(rows, cols, strict=True) if got[r, c] != want[r, c]]
    return {"token_agreement": free, "next_token_agreement": next_agree,
            "next_token_cosine_min": float(cos.min()), "next_token_cosine_mean": float(cos.mean()),
            "first_difference": min(diff) if diff else None, "prompts": int(len(token_ids)),
            "new_tokens": int(new_tokens),
            **logit_gap_stats(ref_logits[pred_rows, pred_cols], dec_logits[pred_rows, pred_cols])}


def logit_gap_stats(reference: np.ndarray, other: np.ndarray) -> dict:
    """Why greedy tokens flip: the reference's top-1 minus top-2 logit gap against how much ``other``
    moves that gap (``[positions, vocab]`` each).

    A position's argmax flips when the decoder's error on (top-1 - top-2) exceeds the reference's gap,
    so with near-tied top logits (random-weight models) even a small quantization error flips tokens.

    Returns:
        ``logit_gap_p05`` / ``logit_gap_p50``: percentiles of the reference's top-1 - top-2 gap;
        ``gap_error_p50``: median |change of that gap| in ``other``; ``gap_exceeded``: share of
        positions where the change is larger than the gap (the positions an argmax can flip at).
    """
    ref, oth = reference.astype(np.float64), other.astype(np.float64)
    order = np.argsort(ref, axis=-1)
    top1, top2 = order[:, -1:], order[:, -2:-1]
    gap = (np.take_along_axis(ref, top1, -1) - np.take_along_axis(ref, top2, -1))[:, 0]
    moved = (np.take_along_axis(oth, top1, -1) - np.take_along_axis(oth, top2, -1))[:, 0] - gap
    return {"logit_gap_p05": float(np.percentile(gap, 5)), "logit_gap_p50": float(np.median(gap)),
            "gap_error_p50": float(np.median(np.abs(moved))), "gap_exceeded": float(np.mean(np.abs(moved) > gap))}
