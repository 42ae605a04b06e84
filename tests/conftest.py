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
# Files in the order the workers take them (pytest-xdist --dist loadfile --no-loadscope-reorder, see the
# Makefile): longest first, so that no long file starts last while the other workers idle, and the file that
# builds minilm-bbc (test_pruning_structured, at its large tests) starts first while the other workers run long
# files that do not need it. Seconds per file measured with --durations=0 on 2 cores (2026-12-06); files not
# listed follow in collection order (test_families and test_pruning_structured lowered by the cells and the test
# moved out on 2026-12-07). A stale figure only costs balance, never a test. Measured: no faster than
# xdist's own order by number of tests (1813 s on a fresh clone against 1740 s in a warm checkout, 2026-12-06);
# what it buys is that the minilm-bbc build seldom leaves another worker waiting on the cache lock (with three
# workers, the third can reach test_minilm_bbc before the build ends and wait for it).
FILE_SECONDS = {
    "tests/test_pruning_structured.py": 485, "tests/test_families.py": 445, "tests/test_quantization.py": 205,
    "tests/test_minilm_bbc.py": 196, "tests/test_benchmarks.py": 176, "tests/test_distribute_training.py": 173,
    "tests/test_openvino.py": 150, "notebooks/quickstart.ipynb": 134, "notebooks/quantization.ipynb": 122,
    "tests/test_generation_quality.py": 107, "notebooks/pruning.ipynb": 99, "notebooks/distributed.ipynb": 94,
    "notebooks/mixed_precision_xla.ipynb": 91, "tests/test_saved_model.py": 88, "tests/test_cli.py": 81,
    "tests/test_hardening.py": 79, "tests/test_pruning.py": 76, "tests/test_auto.py": 75, "tests/test_cpu_paths.py": 59,
    "tests/test_xla.py": 55, "tests/test_auto_generation.py": 52, "tests/test_generate.py": 43,
    "tests/test_precision.py": 42, "tests/test_pipeline.py": 35, "tests/test_distribute.py": 35,
    "tests/test_branches.py": 34, "tests/test_eval_data.py": 23, "tests/test_onnx_decoder.py": 23,
    "tests/test_export.py": 19,
}


def pytest_report_header(config):
    """Name the CPU at the top of the run: make test's minutes depend on it (CONTRIBUTING.md, Test time). Read
    from /proc/cpuinfo and CPUID, without starting TensorFlow; the features are the ones tfaccel decides on, so
    under an ISA cap (``make test-avx2``) the capped ones, as in ``tfaccel.capabilities().cpu_features``."""
    from tfaccel.compat import cap_cpu_features, cpu_features, cpu_isa_cap, cpu_model

    cap, cap_source = cpu_isa_cap()
    features = cap_cpu_features(cpu_features(), cap)
    has = [name for name, present in features.items() if present]
    lacks = [name for name, present in features.items() if not present]
    return (f"tfaccel: {cpu_model()}, {os.cpu_count()} cores; has {', '.join(has) or 'none'} of the features "
            f"tfaccel.compat decides on; lacks {', '.join(lacks) or 'none'}"
            + (f" (capped by {cap_source})" if cap_source else ""))


def pytest_collection_modifyitems(config, items):
    from tfaccel.compat import gpu_devices

    def file_of(item):
        return Path(str(item.fspath)).resolve().relative_to(REPO).as_posix()

    # A stable sort: a file's own tests keep their order (module fixtures are built once per file and worker).
    items.sort(key=lambda item: -FILE_SECONDS.get(file_of(item), 0))
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


def graph_nodes(saved_model_dir):
    """Every node of a SavedModel's serving_default graph, its functions' bodies included."""
    import tensorflow as tf

    gd = tf.saved_model.load(str(saved_model_dir)).signatures["serving_default"].graph.as_graph_def()
    return [n for f in gd.library.function for n in f.node_def] + list(gd.node)


def run_python(code: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter of this venv (no tfaccel unless the code imports it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd="/")


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "tfaccel"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout)
