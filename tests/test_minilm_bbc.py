"""Real-model tests: all-MiniLM-L6-v2 weights fine-tuned on real BBC News articles (cached build)."""

import json

import numpy as np
import pytest

from tfaccel import Pipeline
from tfaccel.examples import bbc_news

pytestmark = pytest.mark.large


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


def test_export_keeps_accuracy_and_serves_without_tfaccel(minilm_bbc, tmp_path):
    from tfaccel.servable import check_servable

    report = Pipeline(["export"], shapes=[(1, 128)], runs=5, log=print).run(minilm_bbc, tmp_path / "out")
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    ref, exp = data["stages"]
    assert ref["accuracy"] >= 0.90 and exp["accuracy"] == ref["accuracy"]
    assert exp["max_abs_diff"] < 1e-4 and exp["cosine_similarity"] > 0.99999
    assert exp["latency_p50_ms"] > 0 and exp["size_bytes"] > 50e6  # 22.7M float32 parameters
    inputs = {k: v[:4] for k, v in minilm_bbc.eval_inputs.items()}
    served = check_servable(report.final_saved_model_path, inputs=inputs)
    preds = np.argmax(served["outputs"]["logits"], -1)
    want = np.argmax(minilm_bbc.model.predict(inputs, verbose=0), -1)
    np.testing.assert_array_equal(preds, want)


def test_onnx_and_ort_int8_keep_accuracy_within_one_point(minilm_bbc, tmp_path):
    report = Pipeline(["export", "onnx", "ort-int8"], measure=False, log=print).run(minilm_bbc, tmp_path / "out")
    ref = report.reference.accuracy
    assert abs(report.stage("onnx").accuracy - ref) < 1e-9
    assert report.stage("ort-int8").accuracy >= ref - 0.01


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
