"""How much a generation artifact changes a language model's predictions on held-out text: perplexity, its
ratio to the reference's, the KL divergence of the next-token distributions and the share of positions where
both pick the same top token (what llama.cpp's perplexity tool reports for a quantized model).

Each held-out window is fed teacher-forced through the artifact the way generation runs it: an ONNX or
TensorRT decoder prefills the first ``start`` tokens, then takes one decode step per position, each fed the
text's token instead of its own (:meth:`tfaccel.generation.generators._CacheDecoder.stepwise_logits`); a
generate SavedModel, whose loop cannot be stepped from outside, through its ``serving_default`` forward pass on
the same weights (its cached loop computes the same arithmetic, and Keras int8 quantizes activations per token,
so a forward pass and decode steps agree). The reference is the Keras model's forward pass.

Logits of a window batch are compared as they come and dropped, so memory stays at one batch of
``[batch, width, vocab]`` logits per side.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from tfaccel.errors import InputMismatchError

#: Budgets a generation step's quality must meet on eval text, unless the user sets others: perplexity at
#: most 1% higher than the reference's and a mean KL divergence of at most 0.01 nats per token. Measured on
#: gpt2-bbc's held-out windows: int8 decoder ratio 1.0001 / KL 2e-5, RTN int4 1.0015 / 8e-4.
DEFAULT_MAX_PERPLEXITY_RATIO = 1.01
DEFAULT_MAX_KL = 0.01
#: Held-out windows the step validations score (gpt2-bbc: 32 x 127 next tokens).
DEFAULT_EVAL_WINDOWS = 32


@dataclasses.dataclass
class QualityBudget:
    """The most an artifact may change the reference's predictions on eval text.

    Attributes:
        max_perplexity_ratio: artifact perplexity / reference perplexity (None: not enforced).
        max_kl: mean KL(reference || artifact) of the next-token distributions, nats (None: not enforced).
        min_same_top: lowest share of positions where both pick the same top token (None: not enforced).

    Example:
        >>> QualityBudget().breaches({"perplexity_ratio": 1.02, "kl_divergence": 1e-4, "same_top": 0.99})
        ['perplexity ratio 1.0200 > 1.01']
    """

    max_perplexity_ratio: float | None = DEFAULT_MAX_PERPLEXITY_RATIO
    max_kl: float | None = DEFAULT_MAX_KL
    min_same_top: float | None = None

    def __post_init__(self):
        for name in ("max_perplexity_ratio", "max_kl", "min_same_top"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
                raise ValueError(f"{name} must be a number >= 0 or None. Received: {name}={v!r}")
        if self.min_same_top is not None and self.min_same_top > 1:
            raise ValueError(f"min_same_top must be in [0, 1]. Received: min_same_top={self.min_same_top!r}")

    def breaches(self, measures: dict) -> list[str]:
        """What ``measures`` (from :func:`quality_measures`) exceed, as readable phrases; [] when within."""
        out = []
        if self.max_perplexity_ratio is not None and measures["perplexity_ratio"] > self.max_perplexity_ratio:
            out.append(f"perplexity ratio {measures['perplexity_ratio']:.4f} > {self.max_perplexity_ratio:g}")
        if self.max_kl is not None and measures["kl_divergence"] > self.max_kl:
            out.append(f"KL divergence {measures['kl_divergence']:.3g} > {self.max_kl:g}")
        if self.min_same_top is not None and measures["same_top"] < self.min_same_top:
            out.append(f"same top token {measures['same_top']:.2%} < {self.min_same_top:.2%}")
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def quality_budget(max_perplexity_ratio="default", max_kl="default", min_same_top=None,
                   windows: int | None = None) -> tuple[QualityBudget, int]:
    """A step's budget and window count from its options (``"default"``: the module defaults; None: not
    enforced).

    Raises:
        ValueError: a bound that is not a number >= 0, or ``windows`` not an int >= 1.
    """
    budget = QualityBudget(
        max_perplexity_ratio=DEFAULT_MAX_PERPLEXITY_RATIO if max_perplexity_ratio == "default" else max_perplexity_ratio,
        max_kl=DEFAULT_MAX_KL if max_kl == "default" else max_kl, min_same_top=min_same_top)
    windows = DEFAULT_EVAL_WINDOWS if windows is None else windows
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 0:
        raise ValueError(f"quality_windows must be an int >= 0 (0: not measured). Received: quality_windows={windows!r}")
    return budget, windows


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


class _Sums:
    """Running sums over scored positions: both sides' negative log-likelihoods, KL, same top token."""

    def __init__(self):
        self.n = 0
        self.nll_ref = self.nll = self.kl = 0.0
        self.same = 0

    def add(self, ref_logits: np.ndarray, logits: np.ndarray, targets: np.ndarray) -> None:
        ref_lp, lp = _log_softmax(ref_logits), _log_softmax(logits)
        self.nll_ref -= float(np.take_along_axis(ref_lp, targets[:, None], -1).sum())
        self.nll -= float(np.take_along_axis(lp, targets[:, None], -1).sum())
        self.kl += float(np.sum(np.exp(ref_lp) * (ref_lp - lp)))
        self.same += int(np.sum(np.argmax(ref_logits, -1) == np.argmax(logits, -1)))
        self.n += len(targets)

    def result(self) -> dict:
        ppl_ref, ppl = float(np.exp(self.nll_ref / self.n)), float(np.exp(self.nll / self.n))
        return {"perplexity": ppl, "reference_perplexity": ppl_ref, "perplexity_ratio": ppl / ppl_ref,
                "kl_divergence": max(self.kl / self.n, 0.0), "same_top": self.same / self.n, "positions": self.n}


def check_windows(token_ids, vocabulary_size: int | None = None, *, start: int = 1) -> np.ndarray:
    """Held-out windows as an int32 ``[windows, width]`` array of real tokens (no padding).

    Raises:
        InputMismatchError: not 2-D integers, shorter than ``start + 1`` tokens, or ids outside the vocabulary.
    """
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[0] == 0:
        raise InputMismatchError(f"Eval windows must be a non-empty 2-D array of integer token ids. Received shape "
                                 f"{ids.shape}, dtype {ids.dtype}.")
    if ids.shape[1] < start + 1:
        raise InputMismatchError(f"Eval windows of {ids.shape[1]} tokens leave no next token to score after "
                                 f"{start} context token(s). Give windows of at least {start + 1} tokens.")
    if ids.min() < 0 or (vocabulary_size is not None and ids.max() >= vocabulary_size):
        raise InputMismatchError(f"Eval token ids range over [{ids.min()}, {ids.max()}], outside the model's "
                                 f"vocabulary [0, {vocabulary_size}). Tokenize with the model's tokenizer.")
    return ids.astype(np.int32)


def keras_forward_logits(causal_lm) -> Callable[[np.ndarray], np.ndarray]:
    """``ids [batch, width] -> logits [batch, width, vocab]``: a keras-hub CausalLM's forward pass."""

    def run(ids):
        out = causal_lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}, training=False)
        return np.asarray(out, np.float32)

    return run


def teacher_forced_logits(generator, start: int = 1) -> Callable[[np.ndarray], np.ndarray]:
    """``ids -> logits`` of a generation artifact, teacher-forced the way it generates (module docstring).

    Args:
        generator: a :class:`tfaccel.generation.Generator` (or anything with ``stepwise_logits(ids, start)``
            or ``logits(ids, padding_mask)``), or a keras-hub CausalLM.
        start: context tokens a decoder prefills before its first decode step.
    """
    if hasattr(generator, "call_with_cache"):  # a Keras CausalLM
        return keras_forward_logits(generator)
    stepwise = getattr(generator, "stepwise_logits", None)
    if stepwise is not None:
        return lambda ids: stepwise(ids, start)
    return lambda ids: generator.logits(ids, np.ones_like(ids))


def quality_measures(reference, candidate, token_ids, *, start: int = 1, batch_size: int = 8,
                     vocabulary_size: int | None = None) -> dict:
    """Perplexity, perplexity ratio, KL divergence and same-top-token rate of ``candidate`` against
    ``reference`` on held-out windows, each scored on every next token from position ``start`` on.

    Args:
        reference: the reference: a keras-hub CausalLM, a generator, or ``ids -> logits``.
        candidate: the artifact: a generator (ONNX / TensorRT decoder, generate SavedModel), a CausalLM, or
            ``ids -> logits [batch, width, vocab]`` (logits at ``p`` predict token ``p + 1``).
        token_ids: ``[windows, width]`` real tokens (held-out text cut into windows).
        start: positions ``< start`` are context only; a decoder prefills them (1: every next token after
            the first comes from a decode step).
        batch_size: windows per call.
        vocabulary_size: checks the ids when given.

    Returns:
        ``perplexity`` and ``reference_perplexity`` (exp of the mean negative log-likelihood of the text's
        next tokens), ``perplexity_ratio``, ``kl_divergence`` (mean KL(reference || candidate) per position, in
        nats), ``same_top`` (share of positions whose argmax is the same) and ``positions`` scored.

    Example:
        >>> q = quality_measures(causal_lm, OnnxDecoderGenerator("int8"), windows)  # doctest: +SKIP
        >>> q["perplexity_ratio"], q["kl_divergence"], q["same_top"]  # doctest: +SKIP
        (1.00009, 2.1e-05, 0.9953)
    """
    ids = check_windows(token_ids, vocabulary_size, start=start)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1. Received: batch_size={batch_size!r}")
    ref_fn = reference if _is_plain_callable(reference) else teacher_forced_logits(reference, start)
    cand_fn = candidate if _is_plain_callable(candidate) else teacher_forced_logits(candidate, start)
    sums = _Sums()
    for b in range(0, len(ids), batch_size):
        chunk = ids[b: b + batch_size]
        ref, got = ref_fn(chunk), cand_fn(chunk)
        if got.shape[:2] != chunk.shape or ref.shape != got.shape:
            raise InputMismatchError(f"Logits of shape {got.shape} (reference {ref.shape}) for windows of shape "
                                     f"{chunk.shape}: expected [windows, width, vocab] from both.")
        # logits at p predict token p + 1, for p from start - 1 (the last context position) to width - 2
        pos = slice(start - 1, chunk.shape[1] - 1)
        vocab = ref.shape[-1]
        sums.add(ref[:, pos].reshape(-1, vocab), got[:, pos].reshape(-1, vocab), chunk[:, start:].reshape(-1))
    return sums.result()


def _is_plain_callable(obj) -> bool:
    return callable(obj) and not hasattr(obj, "call_with_cache") and not hasattr(obj, "stepwise_logits") \
        and not hasattr(obj, "logits")


def describe(measures: dict, reference: str = "the reference", through: str = "its decode steps") -> str:
    """One line for a report: the measures and what they were measured on."""
    return (f"on {measures['positions']} held-out next tokens (teacher-forced through {through}): perplexity "
            f"{measures['perplexity']:.4g} vs {measures['reference_perplexity']:.4g} for {reference} (ratio "
            f"{measures['perplexity_ratio']:.5f}), KL divergence {measures['kl_divergence']:.3g}, same top token "
            f"{measures['same_top']:.2%}")


def validate_quality(ctx, candidate, budget: QualityBudget, step_name: str, *, windows: int = DEFAULT_EVAL_WINDOWS,
                     what: str = "decoder", through: str = "its decode steps") -> dict | None:
    """A step's quality check on the source's held-out text: measure ``candidate`` against the source model
    (:func:`quality_measures`), note the figures, and fail the step when ``budget`` is exceeded.

    Args:
        ctx: the step's :class:`tfaccel.core.step.StepContext` (its source carries the eval windows).
        candidate: the artifact's generator (or ``ids -> logits``).
        budget: the :class:`QualityBudget` to hold.
        step_name: named in the error, with the options that loosen the budget.
        windows: how many held-out windows to score (0: none, nothing measured).
        what: how the artifact is named in the note.
        through: how its logits were computed, for the note.

    Returns:
        The measures, or None when the source has no held-out text (or ``windows`` is 0).

    Raises:
        StepError: a budget is exceeded (the message names the figure, the bound and the option).
    """
    from tfaccel.errors import StepError
    from tfaccel.generation.eval_text import eval_windows

    ids = eval_windows(ctx.source, windows) if windows else None
    if ids is None:
        return None
    measures = quality_measures(ctx.source.model, candidate, ids, vocabulary_size=ctx.source.vocab_size)
    ctx.note(f"quality {describe(measures, 'the Keras model', through)}")
    breaches = budget.breaches(measures)
    if breaches:
        opts = {"perplexity": "max_perplexity_ratio", "KL": "max_kl", "same": "min_same_top"}
        names = sorted({o for b in breaches for k, o in opts.items() if b.startswith(k)})
        raise StepError(f"Step '{step_name}': on {measures['positions']} held-out next tokens the {what}'s "
                        f"{'; '.join(breaches)}. Loosen {', '.join(f'--set {step_name}.{n}=...' for n in names)}, "
                        "or use a less lossy setting.")
    return measures
