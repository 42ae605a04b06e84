"""What a timing gives (:class:`Measurement`), peak memory (:class:`PeakRSS`) and shapes. The timing itself
is :mod:`tfaccel.core.timer`."""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Any

import numpy as np

from tfaccel.errors import ArgumentError, PlanError


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
    """'32x128' -> (32, 128): batch x sequence length.

    Raises:
        ArgumentError: not two positive integers joined by 'x' (the message names ``--shape``).

    Example:
        >>> parse_shape("32x128")
        (32, 128)
    """
    try:
        b, s = str(text).lower().split("x")
        batch, seq = int(b), int(s)
        if batch < 1 or seq < 1:
            raise ValueError
        return batch, seq
    except ValueError:
        raise ArgumentError(f"--shape is BATCHxSEQ with positive integers, e.g. --shape 1x128 or --shape 32x128. "
                            f"Received: {text!r}") from None


def check_shapes(shapes: Any, name: str = "shapes") -> list[tuple[int, int]]:
    """``shapes`` as a list of (batch, sequence length) pairs of positive ints, or an ArgumentError that
    says what was expected, with an example.

    Example:
        >>> check_shapes([(1, 64), [32, 128]])
        [(1, 64), (32, 128)]
    """
    def is_pos_int(v):
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1

    example = f"e.g. {name}=[(1, 128)] or {name}=[(1, 128), (32, 128)]"
    if isinstance(shapes, (str, bytes)) or not isinstance(shapes, (list, tuple)):
        raise ArgumentError(f"{name} is a list of (batch, sequence length) pairs, {example}. Received: "
                            f"{name}={shapes!r}" + (" (a string; the CLI's --shape takes BATCHxSEQ)"
                                                    if isinstance(shapes, str) else ""))
    if not shapes:
        raise ArgumentError(f"{name} is empty; give at least one (batch, sequence length) pair, {example}.")
    if len(shapes) == 2 and all(is_pos_int(v) for v in shapes):
        raise ArgumentError(f"{name} is a list of (batch, sequence length) pairs: for one shape write "
                            f"{name}=[{tuple(int(v) for v in shapes)}]. Received: {name}={shapes!r}")
    out = []
    for s in shapes:
        if not isinstance(s, (list, tuple)) or len(s) != 2 or not all(is_pos_int(v) for v in s):
            raise ArgumentError(f"Each of {name} is a (batch, sequence length) pair of positive ints, {example}. "
                                f"Received: {s!r} in {name}={shapes!r}")
        out.append((int(s[0]), int(s[1])))
    return out


def _model_dims(source) -> dict[str, int]:
    """The sizes a forward pass's activations depend on, read from a keras-hub model's backbone config
    (empty for models without one, e.g. a SavedModel source)."""
    model = getattr(source, "model", None)
    backbone = getattr(model, "backbone", model)
    try:
        cfg = backbone.get_config() if backbone is not None else {}
    except Exception:  # not a keras-hub backbone
        cfg = {}
    dims = {"hidden": cfg.get("hidden_dim"), "intermediate": cfg.get("intermediate_dim") or 0,
            "heads": cfg.get("num_heads") or cfg.get("num_query_heads") or 1,
            "vocab": cfg.get("vocabulary_size") or 0}
    return {k: int(v) for k, v in dims.items() if isinstance(v, (int, np.integer))}


def estimate_call_bytes(source, batch: int, seq: int) -> int:
    """Estimated memory one call of ``source``'s model at ``batch x seq`` needs beyond its weights: the
    inputs, the hidden states a transformer layer keeps alive (residual, normalized, query/key/value),
    the larger of its feed-forward activations and its attention scores (one layer at a time: inference
    frees a layer's activations before the next), and a language model's logits. Float32; a rough
    lower bound (frameworks keep more alive), used to refuse shapes that cannot fit before any work.

    Example:
        >>> estimate_call_bytes(load_source("bert-tiny"), 100_000_000, 16) > 10**12  # doctest: +SKIP
        True
    """
    n_inputs = max(1, len(getattr(source, "input_specs", []) or []))
    tokens = batch * seq
    total = 2 * tokens * n_inputs * 4  # the inputs as numpy arrays and as tensors
    dims = _model_dims(source)
    if dims.get("hidden"):
        hidden = tokens * dims["hidden"] * 4
        ffn = tokens * dims.get("intermediate", 0) * 4
        scores = batch * dims.get("heads", 1) * seq * seq * 4
        total += 4 * hidden + 2 * max(ffn, scores)
        if getattr(source, "task", None) in ("causal_lm",):
            total += tokens * dims.get("vocab", 0) * 4
    return int(total)


def check_shapes_fit(source, shapes, *, option: str = "--skip-memory-check",
                     available: int | None = None) -> None:
    """Refuse, before any work, a shape whose estimated memory (:func:`estimate_call_bytes`) exceeds the
    memory available on this machine now (:func:`tfaccel.compat.available_memory_bytes`).

    Raises:
        PlanError: the shape, the estimate, what is available, and ``option`` (the override).
    """
    from tfaccel.compat import available_memory_bytes

    have = available_memory_bytes() if available is None else available
    for batch, seq in shapes:
        need = estimate_call_bytes(source, batch, seq)
        if need > have:
            raise PlanError(
                f"Shape {batch}x{seq} needs about {_gb(need)} of memory for one call (estimated from the model's "
                f"sizes), and this machine has {_gb(have)} available. Use a smaller batch or sequence length "
                f"(--shape), or pass {option} (memory_check=False in Python) to try anyway.")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.0f} MB"
