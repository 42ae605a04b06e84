"""TensorRT routes, everything that runs without a GPU: profiles and configs from a real model source,
the ONNX graphs TensorRT gets (fp16, int8 Q/DQ) checked in onnxruntime, the TensorRT 10/11 API choice,
and the errors a user meets where TF-TRT, the `tensorrt` package or a GPU is missing. Their accuracy on
minilm-bbc is checked in test_minilm_bbc.py, on the ONNX graph of that file's shared run.

GPU tests (engines built and run, TF-TRT) are in test_tensorrt_gpu.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect

import numpy as np
import pytest

from tfaccel import InputMismatchError, MissingDependencyError, Pipeline, Step, StepError, Tolerance
from tfaccel.compat import tf_tensorrt_enabled
from tfaccel.core.chain import fit_to_consumers, step_key
from tfaccel.errors import PlanError
from tfaccel.onnx.onnx_runner import OnnxRunner
from tfaccel.onnx.ort_fusions import contrib_operators, fuse_for_onnxruntime
from tfaccel.onnx.ort_quantize import OrtInt8Step
from tfaccel.steps import get_step
from tfaccel.tensorrt import (
    ParserIssue,
    ShapeProfile,
    TensorRTConfig,
    TensorRTStep,
    TftrtConfig,
    TftrtStep,
    TrtApi,
    build_engine,
    convert_onnx_to_fp16,
    describe_parser_errors,
    onnx_input_dims,
    plan_build,
    profile_from_source,
    quantize_onnx_qdq_int8,
    representative_batches,
)
from tfaccel.tensorrt.onnx_precision import activation_matmuls, qdq_check_runner
from tfaccel.tensorrt.shape_profiles import profile_input_shapes

FAST = {"shapes": [(1, 16)], "runs": 2, "warmup": 1, "footprints": False}

# API surfaces of the real TensorRT Python bindings, read from the enum names compiled into
# tensorrt_bindings/tensorrt.so of the PyPI wheels tensorrt_cu12_bindings-10.16.1.11 and
# tensorrt_cu13_bindings-11.4.0.106 (cp311, manylinux_2_28_x86_64). TensorRT 11's docstring there says
# of STRONGLY_TYPED: "Deprecated in TensorRT 11.0. Strongly typed mode is always enabled."
TRT10_BUILDER_FLAGS = frozenset({
    "FP16", "BF16", "INT8", "DEBUG", "GPU_FALLBACK", "DISABLE_TIMING_CACHE", "EDITABLE_TIMING_CACHE", "TF32",
    "SPARSE_WEIGHTS", "SAFETY_SCOPE", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS", "DIRECT_IO",
    "REJECT_EMPTY_ALGORITHMS", "VERSION_COMPATIBLE", "FP8", "ERROR_ON_TIMING_CACHE_MISS",
    "DISABLE_COMPILATION_CACHE", "WEIGHTLESS", "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "INT4",
    "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY", "FP4", "DISTRIBUTIVE_INDEPENDENCE",
})
TRT10_NETWORK_FLAGS = frozenset({"EXPLICIT_BATCH", "STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS",
                                 "PREFER_JIT_PYTHON_PLUGINS"})
TRT11_BUILDER_FLAGS = frozenset({
    "DEBUG", "GPU_FALLBACK", "DISABLE_TIMING_CACHE", "EDITABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS",
    "SAFETY_SCOPE", "DIRECT_IO", "VERSION_COMPATIBLE", "ERROR_ON_TIMING_CACHE_MISS", "DISABLE_COMPILATION_CACHE",
    "STRIP_PLAN", "REFIT_IDENTICAL", "WEIGHT_STREAMING", "REFIT_INDIVIDUAL", "STRICT_NANS", "MONITOR_MEMORY",
    "DISTRIBUTIVE_INDEPENDENCE",
})
TRT11_NETWORK_FLAGS = frozenset({"STRONGLY_TYPED", "PREFER_AOT_PYTHON_PLUGINS", "PREFER_JIT_PYTHON_PLUGINS"})
TRT10 = TrtApi("10.16.1.11", TRT10_BUILDER_FLAGS, TRT10_NETWORK_FLAGS, has_qdq=True)
TRT11 = TrtApi("11.4.0.106", TRT11_BUILDER_FLAGS, TRT11_NETWORK_FLAGS, has_qdq=True)


def _cosine(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


# --------------------------------------------------------------------------------------------------
# Profiles from a model source


def test_profile_from_source_covers_what_the_pipeline_feeds(bert_tiny, onnx_model):
    prof = profile_from_source(bert_tiny)
    batch, seq = next(iter(bert_tiny.sample_inputs.values())).shape
    # min 1x1, tuned for the sample inputs every stage is validated on, up to the eval batch (32) and the
    # source's default sequence length (bert-tiny: max_sequence_length 64).
    assert prof == ShapeProfile(batch=(1, batch, 32), seq=(1, seq, bert_tiny.default_seq))
    assert prof.covers(batch, seq) and prof.covers(32, bert_tiny.default_seq) and not prof.covers(33, 8)

    dims = onnx_input_dims(onnx_model)
    assert dims == {"padding_mask": (None, None), "segment_ids": (None, None), "token_ids": (None, None)}
    shapes = profile_input_shapes(prof, dims)
    assert shapes["token_ids"] == ((1, 1), (batch, seq), (32, bert_tiny.default_seq))
    # The ONNX model really runs at the profile's min, opt and max shapes.
    runner = OnnxRunner(onnx_model)
    for b, s in prof.build_shapes():
        out = runner(bert_tiny.make_inputs(b, s))
        assert out["logits"].shape == (b, 3) and np.all(np.isfinite(out["logits"]))


def test_profile_limits_and_eval_split(bert_tiny):
    assert profile_from_source(bert_tiny, max_batch=128, max_seq=48).batch[2] == 128
    assert profile_from_source(bert_tiny, max_batch=128, max_seq=48).seq == (1, 32, 48)
    with pytest.raises(ValueError, match="max_batch=4 is smaller than the sample inputs' batch size 8"):
        profile_from_source(bert_tiny, max_batch=4)
    with pytest.raises(ValueError, match="max_seq=0"):
        profile_from_source(bert_tiny, max_seq=0)
    limit = bert_tiny.max_sequence_length  # 64: the model has no positions beyond it
    with pytest.raises(ValueError, match=f"max_seq={limit + 1} is longer than the model's max_sequence_length {limit}"):
        profile_from_source(bert_tiny, max_seq=limit + 1)
    # A source with a labelled eval split: the profile covers its sequence length too.
    ev = bert_tiny.make_inputs(40, 48, seed=2)
    src = dataclasses.replace(bert_tiny, eval_inputs=ev, eval_labels=np.zeros(40, int), default_seq=16)
    assert profile_from_source(src).seq == (1, 32, 48) and profile_from_source(src).batch[2] == 32


def test_shape_profile_validates_and_round_trips():
    p = ShapeProfile(batch=[1, 4, 8], seq=(2, 16, 64))
    assert p.batch == (1, 4, 8) and ShapeProfile.from_config(p.get_config()) == p
    assert ShapeProfile.fixed(4).shapes((None, 3)) == ((4, 3), (4, 3), (4, 3))
    assert p.build_shapes() == [(1, 2), (4, 16), (8, 64)]
    with pytest.raises(ValueError, match=r"min <= opt <= max. Received: batch=\(4, 2, 8\)"):
        ShapeProfile(batch=(4, 2, 8))
    with pytest.raises(ValueError, match=r"three ints .* Received: seq=\(1, 2\)"):
        ShapeProfile(batch=(1, 1, 1), seq=(1, 2))
    with pytest.raises(ValueError, match="dynamic dimension 1 besides the batch"):
        ShapeProfile(batch=(1, 1, 1)).shapes((None, None))
    with pytest.raises(ValueError, match=r"Unknown ShapeProfile fields \['sequence'\]"):
        ShapeProfile.from_config({"batch": [1, 1, 1], "sequence": [1, 1, 1]})


# --------------------------------------------------------------------------------------------------
# Configs and steps


def test_configs_validate_and_round_trip():
    assert TftrtConfig("fp16") == TftrtConfig() and TensorRTConfig("fp16") == TensorRTConfig()
    profiles = [ShapeProfile((1, 8, 32), (1, 128, 128)), ShapeProfile.fixed(1, 64)]
    for cfg in (TftrtConfig("int8", minimum_segment_size=5, max_workspace_bytes="512MiB", profiles=profiles,
                            profile_strategy="Range+Optimal", calibration_samples=32),
                TensorRTConfig("int8", max_workspace_bytes=2**30, profiles=profiles, optimization_level=5,
                               per_channel=False)):
        again = type(cfg).from_config(cfg.get_config())
        assert again == cfg and again.profiles == tuple(profiles)
        assert cfg.max_workspace_bytes in (512 * 2**20, 2**30)
    bad = [
        (TftrtConfig, {"precision": "int4"}, "precision must be one of .* Received: precision='int4'"),
        (TftrtConfig, {"minimum_segment_size": 0}, "minimum_segment_size=0"),
        (TftrtConfig, {"profile_strategy": "range"}, "profile_strategy='range'"),
        (TftrtConfig, {"max_workspace_bytes": "lots"}, "max_workspace_bytes='lots'"),
        (TensorRTConfig, {"max_workspace_bytes": 1000}, r"at least 1 MiB .*Received: max_workspace_bytes=1000"),
        (TensorRTConfig, {"optimization_level": 6}, "optimization_level=6"),
        (TensorRTConfig, {"allow_tf32": "yes"}, "allow_tf32='yes'"),
        (TensorRTConfig, {"profiles": []}, "profiles=\\[\\]"),
    ]
    for cls, kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)
    with pytest.raises(ValueError, match=r"Unknown TensorRTConfig fields \['precison'\]"):
        TensorRTConfig.from_config({"precison": "fp16"})


def test_tftrt_options_are_real_trt_graph_converter_v2_arguments():
    from tensorflow.python.compiler.tensorrt import trt_convert

    params = inspect.signature(trt_convert.TrtGraphConverterV2.__init__).parameters
    for cfg in (TftrtConfig("fp32"), TftrtConfig("int8", max_workspace_bytes="1GiB")):
        kw = cfg.converter_kwargs()
        assert set(kw) <= set(params), set(kw) - set(params)
        assert kw["precision_mode"] in trt_convert.TrtPrecisionMode.supported_precision_modes()
        assert kw["dynamic_shape_profile_strategy"] in trt_convert.supported_profile_strategies()
    assert TftrtConfig("int8").converter_kwargs()["use_calibration"] is True


def test_steps_round_trip_and_pick_tolerance_by_precision():
    for step in (TftrtStep("int8", minimum_segment_size=7), TensorRTStep("fp32", max_batch=64, on_breach="warn"),
                 TensorRTStep(config=TensorRTConfig("fp16", profiles=ShapeProfile.fixed(1, 128)))):
        again = type(step).from_config(step.get_config())
        assert again.get_config() == step.get_config()
    assert TensorRTStep("fp32").tolerance.max_abs_diff == 1e-3
    assert TensorRTStep("fp32", allow_tf32=True).tolerance.max_abs_diff is None
    assert TensorRTStep("int8").tolerance.min_cosine < TensorRTStep("fp16").tolerance.min_cosine
    assert TftrtStep("fp16", tolerance=Tolerance(min_cosine=0.5)).tolerance.min_cosine == 0.5
    assert (TensorRTStep.consumes, TensorRTStep.produces, TensorRTStep.side_artifact) == ("onnx", "tensorrt", True)
    with pytest.raises(ValueError, match="precision='bf16'"):
        TensorRTStep("bf16")
    with pytest.raises(ValueError, match="either config"):
        TftrtStep("fp16", config=TftrtConfig())


# --------------------------------------------------------------------------------------------------
# TensorRT 10 vs 11: the build plan is a pure function of the API surface


def test_trt10_uses_builder_flags_and_trt11_typed_onnx():
    fp16_10, fp16_11 = plan_build("fp16", TRT10), plan_build("fp16", TRT11)
    assert (fp16_10.set_flags, fp16_10.onnx_transform, fp16_10.strongly_typed) == (("FP16",), None, False)
    assert (fp16_11.set_flags, fp16_11.onnx_transform) == ((), "fp16")
    assert not fp16_11.strongly_typed  # TensorRT 11 types every network strongly; its flag is deprecated
    assert TRT11.always_strongly_typed and not TRT10.always_strongly_typed

    int8_10, int8_11 = plan_build("int8", TRT10), plan_build("int8", TRT11)
    assert int8_10.onnx_transform == int8_11.onnx_transform == "int8-qdq"
    assert int8_10.strongly_typed and int8_10.set_flags == ()  # explicit Q/DQ in a strongly typed network
    # An fp32 engine is fp32: TF32 is cleared unless allowed; nothing to set on either version.
    for api in (TRT10, TRT11):
        assert plan_build("fp32", api).clear_flags == ("TF32",)
        assert plan_build("fp32", api, allow_tf32=True).clear_flags == ()
        assert plan_build("fp32", api).onnx_transform is None


def test_unsupported_tensorrt_versions_and_precisions_are_named():
    with pytest.raises(StepError, match=r"TensorRT 8.6.1 is too old.*pip install -U 'tfaccel\[trt\]'"):
        plan_build("fp16", dataclasses.replace(TRT10, version="8.6.1"))
    no_qdq = dataclasses.replace(TRT11, has_qdq=False)
    with pytest.raises(StepError, match="cannot build int8 .* Use precision='fp16'"):
        plan_build("int8", no_qdq)
    untyped = TrtApi("10.0.0", frozenset({"TF32"}), frozenset({"EXPLICIT_BATCH"}), has_qdq=True)
    assert plan_build("fp16", untyped).onnx_transform == "fp16"  # no flags at all: typing from the graph


# --------------------------------------------------------------------------------------------------
# The ONNX that goes into TensorRT, checked in onnxruntime on the CPU


def test_fp16_onnx_runs_and_matches_fp32_within_fp16_tolerance(bert_tiny, onnx_model, tmp_path):
    import onnx

    path = convert_onnx_to_fp16(onnx_model, tmp_path / "model.fp16.onnx")
    m32, m16 = onnx.load(onnx_model), onnx.load(path)
    # inputs and outputs keep their types: int32 token inputs, float32 logits
    io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]  # noqa: E731
    assert io(m16) == io(m32)
    big16 = [i for i in m16.graph.initializer if np.prod(i.dims) >= 32 * 32]
    assert big16 and all(i.data_type == onnx.TensorProto.FLOAT16 for i in big16)  # the weights really are fp16
    float_bytes = lambda m, t: sum(len(i.raw_data) for i in m.graph.initializer if i.data_type == t)  # noqa: E731
    assert float_bytes(m16, onnx.TensorProto.FLOAT16) > 0.45 * float_bytes(m32, onnx.TensorProto.FLOAT)
    assert float_bytes(m16, onnx.TensorProto.FLOAT) < 0.05 * float_bytes(m32, onnx.TensorProto.FLOAT)
    r32, r16 = OnnxRunner(onnx_model), OnnxRunner(path)
    for x in (bert_tiny.sample_inputs, bert_tiny.make_inputs(2, 64, seed=5)):
        a, b = r32(x)["logits"], r16(x)["logits"]
        assert b.dtype == np.float32
        # fp16 has an 11-bit significand (eps 9.8e-4): allow 0.5% of the output range, cosine 0.9999
        assert np.abs(a - b).max() <= 5e-3 * np.abs(a).max(), (np.abs(a - b).max(), np.abs(a).max())
        assert _cosine(a, b).min() > 0.9999


def test_int8_qdq_onnx_is_symmetric_and_close(bert_tiny, onnx_model, tmp_path):
    import onnx

    batches = representative_batches(bert_tiny, samples=8, batch_size=4)
    path = quantize_onnx_qdq_int8(onnx_model, tmp_path / "model.int8.onnx", batches)
    m = onnx.load(path)
    producers = {o: n for n in m.graph.node for o in n.output}
    inits = {i.name: i for i in m.graph.initializer}
    fed_by_dq = lambda n: any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"  # noqa: E731
                              for i in n.input)
    skipped = set(activation_matmuls(onnx.load(onnx_model)))
    assert len(skipped) == 4  # 2 layers x (Q.K^T, P.V): attention's activation-by-activation products
    mm = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert len(mm) == 18 and all(fed_by_dq(n) != (n.name in skipped) for n in mm)  # every layer with weights
    zps = [onnx.numpy_helper.to_array(inits[n.input[2]]) for n in m.graph.node
           if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and n.input[2] in inits]
    assert zps and all(z.dtype == np.int8 and not z.any() for z in zps)  # symmetric int8: TensorRT's requirement
    a = OnnxRunner(onnx_model)(bert_tiny.sample_inputs)["logits"]
    # checked the way this CPU computes the products exactly (fused int8 kernels only with VNNI/AMX;
    # both branches: tests/test_cpu_paths.py)
    b = qdq_check_runner(path)(bert_tiny.sample_inputs)["logits"]
    assert _cosine(a, b).min() > TensorRTStep("int8").tolerance.min_cosine


def test_representative_batches_prefer_real_data(bert_tiny):
    b = representative_batches(bert_tiny, samples=8, batch_size=3)
    assert len(b) == 2 and all(x["token_ids"].shape == (3, 32) for x in b)  # equal shapes; remainder dropped
    np.testing.assert_array_equal(b[1]["token_ids"], bert_tiny.sample_inputs["token_ids"][3:6])
    ev = bert_tiny.make_inputs(20, 48, seed=9)
    src = dataclasses.replace(bert_tiny, eval_inputs=ev, eval_labels=np.zeros(20, int))
    b = representative_batches(src, samples=16, batch_size=8)
    assert len(b) == 2 and b[0]["token_ids"].shape == (8, 48)
    np.testing.assert_array_equal(b[0]["token_ids"], ev["token_ids"][:8])
    with pytest.raises(InputMismatchError, match="calibration inputs do not match"):
        representative_batches(bert_tiny, inputs={"ids": np.zeros((4, 8), np.int32)})


# --------------------------------------------------------------------------------------------------
# Errors a user meets


def test_parser_errors_name_the_onnx_node(onnx_model):
    import onnx

    nodes = onnx.load(onnx_model).graph.node
    k = next(i for i, n in enumerate(nodes) if n.op_type == "Softmax")
    issues = [ParserIssue("UNSUPPORTED_NODE", "No importer registered for op: Softmax", node_index=k),
              ParserIssue("INVALID_GRAPH", "Graph has no outputs")]
    msg = describe_parser_errors(issues, onnx_model, "11.4.0")
    assert f"node {k} '{nodes[k].name}' (Softmax): [UNSUPPORTED_NODE] No importer registered" in msg
    assert "the graph: [INVALID_GRAPH] Graph has no outputs" in msg
    assert "TensorRT 11.4.0's ONNX parser rejected" in msg and "(2 errors)" in msg
    assert "cannot import these ops as they are: Softmax" in msg and "--set onnx.opset" in msg


class StandardOnnxReader(OrtInt8Step):
    """onnxruntime's dynamic int8, declared a reader of standard ONNX only, as the tensorrt step is: a consumer
    that runs on a CPU, so the planner's answer to such a step is run here end to end."""

    name = "standard-onnx-reader"
    standard_onnx_only = "this test's reader of standard ONNX"


def test_tensorrt_gets_standard_onnx_and_a_fused_graph_is_refused_before_any_gpu_work(bert_tiny, onnx_model,
                                                                                       tmp_path):
    import onnx
    from onnx import TensorProto, helper

    # The onnx step fuses for onnxruntime by default: its FastGelu is onnxruntime's own operator, which
    # TensorRT's parser has no importer for.
    fused = tmp_path / "fused.onnx"
    counts = fuse_for_onnxruntime(onnx_model, fused)
    assert contrib_operators(onnx_model) == {}
    custom = helper.make_model(helper.make_graph(  # another domain's operator: a TensorRT plugin may import it
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(custom, tmp_path / "custom.onnx")
    assert contrib_operators(tmp_path / "custom.onnx") == {}
    assert contrib_operators(fused) == {"com.microsoft.FastGelu": counts["FastGelu"],
                                        "com.microsoft.MultiHeadAttention": counts["MultiHeadAttention"]}
    with pytest.raises(StepError, match=r"cannot read onnxruntime's contrib operators, .*com\.microsoft\.FastGelu x2"
                                        r".*--set onnx\.fuse=false"):
        build_engine(fused, tmp_path / "e" / "model.engine", "fp16", profiles=[profile_from_source(bert_tiny)])
    assert not (tmp_path / "e").exists()

    # Fitted to its consumer: a copy that does not fuse (another artifact, so --auto builds it apart from the fused
    # one ort-int8 starts from); the step object itself is unchanged.
    export, onnx_step, trt = get_step("export"), get_step("onnx"), TensorRTStep("fp16")
    fitted = fit_to_consumers([export, onnx_step, trt], {1: 0, 2: 1})
    assert (onnx_step.fuse, fitted[1].fuse, fitted[1].standard_for) == (True, False, "tensorrt")
    assert fitted[0] is export and fitted[2] is trt and step_key(fitted[1]) != step_key(onnx_step)
    assert fit_to_consumers([onnx_step, get_step("ort-int8")], {1: 0})[0] is onnx_step
    with pytest.raises(PlanError, match=r"'tensorrt' .* parses standard ONNX only .* Drop --set onnx\.fuse=true"):
        fit_to_consumers([get_step("onnx", fuse=True), trt], {1: 0})

    # The planner does the same for a run, through STEP@FROM too: the reader's ONNX is standard, the report says
    # why it was not fused, and ort-int8 beside it starts from that same stage.
    reader = StandardOnnxReader()
    reader.start_from = "onnx"
    report = Pipeline(["export", "onnx", "ort-int8", reader], shapes=[(1, 16)], measure=False, footprints=False,
                      log=lambda _m: None).run(bert_tiny, tmp_path / "out")
    stage = report.stage("onnx")
    assert stage.params["fuse"] is False
    assert any("fusions left out: 'standard-onnx-reader' parses standard ONNX only" in n for n in stage.notes), stage.notes
    assert contrib_operators(tmp_path / "out" / stage.path / "model.onnx") == {}
    assert [s.parent for s in report.stages[3:5]] == [2, 2]


@pytest.mark.skipif(tf_tensorrt_enabled()[0],
                    reason="this TensorFlow has TF-TRT")
def test_tftrt_without_tensorrt_in_tensorflow_fails_before_any_work(bert_tiny, tmp_path):
    import tensorflow as tf

    step = TftrtStep("fp16")
    with pytest.raises(StepError) as err:
        step.check(bert_tiny)
    msg = str(err.value)
    assert f"TensorFlow {tf.__version__} was built without TensorRT" in msg
    assert "tensorflow<=2.17" in msg and "nvcr.io/nvidia/tensorflow" in msg
    assert "steps export,onnx,tensorrt" in msg and "pip install 'tfaccel[trt]'" in msg

    log: list[str] = []
    out = tmp_path / "out"
    with pytest.raises(StepError, match="The tftrt step cannot run here"):
        Pipeline(["export", step], log=log.append, **FAST).run(bert_tiny, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert not any("TF-TRT:" in line for line in log)  # the converter never started
    if "check" in vars(Step):  # Pipeline.plan asks every step first: not even the export ran
        assert not any("[1/2] export" in line for line in log)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed here")
def test_tensorrt_step_without_the_package_names_the_extra(bert_tiny, onnx_model, tmp_path):
    from tfaccel.tensorrt import TrtEngineRunner, build_engine

    with pytest.raises(MissingDependencyError, match=r"`tensorrt` is needed .* Run: pip install 'tfaccel\[trt\]'"):
        TensorRTStep("fp16").check(bert_tiny)
    with pytest.raises(MissingDependencyError, match=r"pip install 'tfaccel\[trt\]'"):
        build_engine(onnx_model, tmp_path / "e" / "model.engine", "fp16", profiles=[profile_from_source(bert_tiny)])
    assert not (tmp_path / "e").exists()  # nothing was written
    with pytest.raises(MissingDependencyError, match="running TensorRT engines"):
        TrtEngineRunner(tmp_path / "model.engine")


def test_no_gpu_is_a_clear_error():
    from tfaccel.compat import gpu_devices
    from tfaccel.tensorrt.availability import require_gpu

    if gpu_devices():
        pytest.skip("this machine has a GPU")
    with pytest.raises(StepError, match="The tensorrt step needs an NVIDIA GPU, and TensorFlow sees none"):
        require_gpu("The tensorrt step")


def test_cuda_errors_name_the_call():
    pytest.importorskip("cuda.bindings", reason="cuda-python (part of the trt extra) is not installed")
    from tfaccel.tensorrt.availability import cuda_check, import_cudart

    cudart = import_cudart()
    # No machine has a millionth device: with a GPU this is cudaErrorInvalidDevice, without a driver
    # cudaErrorInsufficientDriver/NoDevice; either way the message names the call and CUDA's error.
    with pytest.raises(StepError, match=r"CUDA call cudaSetDevice\(1000000\) failed: cudaError\w+ \("):
        cuda_check(cudart.cudaSetDevice(1_000_000), "cudaSetDevice(1000000)")
