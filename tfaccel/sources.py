"""Load the models users have: a .keras file, a keras-hub preset or Hugging Face folder, a SavedModel
directory, or a built-in example name, as a :class:`tfaccel.core.source.ModelSource`. Every source
carries sample inputs and, where it has one, a labelled eval split.

This module sits above the built-in examples (it resolves their names); the source itself is core.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel import examples
from tfaccel.core.files import read_json_file
from tfaccel.core.source import InputSpec, ModelSource, source_from_keras_model, token_sample_inputs
from tfaccel.errors import ArgumentError, SourceError, first_line


def load_sample_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read sample inputs from a .npz file (one array per input name)."""
    p = Path(path)
    if not p.exists():
        raise SourceError(f"Sample inputs file {str(p)!r} does not exist. Pass an .npz with one array per input.")
    try:
        with np.load(p, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise SourceError(f"Cannot read sample inputs from {str(p)!r} ({exc}). Pass an .npz file (np.savez).") from exc


def _load_keras_file(path: Path) -> ModelSource:
    import keras
    import keras_hub  # noqa: F401  (registers keras-hub classes for deserialization)

    try:
        model = keras.saving.load_model(str(path), compile=False)
    except Exception as exc:
        raise SourceError(f"{str(path)!r} is not a Keras model file that Keras {keras.__version__} can load "
                          f"({first_line(exc)}). Save the model with model.save('model.keras').") from exc
    return source_from_keras_model(model, name=str(path), path=str(path))


def _is_hf_dir(path: Path) -> bool:
    """Whether ``path`` holds a Hugging Face model's config.json (with ``model_type``).

    Raises:
        SourceError: config.json is not valid JSON (the message names the file and the syntax error).
    """
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    data = read_json_file(cfg, "the model's config")
    return isinstance(data, dict) and "model_type" in data


def _load_preset_dir(path: Path, task: str | None, num_classes: int | None) -> ModelSource:
    import keras_hub

    kinds = {
        None: keras_hub.models.Backbone,
        "backbone": keras_hub.models.Backbone,
        "classification": keras_hub.models.TextClassifier,
        "causal_lm": keras_hub.models.CausalLM,
    }
    if task not in kinds:
        raise SourceError(f"Unknown task {task!r} for a preset folder. Use one of: backbone, classification, causal_lm.")
    kwargs: dict[str, Any] = {}
    if task == "classification":
        if not num_classes:
            raise SourceError("Loading a preset folder as a classifier needs num_classes (CLI: --num-classes N).")
        kwargs = {"num_classes": num_classes, "preprocessor": None}
    elif task == "causal_lm":
        kwargs = {"preprocessor": None}
    try:
        model = kinds[task].from_preset(str(path), **kwargs)
    except Exception as exc:
        raise SourceError(f"{str(path)!r} looks like a keras-hub preset / Hugging Face folder but keras-hub could not "
                          f"load it ({first_line(exc)}).") from exc
    return source_from_keras_model(model, name=str(path), path=str(path))


def _saved_model_source(path: Path, signature: str = "serving_default") -> ModelSource:
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:
        raise SourceError(f"{str(path)!r} has a saved_model.pb but TensorFlow could not load it: {exc}") from exc
    if signature not in loaded.signatures:
        raise SourceError(
            f"SavedModel {str(path)!r} has no signature {signature!r}; it has {sorted(loaded.signatures)}."
        )
    fn = loaded.signatures[signature]
    _, kw = fn.structured_input_signature
    specs = [InputSpec(name=k, dtype=v.dtype.name, shape=tuple(v.shape.as_list())) for k, v in sorted(kw.items())]
    vocab = None
    src = ModelSource(name=str(path), kind="saved_model", input_specs=specs, sample_inputs={}, path=str(path))
    if all(s.is_token_input for s in specs):
        vocab = 100  # the vocabulary size is not recorded in a SavedModel; ids below 100 are valid for any text model
        src.vocab_size = vocab
        src.sample_inputs = token_sample_inputs(specs, vocab, seq=32)
    else:
        src.sample_inputs = src.make_inputs(batch=8, seq=16)
    return src


def load_source(
    model: Any,
    *,
    task: str | None = None,
    num_classes: int | None = None,
    sample_inputs: dict[str, np.ndarray] | str | None = None,
    progress=None,
    eval_data: str | os.PathLike | None = None,
    calibration_data: str | os.PathLike | None = None,
) -> ModelSource:
    """Load a model source.

    Args:
        model: a built-in example name (see :func:`tfaccel.examples.list_examples`), a path to a
            ``.keras`` file, a keras-hub preset or Hugging Face model folder, a SavedModel folder, or
            an in-memory ``keras.Model``.
        task: for preset folders: "backbone" (default), "classification" or "causal_lm".
        num_classes: for ``task="classification"``.
        sample_inputs: inputs to validate on instead of the source's own: a dict or an .npz path.
        progress: callable taking a message, for long work (building an example).
        eval_data: your labelled eval data (``.npz`` of inputs plus ``labels``, or a ``.csv`` /
            ``.jsonl`` of texts): every stage's accuracy is measured on it (:meth:`ModelSource.with_eval_data`).
            For a causal LM: held-out text (``.txt``, ``.jsonl``, ``.csv``, or an ``.npz`` of ``token_ids``
            windows) that generation steps measure perplexity and KL divergence on
            (:func:`tfaccel.generation.eval_text.with_eval_texts`).
        calibration_data: your int8 calibration data (:meth:`ModelSource.with_calibration_data`); for a causal
            LM, GPTQ / AWQ calibration text in the same formats as its eval text.

    Returns:
        A :class:`ModelSource`.

    Raises:
        SourceError: the path does not exist or is not a model tfaccel can load.
        InputMismatchError: ``sample_inputs`` do not match the model's inputs.
        DataFileError: ``eval_data`` / ``calibration_data`` cannot be used (the message names the file).

    Example:
        >>> src = load_source("bert-tiny")
        >>> sorted(src.sample_inputs)
        ['padding_mask', 'segment_ids', 'token_ids']
    """
    if hasattr(model, "inputs") and callable(model) and not isinstance(model, (str, os.PathLike)):
        src = source_from_keras_model(model, name=getattr(model, "name", "model"))
    elif isinstance(model, str) and model in examples.EXAMPLES:
        src = examples.load_example(model, progress=progress)
    elif not isinstance(model, (str, os.PathLike)):
        raise ArgumentError(f"model is a built-in example name, a path or a keras.Model, e.g. load_source('bert-tiny') "
                            f"or load_source('model.keras'). Received: {model!r} ({type(model).__name__})")
    else:
        p = Path(model)
        if not p.exists():
            hint = ", ".join(examples.EXAMPLES)
            raise SourceError(
                f"{str(model)!r} does not exist. Pass a .keras file, a keras-hub preset or Hugging Face folder, "
                f"a SavedModel folder, or a built-in example: {hint}."
            )
        if p.is_file():
            if p.suffix == ".keras":
                src = _load_keras_file(p)
            else:
                raise SourceError(
                    f"{str(p)!r} is not a Keras model file (expected a .keras file). Keras 3 saves with "
                    "model.save('model.keras'); for a SavedModel pass its folder."
                )
        elif (p / "saved_model.pb").exists():
            src = _saved_model_source(p)
        elif (p / "metadata.json").exists() or _is_hf_dir(p):
            src = _load_preset_dir(p, task, num_classes)
        else:
            raise SourceError(
                f"{str(p)!r} is a folder but not a SavedModel (no saved_model.pb), a keras-hub preset "
                "(no metadata.json) or a Hugging Face model folder (no config.json with model_type)."
            )
    if sample_inputs is not None:
        if isinstance(sample_inputs, (str, os.PathLike)):
            sample_inputs = load_sample_inputs(sample_inputs)
        src = src.with_sample_inputs(sample_inputs)
    if src.task == "causal_lm" and (eval_data is not None or calibration_data is not None):
        # a language model's data is held-out text (perplexity, KL; GPTQ / AWQ calibration), not labels
        from tfaccel.generation.eval_text import with_calibration_texts, with_eval_texts

        if eval_data is not None:
            src = with_eval_texts(src, eval_data)
        if calibration_data is not None:
            src = with_calibration_texts(src, calibration_data)
        return src
    if eval_data is not None:
        src = src.with_eval_data(eval_data)
    if calibration_data is not None:
        src = src.with_calibration_data(calibration_data)
    return src
