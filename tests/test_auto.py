"""`tfaccel optimize --auto`: the recipe table filtered per capability (both branches of every hardware
decision, through override_capabilities), the winner is the fastest candidate within the budget, breaches
are dropped with their reason, the winner serves in a fresh process, the time budget, and the CLI's errors."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import numpy as np
import pytest
from conftest import run_cli, run_python

from tfaccel.auto import Recipe, StepSpec, optimize_auto, plan_candidates
from tfaccel.compat import override_capabilities
from tfaccel.core.validation import Tolerance


def _runnable(plan) -> list[str]:
    return [c.recipe.name for c in plan if c.runnable]


def _reason(plan, name: str) -> str:
    c = next(c for c in plan if c.recipe.name == name)
    assert not c.runnable, f"{name} should not be a candidate here"
    return c.reason


def _ort_options(plan) -> dict:
    """The settings the ort-int8 recipe's step uses on this (overridden) machine."""
    recipe = next(c.recipe for c in plan if c.recipe.name == "ort-int8")
    settings = recipe.make_steps()[-1].settings()
    return {"per_channel": settings["per_channel"], "reduce_range": settings["reduce_range"]}


# ---------------------------------------------------------------------------------------------------
# Recipe filtering per capability: both branches of each decision


def test_avx2_cpu_without_onednn_int8_or_bf16_gets_no_such_candidates():
    with override_capabilities(cpu_isa="avx2", onednn_int8=False, gpus=(), gpu_compute_capability=()) as caps:
        plan = plan_candidates(caps, formats="all")
        ort = _ort_options(plan)
    run = _runnable(plan)
    assert run[0] == "export"  # the baseline, always first
    assert {"xla", "int8-xla", "int8-keras", "onnx", "ort-int8"} <= set(run)
    assert "mixed_bfloat16" not in run and "int8-onednn" not in run and "mixed_float16" not in run
    assert "int8-by-batch" not in run  # half of it is the oneDNN form
    assert "bfloat16" in _reason(plan, "mixed_bfloat16")
    assert "onednn" in _reason(plan, "int8-onednn") and "onednn" in _reason(plan, "int8-by-batch")
    assert "GPU" in _reason(plan, "tensorrt-fp16")
    assert ort == {"per_channel": True, "reduce_range": True}  # no VNNI: 7-bit weights


def test_avx512_bf16_cpu_with_onednn_int8_gets_them():
    feats = {"avx2": True, "avx512": True, "vnni": True, "bf16": True, "fp16": False, "amx": False}
    with override_capabilities(cpu_features=feats, onednn_int8=True, gpus=(), gpu_compute_capability=()) as caps:
        plan = plan_candidates(caps, formats="all")
        ort = _ort_options(plan)
    run = _runnable(plan)
    assert {"mixed_bfloat16", "int8-onednn", "int8-xla", "int8-by-batch"} <= set(run)
    assert "mixed_float16" not in run  # no fp16 units on this CPU
    assert ort == {"per_channel": False, "reduce_range": False}  # VNNI: full 8-bit weights
    assert not any(name.startswith(("tensorrt", "tftrt")) for name in run)


def test_nvidia_gpu_gets_tensorrt_candidates_and_half_precision():
    gpu = dict(gpus=("/physical_device:GPU:0",), gpu_compute_capability=((8, 0),), tensorrt="10.3.0")
    with override_capabilities(tf_tensorrt=False, **gpu) as caps:
        every = plan_candidates(caps, formats="all")
        saved_models_only = plan_candidates(caps, formats="savedmodel")
    with override_capabilities(tf_tensorrt=True, **gpu) as caps:
        tftrt = plan_candidates(caps, formats="all")
    assert {"tensorrt-fp16", "tensorrt-int8", "mixed_float16", "mixed_bfloat16"} <= set(_runnable(every))
    assert "tftrt" in _reason(every, "tftrt-fp16")
    assert "--formats all" in _reason(saved_models_only, "tensorrt-fp16")  # an engine is not a SavedModel
    assert {"tftrt-fp16", "tftrt-int8"} <= set(_runnable(tftrt))


def test_pruning_is_a_candidate_only_with_finetuning_data():
    with override_capabilities(gpus=()) as caps:
        without = plan_candidates(caps, finetune_data=False)
        with_data = plan_candidates(caps, finetune_data=True)
    assert "fine-tuning data" in _reason(without, "prune-structured")
    assert "fine-tuning data" in _reason(without, "prune-structured+xla")
    assert {"prune-structured", "prune-structured+xla"} <= set(_runnable(with_data))


def test_unknown_recipe_and_format_are_plan_errors():
    from tfaccel.compat import capabilities
    from tfaccel.errors import PlanError

    with pytest.raises(PlanError, match="Unknown recipe 'int9'"):
        plan_candidates(capabilities(), recipes=["int9"])
    with pytest.raises(PlanError, match="formats must be one of"):
        plan_candidates(capabilities(), formats="onnx")


# ---------------------------------------------------------------------------------------------------
# Whole runs on bert-tiny


@pytest.fixture(scope="session")
def labelled_tiny(bert_tiny):
    """bert-tiny with a labelled eval split: 64 synthetic sequences labelled by the model itself, so the
    reference is 100% accurate and every changed prediction costs 1.56 points."""
    from tfaccel.core.artifact import KerasRunner
    from tfaccel.core.source import token_sample_inputs

    inputs = token_sample_inputs(bert_tiny.input_specs, bert_tiny.vocab_size, batch=64, seq=16, seed=1)
    logits = KerasRunner(bert_tiny.model, bert_tiny.dict_inputs)(inputs)["logits"]
    return dataclasses.replace(bert_tiny, eval_inputs=inputs, eval_labels=np.argmax(logits, -1))


#: Removes 3/4 of the feed-forward units with no fine-tuning: a candidate that loses accuracy.
PRUNE_75 = Recipe("prune-75-no-finetune", (StepSpec.of("prune-structured", fraction=0.75, data="none", epochs=0,
                                                       importance="weight"),), "test: pruned, not fine-tuned")


#: The same pruning, then XLA: with PRUNE_75 a group whose counterparts (the chains without the pruning
#: step) are export and xla, so the search orders the two by their counterparts' speed.
PRUNE_75_XLA = Recipe("prune-75-no-finetune+xla", (*PRUNE_75.steps, StepSpec.of("xla")),
                      "test: pruned, not fine-tuned, XLA")


@pytest.fixture(scope="session")
def labelled_run(labelled_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("auto") / "out"
    lines: list[str] = []
    report = optimize_auto(labelled_tiny, out, recipes=["xla", PRUNE_75, PRUNE_75_XLA], shapes=[(1, 16), (4, 16)],
                           max_accuracy_drop=1.0, runs=5, warmup=2, log=lines.append)
    return report, out, lines


def test_kept_candidate_is_the_fastest_within_the_budget(labelled_run):
    report, out, _ = labelled_run
    data = json.loads((out / "report.json").read_text())
    cands = {c["name"]: c for c in data["candidates"]}
    assert {"export", "xla", "prune-75-no-finetune"} <= set(cands)
    timed = [c for c in cands.values() if c["status"] in ("kept", "dropped")]
    assert all(set(c["speedups"]) == {"1x16", "4x16"} for c in timed)  # every candidate at every shape
    assert cands["export"]["speedups"] == {"1x16": 1.0, "4x16": 1.0}
    for c in timed:  # the score is the geometric mean of the per-shape speed-ups
        assert c["score"] == pytest.approx(float(np.sqrt(c["speedups"]["1x16"] * c["speedups"]["4x16"])))
        assert (c["accuracy_drop_points"] <= 1.0) == (c["status"] == "kept")
    in_budget = [c for c in timed if c["status"] == "kept" and c["kind"] == "saved_model"]
    assert data["winner"] == max(in_budget, key=lambda c: c["score"])["name"]
    assert [c["rank"] for c in data["candidates"] if c["rank"]] == list(range(1, len(timed) + 1))
    md = (out / "report.md").read_text()
    assert f"`{data['winner']}` **(winner)**" in md and "| rank | candidate |" in md
    assert (out / "saved_model" / "saved_model.pb").exists() and not (out / "candidates").exists()


def test_accuracy_breach_is_dropped_with_its_reason(labelled_run):
    report, _, _ = labelled_run
    pruned = report.candidate("prune-75-no-finetune")
    assert pruned.status == "dropped" and pruned.accuracy_drop_points > 1.0
    assert "points below the reference" in pruned.reason and "budget 1" in pruned.reason
    assert pruned.measurements  # still timed: the plot shows what the budget ruled out
    assert report.winner != pruned.name


def test_group_is_built_in_counterpart_speed_order_and_dominance_needs_a_kept_sibling(labelled_run):
    report, _, lines = labelled_run
    note = next(n for n in report.run_notes if "prune-structured candidates were built in the order" in n)
    m = {c: float(v) for c, v in re.findall(r"\((export|xla) ([0-9.]+) ms\)", note)}
    assert set(m) == {"export", "xla"}  # both counterparts were timed in the quick round
    started = [ln.split("] ")[1].split(":")[0] for ln in lines if ln.startswith("[") and "prune-75" in ln]
    if m["xla"] != m["export"]:  # (equal to 0.1 ms: either order is right)
        first = "prune-75-no-finetune+xla" if m["xla"] < m["export"] else "prune-75-no-finetune"
        assert started[0] == first  # the member whose counterpart was faster is built first
    assert sorted(started) == ["prune-75-no-finetune", "prune-75-no-finetune+xla"]
    for name in ("prune-75-no-finetune", "prune-75-no-finetune+xla"):
        # both lose accuracy (75% of the units, no fine-tuning): neither is kept, so neither can dominate
        # the other, and both are built and timed
        assert report.candidate(name).status == "dropped" and report.candidate(name).measurements


def test_plot_is_a_png_with_the_candidates(labelled_run):
    import matplotlib.image

    _, out, _ = labelled_run
    png = out / "latency_vs_accuracy.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w, _ = matplotlib.image.imread(png).shape
    assert h > 200 and w > 300


def test_winner_serves_in_a_fresh_process(labelled_run, labelled_tiny, tmp_path):
    report, out, _ = labelled_run
    np.savez(tmp_path / "x.npz", **labelled_tiny.eval_inputs)
    code = ("import sys, numpy as np, tensorflow as tf\n"
            "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
            "x = dict(np.load(sys.argv[2]))\n"
            "np.save(sys.argv[3], f(**{k: tf.constant(v) for k, v in x.items()})['logits'].numpy())\n")
    proc = run_python(code, str(out / "saved_model"), str(tmp_path / "x.npz"), str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = np.load(tmp_path / "y.npy")
    acc = float(np.mean(np.argmax(logits, -1) == labelled_tiny.eval_labels))
    assert acc == pytest.approx(report.candidate(report.winner).accuracy)  # the same model the report judged
    assert acc >= report.reference_accuracy - 0.01


def test_cosine_breach_without_labels_and_fastest_of_any_format(bert_tiny, tmp_path):
    strict = Recipe("int8-strict", (StepSpec.of("int8", kernel="xla", tolerance=Tolerance(
        max_abs_diff=None, min_cosine=0.999999, max_accuracy_drop=None)),), "test: an impossible cosine bound")
    out = tmp_path / "a"
    report = optimize_auto(bert_tiny, out, recipes=[strict, "litert-dynamic"], formats="all", shapes=[(1, 16)],
                           runs=3, warmup=1)
    assert report.reference_accuracy is None and "cosine tolerance" in report.budget_rule
    c = report.candidate("int8-strict")
    assert c.status == "dropped" and "cosine" in c.reason and "< 0.999999" in c.reason
    assert 0.98 < c.min_cosine < 0.999999 and c.measurements  # a real int8 model, timed, over this bound
    assert report.winner == "export"  # the only SavedModel left within its tolerance
    # formats="all": the fastest artifact of any format is named, and copied beside the SavedModel
    kept = [c for c in report.candidates if c.status == "kept"]
    assert {c.name for c in kept} == {"export", "litert-dynamic"}
    assert report.fastest_artifact == max(kept, key=lambda c: c.score).name
    if report.fastest_artifact == "litert-dynamic":
        assert report.fastest_artifact_path.startswith("fastest/") and (out / report.fastest_artifact_path).is_file()
    else:
        assert report.fastest_artifact_path == "saved_model" and not (out / "fastest").exists()


def test_savedmodel_source_gets_the_recipes_that_apply_to_a_savedmodel(bert_tiny, tmp_path):
    from tfaccel import load_source
    from tfaccel.export import export_saved_model
    from tfaccel.servable import check_servable

    export_saved_model(bert_tiny.model, tmp_path / "sm")  # a user who has only this folder
    source = load_source(str(tmp_path / "sm"))
    assert source.kind == "saved_model"
    report = optimize_auto(source, tmp_path / "out", recipes=["xla", "int8-xla", "litert-dynamic"], formats="all",
                           shapes=[(1, 16)], runs=3, warmup=1)
    assert report.baseline == "source" and report.candidate("source").status == "kept"
    assert report.candidate("xla").status == "kept" and report.candidate("xla").steps == ["xla"]
    assert report.candidate("litert-dynamic").steps == ["litert-dynamic"]  # no export before it: it is one
    int8 = report.candidate("int8-xla")
    assert int8.status == "not a candidate" and "Keras" in int8.reason  # needs the Keras model
    assert report.winner in ("source", "xla")
    x = {k: v[:2] for k, v in bert_tiny.sample_inputs.items()}
    served = check_servable(tmp_path / "out" / "saved_model", inputs=x)["outputs"]["logits"]
    np.testing.assert_allclose(served, bert_tiny.model.predict(x, verbose=0), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Time: interleaved timing stops clearly slower candidates; distillation stops when it would not fit


def test_timing_stops_a_clearly_slower_runner_but_never_a_kept_one():
    from tfaccel.auto import time_interleaved

    # "close" does the same work as "fast": on a loaded machine a 10% difference in sleeps is within the noise
    # (a 1.0 vs 1.1 ms pair was once stopped), while 10x is not.
    runners = {"base": lambda x: time.sleep(0.03), "fast": lambda x: time.sleep(0.003),
               "slow": lambda x: time.sleep(0.03), "close": lambda x: time.sleep(0.003)}
    t = time_interleaved(runners, {"x": np.zeros((1, 4))}, runs=12, warmup=1, stop_slower=1.2, min_runs=5,
                         keep={"base"})
    assert set(t.stopped) == {"slow"}
    assert re.search(r"clearly slower than (fast|close) ", t.stopped["slow"]), t.stopped["slow"]  # they tie
    assert t.measurements["slow"].runs == 5  # stopped as soon as every runner had 5 timed calls
    assert t.measurements["base"].runs == 12 and t.measurements["close"].runs == 12  # kept / not clearly slower
    assert t.measurements["slow"].p50_ms > 5 * t.measurements["fast"].p50_ms
    assert not time_interleaved(runners, {"x": np.zeros((1, 4))}, runs=6, warmup=1).stopped  # off by default


def test_distillation_stops_when_its_measured_steps_would_not_fit(bert_tiny):
    from tfaccel.core.source import token_sample_inputs
    from tfaccel.pruning import distill
    from tfaccel.pruning.distillation import DistillationOverBudget
    from tfaccel.pruning.structured_pruning import prune_feedforward

    small, _ = prune_feedforward(bert_tiny.model, 0.5, method="weight")
    x = token_sample_inputs(bert_tiny.input_specs, bert_tiny.vocab_size, batch=64, seq=16, seed=2)
    before = [w.copy() for w in small.get_weights()]
    with pytest.raises(DistillationOverBudget, match="no time left for distillation"):
        distill(bert_tiny.model, small, x, epochs=2, batch_size=16, max_seconds=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, small.get_weights(), strict=True))  # not started
    with pytest.raises(DistillationOverBudget, match=r"distillation would take about \d+s \(8 steps at") as err:
        distill(bert_tiny.model, small, x, epochs=2, batch_size=16, max_seconds=0.001)
    assert err.value.projected_s > err.value.max_seconds == 0.001
    assert "measured over 3 steps" in str(err.value)  # it stopped at the first projection, not at the end
    assert any(not np.array_equal(a, b) for a, b in zip(before, small.get_weights(), strict=True))  # 3 real steps ran


def test_a_step_not_built_yet_counts_as_the_longest_step_so_far():
    from tfaccel.auto.budget import TimeBudget
    from tfaccel.pruning import StructuredPruneStep
    from tfaccel.steps import get_step

    # 400 s budget, 200 s gone: 40 s are kept for timing, so 160 s of building are left. Measured so far:
    # export 5 s, onnx 100 s, and a distillation that ran 300 s because its deadline let it.
    seconds = {"export": 5.0, "onnx": 100.0, "prune-structured": 300.0}
    budget = TimeBudget(400, time.perf_counter() - 200, seconds)
    prune, litert = StructuredPruneStep(), get_step("litert-dynamic")
    ov, ov_int8 = get_step("openvino"), get_step("ov-int8")
    assert "needs about 300s to build and validate (its steps' times measured earlier in this run), " \
        in budget.not_tried_reason([prune])  # its own time; too long for the 160 s left
    assert budget.unmeasured_step_s() == 100.0  # onnx; not the distillation, which stops at its deadline
    assert budget.not_tried_reason([litert]) == ""  # about 100 s of 160 s: tried
    why = budget.not_tried_reason([ov, ov_int8])  # about 200 s: not tried, and the reason says how it was counted
    assert re.search(r"needs about 200s .*openvino, ov-int8 not built yet, counted as long as the longest step "
                     r"so far \(100s\)\), 1[56]\ds of building time were left", why), why
    seconds["litert-dynamic"] = 20.0  # once built, its own time counts
    assert budget.not_tried_reason([litert, ov]) == ""  # 20 + 100
    # the deadline of a distillation leaves the guessed time of the steps after it
    at = budget.deadline_for([prune, ov, ov_int8])
    assert at(0) == pytest.approx(budget.build_deadline - 200.0)
    assert at(2) == pytest.approx(budget.build_deadline)
    assert TimeBudget(None, time.perf_counter(), seconds).not_tried_reason([ov, ov_int8]) == ""  # no budget


def test_the_time_kept_for_timing_grows_with_the_candidates_and_the_length_of_a_call():
    from tfaccel.auto.budget import TimeBudget
    from tfaccel.steps import get_step

    budget = TimeBudget(540, time.perf_counter(), {"export": 5.0}, n_shapes=2, warmup=3)
    assert budget.timing_reserve() == pytest.approx(108.0)  # the least: 54 s a shape before any call is measured
    # short calls (minilm-bbc: 25 ms and 0.3 s): 3 warm-up calls and half a second of timed calls each; the least
    budget.record_call_seconds([0.025, 0.3])
    for _ in range(10):
        budget.record_validation(1.0)
    assert budget.timing_reserve() == pytest.approx(108.0)  # 11 candidates x 3.0 s
    # long calls (bert-base's model.export: 0.17 s at 1x128, 4 s at 32x128): two warm-up calls at 32x128 (the
    # timer stops a warm-up after a call of a second), three timed calls each
    budget.record_call_seconds([0.17, 4.0])
    per_candidate = (3 * 0.17 + 0.51) + (2 * 4.0 + 3 * 4.0)
    assert budget.timing_reserve() == pytest.approx(11 * per_candidate)  # 10 validated and the next one: 231 s
    assert budget.build_deadline == pytest.approx(budget.start + 540 - 11 * per_candidate)
    budget.start -= 320  # 320 s gone: 540 - 231 s left no building time
    why = budget.not_tried_reason([get_step("export")])
    assert re.search(r"building stopped after 32\ds \(the last 231s are kept for timing 11 candidates: warm-up and "
                     r"at least 3 calls each at every shape, 4.0s per call at the slowest as the baseline\)", why), why
    # the final timing: 209 s left for 10 candidates at 32x128; their warm-up calls (2 x 4 s each) come out first
    budget.start = time.perf_counter() - (540 - 209)
    assert budget.seconds_per_timing(10, 1, cap=30.0) == pytest.approx(0.7 * (209 - 10 * 8.0) / 10, abs=0.05)
    assert TimeBudget(540, budget.start, {}).seconds_per_timing(10, 1, cap=30.0) == pytest.approx(
        0.7 * 209 / 10, abs=0.05)  # no call measured: 70% of what is left
    assert TimeBudget(None, time.perf_counter(), {}).build_deadline is None  # no budget, no deadline


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_auto_progress_table_and_time_budget(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("optimize", "bert-tiny", "--auto", "--shape", "1x16", "--runs", "3", "--warmup", "1",
                   "--time-budget", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| rank | candidate |" in proc.stdout and "`export` **(winner)**" in proc.stdout
    assert "[1/" in proc.stderr and "time budget of 0s: building stopped" in proc.stderr  # progress lines
    data = json.loads((out / "report.json").read_text())
    assert data["winner"] == "export" and (out / "saved_model" / "saved_model.pb").exists()
    not_tried = [c for c in data["candidates"] if c["status"] == "not tried"]
    assert {"xla", "int8-xla"} <= {c["name"] for c in not_tried}  # the baseline is always built; then the budget
    assert all("time budget" in c["reason"] for c in not_tried)


@pytest.mark.parametrize("args,message", [
    (["--auto", "--steps", "export"], "--auto and --steps are mutually exclusive"),
    (["--auto", "--max-accuracy-drop", "-1"], "--max-accuracy-drop must be a number >= 0"),
    (["--steps", "export", "--max-accuracy-drop", "2"], "--max-accuracy-drop applies only with --auto"),
    ([], "--steps STEP,STEP"),
])
def test_cli_auto_errors_exit_2(tmp_path, args, message):
    proc = run_cli("optimize", "bert-tiny", *args, "--out", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_optimize_runs_given_steps_or_searches_never_both(bert_tiny, tmp_path):
    import tfaccel
    from tfaccel.errors import PlanError

    with pytest.raises(PlanError, match="not both"):
        tfaccel.optimize(bert_tiny, tmp_path / "x", auto=True, steps=["export"])
    with pytest.raises(PlanError, match="max_accuracy_drop is in accuracy points"):
        tfaccel.optimize(bert_tiny, tmp_path / "x", max_accuracy_drop=-1)
    report = tfaccel.optimize(bert_tiny, tmp_path / "steps", steps=["export"], measure=False)
    assert [s.step for s in report.stages] == ["reference", "export"]
    assert list(tmp_path.iterdir()) == [tmp_path / "steps"]  # the refused calls wrote nothing
