"""Prune tf_keras (Keras 2) models with tfmot's own ``prune_low_magnitude``, without switching
``tf.keras`` for the rest of the process.

What importing tensorflow-model-optimization 0.8.1 changes (``python/core/keras/compat.py``,
``_get_keras_instance``): it sets ``os.environ["TF_USE_LEGACY_KERAS"] = "1"`` and then reads
``tf.keras.version``. ``tf.keras`` is a ``KerasLazyLoader`` (``tensorflow/python/util/lazy_loader.py``)
that picks Keras 3 or tf_keras the first time one of its attributes is read, from that environment
variable, and keeps the choice for the life of the process. So:

1. if nothing had read ``tf.keras`` yet, ``tf.keras`` becomes tf_keras for good (and so do
   ``tf.optimizers``, ``tf.losses``, ``tf.metrics``, ``tf.initializers``, lazy loaders of the same kind);
2. either way the variable stays set, so every ``tf.keras`` loader resolved later (``tf.compat.v2.keras``
   ...), every library that reads it (``tfaccel.compat.legacy_keras_active``, tensorflow-hub) and every
   child process started afterwards sees legacy Keras.

:func:`import_tfmot` therefore resolves the ``tf.keras`` loaders to Keras 3 first, imports tfmot (which
then uses tf_keras internally, as it must), and restores ``TF_USE_LEGACY_KERAS`` to exactly what it was
(unset stays unset).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tfaccel.pruning.pruning_schedule import PruningSchedule, is_tfmot_schedule

_ENV = "TF_USE_LEGACY_KERAS"


def _resolve_tf_keras_loaders() -> list[str]:
    """Make every lazy Keras loader of TensorFlow (``tf.keras``, ``tf.optimizers``, ``tf.losses``,
    ``tf.metrics``, ``tf.initializers`` and their ``tf.compat.v1/v2`` twins) pick its Keras now, with
    the environment as it is. Returns the names of the loaders it resolved."""
    import tensorflow as tf
    from tensorflow.python.util.lazy_loader import KerasLazyLoader

    resolved = []
    modules = {"tf": tf}
    compat = vars(tf).get("compat")
    for version in ("v1", "v2"):
        mod = getattr(compat, version, None) if compat is not None else None
        if mod is not None:
            modules[f"tf.compat.{version}"] = mod
    for prefix, mod in modules.items():
        for name, value in list(vars(mod).items()):
            if isinstance(value, KerasLazyLoader) and not vars(value).get("_tfll_initialized", True):
                value._initialize()
                resolved.append(f"{prefix}.{name}")
    return resolved


def import_tfmot():
    """Import ``tensorflow_model_optimization`` and leave ``tf.keras`` and the environment as they were.

    Returns:
        The ``tensorflow_model_optimization`` module.

    Raises:
        MissingDependencyError: tfmot or tf_keras is not installed.

    Example:
        >>> tfmot = import_tfmot()  # doctest: +SKIP
        >>> import tensorflow as tf; tf.keras.__version__.startswith("3.")  # doctest: +SKIP
        True
    """
    from tfaccel.compat import require

    if "tensorflow_model_optimization" in sys.modules:
        return sys.modules["tensorflow_model_optimization"]
    require("tf_keras", pip_name="tf-keras", purpose="pruning tf_keras models through tfmot")
    _resolve_tf_keras_loaders()
    before = os.environ.get(_ENV)
    try:
        tfmot = require("tensorflow_model_optimization", pip_name="tensorflow-model-optimization",
                        purpose="pruning tf_keras (Keras 2) models")
    finally:
        if before is None:
            os.environ.pop(_ENV, None)
        else:
            os.environ[_ENV] = before
    return tfmot


def to_tfmot_schedule(schedule: Any):
    """The tfmot schedule with the same parameters (a tfmot schedule is returned as it is)."""
    if is_tfmot_schedule(schedule):
        return schedule
    tfmot = import_tfmot()
    if isinstance(schedule, PruningSchedule):
        cls = getattr(tfmot.sparsity.keras, type(schedule).__name__)
        return cls(**schedule.get_config())
    raise ValueError(
        "A tf_keras model is pruned by tfmot, which needs a ConstantSparsity/PolynomialDecay schedule. "
        f"Received: pruning_schedule={schedule!r}"
    )


def prune_tf_keras(model, schedule: Any, sparsity_m_by_n=None):
    """``tfmot.sparsity.keras.prune_low_magnitude`` on a tf_keras model (returns tfmot's new model).

    Train it with :func:`tf_keras_callbacks` and finish with :func:`strip_tf_keras`.

    Example:
        >>> pruned = prune_tf_keras(tf_keras_model, ConstantSparsity(0.5, 0, frequency=1))  # doctest: +SKIP
    """
    tfmot = import_tfmot()
    kwargs = {"pruning_schedule": to_tfmot_schedule(schedule)}
    if sparsity_m_by_n:
        kwargs["sparsity_m_by_n"] = tuple(sparsity_m_by_n)
    return tfmot.sparsity.keras.prune_low_magnitude(model, **kwargs)


def strip_tf_keras(model):
    """``tfmot.sparsity.keras.strip_pruning``: the plain tf_keras model with pruned weights at zero."""
    return import_tfmot().sparsity.keras.strip_pruning(model)


def tf_keras_callbacks(log_dir: str | None = None) -> list:
    """tfmot's ``UpdatePruningStep`` (and ``PruningSummaries`` into ``log_dir``) for a tf_keras ``fit``.

    Example:
        >>> pruned.fit(x, y, callbacks=tf_keras_callbacks("logs"))  # doctest: +SKIP
    """
    from tfaccel.compat import require

    sk = import_tfmot().sparsity.keras
    callbacks = [sk.UpdatePruningStep()]
    if log_dir is not None:
        # tfmot logs with tf.summary.scalar, which needs the tensorboard package (TF 2.21 does not
        # install it; tfaccel's own UpdatePruningStep writes its scalars without it).
        require("tensorboard", purpose="tfmot's PruningSummaries (TensorBoard logging of tf_keras pruning)")
        callbacks.append(sk.PruningSummaries(log_dir=str(log_dir)))
    return callbacks
