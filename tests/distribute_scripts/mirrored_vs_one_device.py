"""Train the same tiny BERT classifier on one device with plain Keras `fit` and on 2 logical CPU devices
with tfaccel's DistributedModel (MirroredStrategy) at the same global batch; print the weight
differences as JSON on the last line.

Run it with 2 logical CPU devices (tfaccel.distribute.run_with_logical_cpus). Usage:
    mirrored_vs_one_device.py RUN [RUN ...]
where RUN is PRECISION:LOOP[:jit], e.g. float32:auto mixed_float16:custom float32:custom:jit.
"""

import json
import sys
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf

import tfaccel.distribute as td

PER_REPLICA, REPLICAS, EPOCHS = 4, 2, 2
GLOBAL = PER_REPLICA * REPLICAS


def build():
    keras.utils.set_random_seed(0)
    # dropout 0: with dropout every replica draws its own mask for its slice of the batch, so the
    # result cannot equal one device's draw for the whole batch.
    backbone = keras_hub.models.BertBackbone(vocabulary_size=200, num_layers=2, num_heads=2, hidden_dim=32,
                                             intermediate_dim=64, max_sequence_length=32, dropout=0.0)
    model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


rng = np.random.default_rng(0)
n, seq = 64, 16
x = {"token_ids": rng.integers(1, 200, (n, seq)).astype("int32"), "segment_ids": np.zeros((n, seq), "int32"),
     "padding_mask": (np.arange(seq)[None, :] < rng.integers(4, seq + 1, n)[:, None]).astype("int32")}
y = (x["token_ids"][:, 0] % 3).astype("int32")


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u, "float64") - np.asarray(v, "float64")))) for u, v in zip(a, b, strict=True))


initial = build().get_weights()
references = {}
results = {"devices": [d.name for d in tf.config.list_logical_devices("CPU")], "runs": {}}
for run in sys.argv[1:]:
    precision, loop, *rest = run.split(":")
    jit = rest == ["jit"]
    t0 = time.time()
    key = (precision, jit)
    if key not in references:  # plain Keras fit on one device, same settings, global batch and order
        with td.dtype_policy_scope(precision):
            plain = build()
        plain.compile(optimizer=plain.optimizer, loss=plain.loss, metrics=["accuracy"], jit_compile=jit)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL, drop_remainder=True)
        with tf.device("/cpu:0"):
            hist = plain.fit(ds, epochs=EPOCHS, verbose=0)
        references[key] = (plain.get_weights(), hist.history)
        results["runs"][f"{precision}:reference{':jit' if jit else ''}"] = {"seconds": round(time.time() - t0, 1)}
        t0 = time.time()
    dm = td.DistributedModel(build, strategy="mirrored", per_replica_batch_size=PER_REPLICA, dtype_policy=precision,
                             training_loop=loop, jit_compile=jit)
    hist = dm.fit(x, y, epochs=EPOCHS, verbose=0)
    ref_weights, ref_hist = references[key]
    results["runs"][run] = {
        "replicas": dm.num_replicas, "global_batch": dm.global_batch_size, "loop": dm.training_loop,
        "max_abs_diff": max_diff(dm.get_weights(), ref_weights), "moved": max_diff(ref_weights, initial),
        "iterations": int(dm.model.optimizer.iterations.numpy()), "history": hist.history,
        "reference_history": ref_hist, "seconds": round(time.time() - t0, 1),
        "optimizer": type(dm.model.optimizer).__name__,
    }
    print(run, results["runs"][run]["max_abs_diff"], results["runs"][run]["seconds"], file=sys.stderr, flush=True)
print(json.dumps(results))
