"""Pick a tf.distribute strategy: MirroredStrategy on one machine, MultiWorkerMirroredStrategy from
TF_CONFIG on many, and logical CPU devices so CPU-only machines can run several replicas.

TensorFlow fixes its devices and its cluster when it initialises (the first op, device listing or
model build). Logical CPU devices and MultiWorkerMirroredStrategy must therefore be set up before
that: call :func:`set_logical_cpus` / :func:`make_strategy` first thing in a script, or run the code
in a fresh interpreter with :func:`run_with_logical_cpus` (notebooks, tests).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tfaccel.errors import TfaccelError

STRATEGY_KINDS = ("auto", "mirrored", "multi_worker", "one_device")


def _tf_initialized() -> bool:
    from tensorflow.python.eager import context

    # No public probe exists; if TensorFlow renames this, the RuntimeErrors below still say what to do.
    return getattr(context.context(), "_context_handle", None) is not None


def set_logical_cpus(num_cpus: int) -> None:
    """Split the CPU into ``num_cpus`` logical devices (/cpu:0 ... /cpu:N-1) for MirroredStrategy.

    Must run before TensorFlow initialises in this process. Calling it again with the same number is
    a no-op.

    Args:
        num_cpus: number of logical CPU devices, >= 1.

    Raises:
        ValueError: ``num_cpus`` is not a positive int.
        TfaccelError: TensorFlow is already initialised with a different device list.

    Example:
        >>> set_logical_cpus(2)  # doctest: +SKIP
        >>> make_strategy("mirrored").num_replicas_in_sync  # doctest: +SKIP
        2
    """
    if not isinstance(num_cpus, int) or isinstance(num_cpus, bool) or num_cpus < 1:
        raise ValueError(f"num_cpus must be an int >= 1. Received: num_cpus={num_cpus!r}")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    too_late = TfaccelError(
        f"TensorFlow is already initialised in this process, so its CPU cannot be split into {num_cpus} logical "
        f"devices any more. Call tfaccel.distribute.set_logical_cpus({num_cpus}) before any TensorFlow op or "
        "model build, or run the code in a fresh interpreter with tfaccel.distribute.run_with_logical_cpus(...)."
    )
    if _tf_initialized():
        if len(tf.config.list_logical_devices("CPU")) == num_cpus:
            return
        raise too_late
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_cpus)
    except RuntimeError as exc:
        raise too_late from exc


def tf_config() -> dict[str, Any] | None:
    """The parsed and checked TF_CONFIG environment variable, or None when it is not set.

    Raises:
        TfaccelError: TF_CONFIG is not JSON or lacks ``cluster`` / ``task``.

    Example:
        >>> os.environ.pop("TF_CONFIG", None) and None
        >>> tf_config() is None
        True
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except ValueError as exc:
        raise TfaccelError(f"TF_CONFIG is not valid JSON ({exc}). Received: TF_CONFIG={raw!r}") from None
    cluster, task = cfg.get("cluster"), cfg.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise TfaccelError(
            'TF_CONFIG needs {"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": i}}. '
            f"Received: TF_CONFIG={raw!r}"
        )
    workers = cluster.get("worker", [])
    if task["type"] == "worker" and not 0 <= int(task["index"]) < len(workers):
        raise TfaccelError(
            f"TF_CONFIG task index {task['index']} is outside the {len(workers)} workers listed in cluster.worker."
        )
    return cfg


def worker_info(strategy=None) -> tuple[int, int]:
    """(this worker's index, number of workers): from the strategy's cluster, else TF_CONFIG, else (0, 1).

    Example:
        >>> worker_info()  # doctest: +SKIP
        (0, 1)
    """
    if strategy is not None:
        resolver = getattr(strategy, "cluster_resolver", None)
        if resolver is not None and resolver.task_type is not None:
            return _position(resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id)
    cfg = tf_config()
    if cfg is None:
        return 0, 1
    return _position(cfg["cluster"], cfg["task"]["type"], cfg["task"]["index"])


def _position(cluster: dict, task_type: str, task_id) -> tuple[int, int]:
    """(worker index, number of workers) of a task in a cluster; a ``chief`` task counts as worker 0."""
    n = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    index = int(task_id) + (1 if task_type == "worker" and "chief" in cluster else 0)
    return index, max(n, 1)


def is_chief(strategy=None) -> bool:
    """True on the worker that writes checkpoints and prints progress (worker 0 or the ``chief`` task)."""
    if strategy is not None:
        resolver = getattr(strategy, "cluster_resolver", None)
        if resolver is not None and resolver.task_type is not None:
            if resolver.task_type == "chief":
                return True
            return resolver.task_type == "worker" and resolver.task_id == 0 and \
                "chief" not in resolver.cluster_spec().as_dict()
    return worker_info(strategy)[0] == 0


def is_multi_worker(strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy (where Keras 3 ``fit`` fails: keras-team/keras#20585)."""
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def make_strategy(kind: str = "auto", devices: Sequence[str] | None = None, logical_cpus: int | None = None):
    """Build the distribution strategy for this process.

    Args:
        kind: "auto" (MultiWorkerMirroredStrategy when TF_CONFIG lists more than one worker, otherwise
            MirroredStrategy over all GPUs, or over all logical CPU devices on a CPU-only machine;
            OneDeviceStrategy when that is a single device), "mirrored", "multi_worker" (needs
            TF_CONFIG) or "one_device".
        devices: devices for "mirrored" / "one_device", e.g. ["/cpu:0", "/cpu:1"]; default all GPUs,
            else all logical CPUs.
        logical_cpus: on a machine without GPUs, split the CPU into this many logical devices first
            (see :func:`set_logical_cpus`; only possible before TensorFlow initialises).

    Returns:
        A ``tf.distribute.Strategy``.

    Raises:
        ValueError: unknown ``kind``.
        TfaccelError: "multi_worker" without TF_CONFIG, or TensorFlow initialised too early.

    Example:
        >>> strategy = make_strategy("mirrored")
        >>> strategy.num_replicas_in_sync >= 1
        True
    """
    if kind not in STRATEGY_KINDS:
        raise ValueError(f"Unknown strategy kind. Use one of {STRATEGY_KINDS}. Received: kind={kind!r}")
    import tensorflow as tf

    from tfaccel.compat import gpu_devices

    cfg = tf_config()
    n_workers = worker_info()[1] if cfg else 1
    if kind == "multi_worker" or (kind == "auto" and n_workers > 1):
        if cfg is None:
            raise TfaccelError(
                "strategy 'multi_worker' needs the TF_CONFIG environment variable describing the cluster. "
                "Start the workers with `tfaccel train-workers N -- python train.py`, which writes it."
            )
        if _tf_initialized():
            raise TfaccelError(
                "MultiWorkerMirroredStrategy must be created before TensorFlow runs any op in this process "
                "(TensorFlow fixes its cluster when it initialises). Build the DistributedModel (or call "
                "tfaccel.distribute.make_strategy()) first thing in the script, before building datasets or models."
            )
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as exc:
            raise TfaccelError(f"MultiWorkerMirroredStrategy could not start ({exc}). Create it before any other "
                               "TensorFlow work in the process.") from exc
    if logical_cpus is not None and not gpu_devices():
        set_logical_cpus(logical_cpus)
    if devices is None:
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    devices = list(devices)
    if not devices:
        raise ValueError(f"devices must name at least one device. Received: devices={devices!r}")
    if kind == "auto" and len(devices) == 1:
        # One replica: OneDeviceStrategy costs nothing over plain Keras; MirroredStrategy adds ~8 ms a
        # step (measured on the tiny BERT, benchmark_step_time).
        return tf.distribute.OneDeviceStrategy(devices[0])
    if kind == "one_device":
        if len(devices) != 1:
            raise ValueError(f"strategy 'one_device' takes exactly one device. Received: devices={devices!r}")
        return tf.distribute.OneDeviceStrategy(devices[0])
    return tf.distribute.MirroredStrategy(devices)


def logical_cpu_prelude(num_cpus: int) -> str:
    """Python source that splits the CPU into ``num_cpus`` logical devices; run it before anything else."""
    if not isinstance(num_cpus, int) or num_cpus < 1:
        raise ValueError(f"num_cpus must be an int >= 1. Received: num_cpus={num_cpus!r}")
    return f"import tfaccel.distribute.strategy as _s; _s.set_logical_cpus({num_cpus})\n"


def run_with_logical_cpus(
    script: str | os.PathLike | None = None,
    args: Sequence[str] = (),
    *,
    code: str | None = None,
    num_cpus: int = 2,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    capture_output: bool = True,
) -> subprocess.CompletedProcess:
    """Run a script (or code) in a fresh interpreter whose CPU is split into ``num_cpus`` logical devices.

    For notebooks and tests, where TensorFlow is usually initialised already and the logical device
    list can no longer change.

    Args:
        script: path of a Python file, run as ``__main__`` with ``args`` as its sys.argv[1:].
        args: command-line arguments for the script.
        code: Python source to run instead of a script.
        num_cpus: logical CPU devices.
        timeout: seconds before the child is killed (subprocess.TimeoutExpired).
        env: extra environment variables.
        capture_output: capture stdout/stderr as text (else they go to this process's streams).

    Returns:
        The ``subprocess.CompletedProcess`` (check ``returncode``, ``stdout``, ``stderr``).

    Example:
        >>> r = run_with_logical_cpus(code="import tensorflow as tf; print(len(tf.config.list_logical_devices('CPU')))")  # doctest: +SKIP
        >>> r.stdout.strip()  # doctest: +SKIP
        '2'
    """
    if (script is None) == (code is None):
        raise ValueError("Pass exactly one of script= or code=. Received: "
                         f"script={script!r}, code={'<code>' if code else None}")
    prelude = logical_cpu_prelude(num_cpus)
    if script is not None:
        path = Path(script).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"Script {str(path)!r} does not exist.")
        body = (f"import runpy, sys\nsys.argv = [{str(path)!r}] + sys.argv[1:]\n"
                f"runpy.run_path({str(path)!r}, run_name='__main__')\n")
    else:
        body = code
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"), **(env or {})}
    full_env.pop("TF_CONFIG", None) if "TF_CONFIG" not in (env or {}) else None
    from tfaccel.core.processes import run_child

    return run_child([sys.executable, "-c", prelude + body, *map(str, args)], capture_output=capture_output,
                     text=True, timeout=timeout, env=full_env)
