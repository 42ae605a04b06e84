"""Both branches of every CPU decision tfaccel makes (int8 kernel forms, onnxruntime int8 settings, the
Q/DQ check graph, half precision), each checked three ways:

* on this machine's CPU, for real;
* the other branch through ``tfaccel.compat.override_capabilities`` (the decision), with the real
  computation run here;
* on an emulated AVX2-only CPU, for real: QEMU user mode with ``-cpu EPYC-Milan`` (AMD Zen 3: AVX2 + FMA,
  no AVX-512, no VNNI, no bf16) runs this venv's Python, and CPUID, onnxruntime's kernels, oneDNN and XLA
  all see that CPU. It reproduces what a real Zen 3 gave (onnxruntime int8 bert-tiny cosine 0.900 with
  8-bit weights, Q/DQ 0.905 fused, oneDNN's int8 op failing). `.ci/run` installs qemu-user; elsewhere these
  tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tfaccel import compat
from tfaccel.compat import capabilities, override_capabilities

QEMU = shutil.which("qemu-x86_64")
EMULATED_CPU = "EPYC-Milan"  # AMD Zen 3
needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="needs QEMU user mode (Debian package qemu-user) to emulate an AVX2-only CPU; "
                         ".ci/run installs it")


# Scripts for the emulated CPU start with this: the inputs from argv[1] and the lowest per-row cosine.
EMULATED_PREAMBLE = ("import sys, json, numpy as np\n"
                     "x = dict(np.load(sys.argv[1]))\n"
                     "def cos(a, b):\n"
                     "    return float((np.sum(a*b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)).min())\n")


def run_emulated(code: str, *args: str, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run code in this venv's Python on an emulated AMD Zen 3 (AVX2 only)."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TFACCEL_CPU_ISA", "ONEDNN_MAX_CPU_ISA")}
    full_env.update(env or {})
    proc = subprocess.run([QEMU, "-cpu", EMULATED_CPU, sys.executable, "-c", code, *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd="/")
    proc.stderr = "\n".join(line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line)
    return proc


def _cos(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float((np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


# --------------------------------------------------------------------------------------------------
# What the CPU has, and caps on it


def test_isa_cap_comes_from_tfaccel_or_onednn_and_is_validated():
    assert compat.cpu_isa_cap({}) == (None, "")
    assert compat.cpu_isa_cap({"TFACCEL_CPU_ISA": "AVX2"}) == ("avx2", "TFACCEL_CPU_ISA=avx2")
    assert compat.cpu_isa_cap({"ONEDNN_MAX_CPU_ISA": "avx512_core_vnni"}) == (
        "avx512_vnni", "ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI")
    assert compat.cpu_isa_cap({"TFACCEL_CPU_ISA": "avx2", "ONEDNN_MAX_CPU_ISA": "ALL"})[0] == "avx2"  # tfaccel wins
    with pytest.raises(ValueError, match="TFACCEL_CPU_ISA must be one of .*Received: 'sse9'"):
        compat.cpu_isa_cap({"TFACCEL_CPU_ISA": "sse9"})
    everything = dict.fromkeys(compat.ISA_LEVELS["all"], True)
    assert compat.cap_cpu_features(everything, "avx2") == {**dict.fromkeys(everything, False), "avx2": True, "fma": True}
    assert compat.cap_cpu_features(everything, None) == everything


def test_cpu_features_trust_cpuid_over_proc_cpuinfo_when_they_disagree():
    host = compat.parse_cpu_flags("flags : avx2 fma avx512f avx512_vnni avx512_bf16 amx_tile amx_bf16\n")
    milan = {"avx2": True, "fma": True, "avx512": False, "vnni": False, "bf16": False, "fp16": False}
    merged = compat.merge_cpu_features(host, milan)  # an emulator: /proc/cpuinfo still shows the host
    assert merged["avx2"] and not (merged["avx512"] or merged["vnni"] or merged["amx"] or merged["bf16"])
    same = {"avx2": True, "fma": True, "avx512": True, "vnni": True, "bf16": True, "fp16": False}
    assert compat.merge_cpu_features(host, same)["amx"]  # agreement: AMX (which CPUID via numpy cannot see) kept
    alder = compat.parse_cpu_flags("flags : avx2 fma avx_vnni\n")  # AVX-VNNI (256-bit) counts as VNNI
    assert compat.merge_cpu_features(alder, {**milan})["vnni"]
    caps = capabilities()
    print("this CPU:", caps.cpu, caps.cpu_features, "cap:", caps.cpu_isa_cap)
    assert caps.cpu_features == compat.cap_cpu_features(compat.cpu_features(), compat.cpu_isa_cap()[0])


def test_override_capabilities_changes_decisions_only_inside_the_block():
    before = capabilities()
    with override_capabilities(cpu_isa="avx2", gpus=["/physical_device:GPU:0"]) as caps:
        assert capabilities() is not before and caps.gpus == ("/physical_device:GPU:0",)
        assert not caps.has_vnni and caps.ort_int8_settings()["reduce_range"]
        assert not caps.half_precision("mixed_bfloat16")[0] or caps.gpus  # GPUs decide half precision themselves
        assert "cpu_isa='avx2'" in caps.cpu_isa_cap
    with override_capabilities(cpu_features={"vnni": True, "bf16": True}, gpus=()) as caps:
        assert caps.has_vnni and not caps.ort_int8_settings()["reduce_range"]
        assert caps.half_precision("mixed_bfloat16")[0]
    with override_capabilities(cpu_isa="avx2", gpus=()) as caps:
        native, why = caps.half_precision("mixed_bfloat16")
        assert not native and "emulated" in why
    assert capabilities() == before
    with pytest.raises(ValueError, match="Unknown Capabilities fields \\['cpu_flavour'\\]"):
        with override_capabilities(cpu_flavour="zen"):
            pass


@needs_qemu
def test_an_emulated_zen3_is_seen_as_avx2_only_and_gets_the_avx2_decisions():
    code = ("import json, os\n"
            "os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'\n"
            "from tfaccel.compat import capabilities\n"
            "c = capabilities()\n"
            "print(json.dumps({'features': c.cpu_features, 'onednn': [c.onednn_int8, c.onednn_int8_reason],\n"
            "                  'ort': c.ort_int8_settings(), 'qdq_fused': c.ort_qdq_fused()[0],\n"
            "                  'bf16': c.half_precision('mixed_bfloat16')[0], 'xla': c.xla_available}))\n")
    proc = run_emulated(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print("emulated Zen 3:", got)
    f = got["features"]
    assert f["avx2"] and f["fma"] and not (f["avx512"] or f["vnni"] or f["bf16"] or f["amx"])
    # The real probe: TensorFlow 2.21's oneDNN int8 op does not work on this CPU (as on a real Zen 3).
    assert got["onednn"][0] is False and "oneDNN int8" in got["onednn"][1]
    assert got["ort"]["reduce_range"] and got["ort"]["per_channel"] and got["qdq_fused"] is False
    assert got["bf16"] is False and got["xla"] is True


# --------------------------------------------------------------------------------------------------
# onnxruntime dynamic int8: settings by CPU


@pytest.fixture(scope="module")
def ort_int8_by_branch(onnx_model, tmp_path_factory):
    """bert-tiny's ONNX quantized with each branch's settings: {"vnni": (settings, path), "avx2": ...}."""
    from tfaccel.onnx import OrtInt8Step, quantize_dynamic_int8

    d = tmp_path_factory.mktemp("ort_int8")
    out = {}
    for branch, override in (("vnni", {"cpu_features": {"vnni": True}}), ("avx2", {"cpu_isa": "avx2"})):
        with override_capabilities(**override):
            st = OrtInt8Step().settings()
        out[branch] = st, quantize_dynamic_int8(onnx_model, d / f"{branch}.onnx", per_channel=st["per_channel"],
                                                 reduce_range=st["reduce_range"])
    return out


def test_ort_int8_settings_follow_the_cpu_and_hold_accuracy_here(bert_tiny, onnx_model, ort_int8_by_branch):
    from tfaccel.onnx import OrtInt8Step
    from tfaccel.onnx.onnx_runner import OnnxRunner

    here = OrtInt8Step().settings()
    print("ort-int8 settings on this CPU:", here)
    assert here["why"] == capabilities().ort_int8_settings()["reason"]
    assert {k: here[k] for k in ("per_channel", "reduce_range")} == {
        k: ort_int8_by_branch["vnni" if capabilities().has_vnni else "avx2"][0][k] for k in ("per_channel", "reduce_range")}
    assert OrtInt8Step(reduce_range=False).settings()["reduce_range"] is False  # the user's choice wins
    x = bert_tiny.sample_inputs
    want = OnnxRunner(onnx_model)(x)["logits"]
    for branch, (settings, path) in ort_int8_by_branch.items():  # both settings are accurate on this CPU
        cos = _cos(OnnxRunner(path)(x)["logits"], want)
        print(f"{branch} settings {settings['per_channel'], settings['reduce_range']} on this CPU: cosine {cos:.5f}")
        assert cos >= 0.98


@needs_qemu
def test_ort_int8_avx2_settings_hold_accuracy_on_an_emulated_zen3(bert_tiny, onnx_model, ort_int8_by_branch, tmp_path):
    np.savez(tmp_path / "x.npz", **bert_tiny.sample_inputs)
    code = (EMULATED_PREAMBLE + "import onnxruntime as ort\n"
            "def run(p):\n"
            "    s = ort.InferenceSession(p, providers=['CPUExecutionProvider'])\n"
            "    return s.run(None, {i.name: x[i.name] for i in s.get_inputs()})[0]\n"
            "ref = run(sys.argv[2])\n"
            "print(json.dumps({p: cos(run(p), ref) for p in sys.argv[3:]}))\n")
    paths = {b: str(p) for b, (_, p) in ort_int8_by_branch.items()}
    proc = run_emulated(code, str(tmp_path / "x.npz"), str(onnx_model), paths["avx2"], paths["vnni"], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cos = json.loads(proc.stdout.strip().splitlines()[-1])
    print("emulated Zen 3: cosine with AVX2 settings", cos[paths["avx2"]], "with VNNI settings", cos[paths["vnni"]])
    assert cos[paths["avx2"]] >= 0.98  # what tfaccel picks on this CPU holds
    assert cos[paths["vnni"]] < cos[paths["avx2"]]  # and is needed: 8-bit weights saturate here


# --------------------------------------------------------------------------------------------------
# The TensorRT int8 route's Q/DQ graph, checked in onnxruntime


@pytest.fixture(scope="module")
def qdq_model(bert_tiny, onnx_model, tmp_path_factory):
    from tfaccel.tensorrt import quantize_onnx_qdq_int8
    from tfaccel.tensorrt.calibration import representative_batches

    path = tmp_path_factory.mktemp("qdq") / "model.int8.onnx"
    return quantize_onnx_qdq_int8(onnx_model, path, representative_batches(bert_tiny, samples=8, batch_size=4))


def test_qdq_check_runs_fused_only_where_that_is_exact(bert_tiny, onnx_model, qdq_model):
    from tfaccel.onnx.onnx_runner import OnnxRunner
    from tfaccel.tensorrt import TensorRTStep
    from tfaccel.tensorrt.onnx_precision import qdq_check_runner

    x = bert_tiny.sample_inputs
    want = OnnxRunner(onnx_model)(x)["logits"]
    tol = TensorRTStep("int8").tolerance.min_cosine
    runner = qdq_check_runner(qdq_model)
    assert runner.qdq_fused == capabilities().has_vnni
    print("Q/DQ check here:", runner.qdq_fused, runner.qdq_reason)
    for fused in (True, False):  # both forms run here; the unfused one is exact on every CPU
        assert _cos(OnnxRunner(qdq_model, fuse_qdq=fused)(x)["logits"], want) > tol
    with override_capabilities(cpu_isa="avx2"):
        assert qdq_check_runner(qdq_model).qdq_fused is False


@needs_qemu
def test_qdq_check_is_exact_on_an_emulated_zen3_only_unfused(bert_tiny, onnx_model, qdq_model, tmp_path):
    np.savez(tmp_path / "x.npz", **bert_tiny.sample_inputs)
    code = (EMULATED_PREAMBLE + "from tfaccel.onnx.onnx_runner import OnnxRunner\n"
            "from tfaccel.compat import cpu_features, has_vnni\n"
            "ref = OnnxRunner(sys.argv[2])(x)['logits']\n"
            "print(json.dumps({'vnni': has_vnni(cpu_features()),\n"
            "                  'fused': cos(OnnxRunner(sys.argv[3], fuse_qdq=True)(x)['logits'], ref),\n"
            "                  'unfused': cos(OnnxRunner(sys.argv[3], fuse_qdq=False)(x)['logits'], ref)}))\n")
    proc = run_emulated(code, str(tmp_path / "x.npz"), str(onnx_model), str(qdq_model), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    print("emulated Zen 3 Q/DQ cosines:", got)
    from tfaccel.tensorrt import TensorRTStep

    assert got["vnni"] is False  # so qdq_check_runner runs unfused there
    assert got["unfused"] > TensorRTStep("int8").tolerance.min_cosine
    assert got["fused"] < got["unfused"]


# --------------------------------------------------------------------------------------------------
# Half precision without native support: still runs, the report states the slowdown it measured


def test_half_precision_without_native_support_runs_and_reports_the_measured_slowdown(bert_tiny, tmp_path):
    from tfaccel import Pipeline

    with override_capabilities(cpu_isa="avx2", gpus=()):
        report = Pipeline(["mixed_bfloat16"], shapes=[(1, 16)], runs=3, warmup=1, log=print, footprints=False).run(
            bert_tiny, tmp_path / "emulated")
    stage = report.stage("mixed_bfloat16")
    assert stage.status == "ok" and stage.measurements
    warning = [n for n in stage.notes if n.startswith("WARNING") and "no native support" in n]
    measured = [n for n in stage.notes if n.startswith("measured on this machine")]
    assert warning and measured, stage.notes
    ratio = report.stages[0].measurements[0]["p50_ms"] / stage.measurements[0]["p50_ms"]
    assert f"1x16: {ratio:.2f}x its input's speed" in measured[0]
    native, why = capabilities().half_precision("mixed_bfloat16")
    print("bfloat16 on this CPU:", native, why)
    with override_capabilities(cpu_features={"bf16": True}, gpus=()):
        report = Pipeline(["mixed_bfloat16"], shapes=[(1, 16)], runs=3, warmup=1, log=print, footprints=False).run(
            bert_tiny, tmp_path / "native")
    assert not [n for n in report.stage("mixed_bfloat16").notes if "measured on this machine" in n]
