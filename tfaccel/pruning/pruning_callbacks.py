"""The Keras callback that drives pruning during ``fit`` and logs sparsity to TensorBoard."""

from __future__ import annotations

import os
from typing import Any

import keras

from tfaccel.pruning.prune import PruningState, pruning_states


class UpdatePruningStep(keras.callbacks.Callback):
    """Advance the pruning step each batch, recompute masks when the schedule says so, and log
    per-layer and total sparsity (tfmot's ``UpdatePruningStep`` + ``PruningSummaries`` in one).

    Steps count like tfmot's ``pruning_step``: the first training batch is step 1, and a second
    ``fit`` continues from where the first stopped. Masks are recomputed *before* the batch whose step
    the schedule selects; the optimizer keeps pruned weights at zero after every update. With
    ``steps_per_execution > 1`` masks are recomputed before the execution that contains a pruning step.

    Works for a model passed to :func:`~tfaccel.pruning.prune_low_magnitude` and for wrappers that
    contain one (e.g. ``keras.distillation.Distiller`` with a pruned student).

    Args:
        log_dir: write TensorBoard scalars here (``tf.summary``): ``pruning/sparsity/<layer path>``,
            ``pruning/threshold/<layer path>``, ``pruning/total_sparsity``, ``pruning/target_sparsity``.
            None: no logging.
        update_freq: ``"epoch"`` (log at the end of each epoch) or an int N (also every N steps).

    Example:
        >>> model.fit(ds, epochs=2, callbacks=[UpdatePruningStep(log_dir="logs/pruning")])  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike | None = None, update_freq: str | int = "epoch"):
        super().__init__()
        if log_dir is not None and (not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir)):
            raise ValueError(f"log_dir must be a non-empty path or None. Received: log_dir={log_dir!r}")
        if not (update_freq == "epoch" or (isinstance(update_freq, int) and not isinstance(update_freq, bool)
                                           and update_freq > 0)):
            raise ValueError(f"update_freq must be 'epoch' or a positive int. Received: update_freq={update_freq!r}")
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.update_freq = update_freq
        self._states: list[PruningState] = []
        self._writer = None
        self._begin = 0

    def get_config(self) -> dict[str, Any]:
        return {"log_dir": self.log_dir, "update_freq": self.update_freq}

    def on_train_begin(self, logs=None):
        self._states = pruning_states(self.model)
        if not self._states:
            raise ValueError(
                f"UpdatePruningStep: model {self.model.name!r} (and the models inside it) is not being pruned. "
                "Call tfaccel.pruning.prune_low_magnitude(model, schedule) before fit."
            )
        if self.log_dir is not None and self._writer is None:
            import tensorflow as tf

            self._writer = tf.summary.create_file_writer(self.log_dir)

    def on_train_batch_begin(self, batch, logs=None):
        self._begin = batch
        spe = int(getattr(self.model, "steps_per_execution", 1) or 1)
        for state in self._states:
            state.begin_steps(state.step + 1, state.step + spe)

    def on_train_batch_end(self, batch, logs=None):
        extra = max(0, int(batch) - int(self._begin))  # > 0 only with steps_per_execution > 1
        for state in self._states:
            state.step += extra
        if isinstance(self.update_freq, int) and self._writer is not None:
            state = self._states[0]
            if state.step % self.update_freq == 0:
                self.write_summaries()

    def on_epoch_end(self, epoch, logs=None):
        for state in self._states:
            state.apply_masks()  # a no-op in normal training (the optimizer already masked); cheap insurance
        if self._writer is not None:
            self.write_summaries()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()

    def write_summaries(self) -> None:
        """Write the current sparsities at the current pruning step."""
        with self._writer.as_default():
            for state in self._states:
                step = state.step
                sp = state.sparsity()
                for w in state.weights:
                    write_scalar(f"pruning/sparsity/{w.name}", sp[w.name], step)
                    write_scalar(f"pruning/threshold/{w.name}", w.threshold, step)
                write_scalar("pruning/total_sparsity", sp["total"], step)
                if state.target_sparsity is not None:
                    write_scalar("pruning/target_sparsity", state.target_sparsity, step)
        self._writer.flush()


def write_scalar(tag: str, value: float, step: int) -> None:
    """A TensorBoard scalar through ``tf.summary.write`` (TensorFlow core), with the metadata of
    TensorBoard's scalars plugin, so logging works where the ``tensorboard`` package (which
    ``tf.summary.scalar`` needs, and TensorFlow 2.21 no longer installs) is missing."""
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    metadata = summary_pb2.SummaryMetadata()
    metadata.plugin_data.plugin_name = "scalars"
    metadata.data_class = summary_pb2.DATA_CLASS_SCALAR
    tf.summary.write(tag, tf.constant(value, tf.float32), step=step, metadata=metadata)


def callbacks_for(model, log_dir: str | os.PathLike | None = None) -> list:
    """The callbacks that drive pruning of ``model`` in ``fit``: :class:`UpdatePruningStep` for a Keras 3
    model, tfmot's ``UpdatePruningStep`` (+ ``PruningSummaries``) for a tf_keras model.

    Example:
        >>> model.fit(ds, callbacks=callbacks_for(model, log_dir="logs"))  # doctest: +SKIP
    """
    from tfaccel.pruning.prune import is_tf_keras_model

    if is_tf_keras_model(model):
        from tfaccel.pruning.tfmot_route import tf_keras_callbacks

        return tf_keras_callbacks(None if log_dir is None else os.fspath(log_dir))
    return [UpdatePruningStep(log_dir=log_dir)]
