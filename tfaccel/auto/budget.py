"""``--auto``, the time budget: how long building may go on, whether a candidate still fits, by when each
step should be done, and how much time each candidate gets in the final timing.

The budget covers building, validating and timing. The last part of it (10%, 15-60 s) is kept for the
final timing. Before that, a candidate is not tried when the times its steps took earlier in this run (and
a validation) say it would not fit; steps that can stop long work (distillation) get a deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tfaccel.core.step import Step


class TimeBudget:
    """The seconds of one ``--auto`` run.

    Args:
        total_s: the whole budget in seconds (None: no limit).
        start: ``time.perf_counter()`` at the start of the run.
        step_seconds: step name -> seconds its last build took in this run (a live dict: the chain
            builder's :attr:`~tfaccel.core.chain.ChainBuilder.step_seconds`).
    """

    def __init__(self, total_s: float | None, start: float, step_seconds: dict[str, float]):
        self.total_s, self.start, self.step_seconds = total_s, start, step_seconds
        #: seconds kept at the end for timing every candidate (at least 3 calls each)
        self.reserve = min(60.0, max(15.0, 0.1 * total_s)) if total_s is not None else 0.0
        self.build_deadline = start + total_s - self.reserve if total_s is not None else None
        self._validations: list[float] = []

    def record_validation(self, seconds: float) -> None:
        self._validations.append(seconds)

    def _after(self, todo: Sequence[Step]) -> float:
        """Seconds ``todo`` took earlier in this run (0 for steps not built yet), plus a validation."""
        validation = sum(self._validations) / max(1, len(self._validations))
        return sum(self.step_seconds.get(s.name, 0.0) for s in todo) + validation

    def not_tried_reason(self, unbuilt: Sequence[Step]) -> str:
        """Why a candidate whose ``unbuilt`` steps are still to build does not fit (empty: it fits).
        Its estimate is known only once every one of its steps was built in this run."""
        if self.build_deadline is None:
            return ""
        now = time.perf_counter()
        left = self.build_deadline - now
        if left <= 0:
            return (f"time budget of {self.total_s:g}s: building stopped after {now - self.start:.0f}s (the last "
                    f"{self.reserve:.0f}s are kept for timing)")
        if any(s.name not in self.step_seconds for s in unbuilt):
            return ""
        est = self._after(unbuilt)
        if est > left:
            return (f"time budget of {self.total_s:g}s: it needs about {est:.0f}s to build and validate (its steps' "
                    f"times measured earlier in this run), {left:.0f}s of building time were left")
        return ""

    def deadline_for(self, steps: Sequence[Step]) -> Callable[[int], float | None]:
        """``f(k)``: the ``perf_counter`` by which step ``k`` of ``steps`` should be done (leaving time for
        the steps after it and a validation), or None without a budget."""
        def at(k: int) -> float | None:
            return None if self.build_deadline is None else self.build_deadline - self._after(steps[k + 1:])
        return at

    def seconds_per_timing(self, n_runners: int, n_shapes: int, cap: float) -> float:
        """Seconds of timed calls each candidate gets at each shape in the final timing: ``cap``, or less
        so that every candidate fits in 70% of what is left (at least 0.5 s)."""
        if self.total_s is None:
            return cap
        left = self.start + self.total_s - time.perf_counter()
        return max(0.5, min(cap, 0.7 * left / max(1, n_runners * n_shapes)))
