"""Files tfaccel writes: never half-written, never over something tfaccel did not write.

- :func:`atomic_file`: one file, through a hidden temporary beside it.
- :class:`StagedOutput`: an output folder (a run's ``--out``, an exported SavedModel, a cached example)
  built in a hidden ``.NAME.partial-PID-*`` folder beside it and moved into place only when complete.
- :func:`temporary_folder`: a scratch folder in ``$TMPDIR`` (``tfaccel-PID-*``) removed when done.
- :func:`read_json_file`: a JSON file the user gave, with an error naming the file and the syntax error.
- :func:`dir_size`, :func:`link_tree`: sizes and cheap copies.

A run that is killed (SIGKILL, a power cut) cannot clean up. Its work and scratch folders hold a lock
(``flock`` on a file inside, released by the kernel when the process dies, whatever killed it); the next
run to the same place, and every run's start for ``$TMPDIR``, removes the folders whose lock is free.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from tfaccel.core.processes import sigterm_as_interrupt
from tfaccel.errors import OutputError, SourceError

#: The file every folder written through :class:`StagedOutput` carries: what tells a later
#: ``overwrite`` that tfaccel wrote the folder (and may replace it).
MARKER = ".tfaccel-output"
#: The lock file inside a work or scratch folder while its process lives (see the module docstring).
LOCK = ".tfaccel-lock"


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Write a file through a hidden temporary beside it: yields the temporary's path; on success it
    replaces ``path``, on any error it is removed, so ``path`` never holds a half-written file.

    Example:
        >>> with atomic_file("model.onnx") as tmp:  # doctest: +SKIP
        ...     onnx.save(model, str(tmp))
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"nothing was written to {tmp} for {path}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dir_size(path: str | os.PathLike) -> int:
    """Bytes in a file, or in every file under a folder."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def link_tree(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a folder using hard links where the file system allows (no extra disk space)."""
    def link_or_copy(s, d):
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link_or_copy)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _hold_lock(folder: Path) -> int | None:
    """Create ``folder/LOCK`` and hold an exclusive lock on it until the fd is closed (or the process dies).
    Returns the fd, or None where the file system has no locks (then the pid in the name decides)."""
    try:
        import fcntl
    except ImportError:  # not on Windows
        return None
    # Locked under another name first, then renamed: a sweeper never sees an unlocked LOCK of a live run.
    tmp = folder / f"{LOCK}.{os.getpid()}"
    fd = os.open(tmp, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # no locks here: without the file, a sweeper goes by the pid in the folder's name
        os.close(fd)
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, folder / LOCK)
    return fd


def _owner_gone(folder: Path, pid: int) -> bool:
    """Whether the process that made ``folder`` (named with its ``pid``) is gone: its lock file is free
    (whatever killed it; a reused pid does not matter), or, without a lock file, no process has that pid."""
    lock = folder / LOCK
    if lock.is_file():
        try:
            import fcntl
        except ImportError:
            return not _pid_alive(pid)
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
    return not _pid_alive(pid)


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)


def _pid_of(name: str, prefix: str) -> int | None:
    text = name[len(prefix):].split("-", 1)[0]
    return int(text) if text.isdigit() else None


#: Name prefix of tfaccel's scratch folders in ``$TMPDIR``: ``tfaccel-PID-WHAT-XXXXXXXX``.
TEMP_PREFIX = "tfaccel-"


@contextlib.contextmanager
def temporary_folder(what: str) -> Iterator[Path]:
    """A scratch folder in ``$TMPDIR`` for this process (``tfaccel-PID-WHAT-XXXXXXXX``), removed on exit.
    If the process is killed first, the next tfaccel run removes it (:func:`sweep_temporary_folders`).

    Example:
        >>> with temporary_folder("model-export") as tmp:
        ...     _ = (tmp / "x").write_text("scratch")
        >>> tmp.exists()
        False
    """
    path = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{what}-"))
    fd = _hold_lock(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        _release_lock(fd)


def sweep_temporary_folders() -> list[Path]:
    """Remove scratch folders of :func:`temporary_folder` in ``$TMPDIR`` left by tfaccel processes that are
    gone (killed before they could clean up); only this user's."""
    removed = []
    tmp = Path(tempfile.gettempdir())
    uid = os.getuid() if hasattr(os, "getuid") else None
    for p in tmp.glob(f"{TEMP_PREFIX}*"):
        pid = _pid_of(p.name, TEMP_PREFIX)
        try:
            mine = uid is None or p.lstat().st_uid == uid
        except OSError:
            continue
        if pid is None or not mine or p.is_symlink() or not p.is_dir() or pid == os.getpid():
            continue
        if _owner_gone(p, pid):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def read_json_file(path: str | os.PathLike, what: str) -> dict:
    """Parse a JSON object file a user gave (a model's config.json, a decoder's decoder.json).

    Raises:
        SourceError: the file cannot be read, is not valid JSON, or holds no JSON object; the message
            names the file, the line and column, and the syntax error.

    Example:
        >>> read_json_file("model/config.json", "the model's config")  # doctest: +SKIP
        {'model_type': 'bert', ...}
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"Cannot read {what} {str(p)!r}: {exc}.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{what[:1].upper() + what[1:]} {str(p)!r} is not valid JSON: {exc.msg} at line "
                          f"{exc.lineno}, column {exc.colno}. Fix or replace the file.") from exc
    if not isinstance(data, dict):
        raise SourceError(f"{what[:1].upper() + what[1:]} {str(p)!r} holds a JSON {type(data).__name__}, not an "
                          "object ({...}). Fix or replace the file.")
    return data


def written_by_tfaccel(folder: str | os.PathLike) -> bool:
    """True when ``folder`` holds tfaccel's marker, or a report.json of a tfaccel run (outputs written
    before the marker existed)."""
    folder = Path(folder)
    if (folder / MARKER).is_file():
        return True
    report = folder / "report.json"
    if not report.is_file():
        return False
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "source" in data and ("stages" in data or "candidates" in data)


def _is_within(path: Path, other: Path) -> bool:
    try:
        path.relative_to(other)
        return True
    except ValueError:
        return False


class StagedOutput:
    """An output folder that appears complete or not at all.

    The work happens in a hidden folder beside ``out`` (``.NAME.partial-PID-XXXX``); :meth:`commit`
    moves it into place (an existing ``out`` is moved aside first and removed only after). Leaving the
    ``with`` block without :meth:`commit` (an error, Ctrl-C, SIGTERM turned into an exception) removes
    the work folder and leaves ``out`` as it was. Partial folders of earlier runs to the same place
    whose process is gone (SIGKILL) are swept when a new one starts.

    ``overwrite`` replaces only what tfaccel wrote: an existing ``out`` must be an empty folder or one
    holding tfaccel's marker (:func:`written_by_tfaccel`). Never a file, never the current folder or
    one of its parents, never a path in ``protect`` (the model source) or one containing it.

    Args:
        out: the folder to create.
        overwrite: replace an existing ``out`` that tfaccel wrote (only on :meth:`commit`).
        protect: paths that must survive the run (e.g. the model source).
        what: what the folder is, for messages ("Output folder", "SavedModel folder").
        option: the flag that chose the path, for messages ("--out").
        create_parent: create missing parent folders (else a missing parent is an error).

    Raises:
        OutputError: ``out`` cannot be written or replaced; the message says why and what to do.

    Example:
        >>> with StagedOutput("out", overwrite=True) as staged:  # doctest: +SKIP
        ...     (staged.path / "report.json").write_text("{}")
        ...     staged.commit()
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, protect: Iterable[str | os.PathLike | None] = (),
                 what: str = "Output folder", option: str = "--out", create_parent: bool = False):
        self.out = Path(out).absolute()
        self.overwrite = overwrite
        self.protect = [Path(p).absolute() for p in protect if p]
        self.what, self.option = what, option
        self.create_parent = create_parent
        self.path: Path | None = None
        self._committed = False
        self._lock: int | None = None
        self._signals: contextlib.ExitStack | None = None

    # ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise OutputError if ``out`` cannot be written (or replaced); nothing is created."""
        out, what, opt = self.out, self.what, self.option
        real = Path(os.path.realpath(out))
        cwd = Path(os.getcwd()).resolve()
        if _is_within(cwd, real):
            example = f"{opt} ./out" if opt.startswith("--") else f"{opt}='out'"
            raise OutputError(f"{what} {str(out)!r} is the current folder or one of its parents; tfaccel never "
                              f"replaces it. Choose a new folder for {opt}, e.g. {example}.")
        for p in self.protect:
            rp = Path(os.path.realpath(p))
            if _is_within(rp, real) or _is_within(real, rp):
                raise OutputError(f"{what} {str(out)!r} is, holds or is inside the model source {str(p)!r}; tfaccel "
                                  f"never writes over its input. Choose another folder for {opt}.")
        if out.is_symlink() or out.exists():
            if not out.is_dir() or out.is_symlink():
                raise OutputError(f"{what} {str(out)!r} exists and is {'a link' if out.is_symlink() else 'a file'}"
                                  f"; tfaccel writes a folder there and never replaces a file. Choose another {opt}.")
            empty = not any(out.iterdir())
            flag = "--overwrite" if opt.startswith("--") else "overwrite=True"
            if not empty and not self.overwrite:
                raise OutputError(f"{what} {str(out)!r} already exists and is not empty. Choose another {opt} or "
                                  f"pass {flag} (it is replaced only if the new run succeeds).")
            if not empty and not written_by_tfaccel(out):
                raise OutputError(f"{what} {str(out)!r} is not empty and was not written by tfaccel (no "
                                  f"{MARKER} or tfaccel report.json in it), so {flag} does not replace it. "
                                  f"Choose another {opt}, or empty or remove that folder yourself.")
        parent = out.parent
        if not parent.exists():
            if self.create_parent:
                return
            raise OutputError(f"The parent folder of {opt}, {str(parent)!r}, does not exist. Create it first.")
        if not parent.is_dir():
            raise OutputError(f"The parent of {opt}, {str(parent)!r}, is a file, not a folder. Choose another {opt}.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"Cannot write in {str(parent)!r} (permission denied), where {opt} would be created. "
                              f"Choose a folder you can write to.")

    def sweep(self) -> list[Path]:
        """Clean up after earlier runs to the same ``out`` that were killed: remove their work folders
        (``.NAME.partial-PID-*``) and, where the kill came in the middle of replacing ``out``, put the
        previous output back (``.NAME.old-PID`` when ``out`` is missing) or remove it (when the new one
        is in place). A folder whose process still runs is left alone."""
        removed = []
        parent = self.out.parent
        if not parent.is_dir():
            return removed
        for kind in ("partial", "old"):
            prefix = f".{self.out.name}.{kind}-"
            for p in sorted(parent.glob(f"{prefix}*")):
                pid = _pid_of(p.name, prefix)
                if pid is None or pid == os.getpid() or p.is_symlink() or not p.is_dir() or not _owner_gone(p, pid):
                    continue
                if kind == "old" and not os.path.lexists(self.out):
                    os.replace(p, self.out)  # killed between moving the old output aside and the new one in
                    continue
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
        return removed

    def __enter__(self) -> StagedOutput:
        self.check()
        self.sweep()
        sweep_temporary_folders()
        try:
            if self.create_parent:
                self.out.parent.mkdir(parents=True, exist_ok=True)
            path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent))
        except OSError as exc:
            raise OutputError(f"Cannot create {self.what.lower()} {str(self.out)!r}: {_os_reason(exc)}. Choose a "
                              f"folder you can write to for {self.option}.") from exc
        # mkdtemp makes the folder 0700; an output gets what a plain mkdir would give under the user's umask,
        # so a model server running under another account can read it.
        path.chmod(0o777 & ~_umask())
        self.path = path
        self._lock = _hold_lock(path)
        # SIGTERM rolls the work folder back like Ctrl-C does, then ends the process as it would have
        # (unless a caller, such as the CLI, handles SIGTERM itself).
        self._signals = contextlib.ExitStack()
        self._signals.enter_context(sigterm_as_interrupt(redeliver=True))
        return self

    def commit(self) -> Path:
        """Write the marker and move the work folder to ``out`` (replacing what was there)."""
        assert self.path is not None, "commit() outside the with block"
        try:
            (self.path / MARKER).write_text(json.dumps({"written_by": "tfaccel", "time": time.time(),
                                                        "pid": os.getpid()}))
        except OSError as exc:
            raise OutputError(f"Cannot finish {self.what.lower()} {str(self.out)!r}: {_os_reason(exc)}. Nothing "
                              "was written there.") from exc
        self.check()  # the target may have changed while the run worked
        (self.path / LOCK).unlink(missing_ok=True)  # the lock stays held (open fd) until __exit__
        target = self.out
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            try:
                os.replace(self.path, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, target)
        self._committed = True
        return target

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._committed and self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
            _release_lock(self._lock)
            self._lock = None
        finally:
            if self._signals is not None:
                self._signals, signals = None, self._signals
                signals.close()


def _os_reason(exc: OSError) -> str:
    """'permission denied' / 'no space left on device' ...: what an OSError says, without the traceback."""
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc)
