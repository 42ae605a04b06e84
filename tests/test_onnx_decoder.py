"""ONNX KV-cache decoder (onnx-decoder, ort-decoder-int8, ort-decoder-int4) on gpt2-tiny and a tiny Llama with
grouped KV heads (both as native graphs), and gpt2-tiny traced through keras-hub's layers: the prefill logits
equal the Keras forward pass, fp32 greedy decoding is token for token keras-hub's ``generate``, the quantized
decoders agree within stated bounds; the native graph of every Llama-class family follows keras-hub."""

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


def decoders(name, model, tmp_path_factory, graph: str = "auto") -> dict:
    """fp32 / int8 / int4 decoder folders of one model, built once per test session (both test files).
    Native graphs get the blockwise int8 decoder (MatMulNBits), the traced graph onnxruntime's dynamic int8."""
    if name not in _DECODERS:
        root = tmp_path_factory.mktemp(f"decoder-{name}")
        export_decoder(model, root / "fp32", graph=graph)
        native = read_layout(root / "fp32")[1]["graph"] == "native"
        quantize_decoder_int8(root / "fp32", root / "int8", method="blockwise" if native else "dynamic", block_size=16)
        quantize_decoder_int4(root / "fp32", root / "int4", block_size=16)
        _DECODERS[name] = {"model": model, **{k: root / k for k in ("fp32", "int8", "int4")}}
    return _DECODERS[name]


@pytest.fixture(scope="session")
def llama_tiny():
    return llama_tiny_model()


@pytest.fixture(scope="session", params=["gpt2", "llama", "gpt2-traced"])
def family(request, gpt2_tiny, llama_tiny, tmp_path_factory):
    model = llama_tiny if request.param == "llama" else gpt2_tiny.model
    graph = "keras-layers" if request.param.endswith("-traced") else "auto"
    return decoders(request.param, model, tmp_path_factory, graph=graph)


def test_native_layout_keeps_grouped_kv_heads_in_one_key_and_one_value_cache(llama_tiny, tmp_path_factory):
    import onnxruntime as ort

    d = decoders("llama", llama_tiny, tmp_path_factory)
    layout, info = read_layout(d["fp32"])
    assert (layout.family, layout.num_layers, layout.num_kv_heads, layout.head_dim) == ("LlamaCausalLM", 2, 2, 8)
    assert (info["graph"], layout.cache) == ("native", "bnsh")
    assert llama_tiny.backbone.num_query_heads == 4 and layout.max_length == 4096  # the rotary tables' length
    sess = ort.InferenceSession(str(d["fp32"] / "decoder.onnx"))
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert set(shapes) == {"input_ids", "attention_mask", "logits_from", "past_key_0", "past_value_0", "past_key_1",
                           "past_value_1"}
    assert shapes["past_key_0"][1] == 2 and shapes["past_key_0"][3] == 8  # [batch, kv_heads, past, head_dim]
    assert [o.name for o in sess.get_outputs()] == ["logits", "present_key_0", "present_value_0", "present_key_1",
                                                    "present_value_1"]


def test_traced_layout_stacks_keys_and_values(family):
    layout, info = read_layout(family["fp32"])
    if info["graph"] != "keras-layers":
        pytest.skip("the stacked cache is the traced graph's")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(family["fp32"] / "decoder.onnx"))
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    assert layout.cache == "stacked" and set(shapes) == {"input_ids", "attention_mask", "past_0", "past_1"}
    assert shapes["past_0"][1:2] + shapes["past_0"][3:] == [2, 2, 16]  # [batch, k/v, past, kv_heads, head_dim]


def test_native_graph_has_a_fifth_of_the_traced_graphs_nodes(tmp_path_factory, gpt2_tiny):
    import onnx

    native = decoders("gpt2", gpt2_tiny.model, tmp_path_factory)["fp32"]
    traced = decoders("gpt2-traced", gpt2_tiny.model, tmp_path_factory, graph="keras-layers")["fp32"]
    assert (read_layout(native)[1]["graph"], read_layout(traced)[1]["graph"]) == ("native", "keras-layers")
    nodes = {k: len(onnx.load(str(f / "decoder.onnx")).graph.node) for k, f in (("native", native), ("traced", traced))}
    assert nodes["native"] * 5 < nodes["traced"], nodes  # 2 layers: 60 vs 435 (gpt2-small: 200 vs ~2,300)


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen"])
def test_native_graph_of_every_llama_class_family_is_keras_hub(kind, tmp_path):
    """Llama 3's scaled rotary frequencies, Mistral's sliding window (6 tokens, shorter than the 24 generated),
    Qwen's q/k/v biases and tied embedding: prefill logits and greedy tokens are keras-hub's."""
    model = llama_class_tiny(kind)
    export_decoder(model, tmp_path / kind)
    assert read_layout(tmp_path / kind)[1]["graph"] == "native"
    gen = OnnxDecoderGenerator(tmp_path / kind)
    want = np.asarray(model({"token_ids": PROMPTS, "padding_mask": MASK}, training=False))
    np.testing.assert_allclose(gen.logits(PROMPTS, MASK), want, atol=1e-4)
    np.testing.assert_array_equal(gen.generate(PROMPTS, NEW, padding_mask=MASK).token_ids,
                                  keras_hub_greedy(model, PROMPTS, MASK, NEW))


def llama_class_tiny(kind):
    import keras
    import keras_hub

    keras.utils.set_random_seed(1)
    common = dict(vocabulary_size=300, num_layers=2, num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
                  intermediate_dim=64)
    if kind == "llama3":
        bb = keras_hub.models.Llama3Backbone(**common, rope_frequency_adjustment_factor=8.0, rope_low_freq_factor=1.0,
                                             rope_high_freq_factor=4.0, rope_pretraining_sequence_length=32)
        return keras_hub.models.Llama3CausalLM(backbone=bb, preprocessor=None)
    if kind == "mistral":
        bb = keras_hub.models.MistralBackbone(**common, sliding_window=6)
        return keras_hub.models.MistralCausalLM(backbone=bb, preprocessor=None)
    bb = keras_hub.models.QwenBackbone(**common, tie_word_embeddings=True)
    return keras_hub.models.QwenCausalLM(backbone=bb, preprocessor=None)


def test_graph_refusals_are_named(llama_tiny, tmp_path):
    import keras_hub

    from tfaccel.onnx.decoder_graph import native_refusal

    bf16 = keras_hub.models.GPT2CausalLM(backbone=keras_hub.models.GPT2Backbone(
        vocabulary_size=64, num_layers=1, num_heads=2, hidden_dim=8, intermediate_dim=16, max_sequence_length=32,
        dtype="mixed_bfloat16"), preprocessor=None)
    assert "bfloat16" in native_refusal(bf16)
    assert native_refusal(llama_tiny) is None
    with pytest.raises(StepError, match="native decoder graph does not cover this model: compute dtype bfloat16"):
        export_decoder(bf16, tmp_path / "x", graph="native")
    with pytest.raises(StepError, match="graph must be one of auto, native, keras-layers"):
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


def test_quantized_graphs_quantize_every_weight_product(family):
    import onnx

    from tfaccel.onnx.decoder_quantize import gemm_to_matmul

    fp32 = onnx.load(str(family["fp32"] / "decoder.onnx"))
    layout, info = read_layout(family["fp32"])
    native = info["graph"] == "native"
    if not native:
        assert any(n.op_type == "Gemm" for n in fp32.graph.node)  # tf2onnx writes the attention projections as Gemm
    gemm_to_matmul(fp32)
    inits = {i.name for i in fp32.graph.initializer}
    weights = sum(n.op_type in ("MatMul", "Gemm") and n.input[1] in inits for n in fp32.graph.node)
    if native:  # one fused q/k/v, output, fused feed-forward input (gate + up), feed-forward output, LM head
        assert weights == 4 * layout.num_layers + 1
    else:  # q/k/v/output (tf2onnx merges k and v when their random weights are equal) + feed-forward + LM head
        assert weights >= 2 * 5 + 1
    int8_op = "MatMulNBits" if native else "MatMulInteger"
    assert all(read_layout(family[v])[1]["graph"] == info["graph"] for v in ("int8", "int4"))
    for folder, op in ((family["int8"], int8_op), (family["int4"], "MatMulNBits")):
        g = onnx.load(str(folder / "decoder.onnx"))
        assert not any(n.op_type == "Gemm" for n in g.graph.node)
        assert sum(n.op_type == op for n in g.graph.node) == weights == read_layout(folder)[1]["matmuls_quantized"]
    sizes = {k: (family[k] / "decoder.onnx").stat().st_size for k in ("fp32", "int8", "int4")}
    assert sizes["int4"] < sizes["int8"] < sizes["fp32"], sizes


def test_tied_embedding_is_stored_once_and_the_quantizers_still_find_it(family):
    """GPT-2 ties its LM head to the token embedding: the native graph holds the [vocab, hidden] table once
    (the head is a Gemm on it), and the quantized graphs hold it once as packed integers read by both
    MatMulNBits and GatherBlockQuantized."""
    import onnx
    from onnx import numpy_helper

    if read_layout(family["fp32"])[1]["graph"] != "native" or not family["model"].backbone.token_embedding.tie_weights:
        pytest.skip("a native graph of a model with a tied embedding")
    vocab, hidden = (int(d) for d in family["model"].backbone.token_embedding.embeddings.shape)
    fp32 = onnx.load(str(family["fp32"] / "decoder.onnx"))
    tables = [i for i in fp32.graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
    assert len(tables) == 1
    for variant in ("int8", "int4"):
        g = onnx.load(str(family[variant] / "decoder.onnx"))
        assert not [i for i in g.graph.initializer if sorted(i.dims) == sorted([vocab, hidden])]
        gather = [n for n in g.graph.node if n.op_type == "GatherBlockQuantized"]
        heads = [n for n in g.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather[0].input[0]]
        assert len(gather) == 1 and len(heads) == 1
        packed = {i.name: numpy_helper.to_array(i) for i in g.graph.initializer}[gather[0].input[0]]
        assert packed.shape[0] == vocab
        assert read_layout(family[variant])[1]["tied_embedding"] is True


def test_pipeline_steps_validate_and_report_agreement(gpt2_tiny, tmp_path):
    report = Pipeline(["onnx-decoder", "ort-decoder-int8", "ort-decoder-int4@onnx-decoder"], shapes=[(1, 16)],
                      measure=False, log=lambda m: None).run(gpt2_tiny, tmp_path / "out")
    rows = {s.step: s for s in report.stages}
    assert rows["onnx-decoder"].kind == "onnx_decoder" and rows["onnx-decoder"].status == "ok"
    assert rows["onnx-decoder"].comparison["max_abs_diff"] < 1e-3
    assert any("100.0% of tokens the same" in n for n in rows["onnx-decoder"].notes)
    assert any("native graph" in n for n in rows["onnx-decoder"].notes)
    assert any("8-bit in blocks of 64" in n for n in rows["ort-decoder-int8"].notes)
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
