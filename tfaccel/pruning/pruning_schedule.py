"""Pruning schedules: when to prune, and to which sparsity, at each training step.

The two classes mirror ``tfmot.sparsity.keras.ConstantSparsity`` and ``PolynomialDecay``
(tensorflow-model-optimization 0.8.1, ``python/core/sparsity/keras/pruning_schedule.py``): same
arguments, same validation, and the same TensorFlow ops in the same order, so ``schedule(step)``
returns bit-identical ``(should_prune, sparsity)`` tensors at every step. tfmot itself is not
imported: it switches ``tf.keras`` to tf_keras for the whole process.

Semantics (as in tfmot):

* ``should_prune`` is True when ``begin_step <= step <= end_step`` (or ``end_step == -1``, prune
  forever) and ``(step - begin_step) % frequency == 0``;
* the training step seen by a schedule starts at 1 on the first training batch (the
  :class:`~tfaccel.pruning.UpdatePruningStep` callback counts like tfmot's ``pruning_step``).

A tfmot schedule object (or any callable ``schedule(step) -> (should_prune, sparsity)`` with a
``get_config``) is accepted wherever a schedule is expected; see :func:`as_schedule`.
"""

from __future__ import annotations

import abc
from typing import Any

# tfmot's get_config() returns {"class_name": ..., "config": {...}}; Keras' convention (and
# from_config) is the flat constructor arguments. get_config here is flat, serialize() is tfmot's form.


class PruningSchedule(abc.ABC):
    """Base class: ``schedule(step)`` returns ``(should_prune, sparsity)`` as TF tensors
    (bool, float32), like tfmot's ``PruningSchedule``."""

    @staticmethod
    def _should_prune_in_step(step, begin_step: int, end_step: int, frequency: int):
        import tensorflow as tf

        is_in_pruning_range = tf.math.logical_and(
            tf.math.greater_equal(step, begin_step),
            # end_step == -1: keep pruning forever.
            tf.math.logical_or(tf.math.less_equal(step, end_step), tf.math.less(end_step, 0)),
        )
        is_pruning_turn = tf.math.equal(tf.math.floormod(tf.math.subtract(step, begin_step), frequency), 0)
        return tf.math.logical_and(is_in_pruning_range, is_pruning_turn)

    @staticmethod
    def _validate_steps(begin_step, end_step, frequency, allow_negative_1: bool) -> None:
        for name, v in (("begin_step", begin_step), ("end_step", end_step), ("frequency", frequency)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name} must be an integer. Received: {name}={v!r}")
        if begin_step < 0:
            raise ValueError(f"begin_step must be >= 0. Received: begin_step={begin_step}")
        if end_step == -1 and not allow_negative_1:
            raise ValueError(
                "end_step cannot be -1 for a schedule that decays towards its final sparsity at end_step. "
                f"Received: end_step={end_step}"
            )
        if end_step != -1:
            if end_step < 0:
                raise ValueError(f"end_step must be -1 (prune until training ends) or >= 0. Received: end_step={end_step}")
            if end_step < begin_step:
                raise ValueError(
                    f"end_step must be >= begin_step. Received: begin_step={begin_step}, end_step={end_step}"
                )
        if frequency <= 0:
            raise ValueError(f"frequency must be > 0. Received: frequency={frequency}")

    @staticmethod
    def _validate_sparsity(value, name: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a number in [0, 1). Received: {name}={value!r}")

    @abc.abstractmethod
    def __call__(self, step):
        """``(should_prune, sparsity)`` at ``step``."""

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """The constructor arguments (flat, Keras style)."""

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PruningSchedule:
        """Build from :meth:`get_config` output; tfmot's nested ``{"class_name", "config"}`` form is
        accepted too."""
        if "config" in config and "class_name" in config:
            if config["class_name"] != cls.__name__:
                raise ValueError(
                    f"{cls.__name__}.from_config got a config for {config['class_name']!r}. "
                    "Use tfaccel.pruning.deserialize_schedule to build any schedule from its config."
                )
            config = config["config"]
        return cls(**config)

    def serialize(self) -> dict[str, Any]:
        """``{"class_name": ..., "config": ...}``, the form tfmot's ``get_config`` returns."""
        return {"class_name": type(self).__name__, "config": self.get_config()}

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self) -> int:
        return hash((type(self).__name__, tuple(sorted(self.get_config().items()))))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class ConstantSparsity(PruningSchedule):
    """Prune to a constant sparsity every ``frequency`` steps in ``[begin_step, end_step]``.

    Args:
        target_sparsity: fraction of weights set to zero, in [0, 1).
        begin_step: first step at which pruning may happen (>= 0).
        end_step: last step at which pruning may happen; -1 means until training ends.
        frequency: prune only every ``frequency`` steps (counted from ``begin_step``).

    Example:
        >>> s = ConstantSparsity(0.5, begin_step=0, frequency=10)
        >>> [bool(s(step)[0]) for step in (0, 5, 10)], float(s(10)[1])
        ([True, False, True], 0.5)
    """

    def __init__(self, target_sparsity: float, begin_step: int, end_step: int = -1, frequency: int = 100):
        self._validate_steps(begin_step, end_step, frequency, allow_negative_1=True)
        self._validate_sparsity(target_sparsity, "target_sparsity")
        self.target_sparsity = target_sparsity
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency

    def __call__(self, step):
        import tensorflow as tf

        return (
            self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency),
            tf.constant(self.target_sparsity, dtype=tf.float32),
        )

    def get_config(self) -> dict[str, Any]:
        return {"target_sparsity": self.target_sparsity, "begin_step": self.begin_step,
                "end_step": self.end_step, "frequency": self.frequency}


class PolynomialDecay(PruningSchedule):
    """Sparsity rising from ``initial_sparsity`` to ``final_sparsity`` between ``begin_step`` and
    ``end_step``: ``final + (initial - final) * (1 - (step - begin) / (end - begin)) ** power``
    (Zhu & Gupta 2017, arXiv:1710.01878). Fast at first, then levelling off.

    Args:
        initial_sparsity: sparsity at ``begin_step``, in [0, 1).
        final_sparsity: sparsity from ``end_step`` on, in [0, 1).
        begin_step: first pruning step (>= 0).
        end_step: step at which ``final_sparsity`` is reached (>= begin_step; -1 is not allowed).
        power: exponent of the decay (3 in tfmot and in the paper).
        frequency: prune only every ``frequency`` steps (counted from ``begin_step``).

    Example:
        >>> s = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=100, frequency=10)
        >>> round(float(s(50)[1]), 4), float(s(100)[1]), float(s(1000)[1])
        (0.4375, 0.5, 0.5)
    """

    def __init__(self, initial_sparsity: float, final_sparsity: float, begin_step: int, end_step: int,
                 power: float = 3, frequency: int = 100):
        self._validate_steps(begin_step, end_step, frequency, allow_negative_1=False)
        self._validate_sparsity(initial_sparsity, "initial_sparsity")
        self._validate_sparsity(final_sparsity, "final_sparsity")
        if isinstance(power, bool) or not isinstance(power, (int, float)):
            raise ValueError(f"power must be a number. Received: power={power!r}")
        self.initial_sparsity = initial_sparsity
        self.final_sparsity = final_sparsity
        self.power = power
        self.begin_step = begin_step
        self.end_step = end_step
        self.frequency = frequency

    def __call__(self, step):
        import tensorflow as tf

        # The same ops, in the same order and dtypes, as tfmot's PolynomialDecay.__call__.
        with tf.name_scope("polynomial_decay_pruning_schedule"):
            p = tf.math.minimum(
                1.0,
                tf.math.maximum(
                    0.0,
                    tf.math.divide(tf.dtypes.cast(step - self.begin_step, tf.float32), self.end_step - self.begin_step),
                ),
            )
            sparsity = tf.math.add(
                tf.math.multiply(self.initial_sparsity - self.final_sparsity, tf.math.pow(1 - p, self.power)),
                self.final_sparsity,
                name="sparsity",
            )
        return self._should_prune_in_step(step, self.begin_step, self.end_step, self.frequency), sparsity

    def get_config(self) -> dict[str, Any]:
        return {"initial_sparsity": self.initial_sparsity, "final_sparsity": self.final_sparsity,
                "power": self.power, "begin_step": self.begin_step, "end_step": self.end_step,
                "frequency": self.frequency}


SCHEDULES: dict[str, type[PruningSchedule]] = {"ConstantSparsity": ConstantSparsity,
                                               "PolynomialDecay": PolynomialDecay}


def deserialize_schedule(config: dict[str, Any]) -> PruningSchedule:
    """A schedule from ``{"class_name": "PolynomialDecay", "config": {...}}`` (tfmot's ``get_config``
    form, also what :meth:`PruningSchedule.serialize` writes).

    Example:
        >>> deserialize_schedule({"class_name": "ConstantSparsity",
        ...                       "config": {"target_sparsity": 0.5, "begin_step": 0}})
        ConstantSparsity(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=100)
    """
    if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
        raise ValueError(
            "A serialized schedule is a dict {'class_name': ..., 'config': {...}}. "
            f"Received: config={config!r}"
        )
    name = config["class_name"]
    if name not in SCHEDULES:
        raise ValueError(f"Unknown pruning schedule {name!r}; known: {sorted(SCHEDULES)}. Received: class_name={name!r}")
    return SCHEDULES[name](**config["config"])


def is_tfmot_schedule(obj: Any) -> bool:
    """True for a schedule object from tensorflow-model-optimization (checked without importing it)."""
    return any(c.__module__.startswith("tensorflow_model_optimization") for c in type(obj).__mro__)


def as_schedule(schedule: Any) -> Any:
    """Accept a tfaccel schedule, a tfmot schedule (used as it is), or a serialized config dict.

    Example:
        >>> as_schedule({"class_name": "ConstantSparsity", "config": {"target_sparsity": 0.5, "begin_step": 0}})
        ConstantSparsity(target_sparsity=0.5, begin_step=0, end_step=-1, frequency=100)
    """
    if isinstance(schedule, PruningSchedule):
        return schedule
    if isinstance(schedule, dict):
        return deserialize_schedule(schedule)
    if is_tfmot_schedule(schedule) or (callable(schedule) and hasattr(schedule, "get_config")):
        return schedule
    raise ValueError(
        "pruning_schedule must be a tfaccel.pruning schedule (ConstantSparsity, PolynomialDecay), a tfmot "
        f"schedule, or a serialized schedule dict. Received: pruning_schedule={schedule!r}"
    )


def serialize_schedule(schedule: Any) -> dict[str, Any]:
    """``{"class_name", "config"}`` for a tfaccel or tfmot schedule (tfmot's get_config is already this)."""
    if isinstance(schedule, PruningSchedule):
        return schedule.serialize()
    config = schedule.get_config()
    if isinstance(config, dict) and "class_name" in config and "config" in config:
        return config
    return {"class_name": type(schedule).__name__, "config": config}
