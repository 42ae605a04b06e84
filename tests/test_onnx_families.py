"""tf2onnx's missing ``Erfc`` handler (tfaccel.onnx.tf2onnx_handlers), which the exact gelu of keras-hub
DistilBERT, RoBERTa, XLM-RoBERTa, DeBERTa-v3 and Falcon needs. The route itself (export -> onnx -> ort-int8) on
those families' tiny configs is checked in test_families.py, on the family matrix's own export and conversion."""

import numpy as np

from tfaccel.onnx.onnx_runner import OnnxRunner


def test_erfc_handler_matches_tensorflow_erfc_over_the_gelu_range(tmp_path):
    """Erfc(x) = 1 - Erf(x) in onnxruntime vs TensorFlow's Erfc, from x = -6 to 6 (gelu's inputs)."""
    import tensorflow as tf

    from tfaccel.onnx import convert_saved_model

    class M(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        def __call__(self, x):
            return {"y": tf.math.erfc(x)}

    m = M()
    tf.saved_model.save(m, str(tmp_path / "sm"), signatures={"serving_default": m.__call__})
    path = convert_saved_model(tmp_path / "sm", tmp_path / "erfc.onnx")
    x = np.linspace(-6, 6, 1201, dtype=np.float32)
    got = OnnxRunner(path)({"x": x})["y"]
    want = tf.math.erfc(x).numpy()
    # float32: 1 - erf(x) keeps absolute precision (measured max 1.2e-7), not relative precision near x=6.
    np.testing.assert_allclose(got, want, atol=5e-7, rtol=0)
