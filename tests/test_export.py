import numpy as np
import pytest
from conftest import graph_nodes, run_python

from tfaccel.core.artifact import KerasRunner, SavedModelRunner
from tfaccel.export import export_saved_model
from tfaccel.servable import ServabilityError, check_servable


@pytest.fixture(scope="module")
def exported(bert_tiny_saved_model):
    return bert_tiny_saved_model


def test_signature_has_named_inputs_with_dynamic_batch_and_sequence(exported):
    import tensorflow as tf

    fn = tf.saved_model.load(str(exported)).signatures["serving_default"]
    _, specs = fn.structured_input_signature
    assert sorted(specs) == ["padding_mask", "segment_ids", "token_ids"]
    assert all(s.shape.as_list() == [None, None] for s in specs.values())
    assert list(fn.structured_outputs) == ["logits"]


@pytest.mark.parametrize("batch,seq", [(1, 5), (3, 40), (8, 64)])
def test_same_outputs_as_keras_at_any_batch_and_length(bert_tiny, exported, batch, seq):
    x = bert_tiny.make_inputs(batch, seq, seed=batch)
    want = KerasRunner(bert_tiny.model)(x)["logits"]
    got = SavedModelRunner(str(exported))(x)["logits"]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_loads_and_matches_in_a_fresh_process_without_tfaccel(bert_tiny, exported, tmp_path):
    np.savez(tmp_path / "x.npz", **bert_tiny.sample_inputs)
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "m = tf.saved_model.load(sys.argv[1])\n"
        "d = np.load(sys.argv[2])\n"
        "out = m.signatures['serving_default'](**{k: tf.constant(d[k]) for k in d.files})\n"
        "np.save(sys.argv[3], out['logits'].numpy())\n"
        "assert 'tfaccel' not in sys.modules and 'keras_hub' not in sys.modules\n"
    )
    proc = run_python(code, str(exported), str(tmp_path / "x.npz"), str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-5)


def test_saved_model_cli_run_serves_it(bert_tiny, exported):
    result = check_servable(exported, inputs=bert_tiny.sample_inputs)
    want = KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"]
    np.testing.assert_allclose(result["outputs"]["logits"], want, atol=1e-5)


def test_products_2d_writes_each_weight_product_as_one_matmul_with_the_same_outputs(bert_tiny, exported, tmp_path):
    from tfaccel.core.layers import leaf_layers

    path = export_saved_model(bert_tiny.model, tmp_path / "sm", products="2d")
    plain, ops = [n.op for n in graph_nodes(exported)], [n.op for n in graph_nodes(path)]
    # the float32 default ("auto") keeps Keras' einsums; "2d" turns each into one MatMul
    assert plain.count("Einsum") == 8 and "Einsum" not in ops
    assert ops.count("MatMul") == plain.count("MatMul") + plain.count("Einsum")
    for batch, seq in [(1, 5), (3, 40)]:
        x = bert_tiny.make_inputs(batch, seq, seed=batch)
        np.testing.assert_allclose(SavedModelRunner(str(path))(x)["logits"],
                                   KerasRunner(bert_tiny.model)(x)["logits"], atol=1e-5)
    served = check_servable(path, inputs=bert_tiny.sample_inputs)["outputs"]["logits"]  # saved_model_cli
    np.testing.assert_allclose(served, KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"], atol=1e-5)
    assert not [layer.path for layer in leaf_layers(bert_tiny.model) if "call" in vars(layer)]  # model unchanged


def test_products_option_names_its_choices():
    from tfaccel.export import ExportStep

    with pytest.raises(ValueError, match=r"products must be one of \('keras', '2d', 'auto'\)"):
        ExportStep(products="einsum")
    with pytest.raises(ValueError, match="products must be one of"):
        export_saved_model(None, "unused", products="3d")


def test_servable_check_rejects_a_folder_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(ServabilityError, match="no saved_model.pb"):
        check_servable(tmp_path)


def test_servable_check_fails_where_tf_serving_would_though_tf_saved_model_load_works(tmp_path):
    """A TF1 SavedModel tagged 'train' only: tf.saved_model.load takes its one MetaGraph, but saved_model_cli
    run and TF Serving ask for the 'serve' tag set. The check must say which loader failed, and why."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        x = tf.compat.v1.placeholder(tf.float32, [None, 3], name="x")
        sig = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": tf.identity(2.0 * x, name="y")})
        builder = tf.compat.v1.saved_model.Builder(str(tmp_path / "sm"))
        builder.add_meta_graph_and_variables(sess, ["train"], signature_def_map={"serving_default": sig})
        builder.save()
    with pytest.raises(ServabilityError, match=r"saved_model_cli run failed(.|\n)*tag-set serve could not be found"):
        check_servable(tmp_path / "sm", inputs={"x": np.ones((2, 3), "float32")})


def test_export_is_atomic_and_refuses_to_overwrite(bert_tiny, exported):
    from tfaccel import TfaccelError

    with pytest.raises(TfaccelError, match="already exists"):
        export_saved_model(bert_tiny.model, exported)
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]


def test_backbone_with_two_named_outputs_exports(tmp_path):
    import keras_hub

    from tfaccel import load_source

    backbone = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=32)
    src = load_source(backbone)
    export_saved_model(backbone, tmp_path / "sm")
    got = SavedModelRunner(str(tmp_path / "sm"))(src.sample_inputs)
    want = KerasRunner(backbone)(src.sample_inputs)
    assert set(got) == {"sequence_output", "pooled_output"}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-5)
