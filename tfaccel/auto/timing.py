"""Time several runners on the same inputs, interleaved, so background load hits every one alike."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from tfaccel.measure import Measurement


@dataclasses.dataclass
class InterleavedTiming:
    """What :func:`time_interleaved` measured.

    Attributes:
        measurements: name -> Measurement (medians are what to compare), for every runner that ran.
        errors: name -> error text, for runners that raised (they have no measurement).
        stopped: name -> why its timing stopped early (clearly slower than the fastest; its median
            comes from the calls made until then).
        times_ms: name -> every timed call, in milliseconds.
    """

    measurements: dict[str, Measurement]
    errors: dict[str, str]
    stopped: dict[str, str]
    times_ms: dict[str, list[float]]

    def quartiles(self, name: str) -> tuple[float, float]:
        """(p25, p75) of a runner's timed calls, in milliseconds."""
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


def time_interleaved(
    runners: dict[str, Callable[[dict[str, np.ndarray]], Any]],
    inputs: dict[str, np.ndarray],
    *,
    seq: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    max_seconds: float | None = 30.0,
    stop_slower: float | None = None,
    min_runs: int = 5,
    keep: Collection[str] = (),
) -> InterleavedTiming:
    """Round-robin timing: every runner gets a first call (tracing, XLA compilation, session set-up)
    and ``warmup - 1`` more untimed calls; then rounds follow, one timed call per runner per round
    (A, B, C, A, B, C, ...), until each has ``runs`` timed calls or its timed calls add up to
    ``max_seconds`` (at least 3 calls are always made). A runner that raises is dropped and the
    others go on. Medians are what the caller should compare (``Measurement.p50_ms``).

    Args:
        runners: name -> callable taking the inputs.
        inputs: the named input arrays every runner gets.
        seq: the sequence length (recorded in the measurements).
        runs, warmup: timed and untimed calls per runner.
        max_seconds: stop timing a runner once its timed calls add up to this (None: no limit).
        stop_slower: once every runner has ``min_runs`` timed calls, stop timing a runner that is
            clearly slower than the fastest one (:meth:`InterleavedTiming.clearly_slower` with this
            margin); None times every runner to the end. Runners in ``keep`` are always timed to the end.
        min_runs: timed calls before a runner can be stopped as clearly slower.
        keep: runners never stopped early (e.g. the baseline every ratio is relative to).

    Returns:
        An :class:`InterleavedTiming`.

    Example:
        >>> t = time_interleaved({"a": f, "b": g}, inputs, runs=10)  # doctest: +SKIP
        >>> t.measurements["a"].p50_ms / t.measurements["b"].p50_ms  # doctest: +SKIP
    """
    if runs < 3:
        raise ValueError(f"runs must be at least 3 for a median. Received: runs={runs!r}")
    batch = int(next(iter(inputs.values())).shape[0])
    names = list(runners)
    first_ms: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    stopped: dict[str, str] = {}

    def call(name: str) -> float:
        t = time.perf_counter()
        runners[name](inputs)
        return (time.perf_counter() - t) * 1000

    for name in names:
        try:
            first_ms[name] = call(name)
            for _ in range(max(0, warmup - 1)):
                call(name)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def active(name: str) -> bool:
        done = len(times[name])
        spent = sum(times[name]) / 1000
        out_of_time = max_seconds is not None and done >= 3 and spent >= max_seconds
        return name not in errors and name not in stopped and done < runs and not out_of_time

    def stop_clearly_slower() -> None:
        ok = [n for n in names if n not in errors]
        if stop_slower is None or len(ok) < 2 or any(len(times[n]) < min_runs for n in ok):
            return
        current = InterleavedTiming({n: Measurement.from_times(times[n], batch=batch, seq=seq, warmup=warmup,
                                                               first_call_ms=first_ms[n]) for n in ok},
                                    errors, stopped, times)
        fastest = min(ok, key=lambda n: current.measurements[n].p50_ms)
        for n in ok:
            if n not in keep and n not in stopped and active(n) and current.clearly_slower(n, fastest, stop_slower):
                f25, f75 = current.quartiles(fastest)
                p25, p75 = current.quartiles(n)
                stopped[n] = (f"stopped after {len(times[n])} timed calls: clearly slower than {fastest} (p25-p75 "
                              f"{p25:.1f}-{p75:.1f} ms vs {f25:.1f}-{f75:.1f} ms)")

    while any(active(n) for n in names):
        for name in names:
            if not active(name):
                continue
            try:
                times[name].append(call(name))
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        stop_clearly_slower()
    out = {n: Measurement.from_times(times[n], batch=batch, seq=seq, warmup=warmup, first_call_ms=first_ms[n])
           for n in names if n not in errors}
    return InterleavedTiming(out, errors, stopped, {n: times[n] for n in names if n not in errors})
