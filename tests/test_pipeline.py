import json

import numpy as np
import pytest

from tfaccel import Pipeline, PlanError, Step, TfaccelError, Tolerance, ValidationError, get_step
from tfaccel.core.artifact import Artifact


class ScaleHeadStep(Step):
    """A real Keras->Keras transform used to test breach handling: scales the classifier head's
    kernel, so logits drift from the reference by a known amount."""

    name = "scale-head"
    consumes = produces = "keras"
    default_tolerance = Tolerance(max_abs_diff=1e-6, min_cosine=0.99999)

    def __init__(self, factor=1.5, **kw):
        super().__init__(**kw)
        self.factor = factor

    def params(self):
        return {"factor": self.factor}

    def apply(self, artifact, ctx):
        import keras

        model = keras.models.clone_model(artifact.model)
        model.set_weights(artifact.model.get_weights())
        head = model.get_layer("logits")
        head.kernel.assign(head.kernel * self.factor)
        model.save(ctx.stage_dir / "model.keras")
        ctx.note(f"head kernel scaled by {self.factor}")
        return Artifact(kind="keras", path=str(ctx.stage_dir / "model.keras"), model=model)


FAST = {"shapes": [(1, 16)], "runs": 3, "warmup": 1, "log": lambda m: None, "footprints": False}


def test_export_pipeline_writes_report_stages_and_final_saved_model(bert_tiny, tmp_path):
    report = Pipeline(["export"], shapes=[(1, 16), (2, 24)], runs=3, warmup=1, log=lambda m: None).run(
        bert_tiny, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "stages" / "01-export" / "saved_model.pb").exists()
    assert (out / "saved_model" / "saved_model.pb").exists()
    data = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in data["stages"]] == ["reference", "export"]
    export = data["stages"][1]
    for key in ("latency_p50_ms", "latency_p95_ms", "size_bytes", "max_abs_diff", "cosine_similarity"):
        assert export[key] is not None, key
    assert export["latency_p95_ms"] >= export["latency_p50_ms"] > 0
    assert export["size_bytes"] > 0 and export["max_abs_diff"] < 1e-4 and export["cosine_similarity"] > 0.99999
    assert [(m["batch"], m["seq"]) for m in export["measurements"]] == [(1, 16), (2, 24)]
    md = (out / "report.md").read_text()
    assert "| 1 | export | saved_model |" in md and "speed-up (1x16)" in md
    assert report.final_saved_model_path == str(out / "saved_model")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left


def test_keras_only_plan_gets_an_export_appended(bert_tiny):
    steps = Pipeline([ScaleHeadStep(factor=1.0)], **FAST).plan(bert_tiny)
    assert [s.name for s in steps] == ["scale-head", "export"]


def test_unknown_step_and_wrong_order_fail_before_any_work(bert_tiny, tmp_path):
    with pytest.raises(PlanError, match="Unknown step 'quantize'. Available steps: export"):
        Pipeline(["quantize"])
    with pytest.raises(PlanError, match="Step 1 'onnx' needs a SavedModel.*add 'export' before it"):
        Pipeline(["onnx"], **FAST).run(bert_tiny, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(PlanError, match="Step 'onnx' has no option 'opsett'. Did you mean 'opset'.*Its options: opset"):
        get_step("onnx", opsett=17)


def test_breach_fails_by_default_and_leaves_nothing(bert_tiny, tmp_path):
    with pytest.raises(ValidationError, match=r"'scale-head' breached its tolerance \(against its input, the reference\): max abs diff .* --on-breach warn"):
        Pipeline([ScaleHeadStep()], **FAST).run(bert_tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_breach_warn_keeps_the_stage_flagged(bert_tiny, tmp_path):
    report = Pipeline([ScaleHeadStep()], on_breach="warn", **FAST).run(bert_tiny, tmp_path / "out")
    st = report.stage("scale-head")
    assert st.status == "breach" and st.breaches and st.measurements
    assert "head kernel scaled by 1.5" in st.notes
    # the export after it exports the scaled model: it matches the reference no better than the stage did
    assert report.stage("export").comparison["max_abs_diff"] == pytest.approx(st.comparison["max_abs_diff"], rel=1e-3)
    assert "breached its tolerance" in (tmp_path / "out" / "report.md").read_text()


def test_breach_skip_drops_the_stage_and_continues_from_the_previous_model(bert_tiny, tmp_path):
    report = Pipeline([ScaleHeadStep()], on_breach="skip", **FAST).run(bert_tiny, tmp_path / "out")
    assert report.stage("scale-head").status == "skipped"
    assert not (tmp_path / "out" / "stages" / "01-scale-head").exists()
    assert report.stage("export").comparison["max_abs_diff"] < 1e-4  # exported the unscaled model


def test_step_tolerance_overrides_policy(bert_tiny, tmp_path):
    loose = ScaleHeadStep(tolerance=Tolerance(max_abs_diff=None, min_cosine=0.9))
    report = Pipeline([loose], **FAST).run(bert_tiny, tmp_path / "out")
    assert report.stage("scale-head").status == "ok"


def test_existing_output_is_kept_on_failure_and_replaced_on_success(bert_tiny, tmp_path):
    out = tmp_path / "out"
    Pipeline(["export"], **FAST).run(bert_tiny, out)
    first = json.loads((out / "report.json").read_text())
    with pytest.raises(TfaccelError, match="already exists.*overwrite=True"):
        Pipeline(["export"], **FAST).run(bert_tiny, out)
    with pytest.raises(ValidationError):
        Pipeline([ScaleHeadStep()], **FAST).run(bert_tiny, out, overwrite=True)
    assert json.loads((out / "report.json").read_text()) == first  # the good output survived
    Pipeline([ScaleHeadStep(factor=1.0)], **FAST).run(bert_tiny, out, overwrite=True)
    steps = [s["step"] for s in json.loads((out / "report.json").read_text())["stages"]]
    assert steps == ["reference", "scale-head", "export"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_saved_model_source_runs_conversion_steps(bert_tiny_saved_model, tmp_path):
    from tfaccel import load_source

    src = load_source(str(bert_tiny_saved_model))  # export_saved_model(bert_tiny.model, ...)
    report = Pipeline(["onnx"], **FAST).run(src, tmp_path / "out")
    assert report.stage("onnx").comparison["max_abs_diff"] < 1e-4
    assert report.final_saved_model == str(bert_tiny_saved_model)  # conversion only: the source stays the SavedModel
    with pytest.raises(PlanError, match="needs a Keras model"):
        Pipeline([ScaleHeadStep()], **FAST).plan(src)


def test_gpt2_tiny_causal_lm_pipeline(gpt2_tiny, tmp_path):
    report = Pipeline(["export"], **FAST).run(gpt2_tiny, tmp_path / "out")
    st = report.stage("export")
    assert st.comparison["max_abs_diff"] < 1e-4
    assert np.isfinite(st.measurements[0]["p50_ms"])
