import numpy as np
import pytest
from conftest import run_python

from tfaccel import Pipeline, PlanError
from tfaccel.examples.families import DECODERS
from tfaccel.xla.generate_export import keras_hub_greedy, write_generate_saved_model

PROMPTS = np.array([[5, 6, 7, 8, 9, 0], [11, 12, 13, 0, 0, 0]], "int32")
MASK = (PROMPTS > 0).astype("int32")


@pytest.fixture(scope="module", params=[True, False], ids=["xla", "graph"])
def gen_model(gpt2_tiny, tmp_path_factory, request):
    path = tmp_path_factory.mktemp("gen") / "sm"
    info = write_generate_saved_model(gpt2_tiny.model, path, max_new_tokens_cap=16, prompt_buckets=(8, 16),
                                      jit_compile=request.param)
    assert info["jit_compile"] is request.param
    from tfaccel.saved_model import stored_values

    assert stored_values(path) == gpt2_tiny.model.count_params()  # each weight stored once, not twice
    return path


def _call(path, signature, **kw):
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in kw.items()})
    return out["token_ids"].numpy(), out["lengths"].numpy()


def test_greedy_generation_equals_keras_hub_generate(gpt2_tiny, gen_model):
    ids, lengths = _call(gen_model, "generate_greedy", token_ids=PROMPTS, padding_mask=MASK,
                         max_new_tokens=np.int32(10), stop_token_id=np.int32(-1))
    want = keras_hub_greedy(gpt2_tiny.model, PROMPTS, MASK, 10)
    np.testing.assert_array_equal(ids, want)
    assert ids.shape == (2, 16) and lengths.tolist() == [15, 13]  # each row: its prompt + 10 new tokens
    np.testing.assert_array_equal(ids[:, :6] * MASK, PROMPTS)  # prompts untouched


def test_prompt_longer_than_the_largest_bucket_gets_the_bucket_error(gen_model):
    import tensorflow as tf

    long = np.ones((1, 17), np.int32)  # the export's buckets are 8 and 16
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than the largest prompt bucket 16"):
        _call(gen_model, "generate_greedy", token_ids=long, padding_mask=long, max_new_tokens=np.int32(2),
              stop_token_id=np.int32(-1))


def test_stop_token_ends_a_row(gpt2_tiny, gen_model):
    free, _ = _call(gen_model, "generate_greedy", token_ids=PROMPTS, padding_mask=MASK,
                    max_new_tokens=np.int32(10), stop_token_id=np.int32(-1))
    stop = int(free[0, 7])  # the 3rd new token of row 0 becomes the stop token
    ids, lengths = _call(gen_model, "generate_greedy", token_ids=PROMPTS, padding_mask=MASK,
                         max_new_tokens=np.int32(10), stop_token_id=np.int32(stop))
    first = int(np.argmax(free[0, 5:] == stop)) + 5
    assert lengths[0] == first + 1 and ids[0, first] == stop and not ids[0, first + 1:].any()
    np.testing.assert_array_equal(ids[0, :first + 1], free[0, :first + 1])


def test_top_k_sampling_is_reproducible_and_stays_in_the_top_k(gpt2_tiny, gen_model):
    import tensorflow as tf

    kw = dict(token_ids=PROMPTS, padding_mask=MASK, max_new_tokens=np.int32(6), stop_token_id=np.int32(-1),
              top_k=np.int32(3), top_p=np.float32(1.0), temperature=np.float32(1.0), seed=np.int32(7))
    a, la = _call(gen_model, "generate", **kw)
    b, _ = _call(gen_model, "generate", **kw)
    np.testing.assert_array_equal(a, b)
    c, _ = _call(gen_model, "generate", **{**kw, "seed": np.int32(8)})
    assert not np.array_equal(a, c)
    # every sampled token is among the 3 most likely next tokens given the prefix
    row, n = 0, int(MASK[0].sum())
    for pos in range(n, la[row]):
        logits = gpt2_tiny.model({"token_ids": tf.constant(a[row:row + 1, :pos]),
                                  "padding_mask": tf.ones((1, pos), tf.int32)}, training=False)
        top3 = np.argsort(np.asarray(logits)[0, -1])[-3:]
        assert a[row, pos] in top3


def test_generates_in_a_fresh_process_without_tfaccel_or_keras_hub(gpt2_tiny, gen_model):
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "g = tf.saved_model.load(sys.argv[1]).signatures['generate_greedy']\n"
        "ids = tf.constant([[5, 6, 7, 8, 9, 0], [11, 12, 13, 0, 0, 0]])\n"
        "out = g(token_ids=ids, padding_mask=tf.cast(ids > 0, tf.int32), max_new_tokens=tf.constant(10),"
        " stop_token_id=tf.constant(-1))\n"
        "assert 'tfaccel' not in sys.modules and 'keras_hub' not in sys.modules\n"
        "print(out['token_ids'].numpy().tolist())\n"
    )
    proc = run_python(code, str(gen_model))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = keras_hub_greedy(gpt2_tiny.model, PROMPTS, MASK, 10)
    assert eval(proc.stdout.strip().splitlines()[-1]) == want.tolist()


def test_generate_step_in_the_pipeline_and_wrong_model(gpt2_tiny, bert_tiny, tmp_path):
    from tfaccel.xla import GenerateStep

    step = GenerateStep(max_new_tokens_cap=8, prompt_buckets=(32,), check_new_tokens=4)
    report = Pipeline([step], shapes=[(1, 16)], runs=3, warmup=1, log=lambda m: None).run(gpt2_tiny, tmp_path / "o")
    st = report.stage("generate")
    assert st.comparison["max_abs_diff"] < 1e-4 and any("100.0% of tokens agree" in n for n in st.notes)
    with pytest.raises(PlanError, match="needs a keras-hub causal LM"):
        Pipeline([GenerateStep()], shapes=[(1, 16)], log=lambda m: None).run(bert_tiny, tmp_path / "o2")
    with pytest.raises(ValueError, match="jit_compile='yes'"):
        GenerateStep(jit_compile="yes")
    with pytest.raises(PlanError, match="max_new_tokens_cap=64 does not fit this gpt2 model.s maximum length of 64"):
        write_generate_saved_model(gpt2_tiny.model, tmp_path / "x", max_new_tokens_cap=64)


# ---------------------------------------------------------------------------------------------------
# Every keras-hub CausalLM family (tiny random configs from tfaccel/examples/families.py). The SavedModel
# is the one the family matrix's `generate` cell wrote (tests/family_matrix.py), so each family is
# built and exported once per session.

# batch 2, right-padded, the two extremes of the export's 16-token bucket: a full bucket and one token.
# (The generate step itself checked 4 sample prompts of 16 to 4 tokens against keras-hub, and the GPT-2
# tests above cover more lengths.)
FAMILY_PROMPTS = [np.array([list(range(30, 46)), [7] + [0] * 15], "int32")]


def _family_saved_model(family):
    from family_matrix import run_step

    run = run_step(family, "generate")
    assert run.error is None, f"{family}: the generate step failed: {run.error}"
    return run.out / run.report.stage("generate").path


@pytest.mark.parametrize("family", DECODERS)
def test_every_causal_lm_family_generates_the_same_tokens_as_keras_hub(family):
    from family_matrix import GENERATE_OPTIONS, source

    path = _family_saved_model(family)
    n = GENERATE_OPTIONS["max_new_tokens_cap"]
    for prompts in FAMILY_PROMPTS:
        mask = (prompts > 0).astype("int32")
        ids, lengths = _call(path, "generate_greedy", token_ids=prompts, padding_mask=mask,
                             max_new_tokens=np.int32(n), stop_token_id=np.int32(-1))
        want = keras_hub_greedy(source(family).model, prompts, mask, n)
        np.testing.assert_array_equal(ids, want, err_msg=f"{family}: generate_greedy differs from keras-hub")
        assert lengths.tolist() == (mask.sum(1) + n).tolist()


def test_llama_gqa_generate_reloads_in_a_fresh_process_and_serves_in_saved_model_cli():
    from family_matrix import GENERATE_OPTIONS, source

    from tfaccel.causal_lm_spec import causal_lm_spec
    from tfaccel.servable import check_servable

    spec = causal_lm_spec(source("llama").model)
    assert spec.num_kv_heads < source("llama").model.backbone.num_query_heads  # grouped KV heads
    n = GENERATE_OPTIONS["max_new_tokens_cap"]
    prompts = FAMILY_PROMPTS[0]
    inputs = {"token_ids": prompts, "padding_mask": (prompts > 0).astype("int32"),
              "max_new_tokens": np.array(n, "int32"), "stop_token_id": np.array(-1, "int32")}
    # a fresh process without tfaccel or keras-hub, then saved_model_cli run (TF Serving's loader); they agree
    out = check_servable(_family_saved_model("llama"), inputs=inputs, signature="generate_greedy", atol=0)
    want = keras_hub_greedy(source("llama").model, prompts, inputs["padding_mask"], n)
    np.testing.assert_array_equal(out["outputs"]["token_ids"], want)


def test_cache_spec_matches_keras_hub_build_cache_for_every_family():
    import tensorflow as tf
    from family_matrix import source

    from tfaccel.causal_lm_spec import causal_lm_spec

    ids = tf.constant(PROMPTS)  # [2, 6]
    for family in DECODERS:
        lm = source(family).model
        spec = causal_lm_spec(lm)
        assert spec.refusal is None and spec.family == family
        if family == "gemma3":  # keras-hub keeps a (key, value) tuple per layer
            _, cache = lm._build_cache(ids, None, None, ids > 0, None)
            assert spec.native_layout == "per_layer" and len(cache) == spec.num_layers
            assert all(tuple(t.shape) == (2, 6, spec.num_kv_heads, spec.head_dim) for kv in cache for t in kv)
            dtype = cache[0][0].dtype
        else:
            _, cache = lm._build_cache(ids)
            assert tuple(cache.shape) == spec.cache_shape(2, 6), family
            dtype = cache.dtype
        assert dtype.name == spec.cache_dtype
        assert spec.max_length == getattr(lm.backbone, "max_sequence_length", None) or family == "smollm3"


def test_refusals_and_caps_are_plan_time_errors(gpt2_tiny, tmp_path):
    import dataclasses

    import keras_hub

    from tfaccel.causal_lm_spec import causal_lm_spec
    from tfaccel.xla import GenerateStep
    from tfaccel.xla.generate_export import resolve_generate_limits

    spec = causal_lm_spec(gpt2_tiny.model)
    # the default cap fits the model: max length 64, largest bucket of at most 32 -> 32 new tokens
    assert resolve_generate_limits(spec, None) == (32, (16, 32))
    assert resolve_generate_limits(spec, None, (8,)) == (56, (8,))  # 64 - 8
    with pytest.raises(PlanError, match="maximum length 64: lower max_new_tokens_cap or pass prompt_buckets of at most 24"):
        resolve_generate_limits(spec, 40, (32,))
    # a family tfaccel has not checked is refused before any work, naming why
    mixtral = keras_hub.models.MixtralCausalLM(keras_hub.models.MixtralBackbone(
        vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1, hidden_dim=16,
        intermediate_dim=16, num_experts=2), preprocessor=None)
    assert "KV-cache layout tfaccel has not checked" in causal_lm_spec(mixtral).refusal
    src = dataclasses.replace(gpt2_tiny, model=mixtral)
    with pytest.raises(PlanError, match="cannot export MixtralCausalLM.*Supported families: bloom, falcon"):
        Pipeline([GenerateStep()], shapes=[(1, 16)], log=lambda m: None).run(src, tmp_path / "o")
    with pytest.raises(PlanError, match="max_new_tokens_cap=100 does not fit this gpt2 model's maximum length of 64"):
        Pipeline([GenerateStep(max_new_tokens_cap=100)], shapes=[(1, 16)], log=lambda m: None).run(
            gpt2_tiny, tmp_path / "o3")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o3").exists()


def test_int8_weights_generate_agrees_with_the_float_model(tmp_path):
    """weights="int8": Keras int8 on a copy of tiny Llama. Gate: >= 90% of next tokens equal keras-hub's
    float greedy tokens given the same prefix (teacher-forced; free-running tokens compound after one
    flip, and random tiny models have near-tied logits). Measured 100% here, 96.9% on tiny Falcon."""
    import re

    from family_matrix import GENERATE_OPTIONS, source

    from tfaccel.xla import GenerateStep

    step = GenerateStep(weights="int8", **GENERATE_OPTIONS)
    report = Pipeline([step], shapes=[(1, 16)], measure=False, log=lambda m: None).run(source("llama"), tmp_path / "o")
    st = report.stage("generate")
    assert st.status == "ok" and st.params["weights"] == "int8"
    assert st.params["weight_bytes_after"] < st.params["weight_bytes_before"]
    assert st.comparison["min_cosine"] >= 0.98  # the int8 step's own tolerance on the serving_default logits
    note = next(n for n in st.notes if "teacher-forced" in n)
    assert float(re.search(r"([\d.]+)%", note).group(1)) >= 90.0
    with pytest.raises(ValueError, match="weights='int4'"):
        GenerateStep(weights="int4")
