"""Pruning for Keras 3 models (keras-hub BERT / GPT-2 included), with tfmot's schedules and semantics.

Unstructured magnitude pruning during training (apply / strip / scope)::

    from tfaccel.pruning import PolynomialDecay, UpdatePruningStep, prune_low_magnitude, strip_pruning

    model = prune_low_magnitude(model, PolynomialDecay(0.0, 0.5, begin_step=0, end_step=200, frequency=10))
    model.fit(ds, epochs=2, callbacks=[UpdatePruningStep(log_dir="logs/pruning")])
    model = strip_pruning(model)          # plain Keras model, pruned weights exactly zero

m:n (2:4) sparsity: ``prune_low_magnitude(model, sparsity_m_by_n=(2, 4))``.

Structured pruning that makes the model smaller and faster: :func:`prune_feedforward` removes
feed-forward units of every transformer layer, :func:`prune_layers` removes whole transformer layers
(the DistilBERT recipe), each rebuilding a smaller keras-hub model; :func:`distill` recovers accuracy
from the original model, reproducibly (seeded, early stopping on a held-back slice); the pipeline step
is ``prune-structured`` (:class:`StructuredPruneStep`).

tf_keras (Keras 2) models go through tfmot itself (:mod:`tfaccel.pruning.tfmot_route`), imported
so that ``tf.keras`` stays Keras 3 for the rest of the process.

Names are imported lazily: ``import tfaccel.pruning`` does not import Keras or TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PruningSchedule": "pruning_schedule",
    "ConstantSparsity": "pruning_schedule",
    "PolynomialDecay": "pruning_schedule",
    "as_schedule": "pruning_schedule",
    "deserialize_schedule": "pruning_schedule",
    "serialize_schedule": "pruning_schedule",
    "magnitude_mask": "pruning_impl",
    "m_by_n_mask": "pruning_impl",
    "is_m_by_n_sparse": "pruning_impl",
    "prune_low_magnitude": "prune",
    "strip_pruning": "prune",
    "prune_scope": "prune",
    "pruning_state": "prune",
    "PruningState": "prune",
    "kernel_sparsity": "prune",
    "check_m_by_n": "prune",
    "is_tf_keras_model": "prune",
    "UpdatePruningStep": "pruning_callbacks",
    "callbacks_for": "pruning_callbacks",
    "feedforward_importance": "structured_pruning",
    "prune_feedforward": "structured_pruning",
    "feedforward_layers": "structured_pruning",
    "attention_heads": "structured_pruning",
    "head_importance": "structured_pruning",
    "prune_attention_heads": "structured_pruning",
    "prune_layers": "depth",
    "transformer_layer_count": "depth",
    "distill": "distillation",
    "DistillationResult": "distillation",
    "StructuredPruneStep": "steps",
    "import_tfmot": "tfmot_route",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"tfaccel.pruning.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfaccel.pruning' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
