"""Real-model tests: all-MiniLM-L6-v2 weights fine-tuned on real BBC News articles (cached build).

The serving routes share one pipeline run (:func:`minilm_run`): one export of the 22M-parameter model, one
tf2onnx conversion, one Keras reference on the 200 held-out articles, instead of one of each per route. The
OpenVINO and TensorRT accuracy tests live here for that reason (they were in test_openvino.py and
test_tensorrt.py)."""

import importlib.util
import json
import shutil

import numpy as np
import pytest

from tfaccel import Pipeline
from tfaccel.examples import bbc_news

pytestmark = pytest.mark.large

OPENVINO = all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


@pytest.fixture(scope="module")
def minilm_run(minilm_bbc, tmp_path_factory):
    """export -> onnx -> ort-int8 and, from the same export, openvino -> ov-int8 (where the openvino extra is
    installed), measured at 1x128, every stage validated against the same Keras reference. The onnx stage's
    graph as tf2onnx wrote it, before onnxruntime's fusions (what TensorRT parses), is kept beside the run."""
    import tfaccel.onnx.ort_fusions as ort_fusions

    root = tmp_path_factory.mktemp("minilm-run")
    unfused = root / "model.unfused.onnx"
    fuse = ort_fusions.fuse_for_onnxruntime

    def keep_unfused(onnx_path, output_path=None):  # the onnx step converts, then fuses the file in place
        shutil.copyfile(onnx_path, unfused)
        return fuse(onnx_path, output_path)

    steps = ["export", "onnx", "ort-int8"] + (["openvino@export", "ov-int8"] if OPENVINO else [])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ort_fusions, "fuse_for_onnxruntime", keep_unfused)
        # footprints=False: no fresh-process load probes (tests/test_saved_model.py checks those on bert-tiny)
        report = Pipeline(steps, shapes=[(1, 128)], runs=5, log=print, footprints=False).run(minilm_bbc, root / "out")
    assert unfused.is_file()
    return report, root / "out", unfused


def test_bbc_split_is_fixed_and_uses_sorted_labels():
    (tr_x, tr_y), (ev_x, ev_y) = bbc_news.split()
    assert bbc_news.LABELS == ("business", "entertainment", "politics", "sports", "tech")
    assert len(tr_x) == 400 and len(ev_x) == 200 and not set(tr_x) & set(ev_x)
    assert set(np.unique(ev_y)) == {0, 1, 2, 3, 4}  # every class held out
    (tr_x2, _), _ = bbc_news.split()
    assert tr_x2 == tr_x
    texts, labels = bbc_news.load_articles()
    assert len(texts) == 2225 and np.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert len(bbc_news.unique_articles()[0]) == len(set(texts)) == 2127  # 98 exact duplicates dropped


def test_fine_tuned_minilm_classifies_held_out_bbc_articles(minilm_bbc):
    from tfaccel.core.artifact import KerasRunner
    from tfaccel.core.validation import classification_accuracy

    assert minilm_bbc.model.backbone.num_layers == 6 and minilm_bbc.model.backbone.hidden_dim == 384
    acc = classification_accuracy(KerasRunner(minilm_bbc.model), minilm_bbc.eval_inputs, minilm_bbc.eval_labels)
    assert acc >= 0.90, f"held-out accuracy {acc:.3f}; the v3 build reached 0.930 on 2026-11-22"
    assert minilm_bbc.sample_inputs["token_ids"].shape == (8, 128)


def test_export_keeps_accuracy_and_serves_without_tfaccel(minilm_bbc, minilm_run):
    from tfaccel.servable import check_servable

    report, out, _ = minilm_run
    data = json.loads((out / "report.json").read_text())
    ref, exp = data["stages"][:2]
    assert (ref["step"], exp["step"]) == ("reference", "export")
    assert report.final_saved_model_path == str(out / "saved_model")  # the export: the other stages are not SavedModels
    assert ref["accuracy"] >= 0.90 and exp["accuracy"] == ref["accuracy"]
    assert exp["max_abs_diff"] < 1e-4 and exp["cosine_similarity"] > 0.99999
    assert exp["latency_p50_ms"] > 0 and exp["size_bytes"] > 50e6  # 22.7M float32 parameters
    inputs = {k: v[:4] for k, v in minilm_bbc.eval_inputs.items()}
    served = check_servable(report.final_saved_model_path, inputs=inputs)
    preds = np.argmax(served["outputs"]["logits"], -1)
    want = np.argmax(minilm_bbc.model.predict(inputs, verbose=0), -1)
    np.testing.assert_array_equal(preds, want)


def test_onnx_and_ort_int8_keep_accuracy_within_one_point(minilm_run):
    report, _, _ = minilm_run
    ref = report.reference.accuracy
    assert abs(report.stage("onnx").accuracy - ref) < 1e-9
    assert report.stage("ort-int8").accuracy >= ref - 0.01


@pytest.mark.skipif(not OPENVINO, reason="the openvino extra (openvino, nncf) is not installed")
def test_ov_int8_on_minilm_bbc_is_within_one_point(minilm_run):
    """(from test_openvino.py) export -> openvino -> ov-int8: both OpenVINO stages within 1 point of Keras."""
    report, _, _ = minilm_run
    ref = report.stages[0].accuracy
    assert ref > 0.9
    stages = [s for s in report.stages if s.step in ("openvino", "ov-int8")]
    assert [s.step for s in stages] == ["openvino", "ov-int8"] and stages[0].parent == 1  # from the export
    for stage in stages:
        assert stage.status == "ok" and stage.accuracy >= ref - 0.01, (stage.step, stage.accuracy, ref)


def test_fp16_and_int8_onnx_keep_accuracy_on_held_out_bbc_news(minilm_bbc, minilm_run, tmp_path):
    """(from test_tensorrt.py) The graphs TensorRT 11 builds from (fp16 ONNX, int8 Q/DQ ONNX) keep the real
    classifier's accuracy. int8 is calibrated on BBC training articles, as a user would, and scored on the 200
    held-out ones. The fp32 graph is tf2onnx's conversion of the export (opset 17), as the onnx step wrote it
    before its onnxruntime fusions."""
    import keras_hub

    from tfaccel.core.validation import classification_accuracy
    from tfaccel.examples.builders import MINILM_SEQ, minilm_dir
    from tfaccel.onnx.onnx_runner import OnnxRunner
    from tfaccel.onnx.ort_fusions import contrib_operators
    from tfaccel.tensorrt import (
        TensorRTStep,
        convert_onnx_to_fp16,
        quantize_onnx_qdq_int8,
        representative_batches,
    )

    report, _, fp32 = minilm_run
    assert report.stage("onnx").params["opset"] == 17
    assert contrib_operators(fp32) == {}  # standard ONNX, as TensorRT gets it
    fp32 = str(fp32)
    fp16 = convert_onnx_to_fp16(fp32, tmp_path / "model.fp16.onnx")
    (train_x, _), _ = bbc_news.split()
    pre = keras_hub.models.BertTextClassifierPreprocessor.from_preset(minilm_dir(), sequence_length=MINILM_SEQ)
    train = {k: np.asarray(v).astype("int32") for k, v in pre(train_x[:32]).items()}
    int8 = quantize_onnx_qdq_int8(fp32, tmp_path / "model.int8.onnx",
                                  representative_batches(minilm_bbc, 32, 8, inputs=train))
    ev, labels = minilm_bbc.eval_inputs, minilm_bbc.eval_labels
    acc = {name: classification_accuracy(OnnxRunner(p), ev, labels) for name, p in
           (("fp32", fp32), ("fp16", fp16), ("int8", int8))}
    print("held-out accuracy of the ONNX graphs:", acc)
    assert acc["fp32"] >= 0.90
    assert acc["fp16"] >= acc["fp32"] - TensorRTStep("fp16").tolerance.max_accuracy_drop
    assert acc["int8"] >= acc["fp32"] - TensorRTStep("int8").tolerance.max_accuracy_drop
    x = {k: v[:16] for k, v in ev.items()}
    a, b = OnnxRunner(fp32)(x)["logits"], OnnxRunner(fp16)(x)["logits"]
    assert _cosine(a, b).min() >= TensorRTStep("fp16").tolerance.min_cosine


def _cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_gpt2_bbc_text_is_minilm_wordpiece_with_a_separator_after_each_article():
    import keras_hub

    from tfaccel.examples.builders import _bbc_token_stream, _windows, minilm_dir

    (texts, _), _ = bbc_news.split(n_train=3, n_eval=0)
    stream = _bbc_token_stream(texts)
    tok = keras_hub.models.BertTokenizer.from_preset(minilm_dir())
    sep = tok.token_to_id("[SEP]")
    assert stream.dtype == np.int32 and stream.max() < 30522 and (stream == sep).sum() == 3 and stream[-1] == sep
    first = stream[: int(np.argmax(stream == sep))]
    words = texts[0].lower().split()[:5]
    assert all(w.strip(".,'\"") in tok.detokenize(first[:40]) for w in words), (words, tok.detokenize(first[:40]))
    w = _windows(stream, 129)
    assert w.shape == (len(stream) // 129, 129) and np.array_equal(w.ravel(), stream[: w.size])


def test_cached_build_builds_once_and_a_failed_build_leaves_nothing(tmp_path):
    from tfaccel.examples.builders import _cached_build

    calls = []

    def build(target, progress=None):
        calls.append(target)
        (target / "meta.json").write_text("{}")

    final = tmp_path / "cache" / "example-v1"
    _cached_build("example", final, build, None)
    _cached_build("example", final, build, None)
    assert len(calls) == 1 and (final / "meta.json").exists()

    def broken(target, progress=None):
        (target / "half-written").write_text("x")
        raise RuntimeError("disk full")

    other = tmp_path / "cache" / "other-v1"
    with pytest.raises(RuntimeError, match="disk full"):
        _cached_build("other", other, broken, None)
    assert not other.exists() and [p.name for p in other.parent.iterdir() if not p.name.startswith(".")] == [
        "example-v1"]
    assert not [p for p in other.parent.iterdir() if p.is_dir() and p.name.startswith(".other-")]  # no temp folder
