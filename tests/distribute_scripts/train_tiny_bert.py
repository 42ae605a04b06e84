"""A worker script for the distribution tests: fine-tunes a tiny BERT classifier with
tfaccel.distribute.DistributedModel and writes its final weights and history to --out.

Run by itself (one process), under `tfaccel train-workers N -- python train_tiny_bert.py ...`
(MultiWorkerMirroredStrategy from TF_CONFIG), or with logical CPU devices (MirroredStrategy).

--kill-at-step K makes the process kill itself (SIGKILL, like a lost machine) right after global step
K, only on the launcher's first attempt (TFACCEL_RESTART=0), to test recovery from a checkpoint.
"""

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

p = argparse.ArgumentParser()
p.add_argument("--out", required=True)
p.add_argument("--epochs", type=int, default=2)
p.add_argument("--examples", type=int, default=96)
p.add_argument("--per-replica-batch", type=int, default=4)
p.add_argument("--strategy", default="auto")
p.add_argument("--loop", default="auto")
p.add_argument("--dtype-policy", default=None)
p.add_argument("--dropout", type=float, default=0.1)
p.add_argument("--checkpoint-dir", default=None)
p.add_argument("--checkpoint-every", type=int, default=None)
p.add_argument("--kill-at-step", type=int, default=None)
p.add_argument("--kill-worker", type=int, default=1, help="which worker kills itself")
args = p.parse_args()

# The strategy first: MultiWorkerMirroredStrategy must exist before TensorFlow runs any op.
import tfaccel.distribute as td  # noqa: E402

strategy = td.make_strategy(args.strategy)

import keras  # noqa: E402
import keras_hub  # noqa: E402


def build():
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=200, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=32, dropout=args.dropout,
    )
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None,
                                                dropout=args.dropout)
    model.compile(optimizer=keras.optimizers.Adam(2e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


class KillAtStep(keras.callbacks.Callback):
    """Simulate a lost worker: SIGKILL this process after global step K, on the first attempt only."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            print(f"KILLING MYSELF at optimizer step {self.step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


rng = np.random.default_rng(0)
n, seq = args.examples, 16
x = {"token_ids": rng.integers(1, 200, (n, seq)).astype("int32"), "segment_ids": np.zeros((n, seq), "int32"),
     "padding_mask": (np.arange(seq)[None, :] < rng.integers(4, seq + 1, n)[:, None]).astype("int32")}
y = (x["token_ids"][:, 0] % 3).astype("int32")  # learnable: the label is a function of the first token

dm = td.DistributedModel(
    build, strategy=strategy, per_replica_batch_size=args.per_replica_batch, training_loop=args.loop,
    dtype_policy=args.dtype_policy, checkpoint_dir=args.checkpoint_dir, checkpoint_every_steps=args.checkpoint_every,
    shuffle_buffer=n, seed=3,
)
callbacks = []
first_attempt = os.environ.get("TFACCEL_RESTART", "0") == "0"
if args.kill_at_step is not None and first_attempt and int(os.environ.get("TFACCEL_WORKER_INDEX", "0")) == args.kill_worker:
    callbacks.append(KillAtStep(args.kill_at_step))
history = dm.fit(x, y, epochs=args.epochs, callbacks=callbacks, verbose=2 if dm.is_chief else 0)

index, _ = td.worker_info(dm.strategy)
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
np.savez(out / f"weights-{index}.npz", *dm.get_weights())
(out / f"result-{index}.json").write_text(json.dumps({
    "iterations": int(dm.model.optimizer.iterations.numpy()), "replicas": dm.num_replicas,
    "global_batch": dm.global_batch_size, "loop": dm.training_loop, "history": history.history,
    "restart": int(os.environ.get("TFACCEL_RESTART", "0")),
}))
print(f"worker {index} done: {dm}", file=sys.stderr)
