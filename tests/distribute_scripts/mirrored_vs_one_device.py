"""Train the same tiny BERT classifier on one device with plain Keras `fit` and on 2 logical CPU devices
with tfaccel's DistributedModel (MirroredStrategy) at the same global batch; print the weight
differences as JSON on the last line.

Run it with 2 logical CPU devices (tfaccel.distribute.run_with_logical_cpus). Usage:
    mirrored_vs_one_device.py RUN [RUN ...]
where RUN is PRECISION:LOOP[:jit][:prune], e.g. float32:auto mixed_float16:custom float32:custom:jit
mixed_float16:auto:prune (prune: magnitude pruning to 50% during training, tfaccel's UpdatePruningStep callback,
on both sides).
"""

import json
import sys
import time

import keras
import keras_hub
import numpy as np
import tensorflow as tf

import tfaccel.distribute as td
from tfaccel.pruning import (
    PolynomialDecay,
    UpdatePruningStep,
    kernel_sparsity,
    prune_low_magnitude,
    pruning_state,
)

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


def prune(model):
    # 16 optimizer steps in all: sparsity ramps 0 -> 50% over the first 8, masks recomputed every 2 steps.
    prune_low_magnitude(model, PolynomialDecay(0.0, 0.5, begin_step=0, end_step=8, frequency=2))
    return model


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(u, "float64") - np.asarray(v, "float64")))) for u, v in zip(a, b, strict=True))


initial = build().get_weights()
references = {}
results = {"devices": [d.name for d in tf.config.list_logical_devices("CPU")], "runs": {}}
for run in sys.argv[1:]:
    precision, loop, *rest = run.split(":")
    jit, pruned = "jit" in rest, "prune" in rest
    callbacks = [UpdatePruningStep()] if pruned else []
    t0 = time.time()
    key = (precision, jit, pruned)
    if key not in references:  # plain Keras fit on one device, same settings, global batch and order
        with td.dtype_policy_scope(precision):
            plain = build()
            if pruned:
                prune(plain)
        plain.compile(optimizer=plain.optimizer, loss=plain.loss, metrics=["accuracy"], jit_compile=jit)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL, drop_remainder=True)
        with tf.device("/cpu:0"):
            hist = plain.fit(ds, epochs=EPOCHS, verbose=0, callbacks=callbacks)
        references[key] = (plain.get_weights(), hist.history, plain)
        results["runs"][f"{precision}:reference{':jit' if jit else ''}{':prune' if pruned else ''}"] = {"seconds": round(time.time() - t0, 1)}
        t0 = time.time()
    dm = td.DistributedModel(build, strategy="mirrored", per_replica_batch_size=PER_REPLICA, dtype_policy=precision,
                             training_loop=loop, jit_compile=jit, model_transform=prune if pruned else None)
    hist = dm.fit(x, y, epochs=EPOCHS, verbose=0, callbacks=callbacks)
    ref_weights, ref_hist, _ = references[key]
    results["runs"][run] = {
        "replicas": dm.num_replicas, "global_batch": dm.global_batch_size, "loop": dm.training_loop,
        "max_abs_diff": max_diff(dm.get_weights(), ref_weights), "moved": max_diff(ref_weights, initial),
        "iterations": int(dm.model.optimizer.iterations.numpy()), "history": hist.history,
        "reference_history": ref_hist, "seconds": round(time.time() - t0, 1),
        "optimizer": type(dm.model.optimizer).__name__,
    }
    if pruned:
        results["runs"][run]["sparsity"] = kernel_sparsity(dm.model)["total"]
        results["runs"][run]["reference_sparsity"] = kernel_sparsity(references[key][2])["total"]
        masks = [w.mask.numpy() for w in pruning_state(dm.model).weights]
        ref_masks = [w.mask.numpy() for w in pruning_state(references[key][2]).weights]
        results["runs"][run]["mask_agreement"] = float(
            sum(int(np.sum(a == b)) for a, b in zip(masks, ref_masks, strict=True)) / sum(a.size for a in masks))
    print(run, results["runs"][run]["max_abs_diff"], results["runs"][run]["seconds"], file=sys.stderr, flush=True)
print(json.dumps(results))
