"""A SavedModel whose serving function is XLA-compiled and stays compiled after a reload, in a process
without tfaccel, and under ``saved_model_cli run`` / TF Serving.

How (measured, shared FACTS.md): ``ExportArchive.track(model)`` plus an endpoint that calls an inner
``tf.function(jit_compile=True)``, written by :mod:`tfaccel.saved_model` (each weight stored once). The
outer, uncompiled function pads the sequence dimension up to the next bucket (16, 32, 64, ...), so XLA
compiles once per (batch, bucket) instead of once per length, and slices sequence outputs back to the
caller's length. Padding is correct for BERT/GPT-2 inputs because padded positions carry
``padding_mask = 0`` and id 0, and attention ignores them.

A SavedModel that was not made by this Keras (:func:`write_xla_saved_model_from_saved_model`) gets every
signature re-wrapped in a ``tf.function(jit_compile=True)`` over the loaded concrete function, its
restored variables kept as variables (each once), compiled per exact input shape: its maximum sequence
length is not recorded, so padding to a bucket could pass it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from tfaccel.core.artifact import (
    graph_function,
    normalize_outputs,
    output_names_of,
    serving_signature,
)
from tfaccel.core.source import input_specs_of_keras
from tfaccel.saved_model import write_keras_endpoints

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512)


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length (lengths past the last bucket run unpadded).

    Example:
        >>> bucket_for(100, (16, 32, 64, 128))
        128
    """
    for b in buckets:
        if b >= length:
            return int(b)
    return int(length)


def validate_buckets(buckets: Sequence[int], max_length: int | None = None) -> tuple[int, ...]:
    b = tuple(int(x) for x in buckets)
    if not b or any(x <= 0 for x in b) or list(b) != sorted(set(b)):
        raise ValueError(f"buckets must be increasing positive integers. Received: buckets={tuple(buckets)}")
    if max_length:
        b = tuple(x for x in b if x <= max_length) or (max_length,)
        if b[-1] < max_length:
            b = b + (max_length,)
    return b


def _sequence_outputs(model, specs, dict_inputs, names) -> set[str]:
    """Names of outputs whose dimension 1 follows the input sequence length (to slice after padding)."""
    first = specs[0].name

    def run(seq):
        x = {}
        for s in specs:
            x[s.name] = np.ones((1, seq), dtype=s.dtype) if s.name != "segment_ids" else np.zeros((1, seq), s.dtype)
        out = normalize_outputs(model(x if dict_inputs else x[first], training=False), names)
        return {k: tuple(v.shape) for k, v in out.items()}

    a, b = run(5), run(7)
    return {k for k in a if len(a[k]) >= 2 and a[k][1] == 5 and b[k][1] == 7}


def write_xla_saved_model(model, folder: str | os.PathLike, *, buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                          signature_name: str = "serving_default") -> dict:
    """Write ``model`` as a SavedModel whose serving function is XLA-compiled.

    Args:
        model: a built Keras model whose inputs are token inputs (token_ids, padding_mask, segment_ids)
            when ``buckets`` is set; any model when ``buckets`` is None.
        folder: empty or absent folder to write.
        buckets: sequence-length buckets to pad to; None compiles per distinct input shape.

    Returns:
        ``{"buckets": [...], "sequence_outputs": [...]}``: what was set up.
    """
    import tensorflow as tf

    specs, dict_inputs = input_specs_of_keras(model)
    names = output_names_of(model)
    first = specs[0].name
    token_model = all(s.is_token_input for s in specs)
    if buckets is not None and not token_model:
        raise ValueError(
            "Sequence buckets need token inputs (token_ids, padding_mask, segment_ids); this model takes "
            f"{[s.name for s in specs]}. Pass buckets=None."
        )
    backbone = getattr(model, "backbone", model)
    max_len = getattr(backbone, "max_sequence_length", None)
    bks = validate_buckets(buckets, max_len) if buckets is not None else None

    @graph_function(jit_compile=True)
    def compiled(inputs):
        return normalize_outputs(model(inputs if dict_inputs else inputs[first], training=False), names)

    if bks is None:
        serve = compiled
        seq_outputs: set[str] = set()
    else:
        seq_outputs = _sequence_outputs(model, specs, dict_inputs, names)
        table = tf.constant(bks, tf.int32)

        def serve(inputs):
            seq = tf.shape(inputs[first])[1]
            fits = table >= seq
            target = tf.where(tf.reduce_any(fits), tf.reduce_min(tf.where(fits, table, tf.int32.max)), seq)
            padded = {k: tf.pad(v, [[0, 0], [0, target - seq]]) for k, v in inputs.items()}
            out = compiled(padded)
            return {k: (v[:, :seq] if k in seq_outputs else v) for k, v in out.items()}

    write_keras_endpoints(model, folder, {signature_name: graph_function(serve, input_signature=[serving_signature(specs)])})
    return {"buckets": list(bks) if bks else None, "sequence_outputs": sorted(seq_outputs)}


def _calling(concrete):
    """A one-argument (dict of named tensors) function calling a loaded signature with keyword inputs."""
    def call(inputs):
        return concrete(**inputs)

    return call


def write_xla_saved_model_from_saved_model(source_dir: str | os.PathLike, folder: str | os.PathLike, *,
                                           signatures: Sequence[str] | None = None) -> dict:
    """Write an XLA-compiled copy of a SavedModel (made by anything: Keras, ``tf.Module``, TF1 exports).

    Every signature is re-wrapped in a ``tf.function(jit_compile=True)`` that calls the loaded concrete
    function; the variables it captures are the restored ``tf.Variable`` objects, saved again as
    variables (not frozen to constants), each once, even where the source held two copies (a Keras
    ``model.export``). Variables that no kept signature reads are not carried over. The result serves
    under ``saved_model_cli run`` and stays XLA after a reload.

    Args:
        source_dir: the SavedModel to compile.
        folder: empty or absent folder to write.
        signatures: the signatures to keep (default: all of them).

    Returns:
        ``{"buckets": None, "signatures": [...]}``: no buckets (compiled per exact shape), what was compiled.

    Raises:
        SourceError: the folder does not load, or a requested signature does not exist.

    Example:
        >>> write_xla_saved_model_from_saved_model("exported", "exported-xla")  # doctest: +SKIP
        {'buckets': None, 'signatures': ['serving_default'], ...}
    """
    import tensorflow as tf

    from tfaccel.errors import SourceError
    from tfaccel.saved_model import write_endpoints

    try:
        loaded = tf.saved_model.load(str(source_dir))
    except Exception as exc:
        raise SourceError(f"{str(source_dir)!r} is not a SavedModel TensorFlow can load ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    names = list(signatures) if signatures is not None else sorted(loaded.signatures)
    missing = [n for n in names if n not in loaded.signatures]
    if missing or not names:
        raise SourceError(f"SavedModel {str(source_dir)!r} has no signature(s) {missing or names}; it has "
                          f"{sorted(loaded.signatures)}. Pass signatures= from those.")
    endpoints, trainable, non_trainable = {}, [], []
    for name in names:
        concrete = loaded.signatures[name]
        _, kw = concrete.structured_input_signature
        spec = {k: tf.TensorSpec(v.shape, v.dtype, name=k) for k, v in kw.items()}

        endpoints[name] = tf.function(_calling(concrete), input_signature=[spec], jit_compile=True)
        trainable += list(concrete.trainable_variables)
        non_trainable += [v for v in concrete.variables if not v.trainable]
    # ``loaded`` is tracked for its lookup tables and assets only; its variables are not taken from it, so a
    # second copy in the source (keras#23553) is not carried over.
    write_endpoints(folder, endpoints, track=[loaded], trainable_variables=trainable,
                    non_trainable_variables=non_trainable)
    return {"buckets": None, "signatures": names}
