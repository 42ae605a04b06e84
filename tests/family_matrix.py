"""The family x step matrix: one tiny model per keras-hub text family (``tiny:<family>``) run through
one pipeline step at a time. Shared by tests/test_families.py and
tools/family_matrix.py (which prints the README table). Not a test module itself.

Every family's source is built once per process (:func:`source`), every family's export once
(:func:`exported`), and the steps that consume a SavedModel (onnx, ort-int8, litert-dynamic) start
from that export, loaded as a SavedModel source with the Keras model's own sample inputs: their
outputs are checked against the export, which was checked against the Keras model.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from pathlib import Path

from tfaccel.examples.families import DECODERS, ENCODERS, FAMILIES  # noqa: F401  (re-exported)

STEPS = ("export", "xla", "int8", "mixed_bfloat16", "onnx", "ort-int8", "litert-dynamic", "prune-structured",
         "generate")
# generate on tiny decoders: short cap and one prompt bucket (the sample prompts are 16 tokens at most)
GENERATE_OPTIONS = dict(max_new_tokens_cap=8, prompt_buckets=(16,), check_new_tokens=4)

_ROOT: Path | None = None
_SOURCES: dict = {}
_RUNS: dict = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        import atexit

        _ROOT = Path(tempfile.mkdtemp(prefix="tfaccel-family-matrix-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


def source(family: str):
    """``tiny:<family>``, built once per process."""
    if family not in _SOURCES:
        from tfaccel import load_source

        _SOURCES[family] = load_source(f"tiny:{family}")
    return _SOURCES[family]


def cells(families=FAMILIES, steps=STEPS):
    """(family, step) pairs of the matrix: generate only for CausalLMs."""
    return [(f, s) for f in families for s in steps if s != "generate" or f in DECODERS]


@dataclasses.dataclass
class Run:
    """One pipeline run: its report, or the TfaccelError it raised."""

    report: object = None
    error: BaseException | None = None
    seconds: float = 0.0
    out: Path | None = None


def _run(key, steps, src) -> Run:
    """Run a pipeline once per key; TfaccelErrors are kept (a refusal), anything else propagates."""
    from tfaccel import Pipeline
    from tfaccel.errors import TfaccelError

    if key not in _RUNS:
        out = _root() / "-".join(key)
        t0 = time.perf_counter()
        try:
            report = Pipeline(steps, shapes=[(1, 16)], measure=False, log=lambda m: None).run(src, out)
            _RUNS[key] = Run(report=report, seconds=time.perf_counter() - t0, out=out)
        except TfaccelError as exc:
            _RUNS[key] = Run(error=exc, seconds=time.perf_counter() - t0)
    return _RUNS[key]


def exported(family: str) -> Run:
    """The family's ``export`` run (its SavedModel feeds onnx, ort-int8 and litert-dynamic)."""
    return _run((family, "export"), ["export"], source(family))


def _saved_model_source(family: str):
    from tfaccel import load_source

    run = exported(family)
    if run.error is not None:
        return None, run.error
    path = run.out / run.report.stage("export").path
    return load_source(str(path)).with_sample_inputs(source(family).sample_inputs), None


def run_step(family: str, step: str) -> Run:
    """The run behind cell (family, step). onnx and ort-int8 share one run (export -> onnx -> ort-int8);
    only when it fails is onnx run alone, so that an ort-int8 failure is not blamed on onnx."""
    from tfaccel.xla import GenerateStep

    if step == "export":
        return exported(family)
    if step in ("onnx", "ort-int8", "litert-dynamic"):
        sm, error = _saved_model_source(family)
        if error is not None:
            return Run(error=error)
        if step == "litert-dynamic":
            return _run((family, step), [step], sm)
        both = _run((family, "onnx-ort-int8"), ["onnx", "ort-int8"], sm)
        if step == "onnx" and both.error is not None:
            return _run((family, "onnx"), ["onnx"], sm)
        return both
    if step == "generate":
        return _run((family, step), [GenerateStep(**GENERATE_OPTIONS)], source(family))
    return _run((family, step), [step], source(family))


def outcome(run: Run) -> tuple[str, str]:
    """("ok", "") or ("refused", "<ErrorType>: <first line of the message>")."""
    if run.error is None:
        return "ok", ""
    return "refused", f"{type(run.error).__name__}: {str(run.error).splitlines()[0]}"
