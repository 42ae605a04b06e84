"""A user's own data for a model: labelled eval data, calibration data, fine-tuning data.

Two formats, chosen by the file's suffix:

- ``.npz`` (``np.savez``): one array per model input, named after it (``token_ids``,
  ``segment_ids``, ``padding_mask`` for keras-hub BERT), first dimension = examples, plus ``labels``
  (class indices, or class-name strings).
- ``.csv`` (a header row with ``text`` and ``label`` columns) or ``.jsonl`` (one JSON object per
  line with ``"text"`` and ``"label"`` keys): raw texts, tokenized with the source's own keras-hub
  preprocessor (the preset / Hugging Face folder's tokenizer, or the one attached to a keras-hub
  task model) at the model's sequence length (:attr:`ModelSource.default_seq`).

Labels that are class names are mapped to class indices in this order: the source's own
``label_names`` where it has them (e.g. ``minilm-bbc``: business, entertainment, politics, sport, tech);
otherwise the distinct names in the file, sorted (so "neg", "pos" -> 0, 1). Labels that are all integers
are used as they are.

Every problem a user can make with such a file raises :class:`tfaccel.errors.DataFileError` (a
:class:`~tfaccel.errors.SourceError`) naming the file, what is wrong and how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel.errors import DataFileError, InputMismatchError

NPZ_SUFFIXES = (".npz",)
TEXT_SUFFIXES = (".csv", ".jsonl")
LABELS_KEY = "labels"
#: Token inputs must hold integer ids (padding_mask may also be bool).
_INTEGER_INPUTS = ("token_ids", "segment_ids")
_INT_LABEL = re.compile(r"^\s*-?\d+\s*$")


@dataclasses.dataclass
class LabelledData:
    """Model inputs read from a file, with labels where the file has them.

    Attributes:
        inputs: input name -> array (first dimension = examples), checked against the model's inputs.
        labels: class indices (int64), or None.
        label_names: class names in index order when the file's labels were names, else None.
        path: the file it came from.
        description: one line for logs and reports (file, examples, label order).
    """

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None
    label_names: list[str] | None
    path: str
    description: str

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))


def load_data_file(path: str | os.PathLike, source, *, what: str = "eval data", labels: str = "required",
                   sequence_length: int | None = None) -> LabelledData:
    """Read model inputs (and labels) for ``source`` from an ``.npz``, ``.csv`` or ``.jsonl`` file.

    Args:
        path: the file. ``.npz``: one array per model input plus ``labels``; ``.csv`` / ``.jsonl``:
            ``text`` and ``label`` columns / keys, tokenized with the source's keras-hub preprocessor.
        source: the :class:`tfaccel.sources.ModelSource` the data is for.
        what: how the data is named in error messages (e.g. "--eval-data", "calibration data").
        labels: "required" (eval data: accuracy needs them), "optional" (fine-tuning data) or
            "ignored" (calibration data: labels are not read).
        sequence_length: texts are padded/truncated to this length; default the model's
            (``source.default_seq``).

    Returns:
        A :class:`LabelledData`.

    Raises:
        DataFileError: a missing, unreadable or empty file; input names that do not match the model
            (the message lists the expected ones); wrong dtypes (float token ids, float labels);
            arrays of different lengths; no labels where they are required; labels outside
            ``[0, number of classes)``; token ids outside the vocabulary; texts for a model without a
            tokenizer.

    Example:
        >>> data = load_data_file("eval.npz", load_source("bert-tiny"))  # doctest: +SKIP
        >>> data.description  # doctest: +SKIP
        'eval.npz (200 examples, labelled)'
    """
    if labels not in ("required", "optional", "ignored"):
        raise ValueError(f"labels must be 'required', 'optional' or 'ignored'. Received: labels={labels!r}")
    p = Path(path)
    name = f"{what} {str(p)!r}"
    suffix = p.suffix.lower()
    if suffix not in NPZ_SUFFIXES + TEXT_SUFFIXES:
        raise DataFileError(
            f"{name}: unknown file type {p.suffix or '(no suffix)'!r}. Pass an .npz (one array per model input "
            f"plus 'labels'), or a .csv / .jsonl of texts with 'text' and 'label'."
        )
    if not p.exists():
        raise DataFileError(f"{name} does not exist. Check the path.")
    if not p.is_file():
        raise DataFileError(f"{name} is a folder, not a file. Pass the .npz / .csv / .jsonl file itself.")
    if p.stat().st_size == 0:
        raise DataFileError(f"{name} is empty (0 bytes). Write the data into it first (np.savez, or a header row).")
    if suffix in NPZ_SUFFIXES:
        arrays, raw_labels = _read_npz(p, name)
        label_names = None
        labels_arr = None
        if raw_labels is not None and labels != "ignored":
            labels_arr, label_names = _labels_from_array(raw_labels, name, source)
    else:
        texts, raw = _read_texts(p, name)
        arrays = _tokenize(texts, source, name, sequence_length)
        labels_arr, label_names = (None, None)
        if raw is not None and labels != "ignored":
            labels_arr, label_names = _labels_from_strings(raw, name, source)
    if labels == "required" and labels_arr is None:
        raise DataFileError(
            f"{name} has no labels. Add the class index of every example: an array named 'labels' in the .npz "
            "(np.savez(path, labels=y, **inputs)), or a 'label' column / key for texts."
        )
    inputs = _check_arrays(arrays, labels_arr, name, source)
    n = len(next(iter(inputs.values())))
    desc = f"{p} ({n} examples" + (", labelled" if labels_arr is not None else "") + ")"
    if label_names is not None:
        desc += f"; label order {label_names}"
    return LabelledData(inputs=inputs, labels=labels_arr, label_names=label_names, path=str(p), description=desc)


# --------------------------------------------------------------------------------------------------
# reading


def _read_npz(p: Path, name: str) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    if not zipfile.is_zipfile(p):
        raise DataFileError(
            f"{name} is not a readable .npz (not a zip archive of arrays: a truncated file, or another format "
            "renamed). Write it with np.savez(path, labels=y, **inputs)."
        )
    try:
        with np.load(p, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise DataFileError(
                    f"{name} holds a single array, not named arrays. Save it with np.savez(path, labels=y, "
                    "token_ids=..., ...), one array per model input."
                )
            arrays = {k: data[k] for k in data.files}
    except DataFileError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise DataFileError(
                f"{name} holds Python objects (an object array, pickled). Save plain numeric arrays "
                "(token ids as int32, labels as int64 or strings)."
            ) from exc
        raise DataFileError(f"{name} is not a readable .npz ({exc}). Write it with np.savez.") from exc
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataFileError(f"{name} is not a readable .npz ({type(exc).__name__}: {exc}). Write it with np.savez.") from exc
    if not arrays:
        raise DataFileError(f"{name} holds no arrays. Save one array per model input plus 'labels' with np.savez.")
    return arrays, arrays.pop(LABELS_KEY, None)


def _read_texts(p: Path, name: str) -> tuple[list[str], list[str] | None]:
    try:
        content = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"{name} cannot be read as UTF-8 text ({type(exc).__name__}: {exc}).") from exc
    rows: list[tuple[int, Any, Any]] = []  # (line number, text, label or None)
    if p.suffix.lower() == ".csv":
        reader = csv.DictReader(content.splitlines())
        fields = reader.fieldnames or []
        if "text" not in fields:
            raise DataFileError(
                f"{name} has no 'text' column (its header row is {fields}). The first row must name the "
                "columns: text,label."
            )
        has_label = "label" in fields
        for i, row in enumerate(reader, start=2):
            if None in row or any(v is None for v in row.values()):
                raise DataFileError(f"{name}, line {i}: {len(fields)} columns expected ({fields}). Quote texts "
                                    'that contain commas ("a, b").')
            rows.append((i, row["text"], row["label"] if has_label else None))
    else:
        has_label = None
        for i, line in enumerate(content.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as exc:
                raise DataFileError(f"{name}, line {i} is not valid JSON ({exc}). Write one JSON object per line: "
                                    '{"text": "...", "label": 0}.') from exc
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataFileError(f"{name}, line {i} has no \"text\" key. Write one JSON object per line: "
                                    '{"text": "...", "label": 0}.')
            rows.append((i, obj["text"], obj.get("label")))
            has_label = has_label or "label" in obj
    if not rows:
        raise DataFileError(f"{name} has no examples (only a header or blank lines). Add one text per row.")
    for i, text, _ in rows:
        if not isinstance(text, str):
            raise DataFileError(f"{name}, line {i}: the text is a {type(text).__name__}, not a string.")
    if not has_label:  # the caller says whether labels were needed
        return [t for _, t, _ in rows], None
    missing = [i for i, _, lab in rows if lab is None or (isinstance(lab, str) and not lab.strip())]
    if missing:
        raise DataFileError(f"{name}: no label on line(s) {missing[:10]}. Give every example a label.")
    bad = [(i, lab) for i, _, lab in rows if not isinstance(lab, (str, int)) or isinstance(lab, bool)]
    if bad:
        i, lab = bad[0]
        raise DataFileError(f"{name}, line {i}: label {lab!r} is a {type(lab).__name__}; labels are class indices "
                            "(0, 1, ...) or class names.")
    return [t for _, t, _ in rows], [str(lab).strip() for _, _, lab in rows]


# --------------------------------------------------------------------------------------------------
# labels


def num_classes_of(source) -> int | None:
    """The number of classes a classification source predicts (its logits' last dimension), or None."""
    model = getattr(source, "model", None)
    if model is not None:
        n = getattr(model, "num_classes", None)
        if isinstance(n, int):
            return n
        outs = getattr(model, "outputs", None) or []
        if len(outs) >= 1 and outs[0].shape and outs[0].shape[-1] is not None:
            return int(outs[0].shape[-1])
        return None
    if source.kind == "saved_model" and source.path:
        import tensorflow as tf

        sig = tf.saved_model.load(str(source.path)).signatures["serving_default"]
        outs = sig.structured_outputs
        spec = outs.get("logits", next(iter(outs.values()))) if isinstance(outs, dict) else None
        if spec is not None and spec.shape.rank and spec.shape[-1] is not None:
            return int(spec.shape[-1])
    return None


def _labels_from_strings(raw: list[str], name: str, source) -> tuple[np.ndarray, list[str] | None]:
    if all(_INT_LABEL.match(s) for s in raw):
        return _check_label_range(np.array([int(s) for s in raw], dtype=np.int64), name, source), None
    known = list(source.label_names) if source.label_names else None
    if known is not None:
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise DataFileError(
                f"{name}: label(s) {unknown[:10]} are not among the model's class names {known}. Use those names "
                "or class indices."
            )
        order = known
    else:
        order = sorted(set(raw))
    index = {lab: i for i, lab in enumerate(order)}
    labels = np.array([index[s] for s in raw], dtype=np.int64)
    n_classes = num_classes_of(source)
    if n_classes is not None and len(order) > n_classes:
        raise DataFileError(
            f"{name} has {len(order)} distinct labels {order[:10]} but the model predicts {n_classes} classes. "
            "Check the file, or load the model with the right --num-classes."
        )
    return labels, order


def _labels_from_array(raw: np.ndarray, name: str, source) -> tuple[np.ndarray, list[str] | None]:
    if raw.ndim != 1:
        raise DataFileError(
            f"{name}: 'labels' has shape {raw.shape}; it must be one class index per example (shape (N,)). "
            "For one-hot labels use labels.argmax(-1)."
        )
    if raw.dtype.kind in "US":
        return _labels_from_strings([s.strip() for s in raw.astype(str)], name, source)  # bytes decode too
    if raw.dtype.kind not in "iu":
        raise DataFileError(
            f"{name}: 'labels' has dtype {raw.dtype}; labels are class indices. Save them as integers "
            "(labels.astype('int64')) or class-name strings."
        )
    return _check_label_range(raw.astype(np.int64), name, source), None


def _check_label_range(labels: np.ndarray, name: str, source) -> np.ndarray:
    n_classes = num_classes_of(source)
    low = int(labels.min()) if labels.size else 0
    high = int(labels.max()) if labels.size else 0
    if low < 0 or (n_classes is not None and high >= n_classes):
        bad = labels[(labels < 0) | (labels >= (n_classes or np.iinfo(np.int64).max))]
        raise DataFileError(
            f"{name}: label {int(bad[0])} is out of range: the model predicts {n_classes} classes, so labels must be "
            f"in [0, {(n_classes or 0) - 1}]. Check the file, or load the model with the right --num-classes."
        )
    return labels


# --------------------------------------------------------------------------------------------------
# texts -> token ids


def _preprocessor(source, name: str, sequence_length: int):
    """The keras-hub text classifier preprocessor of ``source``, at ``sequence_length``."""
    import keras_hub

    model = getattr(source, "model", None)
    attached = getattr(model, "preprocessor", None) if model is not None else None
    if attached is not None and getattr(attached, "tokenizer", None) is not None:
        if hasattr(attached, "sequence_length"):
            attached.sequence_length = sequence_length
        return attached
    preset = getattr(source, "tokenizer_preset", None)
    if preset is None and source.kind == "keras" and source.path and Path(source.path).is_dir():
        preset = source.path  # a keras-hub preset / Hugging Face folder
    if preset is None:
        raise DataFileError(
            f"{name}: texts need the model's tokenizer, and {source.name!r} has none ({source.kind} source without a "
            "keras-hub preprocessor). Tokenize the texts yourself and pass an .npz of the model inputs plus 'labels' "
            "(--eval-data), or load the model from its keras-hub preset / Hugging Face folder with its tokenizer."
        )
    try:
        return keras_hub.models.TextClassifierPreprocessor.from_preset(str(preset), sequence_length=sequence_length)
    except Exception as exc:
        raise DataFileError(
            f"{name}: texts need the model's tokenizer, but keras-hub found no text classifier preprocessor in "
            f"{str(preset)!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Save the "
            "tokenizer into the folder (tokenizer.save_to_preset(folder)), or pass an .npz of token ids."
        ) from exc


def _tokenize(texts: list[str], source, name: str, sequence_length: int | None) -> dict[str, np.ndarray]:
    seq = sequence_length or source.default_seq
    pre = _preprocessor(source, name, seq)
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(texts), 256):
        part = pre(texts[start:start + 256])
        if isinstance(part, tuple):
            part = part[0]
        for k, v in part.items():
            out.setdefault(k, []).append(np.asarray(v))
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    wanted = set(source.input_names)
    return {k: (v.astype("int32") if v.dtype == bool else v) for k, v in arrays.items() if k in wanted}


# --------------------------------------------------------------------------------------------------
# checks against the model


def _check_arrays(arrays: dict[str, np.ndarray], labels: np.ndarray | None, name: str, source) -> dict[str, np.ndarray]:
    expected = source.input_names
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise DataFileError(
            f"{name}: its arrays {sorted(arrays)} do not match the model's inputs: missing {missing}, unexpected "
            f"{extra}. The model expects arrays named {sorted(expected)}, plus '{LABELS_KEY}'."
        )
    for k in _INTEGER_INPUTS:
        if k in arrays and arrays[k].dtype.kind not in "iub":
            raise DataFileError(
                f"{name}: '{k}' has dtype {arrays[k].dtype}; token ids are integers. Save it with "
                f"{k}.astype('int32')."
            )
    counts = {k: (v.shape[0] if v.ndim else None) for k, v in arrays.items()}
    if labels is not None:
        counts[LABELS_KEY] = len(labels)
    if any(c is None for c in counts.values()):
        scalar = [k for k, c in counts.items() if c is None]
        raise DataFileError(f"{name}: {scalar} are scalars; every array needs one row per example.")
    if len(set(counts.values())) != 1:
        raise DataFileError(
            f"{name}: arrays of different lengths {counts}. Every array (and '{LABELS_KEY}') needs one row per "
            "example, the same number of rows."
        )
    if not next(iter(counts.values())):
        raise DataFileError(f"{name} has 0 examples. Write at least one example.")
    try:
        inputs = source.check_inputs(arrays, name)
    except InputMismatchError as exc:
        raise DataFileError(str(exc)) from exc
    limit = source.max_sequence_length
    ids = inputs.get("token_ids")
    if ids is not None and ids.ndim == 2:
        if limit and ids.shape[1] > limit:
            raise DataFileError(
                f"{name}: sequences of length {ids.shape[1]}, but the model's maximum sequence length is {limit}. "
                f"Truncate them to at most {limit} tokens."
            )
        vocab = source.vocab_size if source.kind == "keras" else None  # a SavedModel does not record it
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab and high >= vocab):
            raise DataFileError(
                f"{name}: token ids range over [{low}, {high}] but the model's vocabulary has {vocab} entries "
                f"(ids 0..{(vocab or 0) - 1}). Tokenize with the model's own tokenizer."
            )
    return inputs
