"""litert-dynamic on keras-hub DeBERTa-v3 (int64 Abs/Sign in its relative-position buckets, which LiteRT's
builtin kernels lack) and the converter's refusals named as StepErrors, on tiny configs."""

import numpy as np
import pytest

from tfaccel import Pipeline, StepError
from tfaccel.core.artifact import KerasRunner

FAST = {"shapes": [(1, 16)], "runs": 2, "warmup": 1, "measure": False, "log": lambda m: None}


def _module(tmp_path, fn, spec):
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[spec])
        def __call__(self, x):
            return {"y": fn(x)}

    m = M()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": m.__call__})
    return tmp_path / "sm"


def test_deberta_v3_converts_to_litert_and_matches_keras(tmp_path):
    pytest.importorskip("ai_edge_litert")
    from tfaccel import load_source
    from tfaccel.quantization.litert import LiteRTRunner

    src = load_source("tiny:deberta_v3")
    report = Pipeline(["export", "litert-dynamic"], **FAST).run(src, tmp_path / "out")
    stage = report.stage("litert-dynamic")
    assert stage.status == "ok"
    assert any("no int64 kernels for Abs(tensor<?x?xi64>), Sign(tensor<?x?xi64>)" in n for n in stage.notes), \
        stage.notes
    runner = LiteRTRunner(next((tmp_path / "out" / stage.path).glob("*.tflite")))
    # A longer sequence than the sample: the relative-position buckets are computed at run time.
    x = src.make_inputs(2, 40, seed=1)
    got, want = runner(x)["logits"], KerasRunner(src.model)(x)["logits"]
    cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    # int8 weights, activations quantized per call: the step's own bound is cosine >= 0.98 (measured 0.9999).
    assert np.all(np.isfinite(got)) and cos.min() >= 0.98


def test_int64_abs_and_sign_run_in_int32_with_identical_results(tmp_path):
    pytest.importorskip("ai_edge_litert")
    import tensorflow as tf

    from tfaccel.quantization.litert import LiteRTRunner, convert_dynamic_range

    sm = _module(tmp_path, lambda x: tf.abs(x) * 10 + tf.sign(x), tf.TensorSpec([None], tf.int64, name="x"))
    notes = []
    path = convert_dynamic_range(sm, tmp_path / "m.tflite", notes=notes)
    assert len(notes) == 1 and "2 such op(s) run in int32" in notes[0]
    x = np.array([-70000, -3, 0, 5, 123456], dtype=np.int64)
    np.testing.assert_array_equal(LiteRTRunner(path)({"x": x})["y"], np.abs(x) * 10 + np.sign(x))


def test_an_op_litert_cannot_run_is_named_in_a_step_error(tmp_path):
    import tensorflow as tf

    from tfaccel.quantization.litert import convert_dynamic_range

    sm = _module(tmp_path, lambda x: tf.math.igamma(x, x), tf.TensorSpec([None], tf.float32, name="x"))
    with pytest.raises(StepError, match=r"LiteRT has no kernel for: Igamma \(Igamma\(tensor<\?xf32>"):
        convert_dynamic_range(sm, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
