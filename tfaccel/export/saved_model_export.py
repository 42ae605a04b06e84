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
from tfaccel.saved_model import write_saved_model

# write_saved_model lives in tfaccel.saved_model; re-exported so callers of the old place keep working.
__all__ = ["ExportStep", "export_saved_model", "write_saved_model"]


def export_saved_model(model, path: str | os.PathLike, *, jit_compile: bool = False, overwrite: bool = False) -> str:
    """Export a Keras model to a SavedModel folder, atomically.

    Args:
        model: a built Keras model (keras-hub models are).
        path: the SavedModel folder to create.
        jit_compile: XLA-compile the serving function.
        overwrite: replace an existing folder (only once the new one is complete).

    Returns:
        The path written.

    Example:
        >>> export_saved_model(model, "exported")  # doctest: +SKIP
        >>> tf.saved_model.load("exported").signatures["serving_default"](token_ids=..., ...)  # doctest: +SKIP
    """
    with StagedOutput(path, overwrite=overwrite, what="SavedModel folder", option="path",
                      create_parent=True) as staged:
        write_saved_model(model, staged.path, jit_compile=jit_compile)
        return str(staged.commit())


class ExportStep(Step):
    """Keras model -> SavedModel with a named, dynamically shaped ``serving_default`` signature.

    Args:
        jit_compile: XLA-compile the serving function (the `xla` step does this with more care).
    """

    name = "export"
    consumes = "keras"
    produces = "saved_model"
    # Same graph, same float32 math: only op scheduling may differ.
    default_tolerance = Tolerance(max_abs_diff=1e-4, min_cosine=0.99999, max_accuracy_drop=0.0)

    def __init__(self, jit_compile: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.jit_compile = jit_compile

    def params(self):
        return {"jit_compile": self.jit_compile, "signature": "serving_default"}

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        ctx.log("  writing SavedModel (serving_default)")
        write_saved_model(artifact.model, ctx.stage_dir, jit_compile=self.jit_compile)
        return Artifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names)
