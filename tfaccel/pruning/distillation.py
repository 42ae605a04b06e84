"""Recover accuracy after structured pruning: fine-tune the pruned model (student) to match the
original (teacher), with Keras 3's own ``keras.distillation.Distiller``."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from tfaccel.errors import OverBudget


class DistillationOverBudget(OverBudget):
    """Distillation stopped because its measured step time says it would not finish within
    ``max_seconds`` (raised by :func:`distill`; ``projected_s`` and ``max_seconds`` say by how much)."""


def _budget_callback(total_steps: int, max_seconds: float):
    """A Keras callback that stops a fit whose projected time exceeds ``max_seconds``: after the third
    batch (the first one traces), the median step time so far times the steps left, plus the time spent.
    Once half the steps are done the run is allowed 1.5x the budget (stopping then wastes more than it
    saves)."""
    import keras

    class StopOverBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = self.last = time.perf_counter()
            self.steps: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now
            done = len(self.steps)
            if done < 3:
                return
            step = float(np.median(self.steps[1:]))
            projected = (now - self.t0) + step * (total_steps - done)
            allowed = max_seconds * (1.5 if done >= total_steps / 2 else 1.0)
            if projected > allowed:
                raise DistillationOverBudget(
                    f"distillation would take about {projected:.0f}s ({total_steps} steps at {step:.2f}s each, "
                    f"measured over {done} steps), more than the {max_seconds:.0f}s left; stopped after "
                    f"{now - self.t0:.0f}s", projected, max_seconds)

    return StopOverBudget()


def distill(
    teacher,
    student,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    *,
    epochs: int = 2,
    batch_size: int = 16,
    learning_rate: float = 2e-4,
    temperature: float = 2.0,
    student_loss_weight: float = 0.5,
    seed: int | None = 0,
    callbacks: list | None = None,
    verbose: int = 0,
    max_seconds: float | None = None,
) -> dict[str, list[float]]:
    """Fine-tune ``student`` towards ``teacher`` on ``inputs`` (and ``labels`` if given).

    Single-tensor outputs (classifier or LM logits) use ``keras.distillation.LogitsDistillation``
    (KL divergence of temperature-softened probabilities); dict outputs (a backbone's
    ``sequence_output`` / ``pooled_output``) use ``FeatureDistillation`` with mean squared error.
    With labels the loss is ``student_loss_weight * cross-entropy + (1 - student_loss_weight) *
    distillation``; without, distillation alone. The teacher is not changed (its ``trainable`` flag is
    restored afterwards).

    Args:
        teacher: the original model.
        student: the pruned model; trained in place.
        inputs: a dict of input arrays (e.g. token_ids, segment_ids, padding_mask).
        labels: integer class labels for classifiers, or None.
        epochs, batch_size, learning_rate: AdamW fine-tuning settings; the learning rate decays
            linearly from ``learning_rate`` to 0 over the run.
        temperature: softening temperature for logits distillation.
        student_loss_weight: weight of the label loss, in [0, 1] (ignored without labels).
        seed: seeds Keras (dropout) and the shuffling, so a run can be repeated; None leaves them be.
        callbacks: extra Keras callbacks.
        verbose: Keras fit verbosity.
        max_seconds: stop (raise :class:`DistillationOverBudget`) as soon as the measured step time
            says the whole run would take longer than this; None: no limit.

    Returns:
        The fit history (loss per epoch).

    Raises:
        DistillationOverBudget: the run would not finish within ``max_seconds`` (the student is left
            partly trained: discard it).

    Example:
        >>> distill(original, pruned, train_inputs, train_labels, epochs=1)  # doctest: +SKIP
    """
    import keras
    import tensorflow as tf

    for name, v, ok in (("epochs", epochs, isinstance(epochs, int) and epochs >= 1),
                        ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                        ("learning_rate", learning_rate, isinstance(learning_rate, (int, float)) and learning_rate > 0),
                        ("temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0)):
        if not ok or isinstance(v, bool):
            raise ValueError(f"{name} must be a positive number. Received: {name}={v!r}")
    if not 0.0 <= student_loss_weight <= 1.0:
        raise ValueError(f"student_loss_weight must be in [0, 1]. Received: student_loss_weight={student_loss_weight!r}")

    if max_seconds is not None and max_seconds <= 0:
        raise DistillationOverBudget(f"no time left for distillation ({max_seconds:.0f}s left); not started",
                                     math.inf, max_seconds)
    structure = student.outputs if len(student.outputs) > 1 else student.outputs[0]
    out_struct = getattr(student, "_outputs_struct", structure)
    if isinstance(out_struct, dict):
        loss = keras.distillation.FeatureDistillation(loss={k: "mse" for k in out_struct})
    else:
        loss = keras.distillation.LogitsDistillation(temperature=temperature)
    weight = student_loss_weight if labels is not None else 0.0
    if seed is not None:
        keras.utils.set_random_seed(seed)
    was_trainable = teacher.trainable
    try:
        distiller = keras.distillation.Distiller(teacher=teacher, student=student, distillation_losses=loss,
                                                 student_loss_weight=weight)
        n = len(next(iter(inputs.values())))
        total_steps = epochs * -(-n // batch_size)
        # Linear decay to zero (the BERT fine-tuning recipe): with few steps, a constant rate leaves the
        # student wherever the last noisy updates put it, and held-out accuracy varies run to run.
        schedule = keras.optimizers.schedules.PolynomialDecay(learning_rate, decay_steps=total_steps,
                                                              end_learning_rate=0.0, power=1.0)
        distiller.compile(optimizer=keras.optimizers.AdamW(schedule),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        data = dict(inputs) if labels is None else (dict(inputs), np.asarray(labels))
        ds = tf.data.Dataset.from_tensor_slices(data).shuffle(n, seed=seed).batch(batch_size)
        extra = [] if max_seconds is None else [_budget_callback(total_steps, max_seconds)]
        history = distiller.fit(ds, epochs=epochs, verbose=verbose, callbacks=(callbacks or []) + extra)
    finally:
        teacher.trainable = was_trainable
    return history.history


def distillation_defaults() -> dict[str, Any]:
    """The default fine-tuning settings of :func:`distill` (what the pipeline step records)."""
    return {"epochs": 2, "batch_size": 16, "learning_rate": 2e-4, "temperature": 2.0, "student_loss_weight": 0.5}
