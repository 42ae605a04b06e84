"""Quantize a Keras model's weights with Keras 3's own quantization (``Model.quantize``), on the
layers a :class:`QuantizationConfig` selects."""

from __future__ import annotations

import warnings

from tfaccel.core.layers import leaf_layers
from tfaccel.errors import StepError
from tfaccel.quantization.quantization_config import QuantizationConfig
from tfaccel.quantization.quantization_report import QuantizationSummary, weight_bytes


def quantize_model(model, config: QuantizationConfig | str = "int8", *, copy: bool = True):
    """Quantize the selected layers of a Keras model with ``Model.quantize``.

    Args:
        model: a built Keras model (keras-hub models are).
        config: a :class:`QuantizationConfig`, or a mode string ("int8", "int4") for its defaults.
        copy: quantize a copy (rebuilt from the model's config and weights) and leave ``model`` as
            it was. With ``copy=False`` the model is changed in place.

    Returns:
        ``(quantized_model, QuantizationSummary)``.

    Raises:
        StepError: no layer was selected, or Keras refused a selected layer.

    Example:
        >>> qmodel, summary = quantize_model(model, QuantizationConfig("int8", exclude=("pooled_dense",)))  # doctest: +SKIP
        >>> summary.notes()[0]  # doctest: +SKIP
        'int8: quantized 37 layers (22.57M of 22.71M parameters ...'
    """
    if isinstance(config, str):
        config = QuantizationConfig(mode=config)
    if not isinstance(config, QuantizationConfig):
        raise ValueError(f"config must be a QuantizationConfig or a mode string. Received: config={config!r}")
    if copy:
        model = clone_model(model)
    before = weight_bytes(model)
    decisions = config.decide(model)
    chosen = {d.path for d in decisions if d.quantized}
    if not chosen:
        raise StepError(
            "No layer was selected for quantization: " + "; ".join(f"{d.path}: {d.reason}" for d in decisions[:6])
            + ". Widen layer_types/include or drop exclude patterns."
        )

    def selected(layer) -> bool:
        return (layer.path or layer.name) in chosen

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Layer X does not have a quantize method": expected for the others
        # type_check=False lets Keras quantize thin subclasses (keras-hub's ReversibleEmbedding);
        # the filter keeps every other layer out.
        model.quantize(config.mode, config=config.keras_config(), filters=selected, type_check=False)
    modes: dict[str, str | None] = {}
    for layer in leaf_layers(model):
        modes.setdefault(layer.path or layer.name, getattr(layer, "quantization_mode", None))
    missed = [d.path for d in decisions if d.quantized and modes.get(d.path) is None]
    if missed:
        raise StepError(f"Keras did not quantize these selected layers: {missed}. Exclude them (exclude=...).")
    summary = QuantizationSummary(mode=config.mode, decisions=decisions, weight_bytes_before=before,
                                  weight_bytes_after=weight_bytes(model))
    return model, summary


def clone_model(model):
    """A new model with the same config and weights (quantization changes models in place)."""
    try:
        clone = model.__class__.from_config(model.get_config())
    except Exception as exc:  # any failure means: cannot rebuild
        raise StepError(
            f"Cannot rebuild {type(model).__name__} from its config to quantize a copy ({type(exc).__name__}: {exc}). "
            "Pass copy=False to quantize the model in place."
        ) from exc
    if not clone.built or len(clone.weights) != len(model.weights):
        raise StepError(
            f"{type(model).__name__} rebuilt from its config has {len(clone.weights)} weights, the model has "
            f"{len(model.weights)}. Pass copy=False to quantize the model in place."
        )
    clone.set_weights(model.get_weights())
    return clone
