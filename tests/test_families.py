"""The family x step matrix (issue #13): every keras-hub text family, tiny random config
(``tiny:<family>``, tfaccel/examples/families.py), through each pipeline step on its own.

A cell passes when the pipeline validates the stage with the step's own tolerances, or when it is an
expected refusal listed in EXPECTED_REFUSALS (a PlanError/StepError whose message matches the
reason). Any other error, an unexpected refusal, or a listed refusal that now works fails the cell.

CI runs every family through export and every CausalLM through generate (the tests at the end of this
file check those SavedModels token for token: they read what the matrix built in this process); the other steps run on
CI_SUBSET: DeBERTa-v3 (relative positions), Llama (grouped KV heads, rotary), Gemma3 (per-layer cache, sliding
window, soft-capping) and Falcon (ALiBi); int8, whose XLA-compiled serving function takes the longest to build,
on Llama only. BERT (MiniLM's architecture) is not in CI_SUBSET because tiny:bert is bert-tiny's model class
(BertTextClassifier), which every step's own test file already runs through that step: test_xla, test_quantization
(int8, int4, litert-dynamic), test_precision (mixed_bfloat16), test_onnx (onnx, ort-int8), test_pruning_structured;
and minilm-bbc in test_minilm_bbc. That keeps the matrix near 4 minutes on 2 quiet cores.
TFACCEL_FULL_MATRIX=1 runs every cell; tools/family_matrix.py runs every cell and prints the README table.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from family_matrix import DECODERS, FAMILIES, STEPS, cells, outcome, run_step

from tfaccel import Pipeline
from tfaccel.xla.generate_export import keras_hub_greedy

# (family, step) -> the reason, a regex of the refusal's message. One table; the README quotes it.
# LiteRT (TensorFlow 2.21's converter, builtin ops only): the decoders that build their attention mask
# with a new-axis strided slice of an int/bool tensor (rotary/ALiBi families) need the Flex delegate.
_LITERT_STRIDED_SLICE = r"StepError: The LiteRT converter .* cannot convert .*LiteRT has no kernel for: StridedSlice"
EXPECTED_REFUSALS: dict[tuple[str, str], str] = {
    **{(f, "litert-dynamic"): _LITERT_STRIDED_SLICE
       for f in ("llama", "llama3", "mistral", "gemma", "gemma3", "qwen", "qwen3", "phi3", "falcon", "smollm3")},
}

ALL_FAMILIES_IN_CI = ("export", "generate")
CI_SUBSET = ("deberta_v3", "llama", "gemma3", "falcon")
CI_FAMILIES = {"int8": ("llama",)}
FULL = os.environ.get("TFACCEL_FULL_MATRIX") == "1"


def ci_cells():
    return [(f, s) for f, s in cells(FAMILIES, STEPS)
            if FULL or s in ALL_FAMILIES_IN_CI or f in CI_FAMILIES.get(s, CI_SUBSET)]


def check_cell(family: str, step: str) -> None:
    """Assert the cell's outcome is the one the table expects."""
    status, reason = outcome(run_step(family, step))
    expected = EXPECTED_REFUSALS.get((family, step))
    if expected is None:
        assert status == "ok", f"{family} x {step} was refused, not listed in EXPECTED_REFUSALS: {reason}"
    else:
        assert status == "refused", f"{family} x {step} now works: drop it from EXPECTED_REFUSALS"
        assert re.search(expected, reason), f"{family} x {step} refused for another reason: {reason}"


@pytest.mark.parametrize(("family", "step"), ci_cells(), ids=[f"{f}-{s}" for f, s in ci_cells()])
def test_family_step(family, step):
    check_cell(family, step)


def test_the_refusal_table_names_real_cells():
    for family, step in EXPECTED_REFUSALS:
        assert family in FAMILIES and step in STEPS and (step != "generate" or family in DECODERS)


def test_every_tiny_family_loads_with_varied_prompt_lengths():
    from family_matrix import source

    for family in FAMILIES:
        src = source(family)
        lengths = src.sample_inputs["padding_mask"].sum(1)
        assert src.name == f"tiny:{family}" and len(set(lengths.tolist())) > 1
        assert src.task == ("causal_lm" if family in DECODERS else "backbone" if family == "electra"
                            else "classification")
        assert np.all(src.sample_inputs["token_ids"][src.sample_inputs["padding_mask"] == 0] == 0)


def _call(path, signature, **kw):
    import tensorflow as tf

    fn = tf.saved_model.load(str(path)).signatures[signature]
    out = fn(**{k: tf.constant(v) for k, v in kw.items()})
    return out["token_ids"].numpy(), out["lengths"].numpy()


# ---------------------------------------------------------------------------------------------------
# generate on every keras-hub CausalLM family (moved here from tests/test_generate.py). The SavedModel is
# the one this file's `generate` cell wrote (tests/family_matrix.py), so each family is built and exported
# once per process: these tests must stay in this file, which make test runs in one worker.

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

    ids = tf.constant(np.array([[5, 6, 7, 8, 9, 0], [11, 12, 13, 0, 0, 0]], "int32"))  # [2, 6]
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


# ---------------------------------------------------------------------------------------------------
# Families that need tfaccel's own conversion handling, checked on the matrix's runs in this process (its
# export, and its onnx -> ort-int8 / litert-dynamic from that export), so that each model is exported and
# converted once. Moved here from tests/test_onnx_families.py and tests/test_litert_families.py.


def _cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(np.min(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))))


# DistilBERT: an encoder with exact gelu; Falcon: a decoder (ALiBi) with exact gelu. RoBERTa and XLM-RoBERTa
# share DistilBERT's TransformerEncoder graph; DeBERTa-v3 converts too (measured max abs diff 4e-8, int8
# cosine 0.998) and is one of the matrix's onnx cells in CI.
@pytest.mark.parametrize("family", ["distilbert", "falcon"])
def test_exact_gelu_families_convert_and_quantize_within_tolerance(family):
    import onnx
    from family_matrix import exported, source

    from tfaccel.core.artifact import KerasRunner
    from tfaccel.onnx.onnx_runner import OnnxRunner

    export = exported(family)
    chain = run_step(family, "ort-int8")  # onnx -> ort-int8 from that export
    for run in (export, chain):
        assert run.error is None, f"{family}: {run.error}"
    stages = {s.step: (run.out, s) for run in (export, chain) for s in run.report.stages[1:]}
    assert all(stages[s][1].status == "ok" for s in ("export", "onnx", "ort-int8")), \
        [(k, s.status) for k, (_, s) in stages.items()]
    saved_model = export.out / stages["export"][1].path
    # The graph really holds the op tf2onnx 1.17 cannot convert by itself: the test covers the handler.
    assert b"Erfc" in (saved_model / "saved_model.pb").read_bytes()
    onnx_path = next((chain.out / stages["onnx"][1].path).glob("*.onnx"))
    assert "Erf" in {n.op_type for n in onnx.load(str(onnx_path)).graph.node}

    # The numbers a user checks, against Keras itself on the sample batch (varied padding):
    # onnx float32 within 1e-4 (measured 3e-9 to 4e-7), ort-int8 cosine >= 0.98 (measured 0.998-0.9997).
    src = source(family)
    want = KerasRunner(src.model)(src.sample_inputs)
    got = OnnxRunner(str(onnx_path))(src.sample_inputs)
    int8_path = next((chain.out / stages["ort-int8"][1].path).glob("*.onnx"))
    got8 = OnnxRunner(str(int8_path))(src.sample_inputs)
    assert set(got) == set(want)
    for name in want:
        assert np.all(np.isfinite(got[name]))
        np.testing.assert_allclose(got[name], want[name], atol=1e-4, rtol=0)
        assert _cosine(got8[name], want[name]) >= 0.98


def test_deberta_v3_converts_to_litert_and_matches_keras():
    """litert-dynamic on DeBERTa-v3: int64 Abs/Sign in its relative-position buckets, which LiteRT's builtin
    kernels lack, run in int32."""
    pytest.importorskip("ai_edge_litert")
    from family_matrix import source

    from tfaccel.core.artifact import KerasRunner
    from tfaccel.quantization.litert import LiteRTRunner

    run = run_step("deberta_v3", "litert-dynamic")
    assert run.error is None, run.error
    stage = run.report.stage("litert-dynamic")
    assert stage.status == "ok"
    assert any("no int64 kernels for Abs(tensor<?x?xi64>), Sign(tensor<?x?xi64>)" in n for n in stage.notes), \
        stage.notes
    runner = LiteRTRunner(next((run.out / stage.path).glob("*.tflite")))
    # A longer sequence than the sample: the relative-position buckets are computed at run time.
    src = source("deberta_v3")
    x = src.make_inputs(2, 40, seed=1)
    got, want = runner(x)["logits"], KerasRunner(src.model)(x)["logits"]
    cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    # int8 weights, activations quantized per call: the step's own bound is cosine >= 0.98 (measured 0.9999).
    assert np.all(np.isfinite(got)) and cos.min() >= 0.98
