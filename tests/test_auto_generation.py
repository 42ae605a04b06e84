"""``--auto`` on a causal LM: generation artifacts timed as whole generations against keras-hub's ``generate``,
judged on held-out text; ``OUT/saved_model`` is the fastest generate SavedModel and serves ``generate_greedy``
without tfaccel, ``OUT/fastest`` the fastest artifact of any format. gpt2-tiny (random weights) with windows of
random tokens as its held-out text."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from tfaccel.auto.generation_search import (
    BASELINE,
    optimize_causal_lm,
    parse_generation_shape,
)
from tfaccel.errors import PlanError


@pytest.fixture(scope="module")
def held_out(gpt2_tiny):
    w = np.random.default_rng(5).integers(1, gpt2_tiny.vocab_size, (40, 24)).astype("int32")
    return dataclasses.replace(gpt2_tiny, eval_inputs={"token_ids": w, "padding_mask": np.ones_like(w)})


@pytest.fixture(scope="module")
def report(held_out, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto-gen") / "out"
    return optimize_causal_lm(held_out, out, shapes=[(1, 8, 8), "2x8+4"], time_budget_s=None,
                              recipes=["onnx-decoder", "ort-decoder-int8", "ort-decoder-int4", "generate"],
                              max_kl=1e-6, runs=3, log=lambda m: None)


def test_every_candidate_is_timed_against_keras_hub_and_judged_on_held_out_text(report):
    rows = {c.name: c for c in report.candidates}
    assert set(rows) == {BASELINE, "onnx-decoder", "ort-decoder-int8", "ort-decoder-int4", "generate"}
    assert rows[BASELINE].speedups == {"1x8+8": 1.0, "2x8+4": 1.0}
    for name in ("onnx-decoder", "ort-decoder-int8", "ort-decoder-int4", "generate"):
        c = rows[name]
        assert set(c.tokens_per_s) == {"1x8+8", "2x8+4"} and all(v > 0 for v in c.tokens_per_s.values()), name
        assert c.quality["positions"] == 32 * 23, name  # 32 windows x 23 next tokens
        assert c.score is not None and c.rank is not None, name
    # float32 artifacts are within a KL of 1e-6; 4-bit weights are not, and are dropped with the figure
    assert rows["onnx-decoder"].status == rows["generate"].status == "kept"
    assert rows["onnx-decoder"].quality["kl_divergence"] < 1e-9
    assert rows["ort-decoder-int4"].status == "dropped" and "KL divergence" in rows["ort-decoder-int4"].reason
    assert report.winner == "generate"  # the only generate SavedModel
    assert rows[report.fastest_artifact].status == "kept"
    kept = [c for c in report.candidates if c.status == "kept" and c.name != BASELINE]
    assert report.fastest_artifact == max(kept, key=lambda c: c.score).name
    assert all(c.memory and 0 < c.memory["load_rss_mb"] <= c.memory["peak_rss_mb"] for c in kept)


def test_outputs_are_placed_and_the_saved_model_serves_generate_without_tfaccel(report, gpt2_tiny):
    from pathlib import Path

    from tfaccel.servable import check_servable
    from tfaccel.xla.generate_export import keras_hub_greedy

    out = Path(report.out_dir)
    assert (out / "saved_model" / "saved_model.pb").is_file()
    assert {p.name for p in out.iterdir()} >= {"saved_model", "report.md", "report.json", report.plot}
    if report.fastest_artifact != report.winner:
        assert (out / report.fastest_artifact_path / "decoder.json").is_file()
    assert not (out / "candidates").exists()
    md = (out / "report.md").read_text()
    assert "| rank | candidate | format | tokens/s (1x8+8) |" in md and "perplexity ratio" in md
    data = json.loads((out / "report.json").read_text())
    assert data["winner"] == "generate" and data["shapes"] == [[1, 8, 8], [2, 8, 4]]
    prompts = np.array([[5, 6, 7, 8], [9, 10, 0, 0]], "int32")
    inputs = {"token_ids": prompts, "padding_mask": (prompts > 0).astype("int32"),
              "max_new_tokens": np.array(6, "int32"), "stop_token_id": np.array(-1, "int32")}
    served = check_servable(out / "saved_model", inputs=inputs, signature="generate_greedy", atol=0)
    np.testing.assert_array_equal(served["outputs"]["token_ids"],
                                  keras_hub_greedy(gpt2_tiny.model, prompts, inputs["padding_mask"], 6))


def test_without_text_gptq_is_not_a_candidate_and_bad_options_are_named(gpt2_tiny, tmp_path):
    with pytest.raises(PlanError, match="BATCHxPROMPT\\+NEW"):
        parse_generation_shape("1x128")
    with pytest.raises(PlanError, match="exceed the model's maximum length 64"):
        optimize_causal_lm(gpt2_tiny, tmp_path / "a", shapes=[(1, 32, 40)])
    with pytest.raises(PlanError, match="Unknown causal-LM recipe 'xla'"):
        optimize_causal_lm(gpt2_tiny, tmp_path / "b", shapes=[(1, 8, 4)], recipes=["xla"])
    with pytest.raises(PlanError, match="max_kl must be a number"):
        optimize_causal_lm(gpt2_tiny, tmp_path / "c", shapes=[(1, 8, 4)], max_kl=-1)
    rep = optimize_causal_lm(gpt2_tiny, tmp_path / "d", shapes=[(1, 8, 4)], recipes=["gptq-decoder", "generate"],
                             time_budget_s=None, runs=3, memory=False, log=lambda m: None)
    rows = {c.name: c for c in rep.candidates}
    assert rows["gptq-decoder"].status == "not a candidate" and "calibrate on text" in rows["gptq-decoder"].reason
    assert rows["generate"].status == "kept" and rows["generate"].quality is None  # judged by its own checks
    assert "no held-out text" in rep.budget_rule
