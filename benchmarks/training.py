"""Training-time benchmarks (`make bench` runs them after benchmarks/run.py): pruning and distribution.

These cannot be rows of run.py, which times serving artifacts: they fine-tune real models and time
training steps. Each benchmark runs in its own child process (a fresh TensorFlow: logical CPU devices
can only be set before it initialises, and no model memory carries over).

* ``pruning-unstructured``: minilm-bbc fine-tuned one more epoch while a PolynomialDecay schedule takes
  every Dense/EinsumDense kernel to 50% sparsity, next to the same fine-tuning without pruning
  (target: at most 1 accuracy point lost on the 200 held-out articles).
* ``pruning-structured``: minilm-bbc with half its feed-forward units removed and distilled for two epochs
  (target: at most 2 points lost).
* ``pruning-structured-speed``: bert-base (batch 1 x 128) with half its feed-forward units removed,
  both SavedModels timed alternately in one process (target: at least 1.3x faster).
* ``distribute-one-device`` / ``distribute-mirrored-2cpu``: median training step of the wrapped model
  (DistributedModel with Keras fit, and tfaccel's custom loop, the multi-worker path) vs plain Keras
  ``fit`` on one device, same global batch; the second splits the CPU into 2 logical devices, so
  MirroredStrategy has 2 replicas on the machine's cores.

Writes OUT/training.json and OUT/training.md.

    python benchmarks/training.py --out bench-out [--only pruning-structured-speed,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = {
    "pruning-structured-speed": "from pruning_bench import bert_base_structured_speed as f; r = f()",
    "pruning-structured": "from pruning_bench import minilm_structured as f; r = f()",
    "pruning-unstructured": "from pruning_bench import minilm_unstructured as f; r = f()",
    "distribute-one-device": ("from distribute_bench import benchmark_step_time as f; "
                              "r = f('minilm', per_replica_batch_size=16, seq=128, steps=10, warmup_steps=3)"),
    "distribute-mirrored-2cpu": ("from tfaccel.distribute.strategy import set_logical_cpus; set_logical_cpus(2); "
                                 "from distribute_bench import benchmark_step_time as f; "
                                 "r = f('minilm', per_replica_batch_size=8, seq=128, steps=10, warmup_steps=3)"),
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_one(name: str, timeout: float) -> dict:
    code = (f"import json, sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
            + BENCHMARKS[name].replace("; ", "\n") + "\n"
            "sys.stdout.write('RESULT ' + json.dumps(r) + '\\n')\n")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    except subprocess.TimeoutExpired:
        return {"name": name, "status": "failed", "error": f"timed out after {timeout:.0f}s"}
    seconds = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = " / ".join(proc.stderr.strip().splitlines()[-3:])[-800:]
        return {"name": name, "status": "failed", "error": f"exit {proc.returncode}: {tail}", "seconds": seconds}
    return {"name": name, "status": "ok", "seconds": seconds, "result": json.loads(lines[-1][len("RESULT "):])}


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


def to_markdown(rows: list[dict], header: str) -> str:
    md = [header, ""]
    by = {r["name"]: r for r in rows}
    failed = [r for r in rows if r["status"] != "ok"]
    res = {n: r["result"] for n, r in by.items() if r["status"] == "ok"}
    if any(n.startswith("pruning") for n in res):
        md += ["### Pruning", "", "| benchmark | result | accuracy (reference) | target | met |", "|---|---|---|---|---|"]
        if "pruning-unstructured" in res:
            r = res["pruning-unstructured"]
            drop = r["accuracy_drop_points"]
            control = f"; same fine-tuning without pruning: {r['control_accuracy']:.3f}" if "control_accuracy" in r else ""
            md.append(f"| minilm-bbc unstructured (PolynomialDecay to {r['target_sparsity']:.0%}) | sparsity "
                      f"{_pct(r['sparsity'])}{control} | {r['accuracy']:.3f} ({r['reference_accuracy']:.3f}) | "
                      f"<= 1 point lost | {'yes' if drop <= 1.0 else 'NO'} ({drop:+.1f} points lost) |")
        if "pruning-structured" in res:
            r = res["pruning-structured"]
            drop = r["accuracy_drop_points"]
            md.append(f"| minilm-bbc structured ({r['fraction']:.0%} of FF units, distilled {r['epochs']} epoch) | "
                      f"params {r['reference_params'] / 1e6:.1f}M -> {r['params'] / 1e6:.1f}M; before distillation "
                      f"{r['accuracy_before_distillation']:.3f} | {r['accuracy']:.3f} ({r['reference_accuracy']:.3f}) "
                      f"| <= 2 points lost | {'yes' if drop <= 2.0 else 'NO'} ({drop:+.1f} points lost) |")
        if "pruning-structured-speed" in res:
            r = res["pruning-structured-speed"]
            md.append(f"| bert-base structured ({r['fraction']:.0%} of FF units), {r['batch']}x{r['seq']} | "
                      f"p50 {r['full_p50_ms']:.1f} -> {r['pruned_p50_ms']:.1f} ms: **{r['speedup']:.2f}x** "
                      f"(of minimums {r['speedup_of_minimums']:.2f}x); params {r['reference_params'] / 1e6:.1f}M -> "
                      f"{r['params'] / 1e6:.1f}M | n/a | >= 1.3x | {'yes' if r['speedup'] >= 1.3 else 'NO'} |")
        md.append("")
    dist = [n for n in ("distribute-one-device", "distribute-mirrored-2cpu") if n in res]
    if dist:
        md += ["### Distributed training step time (minilm-bbc classifier, seq 128)", "",
               "| run | strategy | replicas | global batch | plain fit ms/step | DistributedModel fit | "
               "DistributedModel custom loop |", "|---|---|---|---|---|---|---|"]
        for n in dist:
            r = res[n]
            md.append(f"| {n} | {r['strategy']} | {r['replicas']} | {r['global_batch']} | "
                      f"{r['plain_fit']['step_ms']:.0f} | {r['distributed_fit']['step_ms']:.0f} ms "
                      f"({r['speedup']['distributed_fit']:.2f}x) | {r['distributed_custom_loop']['step_ms']:.0f} ms "
                      f"({r['speedup']['distributed_custom_loop']:.2f}x) |")
        md += ["", "Ratios are plain fit step time / wrapped step time (> 1: the wrapper is faster), "
               "measured back to back in one process."]
    for r in failed:
        md.append(f"- {r['name']}: FAILED: {r['error']}")
    return "\n".join(md) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="folder for training.json and training.md (created)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per benchmark (default 1800)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        log(f"training benchmark {name}: running (minutes on 2 cores)")
        row = run_one(name, args.timeout)
        log(f"  {name}: {row['status']} in {row.get('seconds', 0):.0f}s" + (f": {row['error']}" if row.get("error") else ""))
        rows.append(row)
        (out / "training.json").write_text(json.dumps(rows, indent=2))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    header = (f"## Training benchmarks\n\n{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores"
              + (f", load average {load:.1f} at the end" if load is not None else ""))
    (out / "training.md").write_text(to_markdown(rows, header))
    log(f"wrote {out / 'training.md'} and {out / 'training.json'}")
    return 1 if any(r["status"] != "ok" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
