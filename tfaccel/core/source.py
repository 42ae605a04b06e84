"""A model source: the model to optimize, with what is needed to validate and measure it (its named
inputs, sample inputs, a labelled eval split, and what an example brings: a tokenizer, a training split).
Loading one from a name or a path is :func:`tfaccel.sources.load_source`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from tfaccel.errors import InputMismatchError, SourceError

TOKEN_INPUTS = ("token_ids", "segment_ids", "padding_mask")


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """One named model input. ``shape`` uses None for dynamic dimensions (batch first)."""

    name: str
    dtype: str
    shape: tuple[int | None, ...]

    @property
    def is_token_input(self) -> bool:
        return self.name in TOKEN_INPUTS


@dataclasses.dataclass(frozen=True)
class TrainingSplit:
    """Fine-tuning data a source brings with it (a built-in example's own training split, disjoint
    from its eval split), loaded only when a step needs it.

    Attributes:
        description: one line for reports ("BBC News training split (400 articles)").
        load: ``load(sequence_length)`` -> ``(inputs, labels or None)``.
    """

    description: str
    load: Callable[[int], tuple[dict[str, np.ndarray], np.ndarray | None]]


@dataclasses.dataclass
class ModelSource:
    """A model to optimize, with what is needed to validate and measure it.

    Attributes:
        name: what the user passed (example name or path).
        kind: "keras" (an in-memory Keras model) or "saved_model" (a SavedModel directory).
        model: the Keras model for kind "keras".
        path: the file or folder it came from, if any.
        input_specs: the model's named inputs.
        sample_inputs: a small batch every stage is compared on (name -> array).
        eval_inputs / eval_labels: a labelled split for task accuracy, if the source has one.
        vocab_size: token id range for synthetic inputs of token models.
        dict_inputs: whether the model is called with a dict (keras-hub) or a single tensor.
        task: "classification", "backbone", "causal_lm" or "generic".
        label_names: class names for classification sources.
        calibration_inputs: inputs int8 calibration runs on (name -> array), when the user gave them
            (:meth:`with_calibration_data`); otherwise calibration takes the eval split.
        data_files: the user's data files this source carries: {"eval": path, "calibration": path}.
        tokenizer_preset: a keras-hub preset / Hugging Face folder holding the model's tokenizer, for
            text data files, when the model itself has no preprocessor attached (built-in examples set it).
        train_split: fine-tuning data the source brings (:class:`TrainingSplit`), used by steps that
            fine-tune (``prune-structured``) when the user gives none.
    """

    name: str
    kind: str
    input_specs: list[InputSpec]
    sample_inputs: dict[str, np.ndarray]
    model: Any = None
    path: str | None = None
    eval_inputs: dict[str, np.ndarray] | None = None
    eval_labels: np.ndarray | None = None
    vocab_size: int | None = None
    dict_inputs: bool = True
    task: str = "generic"
    label_names: list[str] | None = None
    description: str = ""
    default_seq: int = 128
    max_sequence_length: int | None = None
    calibration_inputs: dict[str, np.ndarray] | None = None
    data_files: dict[str, str] = dataclasses.field(default_factory=dict)
    tokenizer_preset: str | None = None
    train_split: TrainingSplit | None = None

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.input_specs]

    def make_inputs(self, batch: int, seq: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """Synthetic inputs of a given batch and sequence length (full-length sequences).

        Token ids are drawn from [1, vocab_size); segment ids are 0 and the padding mask is all ones,
        which is the worst case for latency. Other inputs get standard-normal floats or small ints.
        """
        seq = seq or self.default_seq
        rng = np.random.default_rng(seed)
        out = {}
        for spec in self.input_specs:
            shape = [batch] + [seq if d is None else d for d in spec.shape[1:]]
            if spec.name == "token_ids":
                out[spec.name] = rng.integers(1, self.vocab_size or 100, size=shape).astype(spec.dtype)
            elif spec.name == "padding_mask":
                out[spec.name] = np.ones(shape, dtype=spec.dtype)
            elif spec.name == "segment_ids":
                out[spec.name] = np.zeros(shape, dtype=spec.dtype)
            elif np.issubdtype(np.dtype(spec.dtype), np.floating):
                out[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif spec.dtype == "bool":
                out[spec.name] = np.ones(shape, dtype=bool)
            else:
                out[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
        return out

    def check_inputs(self, inputs: dict[str, np.ndarray], what: str = "sample inputs") -> dict[str, np.ndarray]:
        """Check names, dtypes and ranks against the model's inputs; return them as arrays."""
        return check_inputs(self.input_specs, inputs, what)

    def with_sample_inputs(self, inputs: dict[str, np.ndarray]) -> ModelSource:
        """A copy of this source that validates on the given inputs (checked first)."""
        return dataclasses.replace(self, sample_inputs=self.check_inputs(inputs))

    def with_eval_data(self, path: str | os.PathLike) -> ModelSource:
        """A copy of this source whose eval split is the user's labelled data file, so every stage's
        accuracy is measured on it and each step's ``max_accuracy_drop`` applies to it.

        Args:
            path: an ``.npz`` (model inputs plus ``labels``) or a ``.csv`` / ``.jsonl`` of texts with
                ``text`` and ``label`` (tokenized with the source's tokenizer); see :mod:`tfaccel.core.eval_data`.

        Raises:
            DataFileError: the file is missing, unreadable, empty or does not fit the model, or the
                model is a backbone (no class logits to score).

        Example:
            >>> src = load_source("bert-tiny").with_eval_data("eval.npz")  # doctest: +SKIP
        """
        from tfaccel.core.eval_data import load_data_file
        from tfaccel.errors import DataFileError

        if self.task in ("backbone", "causal_lm"):
            raise DataFileError(
                f"eval data {str(path)!r}: {self.name!r} is a {self.task} model, with no class logits to score labels "
                "against. Load a classifier (a preset folder with --task classification --num-classes N)."
            )
        data = load_data_file(path, self, what="eval data", labels="required")
        label_names = self.label_names or data.label_names
        return dataclasses.replace(
            self, eval_inputs=data.inputs, eval_labels=data.labels, label_names=label_names,
            task="classification", data_files={**self.data_files, "eval": data.description},
        )

    def with_calibration_data(self, path: str | os.PathLike) -> ModelSource:
        """A copy of this source whose int8 calibration (TensorRT ``tftrt`` / ``tensorrt``) runs on the
        user's data file (``.npz`` of model inputs, or texts; labels are not needed).

        Raises:
            DataFileError: the file is missing, unreadable, empty or does not fit the model.
        """
        from tfaccel.core.eval_data import load_data_file

        data = load_data_file(path, self, what="calibration data", labels="ignored")
        return dataclasses.replace(self, calibration_inputs=data.inputs,
                                   data_files={**self.data_files, "calibration": data.description})


def check_inputs(specs: list[InputSpec], inputs: dict[str, Any], what: str) -> dict[str, np.ndarray]:
    expected = {s.name: s for s in specs}
    if not isinstance(inputs, dict):
        raise InputMismatchError(
            f"{what} must be a dict of input name -> array with names {sorted(expected)}; "
            f"received a {type(inputs).__name__}."
        )
    missing = sorted(set(expected) - set(inputs))
    extra = sorted(set(inputs) - set(expected))
    if missing or extra:
        raise InputMismatchError(
            f"{what} do not match the model's inputs: missing {missing}, unexpected {extra}. "
            f"The model expects {sorted(expected)}."
        )
    out = {}
    for name, spec in expected.items():
        arr = np.asarray(inputs[name])
        if arr.dtype != np.dtype(spec.dtype):
            kind_ok = np.issubdtype(arr.dtype, np.integer) and np.issubdtype(np.dtype(spec.dtype), np.integer)
            kind_ok |= np.issubdtype(arr.dtype, np.floating) and np.issubdtype(np.dtype(spec.dtype), np.floating)
            kind_ok |= arr.dtype == bool and np.issubdtype(np.dtype(spec.dtype), np.integer)
            if not kind_ok:
                raise InputMismatchError(
                    f"{what}: input '{name}' has dtype {arr.dtype}, the model expects {spec.dtype}. "
                    f"Convert it, e.g. arr.astype('{spec.dtype}')."
                )
            arr = arr.astype(spec.dtype)
        if arr.ndim != len(spec.shape):
            raise InputMismatchError(
                f"{what}: input '{name}' has shape {arr.shape} (rank {arr.ndim}); the model expects "
                f"rank {len(spec.shape)} with shape {tuple(spec.shape)} (None = any size)."
            )
        for i, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=False)):
            if want is not None and got != want:
                raise InputMismatchError(
                    f"{what}: input '{name}' has size {got} in dimension {i}; the model expects {want}."
                )
        out[name] = arr
    return out


# --------------------------------------------------------------------------------------------------
# Keras models


def input_specs_of_keras(model) -> tuple[list[InputSpec], bool]:
    """Named input specs of a built Keras model, and whether it takes a dict."""
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise SourceError(
            f"Model {getattr(model, 'name', model)!r} has no defined inputs (a subclassed model that was "
            "never built?). Build it on real inputs or save a functional model (keras-hub models are)."
        )
    struct = getattr(model, "_inputs_struct", None)
    dict_inputs = isinstance(struct, dict)
    specs = []
    for t in inputs:
        name = t.name.split(":")[0]
        dtype = str(getattr(t.dtype, "name", t.dtype))
        specs.append(InputSpec(name=name, dtype=dtype, shape=tuple(t.shape)))
    return specs, dict_inputs


def _vocab_size(model) -> int | None:
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "vocabulary_size", None)


def token_sample_inputs(specs: list[InputSpec], vocab_size: int, batch: int = 8, seq: int = 32, seed: int = 0):
    """Sample inputs for a token model with varied real lengths, so masking is exercised."""
    rng = np.random.default_rng(seed)
    lengths = np.linspace(seq, max(2, seq // 4), batch).astype(int)
    out = {}
    for spec in specs:
        if spec.name == "token_ids":
            ids = rng.integers(1, vocab_size, size=(batch, seq))
            ids[np.arange(seq)[None, :] >= lengths[:, None]] = 0
            out[spec.name] = ids.astype(spec.dtype)
        elif spec.name == "padding_mask":
            out[spec.name] = (np.arange(seq)[None, :] < lengths[:, None]).astype(spec.dtype)
        elif spec.name == "segment_ids":
            out[spec.name] = np.zeros((batch, seq), dtype=spec.dtype)
    return out


def source_from_keras_model(model, name: str, path: str | None = None, **fields) -> ModelSource:
    """Wrap an in-memory Keras model as a source with synthetic sample inputs."""
    specs, dict_inputs = input_specs_of_keras(model)
    vocab = _vocab_size(model)
    tmp = ModelSource(name=name, kind="keras", input_specs=specs, sample_inputs={}, model=model, path=path,
                      vocab_size=vocab, dict_inputs=dict_inputs, max_sequence_length=_max_seq(model), **fields)
    if all(s.is_token_input for s in specs) and vocab:
        seq = min(32, _max_seq(model) or 32)
        sample = token_sample_inputs(specs, vocab, seq=seq)
        tmp.default_seq = min(tmp.default_seq, _max_seq(model) or tmp.default_seq)
    else:
        sample = tmp.make_inputs(batch=8, seq=16)
    tmp.sample_inputs = sample
    if tmp.task == "generic":
        tmp.task = _guess_task(model)
    return tmp


def _max_seq(model) -> int | None:
    backbone = getattr(model, "backbone", model)
    return getattr(backbone, "max_sequence_length", None)


def _guess_task(model) -> str:
    import keras_hub

    if isinstance(model, keras_hub.models.CausalLM):
        return "causal_lm"
    if isinstance(model, keras_hub.models.TextClassifier):
        return "classification"
    if isinstance(model, keras_hub.models.Backbone):
        return "backbone"
    return "generic"
