"""Held-out text for a language model: the user's file (``--eval-texts``), tokenized with the model's own
tokenizer and cut into windows, carried on the source as its eval split (``eval_inputs["token_ids"]``, no
labels) for :mod:`tfaccel.generation.quality` and as GPTQ / AWQ calibration text.

Files:

- ``.txt``: plain text, one document (the whole file).
- ``.jsonl``: one JSON object per line with a ``"text"`` key; each line is a document.
- ``.csv``: a header row with a ``text`` column; each row is a document.
- ``.npz``: already tokenized: a ``token_ids`` array ``[windows, width]`` (used as it is).

Documents are tokenized one by one and joined into one token stream, with the tokenizer's end token
between them where it has one (``<|endoftext|>`` for GPT-2, ``[SEP]`` for a WordPiece vocabulary), then cut
into windows of ``width`` tokens (the last partial window is dropped).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from tfaccel.errors import DataFileError

TEXT_FILE_SUFFIXES = (".txt", ".jsonl", ".csv")
DEFAULT_WINDOW = 128


def read_documents(path: str | os.PathLike, what: str = "--eval-texts") -> list[str]:
    """The documents of a text file (module docstring).

    Raises:
        DataFileError: a missing, empty, unreadable or wrongly formatted file (the message names it).

    Example:
        >>> read_documents("held_out.jsonl")  # doctest: +SKIP
        ['First article ...', 'Second article ...']
    """
    from tfaccel.core.eval_data import _read_texts

    p = Path(path)
    name = f"{what} {str(p)!r}"
    if p.suffix.lower() not in TEXT_FILE_SUFFIXES:
        raise DataFileError(f"{name}: unknown file type {p.suffix or '(no suffix)'!r}. For a language model pass "
                            "plain text (.txt), .jsonl / .csv with a 'text' key / column, or an .npz of token_ids.")
    if not p.is_file():
        raise DataFileError(f"{name} does not exist or is not a file. Check the path.")
    if p.suffix.lower() == ".txt":
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DataFileError(f"{name} cannot be read as UTF-8 text ({type(exc).__name__}: {exc}).") from exc
        docs = [text] if text.strip() else []
    else:
        if p.stat().st_size == 0:
            raise DataFileError(f"{name} is empty (0 bytes). Write the texts into it first.")
        docs, _ = _read_texts(p, name)
        docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataFileError(f"{name} holds no text. Write the held-out text into it.")
    return docs


def causal_lm_tokenizer(source):
    """The tokenizer of a causal LM source: the one attached to its keras-hub model, the one its source carries
    (``tokenizer`` / ``tokenizer_preset``), or the tokenizer saved in its preset / Hugging Face folder.

    Raises:
        DataFileError: the source has none (texts cannot be turned into its token ids).
    """
    pre = getattr(getattr(source, "model", None), "preprocessor", None)
    if getattr(pre, "tokenizer", None) is not None:
        return pre.tokenizer
    carried = getattr(source, "tokenizer", None)
    if carried is not None and not isinstance(carried, (str, os.PathLike)):
        return carried
    preset = carried or getattr(source, "tokenizer_preset", None)
    if preset is None and source.kind == "keras" and source.path and Path(source.path).is_dir():
        preset = source.path
    if preset is None:
        raise DataFileError(
            f"Texts need the model's tokenizer, and {source.name!r} has none (no keras-hub preprocessor, no preset "
            "folder). Load the model from its keras-hub preset / Hugging Face folder with its tokenizer, or tokenize "
            "the text yourself and pass the windows as an .npz with 'token_ids'.")
    import keras_hub

    try:
        return keras_hub.models.Tokenizer.from_preset(str(preset))
    except Exception as exc:
        raise DataFileError(f"Texts need the model's tokenizer, but keras-hub found none in {str(preset)!r} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from exc


def token_windows(documents: list[str], tokenizer, width: int = DEFAULT_WINDOW) -> np.ndarray:
    """Documents -> int32 ``[windows, width]``: tokenized, joined with the end token, cut into windows.

    Raises:
        DataFileError: the text is shorter than one window.

    Example:
        >>> token_windows(["a long article ..."], tokenizer, width=64).shape  # doctest: +SKIP
        (12, 64)
    """
    if isinstance(width, bool) or not isinstance(width, int) or width < 2:
        raise ValueError(f"width must be an int >= 2. Received: width={width!r}")
    end = getattr(tokenizer, "end_token_id", None)
    parts = []
    for start in range(0, len(documents), 64):
        for ids in tokenizer(documents[start: start + 64]):
            parts.append(np.asarray(ids, np.int32).reshape(-1))
            if end is not None:
                parts.append(np.array([end], np.int32))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int32)
    n = len(stream) // width
    if n == 0:
        raise DataFileError(f"The text is {len(stream)} tokens long, less than one window of {width}. Give more "
                            "held-out text (a few thousand tokens at least).")
    return stream[: n * width].reshape(n, width)


def load_windows(source, path: str | os.PathLike, width: int | None = None, what: str = "--eval-texts"):
    """Held-out windows ``[windows, width]`` for a causal LM source from a text file or an ``.npz`` of
    ``token_ids`` (module docstring), and a description for reports.

    Raises:
        DataFileError: the file cannot be used, the model has no tokenizer, or the source is no causal LM.
    """
    if source.task != "causal_lm":
        raise DataFileError(f"{what} {str(path)!r}: held-out text is for causal language models; {source.name!r} is "
                            f"a {source.task} model (for a classifier pass labelled texts with 'text' and 'label').")
    limit = source.max_sequence_length
    if Path(path).suffix.lower() == ".npz":
        windows = _npz_windows(path, what)
        desc = f"{path} ({len(windows)} windows of {windows.shape[1]} tokens)"
    else:
        docs = read_documents(path, what)
        width = width or (min(DEFAULT_WINDOW, limit) if limit else DEFAULT_WINDOW)
        windows = token_windows(docs, causal_lm_tokenizer(source), width)
        desc = f"{path} ({len(docs)} documents, {len(windows)} windows of {width} tokens)"
    vocab = source.vocab_size
    if vocab and (int(windows.max()) >= vocab or int(windows.min()) < 0):
        raise DataFileError(f"{what} {str(path)!r}: token ids range over [{int(windows.min())}, {int(windows.max())}], "
                            f"outside the model's vocabulary of {vocab}. The model and its tokenizer do not match.")
    if limit and windows.shape[1] > limit:
        raise DataFileError(f"{what} {str(path)!r}: windows of {windows.shape[1]} tokens, longer than the model's "
                            f"maximum length {limit}.")
    return windows, desc


def _npz_windows(path, what: str) -> np.ndarray:
    import zipfile

    p = Path(path)
    if not p.is_file() or not zipfile.is_zipfile(p):
        raise DataFileError(f"{what} {str(p)!r} is not a readable .npz. Save the windows with "
                            "np.savez(path, token_ids=windows).")
    with np.load(p, allow_pickle=False) as data:
        if "token_ids" not in data.files:
            raise DataFileError(f"{what} {str(p)!r} has no 'token_ids' array (it has {sorted(data.files)}). Save the "
                                "held-out windows as token_ids [windows, width].")
        ids = data["token_ids"]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] == 0 or ids.shape[1] < 2:
        raise DataFileError(f"{what} {str(p)!r}: 'token_ids' must be integer windows [windows, width >= 2]; it is "
                            f"{ids.dtype} {ids.shape}.")
    return ids.astype(np.int32)


def with_calibration_texts(source, path: str | os.PathLike, width: int | None = None):
    """A copy of a causal LM source whose GPTQ / AWQ calibration runs on the text in ``path`` (the formats of
    :func:`with_eval_texts`; carried as ``calibration_inputs``).

    Raises:
        DataFileError: as :func:`with_eval_texts`.
    """
    windows, desc = load_windows(source, path, width, what="--calibration-data")
    return dataclasses.replace(source, calibration_inputs={"token_ids": windows,
                                                           "padding_mask": np.ones_like(windows)},
                               data_files={**source.data_files, "calibration": desc})


def with_eval_texts(source, path: str | os.PathLike, width: int | None = None):
    """A copy of a causal LM source whose eval split is the held-out text in ``path`` (module docstring).

    Args:
        source: a causal LM :class:`tfaccel.sources.ModelSource` with a tokenizer (:func:`causal_lm_tokenizer`).
        path: ``.txt``, ``.jsonl``, ``.csv``, or an ``.npz`` of ``token_ids`` windows.
        width: tokens per window (default 128, or the model's maximum length if shorter).

    Raises:
        DataFileError: the file cannot be used, the model has no tokenizer, or the source is no causal LM.

    Example:
        >>> src = with_eval_texts(load_source("my-gpt2-folder", task="causal_lm"), "held_out.txt")  # doctest: +SKIP
        >>> src.eval_inputs["token_ids"].shape  # doctest: +SKIP
        (412, 128)
    """
    windows, desc = load_windows(source, path, width)
    return dataclasses.replace(source, eval_inputs={"token_ids": windows, "padding_mask": np.ones_like(windows)},
                               eval_labels=None, data_files={**source.data_files, "eval": desc})


def eval_windows(source, n: int | None = None) -> np.ndarray | None:
    """The held-out windows a causal LM source carries (its eval split), the first ``n``; None without any."""
    if getattr(source, "task", None) != "causal_lm" or not source.eval_inputs:
        return None
    ids = source.eval_inputs.get("token_ids")
    if ids is None or ids.ndim != 2:
        return None
    mask = source.eval_inputs.get("padding_mask")
    if mask is not None and not np.all(mask):
        ids = ids[np.all(mask, axis=1)]  # windows are real text; a padded row would score padding
    return ids[:n] if n else ids
