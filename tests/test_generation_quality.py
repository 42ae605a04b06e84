"""Quality of generation artifacts on held-out text (perplexity, ratio, KL, same top token), the user's eval text
for a language model, and GPTQ / AWQ through Keras carried into the ONNX decoder and the generate SavedModel.

A tiny GPT-2 with MiniLM's real WordPiece vocabulary (as gpt2-bbc) reads real BBC articles; gpt2-tiny (random
weights) checks the arithmetic."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tfaccel import Pipeline
from tfaccel.errors import DataFileError, InputMismatchError, StepError
from tfaccel.generation import OnnxDecoderGenerator
from tfaccel.generation.eval_text import (
    causal_lm_tokenizer,
    eval_windows,
    with_calibration_texts,
    with_eval_texts,
)
from tfaccel.generation.quality import QualityBudget, keras_forward_logits, quality_measures
from tfaccel.onnx.decoder_export import export_decoder
from tfaccel.onnx.decoder_quantize import quantize_decoder_int4


def _log_softmax(x):
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def windows(gpt2_tiny):
    return np.random.default_rng(0).integers(1, gpt2_tiny.vocab_size, (6, 20)).astype("int32")


@pytest.fixture(scope="module")
def decoders(gpt2_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("quality-decoders")
    export_decoder(gpt2_tiny.model, root / "fp32")
    quantize_decoder_int4(root / "fp32", root / "int4", block_size=32)
    return root


def test_measures_are_perplexity_kl_and_top_token_agreement(gpt2_tiny, windows):
    """Against a numpy computation on the Keras logits: the candidate is the model with its logits perturbed."""
    model = gpt2_tiny.model
    ref = keras_forward_logits(model)
    vocab = np.arange(gpt2_tiny.vocab_size)

    def perturbed(ids):  # the same noise for a token whichever batch it comes in
        return ref(ids) + (0.05 * np.sin(ids[..., None] * 0.37 + vocab * 1.3)).astype("float32")

    q = quality_measures(model, perturbed, windows, start=1, batch_size=4)
    lp_ref = _log_softmax(ref(windows))[:, :-1]
    lp = _log_softmax(perturbed(windows))[:, :-1]
    targets = windows[:, 1:, None]
    nll_ref = -np.take_along_axis(lp_ref, targets, -1).mean()
    nll = -np.take_along_axis(lp, targets, -1).mean()
    assert q["positions"] == 6 * 19
    assert q["reference_perplexity"] == pytest.approx(np.exp(nll_ref), rel=1e-6)
    assert q["perplexity_ratio"] == pytest.approx(np.exp(nll - nll_ref), rel=1e-6)
    assert q["kl_divergence"] == pytest.approx((np.exp(lp_ref) * (lp_ref - lp)).sum(-1).mean(), rel=1e-6)
    assert q["same_top"] == pytest.approx(np.mean(lp_ref.argmax(-1) == lp.argmax(-1)))
    assert q["kl_divergence"] > 0
    same = quality_measures(model, model, windows)
    assert same["perplexity_ratio"] == 1.0 and same["kl_divergence"] < 1e-12 and same["same_top"] == 1.0


def test_decoders_are_scored_through_their_own_decode_steps(gpt2_tiny, windows, decoders):
    fp32 = quality_measures(gpt2_tiny.model, OnnxDecoderGenerator(decoders / "fp32"), windows)
    int4 = quality_measures(gpt2_tiny.model, OnnxDecoderGenerator(decoders / "int4"), windows)
    assert abs(fp32["perplexity_ratio"] - 1) < 1e-5 and fp32["kl_divergence"] < 1e-8 and fp32["same_top"] == 1.0
    assert int4["kl_divergence"] > 100 * fp32["kl_divergence"]
    # later positions come from decode steps: scoring from start=5 prefills 5 tokens and scores 15 per window
    assert quality_measures(gpt2_tiny.model, OnnxDecoderGenerator(decoders / "fp32"), windows, start=5)[
        "positions"] == 6 * 15


def test_budgets_and_bad_windows_are_named(gpt2_tiny, windows):
    assert QualityBudget().breaches({"perplexity_ratio": 1.0, "kl_divergence": 0.0, "same_top": 1.0}) == []
    b = QualityBudget(max_perplexity_ratio=None, max_kl=1e-3, min_same_top=0.99)
    assert b.breaches({"perplexity_ratio": 9.0, "kl_divergence": 2e-3, "same_top": 0.5}) == [
        "KL divergence 0.002 > 0.001", "same top token 50.00% < 99.00%"]
    with pytest.raises(ValueError, match="max_kl"):
        QualityBudget(max_kl=-1)
    with pytest.raises(InputMismatchError, match="vocabulary"):
        quality_measures(gpt2_tiny.model, gpt2_tiny.model, windows + 10_000, vocabulary_size=gpt2_tiny.vocab_size)
    with pytest.raises(InputMismatchError, match="at least 2 tokens"):
        quality_measures(gpt2_tiny.model, gpt2_tiny.model, windows[:, :1])


def test_decoder_step_fails_beyond_its_budget_and_reports_within_it(gpt2_tiny, windows, tmp_path):
    src = dataclasses.replace(gpt2_tiny, eval_inputs={"token_ids": windows, "padding_mask": np.ones_like(windows)})
    report = Pipeline(["onnx-decoder", "ort-decoder-int4"], shapes=[(1, 16)], measure=False,
                      log=lambda m: None).run(src, tmp_path / "ok")
    notes = {s.step: " ".join(s.notes) for s in report.stages}
    assert "quality on 114 held-out next tokens (teacher-forced through its decode steps)" in notes["onnx-decoder"]
    assert "KL divergence" in notes["ort-decoder-int4"]
    from tfaccel.steps import get_step

    with pytest.raises(StepError, match=r"KL divergence .* > 1e-09.*--set ort-decoder-int4\.max_kl="):
        Pipeline([get_step("onnx-decoder"), get_step("ort-decoder-int4", max_kl=1e-9)], shapes=[(1, 16)],
                 measure=False, log=lambda m: None).run(src, tmp_path / "tight")
    assert not (tmp_path / "tight").exists()


# --------------------------------------------------------------------------------------------------
# the user's held-out text


@pytest.fixture(scope="module")
def wordpiece_gpt2():
    """A tiny GPT-2 over MiniLM's real WordPiece vocabulary (gpt2-bbc's tokenizer), random weights."""
    import keras
    import keras_hub

    from tfaccel.core.source import source_from_keras_model
    from tfaccel.examples.builders import minilm_dir

    keras.utils.set_random_seed(0)
    bb = keras_hub.models.GPT2Backbone(vocabulary_size=30522, num_layers=1, num_heads=2, hidden_dim=16,
                                       intermediate_dim=32, max_sequence_length=128)
    model = keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)
    return source_from_keras_model(model, name="wordpiece-gpt2", task="causal_lm", tokenizer_preset=minilm_dir())


@pytest.fixture(scope="module")
def articles():
    from tfaccel.examples import bbc_news

    (texts, _), _ = bbc_news.split(n_train=6, n_eval=0)
    return texts


def test_text_files_become_windows_of_the_models_own_token_ids(wordpiece_gpt2, articles, tmp_path):
    tok = causal_lm_tokenizer(wordpiece_gpt2)
    (tmp_path / "held.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in articles))
    (tmp_path / "held.txt").write_text(articles[0])
    src = with_eval_texts(wordpiece_gpt2, tmp_path / "held.jsonl", width=64)
    ids = eval_windows(src)
    stream = np.concatenate([np.concatenate([np.asarray(tok(t)), [tok.end_token_id]]) for t in articles])
    np.testing.assert_array_equal(ids.reshape(-1), stream[: ids.size])  # documents joined by [SEP], in order
    assert ids.shape[1] == 64 and src.eval_labels is None and "6 documents" in src.data_files["eval"]
    txt = eval_windows(with_eval_texts(wordpiece_gpt2, tmp_path / "held.txt"))
    assert txt.shape[1] == 128 and np.array_equal(txt[0], np.asarray(tok(articles[0]))[:128])
    np.savez(tmp_path / "held.npz", token_ids=ids[:3])
    assert np.array_equal(eval_windows(with_eval_texts(wordpiece_gpt2, tmp_path / "held.npz")), ids[:3])
    cal = with_calibration_texts(wordpiece_gpt2, tmp_path / "held.jsonl")
    assert cal.calibration_inputs["token_ids"].shape[1] == 128 and "calibration" in cal.data_files
    q = quality_measures(src.model, src.model, eval_windows(src, 2))
    assert q["positions"] == 2 * 63


def test_bad_text_files_are_named(wordpiece_gpt2, gpt2_tiny, bert_tiny, tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("two words")
    (tmp_path / "bad.jsonl").write_text('{"title": "no text key"}\n')
    (tmp_path / "ok.txt").write_text("some text " * 100)
    with pytest.raises(DataFileError, match="holds no text"):
        with_eval_texts(wordpiece_gpt2, tmp_path / "empty.txt")
    with pytest.raises(DataFileError, match="less than one window of 128"):
        with_eval_texts(wordpiece_gpt2, tmp_path / "short.txt")
    with pytest.raises(DataFileError, match='no "text" key'):
        with_eval_texts(wordpiece_gpt2, tmp_path / "bad.jsonl")
    with pytest.raises(DataFileError, match="does not exist"):
        with_eval_texts(wordpiece_gpt2, tmp_path / "missing.txt")
    with pytest.raises(DataFileError, match="unknown file type '.pdf'"):
        with_eval_texts(wordpiece_gpt2, tmp_path / "held.pdf")
    with pytest.raises(DataFileError, match="has none"):
        with_eval_texts(gpt2_tiny, tmp_path / "ok.txt")  # random-weight example without a tokenizer
    with pytest.raises(DataFileError, match="for causal language models"):
        with_eval_texts(bert_tiny, tmp_path / "ok.txt")
    np.savez(tmp_path / "floats.npz", token_ids=np.zeros((2, 8), "float32"))
    with pytest.raises(DataFileError, match="integer windows"):
        with_eval_texts(wordpiece_gpt2, tmp_path / "floats.npz")


def test_cli_eval_texts_feed_the_quality_checks(tmp_path, articles):
    """--eval-texts on a causal LM loaded from a keras-hub preset folder with its own tokenizer."""
    import keras_hub
    from conftest import run_cli

    from tfaccel.examples.builders import minilm_dir

    tok = keras_hub.models.BertTokenizer.from_preset(minilm_dir())
    bb = keras_hub.models.GPT2Backbone(vocabulary_size=tok.vocabulary_size(), num_layers=1, num_heads=2,
                                       hidden_dim=16, intermediate_dim=32, max_sequence_length=64)
    model = keras_hub.models.GPT2CausalLM(backbone=bb, preprocessor=None)
    model.save_to_preset(str(tmp_path / "preset"))
    tok.save_to_preset(str(tmp_path / "preset"))
    (tmp_path / "held.txt").write_text("\n\n".join(articles[:2]))
    out = run_cli("optimize", str(tmp_path / "preset"), "--task", "causal_lm", "--steps", "onnx-decoder",
                  "--eval-texts", str(tmp_path / "held.txt"), "--no-measure", "--out", str(tmp_path / "out"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    notes = " ".join(n for s in report["stages"] for n in s.get("notes", []))
    assert "held-out next tokens (teacher-forced through its decode steps)" in notes, notes


# --------------------------------------------------------------------------------------------------
# GPTQ / AWQ through Keras, carried into the decoder and the generate SavedModel


@pytest.fixture(scope="module")
def gptq_model(gpt2_tiny):
    from tfaccel.quantization.gptq_awq import keras_quantize_causal_lm

    cal = np.random.default_rng(2).integers(1, gpt2_tiny.vocab_size, (16, 32)).astype("int32")
    return keras_quantize_causal_lm(gpt2_tiny.model, "gptq", cal, group_size=16, symmetric=True)


def _rtn_ints(w: np.ndarray, group: int) -> np.ndarray:
    """Round-to-nearest symmetric 4-bit integers of ``w [K, N]`` in groups of ``group`` rows, ``[N, K]`` (Keras'
    symmetric grid: scale = 2 max|w| / 15, zero point 8)."""
    wt = w.T
    g = wt.reshape(wt.shape[0], -1, group)
    scale = np.maximum(2 * np.abs(g).max(-1, keepdims=True) / 15, 1e-8)
    return np.clip(np.round(g / scale + 8), 0, 15).reshape(wt.shape).astype(np.uint8)


def test_gptq_calibration_sees_activations_and_corrects_errors(gpt2_tiny, gptq_model):
    """Keras 3.15's own hooks never fire (keras#23512): without tfaccel's live hooks GPTQ equals round-to-nearest.
    Here its integers differ from round-to-nearest on the same groups, and its layer outputs are closer."""
    from tfaccel.onnx.decoder_graph import keras_quantized_matrix

    float_fc = gpt2_tiny.model.backbone.transformer_layers[0]._feedforward_intermediate_dense
    fc = gptq_model.backbone.transformer_layers[0]._feedforward_intermediate_dense
    m = keras_quantized_matrix(fc)
    ints = np.stack([m.packed & 15, m.packed >> 4], -1).reshape(m.n, -1)[:, : m.k]
    rtn = _rtn_ints(np.asarray(float_fc.kernel), 16)
    assert 0.02 < np.mean(ints != rtn) < 0.5


def test_gptq_integers_go_into_the_decoder_unchanged(gptq_model, gpt2_tiny, tmp_path):
    import onnx
    from onnx import numpy_helper

    from tfaccel.onnx.decoder_graph import keras_quantized_matrix

    export_decoder(gptq_model, tmp_path / "dec")
    g = onnx.load(str(tmp_path / "dec" / "decoder.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}
    fc = keras_quantized_matrix(gptq_model.backbone.transformer_layers[0]._feedforward_intermediate_dense)
    np.testing.assert_array_equal(inits["tfaccel_l0_fc_Q4"], fc.packed)
    np.testing.assert_array_equal(inits["tfaccel_l0_fc_scales"], fc.scales)
    float_products = [n for n in g.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in inits]
    assert [n.op_type for n in float_products] == ["Gemm"]  # only the tied LM head stays float
    assert sum(n.op_type == "MatMulNBits" for n in g.graph.node) == 4 * 2  # qkv, out, fc, proj per layer
    x = gpt2_tiny.sample_inputs
    want = np.asarray(gptq_model(x, training=False))
    got = OnnxDecoderGenerator(tmp_path / "dec").logits(x["token_ids"], x["padding_mask"])
    cos = (want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got)
    assert cos > 0.9999, cos  # the decoder's int8 activations (accuracy_level 4) are the only difference


def test_gptq_model_generates_from_the_generate_saved_model(gptq_model, tmp_path):
    import tensorflow as tf

    from tfaccel.xla.generate_export import keras_hub_greedy, write_generate_saved_model

    write_generate_saved_model(gptq_model, tmp_path / "sm", prompt_buckets=(16,), max_new_tokens_cap=8)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    assert any(v.dtype == tf.uint8 for v in loaded.variables)  # the packed 4-bit integers, not float weights
    ids = np.array([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]], "int32")
    mask = (ids > 0).astype("int32")
    got = loaded.signatures["generate_greedy"](token_ids=tf.constant(ids), padding_mask=tf.constant(mask),
                                                max_new_tokens=tf.constant(8), stop_token_id=tf.constant(-1))
    np.testing.assert_array_equal(got["token_ids"].numpy(), keras_hub_greedy(gptq_model, ids, mask, 8))


def test_awq_steps_carry_their_scales_and_report_quality(gpt2_tiny, windows, tmp_path):
    import onnx

    from tfaccel.steps import get_step

    held = np.random.default_rng(3).integers(1, gpt2_tiny.vocab_size, (48, 24)).astype("int32")
    src = dataclasses.replace(gpt2_tiny, eval_inputs={"token_ids": held, "padding_mask": np.ones_like(held)})
    report = Pipeline([get_step("awq", group_size=16, num_samples=8), "onnx-decoder", "ort-decoder-int8"],
                      shapes=[(1, 16)], measure=False, log=lambda m: None).run(src, tmp_path / "out")
    rows = {s.step: s for s in report.stages}
    assert all(s.status == "ok" for s in report.stages)
    assert "calibrated on 8 windows of 24 tokens from 16 held-out windows not scored" in " ".join(rows["awq"].notes)
    assert "AWQ 4-bit weights carried unchanged" in " ".join(rows["onnx-decoder"].notes)
    assert "1 float weight products 8-bit in blocks of 64 (MatMulNBits, accuracy_level 4); 12 already quantized kept" \
        in " ".join(rows["ort-decoder-int8"].notes)
    g = onnx.load(str(tmp_path / "out" / rows["onnx-decoder"].path / "decoder.onnx"))
    # q, k and v have their own AWQ scales, so 6 products a layer, each after a Mul by 1 / its scales
    assert sum(n.op_type == "Mul" and "input_scale" in n.input[1] for n in g.graph.node) == 12
    assert rows["ort-decoder-int8"].comparison["min_cosine"] > 0.9


def test_what_cannot_be_carried_is_named(gptq_model):
    from tfaccel.onnx.decoder_graph import keras_quantized_matrix
    from tfaccel.quantization.keras_quantize import clone_model

    model = clone_model(gptq_model)
    layer = model.backbone.transformer_layers[0]._feedforward_intermediate_dense
    zero = np.asarray(layer.kernel_zero).copy()
    zero[0, 0] = 40
    layer.kernel_zero.assign(zero)
    with pytest.raises(StepError, match="zero points up to 40 do not fit 4 bits.*symmetric=True"):
        keras_quantized_matrix(layer)
    layer.g_idx.assign(np.asarray(layer.g_idx)[::-1].copy())
    with pytest.raises(StepError, match="in activation order"):
        keras_quantized_matrix(layer)
    with pytest.raises(StepError, match="carries none: pass --calibration-data"):
        Pipeline(["gptq", "onnx-decoder"], shapes=[(1, 16)]).plan(load_tiny())
    with pytest.raises(ValueError, match="group_size must be one of"):
        from tfaccel.steps import get_step

        get_step("gptq", group_size=48)


def load_tiny():
    from tfaccel import load_source

    return load_source("gpt2-tiny")
