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

Attention heads (:func:`prune_attention_heads`) can be removed where the backbone config states the
head size (``head_dim``: Mistral, Gemma, Gemma 3, Qwen 3), so that fewer heads of the same size are a
valid config. Grouped-query attention keeps its groups whole: with several key/value heads, whole
groups go (a key/value head and the query heads that read it); with one (multi-query), query heads go.
BERT, GPT-2, Llama, Qwen, Phi-3, Falcon, Bloom and the other families derive the head size from
``hidden_dim // num_heads``: a model with fewer heads of the same size is not a config of theirs, so
:func:`attention_heads` refuses them with that reason.
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


def _importance_method(method: str | None, inputs) -> str:
    """The ranking method of the importance functions: ``activation`` (needs calibration inputs) or
    ``weight``; None picks ``activation`` when there are inputs."""
    method = method or ("activation" if inputs is not None else "weight")
    if method not in ("activation", "weight"):
        raise ValueError(f"method must be 'activation' or 'weight'. Received: method={method!r}")
    if method == "activation" and inputs is None:
        raise ValueError("method='activation' needs calibration inputs; pass inputs=... or use method='weight'.")
    return method


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
    method = _importance_method(method, inputs)
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


def rebuild_with_config(model, changes: dict[str, Any]):
    """A new model of the same class (and Task head) whose backbone config has ``changes``; its weights
    are freshly initialised (the caller copies what it keeps). The preprocessor, if any, is shared.

    Example:
        >>> rebuild_with_config(model, {"num_layers": 3}).backbone.num_layers  # doctest: +SKIP
        3
    """
    import keras_hub

    backbone = backbone_of(model)
    new_backbone = type(backbone).from_config({**backbone.get_config(), **changes})
    if isinstance(model, keras_hub.models.Backbone):
        return new_backbone
    config = model.get_config()
    config["backbone"] = new_backbone
    if config.get("preprocessor") is not None:
        config["preprocessor"] = model.preprocessor
    return type(model).from_config(config)


def _rebuild_with_sliced_weights(model, changes: dict[str, Any], sliced: dict[int, np.ndarray]):
    """A new model with ``changes`` in its backbone config, given the old weights (``sliced[id(var)]``
    where a weight was cut)."""
    new_model = rebuild_with_config(model, changes)
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
    return new_model


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

    sliced = {}  # id(old variable) -> new value
    for f, idx in zip(ff, kept, strict=True):
        for proj in f.inputs:
            sliced[id(proj.kernel)] = np.asarray(proj.kernel.numpy())[:, idx]
            if getattr(proj, "bias", None) is not None:
                sliced[id(proj.bias)] = np.asarray(proj.bias.numpy())[idx]
        sliced[id(f.down.kernel)] = np.asarray(f.down.kernel.numpy())[idx, :]
    new_model = _rebuild_with_sliced_weights(model, {"intermediate_dim": _intermediate_dim_for(model, keep_n)}, sliced)
    for f in feedforward_layers(new_model):
        if not (f.units == keep_n and all(p.kernel.shape[-1] == keep_n for p in f.inputs)
                and f.down.kernel.shape[0] == keep_n):
            raise StepError("The rebuilt model's feed-forward layers do not have the expected size.")
    return new_model, kept


# ------------------------------------------------------------------------------------------------
# Attention heads

#: ``(query, key, value, output)`` attribute names of the attention layers whose heads can be removed.
ATTENTION_FORMS: tuple[tuple[str, str, str, str], ...] = (
    ("_query_dense", "_key_dense", "_value_dense", "_output_dense"),  # Mistral, Qwen 3
    ("query_dense", "key_dense", "value_dense", "output_dense"),  # Gemma, Gemma 3
)
_ATTENTION_ATTRS = ("_self_attention_layer", "attention")


@dataclasses.dataclass(frozen=True)
class AttentionHeads:
    """One transformer layer's (grouped-query) attention projections.

    Attributes:
        layer: the transformer layer.
        query, key, value, output: the EinsumDense projections.
        num_query_heads, num_key_value_heads, head_dim: the layer's head counts and size.
    """

    layer: Any
    query: Any
    key: Any
    value: Any
    output: Any
    num_query_heads: int
    num_key_value_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1: multi-head attention)."""
        return self.num_query_heads // self.num_key_value_heads


def _head_axis(dense, heads: int, *, side: str) -> int:
    """The kernel axis of an EinsumDense that indexes heads, from its equation (``bqm,muh->bquh``:
    the head letter is the output's third for q/k/v, the input's third for the output projection)."""
    equation = getattr(dense, "equation", None)
    kernel = getattr(dense, "kernel", None)
    if equation is None or kernel is None or getattr(dense, "bias", None) is not None:
        raise StepError(f"{dense.name!r} is not a bias-free EinsumDense; cannot remove heads from it.")
    inputs, out = equation.split("->")
    x_spec, k_spec = inputs.split(",")
    letter = (out if side == "in" else x_spec)[2]
    axis = k_spec.index(letter)
    if int(kernel.shape[axis]) != heads:
        raise StepError(f"{dense.name!r} ({equation}, kernel {tuple(kernel.shape)}): axis {axis} is not {heads} heads.")
    return axis


def attention_heads(model) -> list[AttentionHeads]:
    """The attention projections of every transformer layer, for head pruning.

    Raises:
        StepError: the family derives the head size from ``hidden_dim // num_heads`` (no ``head_dim`` in
            its config), or its attention layer has no known form; the message says which.

    Example:
        >>> [(a.num_query_heads, a.num_key_value_heads) for a in attention_heads(model)]  # doctest: +SKIP
        [(4, 2), (4, 2)]
    """
    backbone = backbone_of(model)
    config = backbone.get_config()
    name = type(backbone).__name__
    if "head_dim" not in config or "num_query_heads" not in config or "num_key_value_heads" not in config:
        raise StepError(
            f"{name} derives its head size from hidden_dim // num_heads (its config has no head_dim), so a model "
            "with fewer heads of the same size is not a config it can build: attention heads cannot be removed. "
            "Head pruning supports backbones with head_dim, num_query_heads and num_key_value_heads (Mistral, "
            "Gemma, Gemma 3, Qwen 3); prune feed-forward units only (head_fraction=0)."
        )
    out = []
    for t, _ in _unique_layers(backbone):
        attention = next((getattr(t, a) for a in _ATTENTION_ATTRS if getattr(t, a, None) is not None), None)
        form = next((f for f in ATTENTION_FORMS if attention is not None
                     and all(getattr(attention, a, None) is not None for a in f)), None)
        if form is None:
            raise StepError(f"{type(t).__name__} {t.name!r} has no attention layer with query/key/value/output "
                            f"projections tfaccel knows ({'; '.join('/'.join(f) for f in ATTENTION_FORMS)}).")
        q, k, v, o = (getattr(attention, a) for a in form)
        nq, nkv = int(config["num_query_heads"]), int(config["num_key_value_heads"])
        head_dim = int(q.kernel.shape[-1])
        heads = AttentionHeads(layer=t, query=q, key=k, value=v, output=o, num_query_heads=nq,
                               num_key_value_heads=nkv, head_dim=head_dim)
        for dense, n, side in ((q, nq, "in"), (k, nkv, "in"), (v, nkv, "in"), (o, nq, "out")):
            _head_axis(dense, n, side=side)
        out.append(heads)
    return out


def head_importance(model, inputs: dict[str, np.ndarray] | None = None, *, method: str | None = None,
                    batch_size: int = 16) -> list[np.ndarray]:
    """Importance of every query head of every transformer layer (higher = keep).

    ``"weight"``: ``||W_q[head]|| * ||W_o[head]||``; ``"activation"``: ``mean ||o_head|| * ||W_o[head]||``
    where ``o_head`` is the head's attention output (the output projection's input) on ``inputs``.

    Returns:
        One array of shape ``(num_query_heads,)`` per transformer layer.

    Example:
        >>> head_importance(model, method="weight")[0].shape  # doctest: +SKIP
        (4,)
    """
    method = _importance_method(method, inputs)
    layers = attention_heads(model)

    def per_head(dense, heads, side):
        w = np.moveaxis(np.asarray(dense.kernel.numpy(), dtype=np.float64), _head_axis(dense, heads, side=side), 0)
        return np.linalg.norm(w.reshape(heads, -1), axis=1)

    out_norms = [per_head(a.output, a.num_query_heads, "out") for a in layers]
    if method == "weight":
        return [per_head(a.query, a.num_query_heads, "in") * o for a, o in zip(layers, out_norms, strict=True)]
    sums = [np.zeros(a.num_query_heads) for a in layers]
    counts = [0] * len(layers)
    patched = []

    def hook(index, dense, heads):
        original = dense.call

        def call(x, *args, **kwargs):  # (batch, seq, heads, head_dim): one slice per head
            a = np.asarray(x, dtype=np.float32).reshape(-1, heads, x.shape[-1])
            sums[index] += np.linalg.norm(a, axis=-1).sum(axis=0)
            counts[index] += a.shape[0]
            return original(x, *args, **kwargs)

        return call

    try:
        for idx, a in enumerate(layers):
            a.output.call = hook(idx, a.output, a.num_query_heads)
            patched.append(a.output)
        n = len(next(iter(inputs.values())))
        for start in range(0, n, batch_size):
            model({k: v[start:start + batch_size] for k, v in inputs.items()}, training=False)
    finally:
        for layer in patched:
            vars(layer).pop("call", None)
    return [(s / max(c, 1)) * w for s, c, w in zip(sums, counts, out_norms, strict=True)]


def prune_attention_heads(model, fraction: float = 0.25, *, importance: list[np.ndarray] | None = None,
                          inputs: dict[str, np.ndarray] | None = None, method: str | None = None):
    """Remove ``fraction`` of the attention heads of every transformer layer; return a new, smaller
    keras-hub model (same class and config except the head counts) with the kept weights.

    With several key/value heads, whole groups go (a key/value head and the query heads reading it;
    the query-to-key/value ratio stays): ``num_key_value_heads`` and ``num_query_heads`` shrink alike.
    With one key/value head (multi-query) or none shared, query heads go and the key/value head stays.
    A group's importance is the sum of its query heads' (:func:`head_importance`).

    Args:
        model: a keras-hub Backbone or Task whose config has ``head_dim`` (Mistral, Gemma, Gemma 3, Qwen 3).
        fraction: share of heads (or groups) to remove, in (0, 1); at least one head or group stays.
        importance: per-layer query-head scores; computed if None.
        inputs: calibration inputs for activation importance.
        method: importance method when ``importance`` is None.

    Returns:
        ``(new_model, kept)`` where ``kept[i]`` are the sorted query-head indices kept in layer ``i``.

    Example:
        >>> small, kept = prune_attention_heads(mistral, 0.5, method="weight")  # doctest: +SKIP
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a number in (0, 1): the share of heads to remove. Received: fraction={fraction!r}")
    layers = attention_heads(model)
    first = layers[0]
    nq, nkv, g = first.num_query_heads, first.num_key_value_heads, first.group_size
    by_groups = nkv > 1
    total = nkv if by_groups else nq
    keep_n = max(1, int(round(total * (1.0 - fraction))))
    if keep_n == total:
        raise StepError(f"head fraction {fraction} of {total} {'key/value groups' if by_groups else 'query heads'} "
                        "removes none; use a larger fraction or head_fraction=0.")
    if importance is None:
        importance = head_importance(model, inputs, method=method)
    kept_q, kept_kv = [], []
    for scores in importance:
        scores = np.asarray(scores, dtype=np.float64)
        if by_groups:
            groups = np.sort(np.argsort(-scores.reshape(nkv, g).sum(axis=1), kind="stable")[:keep_n])
            kept_kv.append(groups)
            kept_q.append(np.concatenate([np.arange(k * g, (k + 1) * g) for k in groups]))
        else:
            kept_kv.append(np.arange(nkv))
            kept_q.append(np.sort(np.argsort(-scores, kind="stable")[:keep_n]))
    sliced = {}
    for a, q_idx, kv_idx in zip(layers, kept_q, kept_kv, strict=True):
        for dense, idx, n, side in ((a.query, q_idx, nq, "in"), (a.key, kv_idx, nkv, "in"),
                                    (a.value, kv_idx, nkv, "in"), (a.output, q_idx, nq, "out")):
            sliced[id(dense.kernel)] = np.take(np.asarray(dense.kernel.numpy()), idx,
                                               axis=_head_axis(dense, n, side=side))
    new_nq, new_nkv = len(kept_q[0]), len(kept_kv[0])
    changes = {"num_query_heads": new_nq, "num_key_value_heads": new_nkv, "head_dim": first.head_dim}
    new_model = _rebuild_with_sliced_weights(model, changes, sliced)
    for a in attention_heads(new_model):
        if (a.num_query_heads, a.num_key_value_heads, a.head_dim) != (new_nq, new_nkv, first.head_dim):
            raise StepError("The rebuilt model's attention layers do not have the expected heads.")
    return new_model, kept_q
