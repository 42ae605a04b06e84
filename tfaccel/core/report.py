"""report.json (for machines) and report.md (for people): every stage against the reference."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


def path_in_out_dir(path: str | None, out_dir: str | None) -> str | None:
    """A report's path as a user opens it: relative paths are inside the run's output folder."""
    if path is None:
        return None
    p = Path(path)
    return str(p if p.is_absolute() or out_dir is None else Path(out_dir) / p)


@dataclasses.dataclass
class StageResult:
    index: int
    step: str
    kind: str
    path: str | None
    params: dict[str, Any]
    size_bytes: int = 0
    build_seconds: float = 0.0
    accuracy: float | None = None
    comparison: dict[str, Any] | None = None  # against the reference (cumulative)
    step_comparison: dict[str, Any] | None = None  # against the stage's input (what the tolerance bounds)
    tolerance: dict[str, Any] | None = None
    measurements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    peak_memory_bytes: int | None = None
    runner_stats: dict[str, Any] | None = None  # what the stage's runner counted (e.g. XLA compilations)
    status: str = "ok"  # ok | breach (kept, flagged) | skipped
    breaches: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    parent: int | None = None  # index of the stage this one started from (0 = reference; None for the reference)
    load_rss_bytes: int | None = None  # RSS a fresh process gains loading this SavedModel + one call
    stored_values: int | None = None  # values in the SavedModel's variables checkpoint

    def latency(self, batch: int, seq: int) -> dict[str, Any] | None:
        for m in self.measurements:
            if m["batch"] == batch and m["seq"] == seq:
                return m
        return None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        first = self.measurements[0] if self.measurements else {}
        # Flat headline fields (first measured shape) for quick reading of report.json.
        d["latency_p50_ms"] = first.get("p50_ms")
        d["latency_p95_ms"] = first.get("p95_ms")
        d["throughput"] = first.get("throughput")
        d["max_abs_diff"] = (self.comparison or {}).get("max_abs_diff")
        d["cosine_similarity"] = (self.comparison or {}).get("min_cosine")
        return d


@dataclasses.dataclass
class Report:
    source: str
    source_description: str
    task: str
    shapes: list[list[int]]
    capabilities: dict[str, Any]
    stages: list[StageResult] = dataclasses.field(default_factory=list)
    final_saved_model: str | None = None  # relative to out_dir unless absolute
    total_seconds: float = 0.0
    out_dir: str | None = None
    # a plain Keras model.export of the reference: size_bytes, load_rss_bytes, stored_values (Keras sources)
    model_export: dict[str, Any] | None = None

    @property
    def reference(self) -> StageResult:
        return self.stages[0]

    def stage(self, step: str) -> StageResult:
        for s in self.stages:
            if s.step == step:
                return s
        raise KeyError(f"No stage {step!r}; stages are {[s.step for s in self.stages]}")

    @property
    def final_saved_model_path(self) -> str | None:
        return path_in_out_dir(self.final_saved_model, self.out_dir)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tfaccel_report": 1,
            "source": self.source,
            "source_description": self.source_description,
            "task": self.task,
            "shapes": self.shapes,
            "final_saved_model": self.final_saved_model,
            "total_seconds": self.total_seconds,
            "capabilities": self.capabilities,
            "model_export": self.model_export,
            "stages": [s.to_dict() for s in self.stages],
        }

    def write(self, folder: str | Path) -> None:
        folder = Path(folder)
        (folder / "report.json").write_text(json.dumps(self.to_dict(), indent=2, default=_json_default))
        (folder / "report.md").write_text(self.to_markdown())

    def _tree_markdown(self) -> list[str]:
        """The stage tree: each stage under the stage it started from. Only drawn when some stage does
        not simply continue from the one before it (a branch)."""
        if all(st.parent is None or st.parent == st.index - 1 for st in self.stages):
            return []
        children: dict[int | None, list[StageResult]] = {}
        for st in self.stages[1:]:
            children.setdefault(st.parent, []).append(st)
        lines = ["", "## Stage tree", "",
                 "Each stage sits under the stage it started from (`STEP@FROM` in --steps picks one).", ""]

        def walk(st: StageResult, depth: int) -> None:
            status = "" if st.status == "ok" else f", {st.status}"
            lines.append(f"{'  ' * depth}- {st.index} {st.step} ({st.kind}{status})")
            for child in children.get(st.index, []):
                walk(child, depth + 1)

        walk(self.reference, 0)
        for st in children.get(None, []):  # stages with no known parent (their input was skipped)
            walk(st, 0)
        return lines

    def _footprint_markdown(self) -> list[str]:
        """Size and resident memory after loading of every SavedModel stage, against ``model.export``."""
        rows = [st for st in self.stages if st.load_rss_bytes is not None]
        if not rows:
            return []
        base, vs = self.model_export or {}, "model.export"
        if not base and self.reference.load_rss_bytes is not None:  # a SavedModel source: against itself
            base, vs = {"size_bytes": self.reference.size_bytes, "load_rss_bytes": self.reference.load_rss_bytes}, "ref"
        lines = ["", "## SavedModel size and memory after loading", "",
                 f"| # | stage | size MB | size vs {vs} | stored values | RSS after load MB "
                 f"| RSS vs {vs} |", "|---|---|---|---|---|---|---|"]
        if self.model_export:
            lines.append(f"| - | model.export | {base['size_bytes'] / 1e6:.1f} | 1.00x | {base['stored_values']} | "
                         f"{base['load_rss_bytes'] / 1e6:.0f} | 1.00x |")

        def ratio(v, b):
            return f"{v / b:.2f}x" if b else "-"

        for st in rows:
            lines.append(f"| {st.index} | {st.step} | {st.size_bytes / 1e6:.1f} | "
                         f"{ratio(st.size_bytes, base.get('size_bytes'))} | {st.stored_values} | "
                         f"{st.load_rss_bytes / 1e6:.0f} | {ratio(st.load_rss_bytes, base.get('load_rss_bytes'))} |")
        lines += ["", "RSS after load: how much a fresh process's resident memory grows loading the SavedModel and "
                  "running serving_default once (XLA stages include the compiler's memory). model.export: "
                  "`model.export(path, format=\"tf_saved_model\")` of the reference, which stores every weight twice "
                  "(keras-team/keras#23553)."]
        return lines

    def to_markdown(self) -> str:
        ref = self.reference
        shapes = [tuple(s) for s in self.shapes]
        head = ["#", "stage", "artifact"]
        for b, s in shapes:
            head += [f"p50 ms ({b}x{s})", f"p95 ms ({b}x{s})", f"speed-up ({b}x{s})"]
        head += ["size MB", "size vs ref", "max abs diff", "cosine"]
        has_acc = ref.accuracy is not None
        if has_acc:
            head += ["accuracy", "Δ acc (pts)"]
        head += ["peak mem MB", "status"]
        rows = []
        for st in self.stages:
            row = [str(st.index), st.step, st.kind]
            for b, s in shapes:
                m, r = st.latency(b, s), ref.latency(b, s)
                if m:
                    row += [f"{m['p50_ms']:.1f}", f"{m['p95_ms']:.1f}",
                            f"{r['p50_ms'] / m['p50_ms']:.2f}x" if r else "-"]
                else:
                    row += ["-", "-", "-"]
            row.append(f"{st.size_bytes / 1e6:.1f}")
            row.append(f"{st.size_bytes / ref.size_bytes:.2f}x" if ref.size_bytes else "-")
            comp = st.comparison or {}
            row.append("reference" if st.index == 0 else f"{comp.get('max_abs_diff', float('nan')):.2e}")
            row.append("" if st.index == 0 else f"{comp.get('min_cosine', float('nan')):.6f}")
            if has_acc:
                row.append(f"{st.accuracy:.4f}" if st.accuracy is not None else "-")
                row.append("" if st.index == 0 or st.accuracy is None else f"{(st.accuracy - ref.accuracy) * 100:+.2f}")
            row.append(f"{st.peak_memory_bytes / 1e6:.0f}" if st.peak_memory_bytes is not None else "-")
            row.append(st.status)
            rows.append(row)
        lines = [
            f"# tfaccel report: {self.source}",
            "",
            f"{self.source_description}".strip(),
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        lines.append("")
        lines.append(
            "Speed-up, size, max abs diff, cosine and accuracy are against the reference (stage 0: the model as "
            "it came in, called through one tf.function). Each step's tolerance bounds its own effect, against "
            "its input stage; report.json has both comparisons. Cosine is the lowest per-sample cosine similarity over the sample inputs; "
            "peak mem is the growth of this process's resident memory while loading and timing the stage."
        )
        lines += self._tree_markdown()
        lines += self._footprint_markdown()
        notes = [(st, n) for st in self.stages for n in st.notes]
        notes += [(st, f"{k}: {v}") for st in self.stages for k, v in (st.runner_stats or {}).items()]
        notes += [(st, f"breached its tolerance ({st.status}): {b}") for st in self.stages for b in st.breaches]
        if notes:
            lines += ["", "## Notes", ""]
            lines += [f"- {st.step}: {n}" for st, n in notes]
        if self.final_saved_model:
            lines += ["", f"Final SavedModel: `{self.final_saved_model}` (signature `serving_default`)."]
        caps = self.capabilities
        lines += [
            "",
            f"Measured with TensorFlow {caps.get('tensorflow')}, Keras {caps.get('keras')} on {caps.get('cpu')} "
            f"({caps.get('cpu_count')} cores; GPUs: {', '.join(caps.get('gpus') or []) or 'none'}). "
            f"Total run time {self.total_seconds:.0f}s.",
            "",
        ]
        return "\n".join(lines)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def load_report(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    return json.loads((p / "report.json" if p.is_dir() else p).read_text())
