"""``--auto``, the time budget: how long building may go on, whether a candidate still fits, by when each
step should be done, and how much time each candidate gets in the final timing.

The budget covers building, validating and timing. The last part of it (10%, 15-60 s) is kept for the
final timing. Before that, a candidate is not tried when the times its steps took earlier in this run (and
a validation) say it would not fit; steps that can stop long work (distillation) get a deadline. A step not
built yet in this run counts as long as the longest step measured so far (leaving out those that stop at
their deadline): without that, a conversion first tried near the end (tf2onnx takes about 2 minutes on
BERT-base) started with seconds left and took the run 100 s past its budget. A conversion in a child process
(tf2onnx) is also stopped at its deadline, so a guess that was too short costs the time up to the deadline only.

The time kept for the final timing grows with the candidates and the length of a call: every candidate
validated so far, and the one about to be built, gets warm-up calls and at least 3 timed calls at each shape,
each counted as long as the baseline's call there (measured once, right after the baseline is validated).
Without that, bert-base at 32x128 (4 s per call of ``model.export``) spent 220 s timing 11 candidates against
a fixed 108 s reserve, and the run ended 90 s past its budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from tfaccel.core.step import Step
from tfaccel.core.timer import warmup_calls


class TimeBudget:
    """The seconds of one ``--auto`` run.

    Args:
        total_s: the whole budget in seconds (None: no limit).
        start: ``time.perf_counter()`` at the start of the run.
        step_seconds: step name -> seconds its last build took in this run (a live dict: the chain
            builder's :attr:`~tfaccel.core.chain.ChainBuilder.step_seconds`).
    """

    def __init__(self, total_s: float | None, start: float, step_seconds: dict[str, float], n_shapes: int = 1,
                 warmup: int = 3):
        self.total_s, self.start, self.step_seconds, self.warmup = total_s, start, step_seconds, warmup
        #: the least kept at the end for timing every candidate (at least 3 calls each, and at every shape after
        #: the first a first call that may compile: XLA candidates compile again at a new batch size);
        #: :meth:`timing_reserve` keeps more when calls are long
        self.reserve = min(60.0, max(15.0, 0.1 * total_s)) * n_shapes if total_s is not None else 0.0
        self._validations: list[float] = []
        self._call_s: list[float] = []  # the baseline's seconds per call at each shape
        self._stop_at_deadline: set[str] = set()  # names of steps seen with ``stops_at_deadline``

    def record_validation(self, seconds: float) -> None:
        self._validations.append(seconds)

    def record_call_seconds(self, per_shape: Sequence[float]) -> None:
        """The baseline's seconds per call at each shape (after a first call there)."""
        self._call_s = [float(s) for s in per_shape]

    def timing_reserve(self) -> float:
        """Seconds kept for the final timing if one more candidate is built: :attr:`reserve`, or more when
        the candidates validated so far and the next one, each with its warm-up calls (the timer stops them
        after one of a second or more, see :func:`tfaccel.core.timer.interleave`) and at least 3 timed calls
        (or half a second of them) at each shape, take longer at the baseline's speed."""
        n = len(self._validations) + 1
        est = n * sum(self._warmup_s(c) + max(3 * c, 0.5) for c in self._call_s)
        return max(self.reserve, est)

    def _warmup_s(self, call_s: float) -> float:
        """Seconds of warm-up calls the timer makes for a contender whose calls take ``call_s``."""
        return warmup_calls(call_s, self.warmup) * call_s

    @property
    def build_deadline(self) -> float | None:
        """``perf_counter`` after which no more building starts (None: no budget)."""
        return None if self.total_s is None else self.start + self.total_s - self.timing_reserve()

    def _reserve_words(self) -> str:
        kept = self.timing_reserve()
        if kept <= self.reserve or not self._call_s:
            return f"the last {kept:.0f}s are kept for timing"
        slowest = max(self._call_s)
        return (f"the last {kept:.0f}s are kept for timing {len(self._validations) + 1} candidates: warm-up and at "
                f"least 3 calls each at every shape, {slowest:.1f}s per call at the slowest as the baseline")

    def _see(self, steps: Sequence[Step]) -> None:
        self._stop_at_deadline.update(s.name for s in steps if s.stops_at_deadline)

    def unmeasured_step_s(self) -> float:
        """Seconds a step not built yet in this run is counted as: the longest step measured so far, leaving
        out steps that stop at their deadline (their time is what they were given); 0 before any."""
        return max((t for name, t in self.step_seconds.items() if name not in self._stop_at_deadline), default=0.0)

    def _after(self, todo: Sequence[Step]) -> float:
        """Seconds ``todo`` takes by this run's measurements (:meth:`unmeasured_step_s` for a step not built
        yet), plus a validation."""
        self._see(todo)
        validation = sum(self._validations) / max(1, len(self._validations))
        guess = self.unmeasured_step_s()
        return sum(self.step_seconds.get(s.name, guess) for s in todo) + validation

    def not_tried_reason(self, unbuilt: Sequence[Step]) -> str:
        """Why a candidate whose ``unbuilt`` steps are still to build does not fit (empty: it fits)."""
        if self.build_deadline is None:
            return ""
        now = time.perf_counter()
        left = self.build_deadline - now
        if left <= 0:
            return (f"time budget of {self.total_s:g}s: building stopped after {now - self.start:.0f}s "
                    f"({self._reserve_words()})")
        est = self._after(unbuilt)
        if est > left:
            new = sorted({s.name for s in unbuilt if s.name not in self.step_seconds})
            how = "its steps' times measured earlier in this run" + (
                f"; {', '.join(new)} not built yet, counted as long as the longest step so far "
                f"({self.unmeasured_step_s():.0f}s)" if new else "")
            return (f"time budget of {self.total_s:g}s: it needs about {est:.0f}s to build and validate ({how}), "
                    f"{left:.0f}s of building time were left")
        return ""

    def deadline_for(self, steps: Sequence[Step]) -> Callable[[int], float | None]:
        """``f(k)``: the ``perf_counter`` by which step ``k`` of ``steps`` should be done (leaving time for
        the steps after it and a validation), or None without a budget."""
        self._see(steps)

        def at(k: int) -> float | None:
            return None if self.build_deadline is None else self.build_deadline - self._after(steps[k + 1:])
        return at

    def seconds_per_timing(self, n_runners: int, n_shapes: int, cap: float) -> float:
        """Seconds of timed calls each candidate gets at each of the ``n_shapes`` shapes still to time:
        ``cap``, or less so that every candidate fits in 70% of what is left once their warm-up calls at
        those shapes (at the baseline's speed) are taken out (at least 0.5 s). Asked again before each shape,
        so a slow first shape leaves less to the next ones."""
        if self.total_s is None:
            return cap
        left = self.start + self.total_s - time.perf_counter()
        upcoming = self._call_s[-n_shapes:] if 0 < n_shapes <= len(self._call_s) else []
        left -= n_runners * sum(self._warmup_s(c) for c in upcoming)
        return max(0.5, min(cap, 0.7 * left / max(1, n_runners * n_shapes)))
