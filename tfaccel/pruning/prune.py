"""Magnitude pruning of Keras 3 models during training: apply / strip / scope.

``prune_low_magnitude(model, schedule)`` adds, beside each Dense / EinsumDense kernel, a mask variable
of the same shape, and sets the kernel's ``constraint`` to ``kernel * mask``. The model itself is not
changed: no wrapper layers, no new weights in ``model.weights``. That is what makes keras-hub models
prunable (their EinsumDense projections sit inside attention layers, where a wrapper cannot go).

Why a variable constraint: Keras 3 optimizers apply ``variable.assign(variable.constraint(variable))``
right after every update, inside the compiled train step (``BaseOptimizer.apply``). So pruned weights
are exactly zero after every optimizer step, also with ``steps_per_execution > 1``, under
``tf.distribute.MirroredStrategy`` (the masks are created in the model's strategy scope, so they are
mirrored) and with ``mixed_float16`` (``LossScaleOptimizer`` calls the inner optimizer's ``apply``, and
kernels and masks stay float32), and in custom loops that call ``optimizer.apply_gradients``.

The :class:`~tfaccel.pruning.UpdatePruningStep` callback advances the pruning step and recomputes the
masks when the schedule says so (tfmot's ``pruning_step`` semantics: the first training batch is step
1). ``strip_pruning`` zeroes the pruned weights one last time and removes the constraints and masks:
what is left is the plain model, which saves to ``.keras`` and loads without tfaccel.

tf_keras (Keras 2) models are routed through tfmot's own ``prune_low_magnitude`` /
``strip_pruning`` (:mod:`tfaccel.pruning.tfmot_route`), without switching ``tf.keras``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from tfaccel.pruning.pruning_impl import (
    _check_m_by_n,
    einsum_kernel_input_axes,
    is_m_by_n_sparse,
    m_by_n_mask,
    magnitude_mask,
)
from tfaccel.pruning.pruning_schedule import ConstantSparsity, as_schedule, serialize_schedule

# model -> PruningState. Weak keys: a model that goes away takes its pruning state with it.
_STATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _MaskConstraint:
    """``kernel -> original_constraint(kernel) * mask``; run by the optimizer after each update."""

    def __init__(self, mask, inner: Callable | None):
        self.mask = mask
        self.inner = inner

    def __call__(self, w):
        from keras import ops

        if self.inner is not None:
            w = self.inner(w)
        return ops.multiply(w, ops.cast(self.mask, w.dtype))


@dataclasses.dataclass
class PrunedWeight:
    """One pruned kernel: the layer, its kernel variable, the mask beside it."""

    name: str
    layer: Any
    variable: Any
    mask: Any
    input_axes: tuple[int, ...]
    original_constraint: Any = None
    threshold: float = 0.0


class PruningState:
    """The masks of one pruned model and the pruning step; built by :func:`prune_low_magnitude`.

    Attributes:
        schedule: the pruning schedule (tfaccel or tfmot).
        sparsity_m_by_n: ``(m, n)`` for m:n pruning, else None.
        weights: the :class:`PrunedWeight` entries.
        step: the last training step seen (0 before training; the first batch is step 1).
    """

    def __init__(self, model, schedule, weights: list[PrunedWeight], sparsity_m_by_n=None):
        self._model = weakref.ref(model)
        self.schedule = schedule
        self.weights = weights
        self.sparsity_m_by_n = sparsity_m_by_n
        self.step = 0
        self.last_update_step: int | None = None
        self.target_sparsity: float | None = None

    @property
    def model(self):
        return self._model()

    # -- mask updates ------------------------------------------------------------------------------
    def should_update(self, step: int) -> tuple[bool, float | None]:
        """Whether masks are recomputed at ``step``, and the sparsity to prune to."""
        if self.sparsity_m_by_n:
            return step == 1, None  # tfmot: m:n masks are set once, at the first training step
        should, sparsity = self.schedule(np.int64(step))
        return bool(should), float(sparsity)

    def update_masks(self, sparsity: float | None = None) -> None:
        """Recompute every mask from the current weights and zero the pruned weights now.

        Args:
            sparsity: element-wise target; None uses the schedule at the current step. Ignored for
                m:n pruning, whose masks keep the ``n - m`` largest weights of every block.
        """
        import tensorflow as tf

        if sparsity is None and not self.sparsity_m_by_n:
            sparsity = float(self.schedule(np.int64(max(self.step, 0)))[1])
        for w in self.weights:
            value = tf.convert_to_tensor(w.variable)
            if self.sparsity_m_by_n:
                mask = m_by_n_mask(value, self.sparsity_m_by_n, w.input_axes)
                w.threshold = 0.0
            else:
                threshold, mask = magnitude_mask(value, sparsity)
                w.threshold = float(threshold)
            w.mask.assign(tf.cast(mask, w.mask.dtype))
            w.variable.assign(value * tf.cast(mask, value.dtype))
        self.last_update_step = self.step
        self.target_sparsity = None if self.sparsity_m_by_n else sparsity

    def apply_masks(self) -> None:
        """Zero the pruned weights (``kernel *= mask``)."""
        import tensorflow as tf

        for w in self.weights:
            value = tf.convert_to_tensor(w.variable)
            w.variable.assign(value * tf.cast(tf.convert_to_tensor(w.mask), value.dtype))

    def begin_steps(self, first: int, last: int) -> None:
        """Called before running training steps ``first..last`` (one execution of the train
        function): recompute the masks if the schedule prunes at one of those steps."""
        for step in range(first, last + 1):
            should, sparsity = self.should_update(step)
            if should:
                self.step = step
                self.update_masks(sparsity)
                break
        self.step = first

    # -- reporting ---------------------------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """Fraction of exact zeros in each pruned kernel, and ``"total"`` over all of them."""
        return _zero_fractions((w.name, w.variable) for w in self.weights)

    def get_config(self) -> dict[str, Any]:
        return {"pruning_schedule": serialize_schedule(self.schedule) if self.schedule is not None else None,
                "sparsity_m_by_n": list(self.sparsity_m_by_n) if self.sparsity_m_by_n else None,
                "layers": [w.name for w in self.weights]}

    def __repr__(self) -> str:
        return (f"PruningState({len(self.weights)} kernels, step={self.step}, schedule={self.schedule!r}, "
                f"sparsity_m_by_n={self.sparsity_m_by_n})")


# --------------------------------------------------------------------------------------------------
def is_tf_keras_model(model) -> bool:
    """True for a tf_keras (Keras 2) model, checked without importing tf_keras."""
    return any(c.__module__.split(".")[0] == "tf_keras" for c in type(model).__mro__)


def _kernel_of(layer):
    import keras

    mode = getattr(layer, "quantization_mode", None)
    if mode:
        raise ValueError(
            f"Layer {layer.path!r} is quantized ({mode}); prune before quantizing. Received: a "
            f"{type(layer).__name__} with quantization_mode={mode!r}"
        )
    if getattr(layer, "lora_enabled", False):
        raise ValueError(
            f"Layer {layer.path!r} has LoRA enabled; merge or disable LoRA before pruning its kernel."
        )
    kernel = getattr(layer, "_kernel", None)
    if not isinstance(kernel, keras.Variable):
        kernel = getattr(layer, "kernel", None)
    if not isinstance(kernel, keras.Variable):
        raise ValueError(f"Layer {layer.path!r} has no kernel variable to prune.")
    return kernel


def _input_axes(layer) -> tuple[int, ...]:
    import keras

    if isinstance(layer, keras.layers.EinsumDense):
        return einsum_kernel_input_axes(layer.equation)
    return (0,)


def _select_layers(model, layers) -> list:
    import keras

    candidates = [
        layer for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))
    ]
    if any(not layer.built for layer in candidates):
        raise ValueError(
            f"Model {model.name!r} has layers that are not built yet; build it first (call it on a batch, "
            "or use a functional/keras-hub model, which is built when created)."
        )
    if layers is None:
        chosen = candidates
    elif callable(layers):
        chosen = [layer for layer in candidates if layers(layer)]
    else:
        if isinstance(layers, str):
            layers = [layers]
        patterns = list(layers)
        chosen, unmatched = [], []
        for pat in patterns:
            try:
                regex = re.compile(pat)
            except re.error:
                regex = re.compile(re.escape(pat))
            hit = [layer for layer in candidates
                   if layer.name == pat or layer.path == pat or regex.fullmatch(layer.path)]
            if not hit:
                unmatched.append(pat)
            chosen += [layer for layer in hit if layer not in chosen]
        if unmatched:
            sample = ", ".join(layer.path for layer in candidates[:6])
            raise ValueError(
                f"No Dense/EinsumDense layer matches {unmatched}: give layer names, paths or regular expressions "
                f"over paths (e.g. {sample}, ...). Received: layers={layers!r}"
            )
    # No duplicates: _flatten_layers yields each layer once, and patterns add only layers not chosen yet.
    if not chosen:
        raise ValueError(f"Nothing to prune: model {model.name!r} has no selected Dense or EinsumDense layer.")
    return chosen


def prune_low_magnitude(
    model,
    pruning_schedule: Any = None,
    *,
    sparsity_m_by_n: tuple[int, int] | None = None,
    layers: Iterable[str] | Callable[[Any], bool] | str | None = None,
):
    """Prepare a model for magnitude pruning during training (tfmot's ``prune_low_magnitude``).

    Train it with ``model.fit(..., callbacks=[UpdatePruningStep()])``; the callback recomputes the
    masks on the schedule's steps, the optimizer keeps pruned weights at zero after every update.
    Call :func:`strip_pruning` afterwards.

    Args:
        model: a built Keras 3 model (a keras-hub task or backbone, functional or Sequential). A
            tf_keras model is pruned by tfmot instead and a new tfmot model is returned.
        pruning_schedule: a :class:`ConstantSparsity` / :class:`PolynomialDecay`, a tfmot schedule,
            or a serialized schedule dict. Default: ``ConstantSparsity(0.5, begin_step=0)`` (tfmot's).
        sparsity_m_by_n: e.g. ``(2, 4)``: at least 2 zeros in every 4 consecutive weights along the
            input dimension. As in tfmot, m:n masks are set once, at the first training step, and
            the schedule is not used.
        layers: which Dense/EinsumDense layers to prune: None (all), names / paths / regular
            expressions over ``layer.path``, or a predicate ``layer -> bool``.

    Returns:
        The same model object (pruned in place; masks are held beside it), or for a tf_keras model
        the model tfmot returns.

    Raises:
        ValueError: bad schedule or m:n, a model pruned already, unbuilt or quantized layers.

    Example:
        >>> from tfaccel.pruning import PolynomialDecay, UpdatePruningStep, prune_low_magnitude, strip_pruning
        >>> model = prune_low_magnitude(model, PolynomialDecay(0.0, 0.5, 0, 100, frequency=10))  # doctest: +SKIP
        >>> model.fit(ds, epochs=2, callbacks=[UpdatePruningStep(log_dir="logs")])  # doctest: +SKIP
        >>> model = strip_pruning(model)  # doctest: +SKIP
    """
    if sparsity_m_by_n is not None:
        sparsity_m_by_n = _check_m_by_n(sparsity_m_by_n)
    if pruning_schedule is None:
        pruning_schedule = ConstantSparsity(0.5, begin_step=0)
    schedule = as_schedule(pruning_schedule)

    if is_tf_keras_model(model):
        from tfaccel.pruning.tfmot_route import prune_tf_keras

        if layers is not None:
            raise ValueError(
                "layers= selects layers of Keras 3 models only; for a tf_keras model, wrap the layers to prune "
                f"with tfmot.sparsity.keras.prune_low_magnitude yourself. Received: layers={layers!r}"
            )

        return prune_tf_keras(model, schedule, sparsity_m_by_n=sparsity_m_by_n)

    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(f"prune_low_magnitude needs a keras.Model. Received: model of type {type(model).__name__}")
    if model in _STATES:
        raise ValueError(f"Model {model.name!r} is already being pruned. Call strip_pruning(model) before pruning it again.")
    chosen = _select_layers(model, layers)

    strategy = model.distribute_strategy
    entries = []
    with strategy.scope():
        for layer in chosen:
            kernel = _kernel_of(layer)
            if isinstance(kernel.constraint, _MaskConstraint):
                raise ValueError(f"Layer {layer.path!r} is already pruned through another model; strip that model first.")
            mask = keras.Variable(np.ones(tuple(kernel.shape), dtype=kernel.dtype), trainable=False,
                                  name=f"{layer.name}_pruning_mask")
            entries.append(PrunedWeight(name=layer.path, layer=layer, variable=kernel, mask=mask,
                                        input_axes=_input_axes(layer), original_constraint=kernel.constraint))
    for e in entries:
        e.variable.constraint = _MaskConstraint(e.mask, e.original_constraint)
    state = PruningState(model, schedule, entries, sparsity_m_by_n)
    _STATES[model] = state
    _reset_compiled_functions(model)
    return model


def _reset_compiled_functions(model) -> None:
    # A train function traced before the constraints were set (or removed) must be traced again.
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


def pruning_states(model) -> list[PruningState]:
    """The pruning states of ``model`` and of any model nested in it (e.g. the student inside a
    ``keras.distillation.Distiller``)."""
    found = []
    if model in _STATES:
        found.append(_STATES[model])
    if hasattr(model, "_flatten_layers"):
        for layer in model._flatten_layers(include_self=False, recursive=True):
            if layer in _STATES and _STATES[layer] not in found:
                found.append(_STATES[layer])
    return found


def pruning_state(model) -> PruningState:
    """The :class:`PruningState` of a model prepared with :func:`prune_low_magnitude`.

    Example:
        >>> pruning_state(model).sparsity()["total"]  # doctest: +SKIP
        0.5
    """
    states = pruning_states(model)
    if not states:
        raise ValueError(
            f"Model {getattr(model, 'name', model)!r} is not being pruned. Call prune_low_magnitude(model, ...) first."
        )
    return states[0]


def strip_pruning(model):
    """Finish pruning: zero the pruned weights, remove masks and constraints (tfmot's ``strip_pruning``).

    The result is the plain model: same layers and weights as before pruning (pruned ones are exactly
    zero), nothing from tfaccel in it, so ``model.save("m.keras")`` loads with plain Keras.

    Args:
        model: a model returned by :func:`prune_low_magnitude` (a tf_keras model goes to tfmot's
            ``strip_pruning``). A model that is not being pruned is returned unchanged.

    Returns:
        The same model object (or for tf_keras, the model tfmot returns).

    Example:
        >>> model = strip_pruning(model)  # doctest: +SKIP
        >>> model.save("pruned.keras")  # doctest: +SKIP
    """
    if is_tf_keras_model(model):
        from tfaccel.pruning.tfmot_route import strip_tf_keras

        return strip_tf_keras(model)
    for state in pruning_states(model):
        if state.last_update_step is None:
            warnings.warn(
                f"strip_pruning: the masks were never updated (trained for {state.step} steps with the "
                "UpdatePruningStep callback; the schedule's first pruning step was not reached), so nothing "
                "was pruned. Pass callbacks=[UpdatePruningStep()] to fit and check begin_step.",
                stacklevel=2,
            )
        state.apply_masks()
        for w in state.weights:
            w.variable.constraint = w.original_constraint
        owner = state.model
        if owner is not None:
            _STATES.pop(owner, None)
            _reset_compiled_functions(owner)
    return model


@contextlib.contextmanager
def prune_scope(model, pruning_schedule: Any = None, **kwargs) -> Iterator[Any]:
    """Prune ``model`` inside a ``with`` block; strip it on the way out, also on error.

    tfmot's ``prune_scope`` is a deserialization scope for its wrapper layers; tfaccel's masks are never
    saved into the model (a ``.keras`` written mid-training loads with plain Keras), so the scope here
    bounds the pruning itself.

    Example:
        >>> with prune_scope(model, PolynomialDecay(0.0, 0.5, 0, 50, frequency=5)):  # doctest: +SKIP
        ...     model.fit(ds, callbacks=[UpdatePruningStep()])
        >>> model.save("pruned.keras")  # plain Keras model, pruned weights are zero  # doctest: +SKIP
    """
    pruned = prune_low_magnitude(model, pruning_schedule, **kwargs)
    try:
        yield pruned
    finally:
        strip_pruning(pruned)


def kernel_sparsity(model, layers=None) -> dict[str, float]:
    """Fraction of exact zeros in each Dense/EinsumDense kernel of any Keras 3 model (pruned,
    stripped or loaded from a file), and ``"total"`` over them.

    Example:
        >>> kernel_sparsity(model)["total"]  # doctest: +SKIP
        0.5
    """
    return _zero_fractions((layer.path, _kernel_of(layer)) for layer in _select_layers(model, layers))


def _zero_fractions(named_kernels: Iterable[tuple[str, Any]]) -> dict[str, float]:
    """``{name: fraction of exact zeros}`` for ``(name, kernel variable)`` pairs, and ``"total"``."""
    out, zeros, size = {}, 0, 0
    for name, kernel in named_kernels:
        k = np.asarray(kernel.numpy())
        z = int(k.size - np.count_nonzero(k))
        out[name] = z / k.size
        zeros += z
        size += k.size
    out["total"] = zeros / max(size, 1)
    return out


def check_m_by_n(model, m_by_n=(2, 4), layers=None) -> dict[str, bool]:
    """Whether each Dense/EinsumDense kernel has at least ``m`` zeros in every block of ``n``
    consecutive weights along its input dimension.

    Example:
        >>> all(check_m_by_n(model, (2, 4)).values())  # doctest: +SKIP
        True
    """
    return {layer.path: is_m_by_n_sparse(_kernel_of(layer).numpy(), m_by_n, _input_axes(layer))
            for layer in _select_layers(model, layers)}
