"""Child processes tfaccel starts (tf2onnx, the load-footprint probes, the serve checks, training workers),
and what happens to them, and to the run, when tfaccel is stopped.

- :func:`child_argv` / :func:`run_child`: every child asks the kernel for a signal when its parent dies
  (Linux ``PR_SET_PDEATHSIG``, set by a small Python shim that then ``exec``s the command, so the child
  keeps its PID, argv and exit status). A SIGKILLed tfaccel (or a killed pytest running one) leaves no
  child behind, on any route.
- :func:`sigterm_as_interrupt`: SIGTERM (what ``timeout``, ``docker stop``, CI cancellation and Kubernetes
  send) handled like Ctrl-C: the running children are stopped and :class:`tfaccel.errors.Terminated` (a
  KeyboardInterrupt) unwinds the run, so staged outputs roll back and scratch folders are removed.

The kernel sends the parent-death signal when the *thread* that started the child ends, so children are
started from threads that wait for them (``subprocess.run`` does; so do the footprint workers).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence

from tfaccel.errors import Terminated

# Runs in each child before its command: ask for a signal when the parent dies, then exec the command.
# argv: [shim, parent pid, signal number, resolved executable, the command's argv...]
_PARENT_DEATH_SHIM = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(1, int(sys.argv[2]), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG\n"
    "    sys.exit('tfaccel: prctl(PR_SET_PDEATHSIG) failed: errno %d' % ctypes.get_errno())\n"
    "if os.getppid() != int(sys.argv[1]):  # the parent died before the request took effect\n"
    "    sys.exit(143)\n"
    "os.execv(sys.argv[3], sys.argv[4:])  # the resolved executable, with the command's own argv\n"
)

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def child_argv(command: Sequence[str], *, death_signal: int = signal.SIGTERM) -> list[str]:
    """The argv that runs ``command`` as a child that gets ``death_signal`` when this process dies.

    Where the OS has no parent-death signal (not Linux), ``command`` itself.

    Raises:
        FileNotFoundError: ``command[0]`` is not an executable file or on PATH (checked here, because
            behind the shim the failure would only show as the child exiting 1).

    Example:
        >>> child_argv([sys.executable, "-c", "print(1)"])[-3:] == [sys.executable, "-c", "print(1)"]
        True
    """
    from tfaccel.compat import parent_death_signal_supported

    command = [str(c) for c in command]
    exe = command[0]
    found = shutil.which(exe)
    if found is None:
        raise FileNotFoundError(f"{exe!r} is not an executable file{'' if os.sep in exe else ' on PATH'}")
    if not parent_death_signal_supported():
        return command
    return [sys.executable, "-c", _PARENT_DEATH_SHIM, str(os.getpid()), str(int(death_signal)), found, *command]


def run_child(command: Sequence[str], *, timeout: float | None = None, capture_output: bool = False,
              text: bool = False, **popen_kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` for tfaccel's children: the child dies with this process (:func:`child_argv`),
    is stopped when this process is terminated (:func:`sigterm_as_interrupt`), and is killed on a timeout
    or any exception while waiting.

    Raises:
        subprocess.TimeoutExpired: the child ran longer than ``timeout`` (it was killed).

    Example:
        >>> run_child([sys.executable, "-c", "print('hi')"], capture_output=True, text=True).stdout
        'hi\\n'
    """
    if capture_output:
        popen_kwargs.setdefault("stdout", subprocess.PIPE)
        popen_kwargs.setdefault("stderr", subprocess.PIPE)
    argv = child_argv(command)
    with subprocess.Popen(argv, text=text, **popen_kwargs) as proc:
        with _live_lock:
            _live.add(proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        except BaseException:
            proc.kill()
            raise
        finally:
            with _live_lock:
                _live.discard(proc)
    return subprocess.CompletedProcess(list(command), proc.returncode, out, err)


def stop_children() -> int:
    """SIGKILL every child :func:`run_child` is waiting for; returns how many there were."""
    with _live_lock:
        procs = list(_live)
    for p in procs:
        with contextlib.suppress(OSError):
            p.kill()
    return len(procs)


@contextlib.contextmanager
def sigterm_as_interrupt(*, redeliver: bool = False) -> Iterator[None]:
    """While inside, SIGTERM stops the running children and raises :class:`tfaccel.errors.Terminated`
    (a KeyboardInterrupt) in the main thread, so ``with``/``finally`` blocks roll back what the run was
    writing. Later SIGTERMs during that clean-up only stop children again.

    Does nothing outside the main thread, or when a SIGTERM handler other than the default is installed
    (the CLI's, a server's): that handler stays in charge.

    Args:
        redeliver: when the block ends because of the SIGTERM, restore the default handler and send
            SIGTERM again, so the process ends the way it would have without tfaccel, after the clean-up
            (for library calls; the CLI reports and exits itself).
    """
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    received: list[int] = []

    def handler(signum, _frame):
        stop_children()
        if not received:
            received.append(signum)
            raise Terminated(signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if received and redeliver:
            os.kill(os.getpid(), signal.SIGTERM)
