"""The user's own data: --eval-data / --eval-texts / --calibration-data / --train-data files, checked
against the model, and accuracy measured on them at every stage."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import run_cli

from tfaccel import Pipeline, SourceError, Step, Tolerance, ValidationError, load_source
from tfaccel.core.artifact import Artifact, KerasRunner
from tfaccel.core.eval_data import load_data_file
from tfaccel.errors import DataFileError

N = 24
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (
    "the a movie film was is very good bad great awful plot actors boring fun not i it").split()


@pytest.fixture(scope="session")
def eval_inputs(bert_tiny):
    """24 examples of varied length, labelled with the reference model's own predictions (accuracy 1.0)."""
    x = bert_tiny.make_inputs(N, 16, seed=1)
    lengths = np.linspace(16, 4, N).astype(int)
    x["padding_mask"] = (np.arange(16)[None, :] < lengths[:, None]).astype(x["padding_mask"].dtype)
    x["token_ids"] = np.where(x["padding_mask"] > 0, x["token_ids"], 0).astype(x["token_ids"].dtype)
    labels = np.argmax(KerasRunner(bert_tiny.model)(x)["logits"], -1).astype(np.int64)
    return x, labels


@pytest.fixture(scope="session")
def good_npz(eval_inputs, tmp_path_factory):
    x, labels = eval_inputs
    path = tmp_path_factory.mktemp("eval") / "eval.npz"
    np.savez(path, labels=labels, **x)
    return path


def _bad_files(x, labels):
    """name -> (what to write: arrays for np.savez or raw bytes, the message it must give)."""
    return {
        "missing-labels": (dict(x), "has no labels. Add the class index"),
        "wrong-names": ({"ids": x["token_ids"], "padding_mask": x["padding_mask"], "segment_ids": x["segment_ids"],
                         "labels": labels},
                        r"missing \['token_ids'\], unexpected \['ids'\]. The model expects arrays named "
                        r"\['padding_mask', 'segment_ids', 'token_ids'\]"),
        "float-token-ids": ({**x, "token_ids": x["token_ids"].astype("float32"), "labels": labels},
                            r"'token_ids' has dtype float32; token ids are integers.*astype\('int32'\)"),
        "float-labels": ({**x, "labels": labels.astype("float32")}, "'labels' has dtype float32; labels are class"),
        "different-lengths": ({**x, "labels": labels[:-3]},
                              r"arrays of different lengths .*'token_ids': 24.*'labels': 21"),
        "label-out-of-range": ({**x, "labels": np.where(np.arange(N) == 5, 3, labels)},
                               r"label 3 is out of range: the model predicts 3 classes, so labels must be in \[0, 2\]"),
        "negative-label": ({**x, "labels": np.where(np.arange(N) == 5, -1, labels)}, "label -1 is out of range"),
        "token-id-beyond-vocab": ({**x, "token_ids": x["token_ids"] + 500, "labels": labels},
                                  r"token ids range over .* vocabulary has 200 entries"),
        "too-long": ({k: np.zeros((N, 80), v.dtype) for k, v in x.items()} | {"labels": labels},
                     "sequences of length 80, but the model's maximum sequence length is 64"),
        "no-examples": ({**{k: v[:0] for k, v in x.items()}, "labels": labels[:0]}, "has 0 examples"),
        "two-dim-labels": ({**x, "labels": np.eye(3)[labels].astype("int64")}, r"shape \(24, 3\).*argmax"),
        "not-a-zip": (b"token_ids,labels\n1,2\n", "is not a readable .npz"),
        "empty-file": (b"", r"is empty \(0 bytes\)"),
        "truncated": (None, "is not a readable .npz"),
    }


BAD_CASES = ["missing-labels", "wrong-names", "float-token-ids", "float-labels", "different-lengths",
             "label-out-of-range", "negative-label", "token-id-beyond-vocab", "too-long", "no-examples",
             "two-dim-labels", "not-a-zip", "empty-file", "truncated"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_each_bad_eval_file_names_the_file_the_problem_and_the_fix(bert_tiny, eval_inputs, good_npz, tmp_path, case):
    content, message = _bad_files(*eval_inputs)[case]
    path = tmp_path / f"{case}.npz"
    if content is None:
        path.write_bytes(good_npz.read_bytes()[:200])
    elif isinstance(content, bytes):
        path.write_bytes(content)
    else:
        np.savez(path, **content)
    with pytest.raises(DataFileError, match=message) as info:
        bert_tiny.with_eval_data(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, SourceError)


def test_missing_file_unknown_suffix_and_object_arrays(bert_tiny, eval_inputs, tmp_path):
    with pytest.raises(DataFileError, match=r"eval data '.*nope.npz' does not exist"):
        bert_tiny.with_eval_data(tmp_path / "nope.npz")
    (tmp_path / "eval.txt").write_text("hi")
    with pytest.raises(DataFileError, match=r"unknown file type '.txt'.*\.npz.*\.csv / \.jsonl"):
        bert_tiny.with_eval_data(tmp_path / "eval.txt")
    x, labels = eval_inputs
    np.savez(tmp_path / "obj.npz", labels=np.array([{"a": 1}] * N, dtype=object), **x)
    with pytest.raises(DataFileError, match="holds Python objects"):
        bert_tiny.with_eval_data(tmp_path / "obj.npz")


def test_texts_for_a_model_without_a_tokenizer_and_labels_for_a_backbone(bert_tiny, tmp_path):
    (tmp_path / "t.csv").write_text("text,label\ngood film,1\n")
    with pytest.raises(DataFileError, match=r"texts need the model's tokenizer, and 'bert-tiny' has none.*\.npz"):
        bert_tiny.with_eval_data(tmp_path / "t.csv")
    backbone = dataclasses.replace(bert_tiny, task="backbone")
    with pytest.raises(DataFileError, match="backbone model, with no class logits.*--task classification"):
        backbone.with_eval_data(tmp_path / "t.csv")


def test_string_labels_use_the_models_label_names_or_a_sorted_order(bert_tiny, eval_inputs, tmp_path):
    x, _ = eval_inputs
    labels = np.arange(N) % 3
    names = np.array(["pos", "neg", "neutral"])[labels]
    np.savez(tmp_path / "s.npz", labels=names, **x)
    data = load_data_file(tmp_path / "s.npz", bert_tiny)
    assert data.label_names == ["neg", "neutral", "pos"]  # sorted: documented order without label names
    np.testing.assert_array_equal(data.labels, np.searchsorted(["neg", "neutral", "pos"], names))
    named = dataclasses.replace(bert_tiny, label_names=["pos", "neg", "neutral"])
    np.testing.assert_array_equal(load_data_file(tmp_path / "s.npz", named).labels, labels)
    np.savez(tmp_path / "u.npz", labels=np.where(np.arange(N) == 0, "meh", names), **x)
    with pytest.raises(DataFileError, match=r"label\(s\) \['meh'\] are not among the model's class names"):
        load_data_file(tmp_path / "u.npz", named)


class FlipHeadStep(Step):
    """A real Keras->Keras change that only the accuracy budget catches (no element-wise limits):
    negates the classifier head, so the top class changes on every example."""

    name = "flip-head"
    consumes = produces = "keras"
    default_tolerance = Tolerance(max_abs_diff=None, min_cosine=None, max_accuracy_drop=0.05)

    def apply(self, artifact, ctx):
        import keras

        model = keras.models.clone_model(artifact.model)
        model.set_weights(artifact.model.get_weights())
        model.get_layer("logits").kernel.assign(-model.get_layer("logits").kernel)
        return Artifact(kind="keras", model=model)


def test_accuracy_on_the_users_data_at_every_stage_and_its_budget_applies(bert_tiny, good_npz, tmp_path):
    src = load_source("bert-tiny", eval_data=str(good_npz))
    assert src.eval_labels.shape == (N,) and src.task == "classification"
    report = Pipeline(["export"], shapes=[(1, 16)], measure=False, log=lambda m: None).run(src, tmp_path / "out")
    assert [s.accuracy for s in report.stages] == [1.0, 1.0]  # labels are the reference's own predictions
    assert f"Eval data: {good_npz} ({N} examples, labelled)" in (tmp_path / "out" / "report.md").read_text()
    with pytest.raises(ValidationError, match=r"'flip-head' breached.*accuracy 0\.\d+ is \d+\.\d+ points below "
                                              r"the reference 1\.0000 \(allowed 5\.00\)"):
        Pipeline([FlipHeadStep()], shapes=[(1, 16)], measure=False, log=lambda m: None).run(src, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_calibration_and_fine_tuning_data_go_through_the_same_checks(bert_tiny, eval_inputs, good_npz, tmp_path):
    from tfaccel.pruning.steps import load_finetune_data
    from tfaccel.tensorrt.calibration import describe_batches, representative_batches

    x, _ = eval_inputs
    src = bert_tiny.with_calibration_data(good_npz)  # labels are not needed for calibration and are not read
    batches = representative_batches(src, samples=16, batch_size=8)
    assert [b["token_ids"].shape for b in batches] == [(8, 16), (8, 16)]
    np.testing.assert_array_equal(batches[0]["token_ids"], x["token_ids"][:8])
    assert "your calibration data" in describe_batches(batches, src) and str(good_npz) in describe_batches(batches, src)
    inputs, labels, desc = load_finetune_data(str(good_npz), bert_tiny)
    assert len(labels) == N and desc.startswith(str(good_npz))
    np.savez(tmp_path / "unlabelled.npz", **x)
    assert load_finetune_data(str(tmp_path / "unlabelled.npz"), bert_tiny)[1] is None  # labels optional here
    np.savez(tmp_path / "bad.npz", **{**x, "token_ids": x["token_ids"].astype("float64")})
    with pytest.raises(DataFileError, match="prune-structured fine-tuning data .*bad.npz.*token ids are integers"):
        load_finetune_data(str(tmp_path / "bad.npz"), bert_tiny)


# --------------------------------------------------------------------------------------------------
# texts through a real keras-hub tokenizer (built from a small vocabulary list: no download)


@pytest.fixture(scope="session")
def text_preset(tmp_path_factory):
    """A keras-hub preset folder: a tiny BertBackbone and its BertTokenizer."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    d = tmp_path_factory.mktemp("preset") / "tiny-bert"
    backbone = keras_hub.models.BertBackbone(vocabulary_size=len(VOCAB), num_layers=1, num_heads=2, hidden_dim=16,
                                             intermediate_dim=32, max_sequence_length=32)
    backbone.save_to_preset(str(d))
    keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True).save_to_preset(str(d))
    return d


TEXTS = [("The movie was very good", "pos"), ("an awful, boring plot", "neg"), ("I think it is great fun", "pos"),
         ("not good", "neg"), ("the actors were bad", "neg")]


def test_csv_and_jsonl_texts_are_tokenized_with_the_presets_tokenizer(text_preset, tmp_path):
    import csv

    import keras_hub

    src = load_source(str(text_preset), task="classification", num_classes=2)
    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows(TEXTS)
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in TEXTS) + "\n")
    pre = keras_hub.models.BertTextClassifierPreprocessor(
        keras_hub.models.BertTokenizer(vocabulary=VOCAB, lowercase=True), sequence_length=src.default_seq)
    want = pre([t for t, _ in TEXTS])
    for name in ("t.csv", "t.jsonl"):
        data = load_data_file(tmp_path / name, src)
        np.testing.assert_array_equal(data.inputs["token_ids"], np.asarray(want["token_ids"]))
        np.testing.assert_array_equal(data.inputs["padding_mask"], np.asarray(want["padding_mask"]).astype(int))
        assert data.inputs["token_ids"].shape == (5, 32) and data.label_names == ["neg", "pos"]
        np.testing.assert_array_equal(data.labels, [1, 0, 1, 0, 0])
    (tmp_path / "bad.jsonl").write_text('{"text": "good", "label": 1}\n{"text": "bad", label: 0}\n')
    with pytest.raises(DataFileError, match=r"bad.jsonl', line 2 is not valid JSON"):
        load_data_file(tmp_path / "bad.jsonl", src)
    (tmp_path / "nocol.csv").write_text("sentence,label\ngood,1\n")
    with pytest.raises(DataFileError, match=r"has no 'text' column \(its header row is \['sentence', 'label'\]\)"):
        load_data_file(tmp_path / "nocol.csv", src)
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataFileError, match="has no examples"):
        load_data_file(tmp_path / "header.csv", src)
    (tmp_path / "three.csv").write_text("text,label\na,x\nb,y\nc,z\n")
    with pytest.raises(DataFileError, match=r"has 3 distinct labels .* the model predicts 2 classes"):
        load_data_file(tmp_path / "three.csv", src)


def test_cli_eval_texts_on_a_preset_folder_gives_accuracy(text_preset, tmp_path):
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in TEXTS))
    proc = run_cli("optimize", str(text_preset), "--task", "classification", "--num-classes", "2",
                   "--steps", "export", "--eval-texts", str(tmp_path / "t.jsonl"), "--no-measure",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((tmp_path / "out" / "report.json").read_text())["stages"]
    assert [s["accuracy"] is not None for s in stages] == [True, True]
    assert stages[1]["accuracy"] == stages[0]["accuracy"]  # export is exact
    assert "reference accuracy" in proc.stderr and "label order ['neg', 'pos']" in proc.stdout


@pytest.mark.parametrize("flag,content,message", [
    ("--eval-data", "labels", "has no labels. Add the class index of every example"),
    ("--eval-data", "names", "The model expects arrays named ['padding_mask', 'segment_ids', 'token_ids']"),
    ("--train-data", "good", "--train-data is prune-structured's fine-tuning data; add prune-structured"),
])
def test_cli_bad_data_file_exits_2_with_the_message(eval_inputs, tmp_path, flag, content, message):
    x, labels = eval_inputs
    arrays = {"labels": dict(x), "names": {"ids": x["token_ids"], "labels": labels},
              "good": {**x, "labels": labels}}[content]
    np.savez(tmp_path / "data.npz", **arrays)
    proc = run_cli("optimize", "bert-tiny", "--steps", "export", flag, str(tmp_path / "data.npz"),
                   "--out", str(tmp_path / "out"), "--no-measure")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert str(tmp_path / "data.npz") in proc.stderr or flag == "--train-data"
    assert not (tmp_path / "out").exists()


@pytest.mark.large
def test_minilm_bbc_texts_with_class_names_match_the_examples_own_tokens_and_labels(minilm_bbc, tmp_path):
    from tfaccel.examples import bbc_news

    _, (texts, labels) = bbc_news.split()
    rows = [{"text": t, "label": minilm_bbc.label_names[int(y)]} for t, y in zip(texts[:32], labels[:32], strict=True)]
    (tmp_path / "bbc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    src = minilm_bbc.with_eval_data(tmp_path / "bbc.jsonl")
    np.testing.assert_array_equal(src.eval_inputs["token_ids"], minilm_bbc.eval_inputs["token_ids"][:32])
    np.testing.assert_array_equal(src.eval_labels, labels[:32])  # names mapped through the model's own label order
    assert src.label_names == minilm_bbc.label_names


def test_cli_train_data_becomes_prune_structureds_data_option(good_npz):
    from tfaccel.cli import _data_options, build_parser
    from tfaccel.steps import step_from_spec

    args = build_parser().parse_args(["optimize", "bert-tiny", "--steps", "export,prune-structured@reference",
                                      "--train-data", str(good_npz), "--out", "unused"])
    options: dict = {}
    _data_options(args, ["export", "prune-structured@reference"], options)
    step = step_from_spec("prune-structured@reference", **options["prune-structured"])
    assert step.data == str(good_npz) and step.params()["data"] == str(good_npz)
    with pytest.raises(ValueError, match="--train-data or --set prune-structured.data=..., not both"):
        _data_options(args, ["prune-structured"], {"prune-structured": {"data": "x.npz"}})
