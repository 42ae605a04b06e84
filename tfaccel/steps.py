"""THE registry: step name -> Step class. The CLI, docs, :class:`tfaccel.Pipeline` and ``--auto``
read it; it is the only module that knows every technique.

Importing it imports every technique package, and each registers the artifact kinds it runs
(:func:`tfaccel.core.artifact.register_kind`): ``import tfaccel`` imports this module, so every kind
has its runner once tfaccel is imported. Technique packages import TensorFlow only inside functions,
so this stays light.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any

import tfaccel.generation  # noqa: F401  (registers the decoder kinds: onnx_decoder, tensorrt_decoder)
from tfaccel.core.step import Step, parse_step_spec
from tfaccel.errors import ArgumentError, PlanError
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


def step_options(name: str) -> list[str]:
    """The options a step takes (its constructor's keyword arguments, ``tolerance`` and ``on_breach`` last).

    Example:
        >>> step_options("onnx")
        ['opset', 'fuse', 'tolerance', 'on_breach']
    """
    factory = _table()[name][0]
    fixed = set(getattr(factory, "keywords", {}) or {})  # functools.partial rows (mixed_float16's policy)
    cls = getattr(factory, "func", factory)
    out: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        out += [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in out and p.name not in fixed]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return [o for o in out if o not in ("tolerance", "on_breach")] + ["tolerance", "on_breach"]


def get_step(name: str, **kwargs: Any) -> Step:
    """A step object by name, e.g. ``get_step("onnx", opset=17)``.

    Raises:
        PlanError: an unknown step, or an option the step does not take (the message lists its options).
        ArgumentError: a value the step refuses (a ValueError too).
    """
    table = _table()
    if not isinstance(name, str) or name not in table:
        close = difflib.get_close_matches(str(name), table, n=1)
        raise PlanError(f"Unknown step {name!r}. Available steps: {', '.join(table)}."
                        + (f" Did you mean {close[0]!r}?" if close else ""))
    options = step_options(name)
    unknown = [k for k in kwargs if k not in options]
    if unknown:
        close = difflib.get_close_matches(unknown[0], options, n=1)
        raise PlanError(f"Step {name!r} has no option {unknown[0]!r}.{f' Did you mean {close[0]!r}?' if close else ''} "
                        f"Its options: {', '.join(options)} (e.g. --set {name}.{options[0]}=VALUE).")
    try:
        return table[name][0](**kwargs)
    except (TypeError, ValueError) as exc:
        raise ArgumentError(f"Bad option for step {name!r}: {exc}") from exc


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
