"""Run N training workers on this machine: ``tfaccel train-workers N -- python train.py ...``.

Each worker gets a TF_CONFIG naming all workers on free loopback ports (127.0.0.1 only), so
``tf.distribute.MultiWorkerMirroredStrategy`` (and :class:`~tfaccel.distribute.DistributedModel`
with strategy "auto") forms one cluster. Their output is streamed with a ``[worker i]`` prefix.

When a worker dies, the others block in collective ops waiting for it: MultiWorkerMirroredStrategy
cannot continue with fewer workers. So the launcher stops the whole group and restarts all workers
(on fresh ports), up to ``max_restarts`` times; training resumes from the last checkpoint when the
script uses ``checkpoint_dir`` (TensorFlow's own BackupAndRestore recovers the same way). Each worker
sees its attempt number in ``TFACCEL_RESTART`` (0 on the first start).

Exit status: 0 when every worker exits 0; otherwise the failing worker's code (128+signal if it was
killed by a signal), 124 on ``--timeout``.

On Linux each worker asks the kernel for SIGTERM when the launcher dies (``PR_SET_PDEATHSIG``, set by a
small Python shim that then ``exec``s the command, so the worker keeps its PID and exit status; the shim
every child of tfaccel starts behind, :mod:`tfaccel.core.processes`): a killed launcher (or a killed
pytest running one) leaves no workers behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO

HOST = "127.0.0.1"
EXIT_TIMEOUT = 124


def free_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (bound together, then released).

    Example:
        >>> len(set(free_ports(3)))
        3
    """
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def cluster_tf_config(ports: Sequence[int], index: int, host: str = HOST) -> str:
    """The TF_CONFIG JSON for worker ``index`` of a cluster of workers on ``host:ports``.

    Example:
        >>> json.loads(cluster_tf_config([1234, 1235], 1))["task"]
        {'type': 'worker', 'index': 1}
    """
    return json.dumps({"cluster": {"worker": [f"{host}:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


@dataclasses.dataclass
class LaunchResult:
    """What happened: the final exit status, and every attempt's worker exit codes."""

    returncode: int
    attempts: list[list[int | None]]

    @property
    def restarts(self) -> int:
        return len(self.attempts) - 1


def worker_argv(command: Sequence[str]) -> list[str]:
    """The argv a worker starts with: ``command``, behind the parent-death shim where the OS has one
    (:func:`tfaccel.core.processes.child_argv`, the one every child of tfaccel starts behind).

    Raises:
        FileNotFoundError: ``command[0]`` is not an executable file or on PATH (checked here, because
            behind the shim the failure would only show as a worker exiting 1).
    """
    from tfaccel.core.processes import child_argv

    return child_argv(command)


def _exit_status(code: int) -> int:
    return 128 - code if code < 0 else code


class _Printer:
    def __init__(self, stream: TextIO):
        self.stream = stream
        self.lock = threading.Lock()

    def line(self, text: str) -> None:
        with self.lock:
            self.stream.write(text if text.endswith("\n") else text + "\n")
            self.stream.flush()


def _pump(proc: subprocess.Popen, prefix: str, printer: _Printer) -> None:
    for raw in iter(proc.stdout.readline, b""):
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        # A progress bar redraws its line with carriage returns: keep the last drawing.
        text = next((part for part in reversed(text.split("\r")) if part.strip()), "")
        printer.line(prefix + text)
    proc.stdout.close()


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    """SIGTERM the workers still running (their whole process group), SIGKILL after ``grace`` seconds."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    for p in alive:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()


def launch(
    command: Sequence[str],
    num_workers: int,
    *,
    max_restarts: int = 3,
    timeout: float | None = None,
    restart_delay: float = 1.0,
    grace_seconds: float = 10.0,
    env: dict[str, str] | None = None,
    output: TextIO | None = None,
    host: str = HOST,
) -> LaunchResult:
    """Start ``num_workers`` copies of ``command`` as one MultiWorkerMirroredStrategy cluster.

    Args:
        command: the worker command, e.g. ``["python", "train.py", "--epochs", "3"]``.
        num_workers: workers to start (>= 1).
        max_restarts: group restarts allowed after a worker fails.
        timeout: seconds for the whole run (all attempts) before the workers are killed (exit 124).
        restart_delay: seconds to wait before restarting the group.
        grace_seconds: after SIGTERM, seconds before a worker is SIGKILLed.
        env: extra environment variables for every worker.
        output: where prefixed worker output and launcher messages go (default sys.stdout).
        host: loopback address the workers listen on.

    Returns:
        A :class:`LaunchResult`; ``returncode`` 0 means every worker of the last attempt exited 0.

    Example:
        >>> r = launch([sys.executable, "-c", "import os; print(os.environ['TFACCEL_WORKER_INDEX'])"], 2)  # doctest: +SKIP
        >>> r.returncode  # doctest: +SKIP
        0
    """
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be an int >= 1. Received: num_workers={num_workers!r}")
    if not isinstance(max_restarts, int) or max_restarts < 0:
        raise ValueError(f"max_restarts must be an int >= 0. Received: max_restarts={max_restarts!r}")
    if not command:
        raise ValueError("No worker command given. Example: tfaccel train-workers 2 -- python train.py")
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"The local launcher only listens on loopback. Received: host={host!r}")
    argv = worker_argv(command)
    printer = _Printer(output or sys.stdout)
    say = lambda msg: printer.line(f"[launcher] {msg}")  # noqa: E731
    start = time.monotonic()
    attempts: list[list[int | None]] = []
    for attempt in range(max_restarts + 1):
        ports = free_ports(num_workers, host)
        procs, pumps = [], []
        say(f"attempt {attempt + 1}/{max_restarts + 1}: starting {num_workers} worker(s) on "
            f"{', '.join(f'{host}:{p}' for p in ports)}: {' '.join(command)}")
        try:
            for i in range(num_workers):
                worker_env = {
                    **os.environ, **(env or {}), "TF_CONFIG": cluster_tf_config(ports, i, host),
                    "TFACCEL_WORKER_INDEX": str(i), "TFACCEL_NUM_WORKERS": str(num_workers),
                    "TFACCEL_RESTART": str(attempt), "PYTHONUNBUFFERED": "1",
                }
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=worker_env, start_new_session=True)
                procs.append(proc)
                t = threading.Thread(target=_pump, args=(proc, f"[worker {i}] ", printer), daemon=True)
                t.start()
                pumps.append(t)
            failed, timed_out = None, False
            while True:
                codes = [p.poll() for p in procs]
                failed = next((i for i, c in enumerate(codes) if c not in (None, 0)), None)
                if failed is not None or all(c == 0 for c in codes):
                    break
                if timeout is not None and time.monotonic() - start > timeout:
                    timed_out = True
                    break
                time.sleep(0.2)
        except BaseException:
            _stop(procs, grace=0.0)
            raise
        if failed is not None:
            code = procs[failed].returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            say(f"worker {failed} {how}; stopping the other workers (they wait for it in collective ops)")
        elif timed_out:
            say(f"timeout after {timeout:.0f}s; stopping all workers")
        _stop(procs, grace_seconds)
        for t in pumps:
            t.join(timeout=5)
        attempts.append([p.returncode for p in procs])
        if failed is None and not timed_out:
            say(f"all {num_workers} worker(s) finished (attempt {attempt + 1})")
            return LaunchResult(0, attempts)
        if timed_out:
            return LaunchResult(EXIT_TIMEOUT, attempts)
        if attempt == max_restarts:
            say(f"giving up after {max_restarts} restart(s)")
            return LaunchResult(_exit_status(procs[failed].returncode), attempts)
        say(f"restarting all {num_workers} worker(s) in {restart_delay:g}s "
            f"(restart {attempt + 1} of {max_restarts}); they resume from the last checkpoint if they write one")
        time.sleep(restart_delay)
    raise AssertionError("unreachable")  # pragma: no cover


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tfaccel train-workers",
        usage="tfaccel train-workers N [--max-restarts R] [--timeout S] -- COMMAND ...",
        description="Run N training workers on this machine as one MultiWorkerMirroredStrategy cluster "
                    "(TF_CONFIG on loopback ports); restart them all from the last checkpoint if one fails.",
        epilog="example: tfaccel train-workers 2 --max-restarts 2 -- python train.py --epochs 3",
    )
    p.add_argument("num_workers", type=int, help="number of worker processes")
    p.add_argument("--max-restarts", type=int, default=3, help="group restarts after a failure (default 3)")
    p.add_argument("--timeout", type=float, default=None, help="seconds before all workers are killed (exit 124)")
    p.add_argument("--restart-delay", type=float, default=1.0, help="seconds before restarting (default 1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tfaccel train-workers N [options] -- command ...``; returns the exit status.

    Example:
        >>> main(["2", "--", "python", "train.py"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    cut = argv.index("--") if "--" in argv else len(argv)
    try:
        args = parser.parse_args(argv[:cut])  # also prints --help
    except SystemExit as exc:  # argparse exits on --help (0) and on bad options (2)
        return int(exc.code or 0)
    command = argv[cut + 1:]
    if not command:
        parser.print_usage(sys.stderr)
        print("tfaccel train-workers: error: put the worker command after --, e.g. "
              "tfaccel train-workers 2 -- python train.py", file=sys.stderr)
        return 2
    if args.num_workers < 1:
        print(f"tfaccel train-workers: error: N must be >= 1. Received: {args.num_workers}", file=sys.stderr)
        return 2
    if args.max_restarts < 0:
        print(f"tfaccel train-workers: error: --max-restarts must be >= 0. Received: {args.max_restarts}",
              file=sys.stderr)
        return 2
    try:
        result = launch(command, args.num_workers, max_restarts=args.max_restarts, timeout=args.timeout,
                        restart_delay=args.restart_delay)
    except FileNotFoundError as exc:
        print(f"tfaccel train-workers: error: cannot start the worker command: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tfaccel train-workers: interrupted; workers stopped", file=sys.stderr)
        return 130
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
