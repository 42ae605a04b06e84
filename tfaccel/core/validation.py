"""Compare a stage's outputs with the reference model's on the same inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tfaccel.errors import ValidationError

BREACH_POLICIES = ("fail", "warn", "skip")


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far a stage may drift from the reference before it counts as a breach.

    A limit of None is not checked.

    Args:
        max_abs_diff: largest allowed absolute difference over all outputs and elements.
        min_cosine: smallest allowed cosine similarity between a sample's reference and stage outputs.
        max_accuracy_drop: largest allowed accuracy drop on the eval split, as a fraction (0.01 = 1 point).

    Example:
        >>> Tolerance(max_abs_diff=1e-3).get_config()["max_abs_diff"]
        0.001
    """

    max_abs_diff: float | None = 1e-4
    min_cosine: float | None = 0.9999
    max_accuracy_drop: float | None = 0.0

    def __post_init__(self):
        for name in ("max_abs_diff", "max_accuracy_drop"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, (int, float)) or v < 0 or not np.isfinite(v)):
                raise ValueError(f"Tolerance.{name} must be a finite number >= 0 or None. Received: {name}={v!r}")
        c = self.min_cosine
        if c is not None and (not isinstance(c, (int, float)) or not -1.0 <= c <= 1.0):
            raise ValueError(f"Tolerance.min_cosine must be in [-1, 1] or None. Received: min_cosine={c!r}")

    def get_config(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Tolerance:
        unknown = set(config) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"Unknown Tolerance fields {sorted(unknown)}. Known: max_abs_diff, min_cosine, max_accuracy_drop")
        return cls(**config)

    def replace(self, **changes) -> Tolerance:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass
class Comparison:
    """What a stage's outputs look like next to the reference's."""

    max_abs_diff: float
    mean_abs_diff: float
    min_cosine: float
    per_output: dict[str, dict[str, float]]
    accuracy: float | None = None
    reference_accuracy: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.accuracy is None or self.reference_accuracy is None:
            return None
        return self.reference_accuracy - self.accuracy

    def breaches(self, tol: Tolerance) -> list[str]:
        """Human-readable list of the limits this comparison breaks."""
        out = []
        if tol.max_abs_diff is not None and not self.max_abs_diff <= tol.max_abs_diff:
            out.append(f"max abs diff {self.max_abs_diff:.3g} > {tol.max_abs_diff:.3g}")
        if tol.min_cosine is not None and not self.min_cosine >= tol.min_cosine:
            out.append(f"cosine {self.min_cosine:.6f} < {tol.min_cosine}")
        drop = self.accuracy_drop
        if tol.max_accuracy_drop is not None and drop is not None and drop > tol.max_accuracy_drop + 1e-9:
            out.append(
                f"accuracy {self.accuracy:.4f} is {drop * 100:.2f} points below the reference "
                f"{self.reference_accuracy:.4f} (allowed {tol.max_accuracy_drop * 100:.2f})"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["accuracy_drop"] = self.accuracy_drop
        return d


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.sum(a * b, axis=1) / np.maximum(na * nb, 1e-30)
    return np.where(both_zero, 1.0, cos)


def compare_outputs(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Comparison:
    """Max/mean abs diff and per-sample cosine over every output, matched by output name."""
    if set(reference) != set(candidate):
        raise ValidationError(
            f"The stage's outputs are named {sorted(candidate)} but the reference's are {sorted(reference)}; "
            "a step must keep the model's output names."
        )
    per, maxes, means, coss = {}, [], [], []
    for name, ref in reference.items():
        ref = np.asarray(ref)
        got = np.asarray(candidate[name])
        if ref.shape != got.shape:
            raise ValidationError(f"Output '{name}' has shape {got.shape}, the reference has {ref.shape}.")
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        if not np.all(np.isfinite(got64)):
            diff_max, diff_mean, cos = float("inf"), float("inf"), float("-inf")
        else:
            d = np.abs(ref64 - got64)
            diff_max, diff_mean = float(d.max()) if d.size else 0.0, float(d.mean()) if d.size else 0.0
            cos = float(_cosines(ref64, got64).min()) if ref.ndim >= 1 and ref.shape[0] else 1.0
        per[name] = {"max_abs_diff": diff_max, "mean_abs_diff": diff_mean, "min_cosine": cos}
        maxes.append(diff_max)
        means.append(diff_mean)
        coss.append(cos)
    return Comparison(
        max_abs_diff=max(maxes), mean_abs_diff=float(np.mean(means)), min_cosine=min(coss), per_output=per
    )


def classification_accuracy(runner, inputs: dict[str, np.ndarray], labels: np.ndarray, batch_size: int = 32) -> float:
    """Top-1 accuracy of a runner whose (single or first) output is class logits, in batches of ``batch_size``.

    A last, shorter batch is padded to ``batch_size`` with copies of its last row (their logits are dropped), so
    the runner sees one batch size: an XLA-compiled or fixed-profile artifact compiles once, not again for the
    remainder (100 examples in batches of 8 would otherwise add a compile at batch 4).
    """
    n = len(labels)
    correct = 0
    for start in range(0, n, batch_size):
        part = {k: v[start : start + batch_size] for k, v in inputs.items()}
        want = labels[start : start + batch_size]
        if len(want) < batch_size < n:
            part = {k: np.concatenate([v, np.repeat(v[-1:], batch_size - len(want), axis=0)]) for k, v in part.items()}
        out = runner(part)
        logits = next(iter(out.values())) if len(out) == 1 else out.get("logits", next(iter(out.values())))
        correct += int(np.sum(np.argmax(np.asarray(logits)[: len(want)], axis=-1) == want))
    return correct / n


@dataclasses.dataclass
class Reference:
    """The reference model's outputs on the sample inputs, and its accuracy on the labelled eval split,
    computed once; every candidate artifact is checked against it (:meth:`check`).

    Attributes:
        outputs: the reference's outputs on ``sample_inputs``.
        accuracy: its accuracy on the eval split (None when there is no labelled split, or ``accuracy=False``).
        eval_batch: the batch size accuracy is measured at.

    Example:
        >>> ref = Reference.of(Artifact.of_source(source).runner(), source)  # doctest: +SKIP
        >>> ref.check(candidate_runner).min_cosine  # doctest: +SKIP
        0.99998
    """

    outputs: dict[str, np.ndarray]
    sample_inputs: dict[str, np.ndarray]
    eval_inputs: dict[str, np.ndarray] | None = None
    eval_labels: np.ndarray | None = None
    accuracy: float | None = None
    eval_batch: int = 32

    @classmethod
    def of(cls, runner, source, *, accuracy: bool = True, eval_batch: int | None = None) -> Reference:
        """Run the reference once on ``source``'s sample inputs (and its labelled eval split, for a
        classification source with labels, unless ``accuracy`` is False)."""
        labelled = accuracy and source.eval_labels is not None and source.task == "classification"
        ref = cls(outputs=runner(source.sample_inputs), sample_inputs=source.sample_inputs,
                  eval_inputs=source.eval_inputs if labelled else None,
                  eval_labels=source.eval_labels if labelled else None, eval_batch=eval_batch or 32)
        if labelled:
            ref.accuracy = classification_accuracy(runner, ref.eval_inputs, ref.eval_labels, batch_size=ref.eval_batch)
        return ref

    @property
    def labelled(self) -> bool:
        return self.eval_labels is not None

    def check(self, runner) -> Comparison:
        """Compare ``runner``'s outputs on the sample inputs with the reference's, and its accuracy
        (when the reference has a labelled split)."""
        comp = compare_outputs(self.outputs, runner(self.sample_inputs))
        if self.labelled:
            comp.accuracy = classification_accuracy(runner, self.eval_inputs, self.eval_labels,
                                                    batch_size=self.eval_batch)
            comp.reference_accuracy = self.accuracy
        return comp
