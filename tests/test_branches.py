"""Branches in plain pipelines: STEP@FROM, the float-SavedModel default for conversions, the report tree."""

import json
import re

import numpy as np
import pytest
from conftest import run_cli
from test_pipeline import FAST, ScaleHeadStep

from tfaccel import Pipeline, PlanError
from tfaccel.core.artifact import KerasRunner


@pytest.mark.parametrize("steps,message", [
    (["export", "litert-dynamic@nosuch"],
     r"Step 2 'litert-dynamic@nosuch' starts from 'nosuch', but there is no step 'nosuch' in the list. FROM must "
     r"name an earlier step or 'reference'; before step 2 there are: reference \(Keras model\), export \(SavedModel\)"),
    (["litert-dynamic@export", "export"], r"Step 1 'litert-dynamic@export' starts from 'export', but 'export' is "
                                          r"step 2, after it"),
    (["export", "onnx", "ort-int8@export"],
     r"Step 3 'ort-int8@export' starts from 'export' \(step 1\), which gives a SavedModel; 'ort-int8' needs an ONNX "
     r"model. Stages before it that give one: onnx \(step 2\)"),
    (["export", "int8@export"], r"'int8' needs a Keras model. Stages before it that give one: reference\."),
    (["export", "onnx@"], r"Bad step 'onnx@': write STEP or STEP@FROM"),
])
def test_bad_from_is_a_plan_error_before_any_work(bert_tiny, tmp_path, steps, message):
    with pytest.raises(PlanError, match=message):
        Pipeline(steps, **FAST).run(bert_tiny, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_from_a_skipped_stage_is_skipped_and_plain_steps_fall_back(bert_tiny, tmp_path):
    steps = [ScaleHeadStep(on_breach="skip"), "export@scale-head", "export@reference", "export"]
    report = Pipeline(steps, **{**FAST, "measure": False}).run(bert_tiny, tmp_path / "out")
    assert [(s.step, s.status, s.parent) for s in report.stages] == [
        ("reference", "ok", None), ("scale-head", "skipped", 0), ("export", "skipped", 1), ("export", "ok", 0),
        ("export", "ok", 0)]
    assert report.stages[2].notes == ["not run: its input (Keras model) was skipped"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## Stage tree" in md and "  - 1 scale-head (keras, skipped)\n    - 2 export (saved_model, skipped)" in md


def test_cli_branch_run_with_eval_data_converts_the_float_saved_model(bert_tiny, tmp_path):
    x = bert_tiny.make_inputs(16, 16, seed=2)
    np.savez(tmp_path / "eval.npz", labels=np.argmax(KerasRunner(bert_tiny.model)(x)["logits"], -1), **x)
    out = tmp_path / "out"
    # The run: before branches, litert-dynamic took the int8 SavedModel and the whole run failed
    # (the LiteRT converter rejects its int8 matmuls). The last, plain litert-dynamic shows the default rule.
    proc = run_cli("optimize", "bert-tiny", "--steps", "export,onnx,ort-int8,int8,litert-dynamic@export,litert-dynamic",
                   "--eval-data", str(tmp_path / "eval.npz"), "--no-measure", "--on-breach", "warn", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert [(s["step"], s["kind"], s["parent"]) for s in stages] == [
        ("reference", "keras", None), ("export", "saved_model", 0), ("onnx", "onnx", 1), ("ort-int8", "onnx", 2),
        ("int8", "saved_model", 0), ("litert-dynamic", "tflite", 1), ("litert-dynamic", "tflite", 1)]
    assert stages[0]["accuracy"] == 1.0 and all(s["accuracy"] is not None for s in stages)  # on the user's data
    assert all(s["cosine_similarity"] > 0.99 for s in stages[1:])
    assert (out / "stages" / "05-litert-dynamic" / "model.tflite").exists()
    assert "[5/6] litert-dynamic@export" in proc.stderr and "starts from stage 1 (export)" in proc.stderr
    md = (out / "report.md").read_text()
    tree = re.sub(r", breach\)", ")", md.split("## Stage tree")[1])  # quantized stages may flag an accuracy breach
    assert ("- 0 reference (keras)\n  - 1 export (saved_model)\n    - 2 onnx (onnx)\n      - 3 ort-int8 (onnx)\n"
            "    - 5 litert-dynamic (tflite)\n    - 6 litert-dynamic (tflite)\n  - 4 int8 (saved_model)\n") in tree


def test_set_step_option_reaches_the_same_step_written_with_from(tmp_path):
    proc = run_cli("optimize", "bert-tiny", "--steps", "export,onnx@export", "--set", "onnx.opset=99",
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "opset must be an int from 13 to 21. Received: opset=99" in proc.stderr
