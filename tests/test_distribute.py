"""tfaccel.distribute in this process: config, strategy helpers, input pipeline, the custom loop's Keras
conventions, step-exact checkpoint resume, the launcher, the benchmark function.

Multi-replica numerics (MirroredStrategy on logical CPUs, MultiWorkerMirroredStrategy, killing a
worker) need fresh processes: tests/test_distribute_training.py.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tfaccel.distribute import (
    DistributeConfig,
    DistributedModel,
    clone_model,
    input_pipeline,
    launcher,
    make_strategy,
    per_example_loss_fn,
    set_logical_cpus,
    tf_config,
    worker_info,
)
from tfaccel.errors import TfaccelError

# ------------------------------------------------------------------------------------------------
# Config and strategy


def test_config_round_trips_and_names_bad_values():
    cfg = DistributeConfig(strategy="mirrored", devices=["/cpu:0", "/cpu:1"], per_replica_batch_size=4,
                           dtype_policy="mixed_float16", jit_compile=True, checkpoint_dir="/tmp/x",
                           checkpoint_every_steps=10, shuffle_buffer=100, seed=3)
    assert DistributeConfig.from_config(json.loads(json.dumps(cfg.get_config()))) == cfg
    assert cfg.devices == ("/cpu:0", "/cpu:1")
    bad = [
        ({"strategy": "tpu"}, "strategy='tpu'"),
        ({"per_replica_batch_size": 0}, "per_replica_batch_size=0"),
        ({"dtype_policy": "fp16"}, "dtype_policy='fp16'"),
        ({"training_loop": "keras"}, "training_loop='keras'"),
        ({"devices": "/cpu:0"}, "devices='/cpu:0'"),
        ({"checkpoint_every_steps": 5}, "checkpoint_dir=None"),
        ({"training_loop": "fit", "checkpoint_dir": "/tmp/c"}, "training_loop='fit'"),
        ({"jit_compile": "yes"}, "jit_compile='yes'"),
    ]
    for kwargs, needle in bad:
        with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            DistributeConfig(**kwargs)
    with pytest.raises(ValueError, match="Unknown DistributeConfig fields"):
        DistributeConfig.from_config({"batch": 3})


def test_tf_config_is_parsed_and_checked(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert tf_config() is None and worker_info() == (0, 1)
    monkeypatch.setenv("TF_CONFIG", launcher.cluster_tf_config([1111, 2222, 3333], 2))
    assert tf_config()["task"] == {"type": "worker", "index": 2}
    assert worker_info() == (2, 3)
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(TfaccelError, match="not valid JSON"):
        tf_config()
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 5}}))
    with pytest.raises(TfaccelError, match="outside the 1 workers"):
        tf_config()


def test_strategy_errors_say_what_to_do(monkeypatch):
    import tensorflow as tf

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(TfaccelError, match="train-workers"):
        make_strategy("multi_worker")
    with pytest.raises(ValueError, match="kind='ps'"):
        make_strategy("ps")
    tf.constant(1.0)  # TensorFlow is initialised from here on
    have = len(tf.config.list_logical_devices("CPU"))
    set_logical_cpus(have)  # the current count is accepted
    with pytest.raises(TfaccelError, match="run_with_logical_cpus"):
        set_logical_cpus(have + 1)
    # One device: OneDeviceStrategy (no MirroredStrategy overhead).
    assert isinstance(make_strategy("auto", devices=["/cpu:0"]), tf.distribute.OneDeviceStrategy)


# ------------------------------------------------------------------------------------------------
# Input pipeline


def test_epoch_batches_are_deterministic_and_resume_at_the_exact_batch():
    import tensorflow as tf

    examples = tf.data.Dataset.range(50)

    def batches(epoch, skip=0):
        ds = input_pipeline.epoch_batches(examples, epoch, 8, shuffle_buffer=50, seed=7, skip_steps=skip)
        return [b.tolist() for b in ds.as_numpy_iterator()]

    full, again, resumed, other_epoch = batches(1), batches(1), batches(1, skip=4), batches(2)
    assert full == again
    assert len(full) == 6 and all(len(b) == 8 for b in full)  # 50 // 8, the incomplete batch dropped
    assert resumed == full[4:]
    assert other_epoch != full
    assert sorted(sum(full, [])) != sum(full, [])  # shuffled
    assert input_pipeline.count_steps(examples, 8) == 6
    assert input_pipeline.count_steps(examples, 8, steps_per_epoch=2) == 2
    with pytest.raises(ValueError, match="fewer than one global batch"):
        input_pipeline.count_steps(tf.data.Dataset.range(3), 8)


def test_batched_dataset_is_rejected_with_the_fix(bert_tiny):
    import tensorflow as tf

    x = bert_tiny.sample_inputs
    y = np.zeros(len(x["token_ids"]), "int32")
    input_pipeline.check_unbatched(tf.data.Dataset.from_tensor_slices((x, y)), bert_tiny.model)
    with pytest.raises(ValueError, match=r"unbatch\(\)"):
        input_pipeline.check_unbatched(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), bert_tiny.model)
    with pytest.raises(ValueError, match="needs labels"):
        input_pipeline.as_example_dataset(x)
    with pytest.raises(ValueError, match="same number of examples"):
        input_pipeline.as_example_dataset(x, y[:3])


# ------------------------------------------------------------------------------------------------
# Model building


def test_per_example_loss_matches_the_compiled_reduction():
    import keras

    y_true = np.array([0, 2, 1, 1])
    logits = np.random.default_rng(0).standard_normal((4, 3)).astype("float32")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    per_example = np.asarray(per_example_loss_fn(loss)(y_true, logits))
    assert per_example.shape == (4,)
    np.testing.assert_allclose(per_example.mean(), float(loss(y_true, logits)), rtol=1e-6)
    by_name = np.asarray(per_example_loss_fn("sparse_categorical_crossentropy")(y_true, keras.ops.softmax(logits)))
    np.testing.assert_allclose(by_name, per_example, rtol=1e-5)
    with pytest.raises(ValueError, match="loss=None"):
        per_example_loss_fn(None)


def test_clone_keeps_the_keras_hub_class_weights_and_applies_a_dtype_policy(bert_tiny):
    model = bert_tiny.model
    clone = clone_model(model)
    assert type(clone) is type(model)
    np.testing.assert_array_equal(np.asarray(clone(bert_tiny.sample_inputs)), np.asarray(model(bert_tiny.sample_inputs)))
    mixed = clone_model(model, "mixed_bfloat16")
    assert type(mixed) is type(model)
    assert mixed.backbone.dtype_policy.name == "mixed_bfloat16"
    assert mixed.get_layer("logits").dtype_policy.name == "mixed_bfloat16"
    assert [t.dtype for t in mixed.inputs] == [t.dtype for t in model.inputs]  # int32 token inputs stay int32
    out = np.asarray(mixed(bert_tiny.sample_inputs), "float32")
    # bf16 compute: logits agree with float32 to about 2 significant digits
    np.testing.assert_allclose(out, np.asarray(model(bert_tiny.sample_inputs)), atol=0.05)


def _tiny_builder(dropout=0.1):
    def build():
        import keras
        import keras_hub

        keras.utils.set_random_seed(0)
        backbone = keras_hub.models.BertBackbone(vocabulary_size=100, num_layers=1, num_heads=2, hidden_dim=16,
                                                 intermediate_dim=32, max_sequence_length=16, dropout=dropout)
        model = keras_hub.models.BertTextClassifier(backbone=backbone, num_classes=3, preprocessor=None,
                                                    dropout=dropout)
        model.compile(optimizer=keras.optimizers.Adam(3e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return model
    return build


def _tiny_data(n=48, seq=8):
    rng = np.random.default_rng(1)
    x = {"token_ids": rng.integers(1, 100, (n, seq)).astype("int32"), "segment_ids": np.zeros((n, seq), "int32"),
         "padding_mask": np.ones((n, seq), "int32")}
    return x, (x["token_ids"][:, 0] % 3).astype("int32")


def test_custom_loop_keeps_keras_conventions_and_matches_fit():
    import keras

    x, y = _tiny_data()

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.events = []

        def on_train_begin(self, logs=None):
            self.events.append(("train_begin",))

        def on_epoch_begin(self, epoch, logs=None):
            self.events.append(("epoch_begin", epoch))

        def on_train_batch_end(self, batch, logs=None):
            self.events.append(("batch_end", batch, sorted(logs)))

        def on_epoch_end(self, epoch, logs=None):
            self.events.append(("epoch_end", epoch, sorted(logs)))

        def on_train_end(self, logs=None):
            self.events.append(("train_end",))

    common = dict(strategy="one_device", devices=["/cpu:0"], per_replica_batch_size=8, shuffle_buffer=48, seed=2)
    # Both loops see the same batches in the same order every epoch; dropout 0 (Keras fit and the
    # custom loop trace the model differently, so their dropout draws differ).
    fit_dm = DistributedModel(_tiny_builder(0.0), training_loop="fit", **common)
    custom_dm = DistributedModel(_tiny_builder(0.0), training_loop="custom", **common)
    fit_hist = fit_dm.fit(x, y, epochs=2, verbose=0)
    rec = Recorder()
    out = io.StringIO()
    stdout, sys.stdout = sys.stdout, out
    try:
        hist = custom_dm.fit(x, y, epochs=2, verbose=2, callbacks=[rec])
    finally:
        sys.stdout = stdout
    assert custom_dm.training_loop == "custom" and fit_dm.training_loop == "fit"
    for a, b in zip(custom_dm.get_weights(), fit_dm.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(hist.history["loss"], fit_hist.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(hist.history["accuracy"], fit_hist.history["accuracy"], atol=1e-6)
    assert hist is custom_dm.model.history
    steps = len(y) // 8
    assert rec.events[0] == ("train_begin",) and rec.events[1] == ("epoch_begin", 0)
    assert rec.events[2:2 + steps] == [("batch_end", i, ["accuracy", "loss"]) for i in range(steps)]
    assert rec.events[2 + steps] == ("epoch_end", 0, ["accuracy", "loss"])
    assert rec.events[-2:] == [("epoch_end", 1, ["accuracy", "loss"]), ("train_end",)]
    assert len(hist.history["loss"]) == 2 and hist.history["loss"][1] < hist.history["loss"][0]
    assert "6/6" in out.getvalue() and "loss:" in out.getvalue()  # Keras' progress output
    assert int(custom_dm.model.optimizer.iterations.numpy()) == 2 * steps
    # evaluate aggregates over all batches like Keras evaluate
    ev, ev_ref = custom_dm.evaluate(x, y), fit_dm.evaluate(x, y)
    assert ev["accuracy"] == pytest.approx(ev_ref["accuracy"], abs=1e-6)
    assert ev["loss"] == pytest.approx(ev_ref["loss"], rel=1e-4)

    class StopAfter3(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                self.model.stop_training = True

    custom_dm.fit(x, y, epochs=3, verbose=0, callbacks=[StopAfter3()])
    assert int(custom_dm.model.optimizer.iterations.numpy()) == 2 * steps + 3


def test_wraps_a_model_instance_with_its_compile_settings_and_a_transform(bert_tiny):
    import keras
    import tensorflow as tf

    original = clone_model(bert_tiny.model)
    original.compile(optimizer=keras.optimizers.Adam(2e-3),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    before = [w.copy() for w in original.get_weights()]
    seen = {}

    def freeze_backbone(model):  # the hook wrappers that add or change variables use
        seen["in_scope"] = tf.distribute.has_strategy()
        model.backbone.trainable = False
        return model

    dm = DistributedModel(original, strategy="one_device", devices=["/cpu:0"], per_replica_batch_size=4,
                          model_transform=freeze_backbone)
    assert seen["in_scope"]
    assert type(dm.model) is type(original) and dm.model is not original
    assert dm.model.optimizer is not original.optimizer
    assert float(dm.model.optimizer.learning_rate) == pytest.approx(2e-3)
    x = bert_tiny.sample_inputs
    y = np.arange(len(x["token_ids"])) % 3
    hist = dm.fit(x, y, epochs=2, verbose=0)
    assert set(hist.history) == {"loss", "accuracy"}
    backbone_ids = {id(v) for v in dm.model.backbone.weights}
    changed = {id(v) for v, w in zip(dm.model.weights, before, strict=True) if not np.array_equal(v.numpy(), w)}
    assert changed and not changed & backbone_ids  # only the head trained
    for a, b in zip(original.get_weights(), before, strict=True):  # the user's model is untouched
        np.testing.assert_array_equal(a, b)
    plain = dm.unwrap()
    assert type(plain) is type(original)
    np.testing.assert_allclose(np.asarray(plain(x)), np.asarray(dm.model(x)), atol=1e-6)
    uncompiled = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="optimizer=None"):
        DistributedModel(uncompiled, strategy="one_device", devices=["/cpu:0"])
    with pytest.raises(ValueError, match="Received: int"):
        DistributedModel(3, strategy="one_device", devices=["/cpu:0"])


CKPT_COMMON = dict(strategy="one_device", devices=["/cpu:0"], per_replica_batch_size=8, shuffle_buffer=48, seed=5,
                   training_loop="custom")


@pytest.fixture(scope="module")
def uninterrupted_weights():
    dm = DistributedModel(_tiny_builder(), **CKPT_COMMON)
    dm.fit(*_tiny_data(), epochs=2, verbose=0)
    return dm.get_weights()


@pytest.mark.parametrize("every, crash_after, resume_at", [
    (4, 10, "ckpt-8: epoch 2, step 2, optimizer iterations 8"),  # mid-epoch
    (3, 7, "ckpt-6: epoch 2, step 0, optimizer iterations 6"),  # a scheduled save on an epoch's last step
])
def test_checkpoint_resume_is_step_exact(uninterrupted_weights, tmp_path, capsys, every, crash_after, resume_at):
    """A run that crashes and resumes from its last checkpoint ends with the weights of an uninterrupted run
    (6 steps per epoch; dropout on, so the seed-generator states must be restored too)."""
    import keras

    x, y = _tiny_data()

    class Crash(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == crash_after:
                raise RuntimeError("simulated crash")

    ckpt = dict(CKPT_COMMON, checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every_steps=every)
    crashed = DistributedModel(_tiny_builder(), **ckpt)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit(x, y, epochs=2, verbose=0, callbacks=[Crash()])
    resumed = DistributedModel(_tiny_builder(), **ckpt)
    assert resumed.training_loop == "custom"
    capsys.readouterr()
    hist = resumed.fit(x, y, epochs=2, verbose=0)
    assert resume_at in capsys.readouterr().err
    assert int(resumed.model.optimizer.iterations.numpy()) == 12  # 2 epochs x 6 steps, none twice
    assert len(hist.history["loss"]) == 1  # the resumed run's History holds the epoch it trained in
    for a, b in zip(resumed.get_weights(), uninterrupted_weights, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    resumed.fit(x, y, epochs=2, verbose=0)  # a finished run is not trained again
    assert "nothing left to train" in capsys.readouterr().err
    assert int(resumed.model.optimizer.iterations.numpy()) == 12


# ------------------------------------------------------------------------------------------------
# Launcher (no TensorFlow in the workers: fast)

WORKER_ECHO = "import os, json; c = json.loads(os.environ['TF_CONFIG']); print(c['task']['index'], c['cluster']['worker'])"


def test_launcher_writes_tf_config_on_loopback_and_prefixes_output():
    out = io.StringIO()
    result = launcher.launch([sys.executable, "-c", WORKER_ECHO], 3, output=out)
    assert result.returncode == 0 and result.attempts == [[0, 0, 0]]
    lines = out.getvalue().splitlines()
    worker_lines = {line.split("] ", 1)[0] + "]": line.split("] ", 1)[1] for line in lines if line.startswith("[worker")}
    assert sorted(worker_lines) == ["[worker 0]", "[worker 1]", "[worker 2]"]
    for i in range(3):
        index, rest = worker_lines[f"[worker {i}]"].split(" ", 1)
        assert int(index) == i
        addresses = ast.literal_eval(rest)  # the printed list of "host:port"
        assert len(addresses) == 3 and all(a.startswith("127.0.0.1:") for a in addresses)
        assert len({a.split(":")[1] for a in addresses}) == 3


FAIL_FIRST = ("import os, sys, time\n"
              "attempt = int(os.environ['TFACCEL_RESTART']); index = int(os.environ['TFACCEL_WORKER_INDEX'])\n"
              "if index == 1 and attempt == 0:\n    sys.exit(3)\n"
              "if index == 0 and attempt == 0:\n    time.sleep(600)  # blocked, as in a collective\n"
              "print('ok', attempt)\n")


def test_launcher_restarts_the_whole_group_when_a_worker_dies():
    out = io.StringIO()
    result = launcher.launch([sys.executable, "-c", FAIL_FIRST], 2, max_restarts=2, restart_delay=0.1,
                             grace_seconds=2, output=out)
    assert result.returncode == 0
    assert result.restarts == 1
    assert result.attempts[0][1] == 3 and result.attempts[0][0] != 0  # the blocked worker was stopped
    assert result.attempts[1] == [0, 0]
    text = out.getvalue()
    assert "worker 1 exited with code 3" in text and "restarting all 2 worker(s)" in text
    assert "[worker 0] ok 1" in text and "[worker 1] ok 1" in text


def test_launcher_gives_up_after_max_restarts_and_returns_the_failure():
    out = io.StringIO()
    result = launcher.launch([sys.executable, "-c", "import sys; sys.exit(5)"], 2, max_restarts=1,
                             restart_delay=0.1, output=out)
    assert result.returncode == 5 and result.restarts == 1
    assert "giving up after 1 restart(s)" in out.getvalue()
    killed = launcher.launch([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 1,
                             max_restarts=0, output=io.StringIO())
    assert killed.returncode == 128 + 9


def test_launcher_main_parses_the_command_line(capsys):
    assert launcher.main(["2", "--max-restarts", "0", "--", sys.executable, "-c", "print('hi')"]) == 0
    assert "[worker 1] hi" in capsys.readouterr().out
    assert launcher.main(["2"]) == 2
    assert "put the worker command after --" in capsys.readouterr().err
    assert launcher.main(["2", sys.executable, "-c", "print(1)"]) == 2  # the command must follow --
    assert launcher.main(["--help"]) == 0
    assert "usage: tfaccel train-workers N" in capsys.readouterr().out
    assert launcher.main(["0", "--", sys.executable]) == 2
    assert launcher.main(["1", "--timeout", "1", "--", sys.executable, "-c", "import time; time.sleep(60)"]) == 124
    assert launcher.main(["1", "--", "/nonexistent/python"]) == 2
    with pytest.raises(ValueError, match="host='10.0.0.1'"):
        launcher.launch(["true"], 1, host="10.0.0.1")


def test_worker_argv_puts_the_parent_death_shim_in_front_only_where_the_os_has_it(monkeypatch):
    from tfaccel import compat

    monkeypatch.setattr(compat, "parent_death_signal_supported", lambda: True)
    argv = launcher.worker_argv([sys.executable, "-c", "print(1)"])
    assert argv[:2] == [sys.executable, "-c"] and "PR_SET_PDEATHSIG" in argv[2]
    assert argv[3] == str(os.getpid()) and argv[5:] == [sys.executable, "-c", "print(1)"]
    monkeypatch.setattr(compat, "parent_death_signal_supported", lambda: False)
    assert launcher.worker_argv(["python3", "train.py"]) == ["python3", "train.py"]
    with pytest.raises(FileNotFoundError, match="'no-such-trainer' is not an executable file on PATH"):
        launcher.worker_argv(["no-such-trainer", "x"])


@pytest.mark.skipif(not __import__("tfaccel.compat", fromlist=["x"]).parent_death_signal_supported(),
                    reason="parent-death signals are Linux-only (prctl); elsewhere workers are stopped by launch()")
def test_workers_do_not_outlive_a_killed_launcher(tmp_path):
    import signal
    import subprocess
    import time

    worker = ("import os, sys, time; open(os.path.join(sys.argv[1], str(os.getpid())), 'w').close(); "
              "print('argv0', sys.argv[0]); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-m", "tfaccel.distribute.launcher", "2", "--max-restarts", "0", "--",
                             sys.executable, "-c", worker, str(tmp_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def alive(pid):
        try:
            return "State:\tZ" not in (Path("/proc") / str(pid) / "status").read_text()
        except FileNotFoundError:
            return False

    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(p.name) for p in tmp_path.iterdir()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
        proc.send_signal(signal.SIGKILL)  # no chance to stop its workers itself
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "a worker outlived its killed launcher"
    finally:
        proc.kill()
        for p in tmp_path.iterdir():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(p.name), signal.SIGKILL)


# ------------------------------------------------------------------------------------------------
# Benchmark function


def test_benchmark_step_time_returns_a_row():
    from distribute_bench import benchmark_step_time

    row = benchmark_step_time("tiny", per_replica_batch_size=4, seq=16, steps=3, warmup_steps=1)
    assert row["replicas"] >= 1 and row["global_batch"] == 4 * row["replicas"]
    for name in ("plain_fit", "distributed_fit", "distributed_custom_loop"):
        assert row[name]["step_ms"] > 0 and row[name]["examples_per_s"] > 0
    assert set(row["speedup"]) == {"distributed_fit", "distributed_custom_loop"}
    with pytest.raises(ValueError, match="model='gpt'"):
        benchmark_step_time("gpt")


def test_module_import_does_not_initialise_tensorflow():
    from conftest import run_python

    r = run_python("import tfaccel.distribute, sys\n"
                   "from tensorflow.python.eager import context\n"
                   "print(context.context()._context_handle is None, 'tensorflow_model_optimization' in sys.modules)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[-2:] == ["True", "False"]
    assert os.environ.get("TF_USE_LEGACY_KERAS") in (None, "", "0")
