"""Export a Keras model to a SavedModel that serves anywhere TensorFlow runs, without tfaccel.

The ``serving_default`` signature takes the model's inputs by name (e.g. ``token_ids``,
``segment_ids``, ``padding_mask``) with dynamic batch and sequence dimensions, and returns the model's
outputs by name (e.g. ``logits``, or ``sequence_output`` and ``pooled_output``). It is written by
:func:`tfaccel.saved_model.write_saved_model` (``keras.export.ExportArchive``, which ``saved_model_cli run``
and TF Serving can load), each weight stored once.
"""

from __future__ import annotations

import os

from tfaccel.core.artifact import Artifact
from tfaccel.core.files import StagedOutput
from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.export.products import PRODUCTS, computes_in_bfloat16, products_2d, resolve_products
from tfaccel.saved_model import write_saved_model

# write_saved_model lives in tfaccel.saved_model; re-exported so callers of the old place keep working.
__all__ = ["ExportStep", "export_saved_model", "write_saved_model"]


def export_saved_model(model, path: str | os.PathLike, *, jit_compile: bool = False, overwrite: bool = False,
                       products: str = "auto") -> str:
    """Export a Keras model to a SavedModel folder, atomically.

    Args:
        model: a built Keras model (keras-hub models are).
        path: the SavedModel folder to create.
        jit_compile: XLA-compile the serving function.
        overwrite: replace an existing folder (only once the new one is complete).
        products: ``"keras"``, ``"2d"`` or ``"auto"`` (default), as the ``export`` step's option of that name
            (:class:`ExportStep`).

    Returns:
        The path written.

    Example:
        >>> export_saved_model(model, "exported")  # doctest: +SKIP
        >>> tf.saved_model.load("exported").signatures["serving_default"](token_ids=..., ...)  # doctest: +SKIP
    """
    products = _checked_products(products)
    form = resolve_products(products, model)
    with StagedOutput(path, overwrite=overwrite, what="SavedModel folder", option="path",
                      create_parent=True) as staged:
        _write(model, staged.path, jit_compile, form)
        return str(staged.commit())


def _checked_products(products: str) -> str:
    if products not in (*PRODUCTS, "auto"):
        raise ValueError(f"products must be one of {(*PRODUCTS, 'auto')}. Received: products={products!r}")
    return products


def _write(model, folder, jit_compile: bool, form: str) -> list[str]:
    """Write the SavedModel with its products in ``form`` ("keras" or "2d"); returns the layers whose products
    were written as 2-D MatMuls."""
    if form == "keras":
        write_saved_model(model, folder, jit_compile=jit_compile)
        return []
    with products_2d(model) as rewritten:
        write_saved_model(model, folder, jit_compile=jit_compile)
    return rewritten


#: The ``export`` step's bounds for bfloat16 products written 2-D (other kernels than the Keras model's).
HALF_PRODUCTS_TOLERANCE = Tolerance(max_abs_diff=None, min_cosine=0.9999, max_accuracy_drop=0.01)


class ExportStep(Step):
    """Keras model -> SavedModel with a named, dynamically shaped ``serving_default`` signature.

    Args:
        jit_compile: XLA-compile the serving function (the `xla` step does this with more care).
        products: how the float weight products are written: ``"keras"`` (Keras' own ops, what ``model.export``
            writes), ``"2d"`` (every Dense / EinsumDense product as one 2-D MatMul, which reaches oneDNN's inner
            product; see :mod:`tfaccel.export.products`) or ``"auto"`` (default: ``"2d"`` for a model that computes
            in bfloat16, where it was 1.12x / 1.71x ``model.export`` against 1.08x / 1.38x on a CPU with bf16
            instructions, else ``"keras"``). Under bfloat16 the 2-D products are other kernels rounding to
            bfloat16 (minilm-bbc: max abs diff 2.7e-3, cosine 0.9999992 against the Keras model), so without a
            ``tolerance`` of its own such an export is checked with ``HALF_PRODUCTS_TOLERANCE``.
    """

    name = "export"
    consumes = "keras"
    produces = "saved_model"
    # Same graph, same float32 math: only op scheduling may differ.
    default_tolerance = Tolerance(max_abs_diff=1e-4, min_cosine=0.99999, max_accuracy_drop=0.0)

    def __init__(self, jit_compile: bool = False, products: str = "auto", **kwargs):
        super().__init__(**kwargs)
        self.jit_compile, self.products = jit_compile, _checked_products(products)

    def params(self):
        return {"jit_compile": self.jit_compile, "products": self.products, "signature": "serving_default"}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        ctx.log("  writing SavedModel (serving_default)")
        rewritten = _write(artifact.model, ctx.stage_dir, self.jit_compile,
                           resolve_products(self.products, artifact.model))
        if rewritten:
            why = " (products=auto: the model computes in bfloat16)" if self.products == "auto" else ""
            ctx.note(f"{len(rewritten)} Dense / EinsumDense products written as one 2-D MatMul each{why}")
            if computes_in_bfloat16(artifact.model):  # other bfloat16 kernels than the Keras model's: checked
                self.bound_by(HALF_PRODUCTS_TOLERANCE)  # as bfloat16, not as the same float32 math
        return Artifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names)
