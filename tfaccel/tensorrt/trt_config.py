"""Settings of the two TensorRT routes: :class:`TftrtConfig` (TF-TRT) and :class:`TensorRTConfig`
(ONNX -> TensorRT engine). Both validate themselves and round-trip through get_config/from_config;
``TftrtConfig("fp16")`` / ``TensorRTConfig("fp16")`` are exactly the default configs.
:class:`TrtStepBase` is what the two routes' steps share around their config."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar, TypeVar

import numpy as np

from tfaccel.core.step import Step, StepContext
from tfaccel.core.validation import Tolerance
from tfaccel.tensorrt.calibration import describe_batches, representative_batches
from tfaccel.tensorrt.shape_profiles import ShapeProfile, coerce_profiles

PRECISIONS = ("fp32", "fp16", "int8")
#: TF-TRT's dynamic-shape profile strategies (trt_convert.supported_profile_strategies(), less the
#: deprecated ImplicitBatchModeCompatible).
PROFILE_STRATEGIES = ("Range", "Optimal", "Range+Optimal")

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(value: Any, name: str = "max_workspace_bytes") -> int | None:
    """An int number of bytes, or a string such as ``"512MiB"`` / ``"2GiB"`` / ``"1GB"``; None stays None.

    Example:
        >>> parse_bytes("1GiB")
        1073741824
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]i?[bB]|[bB])?\s*", value)
        if not m:
            raise ValueError(f"{name} must be bytes as an int or a size like '512MiB' or '2GiB'. Received: {name}={value!r}")
        n = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    else:
        raise ValueError(f"{name} must be an int number of bytes, a size string or None. Received: {name}={value!r}")
    if n < 2**20:
        raise ValueError(f"{name} must be at least 1 MiB (TensorRT needs scratch memory). Received: {name}={value!r}")
    return n


def _check_precision(precision: Any, allowed=PRECISIONS) -> str:
    if not isinstance(precision, str) or precision.lower() not in allowed:
        raise ValueError(f"precision must be one of {allowed}. Received: precision={precision!r}")
    return precision.lower()


def _check_int(name: str, value: Any, low: int, high: int | None = None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    if not ok:
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bound}{' or None' if allow_none else ''}. Received: {name}={value!r}")


_C = TypeVar("_C", bound="_RoundTrip")


class _RoundTrip:
    """get_config / from_config of the config dataclasses below (profiles as their configs)."""

    def get_config(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d.get("profiles") is not None:
            d["profiles"] = [p.get_config() for p in d["profiles"]]
        return d

    @classmethod
    def from_config(cls: type[_C], config: dict[str, Any]) -> _C:
        if not isinstance(config, dict):
            raise ValueError(f"{cls.__name__}.from_config takes a dict. Received: {config!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} fields {sorted(unknown)}. Known: {', '.join(sorted(known))}")
        return cls(**config)


@dataclasses.dataclass(frozen=True)
class TftrtConfig(_RoundTrip):
    """How TF-TRT (``TrtGraphConverterV2``) converts a SavedModel.

    Args:
        precision: "fp32", "fp16" or "int8" (int8 is calibrated on a representative dataset).
        minimum_segment_size: the fewest TensorFlow ops a subgraph needs to become a TensorRT engine.
        max_workspace_bytes: GPU scratch memory per engine (int or "2GiB"); None takes TF-TRT's default.
        maximum_cached_engines: engines kept per TRTEngineOp for different shapes.
        profile_strategy: "Range" (one profile spanning min..max), "Optimal" (one per built shape)
            or "Range+Optimal".
        profiles: shape profiles to build; None derives one from the model source (see
            :func:`tfaccel.tensorrt.profile_from_source`).
        max_batch, max_seq: limits of the derived profile (ignored when ``profiles`` is given).
        allow_build_at_runtime: build an engine at serving time for a shape outside every profile
            (a slow first call) instead of running that shape in plain TensorFlow.
        calibration_samples, calibration_batch_size: int8 calibration data drawn from the source's
            eval split (real data) or its sample inputs.

    Example:
        >>> TftrtConfig("int8").precision
        'int8'
        >>> TftrtConfig.from_config(TftrtConfig(max_workspace_bytes="1GiB").get_config()).max_workspace_bytes
        1073741824
    """

    precision: str = "fp16"
    minimum_segment_size: int = 3
    max_workspace_bytes: int | str | None = None
    maximum_cached_engines: int = 1
    profile_strategy: str = "Range"
    profiles: Any = None
    max_batch: int | None = None
    max_seq: int | None = None
    allow_build_at_runtime: bool = True
    calibration_samples: int = 64
    calibration_batch_size: int = 8

    def __post_init__(self):
        object.__setattr__(self, "precision", _check_precision(self.precision))
        _check_int("minimum_segment_size", self.minimum_segment_size, 1)
        object.__setattr__(self, "max_workspace_bytes", parse_bytes(self.max_workspace_bytes))
        _check_int("maximum_cached_engines", self.maximum_cached_engines, 1)
        if self.profile_strategy not in PROFILE_STRATEGIES:
            raise ValueError(
                f"profile_strategy must be one of {PROFILE_STRATEGIES}. Received: profile_strategy={self.profile_strategy!r}"
            )
        object.__setattr__(self, "profiles", coerce_profiles(self.profiles))
        _check_int("max_batch", self.max_batch, 1, allow_none=True)
        _check_int("max_seq", self.max_seq, 1, allow_none=True)
        if not isinstance(self.allow_build_at_runtime, bool):
            raise ValueError(f"allow_build_at_runtime must be True or False. Received: {self.allow_build_at_runtime!r}")
        _check_int("calibration_samples", self.calibration_samples, 1)
        _check_int("calibration_batch_size", self.calibration_batch_size, 1)

    def converter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``TrtGraphConverterV2`` (dynamic shapes on, as profiles need)."""
        kw: dict[str, Any] = {
            "precision_mode": self.precision.upper(),
            "minimum_segment_size": self.minimum_segment_size,
            "maximum_cached_engines": self.maximum_cached_engines,
            "use_calibration": self.precision == "int8",
            "allow_build_at_runtime": self.allow_build_at_runtime,
            "use_dynamic_shape": True,
            "dynamic_shape_profile_strategy": self.profile_strategy,
        }
        if self.max_workspace_bytes is not None:
            kw["max_workspace_size_bytes"] = self.max_workspace_bytes
        return kw


@dataclasses.dataclass(frozen=True)
class TensorRTConfig(_RoundTrip):
    """How an ONNX model becomes a TensorRT engine.

    Args:
        precision: "fp32", "fp16" or "int8". How each is built depends on the installed TensorRT
            (see :func:`tfaccel.tensorrt.plan_build`): TensorRT 10 sets the FP16 builder flag; TensorRT 11
            builds strongly typed networks only, so the ONNX graph is converted to fp16 first. int8
            inserts explicit Q/DQ nodes (onnxruntime static quantization, symmetric, calibrated on a
            representative dataset), which both versions build.
        max_workspace_bytes: GPU scratch memory for the builder's tactics (int or "2GiB"); None takes
            TensorRT's default (all device memory).
        profiles: optimization profiles; None derives one from the model source.
        max_batch, max_seq: limits of the derived profile (ignored when ``profiles`` is given).
        optimization_level: TensorRT's builder optimization level, 0 (fast build) to 5 (slow build,
            maybe faster engine); 3 is TensorRT's default.
        allow_tf32: let fp32 matrix math use TF32 tensor cores (faster, about 1e-3 relative error).
            Off by default so an "fp32" engine computes in fp32.
        calibration_samples, calibration_batch_size: int8 calibration data drawn from the source's
            eval split (real data) or its sample inputs.
        per_channel: int8 weights with one scale per output channel (more accurate).

    Example:
        >>> TensorRTConfig("fp16") == TensorRTConfig()
        True
        >>> TensorRTConfig.from_config(TensorRTConfig("int8", max_batch=64).get_config()).max_batch
        64
    """

    precision: str = "fp16"
    max_workspace_bytes: int | str | None = None
    profiles: Any = None
    max_batch: int | None = None
    max_seq: int | None = None
    optimization_level: int = 3
    allow_tf32: bool = False
    calibration_samples: int = 64
    calibration_batch_size: int = 8
    per_channel: bool = True

    def __post_init__(self):
        object.__setattr__(self, "precision", _check_precision(self.precision))
        object.__setattr__(self, "max_workspace_bytes", parse_bytes(self.max_workspace_bytes))
        object.__setattr__(self, "profiles", coerce_profiles(self.profiles))
        _check_int("max_batch", self.max_batch, 1, allow_none=True)
        _check_int("max_seq", self.max_seq, 1, allow_none=True)
        _check_int("optimization_level", self.optimization_level, 0, 5)
        for name in ("allow_tf32", "per_channel"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False. Received: {name}={getattr(self, name)!r}")
        _check_int("calibration_samples", self.calibration_samples, 1)
        _check_int("calibration_batch_size", self.calibration_batch_size, 1)


def profiles_for(config: TftrtConfig | TensorRTConfig, source) -> tuple[ShapeProfile, ...]:
    """The config's profiles, or the one derived from ``source`` with the config's limits.

    Example:
        >>> profiles_for(TensorRTConfig(max_batch=64), load_source("bert-tiny"))  # doctest: +SKIP
        (ShapeProfile(batch=(1, 8, 64), seq=(1, 32, 64)),)
    """
    from tfaccel.tensorrt.shape_profiles import profile_from_source

    if config.profiles is not None:
        return config.profiles
    return (profile_from_source(source, max_batch=config.max_batch, max_seq=config.max_seq),)


def step_from_config(step_cls, config_cls, config: dict[str, Any]):
    """Rebuild a TensorRT step from its ``get_config()`` (name, tolerance, on_breach + config fields).

    Example:
        >>> step_from_config(TensorRTStep, TensorRTConfig, TensorRTStep("int8").get_config())  # doctest: +SKIP
    """
    cfg = dict(config)
    name = cfg.pop("name", step_cls.name)
    if name != step_cls.name:
        raise ValueError(f"This is the config of step {name!r}, not {step_cls.name!r}.")
    tol = cfg.pop("tolerance", None)
    on_breach = cfg.pop("on_breach", None)
    return step_cls(config=config_cls.from_config(cfg),
                    tolerance=Tolerance.from_config(tol) if tol is not None else None, on_breach=on_breach)


class TrtStepBase(Step):
    """What the ``tftrt`` and ``tensorrt`` steps share: a whole ``config_cls`` or a precision plus its
    fields, optional int8 calibration inputs, a default tolerance by precision, and their report notes."""

    config_cls: ClassVar[type[TftrtConfig] | type[TensorRTConfig]]

    def __init__(self, precision: str | None = None, *, config: Any = None,
                 calibration_inputs: dict[str, np.ndarray] | None = None, tolerance: Tolerance | None = None,
                 on_breach: str | None = None, **options: Any):
        name = self.config_cls.__name__
        if config is not None and (precision is not None or options):
            raise ValueError(f"Pass either config={name}(...) or precision/options, not both.")
        if config is None:
            config = self.config_cls(**({"precision": precision} if precision is not None else {}), **options)
        if not isinstance(config, self.config_cls):
            raise ValueError(f"config must be a {name}. Received: config={config!r}")
        super().__init__(tolerance=tolerance or self.tolerance_for(config), on_breach=on_breach)
        self.config = config
        self.calibration_inputs = calibration_inputs

    #: The TensorRT route this step takes (:attr:`tfaccel.compat.Capabilities.tensorrt_route`).
    route: ClassVar[str]

    @classmethod
    def tolerance_for(cls, config) -> Tolerance:
        """The default tolerance of a step with ``config``."""
        raise NotImplementedError

    def unavailable(self, caps) -> str:
        have, reason = caps.tensorrt_route
        return "" if have == self.route else f"TensorRT route '{self.route}' is not available here ({reason})"

    def params(self) -> dict[str, Any]:
        return self.config.get_config()

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        """The inverse of :meth:`get_config` (as recorded in a report)."""
        return step_from_config(cls, cls.config_cls, config)

    def _note_route(self, ctx: StepContext) -> None:
        from tfaccel.compat import capabilities

        route, why = capabilities().tensorrt_route
        ctx.note(f"TensorRT route on this machine: {route or 'none'} ({why})")

    def _calibration(self, ctx: StepContext) -> list[dict[str, np.ndarray]]:
        """The int8 calibration batches, noted in the report."""
        batches = representative_batches(ctx.source, self.config.calibration_samples,
                                         self.config.calibration_batch_size, self.calibration_inputs)
        ctx.note("int8 calibration on " + describe_batches(batches, ctx.source, self.calibration_inputs))
        return batches
