"""TF-TRT: a SavedModel whose supported subgraphs run as TensorRT engines inside TensorFlow.

Only TensorFlow builds with TensorRT have it (pip's tensorflow up to 2.17, NVIDIA's containers);
TF 2.18+ pip builds do not (shared FACTS.md). The step checks that first and points to the ONNX
route (``tensorrt`` step) where TF-TRT is missing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tfaccel.core.artifact import Artifact
from tfaccel.core.step import StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.errors import StepError
from tfaccel.tensorrt.availability import require_gpu, require_tf_tensorrt
from tfaccel.tensorrt.shape_profiles import ShapeProfile
from tfaccel.tensorrt.trt_config import TftrtConfig, TrtStepBase, profiles_for

# TensorRT fuses and reorders the math; fp32 layers may use TF32 tensor cores (about 1e-3 relative
# error in matrix products), so bound the direction (cosine) and the task accuracy, not absolute values.
TFTRT_TOLERANCES = {
    "fp32": Tolerance(max_abs_diff=None, min_cosine=0.9999, max_accuracy_drop=0.0),
    # fp16 keeps ~3 significant digits: logits move by ~1e-3 relative; a decision may flip rarely.
    "fp16": Tolerance(max_abs_diff=None, min_cosine=0.999, max_accuracy_drop=0.01),
    # int8 with static, calibrated activation scales: as the tensorrt step's int8 (2 points, measured there).
    "int8": Tolerance(max_abs_diff=None, min_cosine=0.98, max_accuracy_drop=0.02),
}


def build_inputs_for(source, profiles: Sequence[ShapeProfile]) -> list[dict[str, np.ndarray]]:
    """Inputs at the min, opt and max corners of each profile, for ``TrtGraphConverterV2.build``."""
    out, seen = [], set()
    for prof in profiles:
        for batch, seq in prof.build_shapes():
            if (batch, seq) in seen:
                continue
            seen.add((batch, seq))
            out.append(source.make_inputs(batch, seq))
    return out


def convert_with_tftrt(saved_model_dir: str | os.PathLike, output_dir: str | os.PathLike, config: TftrtConfig,
                       build_inputs: Sequence[dict[str, np.ndarray]],
                       calibration_batches: Sequence[dict[str, np.ndarray]] | None = None, *,
                       signature: str = "serving_default", log=None) -> dict[str, Any]:
    """Convert a SavedModel with TF-TRT, build its engines for ``build_inputs`` and save it.

    Args:
        saved_model_dir: the SavedModel to convert (its ``signature`` takes named inputs).
        output_dir: where to write the TF-TRT SavedModel (empty or absent).
        config: the :class:`TftrtConfig`.
        build_inputs: input dicts at the shapes to build engines (profiles) for.
        calibration_batches: equal-shaped representative input dicts, for int8.
        signature: the signature to convert.
        log: callable receiving progress lines.

    Returns:
        ``{"summary": [...]}``: TF-TRT's own count of engines and converted ops.

    Raises:
        StepError: this TensorFlow has no TF-TRT (checked first, before anything is loaded), no GPU,
            or int8 without calibration data.

    Example:
        >>> convert_with_tftrt("exported", "tftrt_model", TftrtConfig("fp16"),
        ...                    [source.make_inputs(1, 128), source.make_inputs(32, 128)])  # doctest: +SKIP
    """
    require_tf_tensorrt()
    require_gpu("TF-TRT")
    if config.precision == "int8" and not calibration_batches:
        raise StepError("TF-TRT int8 needs calibration batches (a representative dataset); none were given.")
    if not build_inputs:
        raise StepError("TF-TRT needs at least one input batch to build engines for (the profile's shapes).")
    from tensorflow.python.compiler.tensorrt import trt_convert

    converter = trt_convert.TrtGraphConverterV2(
        input_saved_model_dir=str(saved_model_dir), input_saved_model_signature_key=signature,
        **config.converter_kwargs(),
    )

    def calibration_input_fn():
        yield from calibration_batches

    def input_fn():
        yield from build_inputs

    if log:
        log(f"  TF-TRT: converting ({config.precision.upper()}, minimum_segment_size {config.minimum_segment_size})")
    # In dynamic-shape mode the calibration data is stored here and run by build(), after the profiles.
    converter.convert(calibration_input_fn=calibration_input_fn if config.precision == "int8" else None)
    if log:
        log(f"  TF-TRT: building engines for {len(build_inputs)} input shapes")
    converter.build(input_fn=input_fn)
    converter.save(str(output_dir))
    lines: list[str] = []
    try:
        converter.summary(print_fn=lambda line="": lines.append(str(line)), detailed=False)
    except Exception as exc:  # the summary is informative only
        lines.append(f"(no TF-TRT summary: {exc})")
    return {"summary": [ln.strip() for ln in lines if ln.strip().startswith("[*]")]}


class TftrtStep(TrtStepBase):
    """SavedModel -> TF-TRT SavedModel (TensorRT engines inside TensorFlow's graph).

    Needs a TensorFlow built with TensorRT (pip tensorflow <= 2.17, NVIDIA's containers) and an NVIDIA
    GPU; elsewhere it fails before any work and points to the ``tensorrt`` step.

    Args:
        precision: "fp32", "fp16" or "int8"; or pass ``config``. Other keyword arguments are
            :class:`TftrtConfig` fields (minimum_segment_size, max_workspace_bytes, profiles, ...).
        config: a whole :class:`TftrtConfig` instead of fields.
        calibration_inputs: your own int8 calibration data (name -> array); default: the source's
            eval split, else its sample inputs.
        tolerance, on_breach: see :class:`tfaccel.Step`; the default tolerance depends on the precision.

    Example:
        >>> from tfaccel import Pipeline
        >>> Pipeline(["export", TftrtStep("fp16", max_batch=32)]).run(source, "out")  # doctest: +SKIP
    """

    name = "tftrt"
    consumes = "saved_model"
    produces = "saved_model"
    default_tolerance = TFTRT_TOLERANCES["fp16"]

    config_cls = TftrtConfig

    @classmethod
    def tolerance_for(cls, config: TftrtConfig) -> Tolerance:
        return TFTRT_TOLERANCES[config.precision]

    route = "tftrt"

    def check(self, source) -> None:
        """Fail before any work where TF-TRT cannot run: no TensorRT in TensorFlow, no GPU, bad profile."""
        require_tf_tensorrt()
        require_gpu("TF-TRT")
        profiles_for(self.config, source)

    def apply(self, artifact: Artifact, ctx: StepContext) -> Artifact:
        self.check(ctx.source)
        self._note_route(ctx)
        profiles = profiles_for(self.config, ctx.source)
        ctx.note("profiles: " + "; ".join(p.describe() for p in profiles)
                 + f" (strategy {self.config.profile_strategy})")
        calibration = self._calibration(ctx) if self.config.precision == "int8" else None
        info = convert_with_tftrt(artifact.path, ctx.stage_dir, self.config, build_inputs_for(ctx.source, profiles),
                                  calibration, log=ctx.log)
        for line in info["summary"]:
            ctx.note(f"TF-TRT {line.lstrip('[*] ')}")
        if any("engines: 0" in line for line in info["summary"]):
            ctx.note("WARNING: TF-TRT converted no subgraph; this SavedModel runs as plain TensorFlow. "
                     "Lower minimum_segment_size or use the tensorrt step.")
        return Artifact(kind="saved_model", path=str(ctx.stage_dir), input_names=artifact.input_names,
                        info={"tftrt": self.config.get_config()})
