"""Files tfaccel writes: never half-written, never over something tfaccel did not write.

- :func:`atomic_file`: one file, through a hidden temporary beside it.
- :class:`StagedOutput`: an output folder (a run's ``--out``, an exported SavedModel, a cached example)
  built in a hidden ``.NAME.partial-PID-*`` folder beside it and moved into place only when complete.
- :func:`dir_size`, :func:`link_tree`: sizes and cheap copies.
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

from tfaccel.errors import OutputError

#: The file every folder written through :class:`StagedOutput` carries: what tells a later
#: ``overwrite`` that tfaccel wrote the folder (and may replace it).
MARKER = ".tfaccel-output"


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
        >>> with StagedOutput("out", overwrite=True) as work:  # doctest: +SKIP
        ...     (work / "report.json").write_text("{}")
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

    # ---------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise OutputError if ``out`` cannot be written (or replaced); nothing is created."""
        out, what, opt = self.out, self.what, self.option
        real = Path(os.path.realpath(out))
        cwd = Path(os.getcwd()).resolve()
        if _is_within(cwd, real):
            raise OutputError(f"{what} {str(out)!r} is the current folder or one of its parents; tfaccel never "
                              f"replaces it. Choose a new folder for {opt}, e.g. {opt} ./out.")
        for p in self.protect:
            rp = Path(os.path.realpath(p))
            if _is_within(rp, real) or _is_within(real, rp):
                raise OutputError(f"{what} {str(out)!r} is or holds the model source {str(p)!r}; tfaccel never "
                                  f"writes over its input. Choose another folder for {opt}.")
        if out.is_symlink() or out.exists():
            if not out.is_dir() or out.is_symlink():
                raise OutputError(f"{what} {str(out)!r} exists and is {'a link' if out.is_symlink() else 'a file'}"
                                  f"; tfaccel writes a folder there and never replaces a file. Choose another {opt}.")
            empty = not any(out.iterdir())
            if not empty and not self.overwrite:
                raise OutputError(f"{what} {str(out)!r} already exists and is not empty. Choose another {opt} or "
                                  "pass --overwrite (it is replaced only if the new run succeeds).")
            if not empty and not written_by_tfaccel(out):
                raise OutputError(f"{what} {str(out)!r} is not empty and was not written by tfaccel (no "
                                  f"{MARKER} or tfaccel report.json in it), so --overwrite does not replace it. "
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
        """Remove partial folders of earlier runs to the same ``out`` whose process is gone."""
        removed = []
        parent = self.out.parent
        if not parent.is_dir():
            return removed
        for prefix in (f".{self.out.name}.partial-", f".{self.out.name}.old-"):
            for p in parent.glob(f"{prefix}*"):
                pid_text = p.name[len(prefix):].split("-", 1)[0]
                if pid_text.isdigit() and not _pid_alive(int(pid_text)) and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
        return removed

    def __enter__(self) -> StagedOutput:
        self.check()
        self.sweep()
        if self.create_parent:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-{os.getpid()}-", dir=self.out.parent))
        # mkdtemp makes the folder 0700; an output gets what a plain mkdir would give under the user's umask,
        # so a model server running under another account can read it.
        path.chmod(0o777 & ~_umask())
        self.path = path
        return self

    def commit(self) -> Path:
        """Write the marker and move the work folder to ``out`` (replacing what was there)."""
        assert self.path is not None, "commit() outside the with block"
        (self.path / MARKER).write_text(json.dumps({"written_by": "tfaccel", "time": time.time(), "pid": os.getpid()}))
        self.check()  # the target may have changed while the run worked
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
        if not self._committed and self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)

