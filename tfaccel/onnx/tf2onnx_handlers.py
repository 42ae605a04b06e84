"""tf2onnx handlers for TensorFlow ops that tf2onnx 1.17 does not convert, registered on import.

``tfaccel.onnx.onnx_convert`` imports this module in the tf2onnx child process, just before the
conversion starts; importing it anywhere else only adds entries to tf2onnx's handler table.

* ``Erfc`` (Keras 3's exact ``gelu``: ``0.5 * x * erfc(-x / sqrt(2))``, used by keras-hub DistilBERT,
  RoBERTa, XLM-RoBERTa, DeBERTa-v3 and Falcon): ``Erfc(x) = 1 - Erf(x)``, with ONNX ``Erf`` (opset 9+).
  The subtraction loses relative precision where ``erfc(x)`` is tiny (x > 3), not absolute precision:
  the absolute error stays at float32 rounding (~6e-8), which is what the gelu product needs.

Example:
    >>> import tfaccel.onnx.tf2onnx_handlers  # doctest: +SKIP  (then run tf2onnx.convert)
"""

from __future__ import annotations

import numpy as np
from tf2onnx import utils
from tf2onnx.handler import tf_op

#: TensorFlow ops this module adds to tf2onnx, for reports and tests.
HANDLED_OPS = ("Erfc",)


@tf_op("Erfc")
class Erfc:
    """``Erfc(x) -> Sub(1, Erf(x))`` (ONNX ``Erf`` exists from opset 9; tfaccel targets 13-21)."""

    @classmethod
    def version_9(cls, ctx, node, **kwargs):
        x = node.input[0]
        output_name = node.output[0]
        shapes, dtypes = node.output_shapes, node.output_dtypes
        np_dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(x))
        one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1.0, dtype=np_dtype))
        ctx.remove_node(node.name)
        erf = ctx.make_node("Erf", [x], op_name_scope=node.name, name="erf", shapes=shapes, dtypes=dtypes)
        ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[output_name], name=node.name,
                      shapes=shapes, dtypes=dtypes)
