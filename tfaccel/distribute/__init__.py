"""Distributed training: MirroredStrategy on one machine, MultiWorkerMirroredStrategy across machines,
fault tolerance through step-exact checkpoints, and a local multi-process launcher.

Example:
    >>> from tfaccel.distribute import DistributedModel
    >>> dm = DistributedModel(build_model, per_replica_batch_size=16)  # doctest: +SKIP
    >>> dm.fit(train_inputs, train_labels, epochs=2)  # doctest: +SKIP
"""

from tfaccel.distribute.checkpointing import TrainingCheckpoint
from tfaccel.distribute.custom_loop import DistributedTrainingLoop, per_example_loss_fn
from tfaccel.distribute.distribute_config import DistributeConfig
from tfaccel.distribute.distributed_model import DistributedModel, clone_model, dtype_policy_scope
from tfaccel.distribute.strategy import (
    is_chief,
    make_strategy,
    run_with_logical_cpus,
    set_logical_cpus,
    tf_config,
    worker_info,
)

__all__ = [
    "DistributeConfig",
    "DistributedModel",
    "DistributedTrainingLoop",
    "TrainingCheckpoint",
    "clone_model",
    "dtype_policy_scope",
    "is_chief",
    "make_strategy",
    "per_example_loss_fn",
    "run_with_logical_cpus",
    "set_logical_cpus",
    "tf_config",
    "worker_info",
]
