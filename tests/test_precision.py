import numpy as np
import pytest

from tfaccel import Pipeline
from tfaccel.core.artifact import KerasRunner
from tfaccel.precision import (
    NonFiniteGuard,
    apply_mixed_precision,
    policy_scope,
    precision_summary,
    prepare_for_training,
    strip_mixed_precision,
)


def _labels(n, seed=0):
    return np.random.default_rng(seed).integers(0, 3, n).astype("int32")


@pytest.mark.parametrize("policy,half", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_dtype_rules_after_cast(bert_tiny, policy, half):
    import keras

    mixed = apply_mixed_precision(bert_tiny.model, policy)
    assert {str(v.dtype) for v in mixed.weights} == {"float32"}  # variables stay float32
    encoder_dense = [lay for lay in mixed._flatten_layers() if isinstance(lay, keras.layers.EinsumDense)]
    assert encoder_dense and all(lay.compute_dtype == half for lay in encoder_dense)
    assert mixed.get_layer("logits").compute_dtype == "float32"
    softmaxes = [lay for lay in mixed._flatten_layers() if isinstance(lay, keras.layers.Softmax)]
    assert softmaxes and all(type(s).__name__ == "Float32Softmax" for s in softmaxes)
    out = mixed(bert_tiny.sample_inputs, training=False)
    assert out.dtype.name == "float32"  # logits (and the loss computed from them) in float32
    ref = KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"]
    got = np.asarray(out)
    cos = np.sum(ref * got, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    assert cos.min() > (0.999 if half == "float16" else 0.99)
    assert bert_tiny.model.get_layer("logits").compute_dtype == "float32"  # the original is untouched
    summary = precision_summary(mixed)
    assert summary["compute_dtypes"][half] > summary["compute_dtypes"].get("float32", 0)


def test_strip_gives_back_the_float32_model(bert_tiny):
    back = strip_mixed_precision(apply_mixed_precision(bert_tiny.model, "mixed_float16"))
    assert {lay.compute_dtype for lay in back._flatten_layers()} == {"float32"}
    np.testing.assert_allclose(KerasRunner(back)(bert_tiny.sample_inputs)["logits"],
                               KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"], atol=1e-6)


def test_policy_scope_builds_fresh_models_and_restores_the_global_policy():
    import keras
    import keras_hub

    with policy_scope("mixed_bfloat16"):
        bb = keras_hub.models.BertBackbone(vocabulary_size=30, num_layers=1, num_heads=2, hidden_dim=8,
                                           intermediate_dim=16, max_sequence_length=16)
    assert bb.compute_dtype == "bfloat16" and keras.config.dtype_policy().name == "float32"
    with pytest.raises(ValueError, match="policy='fp8'"):
        with policy_scope("fp8"):
            pass


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_lowers_the_loss_and_keeps_dtype_rules(bert_tiny, policy):
    import keras

    x = bert_tiny.make_inputs(64, 16, seed=1)
    y = (x["token_ids"][:, 0] % 3).astype("int32")  # learnable: the label is a function of the first token
    model = prepare_for_training(
        bert_tiny.model, policy=policy, optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), sample_inputs=x,
    )
    if policy == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    assert model.tfaccel_xla == {"enabled": True, "unsupported_ops": []}
    history = model.fit(x, y, batch_size=16, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.8 * losses[0], losses
    assert {str(v.dtype) for v in model.trainable_weights} == {"float32"}
    assert model(x, training=False).dtype.name == "float32"


def _overflowing_model():
    import keras

    inp = keras.Input((4,), name="features")
    # constant kernels: ok_dense gives 20 per unit on the test's inputs, so boom's 8 * 20 * 3000 = 480000 is
    # far beyond float16's 65504 (random kernels left it near the limit: the test passed or failed by seed)
    h = keras.layers.Dense(8, activation="relu", name="ok_dense", kernel_initializer=keras.initializers.Constant(0.5))(inp)
    h = keras.layers.Dense(8, name="boom", kernel_initializer=keras.initializers.Constant(3000.0))(h)
    out = keras.layers.Dense(2, name="logits")(h)
    return keras.Model(inp, out)


def test_non_finite_guard_stops_and_names_the_overflowing_layer():
    import keras

    model = prepare_for_training(_overflowing_model(), policy="mixed_float16", optimizer="sgd",
                                 loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.full((32, 4), 10.0, "float32")
    y = np.zeros(32, "int32")
    guard = NonFiniteGuard(probe_inputs=x[:4])
    with pytest.warns(RuntimeWarning, match="first layer with a non-finite output is '.*boom'"):
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[guard])
    assert guard.culprit.endswith("boom")
    assert len(history.history["loss"]) == 1  # stopped in the first epoch
    # the same model in float32 trains without tripping the guard
    model32 = prepare_for_training(_overflowing_model(), optimizer="sgd",
                                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    guard32 = NonFiniteGuard(probe_inputs=x[:4], check_every=1)
    model32.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[guard32])
    assert guard32.message is None


def test_xla_fallback_names_the_op_that_does_not_compile():
    import keras
    import tensorflow as tf

    class PyLayer(keras.layers.Layer):
        def call(self, x):
            y = tf.py_function(lambda t: t * 2.0, [x], tf.float32)
            y.set_shape(x.shape)
            return y

    inp = keras.Input((4,))
    model = keras.Model(inp, keras.layers.Dense(2)(PyLayer()(inp)))
    x = np.ones((2, 4), "float32")
    with pytest.warns(RuntimeWarning, match="XLA cannot compile.*EagerPyFunc"):
        compiled = prepare_for_training(model, optimizer="sgd", loss="mse", sample_inputs=x)
    assert compiled.tfaccel_xla["enabled"] is False and "EagerPyFunc" in compiled.tfaccel_xla["unsupported_ops"]
    compiled.fit(x, np.zeros((2, 2), "float32"), verbose=0)  # trains without XLA


def test_mixed_precision_steps_export_a_servable_model(bert_tiny, tmp_path):
    from tfaccel.servable import check_servable

    report = Pipeline(["mixed_bfloat16"], shapes=[(1, 16)], runs=3, warmup=1, log=lambda m: None, footprints=False).run(
        bert_tiny, tmp_path / "out")
    assert [s.step for s in report.stages] == ["reference", "mixed_bfloat16", "export"]
    st = report.stage("mixed_bfloat16")
    assert st.comparison["min_cosine"] > 0.99 and any("variables" in n for n in st.notes)
    x = bert_tiny.sample_inputs
    served = check_servable(report.final_saved_model_path, inputs=x)["outputs"]["logits"]
    ref = KerasRunner(bert_tiny.model)(x)["logits"]
    cos = np.sum(ref * served, -1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(served, axis=-1))
    assert served.dtype == np.float32 and cos.min() > 0.99
    # the export of a bfloat16 model writes its products 2-D (export products="auto"), checked as bfloat16
    export = report.stage("export")
    assert any("2-D MatMul" in n and "bfloat16" in n for n in export.notes), export.notes
    assert export.tolerance["min_cosine"] == 0.9999 and export.tolerance["max_abs_diff"] is None
    import tensorflow as tf
    from conftest import graph_nodes

    nodes = graph_nodes(report.final_saved_model_path)
    assert "Einsum" not in [n.op for n in nodes]
    assert "bfloat16" in {tf.dtypes.as_dtype(n.attr["T"].type).name for n in nodes if n.op == "MatMul"}


def test_half_precision_hardware_check_explains_itself():
    from tfaccel.compat import capabilities

    for policy in ("mixed_float16", "mixed_bfloat16"):
        fast, why = capabilities().half_precision(policy)
        assert isinstance(fast, bool) and ("float16" in why)
