"""What a stage produces (an :class:`Artifact` of some kind) and how to run it.

Artifact kinds are registered, each with a display name and a runner factory: this module registers
the two every model source can be (``keras``, ``saved_model``); each technique registers its own kinds
where it defines their runners (``onnx`` in :mod:`tfaccel.onnx`, ``tflite`` in
:mod:`tfaccel.quantization`, ``tensorrt`` in :mod:`tfaccel.tensorrt`, the decoders in
:mod:`tfaccel.generation`). :mod:`tfaccel.steps` imports every technique, and ``import tfaccel`` imports
it, so every kind is registered once tfaccel is imported. This module imports no technique.

Every runner takes a dict of named numpy inputs and returns a dict of named numpy outputs, with the
same output names as the reference model, so any two stages can be compared.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel.core.files import dir_size

#: kind -> display name ("onnx" -> "ONNX model"), for every registered kind.
KIND_NAMES: dict[str, str] = {}
_RUNNERS: dict[str, Callable[[Artifact], Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]]] = {}


def register_kind(kind: str, display_name: str, runner: Callable[[Artifact], Any]) -> None:
    """Register an artifact kind: its display name (for messages) and how to run one.

    Args:
        kind: the kind's name, as steps' ``consumes`` / ``produces`` say it (e.g. "onnx").
        display_name: what messages call it ("ONNX model").
        runner: ``runner(artifact)`` -> a callable taking a dict of named arrays and returning one.

    Example:
        >>> register_kind("onnx", "ONNX model", lambda a: OnnxRunner(a.path))  # doctest: +SKIP
    """
    KIND_NAMES[kind] = display_name
    _RUNNERS[kind] = runner


def kinds() -> tuple[str, ...]:
    """Every registered artifact kind."""
    return tuple(KIND_NAMES)


def kind_name(kind: str) -> str:
    """The display name of ``kind`` ("SavedModel"), or the kind itself when it is not registered."""
    return KIND_NAMES.get(kind, kind)


def output_names_of(model) -> list[str] | None:
    names = getattr(model, "output_names", None)
    return list(names) if names else None


def normalize_outputs(out: Any, names: list[str] | None = None) -> dict[str, Any]:
    """Model outputs as a dict: dicts keep their keys; a tensor is named after the model's single
    output (``output_names``) or ``output_0``; a list/tuple gets ``output_<i>``."""
    if isinstance(out, dict):
        return dict(out)
    if isinstance(out, (list, tuple)):
        if names and len(names) == len(out):
            return dict(zip(names, out, strict=False))
        return {f"output_{i}": o for i, o in enumerate(out)}
    if names and len(names) == 1:
        return {names[0]: out}
    return {"output_0": out}


def graph_function(fn=None, **kwargs):
    """``tf.function(fn, autograph=False, **kwargs)``: how tfaccel traces every function that calls a Keras model
    (serving signatures, the decode loop, validation runners). Keras traces its own ``model.export`` and ``fit``
    without AutoGraph, and Keras and keras-hub layers are written for that (their control flow is ``ops.cond`` /
    ``ops.while_loop``); converting their code costs tracing time for nothing (about 4% of an export or generate
    step on the tiny keras-hub families). Also a decorator: ``@graph_function(jit_compile=True)``."""
    import tensorflow as tf

    if fn is None:
        return lambda f: tf.function(f, autograph=False, **kwargs)
    return tf.function(fn, autograph=False, **kwargs)


def serving_signature(input_specs):
    """A dict of named TensorSpecs with a dynamic batch (and, for token inputs, sequence) dimension."""
    import tensorflow as tf

    sig = {}
    for s in input_specs:
        shape = [None] + [None if (s.is_token_input or d is None) else d for d in s.shape[1:]]
        sig[s.name] = tf.TensorSpec(shape, tf.as_dtype(s.dtype), name=s.name)
    return sig


@dataclasses.dataclass
class Artifact:
    """A stage's product. ``path`` is where it lives on disk (None for an unsaved Keras model)."""

    kind: str
    path: str | None = None
    model: Any = None  # the Keras model, for kind "keras"
    dict_inputs: bool = True
    input_names: list[str] | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: A SavedModel the step already loaded (``tf.saved_model.load`` of ``path``) to check what it wrote: the
    #: first runner takes it instead of loading the folder again, and the artifact lets go of it then.
    loaded: Any = dataclasses.field(default=None, repr=False, compare=False)

    @classmethod
    def of_source(cls, source) -> Artifact:
        """The reference artifact of a :class:`tfaccel.core.source.ModelSource`: its Keras model, or its
        SavedModel folder."""
        return cls(kind=source.kind, path=source.path if source.kind != "keras" else None, model=source.model,
                   dict_inputs=source.dict_inputs, input_names=source.input_names)

    def size_bytes(self) -> int:
        """Bytes on disk, or of the weights in memory for an unsaved Keras model."""
        if self.path and Path(self.path).exists():
            return dir_size(self.path)
        if self.model is not None:  # weights in memory
            return int(sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in self.model.weights))
        return 0

    def runner(self):
        """A callable running this artifact: dict of named arrays in, dict of named arrays out (the
        runner registered for its kind, :func:`register_kind`)."""
        if self.kind not in _RUNNERS:
            raise ValueError(f"No runner is registered for artifact kind {self.kind!r}; registered kinds: "
                             f"{', '.join(_RUNNERS)}. (Technique packages register theirs when imported: "
                             "import tfaccel first.)")
        return _RUNNERS[self.kind](self)


class KerasRunner:
    """Calls a Keras model through one tf.function (graph mode, like a plain export)."""

    def __init__(self, model, dict_inputs: bool = True):
        from tfaccel.core.source import input_specs_of_keras

        self.model = model
        self.dict_inputs = dict_inputs
        self.names = output_names_of(model)
        specs, _ = input_specs_of_keras(model)
        self._sig = serving_signature(specs)
        self._fn = graph_function(lambda x: model(x if dict_inputs else x[specs[0].name], training=False),
                                  input_signature=[self._sig])

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import tensorflow as tf

        x = {k: tf.constant(inputs[k], dtype=spec.dtype) for k, spec in self._sig.items()}
        out = normalize_outputs(self._fn(x), self.names)
        return {k: np.asarray(v) for k, v in out.items()}


class SavedModelRunner:
    """Runs a SavedModel's serving signature, as a TensorFlow Serving client would."""

    def __init__(self, path: str, signature: str = "serving_default", loaded: Any = None):
        import tensorflow as tf

        self._tf = tf
        self._loaded = loaded if loaded is not None else tf.saved_model.load(str(path))
        self.fn = self._loaded.signatures[signature]
        _, kw = self.fn.structured_input_signature
        self.dtypes = {k: v.dtype for k, v in kw.items()}

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tf = self._tf
        out = self.fn(**{k: tf.constant(v, dtype=self.dtypes[k]) for k, v in inputs.items()})
        return {k: v.numpy() for k, v in out.items()}


def _saved_model_runner(artifact: Artifact) -> SavedModelRunner:
    loaded, artifact.loaded = artifact.loaded, None  # taken once: later runners load the folder themselves
    return SavedModelRunner(artifact.path, loaded=loaded)


register_kind("keras", "Keras model", lambda a: KerasRunner(a.model, a.dict_inputs))
register_kind("saved_model", "SavedModel", _saved_model_runner)
