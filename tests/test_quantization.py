"""Post-training quantization steps on tiny configs: layer selection, int8 kernel forms, artifacts that
serve without tfaccel (SavedModel) or in the LiteRT interpreter alone (.tflite)."""

import numpy as np
import pytest
from conftest import run_python

from tfaccel import Pipeline, PlanError, StepError
from tfaccel.core.artifact import KerasRunner, SavedModelRunner
from tfaccel.core.layers import einsum_as_matmul
from tfaccel.core.validation import _cosines
from tfaccel.export import ExportStep
from tfaccel.quantization import (
    Int4Step,
    Int8Step,
    LiteRTDynamicStep,
    QuantizationConfig,
    int8_kernels,
    quantize_model,
)
from tfaccel.servable import check_servable


def test_config_validates_names_the_value_and_round_trips():
    cfg = QuantizationConfig("int4", layer_types=["Dense"], include=("feedforward",), exclude="pooled", block_size=None)
    assert cfg.exclude == ("pooled",) and cfg.layer_types == ("Dense",)
    assert QuantizationConfig.from_config(cfg.get_config()) == cfg
    with pytest.raises(ValueError, match="mode='int2'"):
        QuantizationConfig("int2")
    with pytest.raises(ValueError, match="LayerNormalization"):
        QuantizationConfig(layer_types=("LayerNormalization",))
    with pytest.raises(ValueError, match="not a valid regular expression"):
        QuantizationConfig(exclude=("(",))
    with pytest.raises(ValueError, match="block_size=0"):
        QuantizationConfig("int4", block_size=0)
    with pytest.raises(ValueError, match="weight_only applies to mode 'int8'"):
        QuantizationConfig("int4", weight_only=True)
    with pytest.raises(ValueError, match="Unknown QuantizationConfig fields"):
        QuantizationConfig.from_config({"mode": "int8", "bits": 8})
    step = Int4Step(block_size=None, exclude=("pooled",))  # step options reach the config, None included
    assert step.config.block_size is None and step.config.exclude == ("pooled",) and step.config.mode == "int4"
    assert Int8Step(weight_only=True).params()["kernel"] == "keras"
    with pytest.raises(ValueError, match="bits"):
        Int8Step(bits=8)
    with pytest.raises(ValueError, match="kernel='cuda'"):
        Int8Step(kernel="cuda")
    with pytest.raises(ValueError, match="jit_compile=True"):
        Int8Step(kernel="onednn", jit_compile=True)


def test_onednn_form_is_refused_clearly_where_tensorflow_lacks_it():
    code = ("import os\n"
            "os.environ['TF_ENABLE_ONEDNN_OPTS'] = '0'\n"  # TensorFlow without its oneDNN kernels
            "from tfaccel.quantization.int8_step import check_onednn_int8\n"
            "from tfaccel import StepError\n"
            "try:\n    check_onednn_int8()\nexcept StepError as e:\n    print('REFUSED', e)\n")
    proc = run_python(code, timeout=300)
    assert "REFUSED" in proc.stdout and "kernel='xla'" in proc.stdout, proc.stdout + proc.stderr[-1500:]


def test_einsum_equations_that_become_one_matmul():
    assert einsum_as_matmul("abc,cde->abde", (768, 12, 64)) == (2, 768, (12, 64))  # attention q/k/v
    assert einsum_as_matmul("abcd,cde->abe", (12, 64, 768)) == (2, 768, (768,))  # attention output
    assert einsum_as_matmul("abc,cd->abd", (32, 8)) == (2, 32, (8,))
    assert einsum_as_matmul("abc,dc->abd", (8, 32)) is None  # kernel contracted on its last axis
    assert einsum_as_matmul("...b,bc->...c", (4, 4)) is None  # ellipsis: left to Keras


def test_layer_decisions_follow_types_patterns_and_head(bert_tiny):
    by_path = {d.path: d for d in QuantizationConfig().decide(bert_tiny.model)}
    assert not by_path["logits"].quantized and "model output" in by_path["logits"].reason
    assert by_path["token_embedding"].quantized and by_path["token_embedding"].layer_type == "ReversibleEmbedding"
    assert by_path["transformer_layer_0/self_attention_layer/query"].quantized
    assert not by_path["embeddings_layer_norm"].quantized
    assert "no quantized version" in by_path["embeddings_layer_norm"].reason

    cfg = QuantizationConfig(layer_types=("Dense",), include=("feedforward",), exclude=("layer_1",), keep_head=False)
    chosen = {d.path for d in cfg.decide(bert_tiny.model) if d.quantized}
    assert chosen == {"transformer_layer_0/feedforward_intermediate_dense", "transformer_layer_0/feedforward_output_dense"}
    reasons = {d.path: d.reason for d in cfg.decide(bert_tiny.model)}
    assert reasons["transformer_layer_1/feedforward_output_dense"] == "excluded by pattern 'layer_1'"
    assert reasons["logits"] == "matched no include pattern"
    assert reasons["token_embedding"] == "type ReversibleEmbedding not in layer_types"

    with pytest.raises(StepError, match="No layer was selected"):
        quantize_model(bert_tiny.model, QuantizationConfig(include=("no-such-layer",)))


def _forms_here():
    """The int8 kernel forms this machine runs, as tfaccel.compat decides (printed: the path checked)."""
    from tfaccel.compat import capabilities

    forms = capabilities().int8_kernel_forms()
    print("int8 kernel forms here:", {f: ok for f, (ok, _) in forms.items()}, "-", forms["onednn"][1])
    return forms


def test_int8_kernel_forms_compute_keras_int8_math(bert_tiny):
    import tensorflow as tf

    qmodel, summary = quantize_model(bert_tiny.model, "int8")
    assert len(summary.quantized) == 15 and summary.weight_bytes_after < summary.weight_bytes_before / 2
    assert bert_tiny.model.get_layer("logits").quantization_mode is None  # the source model is untouched
    x = bert_tiny.make_inputs(3, 17, seed=2)  # a sequence length the model was never traced with
    fp32 = KerasRunner(bert_tiny.model)(x)["logits"]
    keras_int8 = KerasRunner(qmodel)(x)["logits"]
    forms = _forms_here()
    checked = [(k, jit) for k, jit in (("xla", True), ("onednn", False)) if forms[k][0]]
    assert ("xla", True) in checked  # XLA runs on every TensorFlow this project supports
    for kernel, jit in checked:
        with int8_kernels(qmodel, kernel) as rewritten:
            # 12 Dense/EinsumDense, the pooler, and the token embedding's reverse (LM-head) product
            assert len(rewritten) == 14 and "token_embedding" in rewritten
            runner = KerasRunner(qmodel)
            if jit:
                runner._fn = tf.function(runner._fn.python_function, input_signature=runner._fn.input_signature,
                                         jit_compile=True)
            got = runner(x)["logits"]
            ops = {op.type for op in runner._fn.get_concrete_function().graph.get_operations()}
        # The traced graph really holds the chosen form: oneDNN's int8 op, or only 2-D int8 matmuls (no einsum).
        assert ("QuantizedMatMulWithBiasAndDequantize" in ops) == (kernel == "onednn")
        assert "Einsum" not in ops
        # Same quantized math as Keras' own int8 calls: only float summation order differs.
        np.testing.assert_allclose(got, keras_int8, atol=1e-4 * np.abs(keras_int8).max() + 1e-6)
        assert _cosines(got, fp32).min() > 0.99
    assert "_int8_call" not in vars(qmodel.backbone.get_layer("pooled_dense"))  # the rewrite ends with the context


def test_int8_auto_times_the_forms_that_run_and_keeps_the_fastest(bert_tiny, tmp_path):
    from tfaccel.compat import override_capabilities
    from tfaccel.quantization.int8_step import by_batch_split, choose_kernel

    runnable = {f for f, (ok, _) in _forms_here().items() if ok}
    report = Pipeline([Int8Step()], shapes=[(1, 16), (2, 16)], measure=False, log=print).run(bert_tiny, tmp_path / "a")
    choice = report.stages[1].params["kernel_choice"]
    assert set(choice["median_ms"]) == runnable  # every form that runs here was timed, at every shape
    assert all(set(m) == {"1x16", "2x16"} for m in choice["median_ms"].values())
    # XLA fastest at batch 1 and oneDNN at batch 2 gives both forms in one SavedModel; else the fastest form
    split = by_batch_split(choice["median_ms"])
    want = "by-batch" if split is not None else choose_kernel(choice["median_ms"])
    assert choice["chosen"] == want == report.stages[1].params["kernel"]
    assert report.stages[1].params["jit_compile"] == (want not in ("onednn", "by-batch"))
    # The other branch: a CPU where oneDNN's int8 op cannot run (AVX2-only, e.g. AMD Zen 3).
    with override_capabilities(onednn_int8=False, onednn_int8_reason="no oneDNN int8 on this CPU (test)"):
        report = Pipeline([Int8Step()], shapes=[(1, 16)], measure=False, log=print).run(bert_tiny, tmp_path / "b")
        choice = report.stages[1].params["kernel_choice"]
        assert "onednn" not in choice["median_ms"] and "no oneDNN int8" in choice["left_out"]["onednn"]
        assert choice["chosen"] in ("xla", "keras")
        # An explicit kernel='onednn' is refused at plan time: nothing is built, no output folder.
        with pytest.raises(PlanError, match="kernel='onednn' cannot run on this machine: no oneDNN int8.*kernel='xla'"):
            Pipeline([ExportStep(), Int8Step(kernel="onednn")], shapes=[(1, 16)], measure=False).run(
                bert_tiny, tmp_path / "c")
        assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="kernel='auto'.*jit_compile=False"):
        Int8Step(jit_compile=False)


def test_by_batch_split_and_plan_time_refusals(bert_tiny):
    from tfaccel.auto.plan import new_report, plan_search
    from tfaccel.compat import override_capabilities
    from tfaccel.quantization.int8_step import by_batch_split

    assert by_batch_split({"xla": {"1x128": 9.0, "8x128": 40.0, "32x128": 300.0},
                           "onednn": {"1x128": 12.0, "8x128": 35.0, "32x128": 200.0}}) == 1
    assert by_batch_split({"xla": {"1x128": 9.0, "32x128": 150.0}, "onednn": {"1x128": 12.0, "32x128": 200.0}}) is None
    # oneDNN faster at the small batch, XLA at the large one: not a split by batch size
    assert by_batch_split({"xla": {"1x128": 12.0, "32x128": 150.0}, "onednn": {"1x128": 9.0, "32x128": 200.0}}) is None
    assert by_batch_split({"xla": {"1x128": 9.0, "32x128": 300.0}}) is None
    with pytest.raises(ValueError, match="xla_max_batch is an int >= 1 for kernel='by-batch'"):
        Int8Step(kernel="xla", xla_max_batch=4)
    with pytest.raises(ValueError, match="by-batch.*jit_compile=True"):
        Int8Step(kernel="by-batch", jit_compile=True)
    step = Int8Step(kernel="by-batch", xla_max_batch=4)
    assert step.same_as_another_at([(1, 128), (32, 128)]) == ""
    assert "the same as kernel='xla'" in step.same_as_another_at([(1, 128), (4, 128)])
    assert "the same as kernel='onednn'" in step.same_as_another_at([(8, 128)])
    # --auto does not build it where every shape falls on one side of the split
    kw = dict(max_accuracy_drop=1.0, formats="savedmodel", time_budget_s=None, baseline="export")
    report = new_report(bert_tiny, [(1, 16)], **kw)
    planned = plan_search(bert_tiny, report, [(1, 16)], formats="savedmodel", finetune_data=None,
                          recipes=["export", "int8-by-batch"])
    assert [p.name for p in planned] == ["export"]
    assert "the same as kernel='xla'" in report.candidate("int8-by-batch").reason
    # The other branch: a CPU without oneDNN's int8 op (AVX2-only, e.g. AMD Zen 3) refuses it at plan time.
    with override_capabilities(onednn_int8=False, onednn_int8_reason="no oneDNN int8 on this CPU (test)"):
        report = new_report(bert_tiny, [(1, 16), (4, 16)], **kw)
        planned = plan_search(bert_tiny, report, [(1, 16), (4, 16)], formats="savedmodel", finetune_data=None,
                              recipes=["export", "int8-by-batch"])
        assert [p.name for p in planned] == ["export"]
        assert "'onednn' does not run here: no oneDNN int8" in report.candidate("int8-by-batch").reason
        with pytest.raises(PlanError, match="kernel='by-batch' \\(its 'onednn' form\\) cannot run on this machine"):
            Pipeline([Int8Step(kernel="by-batch")], shapes=[(1, 16)], measure=False).plan(bert_tiny)


def test_by_batch_int8_saved_model_runs_xla_at_batch_1_and_onednn_above(bert_tiny, tmp_path):
    from tensorflow.core.protobuf import saved_model_pb2

    if not _forms_here()["onednn"][0]:
        pytest.skip("oneDNN's int8 op does not run on this CPU (AVX2-only): kernel='by-batch' is refused here, "
                    "as test_by_batch_split_and_plan_time_refusals checks")
    report = Pipeline([Int8Step(kernel="by-batch")], shapes=[(1, 16), (4, 16)], measure=False, log=print).run(
        bert_tiny, tmp_path / "out")
    stage = report.stages[1]
    assert stage.status == "ok" and stage.params["kernel"] == "by-batch" and stage.params["xla_max_batch"] == 1
    path = tmp_path / "out" / stage.path
    # One SavedModel holds both forms: an XLA-marked function and oneDNN's int8 op, over one set of weights.
    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    library = sm.meta_graphs[0].graph_def.library.function
    assert any(f.attr["_XlaMustCompile"].b for f in library)
    assert any(n.op == "QuantizedMatMulWithBiasAndDequantize" for f in library for n in f.node_def)
    qmodel, _ = quantize_model(bert_tiny.model, "int8")
    for batch in (1, 4):  # batch 1 takes the XLA branch, batch 4 the oneDNN one: both Keras' int8 math
        x = bert_tiny.make_inputs(batch, 16, seed=batch)
        want = KerasRunner(qmodel)(x)["logits"]
        got = (check_servable(path, inputs=x)["outputs"] if batch == 1 else SavedModelRunner(str(path))(x))["logits"]
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max() + 1e-6)


@pytest.fixture(scope="module")
def quantized_run(bert_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "out"
    # oneDNN's int8 form where this machine runs it, Keras' own int8 calls where it does not (AVX2-only CPUs)
    second = "onednn" if _forms_here()["onednn"][0] else "keras"
    steps = [Int8Step(kernel="xla"), Int8Step(kernel=second), Int4Step(), ExportStep(), LiteRTDynamicStep()]
    report = Pipeline(steps, shapes=[(1, 32)], measure=False, log=print).run(bert_tiny, out)
    return out, report


def test_int8_and_int4_savedmodels_serve_without_tfaccel(bert_tiny, quantized_run):
    out, report = quantized_run
    x = {k: v[:4] for k, v in bert_tiny.sample_inputs.items()}
    want = KerasRunner(bert_tiny.model)(x)["logits"]
    for index, step, min_cos in ((1, "int8", 0.99), (2, "int8", 0.99), (3, "int4", 0.95)):
        stage = report.stages[index]
        assert stage.step == step and stage.status == "ok"
        assert "token_embedding" in stage.params["quantized_layers"]
        assert "logits" in stage.params["left_in_float"]
        path = out / stage.path
        served = check_servable(path, inputs=x)["outputs"]["logits"]
        np.testing.assert_allclose(served, SavedModelRunner(str(path))(x)["logits"], atol=1e-5)
        assert _cosines(served, want).min() > min_cos, (step, stage.params["kernel"])
    assert report.stages[1].params["kernel"] == "xla" and report.stages[1].params["jit_compile"]
    second = report.stages[2].params["kernel"]
    assert second in ("onednn", "keras") and report.stages[2].params["jit_compile"] == (second == "keras")
    assert report.stages[3].params["jit_compile"]  # int4: XLA-compiled serving function


def test_litert_model_runs_in_the_interpreter_alone(bert_tiny, quantized_run, tmp_path):
    out, report = quantized_run
    stage = report.stage("litert-dynamic")
    assert stage.kind == "tflite" and stage.comparison["min_cosine"] > 0.98
    tflite = next((out / stage.path).glob("*.tflite"))
    x = bert_tiny.make_inputs(2, 24, seed=3)
    np.savez(tmp_path / "x.npz", **x)
    code = (
        "import sys, numpy as np\n"
        "from ai_edge_litert.interpreter import Interpreter\n"
        "it = Interpreter(model_path=sys.argv[1])\n"
        "run = it.get_signature_runner('serving_default')\n"
        "x = dict(np.load(sys.argv[2]))\n"
        "np.save(sys.argv[3], run(**x)['logits'])\n"
        "assert 'tensorflow' not in sys.modules and 'tfaccel' not in sys.modules\n"
    )
    proc = run_python(code, str(tflite), str(tmp_path / "x.npz"), str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "y.npy")
    want = KerasRunner(bert_tiny.model)(x)["logits"]
    assert _cosines(got, want).min() > 0.98


def test_litert_conversion_failure_names_the_problem(quantized_run, tmp_path):
    from tfaccel.quantization import convert_dynamic_range

    out, report = quantized_run
    if report.stages[2].params["kernel"] != "onednn":
        pytest.skip("oneDNN's int8 op does not run on this CPU, so there is no oneDNN int8 SavedModel to convert")
    # The oneDNN int8 SavedModel holds an op LiteRT has no kernel for.
    with pytest.raises(StepError, match="type qint8.*already quantized.*before 'int8'"):
        convert_dynamic_range(out / report.stages[2].path, tmp_path / "m.tflite")
    assert not (tmp_path / "m.tflite").exists()
