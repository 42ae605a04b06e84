"""Structured pruning (feed-forward units) of keras-hub models, the ``prune-structured`` step, and the
accuracy targets on real data (minilm-bbc, marked large)."""

import json

import numpy as np
import pytest

from tfaccel import Pipeline, StepError, Tolerance
from tfaccel.core.artifact import KerasRunner
from tfaccel.pruning import StructuredPruneStep, feedforward_importance, prune_feedforward
from tfaccel.pruning.structured_pruning import backbone_of, feedforward_layers

FAST = {"shapes": [(1, 16)], "runs": 3, "warmup": 1, "measure": False, "log": lambda m: None}


# One family per feed-forward form and layer layout (tfaccel.pruning.structured_pruning.FEEDFORWARD_FORMS):
# BERT's TransformerEncoder, ALBERT's shared layer, GPT-2's decoder, gated Dense (Llama; Phi-3's own names),
# gated EinsumDense with half-size units (Gemma), a nested MLP (SmolLM3), Falcon, Bloom. The other families
# reuse one of these layouts (DistilBERT/RoBERTa/XLM-R/DeBERTa-v3/ELECTRA/GPT-NeoX/OPT: BERT's or GPT-2's
# attribute names; Llama 3/Mistral/Qwen/Qwen 3: Llama's; Gemma 3: Gemma's); a hand run of all 21 families
# passed the same checks, and tests/test_families.py runs the step on every family.
FORM_FAMILIES = ["bert", "albert", "gpt2", "llama", "phi3", "gemma", "smollm3", "falcon", "bloom"]


@pytest.mark.parametrize("family", FORM_FAMILIES)
def test_smaller_model_computes_exactly_what_the_original_computes_without_the_removed_units(family):
    from tfaccel.examples.families import tiny_source

    src = tiny_source(family)
    model = src.model
    ff = feedforward_layers(model)
    units = ff[0].units
    small, kept = prune_feedforward(model, 0.5, method="weight")
    assert type(small) is type(model) and small.count_params() < model.count_params()
    assert [len(k) for k in kept] == [units // 2] * len(ff)
    if family == "albert":  # one shared block, pruned once, used by both layers
        assert len(ff) == 1 and ff[0].shared_by == 2
    old_config, new_config = backbone_of(model).get_config(), backbone_of(small).get_config()
    assert new_config["intermediate_dim"] == old_config["intermediate_dim"] // 2  # Gemma: 2 x units
    assert {k: v for k, v in new_config.items() if k != "intermediate_dim"} == \
        {k: v for k, v in old_config.items() if k != "intermediate_dim"}
    scores = feedforward_importance(model, method="weight")
    for s, k in zip(scores, kept, strict=True):  # the kept units are the most important ones
        assert np.min(s[k]) >= np.max(np.delete(s, k))
    for old, new, k in zip(ff, feedforward_layers(small), kept, strict=True):  # gate and up keep the same units
        assert (old.gate is None) == (new.gate is None) == (family not in ("llama", "phi3", "gemma", "smollm3"))
        for p_old, p_new in zip(old.inputs, new.inputs, strict=True):
            np.testing.assert_array_equal(p_new.kernel.numpy(), p_old.kernel.numpy()[:, k])
        np.testing.assert_array_equal(new.down.kernel.numpy(), old.down.kernel.numpy()[k, :])
    # Compare backbones (hidden states): a classifier head on random weights would shrink differences.
    got = KerasRunner(backbone_of(small))(src.sample_inputs)
    unchanged = KerasRunner(backbone_of(model))(src.sample_inputs)
    # Reference: the original model with the removed units' down-projection rows set to zero (they then add
    # nothing), so the smaller model must compute the same hidden states up to float32 summation order.
    for f, k in zip(ff, kept, strict=True):
        w = f.down.kernel.numpy()
        w[np.setdiff1d(np.arange(w.shape[0]), k)] = 0.0
        f.down.kernel.assign(w)
    want = KerasRunner(backbone_of(model))(src.sample_inputs)
    for name in want:
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], want[name], atol=5e-5, rtol=1e-5)
    # 40x the tolerance: removing the units does change the outputs, so the comparison above can fail.
    assert max(np.max(np.abs(unchanged[n] - want[n])) for n in want) > 2e-3


def test_activation_importance_follows_the_calibration_data(bert_tiny):
    x = bert_tiny.make_inputs(8, 16)
    act = feedforward_importance(bert_tiny.model, x)
    assert [a.shape for a in act] == [(64,), (64,)] and all(np.all(a > 0) for a in act)
    # A unit that never fires on real inputs has no importance: check the mean |activation| factor directly.
    inter = feedforward_layers(bert_tiny.model)[0].up
    original = inter.bias.numpy()
    try:
        b = original.copy()
        b[5] = -1e4  # GELU(-1e4) == 0: unit 5 of layer 0 is dead
        inter.bias.assign(b)
        assert feedforward_importance(bert_tiny.model, x)[0][5] == 0.0
    finally:
        inter.bias.assign(original)
    with pytest.raises(ValueError, match="method='activation' needs calibration inputs"):
        feedforward_importance(bert_tiny.model, method="activation")


def test_step_with_fine_tuning_data_writes_a_smaller_model_that_reloads(tmp_path):
    import keras

    from tfaccel import load_source

    src = load_source("bert-tiny")
    x = src.make_inputs(32, 16, seed=3)
    y = np.random.default_rng(3).integers(0, 3, 32)
    step = StructuredPruneStep(fraction=0.75, data=(x, y), epochs=1, batch_size=8,
                               tolerance=Tolerance(max_abs_diff=None, min_cosine=0.5, max_accuracy_drop=None))
    report = Pipeline([step], **FAST).run(src, tmp_path / "out")
    stage = report.stage("prune-structured")
    assert stage.status == "ok" and stage.params["fraction"] == 0.75 and stage.params["data"] == "arrays"
    assert any("intermediate_dim 64 -> 16 in 2 transformer layers" in n for n in stage.notes)
    assert any("distilled on arrays (32 examples, labelled) for 1 epoch(s)" in n for n in stage.notes)
    reloaded = keras.saving.load_model(tmp_path / "out" / "stages" / "01-prune-structured" / "model.keras")
    assert reloaded.backbone.intermediate_dim == 16
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [s["step"] for s in data["stages"]] == ["reference", "prune-structured", "export"]


def test_step_without_data_prunes_albert_shared_block_once_by_weight_importance(tmp_path):
    from tfaccel import load_source

    src = load_source("tiny:albert")
    report = Pipeline([StructuredPruneStep(fraction=0.5)], **FAST).run(src, tmp_path / "out")
    stage = report.stage("prune-structured")
    assert stage.status == "ok"
    assert any("no fine-tuning data" in n and "importance='weight'" in n for n in stage.notes)
    assert any("intermediate_dim 64 -> 32 in 1 shared transformer layer (each used by 2 layers)" in n
               for n in stage.notes), stage.notes


def test_step_distills_a_gated_decoder_with_fewer_heads_into_a_smaller_model_that_reloads(tmp_path):
    """Mistral (gate/up/down, 4 query heads in 2 key/value groups) on tiny random token data, no labels:
    half the feed-forward units and one of the two key/value groups go, then logits distillation."""
    import keras

    from tfaccel import load_source

    src = load_source("tiny:mistral")
    x = src.make_inputs(16, 16, seed=3)
    step = StructuredPruneStep(fraction=0.5, head_fraction=0.5, data=x, epochs=1, batch_size=8)
    report = Pipeline([step], **FAST).run(src, tmp_path / "out")
    stage = report.stage("prune-structured")
    # The step's own tolerance (min cosine 0.5 against the input model) held.
    assert stage.status == "ok" and stage.comparison["min_cosine"] >= 0.5, stage.comparison
    assert stage.params["head_fraction"] == 0.5
    assert any("intermediate_dim 64 -> 32 in 2 transformer layers; gate and up projections keep the same units"
               in n for n in stage.notes), stage.notes
    assert any("attention heads: query 4 -> 2, key/value 2 -> 1 (head_dim 8) in 2 transformer layers" in n
               for n in stage.notes), stage.notes
    assert any("distilled on arrays (16 examples) for 1 epoch(s)" in n for n in stage.notes)
    reloaded = keras.saving.load_model(tmp_path / "out" / "stages" / "01-prune-structured" / "model.keras")
    config = reloaded.backbone.get_config()
    assert (config["intermediate_dim"], config["num_query_heads"], config["num_key_value_heads"]) == (32, 2, 1)
    assert reloaded.count_params() < src.model.count_params()
    for f in feedforward_layers(reloaded):
        assert f.up.kernel.shape[-1] == f.gate.kernel.shape[-1] == f.down.kernel.shape[0] == 32
    logits = reloaded.predict(x, verbose=0)
    assert logits.shape == (16, 16, src.vocab_size) and np.all(np.isfinite(logits))
    assert report.stage("export").status == "ok"


def test_step_and_function_errors_name_the_value():
    import keras

    with pytest.raises(ValueError, match="fraction must be a number in \\(0, 1\\). Received: fraction=1.0"):
        StructuredPruneStep(fraction=1.0)
    with pytest.raises(ValueError, match="importance must be 'activation' or 'weight'. Received: importance='random'"):
        StructuredPruneStep(importance="random")
    with pytest.raises(ValueError, match="epochs must be an int >= 0"):
        StructuredPruneStep(epochs=-1)
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(2)])
    with pytest.raises(StepError, match="neither a keras_hub.models.Backbone nor a Task"):
        prune_feedforward(plain, 0.5)
    from tfaccel import load_source

    with pytest.raises(StepError, match="neither a keras_hub.models.Backbone nor a Task"):
        StructuredPruneStep().check(load_source(plain))  # what the benchmark harness asks before a row
    assert StructuredPruneStep.default_tolerance.max_accuracy_drop == 0.02


def _tiny_gemma_mqa():
    import keras
    import keras_hub

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(vocabulary_size=256, num_layers=2, num_query_heads=4,
                                              num_key_value_heads=1, hidden_dim=32, intermediate_dim=64, head_dim=8)
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


# Grouped-query attention losing whole key/value groups (Mistral: kernels (hidden, heads, head_dim); Gemma:
# (heads, hidden, head_dim)), and multi-query attention (Gemma, 1 key/value head) losing query heads.
@pytest.mark.parametrize("family", ["mistral", "gemma", "gemma-mqa"])
def test_fewer_heads_compute_exactly_what_the_original_computes_without_the_removed_heads(family):
    from tfaccel.core.source import source_from_keras_model
    from tfaccel.examples.families import tiny_source
    from tfaccel.pruning.structured_pruning import attention_heads, prune_attention_heads

    src = source_from_keras_model(_tiny_gemma_mqa(), "gemma-mqa") if family == "gemma-mqa" else tiny_source(family)
    model = src.model
    heads = attention_heads(model)
    nq, nkv = heads[0].num_query_heads, heads[0].num_key_value_heads
    small, kept = prune_attention_heads(model, 0.5, inputs=src.sample_inputs)
    config = backbone_of(small).get_config()
    want_kv = 1 if nkv == 1 else nkv // 2
    assert (config["num_query_heads"], config["num_key_value_heads"], config["head_dim"]) == (nq // 2, want_kv, 8)
    assert small.count_params() < model.count_params()
    group = nq // nkv
    for k in kept:  # whole groups: a kept key/value head keeps all its query heads
        assert len(k) == nq // 2
        if nkv > 1:
            assert all(set(range(q // group * group, q // group * group + group)) <= set(k) for q in k)
    got = KerasRunner(small.backbone)(src.sample_inputs)
    unchanged = KerasRunner(model.backbone)(src.sample_inputs)
    # Reference: the original with the removed query heads' output-projection slices set to zero.
    for a, k in zip(heads, kept, strict=True):
        w = a.output.kernel.numpy()  # (heads, head_dim, hidden) in both layouts
        w[np.setdiff1d(np.arange(nq), k)] = 0.0
        a.output.kernel.assign(w)
    want = KerasRunner(model.backbone)(src.sample_inputs)
    for name in want:
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], want[name], atol=5e-5, rtol=1e-5)
    assert max(np.max(np.abs(unchanged[n] - want[n])) for n in want) > 2e-3  # removal does change outputs


def test_head_pruning_is_refused_at_plan_time_where_the_config_derives_the_head_size():
    from tfaccel import load_source

    src = load_source("tiny:llama")
    with pytest.raises(StepError, match="LlamaBackbone derives its head size from hidden_dim // num_heads"):
        Pipeline([StructuredPruneStep(head_fraction=0.5)], **FAST).plan(src)
    with pytest.raises(ValueError, match="head_fraction must be a number in \\[0, 1\\)"):
        StructuredPruneStep(head_fraction=1.0)


def test_a_family_without_a_known_feed_forward_is_refused_at_plan_time():
    import keras_hub

    from tfaccel import load_source

    # F-Net mixes tokens with a Fourier transform and names its feed-forward layers differently.
    fnet = keras_hub.models.FNetBackbone(vocabulary_size=100, num_layers=1, hidden_dim=16, intermediate_dim=32,
                                         max_sequence_length=16)
    with pytest.raises(StepError, match="FNetEncoder 'f_net_layer_0' in FNetBackbone has no feed-forward form"):
        Pipeline([StructuredPruneStep()], **FAST).plan(load_source(fnet))


# ------------------------------------------------------------------------------------------------
# Real data: all-MiniLM-L6-v2 fine-tuned on BBC News (the accuracy targets)


@pytest.mark.large
def test_minilm_bbc_structured_half_ff_with_distillation_loses_at_most_2_points(minilm_bbc, tmp_path):
    # Two epochs of distillation (the default) on the 400 BBC training articles (seq 128): ~90 s on 2 quiet cores.
    report = Pipeline([StructuredPruneStep(fraction=0.5)], measure=False, log=print).run(minilm_bbc, tmp_path / "out")
    ref, stage = report.reference.accuracy, report.stage("prune-structured")
    assert ref >= 0.90
    # Measured 0.955 / 0.95 / 0.94 over distillation seeds 0 / 1 / 2 (reference 0.930); one epoch gave 0.905.
    assert stage.accuracy >= ref - 0.02, f"{stage.accuracy:.3f} vs reference {ref:.3f}"
    assert any("intermediate_dim 1536 -> 768 in 6 transformer layers" in n for n in stage.notes)
    assert report.stage("export").accuracy == stage.accuracy


@pytest.mark.large
def test_minilm_bbc_50_percent_magnitude_sparsity_during_fine_tuning_loses_at_most_1_point(minilm_bbc):
    from pruning_bench import minilm_unstructured

    # A copy of the fine-tuned classifier is pruned while it fine-tunes one more epoch (25 steps of 16,
    # seq 128) on the 400 training articles: PolynomialDecay takes every Dense/EinsumDense kernel to 50%
    # by step 20, masks recomputed every 2 steps. ~60 s on 2 quiet cores.
    row = minilm_unstructured(sparsity=0.5, epochs=1, control=False)
    assert row["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert row["reference_accuracy"] >= 0.90
    # Measured 0.945 / 0.935 / 0.940 over seeds 0 / 1 / 2 (reference 0.930; learning rate decaying to 0).
    assert row["accuracy"] >= row["reference_accuracy"] - 0.01, row
