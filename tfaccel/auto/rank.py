"""``--auto``, phases 5 and 6: time every candidate that ran, interleaved at every shape against the
baseline, then score and rank them and pick the winner (the fastest SavedModel within the budget) and
the fastest artifact of any format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from tfaccel.auto.auto_report import DROPPED, KEPT, AutoReport
from tfaccel.core.timer import time_against_baseline
from tfaccel.errors import TfaccelError

#: In the final timing, stop timing a candidate that is clearly slower than the fastest one (its
#: fastest quarter of calls slower than the fastest's slowest quarter, and a median over this factor).
STOP_SLOWER_MARGIN = 1.2


def time_candidates(report: AutoReport, runners: dict[str, Any], make_inputs: Callable, shapes, *, runs: int,
                    warmup: int, max_seconds: Callable[[int], float], log: Callable[[str], None]) -> None:
    """Time every validated candidate (within the budget or not: the plot shows both) interleaved, shape by
    shape, and record its measurements and speed-ups. ``max_seconds(shapes_left)`` is the seconds of timed
    calls each candidate gets at the next shape. A candidate whose timing fails is dropped with the reason."""
    for i, shape in enumerate(shapes):
        seconds = max_seconds(len(shapes) - i)
        log(f"timing {len(runners)} candidates interleaved at {shape[0]}x{shape[1]} ({runs} runs each, round-robin, "
            f"at most {seconds:.3g}s of calls each; clearly slower ones stop after 5)")
        _time_shape(report, runners, make_inputs, shape, runs=runs, warmup=warmup, max_seconds=seconds, log=log)


def _time_shape(report: AutoReport, runners: dict[str, Any], make_inputs: Callable, shape, *, runs: int,
                warmup: int, max_seconds: float, log: Callable[[str], None]) -> None:
    for st in time_against_baseline(runners, make_inputs, [shape], report.baseline, runs=runs, warmup=warmup,
                                    max_seconds=max_seconds, stop_slower=STOP_SLOWER_MARGIN):
        shape = f"{st.batch}x{st.seq}"
        for name, err in st.timing.errors.items():
            if name == report.baseline:
                raise TfaccelError(f"Timing the baseline '{report.baseline}' at {shape} failed: {err}")
            c = report.candidate(name)
            c.status, c.reason = DROPPED, f"timing at {shape} failed: {err}"
            log(f"  {name}: timing FAILED: {err}")
        for name, why in st.timing.stopped.items():
            report.candidate(name).notes.append(f"timing at {shape}: {why}")
        for name, m in st.timing.measurements.items():
            c = report.candidate(name)
            c.measurements.append(m.to_dict())
            c.speedups[shape] = st.speedups[name]
            log(f"  {name:30s} p50 {m.p50_ms:9.2f} ms  p95 {m.p95_ms:9.2f} ms  {st.speedups[name]:5.2f}x  "
                f"({m.runs} runs{', stopped: clearly slower' if name in st.timing.stopped else ''}) [{c.status}]")


def score_and_number(report) -> None:
    """Each candidate timed at every shape (kept or dropped) gets its score, the geometric-mean speed-up over
    the shapes, and a rank by score (``report.ranked()``); the others keep ``score``/``rank`` None. Shared by
    the classifier search and the generation search."""
    n_shapes = len(report.shapes)
    for c in report.candidates:
        if len(c.speedups) == n_shapes and c.status in (KEPT, DROPPED):
            c.score = math.exp(sum(math.log(v) for v in c.speedups.values()) / n_shapes)
    for i, c in enumerate(report.ranked(), 1):
        c.rank = i if c.score is not None else None


def rank(report: AutoReport) -> None:
    """Score (geometric-mean speed-up over the shapes), rank, and pick the winner and the fastest of any
    format."""
    score_and_number(report)
    kept = [c for c in report.candidates if c.status == KEPT and c.score is not None]
    saved_models = [c for c in kept if c.kind == "saved_model"]
    report.winner = max(saved_models, key=lambda c: c.score).name
    report.fastest_artifact = max(kept, key=lambda c: c.score).name
