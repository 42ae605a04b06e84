"""Generation from tfaccel's artifacts: one greedy runner for the SavedModel ``generate_greedy``
signature, the ONNX KV-cache decoder in onnxruntime and the TensorRT decoder engine."""

from tfaccel.generation.generators import (
    Generator,
    OnnxDecoderGenerator,
    SavedModelGenerator,
    TrtDecoderGenerator,
    artifact_kind,
    generate,
    load_generator,
)
from tfaccel.generation.greedy_loop import GenerationResult, greedy_generate
from tfaccel.generation.prompts import prepare_prompts

__all__ = ["GenerationResult", "Generator", "OnnxDecoderGenerator", "SavedModelGenerator", "TrtDecoderGenerator",
           "artifact_kind", "generate", "greedy_generate", "load_generator", "prepare_prompts"]
