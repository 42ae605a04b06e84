"""DistributedModel: the user's Keras model and optimizer, built under a tf.distribute strategy, with
a ``fit`` that batches at the global batch, and resumes from checkpoints.

One machine: MirroredStrategy (all GPUs, or logical CPU devices) and Keras' own ``fit``.
Several machines: MultiWorkerMirroredStrategy from TF_CONFIG and tfaccel's
:class:`~tfaccel.distribute.custom_loop.DistributedTrainingLoop` (Keras 3 ``fit`` fails there,
keras-team/keras#20585). Both see the same global batches.

Other techniques compose through three hooks: ``dtype_policy`` (mixed precision: the model is built,
or cloned, under that Keras policy, and Keras adds loss scaling for mixed_float16), ``jit_compile``
(XLA), and ``model_transform`` (a function applied to the built model inside the strategy scope, before
compiling; wrappers that add variables, such as pruning masks, must run there), plus user callbacks.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

from tfaccel.distribute import input_pipeline
from tfaccel.distribute.checkpointing import TrainingCheckpoint
from tfaccel.distribute.custom_loop import DistributedTrainingLoop
from tfaccel.distribute.distribute_config import DistributeConfig
from tfaccel.distribute.strategy import is_chief, is_multi_worker, make_strategy


@contextlib.contextmanager
def dtype_policy_scope(policy: str | None):
    """Set Keras' global dtype policy inside the block (None: leave it), restoring it afterwards.

    Example:
        >>> import keras
        >>> with dtype_policy_scope("mixed_bfloat16"):
        ...     keras.layers.Dense(2).dtype_policy.name
        'mixed_bfloat16'
    """
    if policy is None:
        yield
        return
    import keras

    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def _with_dtype_policy(config: Any, policy: str, replace: str = "float32") -> Any:
    """A copy of a serialized Keras config whose layer dtype policies named ``replace`` become ``policy``.

    Only ``DTypePolicy`` entries change; input dtypes (int32 token ids) and layers deliberately kept
    in another dtype do not.
    """
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and config.get("config", {}).get("name") == replace:
            out = copy.deepcopy(config)
            out["config"]["name"] = policy
            return out
        return {k: _with_dtype_policy(v, policy, replace) for k, v in config.items()}
    if isinstance(config, list):
        return [_with_dtype_policy(v, policy, replace) for v in config]
    return config


def clone_model(model, dtype_policy: str | None = None, *, replace_policy: str = "float32"):
    """A new model of the same class and config with the same weights, built in the current scope.

    Unlike ``keras.models.clone_model``, keras-hub tasks stay keras-hub tasks (BertTextClassifier...).

    Args:
        model: a Keras model with a ``get_config`` (functional, sequential, keras-hub models).
        dtype_policy: rebuild its layers under this policy (e.g. "mixed_bfloat16").
        replace_policy: the layer policy that ``dtype_policy`` replaces (the default float32).

    Raises:
        ValueError: the model cannot be rebuilt from its config (a subclassed model without
            ``get_config``); pass a model-building function instead.

    Example:
        >>> import keras
        >>> m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> c = clone_model(m, "mixed_bfloat16")
        >>> c.layers[0].dtype_policy.name
        'mixed_bfloat16'
    """
    import keras

    try:
        config = keras.saving.serialize_keras_object(model)
        if dtype_policy is not None:
            config = _with_dtype_policy(config, dtype_policy, replace_policy)
        clone = keras.saving.deserialize_keras_object(config)
    except Exception as exc:
        raise ValueError(
            f"Cannot rebuild model {getattr(model, 'name', model)!r} from its config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pass a function that builds the model instead: "
            "DistributedModel(lambda: build_my_model(), ...)."
        ) from exc
    clone.set_weights(model.get_weights())
    return clone


class DistributedModel:
    """Train a Keras model (keras-hub BERT/GPT or any Keras model) on several replicas.

    The model and its optimizer are built (from a function) or cloned (from a model) under the
    strategy's scope and the requested dtype policy, then compiled. Training data are single examples
    (arrays or an unbatched ``tf.data.Dataset``); they are batched at the global batch,
    ``per_replica_batch_size x replicas``, so results match one device at that batch.

    Args:
        model: a function returning a Keras model (called inside the strategy scope; it may compile
            the model), or a Keras model to clone (with its weights and, if compiled, its optimizer,
            loss and metrics).
        config: a :class:`DistributeConfig` (or its dict); keyword ``overrides`` replace its fields.
        strategy: an existing ``tf.distribute`` strategy (default: built from the config).
        optimizer, loss, metrics: compile arguments; default: those the model was compiled with.
        model_transform: ``f(model) -> model`` applied inside the strategy scope before compiling (the
            hook for wrappers that add variables, e.g. pruning).
        extra_state: training state held outside the model that checkpoints must also carry: a dict
            name -> variable (or list of variables), or ``f(model) -> dict`` called after the model is
            built (e.g. ``lambda m: {"masks": [w.mask for w in pruning_state(m).weights]}``).
        **overrides: DistributeConfig fields, e.g. ``per_replica_batch_size=16``.

    Example:
        >>> import keras, numpy as np
        >>> def build():
        ...     m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        ...     m.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        ...     return m
        >>> dm = DistributedModel(build, strategy="one_device", devices=["/cpu:0"], per_replica_batch_size=4)
        >>> history = dm.fit(np.zeros((16, 4), "float32"), np.zeros(16, "int32"), epochs=1, verbose=0)
        >>> len(history.history["loss"])
        1
    """

    def __init__(
        self,
        model: Any,
        config: DistributeConfig | dict | None = None,
        *,
        strategy: Any = None,
        optimizer: Any = None,
        loss: Any = None,
        metrics: Sequence | None = None,
        model_transform: Callable | None = None,
        extra_state: dict | Callable | None = None,
        **overrides,
    ):
        import keras

        if isinstance(config, dict):
            config = DistributeConfig.from_config(config)
        config = config or DistributeConfig()
        if isinstance(strategy, str):  # DistributeConfig field given by keyword
            overrides["strategy"] = strategy
            strategy = None
        if overrides:
            config = config.replace(**overrides)
        self.config = config
        self.strategy = strategy or make_strategy(config.strategy, config.devices, config.logical_cpus)
        source = None
        with self.strategy.scope(), dtype_policy_scope(config.dtype_policy):
            if isinstance(model, keras.Model):
                source = model
                built = clone_model(model, config.dtype_policy)
            elif callable(model):
                built = model()
                if not isinstance(built, keras.Model):
                    raise ValueError(f"The model function must return a keras.Model. Received: {type(built).__name__}")
            else:
                raise ValueError("model must be a keras.Model or a function that builds one. "
                                 f"Received: {type(model).__name__}")
            if model_transform is not None:
                built = model_transform(built)
                if not isinstance(built, keras.Model):
                    raise ValueError(f"model_transform must return a keras.Model. Received: {type(built).__name__}")
            self._compile(built, source, optimizer, loss, metrics)
        self.model = built
        self.extra_state = extra_state(built) if callable(extra_state) else extra_state
        self._loop: DistributedTrainingLoop | None = None

    # ----------------------------------------------------------------------------------------------
    def _compile(self, built, source, optimizer, loss, metrics) -> None:
        import keras

        # A cloned model takes its source's compile settings (a keras-hub task compiles itself with its
        # defaults when rebuilt from config); a built one takes what the model function compiled.
        if source is not None and getattr(source, "compiled", False):
            compiled_from = source
        else:
            compiled_from = built if getattr(built, "compiled", False) else None
        if optimizer is None and compiled_from is not None:
            optimizer = compiled_from.optimizer
            if compiled_from is built:  # created by the model function, inside this scope
                optimizer = _inner_if_auto_wrapped(optimizer)
            else:
                optimizer = _clone_optimizer(optimizer)
        elif isinstance(optimizer, keras.optimizers.Optimizer):
            optimizer = _clone_optimizer(optimizer)  # its variables must live under this strategy
        elif optimizer is not None:
            optimizer = keras.optimizers.get(optimizer)
        if optimizer is None:
            raise ValueError("No optimizer: compile the model (in the model function or before passing it) or pass "
                             "DistributedModel(..., optimizer=...). Received: optimizer=None")
        if loss is None and compiled_from is not None:
            loss = compiled_from.loss
        if metrics is None and compiled_from is not None:
            metrics = keras.saving.deserialize_keras_object(compiled_from.get_compile_config().get("metrics"))
        jit = self.config.jit_compile
        if jit is None:
            jit = compiled_from is not None and compiled_from.jit_compile is True
        self.jit_compile = bool(jit)
        built.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=self.jit_compile)

    # ----------------------------------------------------------------------------------------------
    @property
    def num_replicas(self) -> int:
        """Replicas in sync over all workers."""
        return int(self.strategy.num_replicas_in_sync)

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step over all replicas: per_replica_batch_size x replicas."""
        return self.config.per_replica_batch_size * self.num_replicas

    @property
    def is_chief(self) -> bool:
        """True on the worker that writes checkpoints and prints progress."""
        return is_chief(self.strategy)

    @property
    def training_loop(self) -> str:
        """The loop ``fit`` uses: "fit" (Keras) or "custom" (tfaccel's distributed loop)."""
        if self.config.training_loop != "auto":
            return self.config.training_loop
        if is_multi_worker(self.strategy) or self.config.checkpoint_dir is not None:
            return "custom"
        if self.jit_compile and self.num_replicas > 1:
            # Keras fit with jit_compile=True under MirroredStrategy fails ("Trying to access resource
            # ... located in device CPU:1 from device CPU:0"); the custom loop compiles each replica's
            # forward and backward pass instead.
            return "custom"
        return "fit"

    def _get_loop(self) -> DistributedTrainingLoop:
        if self._loop is None:
            self._loop = DistributedTrainingLoop(self.model, self.strategy, self.global_batch_size,
                                                 jit_compile=self.jit_compile)
        return self._loop

    def epoch_dataset(self, examples, epoch: int, skip_steps: int = 0, steps_per_epoch: int | None = None):
        """Epoch ``epoch``'s global batches (deterministic order), from step ``skip_steps``."""
        return input_pipeline.epoch_batches(
            examples, epoch, self.global_batch_size, shuffle_buffer=self.config.shuffle_buffer,
            seed=self.config.seed, skip_steps=skip_steps, steps_per_epoch=steps_per_epoch,
        )

    # ----------------------------------------------------------------------------------------------
    def fit(
        self,
        x: Any,
        y: Any = None,
        *,
        sample_weight: Any = None,
        epochs: int = 1,
        steps_per_epoch: int | None = None,
        callbacks: Sequence | None = None,
        verbose: int | str = "auto",
    ):
        """Train on single examples, batched at the global batch.

        Args:
            x: model inputs (array or dict of arrays) or a ``tf.data.Dataset`` of single ``(x, y)``
                examples. Incomplete last global batches are dropped (all replicas step together).
            y: labels when ``x`` is arrays.
            sample_weight: per-example weights when ``x`` is arrays.
            epochs: epochs in total (a resumed run continues up to this).
            steps_per_epoch: cap on steps per epoch (default: all full global batches).
            callbacks: Keras callbacks; they run in cross-replica context with ``callback.model`` set.
            verbose: "auto" (on the chief only: a progress bar in a terminal or notebook, else one line
                per epoch), 0, 1 or 2.

        Returns:
            A ``keras.callbacks.History``.

        Example:
            >>> history = dm.fit(train_inputs, train_labels, epochs=2)  # doctest: +SKIP
            >>> history.history["loss"]  # doctest: +SKIP
            [0.91, 0.52]
        """
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs must be an int >= 1. Received: epochs={epochs!r}")
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise ValueError(f"steps_per_epoch must be None or an int >= 1. Received: steps_per_epoch={steps_per_epoch!r}")
        examples = input_pipeline.as_example_dataset(x, y, sample_weight)
        input_pipeline.check_unbatched(examples, self.model)
        steps = input_pipeline.count_steps(examples, self.global_batch_size, steps_per_epoch)
        if verbose == "auto":
            verbose = (1 if _interactive() else 2) if self.is_chief else 0
        if self.training_loop == "fit":
            return self._keras_fit(examples, epochs, steps, steps_per_epoch, callbacks, verbose)
        checkpoint = None
        if self.config.checkpoint_dir is not None:
            checkpoint = TrainingCheckpoint(self.config.checkpoint_dir, self.model, self.strategy,
                                            every_steps=self.config.checkpoint_every_steps,
                                            max_to_keep=self.config.max_checkpoints, extra_state=self.extra_state)
        return self._get_loop().fit(
            lambda epoch, skip: self.epoch_dataset(examples, epoch, skip, steps_per_epoch),
            epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose, checkpoint=checkpoint,
        )

    def _keras_fit(self, examples, epochs, steps, steps_per_epoch, callbacks, verbose):
        import tensorflow as tf

        if steps is None:  # unknown dataset size: Keras iterates each epoch to its end
            ds = examples
            if self.config.shuffle_buffer:
                ds = ds.shuffle(self.config.shuffle_buffer, seed=self.config.seed * input_pipeline.EPOCH_SEED_STRIDE,
                                reshuffle_each_iteration=True)
            ds = ds.batch(self.global_batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
            return self.model.fit(ds, epochs=epochs, callbacks=callbacks, verbose=verbose)
        # The same batches, epoch by epoch, as the custom loop: one stream of all epochs' batches,
        # which Keras keeps iterating across epochs when steps_per_epoch is given.
        stream = self.epoch_dataset(examples, 0, steps_per_epoch=steps)
        for epoch in range(1, epochs):
            stream = stream.concatenate(self.epoch_dataset(examples, epoch, steps_per_epoch=steps))
        return self.model.fit(stream, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose)

    def evaluate(self, x: Any, y: Any = None, *, sample_weight: Any = None) -> dict[str, float]:
        """Loss and compiled metrics over the data (full global batches), on all replicas.

        Example:
            >>> dm.evaluate(eval_inputs, eval_labels)  # doctest: +SKIP
            {'loss': 0.21, 'sparse_categorical_accuracy': 0.95}
        """
        examples = input_pipeline.as_example_dataset(x, y, sample_weight)
        input_pipeline.check_unbatched(examples, self.model)
        if self.training_loop == "fit":
            ds = examples.batch(self.global_batch_size, drop_remainder=True)
            return {k: float(v) for k, v in self.model.evaluate(ds, verbose=0, return_dict=True).items()}
        return self._get_loop().evaluate(input_pipeline.epoch_batches(examples, 0, self.global_batch_size),
                                         steps=input_pipeline.count_steps(examples, self.global_batch_size))

    def get_weights(self) -> list:
        """The model's weights as numpy arrays (identical on every replica and worker)."""
        return self.model.get_weights()

    def unwrap(self, dtype_policy: str | None = "float32"):
        """A plain Keras model (outside any strategy) with the trained weights, to save, export or
        optimize further (tfaccel.load_source(model)).

        Args:
            dtype_policy: the policy of the returned model (default float32; None keeps the training one).

        Example:
            >>> plain = dm.unwrap()  # doctest: +SKIP
            >>> plain.save("model.keras")  # doctest: +SKIP
        """
        trained = self.config.dtype_policy or "float32"
        if dtype_policy is None or dtype_policy == trained:
            return clone_model(self.model)
        return clone_model(self.model, dtype_policy, replace_policy=trained)

    def get_config(self) -> dict[str, Any]:
        return self.config.get_config()

    def __repr__(self) -> str:
        kind = "MultiWorkerMirroredStrategy" if is_multi_worker(self.strategy) else type(self.strategy).__name__
        return (f"DistributedModel({self.model.name}, {kind} x{self.num_replicas}, "
                f"global batch {self.global_batch_size}, loop {self.training_loop})")


def _interactive() -> bool:
    import sys

    return bool(getattr(sys.stdout, "isatty", lambda: False)()) or "ipykernel" in sys.modules


def _clone_optimizer(optimizer):
    import keras

    return keras.optimizers.deserialize(keras.optimizers.serialize(_inner_if_auto_wrapped(optimizer)))


def _inner_if_auto_wrapped(optimizer):
    """Keras wraps the optimizer in a LossScaleOptimizer when compiling a mixed_float16 model; compile()
    adds it again when needed, so pass the inner one on."""
    import keras

    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.inner_optimizer
    return optimizer
