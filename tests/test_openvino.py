"""OpenVINO: the openvino and ov-int8 steps on bert-tiny (outputs close to Keras at several shapes, int8 really
int8, the IR serving with OpenVINO alone), the precision and weight-range decisions on both CPU branches, plan
errors (quantized SavedModels, bf16 without bf16, accuracy control without labels, the missing extra), the
recipes in --auto. The accuracy of ov-int8 on minilm-bbc (large) is checked in test_minilm_bbc.py, from the
export that file's shared run makes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import run_cli

from tfaccel import Pipeline, get_step
from tfaccel.compat import override_capabilities
from tfaccel.core.artifact import KerasRunner
from tfaccel.errors import MissingDependencyError, PlanError

pytest.importorskip("openvino")
pytest.importorskip("nncf")

BF16_CPU = {"avx2": True, "avx512": True, "vnni": True, "bf16": True, "fp16": False, "amx": False}


def _cosine(a, b):
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.fixture(scope="module")
def ov_run(bert_tiny, tmp_path_factory):
    """export -> openvino (f32) -> ov-int8, and openvino at the CPU's own precision, once per module."""
    out = tmp_path_factory.mktemp("ov") / "out"
    steps = [get_step("export"), get_step("openvino", inference_precision="f32"), get_step("ov-int8", samples=8),
             get_step("openvino")]
    steps[3].start_from = "export"
    report = Pipeline(steps, shapes=[(1, 16)], runs=3, warmup=1, footprints=False).run(bert_tiny, out)
    return report, out


def _stage(report, out, index):
    return out / report.stages[index].path / "openvino"


def test_openvino_ir_matches_keras_at_several_shapes(bert_tiny, ov_run):
    from tfaccel.openvino import OpenVINORunner

    report, out = ov_run
    runner = OpenVINORunner(_stage(report, out, 2))
    assert runner.stats()["inference_precision"] == "f32" and runner.stats()["threads"] >= 1
    for batch, seq in [(1, 7), (5, 33)]:  # dynamic batch and sequence, as the SavedModel signature
        x = bert_tiny.make_inputs(batch, seq, seed=1)
        got, want = runner(x), KerasRunner(bert_tiny.model)(x)
        assert set(got) == {"logits"}
        np.testing.assert_allclose(got["logits"], want["logits"], atol=2e-3)  # fp16-stored weights
    assert report.stages[2].params["inference_precision"] == "f32"
    assert report.stages[2].runner_stats["inference_precision"] == "f32"


def test_ov_int8_is_int8_and_close(bert_tiny, ov_run):
    import openvino as ov

    from tfaccel.openvino import OpenVINORunner

    report, out = ov_run
    stage = report.stages[3]
    assert stage.status == "ok" and stage.comparison["min_cosine"] > 0.98
    model = ov.Core().read_model(str(_stage(report, out, 3) / "model.xml"))
    assert sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) >= 8  # matmul inputs quantized
    meta = json.loads((_stage(report, out, 3) / "tfaccel_openvino.json").read_text())
    assert meta["quantization"]["tool"] == "nncf" and meta["quantization"]["samples"] == 8
    x = bert_tiny.make_inputs(3, 20, seed=2)
    got, want = OpenVINORunner(_stage(report, out, 3))(x), KerasRunner(bert_tiny.model)(x)
    assert _cosine(got["logits"], want["logits"]).min() > 0.98
    assert any("calibration on" in n for n in stage.notes)


def test_report_states_the_precision_the_plugin_uses(ov_run):
    from tfaccel.compat import capabilities

    report, _ = ov_run
    auto = report.stages[4]
    want = capabilities().openvino_precision("auto")[0]
    assert auto.params["inference_precision"] == want == auto.runner_stats["inference_precision"]
    assert any(f"inference precision {want}" in n for n in auto.notes)


def test_ir_serves_with_openvino_alone_in_a_fresh_process(bert_tiny, ov_run):
    from tfaccel.openvino import check_openvino_servable

    report, out = ov_run
    x = {k: v[:2] for k, v in bert_tiny.sample_inputs.items()}
    served = check_openvino_servable(_stage(report, out, 3), inputs=x)["outputs"]["logits"]
    assert _cosine(served, KerasRunner(bert_tiny.model)(x)["logits"]).min() > 0.98
    r = run_cli("serve-check", str(_stage(report, out, 2)))
    assert r.returncode == 0 and "OpenVINO alone" in r.stdout, r.stderr


def test_throughput_hint_splits_the_batch_and_gives_the_same_outputs(bert_tiny, ov_run):
    from tfaccel.openvino import OpenVINORunner

    report, out = ov_run
    x = bert_tiny.make_inputs(6, 16, seed=3)
    latency = OpenVINORunner(_stage(report, out, 2), hint="latency")(x)["logits"]
    for hint in ("throughput", "auto"):  # auto: split across the streams from a batch of their count on
        runner = OpenVINORunner(_stage(report, out, 2), hint=hint)
        np.testing.assert_allclose(runner(x)["logits"], latency, atol=1e-5)
        np.testing.assert_allclose(runner({k: v[:1] for k, v in x.items()})["logits"], latency[:1], atol=1e-5)
        assert runner.stats()["performance_hint"] == hint and runner.stats()["infer_requests"] >= 1


def test_a_new_shape_reaches_every_request_of_the_pool_one_at_a_time_before_they_run_together(bert_tiny, ov_run):
    """The throughput pool's requests first run a new chunk shape one by one (OpenVINORunner._specialise), each
    of them: concurrent first inferences at a new shape have given wrong rows and hangs."""
    from tfaccel.openvino import OpenVINORunner

    report, out = ov_run
    runner = OpenVINORunner(_stage(report, out, 2), hint="throughput")
    part = {k: np.ascontiguousarray(v[:3].astype(np.int32)) for k, v in bert_tiny.make_inputs(3, 12, seed=5).items()}
    runner._specialise([part])
    assert runner.requests >= 1 and len(runner._specialised) == 1
    for j in range(runner.requests):  # FIFO: each request ran the new shape once
        assert tuple(runner._queue[j].get_tensor("token_ids").shape) == (3, 12), j
    x = bert_tiny.make_inputs(5, 12, seed=6)  # e.g. chunks of 3 and 2 on two requests: one shape more
    latency = OpenVINORunner(_stage(report, out, 2), hint="latency")(x)["logits"]
    np.testing.assert_allclose(runner(x)["logits"], latency, atol=1e-5)
    # the pool size follows the CPU's cores (OpenVINO's streams), so the chunk sizes are derived, not assumed
    sizes = {len(c) for c in np.array_split(np.arange(5), min(runner.requests, 5))}
    assert len(runner._specialised) == 1 + len(sizes - {3}), (runner.requests, sizes)


# ---------------------------------------------------------------------------------------------------
# Hardware decisions: both branches


def test_precision_and_weight_range_follow_the_cpu():
    with override_capabilities(cpu_isa="avx2") as caps:
        assert caps.openvino_precision("auto")[0] == "f32"
        assert caps.openvino_int8_settings()["overflow_fix"] == "enable"  # no VNNI: 7-bit weights
        with pytest.raises(ValueError, match="bfloat16 instructions"):
            caps.openvino_precision("bf16")
        with pytest.raises(PlanError, match="bf16"):
            get_step("openvino", inference_precision="bf16").check(_FakeSource())
    with override_capabilities(cpu_features=BF16_CPU, gpus=()) as caps:
        assert caps.openvino_precision("auto")[0] == "bf16"
        assert caps.openvino_precision("f32") == ("f32", "set by the user")
        assert caps.openvino_int8_settings()["overflow_fix"] == "disable"


def test_recipes_on_both_cpu_branches():
    from tfaccel.auto import plan_candidates

    with override_capabilities(cpu_isa="avx2", gpus=(), gpu_compute_capability=()) as caps:
        avx2 = {c.recipe.name: c for c in plan_candidates(caps, formats="all", finetune_data=True)}
        step = avx2["ov-int8"].recipe.make_steps()[-1]
        assert step.params()["overflow_fix"] == "enable" and step.params()["inference_precision"] == "f32"
    with override_capabilities(cpu_features=BF16_CPU, gpus=(), gpu_compute_capability=()) as caps:
        bf16 = {c.recipe.name: c for c in plan_candidates(caps, formats="all", finetune_data=True)}
        assert bf16["openvino"].recipe.make_steps()[-1].params()["inference_precision"] == "bf16"
    assert all(avx2[n].runnable for n in ("openvino", "ov-int8", "prune-structured+ov-int8"))
    assert all(bf16[n].runnable for n in ("openvino", "ov-int8", "prune-structured+ov-int8"))
    with override_capabilities(openvino=None) as caps:
        plan = {c.recipe.name: c for c in plan_candidates(caps, formats="all")}
        assert not plan["ov-int8"].runnable and "tfaccel[openvino]" in plan["ov-int8"].reason
    with override_capabilities() as caps:  # SavedModel-only runs never try them
        plan = {c.recipe.name: c for c in plan_candidates(caps, formats="savedmodel")}
        assert not plan["openvino"].runnable and "--formats all" in plan["openvino"].reason


# ---------------------------------------------------------------------------------------------------
# Plan errors


@dataclasses.dataclass
class _FakeSource:
    kind: str = "keras"
    path: str | None = None
    eval_labels: object = None
    task: str = "classification"


def test_quantized_saved_models_are_refused_at_plan_time(bert_tiny, tmp_path):
    for steps in (["int8", "openvino"], ["export", "int8", "openvino@int8"]):
        with pytest.raises(PlanError, match="quantized.*ov-int8"):
            Pipeline(steps, shapes=[(1, 16)]).plan(bert_tiny)
    Pipeline(["export", "int8", "openvino"], shapes=[(1, 16)]).plan(bert_tiny)  # starts from the float export
    # a quantized SavedModel given as the source
    from tfaccel import load_source

    # any int8 SavedModel will do: one form, not compiled (kernel="auto" would build and time every form)
    int8 = get_step("int8", kernel="keras", jit_compile=False)
    Pipeline([int8], shapes=[(1, 16)], measure=False, footprints=False).run(bert_tiny, tmp_path / "q")
    source = load_source(str(tmp_path / "q" / "saved_model"))
    with pytest.raises(PlanError, match="int8 weights"):
        Pipeline(["openvino"], shapes=[(1, 16)]).plan(source)


def test_accuracy_control_needs_labels_and_the_extra_is_named(bert_tiny, monkeypatch):
    with pytest.raises(PlanError, match="labelled eval data"):
        get_step("ov-int8", accuracy_control=True).check(_FakeSource())
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"tfaccel\[openvino\]"):
        Pipeline(["export", "openvino", "ov-int8"], shapes=[(1, 16)]).plan(bert_tiny)
    with pytest.raises(ValueError, match="inference_precision"):
        get_step("openvino", inference_precision="fp8")
    with pytest.raises(ValueError, match="performance_hint"):
        get_step("openvino", performance_hint="fast")


def test_accuracy_controlled_int8_keeps_the_budget(bert_tiny, tmp_path):
    """Labels from the model itself, on the examples whose top logit leads by a clear margin (random bert-tiny's
    logits are near ties elsewhere): the reference is 100% right there, and a 5-point budget."""
    from tfaccel.core.validation import Tolerance
    from tfaccel.sources import token_sample_inputs

    x = token_sample_inputs(bert_tiny.input_specs, bert_tiny.vocab_size, batch=200, seq=16, seed=4)
    logits = KerasRunner(bert_tiny.model)(x)["logits"]
    top2 = np.sort(logits, -1)[:, -2:]
    clear = np.argsort(top2[:, 1] - top2[:, 0])[-40:]
    labelled = dataclasses.replace(bert_tiny, eval_inputs={k: v[clear] for k, v in x.items()},
                                   eval_labels=np.argmax(logits[clear], -1))
    budget = Tolerance(max_abs_diff=None, min_cosine=0.9, max_accuracy_drop=0.05)
    steps = [get_step("export"), get_step("openvino", inference_precision="f32"),
             get_step("ov-int8", samples=16, accuracy_control=True, inference_precision="f32", tolerance=budget)]
    report = Pipeline(steps, shapes=[(1, 16)], measure=False, footprints=False).run(labelled, tmp_path / "ac")
    stage = report.stages[3]
    assert report.stages[0].accuracy == 1.0
    assert stage.status == "ok" and stage.accuracy >= 0.95 and stage.params["accuracy_control"] is True
    assert any("accuracy control: budget 5 points" in n for n in stage.notes)
    x2 = bert_tiny.make_inputs(2, 24, seed=5)  # the IR kept its dynamic shapes (the search ran on a static copy)
    from tfaccel.openvino import OpenVINORunner

    assert OpenVINORunner(tmp_path / "ac" / stage.path / "openvino")(x2)["logits"].shape == (2, 3)


def test_auto_formats_all_builds_validates_and_times_the_openvino_candidates(bert_tiny, tmp_path):
    from tfaccel.auto import optimize_auto
    from tfaccel.openvino import OpenVINORunner

    out = tmp_path / "auto"
    report = optimize_auto(bert_tiny, out, recipes=["openvino", "ov-int8"], formats="all", shapes=[(1, 16), (4, 16)],
                           runs=3, warmup=1)
    for name in ("openvino", "ov-int8"):
        c = report.candidate(name)
        assert c.status == "kept" and c.kind == "openvino" and c.format == "openvino", (name, c.status, c.reason)
        assert set(c.speedups) == {"1x16", "4x16"} and c.min_cosine > 0.98
    assert report.candidate("ov-int8").steps == ["export", "openvino", "ov-int8"]
    if report.fastest_artifact != report.winner:  # an IR was fastest: copied beside the SavedModel, and it runs
        assert report.fastest_artifact_path.startswith("fastest")
        got = OpenVINORunner(out / report.fastest_artifact_path)(bert_tiny.sample_inputs)["logits"]
        assert _cosine(got, KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"]).min() > 0.98
