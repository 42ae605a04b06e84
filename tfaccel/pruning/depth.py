"""Depth pruning of keras-hub transformers: remove whole transformer layers and rebuild a smaller model.

The DistilBERT recipe: keep layers spread evenly over the depth, first and last included (12 -> 6
keeps layers 0, 2, 4, 7, 9, 11, DistilBERT's own choice), initialise the smaller model from them,
then distil from the original (:func:`tfaccel.pruning.distill`). Every kept layer keeps its weights
and everything else (embeddings, final norms, heads) is copied unchanged, so the smaller model is the
original with the removed layers skipped. Per token, the encoder's work falls with the layer count:
half the layers is about half the encoder (the embeddings and the head stay).

Where a family builds its layers differently by position, the kept layers must match the positions
they move to:

* lists in the backbone config with one entry per layer (SmolLM3's ``rope_layer_enabled_list`` and
  ``layer_types``) are cut with the layers;
* a pattern the backbone derives from the layer index (Gemma 2's alternating sliding-window layers,
  Gemma 3's five local layers to one global) cannot be cut: the kept layers are chosen so that each
  one's config (sliding window, RoPE wavelength, ...) equals the config of its new position, as near
  to the even spread as the pattern allows; when no choice fits, :func:`prune_layers` refuses and says
  which setting differs.

ALBERT shares one layer's weights between all its layers (per group): removing layers there removes
calls of the shared block, and no weights; the new layer count must stay a multiple of ``num_groups``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfaccel.errors import StepError
from tfaccel.pruning.structured_pruning import backbone_of, rebuild_with_config

#: Config keys of a transformer layer that name or number it (not what it computes).
_LAYER_IDENTITY_KEYS = ("name", "layer_idx", "layer_index")


def _layers_and_count(model) -> tuple[Any, list[Any], int, bool]:
    """``(backbone, distinct layers, num_layers, shared)`` or a StepError naming what is missing."""
    backbone = backbone_of(model)
    config = backbone.get_config()
    layers = getattr(backbone, "transformer_layers", None)
    name = type(backbone).__name__
    if not layers or "num_layers" not in config:
        raise StepError(f"{name} has no `transformer_layers` and `num_layers` in its config; depth pruning (layers=) "
                        "supports keras-hub encoder and decoder backbones such as BertBackbone, GPT2Backbone and "
                        "LlamaBackbone.")
    flat = [t for item in layers for t in (item if isinstance(item, (list, tuple)) else [item])]
    num_layers = int(config["num_layers"])
    shared = any(isinstance(item, (list, tuple)) for item in layers) or len(flat) != num_layers
    return backbone, flat, num_layers, shared


def transformer_layer_count(model) -> int:
    """How many transformer layers ``model`` runs (ALBERT: calls of its shared layers).

    Example:
        >>> transformer_layer_count(load_source("minilm-bbc").model)  # doctest: +SKIP
        6
    """
    return _layers_and_count(model)[2]


def layers_to_remove(total: int, layers: int | float) -> int:
    """The count of layers ``layers`` asks to remove from ``total``: an int is a count, a float in (0, 1)
    a share (rounded). Raises ValueError when nothing or everything would go.

    Example:
        >>> layers_to_remove(6, 0.5), layers_to_remove(12, 4)
        (3, 4)
    """
    if isinstance(layers, bool) or not isinstance(layers, (int, float)):
        raise ValueError(f"layers must be an int (layers to remove) or a float in (0, 1) (their share). "
                         f"Received: layers={layers!r}")
    if isinstance(layers, float):
        if not 0.0 < layers < 1.0:
            raise ValueError(f"layers as a share must be in (0, 1); pass an int for a count. Received: layers={layers!r}")
        remove = int(round(total * layers))
    else:
        remove = layers
    if not 1 <= remove <= total - 1:
        raise ValueError(f"layers={layers!r} removes {remove} of {total} transformer layers; remove at least 1 and "
                         f"keep at least 1 (at most {total - 1}).")
    return remove


def evenly_spread(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread evenly over ``total``, first and last included.

    Example:
        >>> evenly_spread(12, 6), evenly_spread(6, 3)
        ([0, 2, 4, 7, 9, 11], [0, 2, 5])
    """
    if keep == 1:
        return [0]
    return [int(i) for i in np.round(np.linspace(0, total - 1, keep))]


def _signature(layer, per_layer_keys: set[str]) -> dict:
    try:
        config = layer.get_config()
    except (AttributeError, NotImplementedError, TypeError):
        # keras-hub 0.32's LlamaTransformerDecoder.get_config reads an attribute it never sets: its layers
        # are built alike at every position, so the class is all there is to compare.
        return {"class": type(layer).__name__}
    return {k: v for k, v in config.items() if k not in _LAYER_IDENTITY_KEYS and k not in per_layer_keys}


def _choose_layers(old_sigs: list[dict], new_sigs: list[dict]) -> list[int] | None:
    """Increasing old indices, one per new position, each with the new position's signature, as close to
    :func:`evenly_spread` as possible (least total distance); None if no choice matches."""
    total, keep = len(old_sigs), len(new_sigs)
    ideal = evenly_spread(total, keep)
    inf = float("inf")
    # cost[j][i]: least distance for new positions 0..j with position j taken by old layer i.
    cost = [[inf] * total for _ in range(keep)]
    back = [[-1] * total for _ in range(keep)]
    for j in range(keep):
        best, best_i = inf, -1  # min over cost[j-1][i'] for i' < i
        for i in range(total):
            if j > 0 and i > 0 and cost[j - 1][i - 1] < best:
                best, best_i = cost[j - 1][i - 1], i - 1
            if old_sigs[i] != new_sigs[j]:
                continue
            prev = 0.0 if j == 0 else best
            if prev < inf:
                cost[j][i], back[j][i] = prev + abs(i - ideal[j]), best_i
    last = int(np.argmin(cost[-1]))
    if cost[-1][last] == inf:
        return None
    chosen = [last]
    for j in range(keep - 1, 0, -1):
        chosen.append(back[j][chosen[-1]])
    return chosen[::-1]


def _mismatch(old_sigs: list[dict], new_sigs: list[dict], kept: list[int]) -> str:
    for j, i in enumerate(kept):
        diff = sorted(k for k in set(old_sigs[i]) | set(new_sigs[j]) if old_sigs[i].get(k) != new_sigs[j].get(k))
        if diff:
            k = diff[0]
            return (f"layer {j} of the smaller model has {k}={new_sigs[j].get(k)!r} where the kept layer {i} has "
                    f"{old_sigs[i].get(k)!r}")
    return ""


def prune_layers(model, layers: int | float = 0.5):
    """Remove ``layers`` transformer layers (a count, or a share of them) and return a new, smaller
    keras-hub model (same class and config except ``num_layers``) initialised from the kept layers.

    Args:
        model: a keras-hub Backbone or Task (BertTextClassifier, GPT2CausalLM, LlamaCausalLM, ...).
        layers: an int (how many layers to remove) or a float in (0, 1) (the share to remove).

    Returns:
        ``(new_model, kept)``: ``kept`` are the original indices of the layers the new model runs, in
        order (ALBERT: the layer positions kept; its shared weights are all kept).

    Raises:
        ValueError: ``layers`` removes none or all of the layers.
        StepError: the model is not a keras-hub transformer with ``num_layers``, is quantized, or builds its
            layers by position in a way no choice of kept layers preserves (the message says which setting).

    Example:
        >>> small, kept = prune_layers(load_source("minilm-bbc").model, 0.5)  # doctest: +SKIP
        >>> kept, small.backbone.num_layers  # doctest: +SKIP
        ([0, 2, 5], 3)
    """
    backbone, flat, total, shared = _layers_and_count(model)
    name = type(backbone).__name__
    quantized = [t.name for t in flat for sub in t._flatten_layers() if getattr(sub, "quantization_mode", None)]
    if quantized:
        raise StepError(f"{name}: transformer layer {quantized[0]!r} is quantized; run prune-structured before int8/int4.")
    remove = layers_to_remove(total, layers)
    keep = total - remove
    config = backbone.get_config()
    if shared:
        groups = int(config.get("num_groups", 1))
        if keep % groups:
            raise StepError(f"{name} shares its layers' weights in {groups} groups, so its layer count must stay a "
                            f"multiple of {groups}; removing {remove} of {total} leaves {keep}. Choose a count that "
                            f"leaves a multiple of {groups}.")
        new_model = rebuild_with_config(model, {"num_layers": keep})
        _copy_weights(model, new_model, {})
        return new_model, evenly_spread(total, keep)
    per_layer = {k for k, v in config.items() if isinstance(v, (list, tuple)) and len(v) == total}
    ideal = evenly_spread(total, keep)
    changes: dict[str, Any] = {"num_layers": keep, **{k: [config[k][i] for i in ideal] for k in per_layer}}
    new_model = rebuild_with_config(model, changes)
    new_layers = list(backbone_of(new_model).transformer_layers)
    old_sigs = [_signature(t, per_layer) for t in flat]
    new_sigs = [_signature(t, per_layer) for t in new_layers]
    kept = ideal if all(old_sigs[i] == new_sigs[j] for j, i in enumerate(ideal)) else _choose_layers(old_sigs, new_sigs)
    if kept is None:
        raise StepError(
            f"{name} builds its transformer layers differently by position ({_mismatch(old_sigs, new_sigs, ideal)}), "
            f"and no {keep} of its {total} layers match the {keep} positions of a {keep}-layer {name}. Remove another "
            "count of layers, or prune width only (layers=0)."
        )
    if kept != ideal and per_layer:  # per-layer lists follow the layers actually kept
        new_model = rebuild_with_config(model, {**changes, **{k: [config[k][i] for i in kept] for k in per_layer}})
        new_layers = list(backbone_of(new_model).transformer_layers)
    mapping = {}
    for j, i in enumerate(kept):
        old_w, new_w = flat[i].weights, new_layers[j].weights
        if len(old_w) != len(new_w):
            raise StepError(f"{name}: the rebuilt layer {j} has {len(new_w)} weights, the kept layer {i} {len(old_w)}.")
        mapping.update({id(n): o for n, o in zip(new_w, old_w, strict=True)})
    _copy_weights(model, new_model, mapping, skip={id(w) for t in flat for w in t.weights})
    return new_model, kept


def _copy_weights(model, new_model, mapping: dict[int, Any], skip: set[int] = frozenset()) -> None:
    """Assign every weight of ``new_model``: from ``mapping[id(new weight)]`` where given, else from the
    old weights not in ``skip``, in order (the embeddings, norms and heads around the layers)."""
    rest_old = [w for w in model.weights if id(w) not in skip]
    rest_new = [w for w in new_model.weights if id(w) not in mapping]
    if len(rest_old) != len(rest_new):
        raise StepError(f"The rebuilt {type(new_model).__name__} has {len(rest_new)} weights outside the transformer "
                        f"layers, the original {len(rest_old)}; cannot copy weights. Is the model a stock keras-hub class?")
    mapping = {**mapping, **{id(n): o for n, o in zip(rest_new, rest_old, strict=True)}}
    for new in new_model.weights:
        old = mapping[id(new)]
        if tuple(old.shape) != tuple(new.shape):
            raise StepError(f"Weight {old.path} has shape {tuple(old.shape)} but the rebuilt model expects "
                            f"{tuple(new.shape)} ({new.path}).")
        new.assign(old.numpy())
