"""The report of an ``--auto`` run: every candidate ranked (kept, or dropped with the reason), in
report.json (machines), report.md (people) and a latency-vs-accuracy plot (PNG)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from tfaccel.core.files import atomic_file
from tfaccel.core.report import path_in_out_dir, report_json

PLOT_NAME = "latency_vs_accuracy.png"

#: Candidate statuses, in the order the table lists them.
KEPT, DROPPED, FAILED, NOT_TRIED, NOT_A_CANDIDATE = "kept", "dropped", "failed", "not tried", "not a candidate"
_ORDER = {KEPT: 0, DROPPED: 1, FAILED: 2, NOT_TRIED: 3, NOT_A_CANDIDATE: 4}


@dataclasses.dataclass
class AutoCandidate:
    """One recipe's outcome.

    Attributes:
        name, description, format: from the recipe.
        steps: the steps run (after planning: an ``export`` is appended to a chain ending in Keras).
        status: "kept" (validated within the budget and timed), "dropped" (over the budget, or its
            timing failed), "failed" (a step raised), "not tried" (the time budget ran out) or
            "not a candidate" (this machine, the data or ``formats`` rule it out).
        reason: why it was dropped / failed / not tried / not a candidate.
        speedups: shape ("1x128") -> baseline p50 / this p50, timed interleaved in the same run.
        score: geometric mean of ``speedups`` over the shapes: what candidates are ranked by.
        accuracy, accuracy_drop_points: on the source's labelled eval split (None without one).
        max_abs_diff, min_cosine: against the reference on the sample inputs.
    """

    name: str
    description: str
    format: str
    steps: list[str] = dataclasses.field(default_factory=list)
    status: str = NOT_A_CANDIDATE
    reason: str = ""
    kind: str | None = None
    path: str | None = None  # where the artifact was built (gone after the run unless kept)
    size_bytes: int | None = None
    build_seconds: float | None = None
    accuracy: float | None = None
    accuracy_drop_points: float | None = None
    max_abs_diff: float | None = None
    min_cosine: float | None = None
    measurements: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    speedups: dict[str, float] = dataclasses.field(default_factory=dict)
    score: float | None = None
    rank: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def latency(self, batch: int, seq: int) -> dict[str, Any] | None:
        return next((m for m in self.measurements if (m["batch"], m["seq"]) == (batch, seq)), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class AutoReport:
    """What ``optimize_auto`` returns and writes as report.json / report.md / the plot."""

    source: str
    source_description: str
    task: str
    shapes: list[list[int]]
    max_accuracy_drop: float  # points
    budget_rule: str  # how candidates were judged: accuracy on N examples, or cosine tolerances
    formats: str
    capabilities: dict[str, Any]
    baseline: str
    candidates: list[AutoCandidate] = dataclasses.field(default_factory=list)
    reference_accuracy: float | None = None
    eval_examples: int | None = None
    winner: str | None = None
    fastest_artifact: str | None = None  # the candidate name, any format
    fastest_artifact_path: str | None = None  # relative to out_dir
    final_saved_model: str | None = None  # relative to out_dir
    plot: str | None = None
    time_budget_s: float | None = None
    total_seconds: float = 0.0
    out_dir: str | None = None
    run_notes: list[str] = dataclasses.field(default_factory=list)  # decisions of the search itself

    def candidate(self, name: str) -> AutoCandidate:
        for c in self.candidates:
            if c.name == name:
                return c
        raise KeyError(f"No candidate {name!r}; candidates are {[c.name for c in self.candidates]}")

    @property
    def final_saved_model_path(self) -> str | None:
        return path_in_out_dir(self.final_saved_model, self.out_dir)

    def ranked(self) -> list[AutoCandidate]:
        """Candidates in table order: kept by score (fastest first), then dropped by score, failed,
        not tried, not a candidate."""
        return sorted(self.candidates, key=lambda c: (_ORDER[c.status], -(c.score or 0.0)))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tfaccel_auto_report"] = 1
        d["candidates"] = [c.to_dict() for c in self.ranked()]
        d.pop("out_dir")
        return d

    def write(self, folder: str | Path) -> None:
        """Write report.json, report.md and the plot into ``folder`` (each atomically)."""
        folder = Path(folder)
        self.plot = self.write_plot(folder)
        with atomic_file(folder / "report.json") as tmp:
            tmp.write_text(report_json(self.to_dict()))
        with atomic_file(folder / "report.md") as tmp:
            tmp.write_text(self.to_markdown())

    def write_plot(self, folder: Path) -> str | None:
        """The report's plot in ``folder`` (latency against accuracy, PLOT_NAME); returns its file name."""
        return write_plot(self, folder / PLOT_NAME)

    def to_markdown(self) -> str:
        return to_markdown(self)


def _shape_key(batch: int, seq: int) -> str:
    return f"{batch}x{seq}"


def ranked_table(report: AutoReport) -> list[str]:
    """The ranked candidate table as Markdown lines."""
    shapes = [tuple(s) for s in report.shapes]
    has_acc = report.reference_accuracy is not None
    base = next((c for c in report.candidates if c.name == report.baseline), None)
    head = ["rank", "candidate", "format"]
    for b, s in shapes:
        head += [f"p50 ms ({b}x{s})", f"speed-up ({b}x{s})"]
    head += ["accuracy", "Δ acc (pts)"] if has_acc else []
    head += ["cosine", "size MB", "size vs export", "build s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report.ranked():
        mark = " **(winner)**" if c.name == report.winner else ""
        mark += " (fastest, any format)" if c.name == report.fastest_artifact and c.name != report.winner else ""
        row = [str(c.rank) if c.rank else "-", f"`{c.name}`{mark}", c.format]
        for b, s in shapes:
            m = c.latency(b, s)
            sp = c.speedups.get(_shape_key(b, s))
            row += [f"{m['p50_ms']:.1f}" if m else "-", f"{sp:.2f}x" if sp else "-"]
        if has_acc:
            row.append(f"{c.accuracy:.4f}" if c.accuracy is not None else "-")
            row.append(f"{0.0 - c.accuracy_drop_points:+.2f}" if c.accuracy_drop_points is not None else "-")
        row.append(f"{c.min_cosine:.6f}" if c.min_cosine is not None else "-")
        row.append(f"{c.size_bytes / 1e6:.1f}" if c.size_bytes else "-")
        ratio = c.size_bytes / base.size_bytes if c.size_bytes and base and base.size_bytes else None
        row.append(f"{ratio:.2f}x" if ratio else "-")
        row.append(f"{c.build_seconds:.0f}" if c.build_seconds is not None else "-")
        status = c.status + (f": {c.reason}" if c.reason else "")
        row.append(status.replace("|", "\\|"))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def to_markdown(report: AutoReport) -> str:
    lines = [f"# tfaccel --auto: {report.source}", "", report.source_description.strip(), ""]
    winner = report.candidate(report.winner) if report.winner else None
    if winner:
        sp = ", ".join(f"{v:.2f}x at {k}" for k, v in winner.speedups.items())
        lines.append(f"**Winner: `{winner.name}`** ({' -> '.join(winner.steps)}): {sp} vs `{report.baseline}`, "
                     f"written to `{report.final_saved_model}`.")
    if report.fastest_artifact and report.fastest_artifact != report.winner:
        f = report.candidate(report.fastest_artifact)
        sp = ", ".join(f"{v:.2f}x at {k}" for k, v in f.speedups.items())
        lines.append(f"Fastest artifact of any format: `{f.name}` ({f.format}, {sp}): `{report.fastest_artifact_path}`.")
    lines += ["", f"Budget: {report.budget_rule}.", ""]
    lines += ranked_table(report)
    lines += [
        "",
        f"Candidates are ranked by their speed-up over `{report.baseline}` (the plain export of the reference "
        "model), the geometric mean over the shapes; all were timed interleaved (round-robin, median of the "
        "timed calls) in one process. The winner is the fastest SavedModel within the budget. Accuracy and "
        "cosine are against the reference (the model as it came in); cosine is the lowest per-sample cosine "
        "similarity on the sample inputs.",
    ]
    return "\n".join(lines + markdown_tail(report, "latency vs accuracy"))


def markdown_tail(report: AutoReport, plot_title: str) -> list[str]:
    """The end of every --auto report.md: the run's and the candidates' notes, the plot, and what it was
    measured with (versions, CPU, cores, GPUs, total time)."""
    lines = []
    notes = [("run", n) for n in report.run_notes] + [(c.name, n) for c in report.candidates for n in c.notes]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {name}: {n}" for name, n in notes]
    if report.plot:
        lines += ["", f"![{plot_title}]({report.plot})"]
    caps = report.capabilities
    budget = f"; time budget {report.time_budget_s:.0f}s" if report.time_budget_s is not None else ""
    runtimes = f", onnxruntime {caps.get('onnxruntime')}" if caps.get("onnxruntime") else ""
    lines += [
        "",
        f"Measured with TensorFlow {caps.get('tensorflow')}, Keras {caps.get('keras')}{runtimes} on {caps.get('cpu')} "
        f"({caps.get('cpu_count')} cores; GPUs: {', '.join(caps.get('gpus') or []) or 'none'}). "
        f"Total run time {report.total_seconds:.0f}s{budget}.",
        "",
    ]
    return lines


def write_plot(report: AutoReport, path: str | Path) -> str | None:
    """A latency-vs-accuracy scatter of the timed candidates (accuracy, or cosine without labels, on
    the y axis; p50 at the first shape on the x axis), the budget as a line, the winner circled.
    Returns the file name written, or None when no candidate was timed."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    timed = [c for c in report.candidates if c.measurements]
    if not timed:
        return None
    b, s = report.shapes[0]
    use_acc = report.reference_accuracy is not None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colors = {KEPT: "tab:green", DROPPED: "tab:red"}
    for c in timed:
        m = c.latency(b, s)
        y = c.accuracy if use_acc else c.min_cosine
        if m is None or y is None or not math.isfinite(y):
            continue
        ax.scatter(m["p50_ms"], y, color=colors.get(c.status, "tab:gray"), s=40, zorder=3,
                   label=c.status if c.status not in ax.get_legend_handles_labels()[1] else None)
        if c.name == report.winner:
            ax.scatter(m["p50_ms"], y, s=220, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4,
                       label="winner")
        ax.annotate(c.name, (m["p50_ms"], y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if use_acc:
        floor = report.reference_accuracy - report.max_accuracy_drop / 100
        ax.axhline(report.reference_accuracy, color="gray", linestyle=":", linewidth=1, label="reference")
        ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1,
                   label=f"budget (-{report.max_accuracy_drop:g} pts)")
        ax.set_ylabel(f"accuracy ({report.eval_examples} held-out examples)")
    else:
        ax.set_ylabel("lowest per-sample cosine vs reference")
    ax.set_xlabel(f"p50 latency, ms (batch {b} x seq {s}); left is faster")
    ax.set_title(f"tfaccel --auto: {report.source}")
    return save_plot(fig, ax, path)


def save_plot(fig, ax, path: str | Path) -> str:
    """Grid, legend, layout, then ``fig`` written atomically as a PNG to ``path`` and closed; returns its
    file name. The finishing of every --auto plot."""
    import matplotlib.pyplot as plt

    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path.name


