"""DistributeConfig: how a :class:`~tfaccel.distribute.DistributedModel` builds, feeds and checkpoints."""

from __future__ import annotations

import dataclasses
from typing import Any

from tfaccel.distribute.strategy import STRATEGY_KINDS

TRAINING_LOOPS = ("auto", "fit", "custom")
# Keras dtype policies a model can be built under. "mixed_float16" adds loss scaling (Keras wraps the
# optimizer in a LossScaleOptimizer at compile time); "mixed_bfloat16" needs none.
DTYPE_POLICIES = ("float32", "mixed_float16", "mixed_bfloat16", "float16", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DistributeConfig:
    """Settings of a distributed training run. Validates itself when built.

    Args:
        strategy: "auto" (MultiWorkerMirroredStrategy when TF_CONFIG lists several workers, else
            MirroredStrategy over all GPUs or all logical CPU devices, OneDeviceStrategy if that is
            one device), "mirrored", "multi_worker", "one_device".
        devices: device names for "mirrored" / "one_device" (default: all GPUs, else all CPUs).
        logical_cpus: split a GPU-less machine's CPU into this many logical devices (before TF initialises).
        per_replica_batch_size: examples per replica per step; the global batch is this times the
            number of replicas in sync, so results match one device at the same global batch.
        dtype_policy: Keras dtype policy the model is built under (None: leave as is).
        jit_compile: compile the training step with XLA; None keeps the setting the model was
            compiled with (e.g. by tfaccel.precision.prepare_for_training), else off.
        training_loop: "auto" (Keras ``fit`` on one machine; tfaccel's loop on several machines, where
            Keras 3 ``fit`` fails, keras-team/keras#20585; whenever ``checkpoint_dir`` is set,
            because Keras' BackupAndRestore restarts an interrupted epoch from its first batch; and
            with ``jit_compile`` on several replicas, where Keras ``fit`` fails), "fit" or "custom".
        checkpoint_dir: where training state is checkpointed and resumed from (None: no checkpoints).
        checkpoint_every_steps: also checkpoint every N optimizer steps (None: at epoch ends only).
        max_checkpoints: checkpoints kept.
        shuffle_buffer: shuffle the examples with this buffer, seeded per epoch so a resumed run sees
            the same batches (None: keep the order given).
        seed: seed of the per-epoch shuffles.

    Example:
        >>> cfg = DistributeConfig(per_replica_batch_size=4, dtype_policy="mixed_bfloat16")
        >>> DistributeConfig.from_config(cfg.get_config()) == cfg
        True
    """

    strategy: str = "auto"
    devices: tuple[str, ...] | None = None
    logical_cpus: int | None = None
    per_replica_batch_size: int = 8
    dtype_policy: str | None = None
    jit_compile: bool | None = None
    training_loop: str = "auto"
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    max_checkpoints: int = 2
    shuffle_buffer: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.strategy not in STRATEGY_KINDS:
            raise ValueError(f"strategy must be one of {STRATEGY_KINDS}. Received: strategy={self.strategy!r}")
        if self.devices is not None:
            if isinstance(self.devices, str) or not all(isinstance(d, str) for d in self.devices) or not self.devices:
                raise ValueError(f"devices must be a non-empty list of device names such as ['/cpu:0', '/cpu:1']. "
                                 f"Received: devices={self.devices!r}")
            object.__setattr__(self, "devices", tuple(self.devices))
        for name in ("per_replica_batch_size", "max_checkpoints"):
            _check_int(name, getattr(self, name), minimum=1)
        for name in ("logical_cpus", "checkpoint_every_steps", "shuffle_buffer"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=1)
        _check_int("seed", self.seed, minimum=0)
        if self.dtype_policy is not None and self.dtype_policy not in DTYPE_POLICIES:
            raise ValueError(f"dtype_policy must be None or one of {DTYPE_POLICIES}. "
                             f"Received: dtype_policy={self.dtype_policy!r}")
        if self.jit_compile is not None and not isinstance(self.jit_compile, bool):
            raise ValueError(f"jit_compile must be True, False or None. Received: jit_compile={self.jit_compile!r}")
        if self.training_loop not in TRAINING_LOOPS:
            raise ValueError(f"training_loop must be one of {TRAINING_LOOPS}. "
                             f"Received: training_loop={self.training_loop!r}")
        if self.training_loop == "fit" and self.checkpoint_dir is not None:
            raise ValueError(
                "training_loop='fit' cannot resume mid-epoch from checkpoint_dir (Keras' BackupAndRestore "
                "restarts the epoch, counting steps twice). Use training_loop='auto' or 'custom' with "
                f"checkpoint_dir. Received: training_loop='fit', checkpoint_dir={self.checkpoint_dir!r}"
            )
        if self.checkpoint_dir is not None:
            object.__setattr__(self, "checkpoint_dir", str(self.checkpoint_dir))
        if self.checkpoint_every_steps is not None and self.checkpoint_dir is None:
            raise ValueError("checkpoint_every_steps needs checkpoint_dir (where to write). "
                             f"Received: checkpoint_every_steps={self.checkpoint_every_steps}, checkpoint_dir=None")

    def get_config(self) -> dict[str, Any]:
        config = dataclasses.asdict(self)
        config["devices"] = list(self.devices) if self.devices is not None else None
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DistributeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"Unknown DistributeConfig fields {unknown}. Known: {sorted(known)}")
        return cls(**config)

    def replace(self, **changes) -> DistributeConfig:
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}. Received: {name}={value!r}")
