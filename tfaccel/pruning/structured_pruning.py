"""Structured pruning of keras-hub transformers: remove feed-forward units and rebuild a smaller model.

Zeros in a dense kernel do not make TensorFlow's dense matmuls faster. Removing whole feed-forward
units does: for each transformer layer the ``intermediate_dim`` columns of the first feed-forward
kernel (and its bias) and the matching rows of the second are dropped, and a new keras-hub model with
a smaller ``intermediate_dim`` is built and given the kept weights. Per token and layer, BERT-base
spends 2 x 768 x 3072 = 4.7M multiply-adds in the feed-forward block and 2.6M in attention (4 x 768 x
768 projections + scores at sequence 128), so ``fraction=0.5`` removes ~1/3 of the encoder's work
(at most ~1.5x faster).

Which units go: the least important in each layer (the same count per layer, since keras-hub
configs have one ``intermediate_dim`` for all layers). Importance of unit ``j`` in a layer:

* ``"activation"`` (with calibration inputs): ``mean |a_j| * ||W_out[j, :]||``, the average size of
  the unit's contribution to the layer output on real inputs;
* ``"weight"`` (no data): ``||W_in[:, j]|| * ||W_out[j, :]||``.

Attention heads are not removed: keras-hub's BERT/GPT-2 layers derive ``key_dim`` from
``hidden_dim // num_heads``, so a model with fewer heads of the same size cannot be expressed as a
BertBackbone/GPT2Backbone config.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfaccel.errors import StepError


def _backbone_of(model):
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


def feedforward_layers(model) -> list[tuple[Any, Any, Any]]:
    """``(transformer_layer, intermediate_dense, output_dense)`` for every transformer layer.

    Example:
        >>> [type(t).__name__ for t, _, _ in feedforward_layers(model)]  # doctest: +SKIP
        ['TransformerEncoder', 'TransformerEncoder']
    """
    backbone = _backbone_of(model)
    layers = getattr(backbone, "transformer_layers", None)
    config = backbone.get_config()
    if not layers or "intermediate_dim" not in config:
        raise StepError(
            f"{type(backbone).__name__} has no `transformer_layers` with a shared `intermediate_dim`; structured "
            "feed-forward pruning supports keras-hub encoder/decoder backbones such as BertBackbone and GPT2Backbone."
        )
    out = []
    for t in layers:
        inter = getattr(t, "_feedforward_intermediate_dense", None)
        outp = getattr(t, "_feedforward_output_dense", None)
        if inter is None or outp is None:
            raise StepError(
                f"{type(t).__name__} {t.name!r} has no feed-forward Dense pair (_feedforward_intermediate_dense / "
                "_feedforward_output_dense); structured pruning supports keras-hub TransformerEncoder/Decoder layers."
            )
        out.append((t, inter, outp))
    return out


def feedforward_importance(model, inputs: dict[str, np.ndarray] | None = None, *, method: str | None = None,
                           batch_size: int = 16) -> list[np.ndarray]:
    """Importance of every feed-forward unit of every transformer layer (higher = keep).

    Args:
        model: a keras-hub Backbone or Task.
        inputs: calibration inputs (dict of arrays) for ``method="activation"``.
        method: ``"activation"`` (needs ``inputs``) or ``"weight"``; default: activation if inputs are
            given, else weight.
        batch_size: calibration batch size.

    Returns:
        One array of shape ``(intermediate_dim,)`` per transformer layer.

    Example:
        >>> scores = feedforward_importance(model, calibration_inputs)  # doctest: +SKIP
    """
    method = method or ("activation" if inputs is not None else "weight")
    if method not in ("activation", "weight"):
        raise ValueError(f"method must be 'activation' or 'weight'. Received: method={method!r}")
    if method == "activation" and inputs is None:
        raise ValueError("method='activation' needs calibration inputs; pass inputs=... or use method='weight'.")
    ff = feedforward_layers(model)
    out_norms = [np.linalg.norm(np.asarray(o.kernel.numpy()), axis=1) for _, _, o in ff]
    if method == "weight":
        in_norms = [np.linalg.norm(np.asarray(i.kernel.numpy()), axis=0) for _, i, _ in ff]
        return [a * b for a, b in zip(in_norms, out_norms, strict=True)]

    sums = [np.zeros(i.units, dtype=np.float64) for _, i, _ in ff]
    counts = [0] * len(ff)
    originals = []

    def hook(index, dense):
        original = dense.call

        def call(x, *args, **kwargs):
            y = original(x, *args, **kwargs)
            a = np.abs(np.asarray(y, dtype=np.float32)).reshape(-1, y.shape[-1])
            sums[index] += a.sum(axis=0)
            counts[index] += a.shape[0]
            return y

        return original, call

    try:
        for idx, (_, inter, _) in enumerate(ff):
            original, patched = hook(idx, inter)
            originals.append((inter, original))
            inter.call = patched  # instance attribute: Layer.__call__ runs it, eagerly
        n = len(next(iter(inputs.values())))
        for start in range(0, n, batch_size):
            batch = {k: v[start:start + batch_size] for k, v in inputs.items()}
            model(batch, training=False)
    finally:
        for layer, _ in originals:
            vars(layer).pop("call", None)
    return [(s / max(c, 1)) * w for s, c, w in zip(sums, counts, out_norms, strict=True)]


def _rebuilt(model, intermediate_dim: int):
    """A new model of the same class and config, with a smaller ``intermediate_dim``."""
    import keras_hub

    backbone = _backbone_of(model)
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

    Args:
        model: a keras-hub Backbone or Task (e.g. BertTextClassifier, GPT2CausalLM, BertBackbone).
        fraction: share of feed-forward units to remove, in (0, 1).
        importance: per-layer unit scores (see :func:`feedforward_importance`); computed if None.
        inputs: calibration inputs for activation-based importance.
        method: importance method when ``importance`` is None.

    Returns:
        ``(new_model, kept)`` where ``kept[i]`` are the sorted unit indices kept in layer ``i``.

    Example:
        >>> small, kept = prune_feedforward(model, 0.5, inputs=calibration_inputs)  # doctest: +SKIP
        >>> small.backbone.intermediate_dim  # doctest: +SKIP
        768
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a number in (0, 1): the share of units to remove. Received: fraction={fraction!r}")
    ff = feedforward_layers(model)
    inter_dim = ff[0][1].units
    keep_n = max(1, int(round(inter_dim * (1.0 - fraction))))
    if importance is None:
        importance = feedforward_importance(model, inputs, method=method)
    if len(importance) != len(ff) or any(len(s) != inter_dim for s in importance):
        raise ValueError(
            f"importance must hold {len(ff)} arrays of {inter_dim} scores (one per unit and layer). "
            f"Received: {[len(s) for s in importance]}"
        )
    kept = [np.sort(np.argsort(-np.asarray(s), kind="stable")[:keep_n]) for s in importance]

    new_model = _rebuilt(model, keep_n)
    new_ff = feedforward_layers(new_model)
    sliced = {}  # id(old variable) -> new value
    for (_, inter, outp), idx in zip(ff, kept, strict=True):
        sliced[id(inter.kernel)] = np.asarray(inter.kernel.numpy())[:, idx]
        sliced[id(inter.bias)] = np.asarray(inter.bias.numpy())[idx]
        sliced[id(outp.kernel)] = np.asarray(outp.kernel.numpy())[idx, :]
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
    for _, new_inter, new_outp in new_ff:
        if not (new_inter.units == keep_n and new_outp.kernel.shape[0] == keep_n):
            raise StepError("The rebuilt model's feed-forward layers do not have the expected size.")
    return new_model, kept
