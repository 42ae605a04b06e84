"""What a quantization did to a model: the layers quantized and left (with reasons) and the weight
bytes before and after. The pipeline report adds size, accuracy and speed per stage; this summary is
what goes into the stage's params and notes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tfaccel.quantization.quantization_config import LayerDecision


def weight_bytes(model) -> int:
    """Bytes of all weights of a Keras model as stored (int8 weights count 1 byte each)."""
    from tfaccel.core.artifact import Artifact

    return Artifact(kind="keras", model=model).size_bytes()


@dataclasses.dataclass
class QuantizationSummary:
    """The outcome of :func:`~tfaccel.quantization.quantize_model`.

    Attributes:
        mode: "int8" or "int4".
        decisions: one per leaf layer with weights.
        weight_bytes_before, weight_bytes_after: the model's weights in memory.
        kernel: how the int8 products run in the exported SavedModel (set by the step).
    """

    mode: str
    decisions: list[LayerDecision]
    weight_bytes_before: int
    weight_bytes_after: int
    kernel: str | None = None

    @property
    def quantized(self) -> list[LayerDecision]:
        return [d for d in self.decisions if d.quantized]

    @property
    def left(self) -> list[LayerDecision]:
        return [d for d in self.decisions if not d.quantized]

    @property
    def quantized_params(self) -> int:
        return sum(d.params for d in self.quantized)

    @property
    def total_params(self) -> int:
        return sum(d.params for d in self.decisions)

    def notes(self, max_listed: int = 8) -> list[str]:
        """Readable lines for the report: counts, bytes, and the layers left in float with reasons."""
        q, left = self.quantized, self.left
        lines = [
            f"quantized {len(q)} layers to {self.mode} ({self.quantized_params / 1e6:.2f}M of "
            f"{self.total_params / 1e6:.2f}M parameters in layers with weights); weights "
            f"{self.weight_bytes_before / 1e6:.1f} MB -> {self.weight_bytes_after / 1e6:.1f} MB"
        ]
        by_reason: dict[str, list[LayerDecision]] = {}
        for d in left:
            by_reason.setdefault(d.reason, []).append(d)
        for reason, items in by_reason.items():
            names = ", ".join(d.path for d in items[:max_listed]) + (" ..." if len(items) > max_listed else "")
            params = sum(d.params for d in items)
            lines.append(f"left in float ({reason}): {len(items)} layers, {params / 1e6:.2f}M params: {names}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "kernel": self.kernel,
            "weight_bytes_before": self.weight_bytes_before,
            "weight_bytes_after": self.weight_bytes_after,
            "quantized_layers": [d.path for d in self.quantized],
            "left_layers": {d.path: d.reason for d in self.left},
            "layers": [d.to_dict() for d in self.decisions],
        }
