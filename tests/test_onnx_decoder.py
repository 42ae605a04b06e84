"""ONNX KV-cache decoder (onnx-decoder, ort-decoder-int8, ort-decoder-int4) on gpt2-tiny and a tiny
Llama with grouped KV heads: the prefill logits equal the Keras forward pass, fp32 greedy decoding is
token for token keras-hub's ``generate``, the quantized decoders agree within stated bounds."""

import numpy as np
import pytest

from tfaccel import Pipeline
from tfaccel.errors import InputMismatchError, StepError
from tfaccel.generation import OnnxDecoderGenerator
from tfaccel.generation.agreement import decoder_agreement
from tfaccel.onnx.decoder_export import decoder_layout, export_decoder, read_layout
from tfaccel.onnx.decoder_quantize import quantize_decoder_int4, quantize_decoder_int8
from tfaccel.xla.generate_export import keras_hub_greedy

# ragged, right-padded prompts: rows start decoding at different positions
PROMPTS = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [21, 22, 23, 0, 0, 0, 0, 0], [31, 32, 33, 34, 35, 0, 0, 0]],
                   "int32")
MASK = (PROMPTS > 0).astype("int32")
NEW = 16
_DECODERS: dict = {}


def llama_tiny_model():
    """Llama-class, GQA: 4 query heads share 2 KV heads. Random weights, seeded."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(vocabulary_size=300, num_layers=2, num_query_heads=4,
                                              num_key_value_heads=2, hidden_dim=32, intermediate_dim=64)
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


def decoders(name, model, tmp_path_factory) -> dict:
    """fp32 / int8 / int4 decoder folders of one model, built once per test session (both test files)."""
    if name not in _DECODERS:
        root = tmp_path_factory.mktemp(f"decoder-{name}")
        export_decoder(model, root / "fp32")
        quantize_decoder_int8(root / "fp32", root / "int8")
        quantize_decoder_int4(root / "fp32", root / "int4", block_size=16)
        _DECODERS[name] = {"model": model, **{k: root / k for k in ("fp32", "int8", "int4")}}
    return _DECODERS[name]


@pytest.fixture(scope="session")
def llama_tiny():
    return llama_tiny_model()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def family(request, gpt2_tiny, llama_tiny, tmp_path_factory):
    model = gpt2_tiny.model if request.param == "gpt2" else llama_tiny
    return decoders(request.param, model, tmp_path_factory)


def test_layout_and_onnx_inputs_follow_grouped_kv_heads(llama_tiny, tmp_path_factory):
    import onnxruntime as ort

    d = decoders("llama", llama_tiny, tmp_path_factory)
    layout, info = read_layout(d["fp32"])
    assert (layout.family, layout.num_layers, layout.num_kv_heads, layout.head_dim) == ("LlamaCausalLM", 2, 2, 8)
    assert llama_tiny.backbone.num_query_heads == 4 and layout.max_length is None  # rotary: no position table
    sess = ort.InferenceSession(str(d["fp32"] / "decoder.onnx"))
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert set(shapes) == {"input_ids", "attention_mask", "past_0", "past_1"}
    assert shapes["past_0"][1:2] + shapes["past_0"][3:] == [2, 2, 8]  # [batch, k/v, past, kv_heads, head_dim]
    assert [o.name for o in sess.get_outputs()] == ["logits", "present_0", "present_1"]


def test_gpt2_gets_the_native_graph_and_other_families_the_traced_one(family):
    layout, info = read_layout(family["fp32"])
    assert info["graph"] == ("gpt2-native" if layout.family == "GPT2CausalLM" else "keras-layers")
    for variant in ("int8", "int4"):
        assert read_layout(family[variant])[1]["graph"] == info["graph"]


def test_native_gpt2_graph_is_the_traced_graphs_tokens_in_a_third_of_the_nodes(gpt2_tiny, tmp_path_factory):
    import onnx

    native = decoders("gpt2", gpt2_tiny.model, tmp_path_factory)["fp32"]
    traced = tmp_path_factory.mktemp("gpt2-traced")
    export_decoder(gpt2_tiny.model, traced, graph="keras-layers")
    assert read_layout(traced)[1]["graph"] == "keras-layers"
    nodes = {k: len(onnx.load(str(f / "decoder.onnx")).graph.node) for k, f in (("native", native), ("traced", traced))}
    assert nodes["native"] * 2.5 < nodes["traced"], nodes
    want = keras_hub_greedy(gpt2_tiny.model, PROMPTS, MASK, NEW)
    for folder in (native, traced):
        got = OnnxDecoderGenerator(folder).generate(PROMPTS, NEW, padding_mask=MASK)
        np.testing.assert_array_equal(got.token_ids, want)


def test_native_gpt2_graph_refuses_what_it_does_not_express(llama_tiny, tmp_path):
    import keras_hub

    from tfaccel.onnx.decoder_export import native_gpt2_refusal

    bf16 = keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=32,
        dtype="mixed_bfloat16"), preprocessor=None)
    assert "mixed_bfloat16" in native_gpt2_refusal(bf16)
    assert "LlamaCausalLM" in native_gpt2_refusal(llama_tiny)
    with pytest.raises(StepError, match="native GPT-2 decoder graph does not cover this model: LlamaCausalLM"):
        export_decoder(llama_tiny, tmp_path / "x", graph="gpt2-native")
    with pytest.raises(StepError, match="graph must be one of auto, gpt2-native, keras-layers"):
        export_decoder(llama_tiny, tmp_path / "y", graph="fast")
    assert not (tmp_path / "x").exists()


def test_prefill_logits_equal_the_keras_forward_pass(family):
    model = family["model"]
    want = np.asarray(model({"token_ids": PROMPTS, "padding_mask": MASK}, training=False))
    got = OnnxDecoderGenerator(family["fp32"]).logits(PROMPTS, MASK)
    np.testing.assert_allclose(got, want, atol=1e-4)  # every position, padded ones included


def test_fp32_decoder_is_token_for_token_keras_hub_generate(family):
    want = keras_hub_greedy(family["model"], PROMPTS, MASK, NEW)
    got = OnnxDecoderGenerator(family["fp32"]).generate(PROMPTS, NEW, padding_mask=MASK)
    np.testing.assert_array_equal(got.token_ids, want)
    assert got.lengths.tolist() == (MASK.sum(1) + NEW).tolist()


@pytest.mark.parametrize("variant,min_next,min_cos", [("int8", 0.95, 0.999), ("int4", 0.75, 0.98)])
def test_quantized_decoders_agree_with_keras_hub(family, variant, min_next, min_cos):
    """Thresholds (measured on these tiny random models, where logits are close together): int8 next-token
    argmax >= 95%, logits cosine >= 0.999; int4 (block 16) >= 75%, cosine >= 0.98."""
    res = decoder_agreement(family["model"], OnnxDecoderGenerator(family[variant]), PROMPTS, MASK, NEW)
    assert res["next_token_agreement"] >= min_next, res
    assert res["next_token_cosine_min"] >= min_cos, res
    # why tokens flip: quantization moves the top-1 - top-2 gap by more than the gap at some positions
    assert 0 < res["logit_gap_p05"] <= res["logit_gap_p50"] and res["gap_error_p50"] > 0, res
    assert res["gap_exceeded"] >= 1 - res["next_token_agreement"] - 0.05, res


def test_stepwise_teacher_forced_logits_equal_the_keras_forward_pass(family):
    """Prefill 3 tokens, then one decode step per given token: the logits the Keras model gives there."""
    seq = np.concatenate([PROMPTS, PROMPTS[:, ::-1] % 200 + 1], axis=1)  # 16 tokens, every row full
    want = np.asarray(family["model"]({"token_ids": seq, "padding_mask": np.ones_like(seq)}, training=False))
    got = OnnxDecoderGenerator(family["fp32"]).stepwise_logits(seq, 3)
    np.testing.assert_allclose(got[:, 2:-1], want[:, 2:-1], atol=1e-4)
    assert not got[:, :2].any()
    with pytest.raises(InputMismatchError, match="start=0"):
        OnnxDecoderGenerator(family["fp32"]).stepwise_logits(seq, 0)


def test_fp32_decoder_never_moves_a_top_logit_gap_past_the_gap(family):
    res = decoder_agreement(family["model"], OnnxDecoderGenerator(family["fp32"]), PROMPTS, MASK, NEW)
    assert res["token_agreement"] == res["next_token_agreement"] == 1.0, res
    assert res["gap_exceeded"] == 0.0 and res["gap_error_p50"] < 1e-4 < res["logit_gap_p05"], res


def test_quantized_graphs_quantize_every_weight_matmul(family):
    import onnx

    from tfaccel.onnx.decoder_quantize import gemm_to_matmul

    fp32 = onnx.load(str(family["fp32"] / "decoder.onnx"))
    layout, info = read_layout(family["fp32"])
    if info["graph"] == "keras-layers":
        assert any(n.op_type == "Gemm" for n in fp32.graph.node)  # tf2onnx writes the attention projections as Gemm
    gemm_to_matmul(fp32)
    inits = {i.name for i in fp32.graph.initializer}
    weights = sum(n.op_type == "MatMul" and n.input[1] in inits for n in fp32.graph.node)
    if info["graph"] == "gpt2-native":  # one fused q/k/v, output, two feed-forward per layer + LM head
        assert weights == 4 * layout.num_layers + 1
    else:  # q/k/v/output (tf2onnx merges k and v when their random weights are equal) + feed-forward + LM head
        assert weights >= 2 * 5 + 1
    for folder, op in ((family["int8"], "MatMulInteger"), (family["int4"], "MatMulNBits")):
        g = onnx.load(str(folder / "decoder.onnx"))
        assert not any(n.op_type == "Gemm" for n in g.graph.node)
        assert sum(n.op_type == op for n in g.graph.node) == weights == read_layout(folder)[1]["matmuls_quantized"]
    sizes = {k: (family[k] / "decoder.onnx").stat().st_size for k in ("fp32", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"], sizes


def test_pipeline_steps_validate_and_report_agreement(gpt2_tiny, tmp_path):
    report = Pipeline(["onnx-decoder", "ort-decoder-int8", "ort-decoder-int4@onnx-decoder"], shapes=[(1, 16)],
                      measure=False, log=lambda m: None).run(gpt2_tiny, tmp_path / "out")
    rows = {s.step: s for s in report.stages}
    assert rows["onnx-decoder"].kind == "onnx_decoder" and rows["onnx-decoder"].status == "ok"
    assert rows["onnx-decoder"].comparison["max_abs_diff"] < 1e-3
    assert any("100.0% of tokens the same" in n for n in rows["onnx-decoder"].notes)
    assert any("gpt2-native graph" in n for n in rows["onnx-decoder"].notes)
    assert rows["ort-decoder-int8"].comparison["min_cosine"] > 0.98
    assert (tmp_path / "out" / rows["ort-decoder-int4"].path / "decoder.json").exists()


def test_unsupported_models_and_bad_options_are_named(bert_tiny):
    with pytest.raises(StepError, match="BertTextClassifier"):
        decoder_layout(bert_tiny.model)
    with pytest.raises(StepError, match="causal LM"):
        Pipeline(["onnx-decoder"], shapes=[(1, 16)]).plan(bert_tiny)
    from tfaccel.steps import get_step

    with pytest.raises(Exception, match="block_size=48"):
        get_step("ort-decoder-int4", block_size=48)
    with pytest.raises(ValueError, match="graph=.fast."):
        get_step("onnx-decoder", graph="fast")
