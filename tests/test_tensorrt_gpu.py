"""TensorRT on a GPU: engines built from bert-tiny's ONNX and run, compared with the Keras model; TF-TRT
where TensorFlow has it. Every test here carries `gpu` (conftest.py skips them without a GPU) and needs
the `trt` extra (`pip install 'tfaccel[trt]'`) or a TensorFlow with TF-TRT."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

# TensorFlow must not reserve the whole GPU before TensorRT builds in this process.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")

from tfaccel import InputMismatchError, Pipeline, StepError  # noqa: E402
from tfaccel.compat import tf_tensorrt_enabled  # noqa: E402
from tfaccel.core.artifact import KerasRunner
from tfaccel.onnx.onnx_runner import OnnxRunner  # noqa: E402
from tfaccel.tensorrt import (  # noqa: E402
    ShapeProfile,
    TensorRTStep,
    TftrtStep,
    TrtApi,
    TrtEngineRunner,
    build_engine,
    plan_build,
    profile_from_source,
    representative_batches,
)

pytestmark = pytest.mark.gpu
FAST = {"shapes": [(1, 16), (4, 32)], "runs": 5, "warmup": 2}


@pytest.fixture(scope="module")
def trt():
    for mod in ("tensorrt", "cuda"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"needs the trt extra (pip install 'tfaccel[trt]'): `{mod}` is not installed")
    import tensorrt

    return tensorrt


def _cosine(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_keras(trt, bert_tiny, onnx_model, tmp_path, precision):
    profile = profile_from_source(bert_tiny)
    info = build_engine(onnx_model, tmp_path / "model.engine", precision, profiles=[profile])
    assert info["tensorrt"] == trt.__version__ and info["outputs"] == ["logits"]
    assert json.loads((tmp_path / "engine_info.json").read_text())["plan"]["precision"] == precision
    runner = TrtEngineRunner(tmp_path / "model.engine")
    keras, cpu_fp32 = KerasRunner(bert_tiny.model), OnnxRunner(onnx_model)
    for x in (bert_tiny.sample_inputs, bert_tiny.make_inputs(1, 7, seed=1), bert_tiny.make_inputs(32, 64, seed=2)):
        got, want = runner(x)["logits"], keras(x)["logits"]
        assert got.shape == want.shape and got.dtype == np.float32
        scale = np.abs(want).max()
        # fp16: 11-bit significand; 1% of the output range, cosine 0.999 (the step's tolerance). TensorFlow on
        # a GPU may use TF32 itself, so the Keras model is held to the fp16 bounds for both precisions.
        assert np.abs(got - want).max() <= 1e-2 * scale
        assert _cosine(got, want).min() >= 0.999
        if precision == "fp32":  # TF32 off: true fp32 math, only summation order differs from onnxruntime's CPU
            np.testing.assert_allclose(got, cpu_fp32(x)["logits"], rtol=1e-3, atol=1e-5)
    with pytest.raises(InputMismatchError, match="outside every optimization profile"):
        runner(bert_tiny.make_inputs(profile.batch[2] + 1, 8))


def test_build_plan_follows_the_installed_tensorrt(trt):
    api = TrtApi.of(trt)
    plan = plan_build("fp16", api)
    if hasattr(trt.BuilderFlag, "FP16"):  # TensorRT 10
        assert plan.set_flags == ("FP16",) and plan.onnx_transform is None
    else:  # TensorRT 11: strongly typed only
        assert plan.onnx_transform == "fp16"


def test_int8_engine_is_close(trt, bert_tiny, onnx_model, tmp_path):
    batches = representative_batches(bert_tiny, samples=8, batch_size=4)
    build_engine(onnx_model, tmp_path / "model.engine", "int8", profiles=[profile_from_source(bert_tiny)],
                 calibration_batches=batches)
    assert (tmp_path / "model.int8-qdq.onnx").exists()
    got = TrtEngineRunner(tmp_path / "model.engine")(bert_tiny.sample_inputs)["logits"]
    want = KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"]
    assert _cosine(got, want).min() >= 0.98


def test_parser_error_names_the_node(trt, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="ok_relu"),
                               helper.make_node("FancyOp", ["h"], ["y"], name="my_fancy_node", domain="com.example")],
                              "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, tmp_path / "bad.onnx")
    with pytest.raises(StepError, match=r"node 1 'my_fancy_node' \(FancyOp\)"):
        build_engine(tmp_path / "bad.onnx", tmp_path / "bad.engine", "fp32", profiles=[ShapeProfile.fixed(1)])
    assert not (tmp_path / "bad.engine").exists()


def test_tensorrt_step_in_the_pipeline(trt, bert_tiny, tmp_path):
    report = Pipeline(["export", "onnx", TensorRTStep("fp16")], **FAST).run(bert_tiny, tmp_path / "out")
    st = report.stage("tensorrt")
    assert st.status == "ok" and st.kind == "tensorrt"
    assert st.comparison["min_cosine"] >= 0.999 and len(st.measurements) == 2
    assert any(n.startswith("TensorRT route on this machine: ") for n in st.notes)
    assert (tmp_path / "out" / "stages" / "03-tensorrt" / "model.engine").stat().st_size > 0
    assert report.final_saved_model == "saved_model"  # the engine is a side artifact


@pytest.mark.skipif(not tf_tensorrt_enabled()[0],
                    reason="this TensorFlow was built without TensorRT (TF-TRT); see the tensorrt step")
def test_tftrt_savedmodel_matches_and_serves_without_tfaccel(bert_tiny, tmp_path):
    from conftest import run_python

    report = Pipeline(["export", TftrtStep("fp16")], **FAST).run(bert_tiny, tmp_path / "out")
    st = report.stage("tftrt")
    assert st.status == "ok" and st.comparison["min_cosine"] >= 0.999
    assert any("Total number of TensorRT engines" in n for n in st.notes)
    np.savez(tmp_path / "x.npz", **bert_tiny.sample_inputs)
    want = KerasRunner(bert_tiny.model)(bert_tiny.sample_inputs)["logits"]
    np.save(tmp_path / "want.npy", want)
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "f = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
        "x = dict(np.load(sys.argv[2]))\n"
        "got = f(**{k: tf.constant(v) for k, v in x.items()})['logits'].numpy()\n"
        "want = np.load(sys.argv[3])\n"
        "cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)\n"
        "assert cos.min() >= 0.999, cos\n"
        "print('ok')\n"
    )
    proc = run_python(code, str(tmp_path / "out" / "saved_model"), str(tmp_path / "x.npz"), str(tmp_path / "want.npy"))
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
