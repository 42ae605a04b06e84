"""``--auto``, phase 2: groups of candidates that share a first step, built fastest first.

A candidate whose chain without its first step is another candidate's chain (its *counterpart*:
``prune-structured+int8-xla`` -> ``int8-xla``, ``prune-structured`` -> ``export``) belongs to the group
of that first step. Before the first member of a group is built, the counterparts that are built get a
quick interleaved timing, and the members are built in the order of their counterparts' speed. Once a
member is within budget, a sibling whose counterpart was clearly slower than that member's counterpart
(:data:`DOMINANCE_MARGIN`, quartiles apart) is not tried: it is *dominated*.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from tfaccel.auto.auto_report import KEPT, AutoCandidate, AutoReport
from tfaccel.auto.plan import Planned
from tfaccel.core.timer import InterleavedTiming, time_interleaved

#: A candidate whose counterpart (the same chain without its first step) was clearly slower than a
#: sibling's counterpart by this factor, in a quick timing, is dominated.
DOMINANCE_MARGIN = 1.1


@dataclasses.dataclass
class Groups:
    """Which candidates form groups, and what each one's counterpart is.

    Attributes:
        counterpart: candidate -> the candidate with the same chain minus its first step.
        members: first step's key -> the candidates of that group (in table order).
        first_step: candidate -> its first step's name (for messages).
        quick: group key -> the quick timings of its counterparts, one per shape (filled when ordered).
    """

    counterpart: dict[str, str]
    members: dict[str, list[str]]
    first_step: dict[str, str]
    quick: dict[str, list[InterleavedTiming]] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, planned: list[Planned]) -> Groups:
        by_keys = {tuple(p.keys): p.name for p in planned}
        counterpart = {p.name: by_keys[tuple(p.keys[1:])] for p in planned
                       if len(p.keys) > 1 and tuple(p.keys[1:]) in by_keys}
        members: dict[str, list[str]] = {}
        for p in planned:
            if p.name in counterpart:
                members.setdefault(p.keys[0], []).append(p.name)
        members = {k: v for k, v in members.items() if len(v) > 1}
        first = {p.name: p.steps[0].name for p in planned if any(p.name in m for m in members.values())}
        return cls(counterpart, members, first)

    def group_of(self, name: str) -> str | None:
        return next((g for g, names in self.members.items() if name in names), None)

    def order(self, group: str, queue: list[Planned], at: int, runners: dict[str, Any], make_inputs: Callable,
              shapes, report: AutoReport, warmup: int, log: Callable[[str], None]) -> None:
        """Time the group's counterparts that are built (5 quick calls each, every shape), and move the
        group's members to ``queue[at:]`` fastest counterpart first (untimed ones last, in table order)."""
        names = self.members[group]
        timed = {self.counterpart[n] for n in names if self.counterpart[n] in runners}
        quick: list[InterleavedTiming] = []
        if len(timed) > 1:
            for batch, seq in shapes:
                quick.append(time_interleaved({n: runners[n] for n in runners if n in timed}, make_inputs(batch, seq),
                                              seq=seq, runs=5, warmup=max(2, warmup), max_seconds=5.0))
        self.quick[group] = quick

        def speed(name: str) -> float:
            ms = [t.measurements.get(self.counterpart[name]) for t in quick]
            if not quick or any(m is None for m in ms):
                return math.inf
            return math.exp(sum(math.log(m.p50_ms) for m in ms) / len(ms))

        mine = sorted((p for p in queue[at:] if p.name in names), key=lambda p: speed(p.name))  # stable
        queue[at:] = mine + [p for p in queue[at:] if p.name not in names]
        if quick:
            where = "at " + "x".join(map(str, shapes[0])) if len(shapes) == 1 else "geometric mean over the shapes"
            order = ", ".join(f"{p.name} ({self.counterpart[p.name]} "
                              + (f"{speed(p.name):.1f} ms" if math.isfinite(speed(p.name)) else "not timed") + ")"
                              for p in mine)
            step = self.first_step[mine[0].name]
            note = (f"the {step} candidates were built in the order of their counterparts' speed (the same chain "
                    f"without {step}; quick interleaved timing, 5 calls each, p50 {where}): {order}")
            report.run_notes.append(note)
            log(f"  {note}")

    def dominated(self, cand: AutoCandidate, report: AutoReport) -> str:
        """Why ``cand`` is not worth building (empty: it is): a sibling built within the budget whose
        counterpart was clearly faster than ``cand``'s at every shape in the quick timing."""
        group = self.group_of(cand.name)
        quick = self.quick.get(group) if group else None
        if not quick:
            return ""
        mine, step = self.counterpart[cand.name], self.first_step[cand.name]
        for other in self.members[group]:
            c = report.candidate(other)
            if other == cand.name or c.status != KEPT or c.format != cand.format:
                continue
            theirs = self.counterpart[other]
            if all(t.clearly_slower(mine, theirs, DOMINANCE_MARGIN) for t in quick):
                t = quick[0]
                b, s = report.shapes[0]
                return (f"dominated: without {step}, {mine} was clearly slower than {theirs} (p50 "
                        f"{t.measurements[mine].p50_ms:.1f} vs {t.measurements[theirs].p50_ms:.1f} ms at {b}x{s}"
                        f"{' and the other shapes' if len(quick) > 1 else ''}, quick interleaved timing), and "
                        f"{other} is within budget")
        return ""
