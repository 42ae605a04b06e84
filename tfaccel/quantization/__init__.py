"""Post-training dynamic quantization: Keras int8/int4 (``int8``, ``int4`` steps) and LiteRT dynamic
range (``litert-dynamic``). The ONNX route (``onnx`` + ``ort-int8``) lives in :mod:`tfaccel.onnx`."""

from tfaccel.quantization.int8_kernels import KERNELS, int8_kernels
from tfaccel.quantization.int8_step import Int4Step, Int8Step
from tfaccel.quantization.keras_quantize import quantize_model
from tfaccel.quantization.litert import (
    LiteRTDynamicStep,
    LiteRTRunner,
    convert_dynamic_range,
)
from tfaccel.quantization.quantization_config import (
    QUANTIZABLE_TYPES,
    LayerDecision,
    QuantizationConfig,
)
from tfaccel.quantization.quantization_report import QuantizationSummary

__all__ = [
    "KERNELS",
    "QUANTIZABLE_TYPES",
    "Int4Step",
    "Int8Step",
    "LayerDecision",
    "LiteRTDynamicStep",
    "LiteRTRunner",
    "QuantizationConfig",
    "QuantizationSummary",
    "convert_dynamic_range",
    "int8_kernels",
    "quantize_model",
]
