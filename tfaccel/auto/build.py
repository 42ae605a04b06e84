"""``--auto``, phases 3 and 4: build every candidate (shared prefixes built once) and validate it against
the reference within the accuracy budget. What comes out is a runner per candidate that ran, for the
final timing; every candidate's report row says what happened to it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tfaccel.auto.auto_report import DROPPED, FAILED, KEPT, NOT_TRIED, AutoCandidate, AutoReport
from tfaccel.auto.budget import TimeBudget
from tfaccel.auto.groups import Groups
from tfaccel.auto.plan import Planned
from tfaccel.core.chain import Built, ChainBuilder
from tfaccel.core.step import Step
from tfaccel.core.timer import time_runner
from tfaccel.core.validation import Comparison, Reference, Tolerance
from tfaccel.errors import OverBudget, ValidationError, first_line


def chain_tolerance(steps: Sequence[Step]) -> Tolerance:
    """The output bound of a chain of steps when no labelled data judges it: the loosest cosine of
    its steps, and the sum of their max-abs-diff limits (unchecked if any step leaves it unchecked)."""
    cosines = [s.tolerance.min_cosine for s in steps if s.tolerance.min_cosine is not None]
    diffs = [s.tolerance.max_abs_diff for s in steps]
    return Tolerance(max_abs_diff=None if any(d is None for d in diffs) else float(sum(diffs)),
                     min_cosine=min(cosines) if cosines else None, max_accuracy_drop=None)


def budget_breaches(comp: Comparison, cand: AutoCandidate, steps: Sequence[Step], labelled: bool,
                    max_accuracy_drop: float) -> list[str]:
    """Why a candidate is over the budget (empty: within it)."""
    if not math.isfinite(comp.max_abs_diff):
        return ["non-finite outputs (inf/NaN) on the sample inputs"]
    if labelled:
        if cand.accuracy_drop_points > max_accuracy_drop + 1e-7:
            return [f"accuracy {cand.accuracy:.4f} is {cand.accuracy_drop_points:.2f} points below the reference "
                    f"(budget {max_accuracy_drop:g})"]
        return []
    return [f"{b} (tolerance of {'+'.join(s.name for s in steps)})" for b in comp.breaches(chain_tolerance(steps))]


class CandidateBuilder:
    """Builds and validates the planned candidates in order (groups fastest counterpart first),
    skipping the ones the time budget or a dominating sibling rules out.

    Args:
        builder: the chain builder (shared prefixes).
        reference: the reference's outputs and accuracy (every candidate is checked against it).
        budget: the run's time budget.
        groups: the candidate groups (see :mod:`tfaccel.auto.groups`).
        report: the report whose rows are filled in.
        make_inputs, shapes, warmup: for the groups' quick timings.
        log: progress lines.
    """

    def __init__(self, builder: ChainBuilder, reference: Reference, budget: TimeBudget, groups: Groups,
                 report: AutoReport, make_inputs: Callable, shapes, warmup: int, log: Callable[[str], None]):
        self.builder, self.reference, self.budget, self.groups = builder, reference, budget, groups
        self.report, self.make_inputs, self.shapes, self.warmup, self.log = report, make_inputs, shapes, warmup, log
        self.runners: dict[str, Any] = {}

    def run(self, planned: list[Planned]) -> dict[str, Any]:
        """Build and validate every candidate; returns name -> runner of those that ran."""
        queue, ordered, n = list(planned), set(), len(planned)
        i = 0
        while i < len(queue):
            group = self.groups.group_of(queue[i].name)
            if group is not None and group not in ordered:
                ordered.add(group)
                self.groups.order(group, queue, i, self.runners, self.make_inputs, self.shapes, self.report,
                                  self.warmup, self.log)
            p = queue[i]
            i += 1
            why = "" if i == 1 else (self.budget.not_tried_reason(self.builder.unbuilt(p.steps))
                                     or self.groups.dominated(p.cand, self.report))
            if why:  # the baseline (first) is always built
                p.cand.status, p.cand.reason = NOT_TRIED, why
                self.log(f"[{i}/{n}] {p.name}: not tried: {why}")
                continue
            self.log(f"[{i}/{n}] {p.name}: {' -> '.join(p.cand.steps)}  "
                     f"({time.perf_counter() - self.budget.start:.0f}s elapsed)")
            try:
                built = self._build(p, baseline=i == 1)
            finally:  # Keras models no later candidate builds on
                self.builder.forget_keras({tuple(q.keys[: j + 1]) for q in queue[i:] for j in range(len(q.keys))})
            if built is not None:
                self._validate(p, built, baseline=i == 1)
                if i == 1 and self.budget.total_s is not None:
                    self._time_baseline_calls(self.runners[p.name])
        return self.runners

    def _time_baseline_calls(self, runner) -> None:
        """One call of the baseline at each shape after a first one: how long the final timing's calls take
        (the time budget keeps enough for them, see :meth:`TimeBudget.timing_reserve`)."""
        per_shape = [time_runner(runner, self.make_inputs(batch, seq), warmup=1, runs=1, max_seconds=None).p50_ms / 1000
                     for batch, seq in self.shapes]
        self.budget.record_call_seconds(per_shape)
        self.log("  baseline call: " + ", ".join(f"{t:.2f}s at {b}x{s}" for t, (b, s) in zip(per_shape, self.shapes,
                                                                                              strict=True)))

    def _build(self, p: Planned, baseline: bool) -> Built | None:
        try:
            return self.builder.build(p.name, p.steps, self.budget.deadline_for(p.steps))
        except OverBudget as exc:
            p.cand.status, p.cand.reason = NOT_TRIED, f"time budget of {self.budget.total_s:g}s: {exc}"
            self.log(f"  not tried: {p.cand.reason}")
        except Exception as exc:
            if baseline:
                raise
            p.cand.status, p.cand.reason = FAILED, first_line(exc)
            self.log(f"  FAILED: {p.cand.reason}")
        return None

    def _validate(self, p: Planned, built: Built, baseline: bool) -> None:
        cand, artifact, t0 = p.cand, built.artifact, time.perf_counter()
        cand.kind, cand.build_seconds, cand.notes = artifact.kind, built.seconds, built.notes
        cand.size_bytes = artifact.size_bytes()
        path = Path(artifact.path) if artifact.path else None
        root = self.builder.work.parent  # the staged output folder; candidates are under root/candidates
        cand.path = (str(path.relative_to(root)) if path.is_relative_to(root)
                     else str(path)) if path else None  # the source itself: absolute
        try:
            runner = artifact.runner()
            comp = self.reference.check(runner)
        except Exception as exc:  # e.g. ValidationError: output names changed
            if baseline:
                raise
            cand.status, cand.reason = FAILED, f"does not run: {first_line(exc)}"
            self.log(f"  FAILED: {cand.reason}")
            return
        self.budget.record_validation(time.perf_counter() - t0)
        cand.max_abs_diff, cand.min_cosine = comp.max_abs_diff, comp.min_cosine
        labelled = self.reference.labelled
        if labelled:
            cand.accuracy = comp.accuracy
            cand.accuracy_drop_points = (self.reference.accuracy - comp.accuracy) * 100
        breaches = budget_breaches(comp, cand, p.steps, labelled, self.report.max_accuracy_drop)
        cand.status = DROPPED if breaches else KEPT
        cand.reason = "over budget: " + "; ".join(breaches) if breaches else ""
        self.log(f"  built in {built.seconds:.0f}s (validated in {time.perf_counter() - t0:.0f}s), "
                 f"{cand.size_bytes / 1e6:.1f} MB, cosine {comp.min_cosine:.6f}"
                 + (f", accuracy {cand.accuracy:.4f} ({0.0 - cand.accuracy_drop_points:+.2f} pts)" if labelled else "")
                 + (f": DROPPED ({cand.reason})" if breaches else ": within budget"))
        if baseline and breaches:
            raise ValidationError(f"The baseline {cand.name} does not match the reference: {'; '.join(breaches)}")
        self.runners[cand.name] = runner
