"""Optimization profiles: the min / opt / max batch size and sequence length an engine is built for.

TensorRT (and TF-TRT in dynamic-shape mode) builds kernels for a range of input shapes. A
:class:`ShapeProfile` gives that range for the two dynamic dimensions of text models: the batch
(dimension 0 of every input) and the sequence length (any other dynamic dimension). Shapes outside
every profile of an engine cannot run on it, so the default profile is derived from what the
pipeline will feed the engine: the source's sample inputs, its eval split and its default length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

#: :func:`tfaccel.core.validation.classification_accuracy` scores the eval split in batches of this size.
EVAL_BATCH = 32


def _triple(name: str, value: Any) -> tuple[int, int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"ShapeProfile.{name} must be three ints (min, opt, max). Received: {name}={value!r}")
    lo, opt, hi = value
    if not 1 <= lo <= opt <= hi:
        raise ValueError(
            f"ShapeProfile.{name} must satisfy 1 <= min <= opt <= max. Received: {name}={tuple(value)!r}"
        )
    return int(lo), int(opt), int(hi)


@dataclasses.dataclass(frozen=True)
class ShapeProfile:
    """The range of batch sizes and sequence lengths an engine accepts, and the shape it is tuned for.

    Args:
        batch: (min, opt, max) batch size: dimension 0 of every input.
        seq: (min, opt, max) sequence length: every other dynamic dimension. None for models whose
            only dynamic dimension is the batch.

    Example:
        >>> p = ShapeProfile(batch=(1, 8, 32), seq=(1, 128, 128))
        >>> p.shapes((None, None))
        ((1, 1), (8, 128), (32, 128))
        >>> ShapeProfile.from_config(p.get_config()) == p
        True
    """

    batch: tuple[int, int, int]
    seq: tuple[int, int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "batch", _triple("batch", self.batch))
        if self.seq is not None:
            object.__setattr__(self, "seq", _triple("seq", self.seq))

    @classmethod
    def fixed(cls, batch: int, seq: int | None = None) -> ShapeProfile:
        """A profile for exactly one shape (min = opt = max)."""
        return cls(batch=(batch, batch, batch), seq=None if seq is None else (seq, seq, seq))

    def shapes(self, dims: Sequence[int | None]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """The (min, opt, max) shapes of one input whose dimensions are ``dims``.

        Args:
            dims: the input's dimensions; None or a negative number marks a dynamic one.

        Raises:
            ValueError: the input has a dynamic dimension besides the batch and the profile has no
                ``seq`` range.
        """
        out: list[list[int]] = [[], [], []]
        for i, d in enumerate(dims):
            dynamic = d is None or (isinstance(d, int) and d < 0)
            if not dynamic:
                for k in range(3):
                    out[k].append(int(d))
                continue
            if i == 0:
                rng = self.batch
            elif self.seq is None:
                raise ValueError(
                    f"An input with dimensions {tuple(dims)} has a dynamic dimension {i} besides the batch, "
                    f"but the profile has no sequence range. Give one, e.g. ShapeProfile(batch={self.batch}, "
                    "seq=(1, 128, 128))."
                )
            else:
                rng = self.seq
            for k in range(3):
                out[k].append(rng[k])
        return tuple(out[0]), tuple(out[1]), tuple(out[2])

    def covers(self, batch: int, seq: int | None = None) -> bool:
        """Whether a (batch, sequence length) pair is inside this profile."""
        if not self.batch[0] <= batch <= self.batch[2]:
            return False
        return seq is None or self.seq is None or self.seq[0] <= seq <= self.seq[2]

    def build_shapes(self) -> list[tuple[int, int | None]]:
        """The distinct (batch, seq) pairs at the min, opt and max corners, in that order."""
        seq = self.seq or (None, None, None)
        out: list[tuple[int, int | None]] = []
        for pair in zip(self.batch, seq, strict=True):
            if pair not in out:
                out.append(pair)
        return out

    def describe(self) -> str:
        text = f"batch {self.batch[0]}..{self.batch[2]} (opt {self.batch[1]})"
        if self.seq is not None:
            text += f", seq {self.seq[0]}..{self.seq[2]} (opt {self.seq[1]})"
        return text

    def get_config(self) -> dict[str, Any]:
        return {"batch": list(self.batch), "seq": None if self.seq is None else list(self.seq)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ShapeProfile:
        if not isinstance(config, dict):
            raise ValueError(f"A ShapeProfile config is a dict with 'batch' and 'seq'. Received: {config!r}")
        unknown = set(config) - {"batch", "seq"}
        if unknown:
            raise ValueError(f"Unknown ShapeProfile fields {sorted(unknown)}. Known: batch, seq")
        if "batch" not in config:
            raise ValueError(f"A ShapeProfile config needs 'batch' (min, opt, max). Received: {config!r}")
        seq = config.get("seq")
        return cls(batch=tuple(config["batch"]), seq=None if seq is None else tuple(seq))


def coerce_profiles(profiles: Any) -> tuple[ShapeProfile, ...] | None:
    """None, one profile, or a sequence of profiles / profile configs -> a tuple of profiles.

    Example:
        >>> coerce_profiles({"batch": [1, 1, 1], "seq": None})
        (ShapeProfile(batch=(1, 1, 1), seq=None),)
    """
    if profiles is None:
        return None
    if isinstance(profiles, (ShapeProfile, dict)):
        profiles = [profiles]
    if not isinstance(profiles, (list, tuple)) or not profiles:
        raise ValueError(
            "profiles must be None (derive one from the model source), a ShapeProfile, or a non-empty list "
            f"of them. Received: profiles={profiles!r}"
        )
    out = []
    for p in profiles:
        if isinstance(p, dict):
            p = ShapeProfile.from_config(p)
        if not isinstance(p, ShapeProfile):
            raise ValueError(f"profiles must hold ShapeProfile objects or their configs. Received: {p!r}")
        out.append(p)
    return tuple(out)


def _has_seq_dim(source) -> bool:
    return any(d is None for s in source.input_specs for d in s.shape[1:])


def _batch_and_seq(inputs: dict[str, Any] | None, source) -> tuple[int, int | None] | None:
    if not inputs:
        return None
    for spec in source.input_specs:
        arr = inputs.get(spec.name)
        if arr is None or not getattr(arr, "ndim", 0):
            continue
        seq = None
        for i, d in enumerate(spec.shape[1:], 1):
            if d is None and arr.ndim > i:
                seq = int(arr.shape[i])
                break
        return int(arr.shape[0]), seq
    return None


def profile_from_source(source, *, max_batch: int | None = None, max_seq: int | None = None,
                        opt_batch: int | None = None, opt_seq: int | None = None) -> ShapeProfile:
    """The profile a pipeline run needs for a model source.

    min is (1, 1); opt is the sample inputs' (batch, sequence length), which every stage is validated
    on; max covers the sample inputs, the eval split (scored in batches of 32) and the source's
    default sequence length (never beyond the model's ``max_sequence_length``), unless ``max_batch`` /
    ``max_seq`` say otherwise.

    Args:
        source: a :class:`tfaccel.sources.ModelSource`.
        max_batch, max_seq: the largest batch / sequence length the engine must take.
        opt_batch, opt_seq: the shape to tune kernels for (default: the sample inputs' shape).

    Raises:
        ValueError: a limit is smaller than the sample inputs every stage is validated on.

    Example:
        >>> from tfaccel import load_source
        >>> profile_from_source(load_source("bert-tiny"))  # doctest: +SKIP
        ShapeProfile(batch=(1, 8, 32), seq=(1, 32, 64))
    """
    has_seq = _has_seq_dim(source)
    sample = _batch_and_seq(source.sample_inputs, source) or (1, source.default_seq if has_seq else None)
    sb, ss = sample
    needed_batch, needed_seq = sb, ss or 0
    evals = _batch_and_seq(source.eval_inputs, source)
    want_batch = max(EVAL_BATCH, sb)
    want_seq = max(ss or 0, source.default_seq if has_seq else 0)
    if evals is not None:
        eval_batch = min(EVAL_BATCH, evals[0])
        want_batch = max(want_batch, eval_batch)
        want_seq = max(want_seq, evals[1] or 0)
    for name, value, needed in (("max_batch", max_batch, needed_batch), ("max_seq", max_seq, needed_seq)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int or None. Received: {name}={value!r}")
        if value < needed:
            what = "batch size" if name == "max_batch" else "sequence length"
            raise ValueError(
                f"{name}={value} is smaller than the sample inputs' {what} {needed}, which every stage is "
                f"validated on. Use {name} >= {needed}, or pass smaller sample inputs."
            )
    # The model has no positions beyond its max_sequence_length (keras-hub backbones record it).
    limit = getattr(source, "max_sequence_length", None)
    if limit and max_seq is not None and max_seq > limit:
        raise ValueError(
            f"max_seq={max_seq} is longer than the model's max_sequence_length {limit}. Use max_seq <= {limit}."
        )
    hi_batch = max_batch or want_batch
    batch = (1, min(opt_batch or sb, hi_batch), hi_batch)
    seq = None
    if has_seq:
        hi_seq = max_seq or max(want_seq, 1)
        if limit and max_seq is None:
            hi_seq = max(min(hi_seq, limit), ss or 1)
        seq = (1, min(opt_seq or ss or hi_seq, hi_seq), hi_seq)
    return ShapeProfile(batch=batch, seq=seq)


def onnx_input_dims(onnx_path) -> dict[str, tuple[int | None, ...]]:
    """Input name -> dimensions (None where dynamic) of an ONNX model's graph inputs.

    Initializers listed as graph inputs (old exporters do that) are left out.

    Example:
        >>> onnx_input_dims("model.onnx")  # doctest: +SKIP
        {'padding_mask': (None, None), 'segment_ids': (None, None), 'token_ids': (None, None)}
    """
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = []
        for d in inp.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
        out[inp.name] = tuple(dims)
    return out


def profile_input_shapes(profile: ShapeProfile, input_dims: dict[str, Sequence[int | None]]) -> dict[str, tuple]:
    """Input name -> (min, opt, max) shapes of one profile, for every input in ``input_dims``.

    Example:
        >>> profile_input_shapes(ShapeProfile((1, 4, 8), (1, 16, 64)), {"token_ids": (None, None)})
        {'token_ids': ((1, 1), (4, 16), (8, 64))}
    """
    return {name: profile.shapes(dims) for name, dims in input_dims.items()}
