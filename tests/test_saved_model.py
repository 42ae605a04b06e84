"""Every SavedModel tfaccel writes holds each weight once (keras-team/keras#23553 stores them twice), serves
under ``saved_model_cli run`` and matches the Keras model; a SavedModel not made by Keras goes through `xla`.

What is counted: :func:`tfaccel.saved_model.stored_values` sums the sizes of all variables in the
SavedModel's checkpoint (``variables/variables``, from ``tf.train.load_checkpoint``). Once per weight means
that sum equals ``model.count_params()`` of the model written: the float32 model for export and xla, the
quantized model (int8 kernels, their float32 scales and the float layers left) for int8.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_python

from tfaccel import Pipeline, load_source
from tfaccel.core.artifact import KerasRunner, SavedModelRunner
from tfaccel.core.validation import compare_outputs
from tfaccel.saved_model import stored_values, write_saved_model
from tfaccel.servable import check_servable
from tfaccel.xla.xla_export import write_xla_saved_model_from_saved_model


def _xla_functions(saved_model_dir) -> list[str]:
    """Functions in the SavedModel's library marked for XLA compilation (as tests/test_xla.py reads them)."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((saved_model_dir / "saved_model.pb").read_bytes())
    return [f.signature.name for f in sm.meta_graphs[0].graph_def.library.function if f.attr["_XlaMustCompile"].b]


@pytest.fixture(scope="module")
def written(bert_tiny, bert_tiny_saved_model, bert_tiny_xla, tmp_path_factory):
    """bert-tiny as tfaccel writes it: export (export_saved_model), xla (write_xla_saved_model, buckets 16 and
    32), both the session's shared copies, and int8 (as the int8 step writes it); with the model each was
    written from, the tolerance of its step and a plain Keras model.export."""
    from tfaccel.quantization import QuantizationConfig
    from tfaccel.quantization.int8_kernels import int8_kernels
    from tfaccel.quantization.int8_step import INT8_TOLERANCE
    from tfaccel.quantization.keras_quantize import quantize_model

    d = tmp_path_factory.mktemp("written")
    model = bert_tiny.model
    qmodel, _ = quantize_model(model, QuantizationConfig("int8"), copy=True)
    with int8_kernels(qmodel, "xla"):
        write_saved_model(qmodel, d / "int8", jit_compile=True)
    model.export(str(d / "model_export"), format="tf_saved_model", verbose=False)
    return {
        # name -> (folder, model written, tolerance vs the float Keras model: the step's default_tolerance)
        "export": (bert_tiny_saved_model, model, 1e-4),
        "xla": (bert_tiny_xla[0], model, 1e-3),
        "int8": (d / "int8", qmodel, INT8_TOLERANCE),
        "model_export": d / "model_export",
    }


def test_keras_model_export_stores_every_weight_twice(written, bert_tiny):
    # The defect being fixed, measured with the same counter: two copies of every weight (+ dropout seeds).
    assert stored_values(written["model_export"]) >= 2 * bert_tiny.model.count_params()


@pytest.mark.parametrize("name", ["export", "xla", "int8"])
def test_each_weight_is_stored_once(written, name):
    path, model, _ = written[name]
    assert stored_values(path) == model.count_params()


def test_single_copy_savedmodels_are_smaller_than_model_export(written):
    from tfaccel.core.files import dir_size

    assert dir_size(written["export"][0]) < dir_size(written["model_export"])


@pytest.mark.parametrize("name", ["export", "xla", "int8"])
def test_serves_under_saved_model_cli_and_matches_keras(written, bert_tiny, name):
    path, _, tol = written[name]
    x = bert_tiny.make_inputs(2, 20, seed=5)
    got = check_servable(path, inputs=x)["outputs"]["logits"]
    want = KerasRunner(bert_tiny.model)(x)["logits"]
    if isinstance(tol, float):
        np.testing.assert_allclose(got, want, atol=tol)
    else:  # int8: the step's tolerance (cosine vs the float model)
        assert not compare_outputs({"logits": want}, {"logits": got}).breaches(tol)


def test_xla_savedmodel_is_still_marked_for_xla(written):
    assert _xla_functions(written["xla"][0])
    assert _xla_functions(written["int8"][0])
    assert not _xla_functions(written["export"][0])


def test_xla_rewrap_of_a_keras_export_drops_the_second_copy(written, bert_tiny, tmp_path):
    write_xla_saved_model_from_saved_model(written["model_export"], tmp_path / "xla")
    assert stored_values(tmp_path / "xla") == bert_tiny.model.count_params()
    x = bert_tiny.make_inputs(2, 12, seed=2)
    np.testing.assert_allclose(SavedModelRunner(str(tmp_path / "xla"))(x)["output_0"],
                               KerasRunner(bert_tiny.model)(x)["logits"], atol=1e-3)


# --------------------------------------------------------------------------------------------------
# A SavedModel that no Keras made: plain tf.Module + tf.saved_model.save, two signatures.

def _plain_tf_saved_model(path) -> dict[str, np.ndarray]:
    import tensorflow as tf

    class MeanPoolClassifier(tf.Module):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.embeddings = tf.Variable(rng.standard_normal((100, 16)).astype("float32"))
            self.kernel = tf.Variable(rng.standard_normal((16, 3)).astype("float32"))
            self.bias = tf.Variable(rng.standard_normal(3).astype("float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids"),
                                      tf.TensorSpec([None, None], tf.int32, name="padding_mask")])
        def serve(self, token_ids, padding_mask):
            m = tf.cast(padding_mask, tf.float32)[..., None]
            h = tf.reduce_sum(tf.nn.embedding_lookup(self.embeddings, token_ids) * m, 1)
            h = h / tf.maximum(tf.reduce_sum(m, 1), 1.0)
            return {"logits": tf.nn.gelu(h) @ self.kernel + self.bias}

        @tf.function(input_signature=[tf.TensorSpec([None, 16], tf.float32, name="features")])
        def head(self, features):
            return {"scores": tf.nn.softmax(features @ self.kernel + self.bias)}

    module = MeanPoolClassifier()
    tf.saved_model.save(module, str(path), signatures={"serving_default": module.serve, "head": module.head})
    x = {"token_ids": np.random.default_rng(1).integers(1, 100, (3, 9)).astype("int32"),
         "padding_mask": np.ones((3, 9), "int32")}
    x["padding_mask"][0, 5:] = 0
    return {"inputs": x, "logits": module.serve(**x)["logits"].numpy(),
            "values": sum(int(np.prod(v.shape)) for v in module.variables)}


# Runs in a fresh process without tfaccel: are the reloaded signatures' functions still marked for XLA?
_RELOADED_XLA = r"""
import json, sys
import tensorflow as tf
loaded = tf.saved_model.load(sys.argv[1])
out = {}
for name, fn in loaded.signatures.items():
    lib = fn.graph.as_graph_def().library.function
    out[name] = sum(1 for f in lib if f.attr["_XlaMustCompile"].b)
print("XLA " + json.dumps(out))
"""


def test_savedmodel_only_source_through_xla(tmp_path):
    made = _plain_tf_saved_model(tmp_path / "plain")
    src = load_source(str(tmp_path / "plain"))
    assert src.kind == "saved_model"
    report = Pipeline(["xla"], measure=False, log=lambda m: None).run(src, tmp_path / "out")
    st = report.stage("xla")
    assert st.status == "ok" and st.comparison["max_abs_diff"] < 1e-4  # vs the source SavedModel
    final = tmp_path / "out" / "saved_model"
    # variables kept as variables (not frozen into the graph), each once
    assert stored_values(final) == made["values"]
    # served the way TF Serving loads it, and equal to the tf.Module's own output
    got = check_servable(final, inputs=made["inputs"])["outputs"]["logits"]
    np.testing.assert_allclose(got, made["logits"], atol=1e-5)
    # every signature compiled, still after a reload in a process without tfaccel
    proc = run_python(_RELOADED_XLA, str(final))
    assert proc.returncode == 0, proc.stderr[-2000:]
    marked = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("XLA "))[4:])
    assert sorted(marked) == ["head", "serving_default"] and all(n >= 1 for n in marked.values()), marked
    head = SavedModelRunner(str(final), signature="head")({"features": np.ones((2, 16), "float32")})
    np.testing.assert_allclose(head["scores"].sum(1), 1.0, rtol=1e-5)


def test_report_compares_size_and_memory_with_model_export(bert_tiny, tmp_path):
    report = Pipeline(["export"], shapes=[(1, 8)], runs=2, warmup=1, log=lambda m: None).run(
        bert_tiny, tmp_path / "out")
    base, st = report.model_export, report.stage("export")
    assert base["stored_values"] >= 2 * bert_tiny.model.count_params()
    assert st.stored_values == bert_tiny.model.count_params()
    assert st.size_bytes < base["size_bytes"] and base["load_rss_bytes"] > 0 and st.load_rss_bytes > 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["model_export"]["stored_values"] == base["stored_values"]
    assert "size vs model.export" in (tmp_path / "out" / "report.md").read_text()


def test_savedmodel_with_ops_xla_cannot_compile_fails_naming_them(tmp_path):
    import tensorflow as tf

    from tfaccel.errors import StepError

    class Stringy(tf.Module):
        def __init__(self):
            self.w = tf.Variable(np.ones((4, 2), "float32"))

        @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
        def serve(self, x):
            return {"y": tf.cast(tf.strings.length(tf.strings.as_string(x)), tf.float32) @ self.w}

    module = Stringy()
    tf.saved_model.save(module, str(tmp_path / "sm"), signatures={"serving_default": module.serve})
    with pytest.raises(StepError, match=r"AsString.*Drop 'xla'"):
        Pipeline(["xla"], measure=False, log=lambda m: None).run(load_source(str(tmp_path / "sm")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_saved_model_the_step_loaded_is_run_by_the_first_runner_only(bert_tiny, bert_tiny_saved_model):
    """A step that loaded what it wrote (generate does, to check its tokens) hands that object to the stage's
    first runner instead of a second load; the artifact lets go of it, and a later runner loads the folder."""
    import tensorflow as tf

    from tfaccel.core.artifact import Artifact

    loaded = tf.saved_model.load(str(bert_tiny_saved_model))
    artifact = Artifact(kind="saved_model", path=str(bert_tiny_saved_model), loaded=loaded)
    first = artifact.runner()
    assert first._loaded is loaded and artifact.loaded is None
    second = artifact.runner()
    assert second._loaded is not loaded
    x = bert_tiny.sample_inputs
    np.testing.assert_allclose(first(x)["logits"], second(x)["logits"], atol=1e-6)
    np.testing.assert_allclose(first(x)["logits"], KerasRunner(bert_tiny.model)(x)["logits"], atol=1e-5)
