"""Mixed precision for training and export, XLA for training, and a non-finite guard callback.

``NonFiniteGuard`` (a Keras callback) and its helpers are imported on first use, so
``import tfaccel.precision`` does not import Keras or TensorFlow.
"""

from __future__ import annotations

from tfaccel.precision.mixed_precision import (
    POLICIES,
    apply_mixed_precision,
    policy_scope,
    precision_summary,
    strip_mixed_precision,
    upcast_softmax,
)
from tfaccel.precision.precision_step import MixedPrecisionStep
from tfaccel.precision.training import prepare_for_training, xla_unsupported_ops

_LAZY = ("NonFiniteError", "NonFiniteGuard", "first_non_finite_layer")

__all__ = [
    "POLICIES",
    "MixedPrecisionStep",
    "NonFiniteError",
    "NonFiniteGuard",
    "apply_mixed_precision",
    "first_non_finite_layer",
    "policy_scope",
    "precision_summary",
    "prepare_for_training",
    "strip_mixed_precision",
    "upcast_softmax",
    "xla_unsupported_ops",
]


def __getattr__(name: str):
    if name in _LAZY:  # a keras.callbacks.Callback subclass: defining it imports Keras
        from tfaccel.precision import non_finite_guard

        value = getattr(non_finite_guard, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tfaccel.precision' has no attribute {name!r}")
