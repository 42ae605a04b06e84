"""Magnitude pruning of Keras 3 models (tfaccel.pruning): schedules identical to tfmot's, masks that
keep pruned weights at zero through training (also under MirroredStrategy and mixed_float16), 2:4
sparsity, TensorBoard logging, strip + reload without tfaccel, and the tf_keras route through tfmot."""

import itertools
import json

import numpy as np
import pytest
from conftest import run_python

from tfaccel.pruning import (
    ConstantSparsity,
    PolynomialDecay,
    UpdatePruningStep,
    check_m_by_n,
    deserialize_schedule,
    is_m_by_n_sparse,
    kernel_sparsity,
    m_by_n_mask,
    magnitude_mask,
    prune_low_magnitude,
    prune_scope,
    pruning_state,
    strip_pruning,
)
from tfaccel.pruning.prune import pruning_states


def _fresh(name="bert-tiny"):
    from tfaccel import load_source

    return load_source(name)  # a new model each call: pruning works in place


def _data(src, n=32, seq=16, seed=0, classes=3):
    x = src.make_inputs(n, seq, seed=seed)
    y = np.random.default_rng(seed).integers(0, classes, n)
    return x, y


def _compile(model, lr=1e-2):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def _masked_zero_checker(state):
    """A Keras callback that records, after every optimizer step, whether every masked weight is 0."""
    import keras

    class Checker(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ok, self.updates = [], []

        def on_train_batch_end(self, batch, logs=None):
            self.ok.append(all(np.all(w.variable.numpy()[w.mask.numpy() == 0] == 0) for w in state.weights))
            self.updates.append(state.last_update_step)

    return Checker()


# ------------------------------------------------------------------------------------------------
# Schedules


def _sweep():
    const = [
        {"target_sparsity": t, "begin_step": b, "end_step": e, "frequency": f}
        for t, b, f in itertools.product((0.0, 0.5, 0.875, 0.99), (0, 3, 100), (1, 3, 100))
        for e in (-1, b, b + 7, 1000)
    ]
    poly = [
        {"initial_sparsity": i, "final_sparsity": fs, "begin_step": b, "end_step": e, "power": p, "frequency": f}
        for i, fs, b, p, f in itertools.product((0.0, 0.2), (0.5, 0.9), (0, 5), (1, 2, 3, 0.5), (1, 2, 7))
        for e in (b, b + 1, b + 10, 250)
    ]
    return [("ConstantSparsity", c) for c in const] + [("PolynomialDecay", c) for c in poly]


STEPS = list(range(-2, 300)) + [999, 1000, 1001, 5000]

TFMOT_SWEEP = r"""
import json, sys
import numpy as np, tensorflow as tf
import tensorflow_model_optimization as tfmot   # a throw-away process: its tf.keras switch does not matter
cases, steps = json.load(open(sys.argv[1]))
step = tf.constant(steps, tf.int64)
out = []
for name, config in cases:
    should, sparsity = getattr(tfmot.sparsity.keras, name)(**config)(step)
    out.append([np.asarray(should).tolist(), np.broadcast_to(np.asarray(sparsity), len(steps)).tolist()])
json.dump(out, open(sys.argv[2], "w"))
"""


def test_schedules_give_the_same_values_as_tfmot_at_every_step(tmp_path):
    import tensorflow as tf

    cases = _sweep()
    (tmp_path / "cases.json").write_text(json.dumps([cases, STEPS]))
    proc = run_python(TFMOT_SWEEP, str(tmp_path / "cases.json"), str(tmp_path / "tfmot.json"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads((tmp_path / "tfmot.json").read_text())
    step = tf.constant(STEPS, tf.int64)
    classes = {"ConstantSparsity": ConstantSparsity, "PolynomialDecay": PolynomialDecay}
    pruning_steps = 0
    for (name, config), (w_should, w_sparsity) in zip(cases, want, strict=True):
        should, sparsity = classes[name](**config)(step)
        np.testing.assert_array_equal(np.asarray(should), w_should, err_msg=f"{name}({config}) should_prune")
        got = np.broadcast_to(np.asarray(sparsity, dtype=np.float32), len(STEPS))
        np.testing.assert_array_equal(got, np.asarray(w_sparsity, dtype=np.float32), err_msg=f"{name}({config}) sparsity")
        pruning_steps += int(np.sum(should))
    assert len(cases) == 528 and pruning_steps > 10_000  # the sweep really exercised both branches


def test_schedule_semantics_config_round_trip_and_errors():
    s = PolynomialDecay(0.0, 0.5, begin_step=10, end_step=20, power=3, frequency=5)
    # Values by hand from the formula: final + (initial - final) * (1 - p)^3, p = (step - begin) / (end - begin).
    assert [bool(s(k)[0]) for k in (5, 10, 12, 15, 20, 25)] == [False, True, False, True, True, False]
    np.testing.assert_allclose(float(s(15)[1]), 0.5 - 0.5 * 0.5**3, rtol=1e-7)
    assert float(s(10)[1]) == 0.0 and float(s(20)[1]) == float(s(200)[1]) == np.float32(0.5)
    c = ConstantSparsity(0.75, begin_step=0, frequency=3)
    assert [bool(c(k)[0]) for k in range(7)] == [True, False, False, True, False, False, True]
    assert bool(c(10**6)[0]) is False and bool(c(3 * 10**6)[0]) is True  # end_step=-1: prune forever

    for sched in (s, c):
        assert type(sched).from_config(sched.get_config()) == sched
        assert deserialize_schedule(sched.serialize()) == sched
    # tfmot's get_config form ({"class_name", "config"}) is accepted by from_config too.
    assert PolynomialDecay.from_config(s.serialize()) == s
    with pytest.raises(ValueError, match=r"final_sparsity must be a number in \[0, 1\). Received: final_sparsity=1.0"):
        PolynomialDecay(0.0, 1.0, 0, 10)
    with pytest.raises(ValueError, match="end_step cannot be -1.*Received: end_step=-1"):
        PolynomialDecay(0.0, 0.5, 0, -1)
    with pytest.raises(ValueError, match="end_step must be >= begin_step. Received: begin_step=5, end_step=3"):
        ConstantSparsity(0.5, 5, 3)
    with pytest.raises(ValueError, match="frequency must be > 0. Received: frequency=0"):
        ConstantSparsity(0.5, 0, frequency=0)
    with pytest.raises(ValueError, match="Unknown pruning schedule 'Cubic'"):
        deserialize_schedule({"class_name": "Cubic", "config": {}})


# ------------------------------------------------------------------------------------------------
# Mask math


def test_magnitude_mask_keeps_the_largest_weights_at_the_target_sparsity():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype("float32")
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        threshold, mask = magnitude_mask(w, sparsity)
        mask = mask.numpy()
        k = max(round(w.size * (1 - sparsity)), 1)
        assert int(mask.sum()) == k
        assert np.abs(w[mask == 1]).min() >= np.abs(w[mask == 0]).max(initial=0)
        assert float(threshold) == np.sort(np.abs(w).ravel())[::-1][k - 1]


@pytest.mark.parametrize("shape,axes", [((16, 8), (0,)), ((4, 8, 6), (0, 1)), ((6, 4, 8), (0,)), ((10, 3), (0,))])
def test_2_4_mask_has_two_zeros_in_every_block_along_the_input_axes(shape, axes):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype("float32")
    mask = m_by_n_mask(w, (2, 4), axes).numpy()
    pruned = w * mask
    assert is_m_by_n_sparse(pruned, (2, 4), axes) and not is_m_by_n_sparse(w, (2, 4), axes)
    # Brute force: flatten (output axes, input axes), cut the input dimension into blocks of 4.
    out_axes = tuple(a for a in range(w.ndim) if a not in axes)
    rows = np.transpose(w, out_axes + axes).reshape(int(np.prod([shape[a] for a in out_axes])), -1)
    mrows = np.transpose(mask, out_axes + axes).reshape(rows.shape)
    for r in range(rows.shape[0]):
        for start in range(0, rows.shape[1], 4):
            block, kept = np.abs(rows[r, start:start + 4]), mrows[r, start:start + 4]
            assert kept.sum() == min(2, len(block))  # keep the 2 largest of each full block
            assert block[kept == 1].min() >= block[kept == 0].max(initial=0)
    with pytest.raises(ValueError, match=r"0 < m < n.*Received: sparsity_m_by_n=\(4, 4\)"):
        m_by_n_mask(w, (4, 4), axes)


# ------------------------------------------------------------------------------------------------
# Pruning during training


def test_pruned_weights_stay_zero_after_every_optimizer_step_and_sparsity_reaches_target(tmp_path):
    import tensorflow as tf

    src = _fresh()
    model = src.model
    n_weights = len(model.weights)
    schedule = PolynomialDecay(0.0, 0.5, begin_step=0, end_step=6, frequency=2)
    assert prune_low_magnitude(model, schedule) is model
    state = pruning_state(model)
    names = [w.name for w in state.weights]
    assert len(names) == 14 and any("attention_output" in n for n in names) and "logits" in names
    assert len(model.weights) == n_weights  # masks live beside the model, not in it
    before = {w.name: w.variable.numpy().copy() for w in state.weights}
    _compile(model)
    x, y = _data(src)
    checker = _masked_zero_checker(state)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[UpdatePruningStep(log_dir=tmp_path / "logs", update_freq=4), checker])
    assert state.step == 16
    assert checker.ok == [True] * 16  # zero after every optimizer step, not only at epoch ends
    assert checker.updates[:8] == [None, 2, 2, 4, 4, 6, 6, 6]  # masks recomputed at steps 2, 4, 6 only
    for w in state.weights:
        k, mask = w.variable.numpy(), w.mask.numpy()
        assert 1 - mask.mean() == pytest.approx(0.5, abs=0.5 / mask.size + 1e-9)
        assert np.any(k[mask == 1] != before[w.name][mask == 1])  # the kept weights did train
    # TensorBoard scalars: per-layer and total sparsity, at the logged steps.
    events = {}
    for f in sorted((tmp_path / "logs").glob("events.out.tfevents*")):
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                events.setdefault(v.tag, []).append((e.step, float(tf.make_ndarray(v.tensor))))
    assert events["pruning/total_sparsity"][-1] == (16, pytest.approx(0.5, abs=1e-3))
    assert [s for s, _ in events["pruning/total_sparsity"]] == [4, 8, 8, 12, 16, 16]
    assert events["pruning/total_sparsity"][0][1] == pytest.approx(float(schedule(4)[1]), abs=1e-3)
    assert all(f"pruning/sparsity/{n}" in events for n in names)
    assert events["pruning/target_sparsity"][-1][1] == pytest.approx(0.5)

    stripped = strip_pruning(model)
    assert stripped is model and all(w.constraint is None for w in model.weights)
    assert kernel_sparsity(model)["total"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(ValueError, match="is not being pruned"):
        pruning_state(model)


def test_gpt2_attention_einsum_and_feedforward_kernels_are_pruned():
    import keras

    src = _fresh("gpt2-tiny")
    model = src.model
    chosen = r".*/(query|key|value|attention_output|feedforward_output_dense)"
    with prune_scope(model, ConstantSparsity(0.75, begin_step=0, frequency=1), layers=chosen):
        state = pruning_state(model)
        assert sorted(type(w.layer).__name__ for w in state.weights) == ["Dense"] * 2 + ["EinsumDense"] * 8
        # Two steps per execution and XLA: the masking runs inside the compiled train function.
        model.compile(optimizer=keras.optimizers.Adam(1e-2), steps_per_execution=2, jit_compile=True,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x = src.make_inputs(16, 16)
        checker = _masked_zero_checker(state)
        model.fit(x, np.roll(x["token_ids"], -1, axis=1), batch_size=4, epochs=1, verbose=0,
                  callbacks=[UpdatePruningStep(), checker])
        assert state.step == 4 and checker.ok == [True, True] and checker.updates == [1, 3]
    assert not pruning_states(model)  # the scope stripped it
    sp = kernel_sparsity(model)
    for name, value in sp.items():
        if name != "total":
            want = 0.0 if name.endswith("feedforward_intermediate_dense") else 0.75
            assert value == pytest.approx(want, abs=1e-3), (name, value)


def test_2_4_sparsity_holds_per_block_after_training(tmp_path):
    src = _fresh()
    model = prune_low_magnitude(src.model, sparsity_m_by_n=(2, 4))
    _compile(model)
    x, y = _data(src, n=16)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
    state = pruning_state(model)
    assert state.last_update_step == 1  # as in tfmot: m:n masks are set at the first training step
    model = strip_pruning(model)
    # EinsumDense attention output kernels (heads, head_dim, hidden) are blocked along (heads, head_dim).
    assert check_m_by_n(model, (2, 4)) == {w.name: True for w in state.weights}
    assert kernel_sparsity(model)["total"] == pytest.approx(0.5)


def test_stripped_model_saves_and_reloads_without_tfaccel(tmp_path):
    src = _fresh()
    model = prune_low_magnitude(src.model)
    pruning_state(model).update_masks(sparsity=0.6)  # one-shot: what fit + UpdatePruningStep do on a pruning step
    model = strip_pruning(model)
    model.save(tmp_path / "pruned.keras")
    np.savez(tmp_path / "x.npz", **src.sample_inputs)
    want = model.predict(src.sample_inputs, verbose=0)
    code = (
        "import sys, numpy as np, keras, keras_hub\n"
        "m = keras.saving.load_model(sys.argv[1])\n"
        "d = np.load(sys.argv[2])\n"
        "np.save(sys.argv[3], m.predict({k: d[k] for k in d.files}, verbose=0))\n"
        "ks = [l.kernel.numpy() for l in m._flatten_layers() if isinstance(l, (keras.layers.Dense, keras.layers.EinsumDense))]\n"
        "print(sum(k.size - np.count_nonzero(k) for k in ks) / sum(k.size for k in ks))\n"
        "assert not [n for n in sys.modules if n.startswith(('tfaccel', 'tensorflow_model_optimization'))]\n"
    )
    proc = run_python(code, str(tmp_path / "pruned.keras"), str(tmp_path / "x.npz"), str(tmp_path / "y.npy"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(0.6, abs=1e-3)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=1e-5)


def test_errors_name_the_problem():
    src = _fresh()
    model = prune_low_magnitude(src.model)
    with pytest.raises(ValueError, match="already being pruned. Call strip_pruning"):
        prune_low_magnitude(model)
    with pytest.raises(ValueError, match=r"No Dense/EinsumDense layer matches \['nope'\]"):
        prune_low_magnitude(_fresh().model, layers=["nope"])
    with pytest.raises(ValueError, match="pruning_schedule must be"):
        prune_low_magnitude(_fresh().model, pruning_schedule=0.5)
    with pytest.raises(ValueError, match="log_dir must be"):
        UpdatePruningStep(log_dir="")
    plain = _fresh().model
    _compile(plain)
    x, y = _data(src, n=4)
    with pytest.raises(ValueError, match="is not being pruned.*prune_low_magnitude"):
        plain.fit(x, y, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
    with pytest.warns(UserWarning, match="masks were never updated"):
        strip_pruning(model)


# ------------------------------------------------------------------------------------------------
# Distribution strategy and mixed precision (a fresh process: logical devices are set before TF starts)

DISTRIBUTED = r"""
import json, os, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, keras_hub, numpy as np
from tfaccel.pruning import PolynomialDecay, UpdatePruningStep, prune_low_magnitude, pruning_state, strip_pruning

def run(policy):
    keras.mixed_precision.set_global_policy(policy)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=16,
                                                 intermediate_dim=32, max_sequence_length=16)
        model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None)
        prune_low_magnitude(model, PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=1))
        opt = keras.optimizers.Adam(1e-2)
        if policy == "mixed_float16":
            opt = keras.optimizers.LossScaleOptimizer(opt)
        model.compile(optimizer=opt, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    state = pruning_state(model)
    ok = []

    class Check(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):  # after each optimizer step, on every replica
            ok.append(all(bool(np.all(np.asarray(v)[w.mask.numpy() == 0] == 0))
                          for w in state.weights for v in w.variable.value.values))

    rng = np.random.default_rng(0)
    x = {"token_ids": rng.integers(1, 100, (64, 16)).astype("int32"), "segment_ids": np.zeros((64, 16), "int32"),
         "padding_mask": np.ones((64, 16), "int32")}
    before = [w.variable.numpy().copy() for w in state.weights]
    model.fit(x, rng.integers(0, 3, 64), batch_size=8, epochs=1, verbose=0, callbacks=[UpdatePruningStep(), Check()])
    res = {"policy": policy, "replicas": strategy.num_replicas_in_sync, "optimizer": type(model.optimizer).__name__,
           "mirrored_masks": all(type(w.mask.value).__name__ == "MirroredVariable" for w in state.weights),
           "compute_dtype": model.backbone.transformer_layers[0].compute_dtype, "zero_after_each_step": ok,
           "sparsity": [float(1 - w.mask.numpy().mean()) for w in state.weights],
           "replicas_equal": all(np.array_equal(*[np.asarray(v) for v in w.variable.value.values]) for w in state.weights),
           "kept_changed": all(np.any(w.variable.numpy()[w.mask.numpy() == 1] != b[w.mask.numpy() == 1])
                               for w, b in zip(state.weights, before))}
    strip_pruning(model)
    keras.mixed_precision.set_global_policy("float32")
    return res

results = [run("mixed_float16")]
results.append({"tfmot_loaded": "tensorflow_model_optimization" in sys.modules})  # Keras 3 pruning needs no tfmot
print(json.dumps(results))
"""


def test_masks_hold_under_mirrored_strategy_with_mixed_float16():
    proc = run_python(DISTRIBUTED)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res, modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert modules == {"tfmot_loaded": False}
    assert res["optimizer"] == "LossScaleOptimizer" and res["compute_dtype"] == "float16"
    assert res["replicas"] == 2 and res["mirrored_masks"], res
    assert res["zero_after_each_step"] == [True] * 8, res
    assert res["sparsity"] == [0.5] * 8 and res["replicas_equal"] and res["kept_changed"], res


# ------------------------------------------------------------------------------------------------
# tf_keras models go through tfmot; tf.keras stays Keras 3


TF_KERAS_ROUTE = r"""
import json, os, subprocess, sys
import numpy as np
import tensorflow as tf          # tf.keras not read yet: the case in which tfmot would switch it for good
import tf_keras
from tfaccel.pruning import PolynomialDecay, is_tf_keras_model, callbacks_for, prune_low_magnitude, strip_pruning

rng = np.random.default_rng(0)
x, y = rng.standard_normal((64, 16)).astype("float32"), rng.standard_normal((64, 4)).astype("float32")
model = tf_keras.Sequential([tf_keras.Input((16,)), tf_keras.layers.Dense(32, activation="relu"), tf_keras.layers.Dense(4)])
pruned = prune_low_magnitude(model, PolynomialDecay(0.0, 0.5, begin_step=0, end_step=4, frequency=1))
wrappers = [type(l).__name__ for l in pruned.layers]
pruned.compile("adam", "mse")
pruned.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks_for(pruned))
final = strip_pruning(pruned)
sparsity = [float(1 - np.count_nonzero(l.kernel.numpy()) / l.kernel.numpy().size) for l in final.layers]

# A tfmot schedule object works as it is with a Keras 3 model.
import keras
tfmot = sys.modules["tensorflow_model_optimization"]
k3 = keras.Sequential([keras.Input((16,)), keras.layers.Dense(32), keras.layers.Dense(4)])
prune_low_magnitude(k3, tfmot.sparsity.keras.ConstantSparsity(0.25, begin_step=0, frequency=1))
k3.compile("adam", "mse")
from tfaccel.pruning import UpdatePruningStep
k3.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[UpdatePruningStep()])
strip_pruning(k3)
child = subprocess.run([sys.executable, "-c", "import tensorflow as tf; print(tf.keras.Model.__module__)"],
                       capture_output=True, text=True)
print(json.dumps({
    "wrappers": wrappers, "stripped_is_tf_keras": is_tf_keras_model(final), "sparsity": sparsity,
    "k3_sparsity": [float(1 - np.count_nonzero(l.kernel.numpy()) / l.kernel.numpy().size) for l in k3.layers],
    "env": os.environ.get("TF_USE_LEGACY_KERAS"), "tf_keras_module": tf.keras.Model.__module__,
    "tf_keras_is_keras3": tf.keras.Model is keras.Model, "optimizers": tf.optimizers.Adam is keras.optimizers.Adam,
    "child_tf_keras_module": child.stdout.strip(), "tfmot_loaded": "tensorflow_model_optimization" in sys.modules,
}))
"""

NAIVE_TFMOT = r"""
import os, tensorflow as tf
import tensorflow_model_optimization
print(os.environ.get("TF_USE_LEGACY_KERAS"), tf.keras.Model.__module__)
"""


def test_tf_keras_model_prunes_through_tfmot_and_tf_keras_stays_keras3():
    proc = run_python(TF_KERAS_ROUTE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["tfmot_loaded"] and res["wrappers"] == ["PruneLowMagnitude", "PruneLowMagnitude"]
    assert res["stripped_is_tf_keras"] and res["sparsity"] == [0.5, 0.5]
    assert res["k3_sparsity"] == [0.25, 0.25]
    assert res["env"] is None
    assert res["tf_keras_module"].startswith("keras.") and res["tf_keras_is_keras3"] and res["optimizers"]
    assert res["child_tf_keras_module"].startswith("keras.")
    # The control: importing tfmot plainly does switch tf.keras (so the checks above can fail).
    naive = run_python(NAIVE_TFMOT)
    assert naive.returncode == 0, naive.stderr[-3000:]
    assert naive.stdout.split() == ["1", "tf_keras.src.engine.training"]


