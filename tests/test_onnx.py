import numpy as np
import pytest

from tfaccel import StepError
from tfaccel.core.artifact import KerasRunner
from tfaccel.onnx import convert_saved_model, quantize_dynamic_int8
from tfaccel.onnx.onnx_convert import _unsupported_ops
from tfaccel.onnx.onnx_runner import OnnxRunner


def test_onnx_matches_keras_with_dynamic_shapes(bert_tiny, onnx_model):
    import onnx

    model = onnx.load(onnx_model)
    assert model.opset_import[0].version == 17
    for batch, seq in [(1, 7), (4, 33)]:
        x = bert_tiny.make_inputs(batch, seq, seed=1)
        got = OnnxRunner(onnx_model)(x)
        want = KerasRunner(bert_tiny.model)(x)
        assert set(got) == {"logits"}
        np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-4)


def test_dynamic_int8_is_close_and_really_int8(bert_tiny, onnx_model, tmp_path):
    import onnx

    from tfaccel.onnx import OrtInt8Step

    st = OrtInt8Step().settings()  # this CPU's settings (both branches: tests/test_cpu_paths.py)
    q = quantize_dynamic_int8(onnx_model, tmp_path / "q.onnx", per_channel=st["per_channel"],
                              reduce_range=st["reduce_range"])
    ops = {n.op_type for n in onnx.load(q).graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops, ops
    x = bert_tiny.sample_inputs
    got, want = OnnxRunner(q)(x)["logits"], KerasRunner(bert_tiny.model)(x)["logits"]
    cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    assert cos.min() > 0.98


def test_conversion_failure_names_the_problem(tmp_path):
    (tmp_path / "saved_model.pb").write_bytes(b"garbage")
    with pytest.raises(StepError, match="tf2onnx failed"):
        convert_saved_model(tmp_path, tmp_path / "m.onnx", timeout=300)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / ".m.onnx.partial").exists()


def test_conversion_stops_at_its_deadline_and_leaves_no_file(bert_tiny_saved_model, tmp_path):
    import time

    from tfaccel.errors import OverBudget

    out = tmp_path / "model.onnx"
    with pytest.raises(OverBudget, match="no time was left"):  # --auto's deadline already passed
        convert_saved_model(bert_tiny_saved_model, out, deadline=time.perf_counter() - 1)
    # 0.5 s: the child is still importing TensorFlow when it is stopped
    with pytest.raises(OverBudget, match=r"tf2onnx was stopped at the step's deadline, after \d+s"):
        convert_saved_model(bert_tiny_saved_model, out, deadline=time.perf_counter() + 0.5)
    assert list(tmp_path.iterdir()) == []  # no half-written model.onnx


def test_unsupported_ops_are_parsed_from_tf2onnx_log():
    log = ("ERROR - Tensorflow op [model/foo: FancyOp] is not supported\n"
           "ERROR - Unsupported ops: Counter({'FancyOp': 2, 'OtherOp': 1})")
    assert _unsupported_ops(log) == ["FancyOp", "OtherOp"]


def test_opset_is_validated():
    from tfaccel.onnx import OnnxStep

    with pytest.raises(ValueError, match="opset=9"):
        OnnxStep(opset=9)


def test_attention_fusion_leaves_an_attention_whose_values_are_read_elsewhere(onnx_model, tmp_path):
    import onnx
    from onnx import helper

    from tfaccel.onnx.attention_fusion import fuse_keras_attention
    from tfaccel.onnx.ort_fusions import fuse_for_onnxruntime

    model = onnx.load(onnx_model)
    probs = next(n for n in model.graph.node if n.op_type == "Softmax").output[0]
    model.graph.output.append(helper.make_tensor_value_info(probs, onnx.TensorProto.FLOAT, None))
    onnx.save(model, tmp_path / "model.onnx")
    counts = fuse_for_onnxruntime(tmp_path / "model.onnx")  # the rewrite checks every output, the probabilities too
    assert counts.get("MultiHeadAttention") == 1 and "skipped" not in counts, counts  # the other layer's
    fused = onnx.load(tmp_path / "model.onnx")
    ops = [x.op_type for x in fused.graph.node]
    assert ops.count("MultiHeadAttention") == 1 and ops.count("Softmax") == 1
    assert fuse_keras_attention(fused)[0] is fused  # nothing more to fuse


def test_ort_fusions_keep_the_outputs_and_shrink_the_graph(bert_tiny, onnx_model, tmp_path):
    import onnx

    from tfaccel.onnx.ort_fusions import fuse_for_onnxruntime

    fused = fuse_for_onnxruntime(onnx_model, tmp_path / "fused.onnx")
    assert "skipped" not in fused, fused  # both libraries' fusions ran and their graphs load in onnxruntime
    assert fused.get("FastGelu", 0) >= 2, fused  # one per transformer layer (bert-tiny has 2)
    # tfaccel's own rewrite of Keras' attention (tfaccel/onnx/attention_fusion.py): every layer's
    assert fused.get("MultiHeadAttention") == 2, fused
    assert fused["nodes_removed"] > 0
    assert len(onnx.load(tmp_path / "fused.onnx").graph.node) < len(onnx.load(onnx_model).graph.node)
    for batch, seq in [(1, 7), (4, 33)]:  # still dynamic in batch and sequence
        x = bert_tiny.make_inputs(batch, seq, seed=2)
        x["padding_mask"][1:, seq // 2:] = 0  # padded rows: the attention's key mask
        np.testing.assert_allclose(OnnxRunner(str(tmp_path / "fused.onnx"))(x)["logits"],
                                   KerasRunner(bert_tiny.model)(x)["logits"], atol=1e-4)
