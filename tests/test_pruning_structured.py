"""Structured pruning (feed-forward units) of keras-hub models, the ``prune-structured`` step, and the
accuracy targets on real data (minilm-bbc, marked large)."""

import json
from pathlib import Path

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

    with pytest.raises(ValueError, match="fraction must be a number in \\[0, 1\\) .*Received: fraction=1.0"):
        StructuredPruneStep(fraction=1.0)
    with pytest.raises(ValueError, match="removes nothing with fraction=0, layers=0 and head_fraction=0"):
        StructuredPruneStep(fraction=0)
    with pytest.raises(ValueError, match="layers must be an int >= 0 .* or a float in \\[0, 1\\).*Received: layers=1.5"):
        StructuredPruneStep(layers=1.5)
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
# Depth: whole transformer layers removed (the DistilBERT recipe)


def _deep_model(family: str, layers: int = 6):
    """A tiny keras-hub model of ``family`` with ``layers`` transformer layers (seeded random weights)."""
    import keras
    import keras_hub

    m = keras_hub.models
    keras.utils.set_random_seed(0)
    common = dict(vocabulary_size=256, num_layers=layers, hidden_dim=32, intermediate_dim=64)
    gqa = dict(common, num_query_heads=4, num_key_value_heads=2)
    if family == "bert":
        return m.BertTextClassifier(m.BertBackbone(**common, num_heads=2, max_sequence_length=64), num_classes=3,
                                    preprocessor=None)
    if family == "albert":  # 2 groups: the layer count must stay even
        return m.AlbertTextClassifier(m.AlbertBackbone(**common, num_heads=2, embedding_dim=16, num_groups=2,
                                                       num_inner_repetitions=1, max_sequence_length=64),
                                      num_classes=3, preprocessor=None)
    if family == "gpt2":
        return m.GPT2CausalLM(m.GPT2Backbone(**common, num_heads=2, max_sequence_length=64), preprocessor=None)
    if family == "llama":
        return m.LlamaCausalLM(m.LlamaBackbone(**gqa), preprocessor=None)
    if family == "gemma":  # Gemma 2: sliding-window attention on even layers, global on odd ones
        return m.GemmaCausalLM(m.GemmaBackbone(**gqa, head_dim=8, use_sliding_window_attention=True,
                                               sliding_window_size=4, final_logit_soft_cap=30.0,
                                               attention_logit_soft_cap=50.0), preprocessor=None)
    if family == "smollm3":  # per-layer lists in the config: RoPE on some layers only
        b = m.SmolLM3Backbone(vocabulary_size=256, hidden_dim=32, intermediate_dim=64, num_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, attention_bias=False, attention_dropout=0.0,
                              rope_layer_enabled_list=[i % 3 != 2 for i in range(layers)],
                              layer_types=["attention"] * layers, mlp_bias=False, layer_norm_epsilon=1e-5,
                              max_position_embeddings=64, rope_theta=10000.0, partial_rotary_factor=1.0)
        return m.SmolLM3CausalLM(b, preprocessor=None)
    raise KeyError(family)


@pytest.mark.parametrize("family", ["bert", "gpt2", "gemma", "smollm3"])
def test_fewer_layers_compute_exactly_what_the_original_computes_skipping_the_removed_layers(family):
    from tfaccel.pruning.depth import evenly_spread, prune_layers
    from tfaccel.sources import source_from_keras_model, token_sample_inputs

    model = _deep_model(family)
    x = token_sample_inputs(source_from_keras_model(model, family).input_specs, 256, batch=2, seq=16)
    small, kept = prune_layers(model, 2)  # 6 -> 4 layers
    assert type(small) is type(model) and backbone_of(small).get_config()["num_layers"] == 4
    assert small.count_params() < model.count_params()
    if family == "gemma":
        # Evenly spread would be [0, 2, 3, 5]: layer 2 is a sliding-window layer, but position 1 of a 4-layer
        # Gemma 2 is global. The kept layers follow the pattern instead: local, global, local, global.
        assert evenly_spread(6, 4) == [0, 2, 3, 5] and kept == [0, 1, 2, 5]
    else:
        assert kept == [0, 2, 3, 5]
    if family == "smollm3":  # the per-layer RoPE list is cut with the layers
        assert backbone_of(small).get_config()["rope_layer_enabled_list"] == [True, False, True, False]
    got = KerasRunner(backbone_of(small))(x)
    unchanged = KerasRunner(backbone_of(model))(x)
    # Reference: the original with the removed layers made identities, so the smaller model must compute the
    # same hidden states up to float32 rounding.
    for i, layer in enumerate(backbone_of(model).transformer_layers):
        if i not in kept:
            layer.call = lambda *a, **k: a[0] if a else next(iter(k.values()))
    want = KerasRunner(backbone_of(model))(x)
    for name in want:
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
    assert max(np.max(np.abs(unchanged[n] - want[n])) for n in want) > 1e-3  # removal does change outputs


def test_depth_counts_shares_and_refusals():
    from tfaccel.pruning.depth import _choose_layers, layers_to_remove, prune_layers

    assert (layers_to_remove(6, 0.5), layers_to_remove(12, 0.25), layers_to_remove(6, 5)) == (3, 3, 5)
    with pytest.raises(ValueError, match="removes 6 of 6 transformer layers; remove at least 1 and keep at least 1"):
        layers_to_remove(6, 6)
    with pytest.raises(ValueError, match="layers as a share must be in \\(0, 1\\); pass an int for a count"):
        layers_to_remove(6, 2.0)
    # ALBERT shares weights in 2 groups: 6 -> 4 drops calls of the shared blocks, no weights; 6 -> 3 is no config.
    albert = _deep_model("albert")
    small, _ = prune_layers(albert, 2)
    assert backbone_of(small).get_config()["num_layers"] == 4 and small.count_params() == albert.count_params()
    with pytest.raises(StepError, match="layer count must stay a multiple of 2; removing 3 of 6 leaves 3"):
        prune_layers(albert, 3)
    # No choice of kept layers fits a pattern whose only "global" layer would have to move: refused.
    local, glob = {"window": True}, {"window": False}
    assert _choose_layers([glob, local, local, glob], [local, glob]) == [1, 3]  # nearest to the spread [0, 3]
    assert _choose_layers([local, local, local, glob], [glob, local]) is None
    from tfaccel import load_source

    with pytest.raises(StepError, match="removes 2 of 2 transformer layers"):
        Pipeline([StructuredPruneStep(fraction=0, layers=2)], **FAST).plan(load_source("bert-tiny"))


def test_logits_distillation_loss_is_the_softened_kl_divergence(bert_tiny):
    """The loss distill() gives keras.distillation is KL(teacher || student) of the temperature-softened
    probabilities times T^2 (LogitsDistillation's default loss string computes it on raw logits in Keras 3.15)."""
    from tfaccel.pruning.distillation import distillation_loss

    rng = np.random.default_rng(0)
    teacher, student = rng.normal(0, 3, (8, 3)).astype("float32"), rng.normal(0, 3, (8, 3)).astype("float32")
    t = 2.0
    p = np.exp(teacher / t) / np.exp(teacher / t).sum(-1, keepdims=True)
    q = np.exp(student / t) / np.exp(student / t).sum(-1, keepdims=True)
    want = float(np.mean(np.sum(p * np.log(p / q), -1)) * t * t)
    got = float(distillation_loss(bert_tiny.model, t).compute_loss(teacher, student))
    assert got == pytest.approx(want, rel=1e-4)
    assert float(distillation_loss(bert_tiny.model, t).compute_loss(teacher, teacher)) == pytest.approx(0.0, abs=1e-6)


def _prune_bert_tiny(seed: int, out: str) -> list[str]:
    """prune-structured (one of 2 layers and half the feed-forward units) on bert-tiny with 160 labelled
    examples: a real distillation with a held-back slice. Writes OUT/model.keras; returns the notes. Also run
    in a fresh process by the reproducibility test."""
    import random
    from pathlib import Path

    from tfaccel import load_source
    from tfaccel.core.artifact import Artifact
    from tfaccel.core.step import StepContext

    random.random()  # what ran before in the process must not matter (dropout seeds came from here)
    src = load_source("bert-tiny")
    x = src.make_inputs(160, 16, seed=3)
    y = np.random.default_rng(3).integers(0, 3, 160)
    step = StructuredPruneStep(fraction=0.5, layers=1, data=(x, y), epochs=2, batch_size=16, seed=seed)
    ctx = StepContext(source=src, stage_dir=Path(out), log=lambda m: None)
    step.apply(Artifact(kind="keras", model=src.model, dict_inputs=True, input_names=src.input_names), ctx)
    return ctx.notes


def test_same_seed_gives_the_same_weights_in_another_process(tmp_path):
    """Two runs of the same step with the same seed, one in this process and one in a fresh one, write the
    same weights. (Before the dropout seeding, two runs in one process already differed by up to 1.6e-3.)"""
    import keras
    from conftest import run_python

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    notes = _prune_bert_tiny(0, str(tmp_path / "a"))
    assert any("transformer layers 2 -> 1 (kept [0]" in n for n in notes), notes
    assert any("intermediate_dim 64 -> 32 in 1 transformer layers" in n for n in notes), notes
    assert any("distilled on arrays (160 examples, labelled)" in n and "(seed 0)" in n
               and "on 144 examples" in n and "held-back distillation loss" in n and "on 16 examples" in n for n in notes), notes
    tests = str(Path(__file__).parent)
    proc = run_python(f"import sys; sys.path.insert(0, {tests!r}); from test_pruning_structured import _prune_bert_tiny; "
                      f"_prune_bert_tiny(0, {str(tmp_path / 'b')!r})")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = keras.saving.load_model(tmp_path / "a" / "model.keras", compile=False)
    b = keras.saving.load_model(tmp_path / "b" / "model.keras", compile=False)
    assert a.backbone.num_layers == 1 and a.backbone.intermediate_dim == 32
    for wa, wb in zip(a.weights, b.weights, strict=True):
        np.testing.assert_array_equal(wa.numpy(), wb.numpy(), err_msg=wa.path)


# ------------------------------------------------------------------------------------------------
# Real data: all-MiniLM-L6-v2 fine-tuned on BBC News (the accuracy targets)


@pytest.mark.large
def test_minilm_bbc_structured_half_ff_with_distillation_loses_at_most_2_points(minilm_bbc, tmp_path):
    # The default recipe (seed 0) with one epoch instead of at most three, to keep CI time down: 1 epoch on 360 of
    # the 400 BBC training articles (seq 128), 40 held back; about 70 s on 2 quiet cores. The three-epoch default
    # is measured by `make bench` (benchmarks/training.py; 0.950 / 0.925 / 0.950 over seeds 0 / 1 / 2).
    step = StructuredPruneStep(fraction=0.5, epochs=1)
    report = Pipeline([step], measure=False, log=print).run(minilm_bbc, tmp_path / "out")
    ref, stage = report.reference.accuracy, report.stage("prune-structured")
    assert ref >= 0.90
    # One epoch, measured on an AMD EPYC Zen 4 (reference 0.930): 0.920 / 0.930 / 0.955 over seeds 0 / 1 / 2.
    # Other CPUs round differently, so the bound is the step's own 2-point budget.
    assert stage.accuracy >= ref - 0.02, f"{stage.accuracy:.3f} vs reference {ref:.3f}"
    assert any("intermediate_dim 1536 -> 768 in 6 transformer layers" in n for n in stage.notes)
    assert any("(seed 0)" in n and "on 360 examples; kept epoch 1" in n and "on 40 examples" in n
               for n in stage.notes), stage.notes
    assert report.stage("export").accuracy == stage.accuracy


# The magnitude-sparsity target on real data (50% of every kernel while fine-tuning minilm-bbc on 128 training
# articles loses at most 1 accuracy point) is asserted by notebooks/pruning.ipynb, which make test runs and which
# fine-tunes with the same recipe; a test here repeated that fine-tune (about 80 s on 2 loaded cores).
# `make bench` (benchmarks/training.py, pruning_bench.minilm_unstructured) measures the 400-article recipe.
