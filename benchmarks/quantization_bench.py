"""Benchmark rows for the quantized artifacts, measured in one run beside the plain float32 export.

Rows (each an artifact served the way a user would serve it):

* ``model.export fp32``: ``model.export(path, format="tf_saved_model")``, the baseline of every ratio;
* ``tfaccel export fp32``: the ``export`` step;
* ``int8 (onednn)``, ``int8 (xla)``, ``int8 (keras+xla)``: the ``int8`` step in its kernel forms;
* ``int4``: the ``int4`` step;
* ``onnxruntime fp32``, ``onnxruntime dynamic int8``: the ``onnx`` and ``ort-int8`` steps (peers);
* ``litert dynamic``: the ``litert-dynamic`` step, in the LiteRT interpreter (peer).

Timing is interleaved (every round calls each row in turn, the order rotating), so background load on
a shared machine hits all rows alike; compare the ratios, not the milliseconds, across runs.

    python benchmarks/quantization_bench.py bert-base minilm-bbc --out bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tfaccel.core.timer import time_interleaved

# Converters first (tf2onnx runs in a child process that needs a few GB for BERT-base), while few
# artifacts are loaded in this process.
DEFAULT_ROWS = ("model.export fp32", "tfaccel export fp32", "onnxruntime fp32", "onnxruntime dynamic int8",
                "litert dynamic", "int8 (onednn)", "int8 (xla)", "int8 (keras+xla)", "int4")


def _builders():
    from tfaccel.export import ExportStep
    from tfaccel.onnx import OnnxStep, OrtInt8Step
    from tfaccel.quantization.int8_step import Int4Step, Int8Step
    from tfaccel.quantization.litert import LiteRTDynamicStep

    # row name -> (step factory, name of the row whose artifact it consumes; None = the Keras model)
    return {
        "tfaccel export fp32": (ExportStep, None),
        "int8 (onednn)": (lambda: Int8Step(kernel="onednn"), None),
        "int8 (xla)": (lambda: Int8Step(kernel="xla"), None),
        "int8 (keras+xla)": (lambda: Int8Step(kernel="keras"), None),
        "int4": (Int4Step, None),
        "onnxruntime fp32": (lambda: OnnxStep(opset=17), "tfaccel export fp32"),
        "onnxruntime dynamic int8": (OrtInt8Step, "onnxruntime fp32"),
        "litert dynamic": (LiteRTDynamicStep, "tfaccel export fp32"),
    }


def quantization_rows(source, work_dir: str | Path, *, shapes=((1, 128),), rows=DEFAULT_ROWS, runs: int = 20,
                      max_seconds: float = 60.0, log=print) -> dict[str, Any]:
    """Build every row's artifact for ``source``, check it, and time all rows interleaved.

    Args:
        source: a :class:`tfaccel.ModelSource` with a Keras model (e.g. ``load_source("bert-base")``).
        work_dir: an empty scratch folder for the artifacts.
        shapes: (batch, sequence) pairs to time.
        rows: which rows (names from ``DEFAULT_ROWS``); "model.export fp32" is always the baseline.
        runs: timed calls per row and shape (fewer if a row spends ``max_seconds``).

    Returns:
        ``{"source", "reference_accuracy", "rows": [{"name", "size_bytes", "size_vs_baseline",
        "accuracy", "max_abs_diff", "min_cosine", "build_seconds", "timings": [...], "error"}]}``.

    Example:
        >>> res = quantization_rows(load_source("bert-base"), "/tmp/qb", runs=10)  # doctest: +SKIP
        >>> [(r["name"], r["timings"][0]["speedup"]) for r in res["rows"]]  # doctest: +SKIP
    """
    from tfaccel.core.artifact import Artifact, KerasRunner, SavedModelRunner, output_names_of
    from tfaccel.core.files import dir_size
    from tfaccel.core.step import StepContext
    from tfaccel.core.validation import classification_accuracy, compare_outputs

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ref_runner = KerasRunner(source.model, source.dict_inputs)
    ref_out = ref_runner(source.sample_inputs)
    has_acc = source.eval_labels is not None and source.task == "classification"
    ref_acc = classification_accuracy(ref_runner, source.eval_inputs, source.eval_labels) if has_acc else None
    result: dict[str, Any] = {"source": source.name, "reference_accuracy": ref_acc, "rows": []}
    builders = _builders()
    artifacts: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    names = ["model.export fp32"]
    for r in rows:  # each row after the rows it is built from (ort-int8 needs onnx, which needs the export)
        chain = [r]
        while chain[-1] in builders and builders[chain[-1]][1] is not None:
            chain.append(builders[chain[-1]][1])
        names += [c for c in reversed(chain) if c not in names]
    for name in names:
        row: dict[str, Any] = {"name": name, "error": None, "timings": []}
        result["rows"].append(row)
        t0 = time.perf_counter()
        try:
            if name == "model.export fp32":
                path = work / "model-export"
                source.model.export(str(path), format="tf_saved_model", verbose=False)
                art = Artifact(kind="saved_model", path=str(path))
                loaded = SavedModelRunner(str(path))
                refs = output_names_of(source.model) or []

                def runner(x, loaded=loaded, refs=refs):
                    out = loaded(x)
                    return {refs[0]: next(iter(out.values()))} if len(out) == 1 and len(refs) == 1 else out
            else:
                factory, parent = builders[name]
                if parent is None:
                    src = Artifact(kind="keras", model=source.model, dict_inputs=source.dict_inputs,
                                   input_names=source.input_names)
                elif parent in artifacts:
                    src = artifacts[parent]
                else:
                    raise RuntimeError(f"needs the row {parent!r}, which was not built")
                stage = work / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "_")
                stage.mkdir()
                art = factory().apply(src, StepContext(source=source, stage_dir=stage, log=log))
                runner = art.runner()
            row["build_seconds"] = time.perf_counter() - t0
            artifacts[name] = art
            row["size_bytes"] = dir_size(art.path)
            comp = compare_outputs(ref_out, runner(source.sample_inputs))
            row["max_abs_diff"], row["min_cosine"] = comp.max_abs_diff, comp.min_cosine
            if has_acc:
                row["accuracy"] = classification_accuracy(runner, source.eval_inputs, source.eval_labels)
            runners[name] = runner
            log(f"built {name}: {row['size_bytes'] / 1e6:.1f} MB, cosine {comp.min_cosine:.5f}"
                + (f", accuracy {row['accuracy']:.4f}" if has_acc else ""))
        except Exception as exc:  # a broken row is reported; the others still run
            row["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
            log(f"FAILED {name}: {row['error']}")
    base_size = result["rows"][0].get("size_bytes")
    for row in result["rows"]:
        if row.get("size_bytes") and base_size:
            row["size_vs_baseline"] = row["size_bytes"] / base_size
    for batch, seq in shapes:
        x = source.make_inputs(batch, seq)
        timing = time_interleaved(runners, x, seq=seq, runs=runs, warmup=2, max_seconds=max_seconds)
        ms = timing.measurements
        base = ms["model.export fp32"].p50_ms if "model.export fp32" in ms else None
        for row in result["rows"]:
            m = ms.get(row["name"])
            if m:
                row["timings"].append({"batch": batch, "seq": seq, "p50_ms": m.p50_ms, "min_ms": m.min_ms,
                                       "runs": m.runs, "speedup": float(base / m.p50_ms) if base else None})
        log(f"timed {batch}x{seq}: " + ", ".join(
            f"{r['name']} {r['timings'][-1]['p50_ms']:.1f} ms ({r['timings'][-1]['speedup']:.2f}x)"
            for r in result["rows"] if r["timings"]))
    return result


def to_markdown(results: list[dict[str, Any]]) -> str:
    """A table per source: size, accuracy, cosine and speed-up of every row."""
    lines = []
    for res in results:
        shapes = [(t["batch"], t["seq"]) for t in res["rows"][0]["timings"]]
        lines += [f"### {res['source']}", ""]
        head = ["row", "size MB", "size vs fp32", "accuracy", "min cosine"]
        head += [f"p50 ms {b}x{s}" for b, s in shapes] + [f"speed-up {b}x{s}" for b, s in shapes]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in res["rows"]:
            if r["error"]:
                lines.append(f"| {r['name']} | failed: {' '.join(r['error'].split())[:120]} |")
                continue
            acc = f"{r['accuracy']:.3f}" if r.get("accuracy") is not None else "-"
            cells = [r["name"], f"{r['size_bytes'] / 1e6:.1f}", f"{r.get('size_vs_baseline', float('nan')):.2f}x", acc,
                     f"{r['min_cosine']:.4f}"]
            cells += [f"{t['p50_ms']:.1f}" for t in r["timings"]] + [f"{t['speedup']:.2f}x" for t in r["timings"]]
            lines.append("| " + " | ".join(cells) + " |")
        if res["reference_accuracy"] is not None:
            lines.append(f"\nKeras float32 accuracy: {res['reference_accuracy']:.3f}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    import tempfile

    import tfaccel

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sources", nargs="+")
    p.add_argument("--out", required=True, help="results .json (a .md table is written beside it)")
    p.add_argument("--shape", action="append", default=None, help="BATCHxSEQ, repeatable (default 1x128)")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="comma-separated row names (default: all)")
    args = p.parse_args(argv)
    from tfaccel.core.measure import parse_shape

    shapes = [parse_shape(s) for s in (args.shape or ["1x128"])]
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in DEFAULT_ROWS]
    if unknown:  # before any model is loaded
        p.error(f"unknown rows {unknown}; rows are: {', '.join(DEFAULT_ROWS)}")
    results = []
    for name in args.sources:
        src = tfaccel.load_source(name, progress=print)
        with tempfile.TemporaryDirectory(prefix="qbench-") as tmp:
            results.append(quantization_rows(src, tmp, shapes=shapes, runs=args.runs, rows=rows))
        Path(args.out).write_text(json.dumps(results, indent=2))
    md = to_markdown(results)
    Path(args.out).with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
