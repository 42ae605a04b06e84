"""TrainingCheckpoint: fault-tolerant training state (BackupAndRestore style, but step-exact).

A checkpoint holds the model's variables (weights, and the dropout seed-generator states), the
optimizer (its iteration count, slots and, with mixed_float16, the loss scale) and the data position
(epoch, step within the epoch, global step), written with ``tf.train.CheckpointManager`` on a
schedule. A restarted run restores the latest one and continues at the next batch: with the
deterministic per-epoch order of :mod:`tfaccel.distribute.input_pipeline` no batch after the
checkpoint is skipped and none before it is trained on twice.

With several workers every worker saves at the same steps (saving may run collectives), the chief
into ``directory`` and the others into throw-away ``directory/.worker-<i>`` folders that are deleted
right after, the way TensorFlow's own BackupAndRestore does. Every worker restores from
``directory``, so on several machines it must be shared storage (NFS, GCS...).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tfaccel.distribute.strategy import is_chief, worker_info


class TrainingCheckpoint:
    """Save and restore model, optimizer and data position.

    Args:
        directory: where checkpoints are written and read (shared by all workers).
        model: the Keras model (built under the strategy's scope).
        strategy: the ``tf.distribute`` strategy the model was built under.
        every_steps: also save every N global steps (None: at epoch ends only).
        max_to_keep: checkpoints kept.
        extra_state: more training state to save and restore, name -> variable or list of variables
            (e.g. pruning masks held beside the model).

    Example:
        >>> ckpt = TrainingCheckpoint("/tmp/ckpt", model, strategy, every_steps=50)  # doctest: +SKIP
        >>> epoch, step = ckpt.restore()  # (0, 0) on a fresh start  # doctest: +SKIP
    """

    def __init__(self, directory: str | os.PathLike, model, strategy, every_steps: int | None = None,
                 max_to_keep: int = 2, extra_state: dict | None = None):
        import tensorflow as tf

        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ValueError(f"every_steps must be None or an int >= 1. Received: every_steps={every_steps!r}")
        self.directory = Path(directory)
        self.model = model
        self.strategy = strategy
        self.every_steps = every_steps
        self.chief = is_chief(strategy)
        self.worker_index = worker_info(strategy)[0]
        # The data position lives outside the strategy (plain variables, saved by every worker alike).
        self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        self.step_in_epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="step_in_epoch")
        self.global_step = tf.Variable(0, dtype=tf.int64, trainable=False, name="global_step")
        with strategy.scope():
            optimizer = model.optimizer
            if optimizer is not None and not optimizer.built:
                optimizer.build(model.trainable_variables)  # slots must exist before a restore
        # Keras 3 models are not fully tracked by tf.train.Checkpoint (nested keras-hub layers and the
        # dropout seed-generator states go missing), so the model's variables are listed explicitly,
        # in the model's own (deterministic) order; the optimizer object tracks its iterations and slots.
        reserved = {"model_variables", "optimizer", "epoch", "step_in_epoch", "global_step"}
        clash = sorted(reserved & set(extra_state or {}))
        if clash:
            raise ValueError(f"extra_state names {clash} are taken by the checkpoint itself. Rename them.")
        self._checkpoint = tf.train.Checkpoint(
            model_variables=list(model.variables), optimizer=optimizer, epoch=self.epoch,
            step_in_epoch=self.step_in_epoch, global_step=self.global_step,
            **{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in (extra_state or {}).items()},
        )
        self._write_dir = self.directory if self.chief else self.directory / f".worker-{self.worker_index}"
        self._manager = tf.train.CheckpointManager(self._checkpoint, str(self._write_dir), max_to_keep=max_to_keep)

    @property
    def latest(self) -> str | None:
        """Path prefix of the newest complete checkpoint in ``directory``, or None."""
        import tensorflow as tf

        return tf.train.latest_checkpoint(str(self.directory))

    def restore(self) -> tuple[int, int]:
        """Restore the newest checkpoint if there is one; return the position (epoch, step in epoch) to resume at."""
        path = self.latest
        if path is None:
            return 0, 0
        with self.strategy.scope():
            self._checkpoint.restore(path).assert_existing_objects_matched()
        return int(self.epoch.numpy()), int(self.step_in_epoch.numpy())

    def due(self, global_step: int) -> bool:
        """Whether the schedule asks for a checkpoint after ``global_step`` steps."""
        return self.every_steps is not None and global_step % self.every_steps == 0

    def save(self, epoch: int, step_in_epoch: int, global_step: int) -> str:
        """Write a checkpoint for position (epoch, step_in_epoch). Every worker must call it at the same step."""
        self.epoch.assign(epoch)
        self.step_in_epoch.assign(step_in_epoch)
        self.global_step.assign(global_step)
        path = self._manager.save(checkpoint_number=global_step)
        if not self.chief:
            shutil.rmtree(self._write_dir, ignore_errors=True)
        return path
