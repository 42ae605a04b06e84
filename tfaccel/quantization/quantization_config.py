"""Which layers of a Keras model to quantize, and how: the user's choice, validated and serializable.

The selection works on leaf layers (Dense, EinsumDense, Embedding, ...) by Keras layer type and by
regular expressions on the layer's path (``layer.path``, e.g.
``transformer_layer_0/self_attention_layer/query``, ``token_embedding``, ``logits``). Every layer
with weights gets a decision and a reason, which the pipeline report lists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from tfaccel.core.layers import leaf_layers

MODES = ("int8", "int4")

# Keras layer types that implement ``quantize`` in Keras 3.15 (int8 and int4).
QUANTIZABLE_TYPES = ("Dense", "EinsumDense", "Embedding", "ReversibleEmbedding")

# Subclasses that only add convenience on top of a quantizable Keras layer and keep its call and
# quantize code; Keras' own type check rejects any subclass, so these are quantized with
# ``type_check=False``. Keyed by "module.ClassName".
THIN_SUBCLASSES = {
    "keras_hub.src.layers.modeling.reversible_embedding.ReversibleEmbedding": "ReversibleEmbedding",
}

# Defaults measured on minilm-bbc (all-MiniLM-L6-v2 fine-tuned on BBC News, 200 held-out articles,
# float32 accuracy 0.930, 2026-11-22): int8 of every Dense/EinsumDense/embedding layer 0.935, and the
# weights shrink 90.9 -> 23.6 MB; leaving the embeddings in float32 also 0.935 but 58.7 MB. Quantizing
# the classifier head as well changed no prediction and saves 1,925 weights, so the head stays float32
# (keep_head). int4 with groups of 128 rows 0.935; int4 per channel (block_size=None) lost 3 points.
DEFAULT_LAYER_TYPES = QUANTIZABLE_TYPES


@dataclasses.dataclass(frozen=True)
class LayerDecision:
    """What happened to one layer with weights."""

    path: str
    layer_type: str
    params: int
    quantized: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """Which layers to quantize and how.

    Args:
        mode: "int8" (weights int8, per output channel; activations quantized per token at run
            time unless ``weight_only``) or "int4" (weights int4, weight-only, as Keras does it).
        layer_types: Keras layer types to quantize, from ``QUANTIZABLE_TYPES``.
        include: regular expressions on layer paths; when given, only matching layers are
            quantized (``re.search``).
        exclude: regular expressions on layer paths that are left in float32 (wins over include).
        keep_head: leave the layers that produce the model's outputs in float32 (the classifier
            head of a classifier: a few thousand weights that decide the prediction).
        weight_only: int8 only: keep activations in float and dequantize the int8 weights
            (Keras' ``Int8QuantizationConfig(activation_quantizer=None)``).
        block_size: int4 only: weights share a scale per group of this many input rows
            (Keras' default 128); None means one scale per output channel.

    Example:
        >>> cfg = QuantizationConfig("int8", exclude=("pooled_dense",))
        >>> QuantizationConfig.from_config(cfg.get_config()) == cfg
        True
    """

    mode: str = "int8"
    layer_types: tuple[str, ...] = DEFAULT_LAYER_TYPES
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_head: bool = True
    weight_only: bool = False
    block_size: int | None = 128

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}. Received: mode={self.mode!r}")
        for name in ("layer_types", "include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name} must be a tuple of strings. Received: {name}={value!r}")
            object.__setattr__(self, name, tuple(value))
        unknown = [t for t in self.layer_types if t not in QUANTIZABLE_TYPES]
        if unknown:
            raise ValueError(
                f"layer_types may only name layers Keras can quantize: {QUANTIZABLE_TYPES}. "
                f"Received: layer_types={self.layer_types!r}"
            )
        for name in ("include", "exclude"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"{name} pattern {pattern!r} is not a valid regular expression: {exc}") from None
        if not isinstance(self.keep_head, bool):
            raise ValueError(f"keep_head must be True or False. Received: keep_head={self.keep_head!r}")
        if not isinstance(self.weight_only, bool):
            raise ValueError(f"weight_only must be True or False. Received: weight_only={self.weight_only!r}")
        if self.weight_only and self.mode != "int8":
            raise ValueError(f"weight_only applies to mode 'int8' (int4 is always weight-only). Received: mode={self.mode!r}")
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0):
            raise ValueError(f"block_size must be a positive int or None (per channel). Received: block_size={bs!r}")

    # ----------------------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("layer_types", "include", "exclude"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuantizationConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(config) - known
        if unknown:
            raise ValueError(f"Unknown QuantizationConfig fields {sorted(unknown)}. Known: {sorted(known)}")
        cfg = dict(config)
        for k in ("layer_types", "include", "exclude"):
            if k in cfg and isinstance(cfg[k], list):
                cfg[k] = tuple(cfg[k])
        return cls(**cfg)

    def replace(self, **changes) -> QuantizationConfig:
        return dataclasses.replace(self, **changes)

    def keras_config(self):
        """The matching ``keras.quantizers`` config object."""
        import keras

        if self.mode == "int8":
            if self.weight_only:
                return keras.quantizers.Int8QuantizationConfig(activation_quantizer=None)
            return keras.quantizers.Int8QuantizationConfig()
        return keras.quantizers.Int4QuantizationConfig(block_size=self.block_size)

    # ----------------------------------------------------------------------------------------------
    def decide(self, model) -> list[LayerDecision]:
        """A decision (quantize or leave, and why) for every leaf layer of ``model`` with weights.

        Example:
            >>> [d.path for d in QuantizationConfig().decide(model) if d.quantized]  # doctest: +SKIP
            ['token_embedding', 'transformer_layer_0/self_attention_layer/query', ...]
        """
        heads = output_layers(model) if self.keep_head else set()
        out = []
        for layer in leaf_layers(model):
            if not layer.weights:
                continue
            path = layer.path or layer.name
            ltype = quantizable_type(layer)
            shown_type = ltype or type(layer).__name__
            n = sum(math.prod(int(d) for d in w.shape) for w in layer.weights)

            def decision(ok: bool, reason: str, path=path, shown_type=shown_type, n=n) -> LayerDecision:
                return LayerDecision(path=path, layer_type=shown_type, params=n, quantized=ok, reason=reason)

            if getattr(layer, "quantization_mode", None):
                out.append(decision(False, f"already quantized ({layer.quantization_mode})"))
            elif ltype is None:
                base = _quantizable_base(layer)
                out.append(decision(False, (
                    f"a subclass of {base} with its own code; Keras quantizes only the layer types it implements"
                    if base else "Keras has no quantized version of this layer type")))
            elif ltype not in self.layer_types:
                out.append(decision(False, f"type {ltype} not in layer_types"))
            elif (hit := _first_match(self.exclude, path)) is not None:
                out.append(decision(False, f"excluded by pattern {hit!r}"))
            elif self.include and _first_match(self.include, path) is None:
                out.append(decision(False, "matched no include pattern"))
            elif id(layer) in heads:
                out.append(decision(False, "produces a model output (keep_head=True)"))
            else:
                out.append(decision(True, f"{self.mode}" + (" weight-only" if self.weight_only else "")))
        return out


def _first_match(patterns: tuple[str, ...], path: str) -> str | None:
    for p in patterns:
        if re.search(p, path):
            return p
    return None


def quantizable_type(layer) -> str | None:
    """The Keras type name under which ``layer`` can be quantized, or None."""
    cls = type(layer)
    if cls.__module__.startswith("keras.src.") and cls.__name__ in QUANTIZABLE_TYPES:
        return cls.__name__
    return THIN_SUBCLASSES.get(f"{cls.__module__}.{cls.__name__}")


def _quantizable_base(layer) -> str | None:
    for base in type(layer).__mro__[1:]:
        if base.__module__.startswith("keras.src.") and base.__name__ in QUANTIZABLE_TYPES:
            return base.__name__
    return None


def output_layers(model) -> set[int]:
    """ids of the leaf layers whose outputs are the model's outputs (functional models only)."""
    ids = set()
    for t in getattr(model, "outputs", None) or []:
        hist = getattr(t, "_keras_history", None)
        op = getattr(hist, "operation", None) if hist is not None else None
        if op is not None and hasattr(op, "_flatten_layers") and len(list(op._flatten_layers())) == 1:
            ids.add(id(op))
    return ids
