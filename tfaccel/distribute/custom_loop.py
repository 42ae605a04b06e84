"""DistributedTrainingLoop: a training loop that runs on every tf.distribute strategy, including
MultiWorkerMirroredStrategy, where Keras 3 ``fit`` fails (keras-team/keras#20585:
``ValueError: Attempt to convert a value (PerReplica...)``).

Each step: ``strategy.experimental_distribute_dataset`` hands every replica its slice of the global
batch; ``strategy.run`` computes per-example losses, averages them over the *global* batch with
``tf.nn.compute_average_loss`` and applies the gradients with the model's own optimizer (Keras
all-reduces them across replicas and workers with TensorFlow's collective runtime). Loss scaling
(mixed_float16) and XLA (``jit_compile``) compose as in Keras' own ``train_step``.

It keeps Keras' conventions: the model's compiled loss and metrics, a ``keras.callbacks.CallbackList``
(``on_train_begin``, ``on_epoch_begin/end``, ``on_train_batch_begin/end`` with logs), a ``History``
returned and set as ``model.history``, Keras' progress bar, ``model.stop_training``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tfaccel.distribute.checkpointing import TrainingCheckpoint


def per_example_loss_fn(loss: Any) -> Callable:
    """A function (y_true, y_pred) -> per-example loss (shape [batch]) from a compiled Keras loss.

    Keras ``Loss`` objects are rebuilt with ``reduction=None``; loss names and plain functions
    already return one value per example (or per token, which is averaged per example).

    Raises:
        ValueError: the loss is missing, or is a list/dict (one loss per output) the loop does not support.
    """
    import keras
    import tensorflow as tf

    if loss is None:
        raise ValueError("The model has no loss. Compile it with one (model.compile(loss=...)) or pass "
                         "DistributedModel(..., loss=...). Received: loss=None")
    if isinstance(loss, (list, tuple, dict)):
        raise ValueError("tfaccel's distributed loop supports one loss for a single-output model. Pass a function "
                         "loss(y_true, y_pred) returning one value per example instead. "
                         f"Received: loss of type {type(loss).__name__}")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if isinstance(loss, keras.losses.Loss):
        config = {**loss.get_config(), "reduction": None}
        loss = type(loss).from_config(config)

    def fn(y_true, y_pred):
        values = tf.convert_to_tensor(loss(y_true, y_pred))
        values = tf.cast(values, "float32")
        if values.shape.rank and values.shape.rank > 1:
            values = tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))
        return values

    return fn


class DistributedTrainingLoop:
    """Train a compiled Keras model under a ``tf.distribute`` strategy.

    Args:
        model: a model built and compiled under ``strategy.scope()``.
        strategy: the strategy.
        global_batch_size: examples per step over all replicas (the loss is averaged over it).
        jit_compile: compile the forward and backward pass with XLA.

    Example:
        >>> loop = DistributedTrainingLoop(model, strategy, global_batch_size=16)  # doctest: +SKIP
        >>> history = loop.fit(lambda epoch, skip: batches(epoch, skip), epochs=2, steps_per_epoch=10)  # doctest: +SKIP
    """

    def __init__(self, model, strategy, global_batch_size: int, jit_compile: bool = False):
        self.model = model
        self.strategy = strategy
        self.global_batch_size = int(global_batch_size)
        self.jit_compile = bool(jit_compile)
        self._loss_fn = per_example_loss_fn(model.loss)
        self._train_function = None
        self._test_function = None
        self._metrics_built = False

    # ----------------------------------------------------------------------------------------------
    # One step
    def _loss_and_grads(self, x, y, sample_weight):
        import tensorflow as tf

        model = self.model
        with tf.GradientTape() as tape:
            y_pred = model(x, training=True)
            per_example = self._loss_fn(y, y_pred)
            loss = tf.nn.compute_average_loss(per_example, sample_weight=sample_weight,
                                              global_batch_size=self.global_batch_size)
            if model.losses:
                loss += tf.nn.scale_regularization_loss(tf.add_n([tf.cast(v, loss.dtype) for v in model.losses]))
            scaled = model.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, model.trainable_variables)
        return loss, grads, y_pred

    def make_train_function(self) -> Callable:
        """The distributed step: one global batch in, the global mean loss out."""
        import keras
        import tensorflow as tf

        if self._train_function is not None:
            return self._train_function
        model = self.model
        if not model.optimizer.built:  # its slots must exist before the step is traced
            with self.strategy.scope():
                model.optimizer.build(model.trainable_variables)
        loss_and_grads = tf.function(self._loss_and_grads, jit_compile=True) if self.jit_compile \
            else self._loss_and_grads

        def replica_step(data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            loss, grads, y_pred = loss_and_grads(x, y, sample_weight)
            # Keras' optimizer all-reduces (sums) the gradients across replicas and workers; the loss
            # was divided by the global batch, so the sum is the global-batch gradient.
            model.optimizer.apply(grads, model.trainable_variables)
            model.compute_metrics(x, y, y_pred, sample_weight)
            return loss

        # As in Keras' own trainer: the replica step is a function of its own, called on each replica,
        # not inlined once per replica (Grappler then spends minutes on mixed_float16 graphs).
        replica_step = tf.function(replica_step, reduce_retracing=True)

        self._train_function = self._on_all_replicas(replica_step)
        return self._train_function

    def make_test_function(self) -> Callable:
        """The distributed evaluation step: updates the metrics, returns the global mean loss."""
        import keras
        import tensorflow as tf

        if self._test_function is not None:
            return self._test_function
        model = self.model

        def replica_step(data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            y_pred = model(x, training=False)
            loss = tf.nn.compute_average_loss(self._loss_fn(y, y_pred), sample_weight=sample_weight,
                                              global_batch_size=self.global_batch_size)
            model.compute_metrics(x, y, y_pred, sample_weight)
            return loss

        self._test_function = self._on_all_replicas(replica_step)
        return self._test_function

    def _on_all_replicas(self, replica_step) -> Callable:
        """A tf.function running ``replica_step`` on every replica's slice of a distributed batch and
        summing the replicas' losses (each already divided by the global batch: the global mean)."""
        import tensorflow as tf

        @tf.function
        def step(dist_batch):
            per_replica = self.strategy.run(replica_step, args=(dist_batch,))
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        return step

    # ----------------------------------------------------------------------------------------------
    def build_metrics(self, batch) -> None:
        """Create the compiled metrics' variables in cross-replica context, from one (undistributed) batch."""
        import keras

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        with self.strategy.scope():
            y_pred = self.model(x, training=False)
            self.model.compute_metrics(x, y, y_pred, sample_weight)
        self.model.reset_metrics()
        self._metrics_built = True

    def _logs(self, loss_mean: float) -> dict[str, float]:
        logs = {"loss": loss_mean}
        for name, value in self.model.get_metrics_result().items():
            if name != "loss":
                logs[name] = float(value)
        return logs

    def fit(
        self,
        epoch_dataset: Callable[[int, int], Any],
        *,
        epochs: int,
        steps_per_epoch: int | None = None,
        callbacks: Sequence | None = None,
        verbose: int = 1,
        checkpoint: TrainingCheckpoint | None = None,
    ):
        """Train for ``epochs`` epochs.

        Args:
            epoch_dataset: ``f(epoch, skip_steps)`` -> the epoch's global batches (a ``tf.data.Dataset``)
                starting at step ``skip_steps``, in the same order on every worker.
            epochs: epochs to train (including epochs already done before a restore).
            steps_per_epoch: steps in an epoch (None: unknown, run each epoch to the end of its data).
            callbacks: Keras callbacks.
            verbose: 0 silent, 1 progress bar, 2 one line per epoch.
            checkpoint: save/restore training state; training resumes at its position.

        Returns:
            The ``keras.callbacks.History`` (also ``model.history``).
        """
        import keras

        model = self.model
        start_epoch, start_step = checkpoint.restore() if checkpoint is not None else (0, 0)
        if steps_per_epoch is not None and start_step >= steps_per_epoch:  # saved after an epoch's last step
            start_epoch, start_step = start_epoch + 1, 0
        global_step = int(checkpoint.global_step.numpy()) if checkpoint is not None else 0
        cbs = keras.callbacks.CallbackList(list(callbacks or []), add_history=True, add_progbar=verbose != 0,
                                           verbose=verbose, epochs=epochs, steps=steps_per_epoch, model=model)
        if start_epoch >= epochs:
            _log(f"checkpoint {checkpoint.latest} is at the end of epoch {start_epoch}: nothing left to train for "
                 f"epochs={epochs}")
        elif start_epoch or start_step:
            _log(f"resuming from checkpoint {checkpoint.latest}: epoch {start_epoch + 1}, step {start_step}, "
                 f"optimizer iterations {int(model.optimizer.iterations.numpy())}")
        train_function = self.make_train_function()
        model.stop_training = False
        last_saved = global_step if (start_epoch or start_step) else -1
        logs: dict[str, float] = {}
        cbs.on_train_begin()
        for epoch in range(start_epoch, epochs):
            skip = start_step if epoch == start_epoch else 0
            dataset = epoch_dataset(epoch, skip)
            if not self._metrics_built:
                self.build_metrics(next(iter(dataset)))
            model.reset_metrics()
            cbs.on_epoch_begin(epoch)
            loss_sum, seen = 0.0, 0
            step = skip
            for dist_batch in _batches(self.strategy.experimental_distribute_dataset(dataset),
                                       None if steps_per_epoch is None else steps_per_epoch - skip):
                cbs.on_train_batch_begin(step)
                loss = train_function(dist_batch)
                loss_sum += float(loss)
                seen += 1
                step += 1
                global_step += 1
                logs = self._logs(loss_sum / seen)
                cbs.on_train_batch_end(step - 1, logs)
                end_of_epoch = steps_per_epoch is not None and step == steps_per_epoch
                if checkpoint is not None and checkpoint.due(global_step) and not end_of_epoch:
                    checkpoint.save(epoch, step, global_step)  # (the epoch's last step is saved as the next epoch's start)
                    last_saved = global_step
                if model.stop_training:
                    break
            if seen == 0:
                raise ValueError(f"Epoch {epoch + 1} had no complete global batch of {self.global_batch_size} "
                                 "examples. Add data or lower per_replica_batch_size.")
            if checkpoint is not None and last_saved != global_step:
                finished = steps_per_epoch is None or step == steps_per_epoch  # else stopped early
                checkpoint.save(*((epoch + 1, 0) if finished else (epoch, step)), global_step)
                last_saved = global_step
            cbs.on_epoch_end(epoch, dict(logs))
            if model.stop_training:
                break
        cbs.on_train_end(dict(logs))
        return model.history

    def evaluate(self, dataset, steps: int | None = None) -> dict[str, float]:
        """Loss and compiled metrics over ``dataset`` (global batches), aggregated over all replicas."""
        test_function = self.make_test_function()
        if not self._metrics_built:
            self.build_metrics(next(iter(dataset)))
        self.model.reset_metrics()
        loss_sum, seen = 0.0, 0
        for dist_batch in _batches(self.strategy.experimental_distribute_dataset(dataset), steps):
            loss_sum += float(test_function(dist_batch))
            seen += 1
        if seen == 0:
            raise ValueError(f"evaluate got no complete global batch of {self.global_batch_size} examples.")
        return self._logs(loss_sum / seen)


def _batches(dist_dataset, steps: int | None):
    """The distributed batches; with a known step count, stop without asking the iterator for its end
    (the first end-of-data check of a distributed iterator costs tens of seconds on CPU)."""
    if steps is None:
        yield from dist_dataset
        return
    iterator = iter(dist_dataset)
    for _ in range(steps):
        yield next(iterator)


def _log(msg: str) -> None:
    import sys

    print(f"[tfaccel.distribute] {msg}", file=sys.stderr, flush=True)
