"""Prompt checking for the generation runner: ragged lists or right-padded arrays -> right-padded int32."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tfaccel.errors import InputMismatchError


def prepare_prompts(prompt_ids, padding_mask=None, *, vocabulary_size: int | None = None,
                    max_length: int | None = None, max_new_tokens: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded ``(token_ids, padding_mask)``, int32, from prompts given as a user would.

    Args:
        prompt_ids: one prompt (a list of ints), several (a list of lists, lengths may differ), or a 2-D
            integer array of right-padded prompts (then ``padding_mask`` marks the real tokens; without it
            every position is real).
        padding_mask: 1 on real tokens, for a 2-D ``prompt_ids``.
        vocabulary_size: ids must be in ``[0, vocabulary_size)`` when given.
        max_length: the model's longest sequence; prompt width + ``max_new_tokens`` must fit.
        max_new_tokens: tokens to generate after each prompt.

    Raises:
        InputMismatchError: empty or non-integer prompts, ids outside the vocabulary, a mask of the
            wrong shape, or prompts too long for the model.

    Example:
        >>> ids, mask = prepare_prompts([[5, 6, 7], [8]])
        >>> ids.tolist(), mask.tolist()
        ([[5, 6, 7], [8, 0, 0]], [[1, 1, 1], [1, 0, 0]])
    """
    if isinstance(prompt_ids, np.ndarray) and prompt_ids.ndim == 2:
        ids = _as_int(prompt_ids)
        mask = np.ones_like(ids) if padding_mask is None else _as_int(np.asarray(padding_mask), "padding_mask")
        if mask.shape != ids.shape:
            raise InputMismatchError(f"padding_mask has shape {mask.shape}, prompt_ids {ids.shape}: they must match.")
        mask = (mask > 0).astype(np.int32)
        lengths = mask.sum(1)
        if np.any(mask != (np.arange(ids.shape[1])[None, :] < lengths[:, None])):
            raise InputMismatchError("padding_mask must mark a prefix of each row (right-padded prompts: 1s, then 0s).")
    else:
        rows = _rows(prompt_ids)
        lengths = np.array([len(r) for r in rows], dtype=np.int32)
        ids = np.zeros((len(rows), max(lengths)), dtype=np.int32)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = r
        mask = (np.arange(ids.shape[1])[None, :] < lengths[:, None]).astype(np.int32)
    if ids.shape[0] == 0 or ids.shape[1] == 0 or np.any(lengths == 0):
        raise InputMismatchError("Every prompt needs at least one token id. Received an empty prompt.")
    real = ids[mask > 0]
    if real.min() < 0 or (vocabulary_size is not None and real.max() >= vocabulary_size):
        bad = int(real.min()) if real.min() < 0 else int(real.max())
        where = f"the model's vocabulary [0, {vocabulary_size})" if vocabulary_size is not None else \
            "the vocabulary (token ids are >= 0)"
        raise InputMismatchError(f"Token id {bad} is outside {where}. Give ids from the model's tokenizer.")
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise InputMismatchError(f"max_new_tokens must be an int >= 0. Received: max_new_tokens={max_new_tokens!r}")
    if max_length is not None and ids.shape[1] + max_new_tokens > max_length:
        raise InputMismatchError(
            f"The prompt is {ids.shape[1]} tokens and {max_new_tokens} new tokens were asked for: "
            f"{ids.shape[1] + max_new_tokens} > the model's maximum length {max_length}. "
            f"Shorten the prompt or ask for at most {max(max_length - ids.shape[1], 0)} new tokens.")
    return ids.astype(np.int32), mask


def check_stop_token_id(stop_token_id, vocabulary_size: int | None) -> None:
    """Raise InputMismatchError unless ``stop_token_id`` is -1 (never stop) or an id of the vocabulary.

    Example:
        >>> check_stop_token_id(-1, 300)
    """
    if not isinstance(stop_token_id, (int, np.integer)) or isinstance(stop_token_id, bool):
        raise InputMismatchError(f"stop_token_id must be an int (-1: none). Received: stop_token_id={stop_token_id!r}")
    if stop_token_id < -1 or (vocabulary_size is not None and stop_token_id >= vocabulary_size):
        raise InputMismatchError(f"The stop token id {stop_token_id} is outside the model's vocabulary "
                                 f"[0, {vocabulary_size if vocabulary_size is not None else '...'}) (-1: never stop).")


def _as_int(a: np.ndarray, name: str = "prompt_ids") -> np.ndarray:
    if a.dtype == np.bool_ and name == "padding_mask":
        return a.astype(np.int32)
    if not np.issubdtype(a.dtype, np.integer):
        raise InputMismatchError(f"{name} must hold integer token ids. Received dtype {a.dtype}.")
    return a.astype(np.int64)


def _rows(prompt_ids) -> list[list[int]]:
    if isinstance(prompt_ids, np.ndarray):
        prompt_ids = prompt_ids.tolist() if prompt_ids.ndim <= 2 else None
    if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes)) or prompt_ids is None:
        raise InputMismatchError(f"prompt_ids must be a list of ints, a list of such lists or a 2-D integer array. "
                                 f"Received: {type(prompt_ids).__name__}.")
    rows = [prompt_ids] if all(_is_int(v) for v in prompt_ids) else list(prompt_ids)
    out = []
    for r in rows:
        if isinstance(r, np.ndarray):
            r = r.tolist()
        if not isinstance(r, Sequence) or isinstance(r, (str, bytes)) or not all(_is_int(v) for v in r):
            raise InputMismatchError(f"Prompt token ids must be integers. Received: {r!r}.")
        out.append([int(v) for v in r])
    return out


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def parse_prompt_ids(values: Sequence[str]) -> list[list[int]]:
    """Prompts from the command line: each value is one prompt, ids separated by commas ("1,2,3").

    Raises:
        InputMismatchError: an empty prompt or a value that is not an integer.

    Example:
        >>> parse_prompt_ids(["1,2,3", "4, 5"])
        [[1, 2, 3], [4, 5]]
    """
    rows = []
    for text in values:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        if not parts:
            raise InputMismatchError(f"--prompt-ids {text!r} has no token ids. Give comma-separated ints: 1,2,3.")
        try:
            rows.append([int(p) for p in parts])
        except ValueError:
            bad = next(p for p in parts if not p.lstrip("-").isdigit())
            raise InputMismatchError(f"--prompt-ids {text!r}: {bad!r} is not an integer token id. "
                                     "Give comma-separated ints: 1,2,3.") from None
    return rows
