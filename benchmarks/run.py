"""The benchmark harness behind `make bench`: every workload, every row, measured in one run.

    .venv/bin/python benchmarks/run.py --out bench-out [--workloads bert-base,minilm-bbc,gpt2-small]
                                       [--runs 20] [--quick]

Writes OUT/results.json and OUT/results.md. The machine is noisy, so rows are compared as ratios
measured in the same run: the rows of one shape are timed interleaved (blocks of calls, row order
rotating each round), so a burst of background load hits every row alike. Each workload runs in its
own child process (memory and global state do not carry over). Artifacts are built in a temporary
folder under OUT and removed at the end. Rows and workloads are defined in workloads.py.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import workloads as wl  # noqa: E402

from tfaccel.core.timer import interleave, time_against_baseline  # noqa: E402
from tfaccel.core.validation import Reference  # noqa: E402

_T0 = time.perf_counter()
# Wall-clock start of the whole run (workers inherit it), so progress lines count from one origin.
_START_WALL = float(os.environ.get("TFACCEL_BENCH_T0") or time.time())


def log(msg: str) -> None:
    elapsed = time.time() - _START_WALL
    print(f"[{time.strftime('%H:%M:%S')} +{elapsed:6.0f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# One workload


_LOG_NOISE = ("WARNING: All log messages", "I0000", "W0000", "E0000", "WARNING:absl", "To enable the following")


def select_rows(text: str, names: list[str]) -> tuple[set[str], list[str]]:
    """The row names a ``--rows`` value picks, and the pieces of it that name no row.

    ``--rows`` is comma-separated, but some row names hold a comma themselves ("tfaccel onnx-decoder:
    onnxruntime fp32, KV cache"), so the longest run of comma-separated pieces that is a row name is taken first.

    Example:
        >>> chosen, unknown = select_rows("a, b,c, x", ["a", "b,c", "d"])
        >>> sorted(chosen), unknown
        (['a', 'b,c'], ['x'])
    """
    pieces = [p.strip() for p in text.split(",")]
    known = {", ".join(p.strip() for p in n.split(",")): n for n in names}
    chosen, unknown, i = set(), [], 0
    while i < len(pieces):
        for j in range(len(pieces), i, -1):
            name = known.get(", ".join(pieces[i:j]))
            if name is not None:
                chosen.add(name)
                i = j
                break
        else:
            if pieces[i]:
                unknown.append(pieces[i])
            i += 1
    return chosen, unknown


def _error_text(exc: BaseException) -> str:
    """One readable line: the message without TensorFlow's start-up log lines, and a hint for a child
    process killed by SIGKILL (the kernel's out-of-memory killer, usually)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(_LOG_NOISE)]
    out = " / ".join(lines[:6])[:600]
    if "exit -9" in text:
        out += " [exit -9 = SIGKILL: most likely the out-of-memory killer; tf2onnx peaks at 12-17 GB on these models]"
    return out


def _synthetic_eval(source, n: int) -> None:
    """Quick mode: an eval split of synthetic inputs labelled by the Keras model's own predictions."""
    from tfaccel.core.artifact import KerasRunner
    from tfaccel.core.source import token_sample_inputs

    inputs = token_sample_inputs(source.input_specs, source.vocab_size, batch=n, seq=32, seed=1)
    out = KerasRunner(source.model, source.dict_inputs)(inputs)
    logits = next(iter(out.values()))
    source.eval_inputs, source.eval_labels = inputs, np.argmax(logits, axis=-1)


def run_workload(w: wl.Workload, work_dir: Path, args) -> dict[str, Any]:
    import tfaccel
    from tfaccel.core.artifact import Artifact

    t_start = time.perf_counter()
    log(f"== {w.name}: loading source '{w.source}'")
    source = tfaccel.load_source(w.source, progress=log)
    if w.synthetic_eval:
        _synthetic_eval(source, w.synthetic_eval)
    result: dict[str, Any] = {
        "name": w.name, "source": w.source, "description": source.description, "note": w.note,
        "task": source.task, "shapes": [list(s) for s in w.shapes], "rows": [], "generation": None,
        "reference_accuracy": None, "eval_examples": None,
        "sample_inputs": {k: list(v.shape) for k, v in source.sample_inputs.items()},
    }
    reference = Reference.of(Artifact.of_source(source).runner(), source, accuracy=w.accuracy)
    want_acc = reference.labelled
    if want_acc:
        result["reference_accuracy"] = reference.accuracy
        result["eval_examples"] = int(len(source.eval_labels))
        log(f"  Keras reference accuracy {result['reference_accuracy']:.4f} on {result['eval_examples']} examples")

    ctx = wl.BuildContext(source=source, work_dir=work_dir, log=log, shapes=w.shapes, step_options=w.step_options)
    built: dict[str, wl.Built] = {}
    rows = {}
    specs, wanted = w.rows, None  # wanted: the --rows subset (serving and generation rows), None: every row
    if args.rows:  # a subset, always with the baseline every ratio is relative to
        wanted, unknown = select_rows(args.rows, [r.name for r in [*w.rows, *w.generation_rows]])
        specs = [r for r in w.rows if r.name in wanted or r.group == "baseline"]
        if unknown:
            log(f"  --rows: {w.name} has no rows {unknown}; its rows: "
                f"{' | '.join(r.name for r in [*w.rows, *w.generation_rows])}")
    for spec in specs:
        rows[spec.name] = {
            "name": spec.name, "group": spec.group, "runtime": spec.runtime, "steps": list(spec.steps),
            "precision": spec.precision,
            "status": "ok", "error": None, "kind": None, "size_bytes": None, "build_seconds": None,
            "max_abs_diff": None, "mean_abs_diff": None, "cosine": None, "accuracy": None, "notes": [],
            "measurements": [],
        }
        result["rows"].append(rows[spec.name])
    # 1. Build every artifact on disk. Rows for other runtimes first: their conversions run in child
    # processes (tf2onnx peaks at 12-17 GB), best started while this process is still small.
    ordered = sorted(specs, key=lambda s: s.group != "peer")
    for spec in ordered:
        row = rows[spec.name]
        log(f"-- {w.name} / {spec.name}: building")
        try:
            b = built[spec.name] = spec.build(ctx)
            row.update(kind=b.kind, size_bytes=int(b.size_bytes), build_seconds=b.build_seconds, notes=list(b.notes))
            if b.steps:
                row["steps"] = list(b.steps)
        except wl.NotApplicable as exc:
            row.update(status="n/a", error=str(exc))
            log(f"   not applicable: {exc}")
        except Exception as exc:  # a broken row is reported, the others still run
            row.update(status="failed", error=_error_text(exc))
            log(f"   FAILED: {row['error']}")
            if args.verbose:
                traceback.print_exc()
        # Keras copies made by model-rewriting steps, unless a later row builds on them (prune-structured + xla)
        later = ordered[ordered.index(spec) + 1:]
        ctx.drop_keras_artifacts(keep=[s.steps for s in later])
        gc.collect()

    runners: dict[str, Any] = {}
    for row in result["rows"]:  # 2. load each artifact, check it against the Keras model
        if row["name"] not in built:
            continue
        log(f"-- {w.name} / {row['name']}: loading and checking")
        try:
            runner = built[row["name"]].load()
            comp = reference.check(runner)
            row.update(max_abs_diff=comp.max_abs_diff, mean_abs_diff=comp.mean_abs_diff, cosine=comp.min_cosine,
                       accuracy=comp.accuracy)
            log(f"   size {row['size_bytes'] / 1e6:.1f} MB, max abs diff {comp.max_abs_diff:.3g}, "
                f"cosine {comp.min_cosine:.6f}" + (f", accuracy {row['accuracy']:.4f}" if want_acc else ""))
            runners[row["name"]] = runner
        except Exception as exc:
            row.update(status="failed", error=_error_text(exc))
            log(f"   FAILED: {row['error']}")
            if args.verbose:
                traceback.print_exc()

    by_name = {r["name"]: r for r in result["rows"]}
    baseline = next((r["name"] for r in result["rows"] if r["group"] == "baseline" and r["status"] == "ok"), None)
    log(f"-- {w.name}: timing {len(runners)} rows interleaved at {', '.join(f'{b}x{q}' for b, q in w.shapes)} "
        f"({args.runs} runs each, at most {args.max_seconds:.0f}s of timed calls per row)")
    load_before = _loadavg()
    for st in time_against_baseline(runners, source.make_inputs, w.shapes, baseline, runs=args.runs,
                                    warmup=args.warmup, max_seconds=args.max_seconds):
        result.setdefault("load_average", []).append(
            {"batch": st.batch, "seq": st.seq, "before": load_before, "after": _loadavg()})
        load_before = _loadavg()
        for name, err in st.timing.errors.items():
            log(f"   {name}: timing FAILED: {err}")
            by_name[name].update(status="failed", error=f"timing at {st.batch}x{st.seq} failed: {err}")
        log(f"   at {st.batch}x{st.seq}:")
        for name, m in st.timing.measurements.items():
            d = m.to_dict()
            d["speedup"] = st.speedups.get(name)
            by_name[name]["measurements"].append(d)
            log(f"   {name:28s} p50 {m.p50_ms:9.1f} ms  p95 {m.p95_ms:9.1f} ms  {m.throughput:8.1f} seq/s  "
                + (f"{d['speedup']:.2f}x" if d["speedup"] else "") + f"  ({m.runs} runs)")
    for name, runner in runners.items():  # e.g. the xla runner counts its XLA compilations
        stats = getattr(runner, "stats", None)
        if callable(stats):
            try:
                by_name[name]["runner_stats"] = stats()
            except Exception:  # informative only
                pass
    del runners
    gc.collect()

    if w.generation is not None:
        result["generation"] = run_generation(w, ctx, args, wanted=wanted)
        result["more_generation"] = [run_generation(w, ctx, args, spec=s, wanted=wanted) for s in w.more_generation]
    result["seconds"] = time.perf_counter() - t_start
    return result


def _loadavg() -> float | None:
    """The 1-minute load average: above ~2 on this 2-core machine, other work competed for the CPU."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_generation(w: wl.Workload, ctx: wl.BuildContext, args, spec: wl.GenerationSpec | None = None,
                   wanted: set[str] | None = None) -> dict[str, Any]:
    """Time every generation row: each row is built, loaded and warmed up (one untimed generation:
    tracing, session set-up), then the rows' timed whole generations (a quarter of --runs, at least 3)
    are interleaved by :func:`tfaccel.core.timer.interleave`, one generation per row in turn, so load from other work on the machine falls on
    every row alike. Rows after the first are checked against the first row's tokens. Each row's peak
    resident memory (this process) is sampled from loading it to the end of its warm-up generation."""
    from tfaccel.core.measure import PeakRSS

    spec = spec or w.generation
    runs = max(3, args.runs // 4)
    texts = ctx.source.sample_inputs["token_ids"] if w.real_prompts else None
    prompt = wl.generation_prompt(ctx.source.vocab_size, spec, texts=texts)
    out: dict[str, Any] = {"prompt_tokens": spec.prompt_tokens, "new_tokens": spec.new_tokens, "batch": spec.batch,
                           "sampler": spec.sampler, "rows": [], "timing": "interleaved"}
    reference_ids = None
    ready: list[tuple[dict[str, Any], Any]] = []
    for g in w.generation_rows:
        if wanted is not None and g.name not in wanted and g.group != "baseline":
            continue
        row: dict[str, Any] = {"name": g.name, "group": g.group, "steps": list(g.steps), "status": "ok",
                               "error": None, "notes": []}
        out["rows"].append(row)
        log(f"-- {w.name} / {g.name}: {spec.prompt_tokens} prompt + {spec.new_tokens} new tokens, batch {spec.batch}")
        mem, gen = PeakRSS(), None
        try:
            mem.__enter__()
            gen = g.prepare(ctx, spec, prompt)
            t = time.perf_counter()
            first_out = gen.run()
            first = time.perf_counter() - t
            ids = gen.new_token_ids(first_out)
            if reference_ids is None:
                reference_ids = ids
            else:
                row["token_agreement"] = float(np.mean(ids == reference_ids))
            row.update(first_call_s=first, info=gen.info)
            if spec is w.generation:  # quality and memory do not depend on the batch: measured once per row
                _quality_and_memory(row, gen, ctx, w, spec, prompt)
            agree = row.get("token_agreement")
            log(f"   ready (first call {first:.1f}s)" + (f", {agree:.1%} of new tokens as the first row"
                                                         if agree is not None else ""))
            if gen.info.get("jit_compile") is False:
                row["notes"].append("keras-hub's generate ran as a tf.function without XLA: compile(jit_compile="
                                    "'auto') resolves to False on CPU-only TensorFlow (Trainer._resolve_auto_jit_compile)")
            ready.append((row, gen))
        except wl.NotApplicable as exc:
            row.update(status="n/a", error=str(exc))
            log(f"   not applicable: {exc}")
        except Exception as exc:
            row.update(status="failed", error=_error_text(exc))
            log(f"   FAILED: {row['error']}")
            if args.verbose:
                traceback.print_exc()
        finally:
            mem.__exit__(None, None, None)
            if row["status"] == "ok":
                row.update(peak_rss_mb=mem.peak / 2**20, rss_growth_mb=mem.growth / 2**20)
            del gen
            gc.collect()
    log(f"-- {w.name}: timing {len(ready)} generation rows interleaved, {runs} generations each")
    load_before = _loadavg()
    new = spec.batch * spec.new_tokens
    # Whole generations, one per row in turn (each row was warmed up above); no time limit: every row makes
    # its `runs` generations.
    timing = interleave({row["name"]: gen.run for row, gen in ready}, runs=runs, warmup=0, max_seconds=None,
                        settle_below_s=0, batch=new)
    load_after = _loadavg()
    for row, _ in list(ready):
        if row["name"] in timing.errors:
            row.update(status="failed", error=f"timed generation failed: {timing.errors[row['name']]}")
            log(f"   {row['name']}: FAILED: {row['error']}")
            ready.remove((row, _))
    for row, _ in ready:
        arr = np.asarray(timing.times_ms[row["name"]]) / 1000
        p50 = float(np.percentile(arr, 50))
        row.update(load_average_before=load_before, load_average_after=load_after, wall_p50_s=p50,
                   wall_p95_s=float(np.percentile(arr, 95)), wall_min_s=float(arr.min()), runs=len(arr),
                   new_tokens=new, tokens_per_s=new / p50, ms_per_token=p50 * 1000 / new)
        log(f"   {row['name']:62s} {new / p50:6.1f} tokens/s ({p50 * 1000 / new:.1f} ms/token, wall p50 {p50:.2f}s)")
    ready.clear()
    gc.collect()
    base = next((r for r in out["rows"] if r["group"] == "baseline" and r["status"] == "ok"), None)
    for r in out["rows"]:
        if r["status"] == "ok" and base:
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
    return out


def _quality_and_memory(row: dict[str, Any], gen, ctx, w: wl.Workload, spec: wl.GenerationSpec, prompt) -> None:
    """A generation row's next-token cosine with the Keras model (on keras-hub's own tokens after the bench
    prompt), its perplexity ratio / KL / same top token on the source's held-out windows when it has any (through
    the artifact's decode steps), and RSS after load / peak RSS during one generation in a fresh process."""
    from tfaccel.generation.agreement import decoder_agreement
    from tfaccel.generation.eval_text import eval_windows
    from tfaccel.generation.memory import generation_memory
    from tfaccel.generation.quality import DEFAULT_EVAL_WINDOWS, quality_measures

    model = ctx.source.model
    try:
        if gen.scorer is not None and gen.scorer is not model:
            ids, mask = prompt["token_ids"].astype(np.int32), prompt["padding_mask"].astype(np.int32)
            row["next_token_cosine_min"] = decoder_agreement(model, gen.scorer, ids, mask, spec.new_tokens)[
                "next_token_cosine_min"]
        windows = eval_windows(ctx.source, DEFAULT_EVAL_WINDOWS)
        if gen.scorer is not None and windows is not None:
            row["quality"] = quality_measures(model, gen.scorer, windows)
            log(f"   quality: perplexity ratio {row['quality']['perplexity_ratio']:.5f}, KL "
                f"{row['quality']['kl_divergence']:.3g}, same top {row['quality']['same_top']:.2%}")
    except Exception as exc:  # a row's quality failing leaves its speed standing
        row["notes"].append(f"quality not measured: {_error_text(exc)}")
    try:
        mem = generation_memory(gen.artifact or w.source, keras_hub_example=gen.artifact is None, batch=spec.batch,
                                prompt_tokens=spec.prompt_tokens, new_tokens=spec.new_tokens,
                                vocabulary_size=ctx.source.vocab_size or 1000)
        row.update(load_rss_mb=mem["load_rss_mb"], fresh_peak_rss_mb=mem["peak_rss_mb"])
        log(f"   fresh process: RSS after load {mem['load_rss_mb']:.0f} MB, peak {mem['peak_rss_mb']:.0f} MB")
    except Exception as exc:
        row["notes"].append(f"memory not measured: {_error_text(exc)}")


# --------------------------------------------------------------------------------------------------
# Output


def _fmt(v, spec: str, empty: str = "") -> str:
    if v is None:
        return empty
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return format(v, spec)


def _fmt_diff(v) -> str:
    if v is None:
        return ""
    if not math.isfinite(v):
        return str(v)
    return f"{v:.2e}" if v < 0.01 else f"{v:.3f}"


def _cell(text: str, limit: int = 300) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _row_cells(r: dict[str, Any], has_acc: bool) -> list[str]:
    """The shape-independent cells of a row: size, max abs diff, cosine (and accuracy)."""
    acc = [_fmt(r["accuracy"], ".4f")] if has_acc else []
    return [_fmt(r["size_bytes"] and r["size_bytes"] / 1e6, ".1f"), _fmt_diff(r["max_abs_diff"]),
            _fmt(r["cosine"], ".6f")] + acc


def to_markdown(results: dict[str, Any]) -> str:
    caps = results["capabilities"]
    lines = [
        f"# tfaccel benchmarks{' (quick mode)' if results['quick'] else ''}",
        "",
        f"{results['date']} · TensorFlow {caps['tensorflow']} · Keras {caps['keras']} · keras-hub {caps['keras_hub']} · "
        f"onnxruntime {caps['onnxruntime']} · tf2onnx {caps['tf2onnx']} · CPU: {caps['cpu']} "
        f"({caps['cpu_count']} cores; GPU: {', '.join(caps['gpus']) or 'none'})",
        "",
        "p50/p95/min are per call (min is the least disturbed by other work on a shared machine); throughput is sequences/s at p50; speed-up is the model.export p50 divided by the "
        "row's p50 at the same shape, timed interleaved in this run. max abs diff and cosine (lowest per-sample) are "
        "against the Keras model on the same inputs. "
        f"Up to {results['runs']} timed runs per row and shape (fewer when a row's timed calls reach "
        f"{results['max_seconds']:.0f}s).",
    ]
    for w in results["workloads"].values():
        lines += ["", f"## {w['name']}", ""]
        if w.get("status") == "failed":
            lines.append(f"FAILED: {w['error']}")
            continue
        desc = w["note"] or w["description"]
        lines.append(f"{desc}. Source `{w['source']}`; max abs diff / cosine on sample inputs of shape "
                     f"{next(iter(w['sample_inputs'].values()), '?')}.")
        if w["reference_accuracy"] is not None:
            lines.append(f"Accuracy on {w['eval_examples']} held-out examples; the Keras model itself: "
                         f"{w['reference_accuracy']:.4f}.")
        has_acc = any(r["accuracy"] is not None for r in w["rows"])
        head = ["row", "batch x seq", "p50 ms", "p95 ms", "min ms", "speed-up vs model.export", "throughput (seq/s)",
                "size MB", "max abs diff", "cosine"] + (["accuracy"] if has_acc else [])
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for batch, seq in w["shapes"]:  # shape-major: the rows of one shape are compared together
            for r in w["rows"]:
                m = next((m for m in r["measurements"] if (m["batch"], m["seq"]) == (batch, seq)), None)
                if r["status"] == "n/a":
                    continue
                if r["status"] != "ok":
                    lines.append(f"| {r['name']} | {batch}x{seq} | failed: {_cell(r['error'])} | "
                                 + " | ".join([""] * (len(head) - 3)) + " |")
                elif m is None:
                    lines.append(f"| {r['name']} | {batch}x{seq} | not timed | | | | | "
                                 + " | ".join(_row_cells(r, has_acc)) + " |")
                else:
                    sp = _fmt(m["speedup"], ".2f")
                    lines.append(
                        f"| {r['name']} | {batch}x{seq} | {m['p50_ms']:.1f} | {m['p95_ms']:.1f} | {m['min_ms']:.1f} | "
                        f"{sp + 'x' if sp else ''} | {m['throughput']:.1f} | "
                        + " | ".join(_row_cells(r, has_acc)) + " |")
        loads = [f"{x['batch']}x{x['seq']}: {x['before']} -> {x['after']}" for x in w.get("load_average", [])]
        if loads:
            lines += ["", "1-minute load average before -> after timing (this machine has "
                      f"{caps['cpu_count']} cores; above that, other work competed): " + "; ".join(loads) + "."]
        notes = [f"{r['name']}: not applicable: {r['error']}" for r in w["rows"] if r["status"] == "n/a"]
        notes += [f"{r['name']} ({' -> '.join(r['steps'])}): {n}" for r in w["rows"] for n in r["notes"]]
        notes += [f"{r['name']}: " + ", ".join(f"{k} {v}" for k, v in r["runner_stats"].items())
                  for r in w["rows"] if r.get("runner_stats")]
        first_rows = {r["name"]: r for r in (w.get("generation") or {}).get("rows", [])}
        for g in [w.get("generation"), *(w.get("more_generation") or [])]:
            if not g:
                continue
            lines += ["", f"Greedy generation, batch {g['batch']}, {g['prompt_tokens']} prompt tokens + "
                          f"{g['new_tokens']} new tokens (tokens/s = new tokens / wall time, after one warm-up call; rows "
                          "timed interleaved, one generation each in turn; same tokens = share of new tokens equal to "
                          "the first row's; next-token cosine: lowest cosine of the row's next-token logits with the "
                          "Keras model's on keras-hub's tokens after the prompt; perplexity ratio / KL / same top: on the "
                          "source's held-out windows, teacher-forced through the row's decode steps; memory: a fresh "
                          "process loading the artifact (RSS after load) and generating once at batch 1 (peak)):",
                      "", "| row | tokens/s | ms/token | wall p50 s | runs | speed-up | same tokens | next-token cosine "
                          "| perplexity ratio | KL | same top | size MB | RSS after load MB | peak RSS MB | load average |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in g["rows"]:
                if r["status"] == "n/a":
                    if g is w.get("generation"):
                        notes.append(f"{r['name']}: not applicable: {r['error']}")
                    continue
                if r["status"] != "ok":
                    lines.append(f"| {r['name']} | failed: {_cell(r['error'])} |" + " |" * 13)
                    continue
                agree = r.get("token_agreement")
                f = first_rows.get(r["name"], r)  # quality and memory were measured with the first generation
                q = f.get("quality") or {}
                lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | "
                             f"{r['wall_p50_s']:.2f} | {r['runs']} | "
                             f"{_fmt(r.get('speedup'), '.2f')}x | {'' if agree is None else f'{agree:.1%}'} | "
                             f"{_fmt(f.get('next_token_cosine_min'), '.5f')} | "
                             f"{_fmt(q.get('perplexity_ratio'), '.5f')} | {_fmt(q.get('kl_divergence'), '.2e')} | "
                             f"{'' if 'same_top' not in q else format(q['same_top'], '.2%')} | "
                             f"{_fmt((r.get('info') or {}).get('size_mb'), '.1f')} | "
                             f"{_fmt(f.get('load_rss_mb'), '.0f')} | {_fmt(f.get('fresh_peak_rss_mb'), '.0f')} | "
                             f"{r['load_average_before']} -> {r['load_average_after']} |")
                notes += [f"{r['name']}: {n}" for n in r.get("notes", []) if g is w.get("generation")]
        if notes:
            lines += [""] + [f"- {n}" for n in notes]
    lines += ["", f"Total time {results['total_seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json and results.md (created)")
    p.add_argument("--workloads", default=None,
                   help="comma-separated subset of: bert-base, minilm-bbc, gpt2-small, gpt2-bbc, llama-small "
                        "(default: all)")
    p.add_argument("--rows", default=None,
                   help="comma-separated row names to run, serving and generation rows (the baselines, model.export "
                        "and keras-hub generate, always run; default: all)")
    p.add_argument("--runs", type=int, default=None, help="timed runs per row and shape (default 20; quick: 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per row and shape before timing (default 2)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop timing a row at a shape once its timed calls add up to this (default 60)")
    p.add_argument("--quick", action="store_true", help="tiny models (bert-tiny, gpt2-tiny), few runs: for tests")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failed rows")
    # Internal: run one workload in this (child) process and write its result as JSON.
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.runs = args.runs if args.runs is not None else (3 if args.quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.runs < 1:
        p.error("--runs must be at least 1")

    table = wl.workloads(quick=args.quick)
    if args.worker:
        return _worker(table[args.worker], args)
    names = [n.strip() for n in args.workloads.split(",") if n.strip()] if args.workloads else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {', '.join(table)}")

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    from tfaccel.compat import capabilities

    caps = capabilities()
    log(f"tfaccel benchmarks: {', '.join(names)}{' (quick)' if args.quick else ''}; TF {caps.tensorflow}, "
        f"Keras {caps.keras}, {caps.cpu} ({caps.cpu_count} cores); one child process per workload")
    results: dict[str, Any] = {
        "tfaccel_benchmark": 1, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "quick": args.quick, "runs": args.runs, "warmup": args.warmup, "max_seconds": args.max_seconds,
        "argv": sys.argv[1:], "capabilities": caps.to_dict(), "workloads": {}, "total_seconds": None,
    }
    tmp = Path(tempfile.mkdtemp(prefix=".bench-artifacts-", dir=out))
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so `kill PID` still removes the temporary artifacts
    failed = []
    try:
        for name in names:
            res = _run_worker(name, table[name], tmp, args)
            results["workloads"][name] = res
            if res.get("status") == "failed":
                failed.append(name)
            failed += [f"{name}/{r['name']}" for r in res["rows"] if r["status"] == "failed"]
            failed += [f"{name}/{r['name']}" for r in (res.get("generation") or {}).get("rows", [])
                       if r["status"] == "failed"]
            results["total_seconds"] = time.perf_counter() - _T0
            _write(out, results)  # after every workload, so a long run leaves partial results
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["total_seconds"] = time.perf_counter() - _T0
    _write(out, results)
    log(f"wrote {out / 'results.md'} and {out / 'results.json'} ({results['total_seconds'] / 60:.1f} min)")
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        return 1
    return 0


def _run_worker(name: str, w: wl.Workload, tmp: Path, args) -> dict[str, Any]:
    """Run one workload in a fresh child process: memory held by one model (TensorFlow rarely returns
    it to the OS) is gone before the next, and no global state (dtype policies...) carries over."""
    from tfaccel.core.processes import run_child

    wdir, result_file = tmp / name, tmp / f"{name}.json"
    wdir.mkdir()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--worker", name,
           "--worker-dir", str(wdir), "--worker-result", str(result_file), "--runs", str(args.runs),
           "--warmup", str(args.warmup), "--max-seconds", str(args.max_seconds)]
    cmd += ["--quick"] * args.quick + ["--verbose"] * args.verbose + (["--rows", args.rows] if args.rows else [])
    env = dict(os.environ, TFACCEL_BENCH_T0=str(_START_WALL))
    proc = run_child(cmd, env=env)  # dies with the benchmark (parent-death signal)
    shutil.rmtree(wdir, ignore_errors=True)
    if result_file.exists():
        return json.loads(result_file.read_text())
    why = f"the workload's process exited with code {proc.returncode}"
    if proc.returncode in (-9, 137):
        why += " (SIGKILL: most likely the out-of-memory killer)"
    log(f"== {name} FAILED: {why}")
    return _failed_workload(w, why)


def _failed_workload(w: wl.Workload, error: str) -> dict[str, Any]:
    """The result of a workload that produced none of its own."""
    return {"name": w.name, "source": w.source, "status": "failed", "error": error, "description": "", "note": w.note,
            "rows": [], "generation": None, "reference_accuracy": None, "sample_inputs": {}, "shapes": []}


def _worker(w: wl.Workload, args) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        res = run_workload(w, Path(args.worker_dir), args)
    except Exception as exc:
        log(f"== {w.name} FAILED: {_error_text(exc)}")
        if args.verbose:
            traceback.print_exc()
        res = _failed_workload(w, _error_text(exc))
    Path(args.worker_result).write_text(json.dumps(res, default=_json_default))
    return 0


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _write(out: Path, results: dict[str, Any]) -> None:
    for name, text in (("results.json", json.dumps(results, indent=2, default=_json_default) + "\n"),
                       ("results.md", to_markdown(results))):
        tmp = out / f".{name}.partial"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


if __name__ == "__main__":
    sys.exit(main())
