"""The input pipeline of distributed training: examples -> seeded per-epoch order -> global batches.

The batch at (epoch e, step s) depends only on the examples, the seed and (e, s): a run resumed at
(e, s) builds epoch e's batches and skips the first s, so it sees exactly the batches the
uninterrupted run would have seen. Each global batch is split across replicas in order (replica 0
takes its first slice), the same on every worker, so N replicas at per-replica batch B compute the
gradient of one device at batch N*B.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# Distinct per-epoch seeds without overlap between nearby (seed, epoch) pairs.
EPOCH_SEED_STRIDE = 1_000_003


def as_example_dataset(x: Any, y: Any = None, sample_weight: Any = None):
    """A ``tf.data.Dataset`` of single examples from arrays (dicts of arrays) or a Dataset.

    Args:
        x: a ``tf.data.Dataset`` yielding single (unbatched) examples ``(x, y)`` or ``(x, y, w)``,
            or model inputs as an array or a dict of arrays (then ``y`` is needed for training).
        y: labels, when ``x`` is arrays.
        sample_weight: per-example weights, when ``x`` is arrays.

    Returns:
        The unbatched dataset.

    Example:
        >>> ds = as_example_dataset(np.zeros((10, 4), "float32"), np.arange(10))
        >>> int(ds.cardinality())
        10
    """
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        if y is not None or sample_weight is not None:
            raise ValueError("When x is a tf.data.Dataset it must yield (x, y) itself; do not pass y or "
                             f"sample_weight. Received: y={type(y).__name__}, sample_weight={type(sample_weight).__name__}")
        return x
    if y is None:
        raise ValueError("Training on arrays needs labels: pass y (or a tf.data.Dataset of (x, y)). Received: y=None")
    n = {len(np.asarray(v)) for v in (x.values() if isinstance(x, dict) else [x])} | {len(np.asarray(y))}
    if sample_weight is not None:
        n.add(len(np.asarray(sample_weight)))
    if len(n) != 1:
        raise ValueError(f"x, y and sample_weight must have the same number of examples. Received sizes {sorted(n)}")
    parts = (x, y) if sample_weight is None else (x, y, sample_weight)
    return tf.data.Dataset.from_tensor_slices(parts)


def check_unbatched(dataset, model) -> None:
    """Raise a clear error when ``dataset`` is already batched (its inputs have the model's rank).

    The wrapper batches itself, at per_replica_batch_size x replicas; a batched dataset would be
    batched twice.
    """
    import tensorflow as tf

    inputs = getattr(model, "inputs", None)
    if not inputs:
        return
    spec = dataset.element_spec
    x_spec = spec[0] if isinstance(spec, tuple) else spec
    flat = tf.nest.flatten(x_spec)
    if len(flat) != len(inputs):
        return
    if isinstance(x_spec, dict) and isinstance(getattr(model, "_inputs_struct", None), dict):
        by_name = {t.name.split(":")[0]: t for t in inputs}
        pairs = [(x_spec[k], by_name[k]) for k in x_spec if k in by_name]
    else:
        pairs = list(zip(flat, inputs, strict=False))
    for element, model_input in pairs:
        if element.shape.rank is not None and element.shape.rank == len(model_input.shape):
            raise ValueError(
                f"The dataset looks batched: its input has shape {element.shape}, the rank of the model's input "
                f"{tuple(model_input.shape)}. DistributedModel batches the examples itself (per_replica_batch_size x "
                "replicas), so pass single examples: call dataset.unbatch() or drop the .batch(...) call."
            )


def epoch_batches(examples, epoch: int, global_batch_size: int, *, shuffle_buffer: int | None = None,
                  seed: int = 0, skip_steps: int = 0, steps_per_epoch: int | None = None):
    """Epoch ``epoch``'s global batches in their deterministic order, starting at step ``skip_steps``.

    Incomplete last batches are dropped, so every replica on every worker takes the same number of steps.

    Example:
        >>> import tensorflow as tf
        >>> ds = tf.data.Dataset.range(10)
        >>> [b.tolist() for b in epoch_batches(ds, 0, 4).as_numpy_iterator()]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    import tensorflow as tf

    ds = examples
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed * EPOCH_SEED_STRIDE + epoch, reshuffle_each_iteration=False)
    ds = ds.batch(global_batch_size, drop_remainder=True)
    if steps_per_epoch is not None:
        ds = ds.take(steps_per_epoch)
    if skip_steps:
        ds = ds.skip(skip_steps)
    options = tf.data.Options()
    # Every worker builds the same global batches; DATA sharding gives each replica its slice of each one.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = True
    return ds.with_options(options).prefetch(2)


def count_steps(examples, global_batch_size: int, steps_per_epoch: int | None = None) -> int | None:
    """Steps per epoch: full global batches in the data (None if the dataset's size is unknown)."""
    n = int(examples.cardinality())
    if n < 0:  # INFINITE (-1) or UNKNOWN (-2)
        return steps_per_epoch
    full = n // global_batch_size
    if full == 0:
        raise ValueError(f"The data has {n} examples, fewer than one global batch of {global_batch_size} "
                         "(per_replica_batch_size x replicas). Lower per_replica_batch_size or add data.")
    return min(full, steps_per_epoch) if steps_per_epoch else full
