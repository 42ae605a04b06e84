import numpy as np
import pytest

from tfaccel import Pipeline, load_source
from tfaccel.core.artifact import KerasRunner, SavedModelRunner
from tfaccel.servable import check_servable
from tfaccel.xla import bucket_for, write_xla_saved_model
from tfaccel.xla.xla_export import validate_buckets


def _xla_functions(saved_model_dir) -> list[str]:
    """Names of functions in the SavedModel's library marked for XLA compilation."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    lib = sm.meta_graphs[0].graph_def.library
    return [f.signature.name for f in lib.function if f.attr["_XlaMustCompile"].b]


@pytest.fixture(scope="module")
def xla_model(bert_tiny_xla):
    return bert_tiny_xla  # write_xla_saved_model(bert_tiny.model, path, buckets=(16, 32))


def test_buckets():
    assert bucket_for(1, (16, 32)) == 16 and bucket_for(17, (16, 32)) == 32 and bucket_for(40, (16, 32)) == 40
    assert validate_buckets((16, 32), max_length=64) == (16, 32, 64)  # the model's limit is always a bucket
    assert validate_buckets((16, 128, 512), max_length=64) == (16, 64)
    with pytest.raises(ValueError, match=r"buckets=\(32, 16\)"):
        validate_buckets((32, 16))


def test_serving_function_is_marked_for_xla_in_the_saved_model(xla_model):
    path, info = xla_model
    assert info["buckets"] == [16, 32, 64]
    assert _xla_functions(path), "no function in the SavedModel carries _XlaMustCompile"


def test_plain_export_is_not_marked_for_xla(bert_tiny_saved_model):
    assert _xla_functions(bert_tiny_saved_model) == []  # export_saved_model(bert_tiny.model, ...)


@pytest.mark.parametrize("batch,seq", [(1, 3), (2, 16), (3, 17), (2, 64)])
def test_matches_keras_at_every_length_despite_padding(bert_tiny, xla_model, batch, seq):
    x = bert_tiny.make_inputs(batch, seq, seed=seq)
    x["padding_mask"][:, seq // 2 + 1:] = 0  # also with the caller's own padding
    want = KerasRunner(bert_tiny.model)(x)["logits"]
    got = SavedModelRunner(str(xla_model[0]))(x)["logits"]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_sequence_outputs_are_sliced_back_to_the_input_length(tmp_path):
    import keras_hub

    from tfaccel import load_source

    bb = keras_hub.models.BertBackbone(vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, max_sequence_length=64)
    src = load_source(bb)
    info = write_xla_saved_model(bb, tmp_path / "sm", buckets=(16, 32))
    assert info["sequence_outputs"] == ["sequence_output"]
    x = src.make_inputs(2, 11)
    got, want = SavedModelRunner(str(tmp_path / "sm"))(x), KerasRunner(bb)(x)
    assert got["sequence_output"].shape == (2, 11, 16)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4)


def test_serves_without_tfaccel_in_a_fresh_process_and_saved_model_cli(bert_tiny, xla_model):
    x = bert_tiny.make_inputs(2, 20, seed=3)
    result = check_servable(xla_model[0], inputs=x)
    np.testing.assert_allclose(result["outputs"]["logits"], KerasRunner(bert_tiny.model)(x)["logits"], atol=1e-4)


def test_xla_step_reports_compilations(bert_tiny, tmp_path):
    report = Pipeline(["xla"], shapes=[(1, 10), (1, 12), (2, 40)], runs=2, warmup=1, log=lambda m: None,
                      footprints=False).run(bert_tiny, tmp_path / "out")
    st = report.stage("xla")
    assert st.comparison["max_abs_diff"] < 1e-4
    # sample inputs (8x32), 1x10 and 1x12 share the 1x16 bucket, 2x40 pads to 64
    assert st.runner_stats["compiled_shapes"] == [(1, 16), (2, 64), (8, 32)]
    assert st.runner_stats["xla_compilations"] == 3
    assert _xla_functions(tmp_path / "out" / "saved_model")


def test_half_precision_models_get_a_half_precision_tolerance(bert_tiny, tmp_path):
    from tfaccel.precision import apply_mixed_precision
    from tfaccel.xla import XlaStep

    src = load_source(apply_mixed_precision(bert_tiny.model, "mixed_bfloat16"))
    step = XlaStep()
    report = Pipeline([step], shapes=[(1, 16)], runs=2, warmup=1, log=lambda m: None, footprints=False).run(
        src, tmp_path / "o")
    assert step.tolerance == XlaStep.half_precision_tolerance
    assert any("bfloat16" in n for n in report.stage("xla").notes)
    strict = XlaStep(tolerance=XlaStep.default_tolerance)
    Pipeline([strict], shapes=[(1, 16)], measure=False, on_breach="warn", log=lambda m: None).run(src, tmp_path / "p")
    assert strict.tolerance == XlaStep.default_tolerance  # a tolerance the user chose is kept
