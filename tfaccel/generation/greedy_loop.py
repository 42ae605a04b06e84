"""The greedy decode loop over a KV-cache decoder step, with generate_export's contract.

The contract (the same as the SavedModel's ``generate_greedy`` and keras-hub's ``generate``): prompts
are right-padded; all rows advance together from the shortest prompt, a row keeps its own prompt tokens
until its prompt ends, gets up to ``max_new_tokens`` after it and stops after emitting
``stop_token_id`` (-1: never). The output is ``[batch, prompt_width + max_new_tokens]`` with 0 after
each row's end, and ``lengths`` is each row's final length.

Like keras-hub, the cache holds every position of the padded batch, and a position is recomputed when
the loop reaches it (a row whose prompt is longer just re-feeds its own token), so no row ever attends
to padding and the attention mask is all ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass
class GenerationResult:
    """Token ids ``[batch, prompt_width + max_new_tokens]`` (0 after each row's end) and row lengths."""

    token_ids: np.ndarray
    lengths: np.ndarray
    steps: int = 0  # decoder calls, prefill included

    def new_tokens(self, prompt_lengths: np.ndarray) -> list[list[int]]:
        """Each row's generated ids (after its prompt, up to its length)."""
        return [self.token_ids[r, int(p): int(n)].tolist()
                for r, (p, n) in enumerate(zip(prompt_lengths, self.lengths, strict=True))]


def greedy_generate(prefill: Callable, decode: Callable, token_ids: np.ndarray, padding_mask: np.ndarray,
                    max_new_tokens: int, stop_token_id: int = -1) -> GenerationResult:
    """Greedy generation with a decoder that keeps its own cache state.

    Args:
        prefill: ``prefill(ids[batch, n]) -> logits of the last position [batch, vocab]``; starts a new cache.
        decode: ``decode(ids[batch, 1]) -> logits [batch, vocab]``; appends to the cache.
        token_ids, padding_mask: right-padded int32 prompts (see :func:`prepare_prompts`).
        max_new_tokens: tokens after each row's prompt.
        stop_token_id: a row ends after emitting it; -1 never stops early.
    """
    batch, width = token_ids.shape
    total = width + max_new_tokens
    ids = np.zeros((batch, total), dtype=np.int32)
    ids[:, :width] = token_ids
    lengths = padding_mask.sum(1).astype(np.int64)
    limit = lengths + max_new_tokens
    start = max(int(lengths.min()), 1)
    end = min(int(limit.max()), total)
    done = np.zeros(batch, dtype=bool)
    steps = 0
    i = start
    if i < end and not np.all(i >= limit):
        logits = prefill(ids[:, :start])
        steps += 1
        while True:
            nxt = np.argmax(logits, axis=-1).astype(np.int32)
            active = (i >= lengths) & (i < limit) & ~done
            ids[:, i] = np.where(active, nxt, ids[:, i])
            done |= active & (nxt == stop_token_id)
            i += 1
            if i >= end or np.all(done | (i >= limit)):
                break
            logits = decode(ids[:, i - 1: i])
            steps += 1
    positions = np.arange(total)[None, :]
    written = (positions < limit[:, None]) & (positions >= lengths[:, None])
    is_stop = written & (ids == stop_token_id)
    first_stop = np.where(is_stop, positions, total).min(axis=1)
    out_len = np.minimum(np.minimum(limit, first_stop + 1), total)
    ids = np.where(positions < out_len[:, None], ids, 0).astype(np.int32)
    return GenerationResult(token_ids=ids, lengths=out_len.astype(np.int32), steps=steps)
