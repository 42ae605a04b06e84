"""The core floor on its own: the one timer, the chain builder, the reference check, the artifact-kind
registry. No model is built here: steps are small user-defined Step subclasses (what the Step contract
allows anyone to write), so these tests run in seconds."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tfaccel.core.artifact import Artifact, kind_name, kinds, register_kind
from tfaccel.core.chain import ChainBuilder, step_key
from tfaccel.core.source import InputSpec, ModelSource
from tfaccel.core.step import Step
from tfaccel.core.timer import interleave, time_against_baseline, time_interleaved
from tfaccel.core.validation import Reference
from tfaccel.errors import OverBudget, PlanError, StepError


def _source(**fields) -> ModelSource:
    spec = InputSpec("x", "float32", (None, 4))
    x = np.random.default_rng(0).standard_normal((2, 4)).astype("float32")
    return ModelSource(name="toy", kind="keras", input_specs=[spec], sample_inputs={"x": x}, model=None, **fields)


class Scale(Step):
    """Multiplies the toy model's factor (a user-defined step on the 'keras' kind)."""

    name = "scale"
    calls = 0

    def __init__(self, factor: float = 2.0, fail: Exception | None = None, **kw):
        super().__init__(**kw)
        self.factor, self.fail = factor, fail

    def params(self):
        return {"factor": self.factor}

    def apply(self, artifact, ctx):
        type(self).calls += 1
        (ctx.stage_dir / "built").write_text(str(self.factor))
        ctx.note(f"scaled by {self.factor}")
        if self.fail is not None:
            raise self.fail
        return Artifact(kind="keras", model=(artifact.model or 1.0) * self.factor)


# ---------------------------------------------------------------------------------------------------
# The timer


def test_interleave_rotates_blocks_and_settles_when_switching():
    order: list[str] = []
    calls = {n: (lambda n=n: order.append(n) or time.sleep(0.002)) for n in ("a", "b")}
    t = interleave(calls, runs=10, warmup=1, max_seconds=None, block_seconds=1.0)
    assert t.measurements["a"].runs == t.measurements["b"].runs == 10
    assert not t.errors and not t.stopped
    # After one warm-up call each: blocks of 5 timed calls (1 s of 2 ms calls, capped at 5), the order
    # rotating each round, and one untimed settle call before a block when the other contender ran last.
    assert order == ["a", "b"] + ["a"] * 6 + ["b"] * 6 + ["b"] * 5 + ["a"] * 6


def test_interleave_budget_is_seconds_of_timed_calls_with_three_calls_at_least():
    t = interleave({"slow": lambda: time.sleep(0.05)}, runs=50, warmup=0, max_seconds=0.01)
    assert t.measurements["slow"].runs == 3  # 3 calls already exceed 0.01 s, but a median needs 3
    t = interleave({"slow": lambda: time.sleep(0.01)}, runs=50, warmup=0, max_seconds=0.1)
    spent = t.times_ms["slow"]
    assert sum(spent) >= 100 and sum(spent[:-1]) < 100  # stopped by the first call that crossed the budget


def test_warm_up_stops_after_a_call_as_long_as_a_block_and_runs_in_full_for_short_calls():
    counts = {"long": 0, "short": 0}

    def long():
        counts["long"] += 1
        time.sleep(0.03)

    def short():
        counts["short"] += 1

    # block_seconds 0.02: a 0.03 s call is past its warm-up after the first call and one more
    interleave({"long": long, "short": short}, runs=3, warmup=4, max_seconds=None, block_seconds=0.02,
               settle_below_s=0)
    assert counts["short"] == 4 + 3  # every warm-up call, then the timed ones
    assert counts["long"] == 2 + 3


def test_a_failing_contender_is_dropped_the_others_go_on():
    def broken():
        raise RuntimeError("no kernel for this\nsecond line")

    t = interleave({"ok": lambda: None, "broken": broken}, runs=4, warmup=1)
    assert t.errors == {"broken": "RuntimeError: no kernel for this"}
    assert t.measurements["ok"].runs == 4 and "broken" not in t.measurements
    with pytest.raises(RuntimeError, match="no kernel"):
        interleave({"broken": broken}, runs=3, warmup=1, raise_errors=True)


def test_speedups_against_a_baseline_and_failures_leave_later_shapes():
    seen = []

    def fast(x):
        seen.append(x["x"].shape)
        if x["x"].shape[0] == 2:
            raise ValueError("batch 2 unsupported")

    runners = {"base": lambda x: time.sleep(0.004), "fast": fast}
    out = time_against_baseline(runners, lambda b, s: {"x": np.zeros((b, s))}, [(2, 3), (1, 3)], "base",
                                runs=3, warmup=1)
    assert [(st.batch, st.seq) for st in out] == [(2, 3), (1, 3)]
    assert "fast" in out[0].timing.errors and "fast" not in runners
    assert out[1].speedups["base"] == pytest.approx(1.0)
    assert (1, 3) not in seen  # not timed at the later shape once it failed


def test_time_interleaved_reads_the_batch_from_the_inputs():
    t = time_interleaved({"r": lambda x: None}, {"x": np.zeros((7, 2))}, seq=2, runs=3, warmup=1)
    assert t.measurements["r"].batch == 7 and t.measurements["r"].seq == 2


# ---------------------------------------------------------------------------------------------------
# The chain builder


def test_chains_share_built_prefixes_and_keep_the_cumulative_time_and_notes(tmp_path):
    Scale.calls = 0
    b = ChainBuilder(_source(), tmp_path, log=lambda m: None)
    two = b.build("two", [Scale(2.0), Scale(3.0)])
    assert two.artifact.model == 6.0 and Scale.calls == 2
    other = b.build("other", [Scale(2.0), Scale(5.0)])  # the first step is shared
    assert other.artifact.model == 10.0 and Scale.calls == 3
    assert other.notes == ["scale: scaled by 2.0", "scale: scaled by 5.0"]
    assert not (tmp_path / "other" / "01-scale").exists()  # built once, in the first chain's folder
    again = b.build("again", [Scale(2.0), Scale(3.0)])
    assert again.artifact is two.artifact and again.seconds == pytest.approx(two.seconds) and Scale.calls == 3
    assert b.unbuilt([Scale(2.0), Scale(7.0)])[0].factor == 7.0
    assert step_key(Scale(2.0)) != step_key(Scale(3.0))


def test_a_failed_prefix_fails_later_chains_at_once_with_its_reason(tmp_path):
    b = ChainBuilder(_source(), tmp_path, log=lambda m: None)
    with pytest.raises(StepError, match="Step 'scale' failed: ZeroDivisionError: bad factor"):
        b.build("x", [Scale(0.0, fail=ZeroDivisionError("bad factor"))])
    assert not (tmp_path / "x" / "01-scale").exists()  # the failed stage's folder is removed
    Scale.calls = 0
    with pytest.raises(StepError, match="failed earlier in this run: StepError: Step 'scale' failed"):
        b.build("y", [Scale(0.0, fail=ZeroDivisionError("bad factor")), Scale(2.0)])
    assert Scale.calls == 0
    # a step over its deadline stays an OverBudget for the next chain that needs it
    with pytest.raises(OverBudget):
        b.build("z", [Scale(9.0, fail=OverBudget("would take 100 s, 10 s left"))])
    with pytest.raises(OverBudget, match="would take 100 s"):
        b.build("w", [Scale(9.0, fail=OverBudget("would take 100 s, 10 s left")), Scale(2.0)])


def test_a_bound_set_in_apply_holds_for_that_stage_only_and_a_given_tolerance_stays(tmp_path):
    from tfaccel.core.chain import run_step
    from tfaccel.core.validation import Tolerance

    loose = Tolerance(max_abs_diff=None, min_cosine=0.9)

    class Bounded(Scale):  # bounds itself by `loose` when its input says so (as xla does for half precision)
        def apply(self, artifact, ctx):
            if artifact.info.get("half"):
                self.bound_by(loose)
            return super().apply(artifact, ctx)

    step = Bounded()
    run_step(step, Artifact(kind="keras", model=1.0, info={"half": True}), _source(), tmp_path / "a", log=print)
    assert step.tolerance is loose
    run_step(step, Artifact(kind="keras", model=1.0), _source(), tmp_path / "b", log=print)
    assert step.tolerance is Bounded.default_tolerance  # the same step on another input: its own bound again
    mine = Tolerance(max_abs_diff=1e-3)
    given = Bounded(tolerance=mine)
    run_step(given, Artifact(kind="keras", model=1.0, info={"half": True}), _source(), tmp_path / "c", log=print)
    assert given.tolerance is mine


def test_a_step_given_the_wrong_kind_is_a_plan_error(tmp_path):
    class TakesOnnx(Scale):
        name = "takes-onnx"
        consumes = "onnx"

    with pytest.raises(PlanError, match="needs an? ONNX model, the step before it gives an? Keras model|needs ONNX"):
        ChainBuilder(_source(), tmp_path, log=lambda m: None).build("x", [TakesOnnx()])


# ---------------------------------------------------------------------------------------------------
# The reference and the kind registry


def test_reference_checks_outputs_and_accuracy_once_computed():
    src = _source(task="classification", eval_inputs={"x": np.eye(4, dtype="float32")}, eval_labels=np.arange(4))
    ref = Reference.of(lambda x: {"logits": x["x"]}, src)
    assert ref.labelled and ref.accuracy == 1.0
    comp = ref.check(lambda x: {"logits": x["x"][:, ::-1]})
    assert comp.accuracy == 0.0 and comp.reference_accuracy == 1.0 and comp.min_cosine < 1.0
    assert Reference.of(lambda x: {"logits": x["x"]}, src, accuracy=False).accuracy is None


def test_every_technique_registers_its_artifact_kinds():
    import tfaccel  # noqa: F401  (imports the registry, which imports every technique)

    assert {"keras", "saved_model", "onnx", "tflite", "tensorrt", "onnx_decoder", "tensorrt_decoder"} <= set(kinds())
    assert kind_name("onnx") == "ONNX model" and kind_name("nope") == "nope"
    with pytest.raises(ValueError, match="No runner is registered for artifact kind 'nope'"):
        Artifact(kind="nope").runner()
    register_kind("toy-kind", "toy", lambda a: (lambda x: {"y": a.model}))
    assert Artifact(kind="toy-kind", model=3).runner()({}) == {"y": 3}
