"""TensorRT, two routes:

- ``tftrt`` (:class:`TftrtStep`): TF-TRT inside TensorFlow, SavedModel in and out. Only TensorFlow
  builds with TensorRT have it (pip tensorflow <= 2.17, NVIDIA's TensorFlow containers).
- ``tensorrt`` (:class:`TensorRTStep`): ONNX (from the ``onnx`` step) -> TensorRT engine with the
  ``tensorrt`` package (``pip install 'tfaccel[trt]'``), for any recent TensorFlow.

Both need an NVIDIA GPU; ``tfaccel env`` says which route this machine has and why. Nothing here
imports TensorFlow's TF-TRT module or ``tensorrt`` until a step runs.
"""

from tfaccel.tensorrt.calibration import representative_batches
from tfaccel.tensorrt.engine_build import ParserIssue, build_engine, describe_parser_errors
from tfaccel.tensorrt.engine_runner import TrtEngineRunner
from tfaccel.tensorrt.onnx_precision import convert_onnx_to_fp16, quantize_onnx_qdq_int8
from tfaccel.tensorrt.shape_profiles import ShapeProfile, onnx_input_dims, profile_from_source
from tfaccel.tensorrt.tensorrt_step import TensorRTStep
from tfaccel.tensorrt.tftrt_step import TftrtStep, convert_with_tftrt
from tfaccel.tensorrt.trt_api import BuildPlan, TrtApi, plan_build
from tfaccel.tensorrt.trt_config import TensorRTConfig, TftrtConfig

__all__ = [
    "BuildPlan",
    "ParserIssue",
    "ShapeProfile",
    "TensorRTConfig",
    "TensorRTStep",
    "TftrtConfig",
    "TftrtStep",
    "TrtApi",
    "TrtEngineRunner",
    "build_engine",
    "convert_onnx_to_fp16",
    "convert_with_tftrt",
    "describe_parser_errors",
    "onnx_input_dims",
    "plan_build",
    "profile_from_source",
    "quantize_onnx_qdq_int8",
    "representative_batches",
]
