import json

import pytest
from conftest import run_cli


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """`tfaccel optimize bert-tiny --steps export,onnx,ort-int8`, once: its SavedModel and ONNX file are also
    what `tfaccel bench` measures below."""
    out = tmp_path_factory.mktemp("cli") / "out"
    proc = run_cli("optimize", "bert-tiny", "--steps", "export,onnx,ort-int8", "--out", str(out),
                   "--shape", "1x16", "--runs", "3")
    return out, proc


def test_optimize_export_end_to_end(optimized):
    out, proc = optimized
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 1 | export | saved_model |" in proc.stdout  # the report table is printed
    assert "[1/3] export" in proc.stderr  # progress
    report = json.loads((out / "report.json").read_text())
    assert [s["step"] for s in report["stages"]] == ["reference", "export", "onnx", "ort-int8"]
    assert report["stages"][2]["params"] == {"opset": 17, "fuse": True}
    assert any("onnxruntime transformer fusions" in n for n in report["stages"][2]["notes"])
    proc = run_cli("serve-check", str(out / "saved_model"))
    assert proc.returncode == 0 and proc.stdout.startswith("OK"), proc.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["optimize", "no/such/model.keras", "--steps", "export", "--out", "OUT"], "does not exist"),
    (["optimize", "bert-tiny", "--steps", "export,frobnicate", "--out", "OUT"], "Unknown step 'frobnicate'"),
    (["optimize", "bert-tiny", "--steps", "onnx", "--out", "OUT"], "add 'export' before it"),
    (["optimize", "gpt2-tiny", "--steps", "ort-decoder-int8", "--out", "OUT"], "add 'onnx-decoder' before it"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "OUT", "--shape", "1by128"], "BATCHxSEQ"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "OUT", "--set", "onnx.opset=17"], "not in --steps"),
    (["serve-check", "OUT"], "not a SavedModel"),
])
def test_bad_input_gets_one_clear_error_and_non_zero_exit(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    proc = run_cli(*args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_bench_measures_a_saved_model_and_an_onnx_file(optimized):
    out, proc = optimized
    assert proc.returncode == 0, proc.stderr[-2000:]
    for target in (out / "saved_model", out / "stages" / "02-onnx" / "model.onnx"):
        proc = run_cli("bench", str(target), "--shape", "2x16", "--runs", "3", "--json")
        assert proc.returncode == 0, proc.stderr[-2000:]
        m = json.loads(proc.stdout)["measurements"][0]
        assert (m["batch"], m["seq"]) == (2, 16) and m["p50_ms"] > 0


def test_steps_lists_steps_and_examples():
    proc = run_cli("steps")
    assert proc.returncode == 0
    for name in ("export", "onnx", "ort-int8", "minilm-bbc", "bert-base", "gpt2-small"):
        assert name in proc.stdout
