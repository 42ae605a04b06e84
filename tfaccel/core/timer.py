"""THE timer: every latency tfaccel and benchmarks/ report is measured here.

Contenders are zero-argument callables (one call = one inference, one whole generation, one kernel
form's call...), timed **interleaved**: rounds in which every contender gets a block of timed calls,
the order rotating each round, so background load on a shared machine falls on all of them alike.

- **Warm-up**: each contender's first call (tracing, XLA compilation, session set-up) is timed apart
  (``first_call_ms``), then up to ``warmup - 1`` more untimed calls: they stop after one that takes
  ``block_seconds`` or more (a call that long is past its warm-up; two more of bert-base's 4 s calls at
  batch 32 were 8 s per contender with nothing measured).
- **Blocks**: a contender's block is about ``block_seconds`` of calls (1 to 5), so fast contenders are
  not dominated by switching.
- **Settle calls**: when the previous call was another contender's and this one's calls are short
  (< ``settle_below_s``), one untimed call precedes its block, so thread pools another runtime left
  spinning (onnxruntime spins after a run) do not bill this one.
- **Budget**: ``max_seconds`` is the seconds of timed calls a contender may spend (at least 3 calls are
  always made, or ``runs`` if fewer); ``runs`` caps its timed calls. One meaning everywhere.
- **Early stop**: with ``stop_slower``, once every contender has ``min_runs`` timed calls, a contender
  clearly slower than the fastest (:meth:`InterleavedTiming.clearly_slower`) stops; those in ``keep``
  (a baseline every ratio is relative to) never stop.
- A contender that raises is dropped with its error; the others go on.

Example:
    >>> t = interleave({"a": lambda: sum(range(1000)), "b": lambda: sum(range(10))}, runs=5, warmup=1)
    >>> t.measurements["a"].p50_ms >= 0
    True
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from tfaccel.core.measure import Measurement
from tfaccel.errors import first_line

#: About how long a contender's block of timed calls lasts, and the call length after which warm-up stops.
BLOCK_SECONDS = 1.0


def warmup_calls(call_s: float, warmup: int, block_seconds: float = BLOCK_SECONDS) -> int:
    """How many warm-up calls :func:`interleave` makes for a contender whose calls take ``call_s`` seconds
    (it stops after a second call of ``block_seconds`` or more). :func:`interleave` asks it after each warm-up
    call with that call's time; the time budget asks it to plan how long a timing takes."""
    return warmup if call_s < block_seconds else min(warmup, 2)


@dataclasses.dataclass
class InterleavedTiming:
    """What :func:`interleave` measured.

    Attributes:
        measurements: name -> Measurement (medians are what to compare), for every contender that ran.
        errors: name -> error text, for contenders that raised (they have no measurement).
        stopped: name -> why its timing stopped early (clearly slower than the fastest; its median
            comes from the calls made until then).
        times_ms: name -> every timed call, in milliseconds.
    """

    measurements: dict[str, Measurement]
    errors: dict[str, str]
    stopped: dict[str, str]
    times_ms: dict[str, list[float]]

    def quartiles(self, name: str) -> tuple[float, float]:
        """(p25, p75) of a contender's timed calls, in milliseconds."""
        arr = np.asarray(self.times_ms[name], dtype=float)
        return float(np.percentile(arr, 25)), float(np.percentile(arr, 75))

    def clearly_slower(self, name: str, than: str, margin: float = 1.1) -> bool:
        """True when ``name`` is slower than ``than`` with confidence: its fastest quarter of calls is
        slower than the other's slowest quarter, and its median is over ``margin`` times the other's."""
        if name not in self.measurements or than not in self.measurements:
            return False
        p25, _ = self.quartiles(name)
        _, other_p75 = self.quartiles(than)
        return p25 > other_p75 and self.measurements[name].p50_ms > margin * self.measurements[than].p50_ms


def interleave(
    calls: Mapping[str, Callable[[], Any]],
    *,
    runs: int = 20,
    warmup: int = 3,
    max_seconds: float | None = 30.0,
    stop_slower: float | None = None,
    min_runs: int = 5,
    keep: Collection[str] = (),
    block_seconds: float = BLOCK_SECONDS,
    settle_below_s: float = 0.5,
    batch: int = 1,
    seq: int | None = None,
    log: Callable[[str], None] | None = None,
    raise_errors: bool = False,
) -> InterleavedTiming:
    """Time zero-argument callables interleaved (see the module docstring for the rules).

    Args:
        calls: name -> callable; each call is one unit of work.
        runs: timed calls per contender at most (>= 1; 3 or more for a median worth comparing).
        warmup: untimed calls per contender before timing, the first included (>= 0; with 0 the first
            timed call is also the first call); after the first, they stop at one of ``block_seconds`` or more.
        max_seconds: seconds of timed calls per contender (at least 3 calls are made); None: no limit.
        stop_slower: stop a contender clearly slower than the fastest by this margin once every contender
            has ``min_runs`` timed calls; None times every contender to the end.
        min_runs: timed calls before a contender can be stopped as clearly slower.
        keep: contenders never stopped early.
        block_seconds: about how long a contender's block of timed calls lasts (1 to 5 calls).
        settle_below_s: contenders whose calls are shorter get an untimed settle call before each block
            that follows another contender's (0 disables settle calls).
        batch, seq: what one call processes, recorded in the measurements (throughput = batch / p50).
        log: called with a line when a contender fails or stops early.
        raise_errors: let a contender's exception propagate instead of dropping the contender.

    Returns:
        An :class:`InterleavedTiming`.
    """
    if not isinstance(runs, int) or runs < 1:
        raise ValueError(f"runs must be an int >= 1 (3 or more for a median worth comparing). Received: runs={runs!r}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0. Received: warmup={warmup!r}")
    names = list(calls)
    first_ms: dict[str, float | None] = {}
    est_s: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    stopped: dict[str, str] = {}
    last = [None]

    def fail(name: str, exc: Exception) -> None:
        if raise_errors:
            raise exc
        errors[name] = first_line(exc)
        if log:
            log(f"  {name}: FAILED: {errors[name]}")

    def call(name: str) -> float:
        t = time.perf_counter()
        calls[name]()
        last[0] = name
        return (time.perf_counter() - t) * 1000

    for name in names:
        try:
            first_ms[name] = None
            if warmup:
                first_ms[name] = ms = call(name)
                made = 1
                # the same rule the time budget plans with: stop after a call of block_seconds or more
                while made < warmup_calls(ms / 1000, warmup, block_seconds):
                    ms = call(name)
                    made += 1
                est_s[name] = ms / 1000
        except Exception as exc:
            fail(name, exc)

    def active(name: str) -> bool:
        done = len(times[name])
        out_of_time = max_seconds is not None and done >= 3 and sum(times[name]) / 1000 >= max_seconds
        return name not in errors and name not in stopped and done < runs and not out_of_time

    def stop_clearly_slower() -> None:
        ok = [n for n in names if n not in errors]
        if stop_slower is None or len(ok) < 2 or any(len(times[n]) < min_runs for n in ok):
            return
        current = _summary(ok)
        fastest = min(ok, key=lambda n: current.measurements[n].p50_ms)
        for n in ok:
            if n not in keep and active(n) and current.clearly_slower(n, fastest, stop_slower):
                f25, f75 = current.quartiles(fastest)
                p25, p75 = current.quartiles(n)
                stopped[n] = (f"stopped after {len(times[n])} timed calls: clearly slower than {fastest} (p25-p75 "
                              f"{p25:.1f}-{p75:.1f} ms vs {f25:.1f}-{f75:.1f} ms)")
                if log:
                    log(f"  {n}: {stopped[n]}")

    def _summary(which) -> InterleavedTiming:
        ms = {n: Measurement.from_times(times[n], batch=batch, seq=seq, warmup=warmup,
                                        first_call_ms=first_ms[n] if first_ms[n] is not None else times[n][0])
              for n in which if times[n]}
        return InterleavedTiming(ms, dict(errors), dict(stopped), {n: list(times[n]) for n in which if times[n]})

    rnd = 0
    while any(active(n) for n in names):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        rnd += 1
        for name in order:
            if not active(name):
                continue
            try:
                est = est_s.get(name)
                if est is None:  # no warm-up: the first timed call sizes the blocks
                    times[name].append(call(name))
                    est = est_s[name] = times[name][-1] / 1000
                if settle_below_s and est < settle_below_s and last[0] not in (None, name):
                    call(name)
                block = max(1, min(5, int(block_seconds / max(est, 1e-6))))
                for _ in range(block):
                    if not active(name):  # the budget and runs hold inside a block too
                        break
                    times[name].append(call(name))
            except Exception as exc:
                fail(name, exc)
        stop_clearly_slower()
    return _summary([n for n in names if n not in errors])


def time_interleaved(
    runners: Mapping[str, Callable[[dict[str, np.ndarray]], Any]],
    inputs: dict[str, np.ndarray],
    *,
    seq: int | None = None,
    **options: Any,
) -> InterleavedTiming:
    """:func:`interleave` for runners that take the same named inputs (``runner(inputs)``); the batch
    is read from the inputs.

    Example:
        >>> t = time_interleaved({"a": f, "b": g}, inputs, runs=10)  # doctest: +SKIP
        >>> t.measurements["a"].p50_ms / t.measurements["b"].p50_ms  # doctest: +SKIP
    """
    batch = int(next(iter(inputs.values())).shape[0])
    calls = {name: (lambda r=r: r(inputs)) for name, r in runners.items()}
    return interleave(calls, batch=batch, seq=seq, **options)


def time_runner(runner: Callable[[dict[str, np.ndarray]], Any], inputs: dict[str, np.ndarray], *, warmup: int = 3,
                runs: int = 20, max_seconds: float | None = 60.0, seq: int | None = None) -> Measurement:
    """Time one runner on one input (a first call, warm-up calls, then timed runs); a failure raises.

    Example:
        >>> time_runner(runner, source.make_inputs(1, 128), runs=10).p50_ms  # doctest: +SKIP
    """
    t = time_interleaved({"runner": runner}, inputs, seq=seq, warmup=warmup, runs=runs, max_seconds=max_seconds,
                         raise_errors=True)
    return t.measurements["runner"]


@dataclasses.dataclass
class ShapeTiming:
    """One shape of :func:`time_against_baseline`: the interleaved timing and each runner's speed-up
    over the baseline (baseline p50 / its p50; empty when the baseline did not run)."""

    batch: int
    seq: int
    timing: InterleavedTiming
    speedups: dict[str, float]


def time_against_baseline(
    runners: dict[str, Callable[[dict[str, np.ndarray]], Any]],
    make_inputs: Callable[[int, int], dict[str, np.ndarray]],
    shapes: Collection[tuple[int, int]],
    baseline: str | None,
    *,
    keep: Collection[str] = (),
    **options: Any,
) -> list[ShapeTiming]:
    """Time runners interleaved at each (batch, sequence) shape, with speed-ups over ``baseline``.

    A runner that fails at one shape is removed from ``runners`` (it is not timed at later shapes); its
    error is in that shape's ``timing.errors``. The baseline is never stopped early.

    Args:
        runners: name -> runner taking named inputs (the dict is modified: failed runners are removed).
        make_inputs: ``make_inputs(batch, seq)`` -> the inputs every runner gets at that shape.
        shapes: (batch, sequence length) pairs.
        baseline: the runner every speed-up is relative to (None: no speed-ups).
        keep: more runners never stopped early.
        **options: :func:`interleave` options (runs, warmup, max_seconds, stop_slower, ...).
    """
    out = []
    for batch, seq in shapes:
        if not runners:
            break
        t = time_interleaved(runners, make_inputs(batch, seq), seq=seq,
                             keep={*keep, *([baseline] if baseline else [])}, **options)
        for name in t.errors:
            runners.pop(name, None)
        base = t.measurements.get(baseline) if baseline else None
        speedups = {n: base.p50_ms / m.p50_ms for n, m in t.measurements.items()} if base else {}
        out.append(ShapeTiming(batch, seq, t, speedups))
    return out
