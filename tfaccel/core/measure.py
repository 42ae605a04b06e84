"""What a timing gives (:class:`Measurement`), peak memory (:class:`PeakRSS`) and shapes. The timing itself
is :mod:`tfaccel.core.timer`."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np


def rss_bytes() -> int:
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss


class PeakRSS:
    """Context manager sampling this process's resident memory; ``growth`` is peak minus start.

    Example:
        >>> with PeakRSS() as mem:
        ...     _ = bytearray(50_000_000)
        >>> mem.growth > 0
        True
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.start)


@dataclasses.dataclass
class Measurement:
    """Timing of one artifact at one input shape."""

    batch: int
    seq: int | None
    p50_ms: float
    p95_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # samples per second at p50
    runs: int
    warmup: int
    first_call_ms: float  # includes tracing / compilation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_times(cls, times_ms, *, batch: int, seq: int | None, warmup: int, first_call_ms: float) -> Measurement:
        """Summarize timed calls (milliseconds each) of one runner at one shape."""
        arr = np.asarray(times_ms, dtype=float)
        p50 = float(np.percentile(arr, 50))
        return cls(batch=batch, seq=seq, p50_ms=p50, p95_ms=float(np.percentile(arr, 95)), mean_ms=float(arr.mean()),
                   min_ms=float(arr.min()), throughput=batch / (p50 / 1000.0), runs=len(arr), warmup=warmup,
                   first_call_ms=first_call_ms)


def parse_shape(text: str) -> tuple[int, int]:
    """'32x128' -> (32, 128): batch x sequence length."""
    try:
        b, s = text.lower().split("x")
        batch, seq = int(b), int(s)
        if batch < 1 or seq < 1:
            raise ValueError
        return batch, seq
    except ValueError:
        raise ValueError(f"A shape is BATCHxSEQ with positive integers, e.g. 1x128 or 32x128. Received: {text!r}") from None
