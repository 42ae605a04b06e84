import numpy as np
import pytest
from conftest import run_python

from tfaccel import Pipeline, PlanError
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


_LOADED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_loaded():
    yield
    _LOADED.clear()


def _call(path, signature, **kw):
    """Call a signature of the SavedModel, loaded once per module (and XLA-compiled once per shape): calls
    on one loaded object must also agree with each other (the sampler is stateless, seeded by its input)."""
    import tensorflow as tf

    if str(path) not in _LOADED:
        _LOADED[str(path)] = tf.saved_model.load(str(path))
    fn = _LOADED[str(path)].signatures[signature]
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
    report = Pipeline([step], shapes=[(1, 16)], runs=2, warmup=1, log=lambda m: None, footprints=False).run(
        gpt2_tiny, tmp_path / "o")
    st = report.stage("generate")
    assert st.comparison["max_abs_diff"] < 1e-4 and any("100.0% of tokens agree" in n for n in st.notes)
    with pytest.raises(PlanError, match="needs a keras-hub causal LM"):
        Pipeline([GenerateStep()], shapes=[(1, 16)], log=lambda m: None).run(bert_tiny, tmp_path / "o2")
    with pytest.raises(ValueError, match="jit_compile='yes'"):
        GenerateStep(jit_compile="yes")
    with pytest.raises(PlanError, match="max_new_tokens_cap=64 does not fit this gpt2 model.s maximum length of 64"):
        write_generate_saved_model(gpt2_tiny.model, tmp_path / "x", max_new_tokens_cap=64)


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
