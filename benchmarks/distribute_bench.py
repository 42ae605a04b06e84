"""Step time of distributed training next to plain Keras ``fit`` on one device, at the same global batch."""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

MODELS = ("tiny", "minilm")


def _build_classifier(model: str, seq: int):
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    if model == "tiny":
        backbone = keras_hub.models.BertBackbone(vocabulary_size=200, num_layers=2, num_heads=2, hidden_dim=32,
                                                 intermediate_dim=64, max_sequence_length=max(seq, 64))
        classifier = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None)
    else:
        from tfaccel.examples.builders import minilm_dir

        classifier = keras_hub.models.BertTextClassifier.from_preset(minilm_dir(), num_classes=5, preprocessor=None)
    classifier.compile(optimizer=keras.optimizers.AdamW(5e-5),
                       loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return classifier


def _step_timer():
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_begin(self, batch, logs=None):
            self._t = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            # logs are read (as Keras' progress bar would), so the step has really finished
            _ = {k: float(v) for k, v in (logs or {}).items()}
            self.times.append(time.perf_counter() - self._t)

    return StepTimer()


def benchmark_step_time(
    model: str = "tiny",
    *,
    per_replica_batch_size: int = 8,
    seq: int = 64,
    steps: int = 12,
    warmup_steps: int = 3,
    strategy: str = "auto",
    jit_compile: bool = False,
) -> dict[str, Any]:
    """Median training step time: plain Keras ``fit`` on one device vs DistributedModel (Keras fit
    path and tfaccel's custom loop, the one multi-worker training uses), same global batch.

    On a CPU-only machine with one device the strategy has one replica, so the numbers are the
    wrapper's overhead; with GPUs (or logical CPUs set before TF initialises) it has several.

    Args:
        model: "tiny" (tiny BERT classifier) or "minilm" (all-MiniLM-L6-v2 classifier, real weights).
        per_replica_batch_size: examples per replica; the global batch is this times the replicas.
        seq: sequence length of the synthetic token inputs.
        steps: timed steps per variant (after ``warmup_steps`` untimed ones, which include tracing).
        warmup_steps: steps excluded from the median.
        strategy: DistributeConfig strategy for the wrapped runs.
        jit_compile: XLA for every variant.

    Returns:
        A dict: model, replicas, global_batch, seq, and per variant ``{"step_ms": median,
        "examples_per_s": ...}`` under "plain_fit", "distributed_fit", "distributed_custom_loop", plus
        "speedup" ratios (plain step time / variant step time; > 1 means faster than plain fit).

    Example:
        >>> row = benchmark_step_time("tiny", steps=4, warmup_steps=1)  # doctest: +SKIP
        >>> sorted(row["speedup"])  # doctest: +SKIP
        ['distributed_custom_loop', 'distributed_fit']
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}. Received: model={model!r}")
    for name, value in (("per_replica_batch_size", per_replica_batch_size), ("seq", seq), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1. Received: {name}={value!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an int >= 0. Received: warmup_steps={warmup_steps!r}")
    import tensorflow as tf

    from tfaccel.distribute.distributed_model import DistributedModel

    wrapped = {
        loop: DistributedModel(lambda: _build_classifier(model, seq), strategy=strategy, training_loop=loop,
                               per_replica_batch_size=per_replica_batch_size, jit_compile=jit_compile)
        for loop in ("fit", "custom")
    }
    replicas = wrapped["fit"].num_replicas
    global_batch = per_replica_batch_size * replicas
    total = steps + warmup_steps
    n = global_batch * total
    vocab = 200 if model == "tiny" else 30522
    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, vocab, (n, seq)).astype("int32"), "segment_ids": np.zeros((n, seq), "int32"),
         "padding_mask": np.ones((n, seq), "int32")}
    y = rng.integers(0, 3, n).astype("int32")

    def median_ms(times):
        return 1000 * statistics.median(times[warmup_steps:] or times)

    results: dict[str, Any] = {"model": model, "replicas": replicas, "global_batch": global_batch, "seq": seq,
                               "steps": steps, "jit_compile": jit_compile,
                               "strategy": type(wrapped["fit"].strategy).__name__}
    plain = _build_classifier(model, seq)
    if jit_compile:
        plain.compile(optimizer=plain.optimizer, loss=plain.loss, metrics=["accuracy"], jit_compile=True)
    timer = _step_timer()
    plain.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch, drop_remainder=True), epochs=1,
              verbose=0, callbacks=[timer])
    results["plain_fit"] = {"step_ms": median_ms(timer.times)}
    for loop, name in (("fit", "distributed_fit"), ("custom", "distributed_custom_loop")):
        timer = _step_timer()
        wrapped[loop].fit(x, y, epochs=1, verbose=0, callbacks=[timer])
        results[name] = {"step_ms": median_ms(timer.times), "training_loop": wrapped[loop].training_loop}
    for name in ("plain_fit", "distributed_fit", "distributed_custom_loop"):
        results[name]["examples_per_s"] = global_batch / (results[name]["step_ms"] / 1000)
    results["speedup"] = {name: results["plain_fit"]["step_ms"] / results[name]["step_ms"]
                          for name in ("distributed_fit", "distributed_custom_loop")}
    return results
