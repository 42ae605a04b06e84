"""Structured pruning of keras-hub transformers: remove feed-forward units and rebuild a smaller model.

Zeros in a dense kernel do not make TensorFlow's dense matmuls faster. Removing whole feed-forward
units does: for each transformer layer the ``intermediate_dim`` columns of the feed-forward input
kernels (and biases) and the matching rows of the output kernel are dropped, and a new keras-hub model
with a smaller ``intermediate_dim`` is built and given the kept weights. Per token and layer, BERT-base
spends 2 x 768 x 3072 = 4.7M multiply-adds in the feed-forward block and 2.6M in attention (4 x 768 x
768 projections + scores at sequence 128), so ``fraction=0.5`` removes ~1/3 of the encoder's work
(at most ~1.5x faster).

Feed-forward forms (:data:`FEEDFORWARD_FORMS`, found by the layer's attributes):

* plain ``up -> activation -> down`` (BERT, DistilBERT, RoBERTa, XLM-R, DeBERTa-v3, ELECTRA, ALBERT,
  GPT-2, GPT-NeoX, OPT, Falcon, Bloom);
* gated ``act(gate(x)) * up(x) -> down`` (Llama, Llama 3, Mistral, Qwen, Qwen 3, Phi-3, Gemma, Gemma 3,
  SmolLM3): a unit is one column of *both* gate and up, so both keep the same units.

ALBERT shares one transformer layer between all its layers (per group): that shared block is pruned
once, and the rebuilt model uses it everywhere as before.

Which units go: the least important in each layer (the same count per layer, since keras-hub
configs have one ``intermediate_dim`` for all layers). Importance of unit ``j`` in a layer:

* ``"activation"`` (with calibration inputs): ``mean |h_j| * ||W_down[j, :]||`` where ``h`` is the
  input of the down projection (the activation, or ``act(gate) * up``): the average size of the unit's
  contribution to the layer output on real inputs;
* ``"weight"`` (no data): ``||W_up[:, j]|| * ||W_down[j, :]||`` (times ``||W_gate[:, j]||`` if gated).

Attention heads are not removed: keras-hub's BERT/GPT-2/Llama layers derive the head size from
``hidden_dim // num_heads``, so a model with fewer heads of the same size cannot be expressed as their
backbone config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tfaccel.errors import StepError

#: ``(up, gate, down)`` attribute paths of a transformer layer's feed-forward block, gated forms first
#: (a Llama layer also has the plain form's ``_feedforward_intermediate_dense``). ``gate`` None: not gated.
FEEDFORWARD_FORMS: tuple[tuple[str, str | None, str], ...] = (
    ("_feedforward_intermediate_dense", "_feedforward_gate_dense", "_feedforward_output_dense"),  # Llama, Mistral, Qwen
    ("feedforward_intermediate_dense", "feedforward_gate_dense", "feedforward_output_dense"),  # Phi-3
    ("gating_ffw_2", "gating_ffw", "ffw_linear"),  # Gemma, Gemma 3 (EinsumDense)
    ("mlp.up_proj", "mlp.gate_proj", "mlp.down_proj"),  # SmolLM3
    ("_feedforward_intermediate_dense", None, "_feedforward_output_dense"),  # BERT-like, GPT-2, GPT-NeoX, OPT
    ("dense_h_to_4h", None, "dense_4h_to_h"),  # Falcon
    ("_mlp_intermediate_dense", None, "_mlp_output_dense"),  # Bloom
)


@dataclasses.dataclass(frozen=True)
class FeedForward:
    """One transformer layer's feed-forward block.

    Attributes:
        layer: the transformer layer.
        up: the projection to the units (columns = units); its activation, if any, is part of it.
        gate: the gate projection of a gated block (same units as ``up``), or None.
        down: the projection back to the hidden size (rows = units).
        shared_by: how many layer positions use this block (ALBERT's shared layers; 1 elsewhere).
    """

    layer: Any
    up: Any
    gate: Any
    down: Any
    shared_by: int = 1

    @property
    def inputs(self) -> tuple[Any, ...]:
        """The projections whose output columns are the units (up, and gate if gated)."""
        return (self.up,) if self.gate is None else (self.up, self.gate)

    @property
    def units(self) -> int:
        return int(self.up.kernel.shape[-1])


def backbone_of(model):
    """The keras-hub Backbone of ``model`` (a Backbone or a Task); StepError for anything else."""
    import keras_hub

    if isinstance(model, keras_hub.models.Backbone):
        return model
    backbone = getattr(model, "backbone", None)
    if isinstance(model, keras_hub.models.Task) and isinstance(backbone, keras_hub.models.Backbone):
        return backbone
    raise StepError(
        f"Structured pruning rebuilds keras-hub models; {getattr(model, 'name', model)!r} "
        f"({type(model).__name__}) is neither a keras_hub.models.Backbone nor a Task with a backbone."
    )


def _attr(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unique_layers(backbone) -> list[tuple[Any, int]]:
    """``(layer, uses)`` for every distinct transformer layer; ALBERT keeps groups of shared layers."""
    layers = getattr(backbone, "transformer_layers", None) or []
    flat = [t for item in layers for t in (item if isinstance(item, (list, tuple)) else [item])]
    distinct: list[Any] = []
    for t in flat:
        if not any(t is d for d in distinct):
            distinct.append(t)
    shared = len(distinct) < len(flat) or any(isinstance(item, (list, tuple)) for item in layers)
    uses = max(1, int(backbone.get_config().get("num_layers", len(flat))) // max(1, len(distinct))) if shared else 1
    return [(t, uses) for t in distinct]


def _check_projection(ff: FeedForward, what: str, layer, units: int, axis: int) -> None:
    kernel = getattr(layer, "kernel", None)
    if getattr(layer, "quantization_mode", None):
        raise StepError(
            f"{ff.layer.name!r}: its feed-forward {what} ({layer.name!r}) is quantized "
            f"({layer.quantization_mode}); run prune-structured before int8/int4."
        )
    if kernel is None or len(kernel.shape) != 2 or int(kernel.shape[axis]) != units:
        raise StepError(
            f"{type(ff.layer).__name__} {ff.layer.name!r}: the feed-forward {what} {layer.name!r} has kernel shape "
            f"{None if kernel is None else tuple(kernel.shape)}, not a 2-D kernel with {units} units on axis {axis}; "
            "structured pruning cannot slice it."
        )


def feedforward_layers(model) -> list[FeedForward]:
    """The feed-forward block of every distinct transformer layer (ALBERT's shared layers once).

    Raises:
        StepError: the model is not a keras-hub transformer with a known feed-forward form; the message
            says what was missing.

    Example:
        >>> [(type(f.layer).__name__, f.units, f.gate is not None) for f in feedforward_layers(model)]  # doctest: +SKIP
        [('LlamaTransformerDecoder', 64, True), ('LlamaTransformerDecoder', 64, True)]
    """
    backbone = backbone_of(model)
    config = backbone.get_config()
    distinct = _unique_layers(backbone)
    if not distinct or "intermediate_dim" not in config:
        raise StepError(
            f"{type(backbone).__name__} has no `transformer_layers` with a shared `intermediate_dim`; structured "
            "feed-forward pruning supports keras-hub encoder/decoder backbones such as BertBackbone, GPT2Backbone "
            "and LlamaBackbone."
        )
    out = []
    for t, uses in distinct:
        for up_path, gate_path, down_path in FEEDFORWARD_FORMS:
            up, down = _attr(t, up_path), _attr(t, down_path)
            gate = _attr(t, gate_path) if gate_path else None
            if up is not None and down is not None and (gate_path is None or gate is not None):
                break
        else:
            raise StepError(
                f"{type(t).__name__} {getattr(t, 'name', t)!r} in {type(backbone).__name__} has no feed-forward form "
                "tfaccel knows (up/down projections such as _feedforward_intermediate_dense/_feedforward_output_dense, "
                "or a gated up/gate/down); structured pruning cannot prune it. Known forms: "
                + "; ".join("/".join(p for p in form if p) for form in FEEDFORWARD_FORMS)
            )
        ff = FeedForward(layer=t, up=up, gate=gate, down=down, shared_by=uses)
        units = ff.units
        for what, proj in (("up projection", up), ("gate projection", gate)):
            if proj is not None:
                _check_projection(ff, what, proj, units, axis=1)
        _check_projection(ff, "down projection", down, units, axis=0)
        out.append(ff)
    units = {f.units for f in out}
    if len(units) != 1:
        raise StepError(f"{type(backbone).__name__}'s transformer layers have different feed-forward sizes "
                        f"{sorted(units)}; structured pruning needs one `intermediate_dim` for all layers.")
    ratio, rest = divmod(int(config["intermediate_dim"]), out[0].units)
    if rest or ratio < 1:
        raise StepError(
            f"{type(backbone).__name__}: intermediate_dim={config['intermediate_dim']} is not a multiple of the "
            f"feed-forward size {out[0].units}; cannot express a smaller model in this config."
        )
    return out


def _intermediate_dim_for(model, units: int) -> int:
    """The config ``intermediate_dim`` that gives ``units`` feed-forward units (Gemma: 2 x units)."""
    backbone = backbone_of(model)
    ff = feedforward_layers(model)
    return int(backbone.get_config()["intermediate_dim"]) // ff[0].units * int(units)


def _norms(kernel, axis: int) -> np.ndarray:
    return np.linalg.norm(np.asarray(kernel.numpy(), dtype=np.float64), axis=axis)


def feedforward_importance(model, inputs: dict[str, np.ndarray] | None = None, *, method: str | None = None,
                           batch_size: int = 16) -> list[np.ndarray]:
    """Importance of every feed-forward unit of every distinct transformer layer (higher = keep).

    Args:
        model: a keras-hub Backbone or Task.
        inputs: calibration inputs (dict of arrays) for ``method="activation"``.
        method: ``"activation"`` (needs ``inputs``) or ``"weight"``; default: activation if inputs are
            given, else weight.
        batch_size: calibration batch size.

    Returns:
        One array of shape ``(units,)`` per entry of :func:`feedforward_layers`.

    Example:
        >>> scores = feedforward_importance(model, calibration_inputs)  # doctest: +SKIP
    """
    method = method or ("activation" if inputs is not None else "weight")
    if method not in ("activation", "weight"):
        raise ValueError(f"method must be 'activation' or 'weight'. Received: method={method!r}")
    if method == "activation" and inputs is None:
        raise ValueError("method='activation' needs calibration inputs; pass inputs=... or use method='weight'.")
    ff = feedforward_layers(model)
    out_norms = [_norms(f.down.kernel, axis=1) for f in ff]
    if method == "weight":
        scores = []
        for f, o in zip(ff, out_norms, strict=True):
            s = o.copy()
            for proj in f.inputs:
                s *= _norms(proj.kernel, axis=0)
            scores.append(s)
        return scores

    sums = [np.zeros(f.units, dtype=np.float64) for f in ff]
    counts = [0] * len(ff)
    patched = []

    def hook(index, dense):
        original = dense.call

        def call(x, *args, **kwargs):  # the down projection's input: one column per unit
            a = np.abs(np.asarray(x, dtype=np.float32)).reshape(-1, x.shape[-1])
            sums[index] += a.sum(axis=0)
            counts[index] += a.shape[0]
            return original(x, *args, **kwargs)

        return call

    try:
        for idx, f in enumerate(ff):
            f.down.call = hook(idx, f.down)  # instance attribute: Layer.__call__ runs it, eagerly
            patched.append(f.down)
        n = len(next(iter(inputs.values())))
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
            model(batch, training=False)
    finally:
        for layer in patched:
            vars(layer).pop("call", None)
    return [(s / max(c, 1)) * w for s, c, w in zip(sums, counts, out_norms, strict=True)]


def _rebuilt(model, intermediate_dim: int):
    """A new model of the same class and config, with a smaller ``intermediate_dim``."""
    import keras_hub

    backbone = backbone_of(model)
    new_backbone = type(backbone).from_config({**backbone.get_config(), "intermediate_dim": int(intermediate_dim)})
    if isinstance(model, keras_hub.models.Backbone):
        return new_backbone
    config = model.get_config()
    config["backbone"] = new_backbone
    if config.get("preprocessor") is not None:
        config["preprocessor"] = model.preprocessor
    return type(model).from_config(config)


def prune_feedforward(model, fraction: float = 0.5, *, importance: list[np.ndarray] | None = None,
                      inputs: dict[str, np.ndarray] | None = None, method: str | None = None):
    """Remove ``fraction`` of the feed-forward units of every transformer layer; return a new, smaller
    keras-hub model (same class and config except ``intermediate_dim``) with the kept weights.

    Gated blocks keep the same units in their gate and up projections.

    Args:
        model: a keras-hub Backbone or Task (e.g. BertTextClassifier, GPT2CausalLM, LlamaCausalLM).
        fraction: share of feed-forward units to remove, in (0, 1).
        importance: per-layer unit scores (see :func:`feedforward_importance`); computed if None.
        inputs: calibration inputs for activation-based importance.
        method: importance method when ``importance`` is None.

    Returns:
        ``(new_model, kept)`` where ``kept[i]`` are the sorted unit indices kept in distinct layer ``i``.

    Example:
        >>> small, kept = prune_feedforward(model, 0.5, inputs=calibration_inputs)  # doctest: +SKIP
        >>> small.backbone.intermediate_dim  # doctest: +SKIP
        768
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a number in (0, 1): the share of units to remove. Received: fraction={fraction!r}")
    ff = feedforward_layers(model)
    units = ff[0].units
    keep_n = max(1, int(round(units * (1.0 - fraction))))
    if importance is None:
        importance = feedforward_importance(model, inputs, method=method)
    if len(importance) != len(ff) or any(len(s) != units for s in importance):
        raise ValueError(
            f"importance must hold {len(ff)} arrays of {units} scores (one per unit and layer). "
            f"Received: {[len(s) for s in importance]}"
        )
    kept = [np.sort(np.argsort(-np.asarray(s), kind="stable")[:keep_n]) for s in importance]

    new_model = _rebuilt(model, _intermediate_dim_for(model, keep_n))
    sliced = {}  # id(old variable) -> new value
    for f, idx in zip(ff, kept, strict=True):
        for proj in f.inputs:
            sliced[id(proj.kernel)] = np.asarray(proj.kernel.numpy())[:, idx]
            if getattr(proj, "bias", None) is not None:
                sliced[id(proj.bias)] = np.asarray(proj.bias.numpy())[idx]
        sliced[id(f.down.kernel)] = np.asarray(f.down.kernel.numpy())[idx, :]
    old_weights, new_weights = model.weights, new_model.weights
    if len(old_weights) != len(new_weights):
        raise StepError(
            f"The rebuilt {type(new_model).__name__} has {len(new_weights)} weights, the original {len(old_weights)}; "
            "cannot copy weights. Is the model a stock keras-hub class?"
        )
    for old, new in zip(old_weights, new_weights, strict=True):
        value = sliced.get(id(old))
        if value is None:
            value = old.numpy()
        if tuple(value.shape) != tuple(new.shape):
            raise StepError(f"Weight {old.path} has shape {tuple(value.shape)} but the rebuilt model expects {tuple(new.shape)}.")
        new.assign(value)
    for f in feedforward_layers(new_model):
        if not (f.units == keep_n and all(p.kernel.shape[-1] == keep_n for p in f.inputs)
                and f.down.kernel.shape[0] == keep_n):
            raise StepError("The rebuilt model's feed-forward layers do not have the expected size.")
    return new_model, kept
