"""How the int8 matrix products of a Keras-quantized model run in TensorFlow.

Keras 3 quantizes Dense / EinsumDense / (Reversible)Embedding weights to int8 with one scale per
output channel and, at run time, activations per token (``AbsMaxQuantizer``). What it then asks
TensorFlow to compute is what makes int8 fast or slow on a CPU:

* ``"keras"``: Keras' own calls. A Dense product is ``tf.matmul(int8, int8, output_type=int32)``,
  which TensorFlow runs with a generic Eigen kernel, 3-6x slower than float32 (no oneDNN kernel
  for it). EinsumDense projections with a dynamic sequence length fall back to a float einsum on
  int8-valued tensors (keras/src/backend/tensorflow/numpy.py ``einsum``), so attention projections
  are not int8 at all. Fast only under XLA, whose int8 dot is faster than its float32 dot.
* ``"xla"``: every int8 Dense / EinsumDense / reverse-embedding product becomes one 2-D
  ``int8 x int8 -> int32`` matmul (inputs reshaped to rows, dynamic shapes kept) with the same
  per-token activation quantization as Keras, meant for an XLA-compiled serving function. Same
  numbers as Keras' own int8 math, all projections int8, portable (any TensorFlow with XLA).
* ``"onednn"``: the product runs in oneDNN's u8s8 int8 inner product
  (``QuantizedMatMulWithBiasAndDequantize``), which uses AVX2 ``vpmaddubsw`` even without VNNI:
  2-3x faster than float32 for large row counts (batch x sequence). Same per-token activation
  quantization as Keras, shifted by +128 to the unsigned codes the kernel takes; the shift is
  removed with the weights' column sums, the scales are applied after. This op only exists in
  TensorFlow builds with oneDNN (x86-64 Linux/Windows wheels) and fails when
  ``TF_ENABLE_ONEDNN_OPTS=0``.

The forms are installed only while a serving function is traced (:func:`int8_kernels`); the Keras
model itself is unchanged, and the SavedModel holds plain TensorFlow ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from tfaccel.core.layers import leaf_layers, product_layout, rows_product

KERNELS = ("xla", "onednn", "keras")

# oneDNN's quantized inner product: the ops that must stay outside XLA clusters.
ONEDNN_OPS = ("QuantizedMatMulWithBiasAndDequantize",)


def _rows_quantize(x2d, epsilon: float):
    """Per-row abs-max int8 quantization, exactly as keras.quantizers.AbsMaxQuantizer(axis=-1)."""
    import tensorflow as tf

    scale = 127.0 / (tf.reduce_max(tf.abs(x2d), axis=-1, keepdims=True) + epsilon)
    q = tf.clip_by_value(tf.round(x2d * scale), -127.0, 127.0)
    return tf.cast(q, tf.int8), scale


def int8_matmul_xla(x2d, kernel_q, kernel_scale, epsilon: float = 1e-7):
    """``x2d @ (kernel_q / kernel_scale)`` with int8 x int8 -> int32 products.

    Args:
        x2d: float [rows, K].
        kernel_q: int8 [K, N].
        kernel_scale: float [N], Keras' convention (``kernel_q = round(kernel * kernel_scale)``).

    Example:
        >>> y = tf.function(int8_matmul_xla, jit_compile=True)(x, kq, ks)  # doctest: +SKIP
    """
    import tensorflow as tf

    xq, x_scale = _rows_quantize(x2d, epsilon)
    acc = tf.linalg.matmul(xq, kernel_q, output_type=tf.int32)
    return tf.cast(acc, x2d.dtype) / (x_scale * kernel_scale)


def int8_matmul_onednn(x2d, kernel_q, kernel_scale, column_sums, epsilon: float = 1e-7):
    """``x2d @ (kernel_q / kernel_scale)`` in oneDNN's u8s8 int8 inner product.

    Activations are quantized per row exactly as Keras does (``AbsMaxQuantizer``), then shifted by
    +128 to the unsigned codes oneDNN's AVX2 kernel takes. The op is told that the codes' scale is 1
    (``max_a=255`` in SCALED mode), so it returns the raw integer sums as float; the per-row scales,
    the shift (``128 * column_sums(kernel_q)``) and the weights' per-channel scales are applied after.

    Args:
        x2d: float [rows, K].
        kernel_q: int8 [K, N].
        kernel_scale: float [N] (Keras' convention, see :func:`int8_matmul_xla`).
        column_sums: float [N], ``kernel_q.sum(axis=0)``.
    """
    import tensorflow as tf

    n = kernel_q.shape[-1]
    xq, x_scale = _rows_quantize(x2d, epsilon)
    codes = tf.cast(tf.cast(xq, tf.int16) + 128, tf.uint8)
    acc = tf.raw_ops.QuantizedMatMulWithBiasAndDequantize(
        a=tf.bitcast(codes, tf.quint8), b=tf.bitcast(kernel_q, tf.qint8), bias=tf.zeros([n], tf.float32),
        min_a=tf.constant(0.0), max_a=tf.constant(255.0), min_b=tf.constant(-127.0), max_b=tf.constant(127.0),
        min_freezed_output=tf.constant(-1.0), max_freezed_output=tf.constant(1.0), Toutput=tf.float32,
        input_quant_mode="SCALED",
    )
    return (acc - 128.0 * column_sums) / (x_scale * kernel_scale)


class _Plan:
    """How one layer's int8 product is rewritten: inputs [..., K] (``n_contracted`` trailing axes) times an
    int8 kernel viewed as [K, N], reshaped back to [..., *free_shape]."""

    def __init__(self, kernel: str, k: int, free_shape: tuple[int, ...], n_contracted: int, kernel_q_fn, scale_fn,
                 column_sums=None):
        self.kernel, self.k, self.free_shape = kernel, k, tuple(free_shape)
        self.n, self.n_contracted = math.prod(free_shape), n_contracted
        self.kernel_q_fn, self.scale_fn, self.column_sums = kernel_q_fn, scale_fn, column_sums

    def product(self, x, epsilon: float):
        import tensorflow as tf

        def matmul(x2):
            kq = tf.reshape(self.kernel_q_fn(), [self.k, self.n])
            ks = tf.reshape(self.scale_fn(), [self.n])
            if self.kernel == "onednn":
                return int8_matmul_onednn(x2, kq, ks, self.column_sums, epsilon)
            return int8_matmul_xla(x2, kq, ks, epsilon)

        return rows_product(x, self.k, self.free_shape, self.n_contracted, matmul)


def _epsilon(layer) -> float:
    q = getattr(layer, "inputs_quantizer", None)
    return float(getattr(q, "epsilon", 1e-7))


def _column_sums(kernel_q, k: int, n: int):
    import numpy as np
    import tensorflow as tf

    arr = np.asarray(kernel_q).reshape(k, n).astype(np.int64).sum(axis=0).astype(np.float32)
    return tf.constant(arr)


def _plan_for(layer, kernel: str) -> Any | None:
    """The replacement ``_int8_call`` for a layer Keras quantized to int8 with activations, or None."""
    import keras
    import tensorflow as tf

    if getattr(layer, "quantization_mode", None) != "int8" or getattr(layer, "lora_enabled", False):
        return None
    if getattr(layer, "inputs_quantizer", None) is None:
        return None  # weight-only: Keras already runs a float product on dequantized weights
    eps = _epsilon(layer)

    if isinstance(layer, keras.layers.ReversibleEmbedding):
        hidden, vocab = layer.output_dim, layer.input_dim
        if layer.tie_weights:
            def kq(layer=layer):
                return tf.transpose(layer._embeddings)

            def ks(layer=layer):
                return layer.embeddings_scale
        else:
            def kq(layer=layer):
                return layer.reverse_embeddings

            def ks(layer=layer):
                return tf.reshape(layer.reverse_embeddings_scale, [-1])
        sums = _column_sums(kq(), hidden, vocab) if kernel == "onednn" else None
        plan = _Plan(kernel, hidden, (vocab,), 1, kq, ks, sums)
        original = layer._int8_call

        def call(inputs, reverse=False, plan=plan, layer=layer, original=original):
            if not reverse:
                return original(inputs, reverse=False)
            logits = plan.product(inputs, eps)
            if layer.logit_soft_cap is not None:
                cap = layer.logit_soft_cap
                logits = tf.tanh(logits / cap) * cap
            return logits

        return call

    layout = product_layout(layer)
    if layout is None:
        return None
    k, free, n_contracted = layout
    if type(layer) is keras.layers.Dense:
        def ks(layer=layer):
            return layer.kernel_scale
    else:
        def ks(layer=layer):
            return layer._adjust_scale_for_dequant(layer.kernel_scale)

    def kq(layer=layer):
        return layer._kernel

    sums = _column_sums(layer._kernel, k, math.prod(free)) if kernel == "onednn" else None
    plan = _Plan(kernel, k, free, n_contracted, kq, ks, sums)

    def call(inputs, training=None, plan=plan, layer=layer):
        y = plan.product(inputs, eps)
        if layer.bias is not None:
            y = y + layer.bias
        if layer.activation is not None:
            y = layer.activation(y)
        return y

    return call


@contextlib.contextmanager
def int8_kernels(model, kernel: str = "xla") -> Iterator[list[str]]:
    """While active, the model's int8 layers compute their products in the chosen form.

    Trace the serving function inside this context; the traced graph keeps the form.

    Args:
        model: a Keras model quantized with ``model.quantize("int8")`` (or tfaccel's
            :func:`~tfaccel.quantization.quantize_model`).
        kernel: one of ``KERNELS`` (see the module docstring).

    Yields:
        The paths of the layers whose product was rewritten.

    Example:
        >>> with int8_kernels(model, "xla") as rewritten:  # doctest: +SKIP
        ...     write_saved_model(model, "out", jit_compile=True)
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}. Received: kernel={kernel!r}")

    patched = []
    try:
        if kernel != "keras":
            for layer in leaf_layers(model):
                call = _plan_for(layer, kernel)
                if call is None:
                    continue
                layer._int8_call = call  # instance attribute: Layer.quantized_call dispatches to it
                patched.append(layer)
        yield [layer.path for layer in patched]
    finally:
        for layer in patched:
            del layer._int8_call
