"""Never destroy what the user has, never show a traceback (issue 22): --overwrite's limits, output
permissions, killed runs' debris swept, SIGTERM/SIGKILL with a child process running, one-line CLI errors
with the right exit code, and the Python API's argument checks.

The CLI cases fail at plan time (fast); the two real runs are bert-tiny and gpt2-tiny."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from tfaccel import Pipeline
from tfaccel.core.files import LOCK, MARKER, StagedOutput, sweep_temporary_folders, temporary_folder
from tfaccel.errors import ArgumentError, InputMismatchError, OutputError

TFACCEL = str(Path(sys.executable).parent / "tfaccel")
NOISE = re.compile(r"^(WARNING: All log messages before absl|[IWEF]\d{4} \d\d:\d\d:)", re.M)


def cli(*args, cwd=None, env=None, timeout=600, **popen) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}  # the CLI must quiet TF itself
    return subprocess.run([TFACCEL, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env={**environ, **(env or {})}, **popen)


def digest(path: Path) -> str:
    """A fingerprint of a file or a folder's names and contents."""
    h = hashlib.sha256()
    paths = [path] if path.is_file() else sorted(path.rglob("*"))
    for p in paths:
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------------------
# --overwrite replaces only what tfaccel wrote


@pytest.fixture(scope="module")
def user_files(tmp_path_factory, bert_tiny):
    """A user's folder: their own files, a .keras model, a folder of notes."""
    root = tmp_path_factory.mktemp("user")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("my notes")
    (root / "data.csv").write_text("text,label\nhello,0\n")
    bert_tiny.model.save(str(root / "m.keras"))
    return root


def test_overwrite_never_replaces_what_tfaccel_did_not_write(user_files):
    before = digest(user_files)
    cases = [  # (cwd, args, what the one line says)
        (user_files, ["optimize", "bert-tiny", "--steps", "export", "--out", ".", "--overwrite"],
         "is the current folder or one of its parents"),
        (user_files / "notes", ["optimize", "bert-tiny", "--steps", "export", "--out", "..", "--overwrite"],
         "is the current folder or one of its parents"),
        (user_files, ["optimize", "m.keras", "--steps", "export", "--out", "m.keras", "--overwrite"],
         "is, holds or is inside the model source"),
        (user_files, ["optimize", "bert-tiny", "--steps", "export", "--out", "data.csv", "--overwrite"],
         "never replaces a file"),
        (user_files, ["optimize", "bert-tiny", "--steps", "export", "--out", "notes", "--overwrite"],
         "was not written by tfaccel"),
        (user_files, ["optimize", "bert-tiny", "--auto", "--out", "notes", "--overwrite"], "was not written by tfaccel"),
        (user_files, ["optimize", "bert-tiny", "--steps", "export", "--out", "notes"], "pass --overwrite"),
    ]
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda c: cli(*c[1], cwd=c[0]), cases))
    for (_cwd, args, message), proc in zip(cases, procs, strict=True):
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    assert digest(user_files) == before, "a refused run changed the user's files"
    assert sorted(p.name for p in user_files.iterdir()) == ["data.csv", "m.keras", "notes"]


def test_overwrite_replaces_a_tfaccel_output_with_umask_permissions(bert_tiny, tmp_path):
    out = tmp_path / "out"
    old_mask = os.umask(0o022)
    try:
        Pipeline(["export"], shapes=[(1, 16)], measure=False, log=lambda m: None).run(bert_tiny, out)
        # mkdtemp gives 0700; an output gets what mkdir gives under the umask, so another account can serve it
        for d in (out, out / "saved_model", out / "stages"):
            assert d.stat().st_mode & 0o777 == 0o755, d
        assert (out / MARKER).is_file() and (out / "saved_model" / "saved_model.pb").stat().st_mode & 0o777 == 0o644
        stamp = json.loads((out / MARKER).read_text())["time"]
        with pytest.raises(OutputError, match="already exists and is not empty.*overwrite=True"):
            Pipeline(["export"], shapes=[(1, 16)], measure=False, log=lambda m: None).run(bert_tiny, out)
        os.umask(0o027)
        Pipeline(["export"], shapes=[(1, 16)], measure=False, log=lambda m: None).run(bert_tiny, out, overwrite=True)
    finally:
        os.umask(old_mask)
    assert json.loads((out / MARKER).read_text())["time"] > stamp  # replaced: it was tfaccel's
    assert out.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial or old folder left beside it


# ------------------------------------------------------------------------------------------------
# Debris of killed runs: swept by the next run to the same place


def test_partials_of_dead_runs_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    gone = dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out = tmp_path / "out"
        dead = tmp_path / f".out.partial-{gone}-abc"
        live = tmp_path / f".out.partial-{sleeper.pid}-def"  # no lock file: its pid decides
        for p in (dead, live):
            (p / "stages").mkdir(parents=True)
        # A partial whose lock is free belongs to a dead run even if its pid was reused (pid 1 always runs).
        reused = tmp_path / ".out.partial-1-ghi"
        reused.mkdir()
        (reused / LOCK).touch()
        # A killed run between moving the old output aside and the new one in: the old one comes back.
        old = tmp_path / f".out.old-{gone}"
        old.mkdir()
        (old / "report.json").write_text("{}")
        removed = StagedOutput(out).sweep()
        assert sorted(p.name for p in removed) == sorted([dead.name, reused.name])
        assert live.is_dir() and not dead.exists() and not reused.exists()
        assert (out / "report.json").is_file() and not old.exists()

        # A lock held by a live process keeps its folder, whatever the pid in the name says.
        held = tmp_path / f".out.partial-{gone}-jkl"
        held.mkdir()
        holder = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"), str(held / LOCK)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "locked"
            StagedOutput(out).sweep()
            assert held.is_dir()
        finally:
            holder.kill()
            holder.wait()
        StagedOutput(out).sweep()
        assert not held.exists()

        # Scratch folders in $TMPDIR: a dead run's is removed, this process's stays while in use.
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
        (tmp_path / "tmp").mkdir()
        stale = tmp_path / "tmp" / f"tfaccel-{gone}-model-export-x1"
        stale.mkdir()
        other = tmp_path / "tmp" / "tfaccel-distributed-x2"  # not ours (no pid): left alone
        other.mkdir()
        with temporary_folder("footprint") as mine:
            assert sweep_temporary_folders() == [stale]
            assert mine.is_dir() and other.is_dir()
        assert not mine.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def _children(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _cmdline(process) -> str:
    """A process's command line, or "" once it has exited (a short-lived child can end between the listing and
    this read, and psutil then raises ZombieProcess / NoSuchProcess)."""
    import psutil

    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_and_sigkill_of_a_real_run_leave_no_child_and_no_debris(bert_tiny, tmp_path):
    """SIGTERM during the load-footprint probes (children, and the model.export baseline in $TMPDIR): the run
    rolls back, stops the children and removes its scratch folders, exit 143. SIGKILL during tf2onnx (a child
    converting for many seconds): the child dies with it at once, and the next run to the same place sweeps
    the partial output."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    term_out, kill_out = tmp_path / "term", tmp_path / "kill"
    runs = {
        "term": (subprocess.Popen([TFACCEL, "optimize", "bert-tiny", "--steps", "export", "--out", str(term_out),
                                   "--shape", "1x16", "--runs", "3"], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True), "rss_before"),
        "kill": (subprocess.Popen([TFACCEL, "optimize", "bert-tiny", "--steps", "export,onnx", "--out", str(kill_out),
                                   "--no-measure"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
                 "tf2onnx"),
    }
    try:
        children: dict[str, list] = {}
        killed_at = None
        deadline = time.monotonic() + 300
        while len(children) < 2 and time.monotonic() < deadline:  # signal each run as soon as its child runs
            for name, (proc, marker) in runs.items():
                found = [c for c in _children(proc.pid) if name not in children and marker in _cmdline(c)]
                if found:
                    children[name] = found
                    if name == "term":
                        assert list(tmp.glob(f"tfaccel-{proc.pid}-model-export-*")), "the baseline is in $TMPDIR"
                    proc.send_signal(signal.SIGTERM if name == "term" else signal.SIGKILL)
                    killed_at = time.monotonic() if name == "kill" else killed_at
                assert proc.poll() is None or name in children, f"the {name} run ended before its {marker} child"
            time.sleep(0.1)
        assert len(children) == 2, f"timed out waiting for the children; saw {sorted(children)}"
        # SIGKILL: no clean-up possible; tf2onnx gets its parent-death signal (it would convert for seconds more)
        kill, _ = runs["kill"]
        kill.wait(timeout=60)
        _wait_for(lambda: not any(_alive(c) for c in children["kill"]), 5, "tf2onnx to die with its parent")
        assert time.monotonic() - killed_at < 10
        assert list(tmp_path.glob(".kill.partial-*")), "the killed run's partial output is left"
        # SIGTERM: handled like Ctrl-C
        term, _ = runs["term"]
        err = term.communicate(timeout=120)[1]
        assert term.returncode == 143, err[-2000:]
        assert "terminated (SIGTERM)" in err and "Traceback" not in err
        _wait_for(lambda: not any(_alive(c) for c in children["term"]), 30, "the footprint probes to stop")
        assert not term_out.exists() and not list(tmp_path.glob(".term.*"))
        assert not list(tmp.glob("tfaccel-*")), "the SIGTERMed run removed its scratch folders"
    finally:
        for proc, _ in runs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    # The next run to the same place sweeps the partial.
    Pipeline(["export"], shapes=[(1, 16)], measure=False, log=lambda m: None).run(bert_tiny, kill_out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kill", "tmp"]


# ------------------------------------------------------------------------------------------------
# Bad CLI invocations: one line, the right exit code, never a traceback


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, gpt2_tiny):
    """A generate SavedModel (gpt2-tiny, vocabulary 300), truncated ONNX files, broken JSON files, an
    unusable data file, a read-only folder and a file where a folder should be."""
    from tfaccel.xla.generate_export import write_generate_saved_model

    root = tmp_path_factory.mktemp("bad")
    write_generate_saved_model(gpt2_tiny.model, root / "gen", max_new_tokens_cap=8, prompt_buckets=(8,),
                               jit_compile=False)
    (root / "trunc.onnx").write_bytes(b"\x08\x07\x12\x07tf2onnx" * 3)  # the first bytes of a real one, cut
    dec = root / "decoder"
    dec.mkdir()
    (dec / "decoder.json").write_text(json.dumps({
        "format": 1, "family": "GPT2CausalLM", "num_layers": 2, "num_kv_heads": 2, "head_dim": 16,
        "vocabulary_size": 300, "max_length": 64, "dtype": "float32", "onnx_file": "decoder.onnx"}))
    (dec / "decoder.onnx").write_bytes(b"\x08\x07\x12\x07tf2onnx")
    baddec = root / "baddec"
    baddec.mkdir()
    (baddec / "decoder.json").write_text('{"family": "GPT2CausalLM",\n "num_layers": 2,,\n}')
    (baddec / "decoder.onnx").write_bytes(b"")
    badcfg = root / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.json").write_text('{"model_type": "bert",\n  "hidden_size": 32\n  "num_layers": 2}')
    np.savez(root / "bad.npz", token_ids=np.ones((4, 16), np.float32), padding_mask=np.ones((4, 16), np.int32))
    (root / "ro").mkdir(mode=0o555)
    (root / "afile").write_text("a file")
    yield root
    (root / "ro").chmod(0o755)


# (args, exit code, text the one line holds); R is the bad_inputs folder, O an output path in it.
BAD_INVOCATIONS = [
    (["optimize", "bert-tiny", "--steps", "export", "--out", "O", "--runs", "0"], 2, "--runs must be at least 1"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "O", "--runs", "-1"], 2, "--runs must be at least 1"),
    (["bench", "bert-tiny", "--runs", "0"], 2, "--runs must be at least 1"),
    (["optimize", "bert-tiny", "--auto", "--out", "O", "--runs", "2"], 2, "--runs must be at least 3"),
    (["optimize", "bert-tiny", "--auto", "--out", "O", "--time-budget", "nan"], 2, "--time-budget must be a number"),
    (["optimize", "bert-tiny", "--auto", "--out", "O", "--time-budget", "-5"], 2, "--time-budget must be a number"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "O", "--warmup", "-1"], 2, "--warmup must be at least 0"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "O", "--shape", "1x128x2"], 2, "--shape is BATCHxSEQ"),
    (["optimize", "bert-tiny", "--steps", "", "--out", "O"], 2, "--steps is empty"),
    (["generate", "R/gen", "--prompt-ids", "1,2", "--max-new-tokens", "0"], 2, "--max-new-tokens must be at least 1"),
    (["generate", "R/gen", "--prompt-ids", "1,300"], 2, "Token id 300 is outside the model's vocabulary [0, 300)"),
    (["generate", "R/gen", "--prompt-ids", "1,2", "--stop-token-id", "300"], 2, "stop token id 300 is outside"),
    (["generate", "R/gen", "--prompt-ids", "1,2", "--threads", "2"], 2, "--threads applies only to ONNX decoders"),
    (["bench", "R/trunc.onnx"], 2, "onnxruntime cannot load"),
    (["generate", "R/decoder", "--prompt-ids", "1,2"], 2, "onnxruntime cannot load"),
    (["generate", "R/baddec", "--prompt-ids", "1,2"], 2, "decoder.json' is not valid JSON: Expecting property name"),
    (["optimize", "R/badcfg", "--steps", "export", "--out", "O"], 2,
     "config.json' is not valid JSON: Expecting ',' delimiter at line 3, column 3"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "O", "--set", "export.jit_compil=true"], 2,
     "Step 'export' has no option 'jit_compil'. Did you mean 'jit_compile'? Its options: jit_compile"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "R/ro/out"], 2, "permission denied"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "R/afile/out"], 2, "is a file, not a folder"),
    (["optimize", "bert-tiny", "--steps", "export", "--out", "O", "--shape", "100000000x16"], 2,
     "--skip-memory-check"),
    (["optimize", "bert-tiny", "--steps", "int4,onnx", "--out", "O"], 2, "Add 'export' before 'int4'"),
    (["optimize", "bert-tiny", "--steps", "export,onnx,tensorrt", "--set", "onnx.fuse=true", "--out", "O"], 2,
     "Drop --set onnx.fuse=true"),
    (["optimize", "bert-tiny", "--steps", "export,xla,prune-structured", "--train-data", "R/bad.npz", "--out", "O"], 2,
     "bad.npz"),
    (["optimize", "bert-tiny", "--auto", "--train-data", "R/bad.npz", "--out", "O"], 2, "bad.npz"),
    (["optimize", "bert-tiny", "--auto", "--train-data", "R/missing.npz", "--out", "O"], 2, "does not exist"),
]


def test_bad_cli_invocations_get_one_line_and_the_right_exit_code(bad_inputs):
    # As root a 0555 folder is writable; root's read-only folder is /proc/sys (where it is mounted so).
    read_only = "/proc/sys" if os.geteuid() == 0 else str(bad_inputs / "ro")
    cases = [c for c in BAD_INVOCATIONS if "R/ro/out" not in c[0] or not os.access(read_only, os.W_OK)]

    def run(case):
        args = [str(bad_inputs / "out") if a == "O" else a.replace("R/ro/", f"{read_only}/").replace(
            "R/", f"{bad_inputs}/") for a in case[0]]
        return cli(*args, cwd=bad_inputs)

    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(run, cases))
    failures = []
    for (args, code, message), proc in zip(cases, procs, strict=True):
        lines = [ln for ln in proc.stderr.splitlines() if not re.match(r"^\[\d\d:\d\d:\d\d\] ", ln)]
        if (proc.returncode != code or "Traceback" in proc.stderr + proc.stdout or NOISE.search(proc.stderr)
                or len(lines) != 1 or not lines[0].startswith("tfaccel: error: ") or message not in lines[0]):
            failures.append(f"tfaccel {' '.join(args)} -> exit {proc.returncode}:\n{proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not (bad_inputs / "out").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real full disk (a 2 MB tmpfs with 100 KB free; bert-tiny's SavedModel needs 500 KB): TensorFlow's own
    write fails inside the export step. Needs root and a mountable tmpfs; skipped otherwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root in a container that allows mount")
    try:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 100_000))
        proc = cli("optimize", "bert-tiny", "--steps", "export", "--out", disk / "out", "--no-measure", cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith("tfaccel: error: the disk is full under"), proc.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # no partial folder, no log file
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_unexpected_errors_name_the_traceback_log_and_exit_1(tmp_path):
    crash = ("import sys, tfaccel.cli as cli\n"
             "def crash(args):\n    return {}['no such key']\n"
             "cli.cmd_steps = crash\nsys.exit(cli.main(sys.argv[1:]))\n")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", crash, "steps"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip()
    assert line.startswith("tfaccel: error: `tfaccel steps` failed unexpectedly: KeyError: 'no such key'"), line
    log = Path(re.search(r"The full traceback is in (\S+);", line).group(1))
    assert log.parent == tmp_path and log.name.startswith("tfaccel-error-")
    assert "Traceback" in log.read_text() and "in crash" in log.read_text()
    verbose = subprocess.run([sys.executable, "-c", crash, "steps", "--verbose"], capture_output=True, text=True,
                             env=env)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr and "in crash" in verbose.stderr
    user = cli("bench", tmp_path / "nope.onnx", "--verbose")  # a user error: exit 2, traceback with --verbose
    assert user.returncode == 2 and "Traceback" in user.stderr and "does not exist" in user.stderr


def test_readme_states_the_guarantees_the_cli_keeps():
    from tfaccel import cli

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Command line"):text.index("\n## ", text.index("## Command line") + 5)]
    for needle in ("--overwrite", "`.tfaccel-output`", "report.json", "current folder", "never a file",
                   "tfaccel-error-", "$TMPDIR", "--verbose", "SIGTERM", "--skip-memory-check"):
        assert needle in section, needle
    for code in (0, cli.EXIT_UNEXPECTED, cli.EXIT_USER_ERROR, cli.EXIT_INTERRUPTED, 128 + signal.SIGTERM):
        assert re.search(rf"\b{code}\b", section), code


# ------------------------------------------------------------------------------------------------
# The Python API says what it expected, with an example


def test_python_api_checks_argument_types(bert_tiny, tmp_path):
    from tfaccel import load_source, optimize_auto
    from tfaccel.errors import PlanError

    cases = [
        (lambda: Pipeline("export"), r"steps is a list of step names or Step objects, e.g. steps=\['export'\]"),
        (lambda: Pipeline(["export"], shapes=(1, 64)), r"for one shape write shapes=\[\(1, 64\)\]"),
        (lambda: Pipeline(["export"], shapes="1x128"), r"shapes=\[\(1, 128\)\].*a string; the CLI's --shape"),
        (lambda: Pipeline(["export"], shapes=[(1, 0)]), r"pair of positive ints"),
        (lambda: Pipeline(["export"], runs=0), r"runs is an int >= 1"),
        (lambda: Pipeline([3]), r"Received: 3 \(int\)"),
        (lambda: Pipeline(["export"]).run("bert-tiny", tmp_path / "o"), r"source is a ModelSource, e.g."),
        (lambda: load_source(123), r"model is a built-in example name, a path or a keras.Model"),
        (lambda: optimize_auto(bert_tiny, tmp_path / "o", shapes=(1, 64)), r"shapes=\[\(1, 64\)\]"),
    ]
    for call, message in cases:
        with pytest.raises(ArgumentError, match=message):
            call()
    with pytest.raises(PlanError, match="time_budget_s must be seconds >= 0"):
        optimize_auto(bert_tiny, tmp_path / "o", time_budget_s=float("nan"))
    assert not (tmp_path / "o").exists()


def test_generate_savedmodel_records_its_vocabulary_and_checks_ids(bad_inputs):
    import tensorflow as tf

    from tfaccel.generation import load_generator
    from tfaccel.xla.generate_export import GENERATE_INFO_FILE

    info = json.loads((bad_inputs / "gen" / GENERATE_INFO_FILE).read_text())
    assert info["vocabulary_size"] == 300 and info["prompt_buckets"] == [8]
    gen = load_generator(bad_inputs / "gen")
    assert gen.vocabulary_size == 300
    for prompt, stop, message in (([[1, -3]], -1, r"Token id -3 is outside the model's vocabulary \[0, 300\)"),
                                  ([[1, 300]], -1, "Token id 300"), ([[1, 2]], -2, "stop token id -2")):
        with pytest.raises(InputMismatchError, match=message):
            gen.generate(prompt, 2, stop)
    assert gen.generate([[1, 299]], 2).token_ids.shape == (1, 4)
    # Without tfaccel (TF Serving's route), the graph refuses the id itself, naming the vocabulary.
    fn = tf.saved_model.load(str(bad_inputs / "gen")).signatures["generate_greedy"]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"token ids must be in \[0, 300\)"):
        fn(token_ids=tf.constant([[1, 300]]), padding_mask=tf.constant([[1, 1]]), max_new_tokens=tf.constant(2),
           stop_token_id=tf.constant(-1))


def test_report_json_is_strict_json():
    from tfaccel.core.report import report_json

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    text = report_json({"cosine": float("nan"), "ms": [1.5, float("inf")], "n": np.float32(2.0)})
    assert json.loads(text, parse_constant=refuse) == {"cosine": None, "ms": [1.5, None], "n": 2.0}
