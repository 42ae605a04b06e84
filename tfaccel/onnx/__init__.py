"""SavedModel -> ONNX with tf2onnx, onnxruntime dynamic int8 quantization of that ONNX, and the
onnxruntime runner of the ``onnx`` artifact kind."""

from tfaccel.onnx.onnx_convert import OnnxStep, convert_saved_model
from tfaccel.onnx.onnx_runner import OnnxRunner, ort_cpu_session
from tfaccel.onnx.ort_quantize import OrtInt8Step, quantize_dynamic_int8

__all__ = ["OnnxRunner", "OnnxStep", "OrtInt8Step", "convert_saved_model", "ort_cpu_session", "quantize_dynamic_int8"]
