"""Mask math for magnitude pruning: element-wise masks at a target sparsity and m:n (e.g. 2:4) masks.

Element-wise masks follow tfmot's ``Pruning._update_mask`` (``pruning_impl.py``): keep the
``k = max(round(size * (1 - sparsity)), 1)`` largest magnitudes (ties at the threshold are kept), per
weight tensor. m:n masks follow tfmot's ``generate_m_by_n_mask``: in every block of ``n``
consecutive weights along the *input* (reduction) dimension, the ``n - m`` largest magnitudes are
kept, so each block has at least ``m`` zeros. For a Dense kernel ``(in, out)`` the input dimension
is axis 0 (tfmot transposes to ``(out, in)`` for the same effect); for an EinsumDense kernel the
input axes are the kernel axes contracted with the input (read from the einsum equation), e.g.
``(heads, head_dim)`` of an attention output projection, flattened in order.
"""

from __future__ import annotations

import numpy as np


def magnitude_mask(weights, sparsity):
    """``(threshold, mask)`` keeping the largest-magnitude weights at ``sparsity`` (tfmot semantics).

    Args:
        weights: a weight tensor of any shape.
        sparsity: fraction in [0, 1) of weights to zero (a float or scalar tensor).

    Returns:
        The smallest kept magnitude and a 0/1 mask in the weights' dtype.

    Example:
        >>> import numpy as np
        >>> _, m = magnitude_mask(np.array([[0.1, -3.0], [2.0, 0.5]], "float32"), 0.5)
        >>> m.numpy().tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    import tensorflow as tf

    weights = tf.convert_to_tensor(weights)
    abs_weights = tf.math.abs(weights)
    size = tf.size(abs_weights)
    k = tf.dtypes.cast(
        tf.math.maximum(tf.math.round(tf.dtypes.cast(size, tf.float32) * (1 - tf.cast(sparsity, tf.float32))), 1),
        tf.int32,
    )
    values, indices = tf.math.top_k(tf.reshape(abs_weights, [-1]), k=size)
    threshold = tf.gather(values, k - 1)
    threshold_pos = tf.gather(indices, k - 1)
    # The one-hot term keeps the threshold element itself (tfmot does the same).
    mask = tf.math.logical_or(
        tf.math.greater_equal(abs_weights, threshold),
        tf.reshape(tf.one_hot(threshold_pos, depth=size, on_value=True, off_value=False, dtype=tf.bool),
                   tf.shape(abs_weights)),
    )
    return tf.cast(threshold, weights.dtype), tf.cast(mask, weights.dtype)


def _to_rows(weights_np_or_tf, input_axes, module):
    """Transpose to (output axes..., input axes...) and flatten to (out_size, in_size)."""
    rank = len(weights_np_or_tf.shape)
    input_axes = tuple(a % rank for a in input_axes)
    output_axes = tuple(a for a in range(rank) if a not in input_axes)
    perm = output_axes + input_axes
    shape = list(weights_np_or_tf.shape)
    out_size = int(np.prod([shape[a] for a in output_axes])) if output_axes else 1
    in_size = int(np.prod([shape[a] for a in input_axes]))
    rows = module.reshape(module.transpose(weights_np_or_tf, perm), (out_size, in_size))
    return rows, perm


def _check_m_by_n(m_by_n) -> tuple[int, int]:
    try:
        m, n = (int(v) for v in m_by_n)
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in m_by_n) and 0 < m < n
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            "sparsity_m_by_n must be two integers (m, n) with 0 < m < n: m zeros in every n consecutive "
            f"weights, e.g. (2, 4). Received: sparsity_m_by_n={m_by_n!r}"
        )
    return m, n


def m_by_n_mask(weights, m_by_n=(2, 4), input_axes=(0,)):
    """A 0/1 mask with at least ``m`` zeros in every ``n`` consecutive weights along the input axes.

    Args:
        weights: a kernel tensor.
        m_by_n: ``(m, n)``, e.g. ``(2, 4)``.
        input_axes: the kernel axes that are contracted with the layer input (``(0,)`` for Dense).

    Returns:
        The mask, same shape and dtype as ``weights``.

    Example:
        >>> import numpy as np
        >>> w = np.array([[1.0], [-4.0], [3.0], [0.5]], "float32")  # Dense kernel (in=4, out=1)
        >>> m_by_n_mask(w, (2, 4)).numpy().ravel().tolist()
        [0.0, 1.0, 1.0, 0.0]
    """
    import tensorflow as tf

    m, n = _check_m_by_n(m_by_n)
    weights = tf.convert_to_tensor(weights)
    rows, perm = _to_rows(weights, input_axes, tf)
    out_size, in_size = rows.shape
    keep = n - m
    pad = (-in_size) % n
    abs_rows = tf.pad(tf.math.abs(rows), [[0, 0], [0, pad]])
    blocks = tf.reshape(abs_rows, [-1, n])
    _, top = tf.math.top_k(blocks, k=keep, sorted=False)
    mask_blocks = tf.reduce_sum(tf.one_hot(top, depth=n, dtype=weights.dtype), axis=1)
    mask_rows = tf.reshape(mask_blocks, [out_size, in_size + pad])[:, :in_size]
    transposed_shape = [weights.shape[a] for a in perm]
    inverse = np.argsort(perm)
    return tf.transpose(tf.reshape(mask_rows, transposed_shape), inverse)


def is_m_by_n_sparse(weights, m_by_n=(2, 4), input_axes=(0,)) -> bool:
    """True when every block of ``n`` consecutive weights along the input axes has at least ``m``
    zeros (a trailing partial block of ``r`` weights may hold at most ``n - m`` non-zeros).

    Example:
        >>> import numpy as np
        >>> is_m_by_n_sparse(np.array([[0.0], [2.0], [0.0], [1.0]]), (2, 4))
        True
    """
    m, n = _check_m_by_n(m_by_n)
    w = np.asarray(weights)
    rows, _ = _to_rows(w, input_axes, np)
    pad = (-rows.shape[1]) % n
    rows = np.pad(rows, [(0, 0), (0, pad)])
    nonzero = np.count_nonzero(rows.reshape(rows.shape[0], -1, n), axis=-1)
    return bool(np.all(nonzero <= n - m))


def einsum_kernel_input_axes(equation: str) -> tuple[int, ...]:
    """Kernel axes of an EinsumDense that are contracted with its input, from the equation.

    Example:
        >>> einsum_kernel_input_axes("abcd,cde->abe")  # attention output projection (heads, head_dim, hidden)
        (0, 1)
        >>> einsum_kernel_input_axes("abc,cde->abde")  # query projection (hidden, heads, head_dim)
        (0,)
    """
    try:
        lhs, out = equation.replace(" ", "").split("->")
        inp, ker = lhs.split(",")
    except ValueError:
        raise ValueError(f"Cannot read the EinsumDense equation. Received: equation={equation!r}") from None
    axes = tuple(i for i, c in enumerate(ker) if c in inp and c not in out)
    if not axes:
        raise ValueError(f"The EinsumDense equation contracts no kernel axis with the input. Received: equation={equation!r}")
    return axes
