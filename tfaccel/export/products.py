"""How a float SavedModel's weight products are written: Keras' own ops, or one 2-D ``MatMul`` each.

keras-hub's attention projections are ``EinsumDense`` layers (``"abc,cde->abde"``), which TensorFlow runs as
``Einsum``, and a ``Dense`` on a ``[batch, sequence, hidden]`` input is a broadcasting ``BatchMatMulV2``.
Written instead as one 2-D ``MatMul`` on ``[batch * sequence, K]`` rows (reshaped back after), each product
reaches oneDNN's plain inner product. The numbers are the same products (float32: max abs diff ~1e-6); only the
kernels differ. Measured on minilm-bbc, against the same export with Keras' ops (benchmarks/RESULTS.md):

- float32: 1.01x / 1.14x at 1x128 / 32x128 on an AMD Zen 4, 0.99-1.04x / 1.09-1.12x on an Intel Ice Lake (two runs);
- under ``mixed_bfloat16`` on a CPU with bf16 instructions (Zen 4): 1.12x / 1.71x ``model.export``, against
  1.08x / 1.38x with Keras' ops. Other kernels run: the two bfloat16 forms' outputs differ by up to 2.7e-3 on
  minilm-bbc, where the float32 forms agree to ~1e-6 (which bfloat16 kernels TensorFlow picks for each was not
  traced).

Int8-quantized layers are left to :mod:`tfaccel.quantization.int8_kernels` (which writes them 2-D too), and
the rewrite is active only while a serving function is traced (:func:`products_2d`): the Keras model itself is
unchanged, and the SavedModel holds plain TensorFlow ops.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

from tfaccel.core.layers import leaf_layers, product_layout, rows_product

#: What the ``export`` step's ``products`` option accepts.
PRODUCTS = ("keras", "2d")


def computes_in_bfloat16(model) -> bool:
    """Whether the float Dense / EinsumDense products of ``model`` compute in bfloat16 (a ``mixed_bfloat16``
    model)."""
    return any(getattr(layer, "compute_dtype", None) == "bfloat16" for layer in leaf_layers(model)
               if _layout(layer) is not None)


def resolve_products(products: str, model) -> str:
    """The form ``products`` asks for: ``"keras"`` / ``"2d"`` as given; ``"auto"``: ``"2d"`` for a model that
    computes in bfloat16, else ``"keras"``.

    Under ``mixed_bfloat16`` the 2-D form was faster at both shapes measured on a CPU with bf16 instructions
    (module docstring). On a CPU without them bfloat16 is emulated at 0.4-0.5x float32 in either form (Ice Lake:
    0.52x / 0.40x with Keras' ops, 0.49x / 0.39x as 2-D products), so there is no CPU to tell apart. In float32
    the export stays what ``model.export`` writes.
    """
    if products != "auto":
        return products
    return "2d" if computes_in_bfloat16(model) else "keras"


def _layout(layer):
    """``(K, free output shape, input axes contracted)`` of a float Dense / EinsumDense product, or None."""
    if getattr(layer, "quantization_mode", None) or getattr(layer, "lora_enabled", False):
        return None
    if getattr(layer, "_kernel", None) is None:
        return None
    return product_layout(layer)


def _call_2d(layer, k: int, free: tuple[int, ...], n_contracted: int):
    import tensorflow as tf

    n = math.prod(free)

    def call(inputs, training=None):
        # layer.kernel is read inside Layer.__call__'s autocast scope: the compute dtype under a mixed policy
        y = rows_product(inputs, k, free, n_contracted, lambda rows: tf.linalg.matmul(rows, tf.reshape(layer.kernel, [k, n])))
        if layer.bias is not None:
            y = y + tf.cast(layer.bias, y.dtype)
        if layer.activation is not None:
            y = layer.activation(y)
        return y

    return call


@contextlib.contextmanager
def products_2d(model) -> Iterator[list[str]]:
    """While active, every float ``Dense`` / ``EinsumDense`` product of ``model`` runs as one 2-D MatMul.

    Trace the serving function inside this context; the traced graph keeps the form.

    Args:
        model: a built Keras model.

    Yields:
        The paths of the layers rewritten (an einsum that is not one matrix product is left as it is).

    Example:
        >>> with products_2d(model) as rewritten:  # doctest: +SKIP
        ...     write_saved_model(model, "out")
    """
    patched = []
    try:
        for layer in leaf_layers(model):
            layout = _layout(layer)
            if layout is None:
                continue
            layer.call = _call_2d(layer, *layout)  # instance attribute: Layer.__call__ dispatches to it
            patched.append(layer)
        yield [layer.path for layer in patched]
    finally:
        for layer in patched:
            del layer.call
