import numpy as np
import pytest

from tfaccel import InputMismatchError, SourceError, load_source
from tfaccel.core.artifact import KerasRunner


def test_bert_tiny_example_has_named_token_inputs_with_padding(bert_tiny):
    assert bert_tiny.kind == "keras" and bert_tiny.task == "classification"
    assert sorted(bert_tiny.input_names) == ["padding_mask", "segment_ids", "token_ids"]
    mask = bert_tiny.sample_inputs["padding_mask"]
    assert mask.shape == (8, 32) and mask.min() == 0 and mask.max() == 1  # varied lengths: masking is exercised
    ids = bert_tiny.sample_inputs["token_ids"]
    assert ids.max() < bert_tiny.vocab_size and np.all(ids[mask == 0] == 0)


def test_make_inputs_gives_requested_shape_and_valid_ids(gpt2_tiny):
    x = gpt2_tiny.make_inputs(batch=3, seq=20)
    assert sorted(x) == ["padding_mask", "token_ids"]
    assert x["token_ids"].shape == (3, 20) and x["token_ids"].dtype == np.int32
    assert 1 <= x["token_ids"].min() and x["token_ids"].max() < gpt2_tiny.vocab_size
    assert gpt2_tiny.task == "causal_lm"


def test_keras_file_round_trip(bert_tiny, tmp_path):
    path = tmp_path / "m.keras"
    bert_tiny.model.save(path)
    src = load_source(str(path))
    assert src.kind == "keras" and src.path == str(path)
    want = KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)
    got = KerasRunner(src.model)(bert_tiny.sample_inputs)
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-6)


def test_keras_hub_preset_folder_loads_as_backbone(bert_tiny, tmp_path):
    bert_tiny.model.backbone.save_to_preset(str(tmp_path / "preset"))
    src = load_source(str(tmp_path / "preset"))
    assert src.task == "backbone"
    out = KerasRunner(src.model)(src.sample_inputs)
    assert set(out) == {"sequence_output", "pooled_output"}


def test_preset_as_classifier_needs_num_classes(bert_tiny, tmp_path):
    bert_tiny.model.backbone.save_to_preset(str(tmp_path / "preset"))
    with pytest.raises(SourceError, match="num_classes"):
        load_source(str(tmp_path / "preset"), task="classification")
    src = load_source(str(tmp_path / "preset"), task="classification", num_classes=4)
    assert KerasRunner(src.model)(src.sample_inputs)["logits"].shape == (8, 4)


@pytest.mark.large
def test_hugging_face_folder_of_real_minilm_loads():
    from tfaccel.examples.builders import minilm_dir

    src = load_source(minilm_dir(), task="classification", num_classes=5)
    assert src.model.backbone.num_layers == 6 and src.model.backbone.hidden_dim == 384
    assert src.vocab_size == 30522


def test_saved_model_folder_is_a_source(bert_tiny, bert_tiny_saved_model):
    src = load_source(str(bert_tiny_saved_model))  # export_saved_model(bert_tiny.model, ...)
    assert src.kind == "saved_model" and sorted(src.input_names) == sorted(bert_tiny.input_names)
    assert src.sample_inputs["token_ids"].shape[0] == 8


def test_missing_path_names_the_path_and_the_options(tmp_path):
    with pytest.raises(SourceError, match=r"does not exist.*built-in example: minilm-bbc"):
        load_source(str(tmp_path / "nope"))


def test_folder_that_is_not_a_model_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SourceError, match="not a SavedModel.*preset.*Hugging Face"):
        load_source(str(tmp_path))


def test_file_that_is_not_a_keras_model_is_rejected(tmp_path):
    txt = tmp_path / "model.h5"
    txt.write_text("not a model")
    with pytest.raises(SourceError, match=r"expected a \.keras file"):
        load_source(str(txt))
    bad = tmp_path / "broken.keras"
    bad.write_bytes(b"definitely not a zip")
    with pytest.raises(SourceError, match="not a Keras model file"):
        load_source(str(bad))


def test_sample_inputs_with_wrong_names_dtypes_or_ranks_are_rejected(bert_tiny):
    good = bert_tiny.sample_inputs
    with pytest.raises(InputMismatchError, match=r"missing \['segment_ids'\], unexpected \['segment'\]"):
        bert_tiny.with_sample_inputs({**{k: v for k, v in good.items() if k != "segment_ids"},
                                      "segment": good["segment_ids"]})
    with pytest.raises(InputMismatchError, match="'token_ids' has dtype float32.*expects int32"):
        bert_tiny.with_sample_inputs({**good, "token_ids": good["token_ids"].astype("float32")})
    with pytest.raises(InputMismatchError, match="rank 1"):
        bert_tiny.with_sample_inputs({**good, "token_ids": good["token_ids"][0]})
    ok = bert_tiny.with_sample_inputs({k: v.astype("int64") for k, v in good.items()})  # int widths convert
    assert ok.sample_inputs["token_ids"].dtype == np.int32


def test_sample_inputs_from_npz(bert_tiny, tmp_path):
    np.savez(tmp_path / "x.npz", **{k: v[:2] for k, v in bert_tiny.sample_inputs.items()})
    src = load_source("bert-tiny", sample_inputs=str(tmp_path / "x.npz"))
    assert src.sample_inputs["token_ids"].shape == (2, 32)
    with pytest.raises(SourceError, match="does not exist"):
        load_source("bert-tiny", sample_inputs=str(tmp_path / "missing.npz"))


def test_in_memory_keras_model_is_a_source():
    import keras

    inp = keras.Input((6,), name="features")
    model = keras.Model(inp, keras.layers.Dense(2, name="scores")(inp))
    src = load_source(model)
    assert src.input_names == ["features"] and not src.dict_inputs
    assert KerasRunner(src.model, dict_inputs=False)(src.sample_inputs)["scores"].shape == (8, 2)


def test_example_build_lock_makes_a_second_process_wait(tmp_path):
    # Two test workers (or notebooks) on one empty cache: the second waits for the first build, it does not
    # start its own three-minute fine-tune.
    import subprocess
    import sys
    import time

    from tfaccel.examples.builders import _build_lock

    lock = tmp_path / ".example.lock"
    code = ("import sys, time; from pathlib import Path; from tfaccel.examples.builders import _build_lock\n"
            "with _build_lock(Path(sys.argv[1]), lambda m: print(m, flush=True), 'example'):\n"
            "    print('got', time.time(), flush=True)\n")
    with _build_lock(lock, None, "example"):
        child = subprocess.Popen([sys.executable, "-c", code, str(lock)], stdout=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # blocks until the child has found the lock taken (or exited)
        time.sleep(0.5)
        released = time.time()
    rest, _ = child.communicate(timeout=120)
    assert child.returncode == 0
    assert "another process is building it; waiting" in first, first + rest
    assert float(rest.split("got ")[1]) >= released, rest
