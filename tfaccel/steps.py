"""THE registry: step name -> Step class. The CLI, docs, :class:`tfaccel.Pipeline` and ``--auto``
read it; it is the only module that knows every technique.

Importing it imports every technique package, and each registers the artifact kinds it runs
(:func:`tfaccel.core.artifact.register_kind`): ``import tfaccel`` imports this module, so every kind
has its runner once tfaccel is imported. Technique packages import TensorFlow only inside functions,
so this stays light.
"""

from __future__ import annotations

import functools
from typing import Any

import tfaccel.generation  # noqa: F401  (registers the decoder kinds: onnx_decoder, tensorrt_decoder)
from tfaccel.core.step import Step, parse_step_spec
from tfaccel.errors import PlanError
from tfaccel.export import ExportStep
from tfaccel.generation.tensorrt_decoder import TensorRTDecoderStep
from tfaccel.onnx import OnnxStep, OrtInt8Step
from tfaccel.onnx.decoder_steps import OnnxDecoderStep, OrtDecoderInt4Step, OrtDecoderInt8Step
from tfaccel.openvino import OpenVINOInt8Step, OpenVINOStep
from tfaccel.precision import MixedPrecisionStep
from tfaccel.pruning.steps import StructuredPruneStep
from tfaccel.quantization import Int4Step, Int8Step, LiteRTDynamicStep
from tfaccel.quantization.gptq_awq import AwqStep, GptqStep
from tfaccel.tensorrt import TensorRTStep, TftrtStep
from tfaccel.xla import GenerateStep, XlaStep


@functools.cache
def _table() -> dict[str, tuple[type, str]]:
    return {
        "export": (ExportStep, "Keras model -> SavedModel (serving_default, named inputs, dynamic batch/sequence)"),
        "mixed_float16": (functools.partial(MixedPrecisionStep, policy="mixed_float16"),
                          "Keras float32 -> float16 compute (softmax, layer norm, head in float32)"),
        "mixed_bfloat16": (functools.partial(MixedPrecisionStep, policy="mixed_bfloat16"),
                           "Keras float32 -> bfloat16 compute (softmax, layer norm, head in float32)"),
        "prune-structured": (StructuredPruneStep, "Keras -> smaller Keras: remove feed-forward units by importance, "
                             "rebuild the keras-hub model, distill from the original"),
        "int8": (Int8Step, "Keras -> int8 SavedModel (Keras quantize; int8 products in an XLA-compiled serving function)"),
        "int4": (Int4Step, "Keras -> int4 weight-only SavedModel (Keras quantize; smallest, not faster)"),
        "gptq": (GptqStep, "keras-hub CausalLM -> the same model with Keras GPTQ 4-bit transformer weights, "
                 "calibrated on text (carried unchanged into onnx-decoder and generate)"),
        "awq": (AwqStep, "keras-hub CausalLM -> the same model with Keras AWQ 4-bit transformer weights, calibrated "
                "on text (carried unchanged into onnx-decoder and generate)"),
        "xla": (XlaStep, "Keras model -> SavedModel with an XLA-compiled serving_default (sequence buckets)"),
        "generate": (GenerateStep, "keras-hub CausalLM (every family) -> SavedModel with generate/generate_greedy: "
                     "the decode loop and KV cache inside the SavedModel"),
        "onnx": (OnnxStep, "SavedModel -> ONNX with tf2onnx, checked in onnxruntime (side artifact)"),
        "tftrt": (TftrtStep, "SavedModel -> TF-TRT SavedModel, fp32/fp16/int8 (TensorFlow built with TensorRT + NVIDIA GPU)"),
        "tensorrt": (TensorRTStep, "ONNX -> TensorRT engine, fp32/fp16/int8 (`trt` extra + NVIDIA GPU; side artifact)"),
        "ort-int8": (OrtInt8Step, "ONNX -> onnxruntime dynamic int8 ONNX (side artifact)"),
        "onnx-decoder": (OnnxDecoderStep, "causal LM -> ONNX KV-cache decoder (past/present inputs; side artifact)"),
        "ort-decoder-int8": (OrtDecoderInt8Step, "ONNX decoder -> int8 decoder: 8-bit weight blocks in MatMulNBits "
                             "(method=dynamic: onnxruntime dynamic int8) (side artifact)"),
        "ort-decoder-int4": (OrtDecoderInt4Step, "ONNX decoder -> int4 weight-only MatMulNBits decoder (side artifact)"),
        "tensorrt-decoder": (TensorRTDecoderStep, "ONNX decoder -> TensorRT fp16 decoder engine (`trt` extra + NVIDIA "
                             "GPU; side artifact)"),
        "openvino": (OpenVINOStep, "SavedModel -> OpenVINO IR (openvino.convert_model), run in OpenVINO's CPU plugin at "
                     "an explicit inference precision (auto: bf16 where the CPU has it; `openvino` extra; side artifact)"),
        "ov-int8": (OpenVINOInt8Step, "OpenVINO IR -> int8 IR (NNCF post-training quantization for transformers; "
                    "accuracy_control=true keeps the step's accuracy budget; `openvino` extra; side artifact)"),
        "litert-dynamic": (LiteRTDynamicStep, "SavedModel -> dynamic-range int8 LiteRT model, checked in ai-edge-litert "
                           "(side artifact)"),
    }


def available_steps() -> dict[str, str]:
    """Step names and what each does."""
    return {name: desc for name, (_, desc) in _table().items()}


def producers_of(kind: str) -> list[str]:
    """Names of the steps that make an artifact of ``kind`` from another kind (for plan errors)."""
    out = []
    for name, (cls, _) in _table().items():
        cls = getattr(cls, "func", cls)  # functools.partial rows
        if getattr(cls, "produces", None) == kind and getattr(cls, "consumes", None) != kind:
            out.append(name)
    return out


def get_step(name: str, **kwargs: Any) -> Step:
    """A step object by name, e.g. ``get_step("onnx", opset=17)``."""
    table = _table()
    if name not in table:
        raise PlanError(f"Unknown step {name!r}. Available steps: {', '.join(table)}.")
    try:
        return table[name][0](**kwargs)
    except TypeError as exc:
        raise PlanError(f"Bad options for step {name!r}: {exc}") from exc


def step_from_spec(spec: str, **options: Any) -> Step:
    """A step object from ``"name"`` or ``"name@from"`` (see :func:`get_step` for ``options``).

    Example:
        >>> step_from_spec("litert-dynamic@export").start_from
        'export'
    """
    name, start = parse_step_spec(spec)
    step = get_step(name, **options)
    step.start_from = start
    return step
