"""Shared fixtures. Tiny configs for unit tests; `large` tests use the real MiniLM / BBC News example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow otherwise reserves nearly all GPU memory at its first GPU op; TensorRT needs some too.
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
REPO = Path(__file__).resolve().parents[1]
# benchmarks/ is code outside the package (make bench); its helpers are importable in tests by module name.
sys.path.insert(0, str(REPO / "benchmarks"))
# Built examples are cached in the repo's .cache unless the caller chose a cache.
os.environ.setdefault("TFACCEL_CACHE", str(REPO / ".cache"))


def pytest_collection_modifyitems(config, items):
    from tfaccel.compat import gpu_devices

    if gpu_devices():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU visible to TensorFlow; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bert_tiny():
    from tfaccel import load_source

    return load_source("bert-tiny")


@pytest.fixture(scope="session")
def bert_tiny_saved_model(bert_tiny, tmp_path_factory) -> Path:
    """bert-tiny through export_saved_model (what the export step writes), once per session; tests only read it."""
    from tfaccel.export import export_saved_model

    return Path(export_saved_model(bert_tiny.model, tmp_path_factory.mktemp("bert_tiny_export") / "sm"))


@pytest.fixture(scope="session")
def bert_tiny_xla(bert_tiny, tmp_path_factory) -> tuple[Path, dict]:
    """bert-tiny through write_xla_saved_model with prompt buckets 16 and 32, once per session: (path, info)."""
    from tfaccel.xla import write_xla_saved_model

    path = tmp_path_factory.mktemp("bert_tiny_xla") / "sm"
    info = write_xla_saved_model(bert_tiny.model, path, buckets=(16, 32))
    return path, info


@pytest.fixture(scope="session")
def onnx_model(bert_tiny_saved_model, tmp_path_factory):
    """bert-tiny exported and converted to ONNX (opset 17) once per session; tests only read it."""
    from tfaccel.onnx import convert_saved_model

    d = tmp_path_factory.mktemp("bert_tiny_onnx")
    return convert_saved_model(bert_tiny_saved_model, d / "model.onnx", opset=17)


@pytest.fixture(scope="session")
def gpt2_tiny():
    from tfaccel import load_source

    return load_source("gpt2-tiny")


@pytest.fixture(scope="session")
def minilm_bbc():
    from tfaccel import load_source

    return load_source("minilm-bbc", progress=print)


def run_python(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter of this venv (no tfaccel unless the code imports it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/")


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tfaccel"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
