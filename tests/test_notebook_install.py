"""The notebooks' first cell installs tfaccel from this repository, pinned, the way a fresh Colab runtime runs
it: never the PyPI name `tfaccel` (not ours), only a wheel `make wheel` built or a git URL at a commit."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

import tfaccel

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def first_code_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def with_source(cell: str, value: str) -> str:
    """The cell as a user edits it: TFACCEL_SOURCE set to ``value``."""
    assert cell.count("TFACCEL_SOURCE = ''\n") == 1
    return cell.replace("TFACCEL_SOURCE = ''\n", f"TFACCEL_SOURCE = {value!r}\n")


def test_every_notebook_starts_with_the_same_pinned_install_cell():
    cells = {p.name: first_code_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 5 and len(set(cells.values())) == 1, "the notebooks' install cells differ"
    cell = next(iter(cells.values()))
    assert f"TFACCEL_VERSION = '{tfaccel.__version__}'" in cell
    assert f"tfaccel-{tfaccel.__version__}-py3-none-any.whl" in cell
    for nb in NOTEBOOKS:  # no code anywhere installs the PyPI name
        for c in json.loads(nb.read_text())["cells"]:
            code = [ln for ln in "".join(c["source"]).splitlines() if not ln.lstrip().startswith("#")]
            assert not any(re.search(r"pip.*install.*['\" ]tfaccel(['\" ]|$)", ln) for ln in code), nb.name


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A wheel built from this checkout (what `make wheel` runs) and a fresh virtualenv with only pip in it,
    like a runtime tfaccel was never installed in."""
    root = tmp_path_factory.mktemp("colab")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(root / "dist"), str(REPO)], check=True, capture_output=True, timeout=600)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, capture_output=True, timeout=600)
    return root, root / "venv" / "bin" / "python"


def run_cell(python: Path, code: str) -> subprocess.CompletedProcess:
    # No package index: nothing may come from PyPI. No dependencies: TensorFlow & co. are Colab's own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, timeout=600, cwd="/")


def installed_version(python: Path) -> str | None:
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m\ntry: print(m.version('tfaccel'))\n"
                          "except m.PackageNotFoundError: print('none')"], capture_output=True, text=True, check=True,
                         cwd="/")
    return None if out.stdout.strip() == "none" else out.stdout.strip()


def test_the_install_cell_in_a_fresh_runtime(fresh_venv):
    root, python = fresh_venv
    cell = first_code_cell(NOTEBOOKS[0])
    wheel = next((root / "dist").glob("tfaccel-*.whl"))
    # As shipped (no source set): it stops with what to set, and installs nothing.
    for source, why in (("", "Received: ''"), ("tfaccel", "Received: 'tfaccel'"),
                        ("git+https://github.com/someone/tfaccel.git", "40-hex commit"),
                        ("git+https://github.com/someone/tfaccel.git@main", "40-hex commit"),
                        (str(wheel.with_name("tfaccel-9.9.9-py3-none-any.whl")), "make wheel")):
        proc = run_cell(python, with_source(cell, source))
        assert proc.returncode != 0 and "Set TFACCEL_SOURCE" in proc.stderr and why in proc.stderr, (source, proc.stderr)
        assert installed_version(python) is None
    # The wheel `make wheel` built: installed from that file, pinned to this version.
    proc = run_cell(python, with_source(cell, str(wheel)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tfaccel {tfaccel.__version__}"
    assert installed_version(python) == tfaccel.__version__
    direct = subprocess.run([str(python), "-c", "import importlib.metadata as m; "
                             "print(m.distribution('tfaccel').read_text('direct_url.json'))"],
                            capture_output=True, text=True, check=True, cwd="/").stdout
    assert json.loads(direct)["url"] == wheel.as_uri()  # from our wheel, not an index
    # Run again (a restarted runtime with tfaccel installed): skipped, whatever TFACCEL_SOURCE says.
    proc = run_cell(python, cell)
    assert proc.returncode == 0 and proc.stdout.strip() == f"tfaccel {tfaccel.__version__}", proc.stderr
