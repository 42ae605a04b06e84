"""LiteRT conversion of what keras-hub DeBERTa-v3 needs (int64 Abs/Sign in its relative-position buckets, which
LiteRT's builtin kernels lack) run in int32, and the converter's refusals named as StepErrors. litert-dynamic
on tiny DeBERTa-v3 itself is checked in test_families.py, on the family matrix's own conversion."""

import numpy as np
import pytest

from tfaccel import StepError


def _module(tmp_path, fn, spec):
    import tensorflow as tf

    class M(tf.Module):
        @tf.function(input_signature=[spec])
        def __call__(self, x):
            return {"y": fn(x)}

    m = M()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": m.__call__})
    return tmp_path / "sm"


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
