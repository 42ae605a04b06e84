"""Keras layer helpers that more than one technique reads: a model's leaf layers, and a Dense / EinsumDense
product seen as one matrix product (``[rows, K] x [K, N]``).

The int8 serving forms (:mod:`tfaccel.quantization.int8_kernels`), Keras quantization
(:mod:`tfaccel.quantization.keras_quantize`) and the 2-D float products of the export
(:mod:`tfaccel.export.products`) all rewrite or walk the same layers; the helpers live here, below every
technique, so that no technique imports another for them. Keras and TensorFlow are imported inside the
functions: importing this module starts neither.
"""

from __future__ import annotations

import math
import re


def leaf_layers(model) -> list:
    """Leaf layers (no sub-layers) of a model, each once, in Keras' flattening order."""
    seen, out = set(), []
    for layer in model._flatten_layers(include_self=False):
        if id(layer) in seen or len(list(layer._flatten_layers())) != 1:
            continue
        seen.add(id(layer))
        out.append(layer)
    return out


def einsum_as_matmul(equation: str, kernel_shape) -> tuple[int, int, tuple[int, ...]] | None:
    """If ``equation`` contracts the trailing input axes with the leading kernel axes and the output
    is (input free axes + kernel free axes), return (number of input free axes, K, kernel free
    shape); else None. E.g. "abc,cde->abde" (attention query/key/value) and "abcd,cde->abe"
    (attention output).

    Example:
        >>> einsum_as_matmul("abc,cde->abde", (768, 12, 64))
        (2, 768, (12, 64))
    """
    m = re.fullmatch(r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", equation.replace(" ", ""))
    if not m:
        return None
    inp, ker, out = m.groups()
    contracted = [c for c in inp if c in ker and c not in out]
    n = len(contracted)
    if n == 0 or list(inp[-n:]) != contracted or list(ker[:n]) != contracted:
        return None
    free_in, free_k = inp[:-n], ker[n:]
    if out != free_in + free_k or any(c in free_in for c in free_k):
        return None
    shape = tuple(int(d) for d in kernel_shape)
    return len(free_in), math.prod(shape[:n]), shape[n:]


def product_layout(layer) -> tuple[int, tuple[int, ...], int] | None:
    """``(K, free output shape, input axes contracted)`` of a plain ``Dense`` / ``EinsumDense`` layer whose product
    is one matrix product of its input's trailing axes with its kernel viewed as ``[K, N]``, else None (another
    layer type, or an einsum that is not one matrix product). Read from the kernel's shape."""
    import keras

    if type(layer) not in (keras.layers.Dense, keras.layers.EinsumDense):
        return None
    shape = tuple(int(d) for d in layer._kernel.shape)
    if type(layer) is keras.layers.Dense:
        return shape[0], shape[1:], 1
    found = einsum_as_matmul(layer.equation, shape)
    if found is None:
        return None
    _, k, free = found
    return k, tuple(free), len(shape) - len(free)


def rows_product(x, k: int, free: tuple[int, ...], n_contracted: int, matmul):
    """``x`` [..., K] (its ``n_contracted`` trailing axes contracted) as 2-D rows ``[-1, K]`` through
    ``matmul(rows) -> [rows, N]``, reshaped back to ``[..., *free]`` (the leading axes stay dynamic)."""
    import tensorflow as tf

    x = tf.convert_to_tensor(x)
    lead = tf.shape(x)[: x.shape.rank - n_contracted]
    y = matmul(tf.reshape(x, [-1, k]))
    return tf.reshape(y, tf.concat([lead, tf.constant(free, tf.int32)], 0))
