"""Quantization on real weights and data: all-MiniLM-L6-v2 fine-tuned on BBC News (200 held-out articles)."""

import pytest

from tfaccel import Pipeline
from tfaccel.export import ExportStep
from tfaccel.quantization import Int4Step, Int8Step, LiteRTDynamicStep

pytestmark = pytest.mark.large


def test_int8_int4_litert_keep_accuracy_within_one_point_and_int8_is_small(minilm_bbc, tmp_path):
    # Servability of the int8/int4 SavedModels and the LiteRT model in fresh processes: test_quantization.py.
    # int4 without XLA here: the same quantized numbers, without an XLA compile per eval batch shape.
    steps = [Int8Step(), Int4Step(jit_compile=False), ExportStep(), LiteRTDynamicStep()]
    report = Pipeline(steps, shapes=[(1, 128)], measure=False, log=print).run(minilm_bbc, tmp_path / "out")
    ref = report.reference.accuracy
    assert ref >= 0.90
    for step in ("int8", "int4", "litert-dynamic"):
        stage = report.stage(step)
        assert stage.status == "ok" and stage.accuracy >= ref - 0.01, (step, stage.accuracy, ref)

    int8, fp32 = report.stage("int8"), report.stage("export")
    # Embeddings are quantized too (half of MiniLM's weights). Both SavedModels store each variable twice
    # (Keras ExportArchive), so the ratio is the weights' ratio: no float32 copy of a quantized weight.
    assert int8.size_bytes <= 0.3 * fp32.size_bytes, (int8.size_bytes, fp32.size_bytes)
    assert "token_embedding" in int8.params["quantized_layers"] and "logits" in int8.params["left_in_float"]
    assert report.stage("int4").size_bytes < int8.size_bytes
