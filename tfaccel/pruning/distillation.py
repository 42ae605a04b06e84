"""Recover accuracy after structured pruning: fine-tune the pruned model (student) to match the
original (teacher), with Keras 3's own ``keras.distillation.Distiller``.

The recipe (:func:`distill`), chosen so that the same command gives the same model:

* **Seeded everywhere.** Python, NumPy, TensorFlow and Keras (``keras.utils.set_random_seed``), the
  order of the training data (a seeded shuffle), the held-back slice, and the student's dropout.
  Dropout needs its own step: a Keras layer's ``SeedGenerator`` takes its starting state from Python's
  ``random`` when the layer is *built*, i.e. when the pruned model was rebuilt, before any seed this
  function sets. Its state is a variable, so :func:`seed_dropout` sets it from the seed. Without that,
  two runs with the same seed on bert-tiny differed by up to 1.6e-3 in their weights, and minilm-bbc
  held-out accuracy varied 0.910-0.945 between runs.
* **Soft targets and hard labels**: ``LogitsDistillation`` (KL divergence of temperature-softened
  probabilities, scaled by T^2; given a ``KLDivergence`` instance, as its default loss string skips the
  softmax in Keras 3.15: :func:`distillation_loss`) plus cross-entropy on the labels when there are
  labels, weighted by ``student_loss_weight``. Dict outputs (a backbone's ``sequence_output`` / ``pooled_output``) use
  ``FeatureDistillation`` with mean squared error.
* **Learning-rate schedule**: linear warm-up over the first ``warmup`` share of the steps, then cosine
  decay to zero (``keras.optimizers.schedules.CosineDecay`` with ``warmup_target``).
* **Early stopping on a held-back slice of the training data** (``holdout``, stratified by label):
  the distillation loss on it (:data:`MONITOR`) after every epoch; training stops after ``patience`` epochs without
  improvement and the student ends with the weights of its best epoch (``keras.callbacks.EarlyStopping``
  with ``restore_best_weights``). Too little data to hold back (fewer than :data:`MIN_HOLDOUT`
  examples): every epoch runs and the last one is kept.

What ``keras.distillation`` does not do, and this module adds as Keras callbacks around
``Distiller.fit``: a deadline (``max_seconds``: ``--auto``'s time budget; the run stops with
:class:`DistillationOverBudget` as soon as its measured step time says it would not finish, instead of
overrunning), progress lines through the caller's ``log`` (one per epoch, with the held-back
distillation loss), and the dropout seeding above.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tfaccel.errors import OverBudget

#: The fewest held-back examples early stopping is based on; with less data every epoch runs.
MIN_HOLDOUT = 16
#: What early stopping watches: the distillation loss on the held-back slice, i.e. how far the student is
#: from the teacher there, which is what the step is validated on (outputs and accuracy against the original).
#: Not the total loss: its label term on a few dozen examples is dominated by the few the teacher itself gets
#: wrong (on minilm-bbc's 40 held-back articles it rose in the second epoch for two seeds of three while the
#: distillation term fell).
MONITOR = "val_distillation_loss"
#: The default recipe (what :func:`distill` and the ``prune-structured`` step use unless told).
DEFAULTS: dict[str, Any] = {"epochs": 3, "batch_size": 16, "learning_rate": 2e-4, "temperature": 2.0,
                            "student_loss_weight": 0.5, "warmup": 0.1, "holdout": 0.1, "patience": 1, "seed": 0}


class DistillationOverBudget(OverBudget):
    """Distillation stopped because its measured step time says it would not finish within
    ``max_seconds`` (raised by :func:`distill`; ``projected_s`` and ``max_seconds`` say by how much)."""


@dataclasses.dataclass
class DistillationResult:
    """What a :func:`distill` run did.

    Attributes:
        history: Keras' per-epoch history (``loss``, ``student_loss``, ``distillation_loss``, and the
            ``val_`` ones when a slice was held back).
        epochs: the most epochs the run was allowed.
        epochs_run: epochs trained (fewer than ``epochs`` when early stopping ended the run).
        best_epoch: the epoch (1-based) whose weights the student kept.
        held_back: training examples held back for early stopping (0: none, every epoch kept).
        trained_on: examples the student was trained on.
        seconds: wall time of the run.
    """

    history: dict[str, list[float]]
    epochs: int
    epochs_run: int
    best_epoch: int
    held_back: int
    trained_on: int
    seconds: float

    @property
    def best_held_back_loss(self) -> float | None:
        """The held-back distillation loss of the kept epoch (None without a held-back slice)."""
        val = self.history.get(MONITOR)
        return float(val[self.best_epoch - 1]) if val else None

    def describe(self) -> str:
        """One line for a report note."""
        if not self.held_back:
            return (f"{self.epochs_run} epoch(s) on {self.trained_on} examples; too few to hold back "
                    f"{MIN_HOLDOUT} for early stopping, so the last epoch is kept")
        stopped = f" of {self.epochs} (stopped early)" if self.epochs_run < self.epochs else ""
        return (f"{self.epochs_run} epoch(s){stopped} on {self.trained_on} examples; kept epoch "
                f"{self.best_epoch} (held-back distillation loss {self.best_held_back_loss:.4f} on {self.held_back} examples)")


def seed_dropout(model, seed: int) -> int:
    """Set the state of every ``SeedGenerator`` of ``model`` (its dropout layers') from ``seed``, so a
    model built at any point of a process draws the same dropout masks; returns how many were set.

    Example:
        >>> seed_dropout(student, 0)  # doctest: +SKIP
        8
    """
    rng = np.random.default_rng(seed)
    states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
    for v in states:
        v.assign(np.array([int(rng.integers(1, 2**30)), 0], dtype=v.dtype))
    return len(states)


def holdout_split(n: int, labels: np.ndarray | None, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_index, held_back_index)``: a seeded, label-stratified slice of ``share`` of ``n`` examples
    (every k-th example of a shuffled order sorted by label), or no slice when it would hold fewer than
    :data:`MIN_HOLDOUT`.

    Example:
        >>> train, held = holdout_split(400, labels, 0.1, seed=0)  # doctest: +SKIP
        >>> len(train), len(held)  # doctest: +SKIP
        (360, 40)
    """
    order = np.random.default_rng(seed).permutation(n)
    if share <= 0 or n * share < MIN_HOLDOUT:
        return np.sort(order), np.array([], dtype=int)
    if labels is not None:
        order = order[np.argsort(np.asarray(labels)[order], kind="stable")]
    step = max(2, int(round(1.0 / share)))
    held = np.zeros(n, dtype=bool)
    held[order[::step]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def _budget_callback(train_steps: int, eval_steps: int, max_seconds: float):
    """A Keras callback that stops a fit whose projected time exceeds ``max_seconds``: after the third
    batch (the first one traces), the median step time so far times the steps left, plus the time spent.
    A held-back evaluation batch counts as half a training step (a forward pass of teacher and student,
    no backward). Once half the steps are done the run is allowed 1.5x the budget (stopping then wastes
    more than it saves)."""
    import keras

    total_steps = train_steps + 0.5 * eval_steps

    class StopOverBudget(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = time.perf_counter()
            self.steps: list[float] = []
            self.last: float | None = None

        def on_train_batch_begin(self, batch, logs=None):
            self.last = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            now = time.perf_counter()
            self.steps.append(now - self.last)
            done = len(self.steps)
            if done < 3:
                return
            step = float(np.median(self.steps[1:]))
            projected = (now - self.t0) + step * (total_steps - done * total_steps / train_steps)
            allowed = max_seconds * (1.5 if done >= train_steps / 2 else 1.0)
            if projected > allowed:
                raise DistillationOverBudget(
                    f"distillation would take about {projected:.0f}s ({train_steps} steps at {step:.2f}s each, "
                    f"measured over {done} steps), more than the {max_seconds:.0f}s left; stopped after "
                    f"{now - self.t0:.0f}s", projected, max_seconds)

    return StopOverBudget()


def _progress_callback(log: Callable[[str], None], epochs: int):
    """One line per epoch: the training loss, the held-back distillation loss, seconds."""
    import keras

    class Progress(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.t0 = time.perf_counter()
            self.best = math.inf

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            line = f"    distillation epoch {epoch + 1}/{epochs}: loss {logs.get('loss', math.nan):.4f}"
            if MONITOR in logs:
                val = float(logs[MONITOR])
                line += f", held-back distillation loss {val:.4f}" + (" (best so far)" if val < self.best else "")
                self.best = min(self.best, val)
            log(line + f", {time.perf_counter() - self.t0:.0f}s")

    return Progress()


def distillation_loss(student, temperature: float):
    """The ``keras.distillation`` loss for ``student``'s outputs: ``LogitsDistillation`` (KL divergence
    of the temperature-softened probabilities, times T^2) for a single tensor of logits,
    ``FeatureDistillation`` (mean squared error per output) for dict outputs (a backbone's
    ``sequence_output`` / ``pooled_output``).

    Example:
        >>> distillation_loss(classifier, 2.0).compute_loss(teacher_logits, student_logits)  # doctest: +SKIP
    """
    import keras

    structure = student.outputs if len(student.outputs) > 1 else student.outputs[0]
    out_struct = getattr(student, "_outputs_struct", structure)
    if isinstance(out_struct, dict):
        return keras.distillation.FeatureDistillation(loss={k: "mse" for k in out_struct})
    # A KLDivergence *instance*, not LogitsDistillation's default loss="kl_divergence": Keras 3.15.1 turns that
    # string into the function keras.losses.kl_divergence, and applies softmax only when the loss is an instance
    # of the class, so with the default it computes "KL" on the clipped raw logits (4.38 where the softened KL
    # times T^2 is 0.61 on one 3-class example). tfaccel's distillation had that loss until this change.
    return keras.distillation.LogitsDistillation(temperature=temperature, loss=keras.losses.KLDivergence())


def _check_settings(epochs, batch_size, learning_rate, temperature, student_loss_weight, warmup, holdout, patience,
                    seed) -> None:
    positive = (("epochs", epochs, isinstance(epochs, int) and epochs >= 1),
                ("batch_size", batch_size, isinstance(batch_size, int) and batch_size >= 1),
                ("learning_rate", learning_rate, isinstance(learning_rate, (int, float)) and learning_rate > 0),
                ("temperature", temperature, isinstance(temperature, (int, float)) and temperature > 0),
                ("patience", patience, isinstance(patience, int) and patience >= 1))
    for name, v, ok in positive:
        if not ok or isinstance(v, bool):
            raise ValueError(f"{name} must be a positive number. Received: {name}={v!r}")
    for name, v, hi in (("student_loss_weight", student_loss_weight, 1.0), ("warmup", warmup, 0.5),
                        ("holdout", holdout, 0.5)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= hi:
            raise ValueError(f"{name} must be in [0, {hi:g}]. Received: {name}={v!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None. Received: seed={seed!r}")


def distill(
    teacher,
    student,
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    *,
    epochs: int = DEFAULTS["epochs"],
    batch_size: int = DEFAULTS["batch_size"],
    learning_rate: float = DEFAULTS["learning_rate"],
    temperature: float = DEFAULTS["temperature"],
    student_loss_weight: float = DEFAULTS["student_loss_weight"],
    warmup: float = DEFAULTS["warmup"],
    holdout: float = DEFAULTS["holdout"],
    patience: int = DEFAULTS["patience"],
    seed: int | None = DEFAULTS["seed"],
    callbacks: list | None = None,
    verbose: int = 0,
    max_seconds: float | None = None,
    log: Callable[[str], None] | None = None,
) -> DistillationResult:
    """Fine-tune ``student`` towards ``teacher`` on ``inputs`` (and ``labels`` if given), with the
    module's recipe: seeded, soft targets plus hard labels, warm-up and cosine decay, early stopping
    on a held-back slice with the best epoch kept.

    The loss is ``student_loss_weight * cross-entropy + (1 - student_loss_weight) * distillation`` with
    labels, distillation alone without. The teacher is not changed (its ``trainable`` flag is restored
    afterwards). Two calls with the same seed, teacher, starting student and data give the same weights
    on the same machine.

    Args:
        teacher: the original model.
        student: the pruned model; trained in place.
        inputs: a dict of input arrays (e.g. token_ids, segment_ids, padding_mask).
        labels: integer class labels for classifiers, or None.
        epochs: the most epochs to train (fewer when early stopping ends the run).
        batch_size, learning_rate: AdamW settings; ``learning_rate`` is the peak of the schedule.
        temperature: softening temperature for logits distillation.
        student_loss_weight: weight of the label loss, in [0, 1] (ignored without labels).
        warmup: share of the steps over which the learning rate rises linearly from 0, in [0, 0.5].
        holdout: share of the examples held back for early stopping, in [0, 0.5] (0: none).
        patience: epochs without a better held-back distillation loss before training stops.
        seed: seeds Python, NumPy, TensorFlow, Keras, the data order, the held-back slice and the
            student's dropout; None leaves them be (not reproducible).
        callbacks: extra Keras callbacks.
        verbose: Keras fit verbosity.
        max_seconds: stop (raise :class:`DistillationOverBudget`) as soon as the measured step time
            says the whole run would take longer than this; None: no limit.
        log: receives one progress line per epoch (None: silent).

    Returns:
        A :class:`DistillationResult` (history, epochs run, the epoch kept, held-back size).

    Raises:
        DistillationOverBudget: the run would not finish within ``max_seconds`` (the student is left
            partly trained: discard it).
        ValueError: a setting out of range (the message names it).

    Example:
        >>> result = distill(original, pruned, train_inputs, train_labels)  # doctest: +SKIP
        >>> result.describe()  # doctest: +SKIP
        '3 epoch(s) on 360 examples; kept epoch 3 (held-back distillation loss 0.0133 on 40 examples)'
    """
    import keras
    import tensorflow as tf

    _check_settings(epochs, batch_size, learning_rate, temperature, student_loss_weight, warmup, holdout, patience,
                    seed)
    if max_seconds is not None and max_seconds <= 0:
        raise DistillationOverBudget(f"no time left for distillation ({max_seconds:.0f}s left); not started",
                                     math.inf, max_seconds)
    t0 = time.perf_counter()
    loss = distillation_loss(student, temperature)
    weight = student_loss_weight if labels is not None else 0.0
    if seed is not None:
        keras.utils.set_random_seed(seed)
        seed_dropout(student, seed)
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    n = len(next(iter(inputs.values())))
    labels = None if labels is None else np.asarray(labels)
    train_idx, held_idx = holdout_split(n, labels, holdout, 0 if seed is None else seed)

    def dataset(idx, shuffle: bool):
        x = {k: v[idx] for k, v in inputs.items()}
        ds = tf.data.Dataset.from_tensor_slices(x if labels is None else (x, labels[idx]))
        return (ds.shuffle(len(idx), seed=seed) if shuffle else ds).batch(batch_size)

    train_steps_per_epoch = -(-len(train_idx) // batch_size)
    total_steps = epochs * train_steps_per_epoch
    # Warm-up then cosine decay to zero: with few steps, a constant rate leaves the student wherever the last
    # noisy updates put it; the warm-up keeps the first updates (from a freshly cut model) from overshooting.
    warmup_steps = int(round(warmup * total_steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup_steps else learning_rate, decay_steps=max(1, total_steps - warmup_steps), alpha=0.0,
        warmup_target=learning_rate if warmup_steps else None, warmup_steps=warmup_steps)
    fit_callbacks = list(callbacks or [])
    validation = None
    if len(held_idx):
        validation = dataset(held_idx, shuffle=False)
        fit_callbacks.append(keras.callbacks.EarlyStopping(monitor=MONITOR, mode="min", patience=patience,
                                                           restore_best_weights=True))
    if log is not None:
        fit_callbacks.append(_progress_callback(log, epochs))
    if max_seconds is not None:
        eval_steps = epochs * -(-len(held_idx) // batch_size)
        fit_callbacks.append(_budget_callback(total_steps, eval_steps, max_seconds))
    was_trainable = teacher.trainable
    try:
        distiller = keras.distillation.Distiller(teacher=teacher, student=student, distillation_losses=loss,
                                                 student_loss_weight=weight)
        distiller.compile(optimizer=keras.optimizers.AdamW(schedule),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = distiller.fit(dataset(train_idx, shuffle=True), epochs=epochs, validation_data=validation,
                                verbose=verbose, callbacks=fit_callbacks)
    finally:
        teacher.trainable = was_trainable
    hist = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    epochs_run = len(hist.get("loss", []))
    val = hist.get(MONITOR)
    best = int(np.argmin(val)) + 1 if val else epochs_run
    return DistillationResult(history=hist, epochs=epochs, epochs_run=epochs_run, best_epoch=best, held_back=len(held_idx),
                              trained_on=len(train_idx), seconds=time.perf_counter() - t0)


def distillation_defaults() -> dict[str, Any]:
    """The default fine-tuning settings of :func:`distill` (what the pipeline step records)."""
    return dict(DEFAULTS)
