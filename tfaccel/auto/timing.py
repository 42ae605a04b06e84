"""Time several runners on the same inputs, interleaved, so background load hits every one alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from tfaccel.measure import Measurement


def time_interleaved(
    runners: dict[str, Callable[[dict[str, np.ndarray]], Any]],
    inputs: dict[str, np.ndarray],
    *,
    seq: int | None = None,
    runs: int = 20,
    warmup: int = 3,
    max_seconds: float | None = 30.0,
) -> tuple[dict[str, Measurement], dict[str, str]]:
    """Round-robin timing: every runner gets a first call (tracing, XLA compilation, session set-up)
    and ``warmup - 1`` more untimed calls; then rounds follow, one timed call per runner per round
    (A, B, C, A, B, C, ...), until each has ``runs`` timed calls or its timed calls add up to
    ``max_seconds`` (at least 3 calls are always made). A runner that raises is dropped and the
    others go on. Medians are what the caller should compare (``Measurement.p50_ms``).

    Returns:
        (name -> Measurement, name -> error text for runners that raised).

    Example:
        >>> ms, errors = time_interleaved({"a": f, "b": g}, inputs, runs=10)  # doctest: +SKIP
        >>> ms["a"].p50_ms / ms["b"].p50_ms  # doctest: +SKIP
    """
    if runs < 3:
        raise ValueError(f"runs must be at least 3 for a median. Received: runs={runs!r}")
    batch = int(next(iter(inputs.values())).shape[0])
    names = list(runners)
    first_ms: dict[str, float] = {}
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}

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
        return name not in errors and done < runs and not out_of_time

    while any(active(n) for n in names):
        for name in names:
            if not active(name):
                continue
            try:
                times[name].append(call(name))
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    out = {n: Measurement.from_times(times[n], batch=batch, seq=seq, warmup=warmup, first_call_ms=first_ms[n])
           for n in names if n not in errors}
    return out, errors
