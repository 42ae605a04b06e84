"""``tfaccel optimize MODEL --auto`` for a keras-hub causal LM: the candidates are generation artifacts, timed as
whole greedy generations and judged on held-out text.

The phases are those of the other ``--auto`` (:mod:`tfaccel.auto.search`), on generation:

1. plan: every recipe of :data:`GENERATION_RECIPES` this machine and source allow (GPTQ / AWQ need text to
   calibrate on), its steps made and checked by :meth:`tfaccel.Pipeline.plan`;
2. build and validate, shared prefixes once (:class:`tfaccel.core.chain.ChainBuilder`), within the time budget
   (:class:`tfaccel.auto.budget.TimeBudget`). Each step measures its artifact on the source's held-out text
   (perplexity ratio, KL divergence, same top token, teacher-forced through its own decode steps,
   :mod:`tfaccel.generation.quality`); a candidate beyond ``max_perplexity_ratio`` / ``max_kl`` is dropped.
   Without held-out text the steps' own next-token cosine bounds decide;
3. time: whole greedy generations at every shape (``BATCHxPROMPT+NEW``), interleaved with keras-hub's own
   ``generate`` (the baseline) by :func:`tfaccel.core.timer.interleave`; tokens/s and the speed-up over it;
4. rank by the geometric-mean speed-up; memory of the kept ones in a fresh process
   (:func:`tfaccel.generation.memory.generation_memory`);
5. place: ``OUT/saved_model`` the fastest generate SavedModel within the budget (it serves ``generate`` /
   ``generate_greedy`` under TF Serving and ``saved_model_cli``), ``OUT/fastest`` the fastest artifact of any
   format, and report.md / report.json / a tokens/s-against-perplexity-ratio plot.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel.auto.auto_report import (
    DROPPED,
    FAILED,
    KEPT,
    NOT_A_CANDIDATE,
    NOT_TRIED,
    AutoCandidate,
    AutoReport,
    markdown_tail,
    save_plot,
)
from tfaccel.auto.rank import score_and_number
from tfaccel.auto.recipes import Recipe, StepSpec
from tfaccel.errors import OverBudget, PlanError, TfaccelError, first_line

BASELINE = "keras-hub generate"
#: What a user gets without tfaccel: keras-hub's ``generate``; every speed-up is relative to it.
DEFAULT_SHAPES = ((1, 32, 64),)
#: Seconds for the whole causal-LM search by default (building, validating, timing, memory).
DEFAULT_TIME_BUDGET_S = 540.0
PLOT_NAME = "tokens_per_s_vs_perplexity.png"
#: GPTQ / AWQ calibration windows in --auto (Keras walks them one at a time per block; 64 keeps GPTQ on
#: gpt2-bbc near a minute on 2 cores).
AUTO_CALIBRATION_SAMPLES = 64

S = StepSpec.of
_FREE = {"max_perplexity_ratio": None, "max_kl": None}  # --auto applies its own budget to the last step
_SKIP = {"quality_windows": 0}  # a step inside a chain: its artifact is not a candidate, not scored


def _recipe(name: str, steps: Sequence[StepSpec], description: str, fmt: str) -> Recipe:
    return Recipe(name, tuple(steps), description, format=fmt)


#: The causal-LM candidates, in build order (cheap and often fastest first; GPTQ / AWQ, minutes of calibration,
#: last). Every decoder chain starts with the same ``onnx-decoder`` step, built once.
GENERATION_RECIPES: tuple[Recipe, ...] = (
    _recipe("onnx-decoder", [S("onnx-decoder", **_FREE)], "onnxruntime KV-cache decoder, float32 (native graph "
            "where the family has one)", "onnx"),
    _recipe("ort-decoder-int8", [S("onnx-decoder", **_FREE), S("ort-decoder-int8", **_FREE)],
            "8-bit weight blocks (MatMulNBits, int8 dot products)", "onnx"),
    _recipe("ort-decoder-int4", [S("onnx-decoder", **_FREE), S("ort-decoder-int4", **_FREE)],
            "4-bit weight blocks of 32 (round to nearest), 8-bit LM head", "onnx"),
    _recipe("generate", [S("generate", **_FREE)], "SavedModel with the decode loop and KV cache inside, float32",
            "savedmodel"),
    _recipe("generate-int8", [S("generate", weights="int8", **_FREE)], "generate SavedModel with Keras int8 "
            "weights", "savedmodel"),
    _recipe("gptq-decoder", [S("gptq", num_samples=AUTO_CALIBRATION_SAMPLES, **_SKIP), S("onnx-decoder", **_SKIP),
                             S("ort-decoder-int8", block_size=32, **_FREE)],
            "Keras GPTQ 4-bit weights carried into MatMulNBits, 8-bit LM head", "onnx"),
    _recipe("awq-decoder", [S("awq", num_samples=AUTO_CALIBRATION_SAMPLES, **_SKIP), S("onnx-decoder", **_SKIP),
                            S("ort-decoder-int8", block_size=32, **_FREE)],
            "Keras AWQ 4-bit weights carried into MatMulNBits, 8-bit LM head", "onnx"),
)


def parse_generation_shape(text: str) -> tuple[int, int, int]:
    """``"8x32+64"`` -> (8, 32, 64): batch x prompt tokens + new tokens.

    Example:
        >>> parse_generation_shape("1x32+64")
        (1, 32, 64)
    """
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*\+\s*(\d+)\s*", str(text).lower())
    if not m or min(int(g) for g in m.groups()) < 1:
        raise PlanError(f"A generation shape is BATCHxPROMPT+NEW with positive integers, e.g. 1x32+64 or 8x32+64. "
                        f"Received: {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def shape_key(shape: Sequence[int]) -> str:
    b, p, n = shape
    return f"{b}x{p}+{n}"


@dataclasses.dataclass
class GenerationCandidate(AutoCandidate):
    """A causal-LM candidate: :class:`AutoCandidate` plus what generation is judged by.

    Attributes:
        tokens_per_s: shape ("1x32+64") -> new tokens per second (whole generations, p50).
        quality: perplexity, ``perplexity_ratio``, ``kl_divergence``, ``same_top`` on held-out text (None
            without any).
        next_token_cosine: lowest next-token logits cosine with the Keras model on the sample prompts.
        memory: ``load_rss_mb`` and ``peak_rss_mb`` of a fresh process generating once (first shape).
    """

    tokens_per_s: dict[str, float] = dataclasses.field(default_factory=dict)
    quality: dict[str, Any] | None = None
    next_token_cosine: float | None = None
    memory: dict[str, float] | None = None


@dataclasses.dataclass
class GenerationAutoReport(AutoReport):
    """The causal-LM ``--auto`` report (shapes are ``[batch, prompt, new]``)."""

    max_perplexity_ratio: float | None = None
    max_kl: float | None = None
    eval_windows: int | None = None

    def table_lines(self) -> list[str]:
        return generation_table(self)

    def to_markdown(self) -> str:
        return generation_markdown(self)

    def write_plot(self, folder: Path) -> str | None:
        """Tokens/s against the perplexity ratio in ``folder`` (:func:`write_generation_plot`, PLOT_NAME)."""
        return write_generation_plot(self, folder / PLOT_NAME)


def _log_default(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def optimize_causal_lm(
    source,
    out,
    *,
    shapes: Sequence[Sequence[int]] | None = None,
    max_perplexity_ratio: float | None = 1.01,
    max_kl: float | None = 0.01,
    formats: str = "all",
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
    recipes: Sequence[Recipe | str] | None = None,
    runs: int = 5,
    warmup: int = 1,
    max_seconds_per_shape: float = 30.0,
    memory: bool = True,
    overwrite: bool = False,
    keep_candidates: bool = False,
    log: Callable[[str], None] | None = None,
) -> GenerationAutoReport:
    """The fastest generation artifacts of a keras-hub causal LM within a quality budget (module docstring).

    Args:
        source: a causal-LM :class:`tfaccel.ModelSource` (its held-out text, if any, is the quality data).
        out: the output folder (created only when the run succeeds).
        shapes: ``(batch, prompt tokens, new tokens)`` triples (default ``1x32+64``); candidates are ranked by the
            geometric mean of their speed-ups over keras-hub's ``generate`` at these shapes.
        max_perplexity_ratio, max_kl: the budget on held-out text (None: not enforced). Without held-out text,
            each step's own next-token cosine bound decides.
        formats: "all" (decoders compete for ``OUT/fastest``) or "savedmodel" (generate SavedModels only).
        time_budget_s: seconds for the search (None: no limit); candidates that would not fit are not tried.
        recipes: a subset of :data:`GENERATION_RECIPES` names, or Recipe objects.
        runs, warmup, max_seconds_per_shape: timed / untimed whole generations per candidate and shape, and the
            seconds of timed generations a candidate may spend at a shape.
        memory: measure the kept candidates' memory in a fresh process.
        overwrite, keep_candidates, log: as for :func:`tfaccel.auto.optimize_auto`.

    Returns:
        The :class:`GenerationAutoReport` (also written to ``out``).

    Raises:
        PlanError: bad options or shapes, or the source is no causal LM.
        TfaccelError: ``out`` exists, or no generate SavedModel was built within the budget.

    Example:
        >>> report = optimize_causal_lm(load_source("gpt2-bbc"), "out", shapes=[(1, 32, 64)])  # doctest: +SKIP
        >>> report.winner, report.fastest_artifact  # doctest: +SKIP
        ('generate', 'ort-decoder-int8')
    """
    from tfaccel.auto.budget import TimeBudget
    from tfaccel.compat import capabilities
    from tfaccel.core.chain import ChainBuilder
    from tfaccel.core.files import StagedOutput

    log = log or _log_default
    t_run = time.perf_counter()
    if source.task != "causal_lm" or source.kind != "keras":
        raise PlanError(f"The generation search needs a keras-hub causal LM; {source.name} is a {source.task} "
                        f"{source.kind}.")
    shapes = _check_shapes(shapes or DEFAULT_SHAPES, source)
    for name, v in (("max_perplexity_ratio", max_perplexity_ratio), ("max_kl", max_kl)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise PlanError(f"{name} must be a number >= 0 or None. Received: {name}={v!r}")
    if formats not in ("all", "savedmodel"):
        raise PlanError(f"formats must be 'all' or 'savedmodel'. Received: formats={formats!r}")
    if not isinstance(runs, int) or runs < 3:
        raise PlanError(f"runs must be an int >= 3. Received: runs={runs!r}")
    staged = StagedOutput(out, overwrite=overwrite, protect=[source.path])
    staged.check()
    report = _new_report(source, shapes, max_perplexity_ratio, max_kl, formats, time_budget_s)
    planned = _plan(source, report, shapes, formats, recipes, capabilities())
    log(f"--auto on {source.name} (causal LM): {len(planned)} candidates ({', '.join(n for n, _ in planned)}) against "
        f"{BASELINE} at {', '.join(shape_key(s) for s in shapes)}. Budget: {report.budget_rule}."
        + (f" Time budget {time_budget_s:g}s." if time_budget_s is not None else ""))
    with staged:
        builder = ChainBuilder(source, staged.path / "candidates", log)
        budget = TimeBudget(time_budget_s, t_run, builder.step_seconds)
        generators = _build_and_validate(planned, builder, budget, report, staged.path, log)
        _time(report, source, generators, shapes, runs=runs, warmup=warmup,
              max_seconds=budget.seconds_per_timing(len(generators) + 1, len(shapes), max_seconds_per_shape), log=log)
        generators.clear()
        _rank(report)
        if memory:
            _memory(report, staged.path, shapes[0], source, budget, log)
        from tfaccel.auto.place import place_outputs

        report.total_seconds = time.perf_counter() - t_run
        place_outputs(report, staged.path, keep_candidates=keep_candidates)
        out = staged.commit()
    report.out_dir = str(out)
    w = report.candidate(report.winner)
    log(f"saved_model: {report.winner} ({', '.join(f'{v:.2f}x at {k}' for k, v in w.speedups.items())} vs {BASELINE})"
        + (f"; fastest of any format: {report.fastest_artifact}" if report.fastest_artifact != report.winner else "")
        + f". Wrote {out}/saved_model, {out}/report.md")
    return report


def _check_shapes(shapes, source) -> list[tuple[int, int, int]]:
    out = []
    for s in shapes:
        s = parse_generation_shape(s) if isinstance(s, str) else tuple(s)
        if len(s) != 3 or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in s):
            raise PlanError(f"Generation shapes are (batch, prompt tokens, new tokens) triples of positive ints, or "
                            f"'BATCHxPROMPT+NEW' strings. Received: {s!r}")
        limit = source.max_sequence_length
        if limit and s[1] + s[2] > limit:
            raise PlanError(f"Shape {shape_key(s)}: {s[1] + s[2]} tokens exceed the model's maximum length {limit}.")
        out.append(tuple(int(v) for v in s))
    return out


def _new_report(source, shapes, max_ratio, max_kl, formats, time_budget_s) -> GenerationAutoReport:
    from tfaccel.compat import capabilities
    from tfaccel.generation.eval_text import eval_windows
    from tfaccel.generation.quality import DEFAULT_EVAL_WINDOWS

    windows = eval_windows(source, DEFAULT_EVAL_WINDOWS)
    if windows is not None:
        parts = [f"perplexity at most {max_ratio:g}x the Keras model's" if max_ratio is not None else "",
                 f"KL divergence at most {max_kl:g}" if max_kl is not None else ""]
        rule = (" and ".join(p for p in parts if p) or "no bound") + (
            f" on {len(windows)} held-out windows ({len(windows) * (windows.shape[1] - 1)} next tokens, teacher-forced "
            "through each artifact's own decode steps)")
    else:
        rule = ("no held-out text (pass --eval-texts): each artifact's next-token logits must stay within its steps' "
                "cosine bound of the Keras model's on the sample prompts")
    return GenerationAutoReport(
        source=source.name, source_description=source.description, task=source.task,
        shapes=[list(s) for s in shapes], max_accuracy_drop=0.0, budget_rule=rule, formats=formats,
        capabilities=capabilities().to_dict(), baseline=BASELINE, time_budget_s=time_budget_s,
        max_perplexity_ratio=max_ratio, max_kl=max_kl, eval_windows=None if windows is None else len(windows))


def _plan(source, report, shapes, formats, recipes, caps) -> list[tuple[str, list]]:
    """Every recipe made, checked and planned; the ones that cannot run are in the report with the reason."""
    from tfaccel.pipeline import Pipeline

    table = {r.name: r for r in GENERATION_RECIPES}
    chosen = []
    for r in recipes if recipes is not None else GENERATION_RECIPES:
        if isinstance(r, str) and r not in table:
            raise PlanError(f"Unknown causal-LM recipe {r!r}. Recipes: {', '.join(table)}.")
        chosen.append(table[r] if isinstance(r, str) else r)
    report.candidates.append(GenerationCandidate(name=BASELINE, description="keras-hub's own greedy generate on the "
                                                 "Keras model (the baseline)", format="keras", status=NOT_TRIED))
    planned = []
    for r in chosen:
        cand = GenerationCandidate(name=r.name, description=r.description, format=r.format,
                                   steps=[s.describe() for s in r.steps], status=NOT_TRIED)
        report.candidates.append(cand)
        if formats == "savedmodel" and r.format != "savedmodel":
            cand.status, cand.reason = NOT_A_CANDIDATE, f"serves {r.format} (formats='all' tries it)"
            continue
        ok, reason = r.check(caps)
        steps = r.make_steps()
        reason = reason or next((why for s in steps if (why := s.unavailable(caps))), "")
        if not ok or reason:
            cand.status, cand.reason = NOT_A_CANDIDATE, reason
            continue
        try:
            # plan() checks every step here; the export it appends after a chain of side artifacts (a decoder
            # leaves the Keras model the latest model) is not part of a generation candidate
            steps = Pipeline(steps, shapes=[(b, p) for b, p, _ in shapes], measure=False,
                             log=lambda _m: None).plan(source)[:len(steps)]
        except TfaccelError as exc:
            cand.status, cand.reason = NOT_A_CANDIDATE, f"cannot run here: {first_line(exc)}"
            continue
        planned.append((r.name, steps))
    return planned


def _build_and_validate(planned, builder, budget, report, work: Path, log) -> dict[str, Any]:
    """Build each candidate (shared prefixes once), read its quality from its last step, judge it against the
    budget; returns name -> generator for the kept and dropped ones (both are timed, the report shows both)."""
    from tfaccel.generation import load_generator
    from tfaccel.generation.quality import QualityBudget

    quality_budget = QualityBudget(max_perplexity_ratio=report.max_perplexity_ratio, max_kl=report.max_kl)
    generators: dict[str, Any] = {}
    for i, (name, steps) in enumerate(planned, 1):
        cand = report.candidate(name)
        why = budget.not_tried_reason(builder.unbuilt(steps))
        if why:
            cand.status, cand.reason = NOT_TRIED, why
            log(f"[{i}/{len(planned)}] {name}: not tried: {why}")
            continue
        log(f"[{i}/{len(planned)}] {name}: {' -> '.join(cand.steps)}  ({time.perf_counter() - budget.start:.0f}s elapsed)")
        try:
            built = builder.build(name, steps, budget.deadline_for(steps))
            art = built.artifact
            generators[name] = load_generator(art.path)
        except OverBudget as exc:
            cand.status, cand.reason = NOT_TRIED, f"time budget of {budget.total_s:g}s: {exc}"
            log(f"  not tried: {cand.reason}")
            continue
        except Exception as exc:
            cand.status, cand.reason = FAILED, first_line(exc)
            log(f"  FAILED: {cand.reason}")
            continue
        finally:
            builder.forget_keras(set())
        cand.kind, cand.build_seconds, cand.notes = art.kind, built.seconds, built.notes
        cand.size_bytes = art.size_bytes()
        path = Path(art.path)
        cand.path = str(path.relative_to(work)) if path.is_relative_to(work) else str(path)
        cand.quality = art.info.get("quality")
        cand.next_token_cosine = art.info.get("next_token_cosine_min")
        breaches = quality_budget.breaches(cand.quality) if cand.quality else []
        cand.status = DROPPED if breaches else KEPT
        cand.reason = "over budget: " + "; ".join(breaches) if breaches else ""
        q = cand.quality
        log(f"  built in {built.seconds:.0f}s, {cand.size_bytes / 1e6:.1f} MB"
            + (f", perplexity ratio {q['perplexity_ratio']:.5f}, KL {q['kl_divergence']:.3g}, same top "
               f"{q['same_top']:.2%}" if q else "") + (f": DROPPED ({cand.reason})" if breaches else ": within budget"))
    return generators


def _prompts(source, batch: int, prompt: int) -> np.ndarray:
    """Real text where the source has held-out windows (the first ``prompt`` tokens of each), else random ids."""
    from tfaccel.generation.eval_text import eval_windows

    held = eval_windows(source)
    if held is not None and held.shape[1] >= prompt:
        rows = [held[i % len(held), :prompt] for i in range(batch)]
        return np.ascontiguousarray(np.stack(rows)).astype(np.int32)
    rng = np.random.default_rng(0)
    return rng.integers(1, source.vocab_size or 100, size=(batch, prompt)).astype(np.int32)


def _time(report, source, generators: dict[str, Any], shapes, *, runs, warmup, max_seconds, log) -> None:
    """Whole greedy generations, interleaved with keras-hub's ``generate``, at every shape."""
    from tfaccel.core.timer import interleave
    from tfaccel.xla.generate_export import keras_hub_greedy

    model = source.model
    for shape in shapes:
        b, p, n = shape
        ids = _prompts(source, b, p)
        mask = np.ones_like(ids)
        calls = {BASELINE: lambda ids=ids, mask=mask, n=n: keras_hub_greedy(model, ids, mask, n)}
        for name, gen in generators.items():
            calls[name] = lambda gen=gen, ids=ids, mask=mask, n=n: gen.generate(ids, n, -1, padding_mask=mask)
        log(f"timing {len(calls)} ways to generate at {shape_key(shape)} interleaved ({runs} whole generations each, "
            f"at most {max_seconds:.3g}s each; clearly slower ones stop early)")
        t = interleave(calls, runs=runs, warmup=warmup, max_seconds=max_seconds, stop_slower=1.2, min_runs=3,
                       keep=[BASELINE], batch=b * n, log=log)
        if BASELINE in t.errors:
            raise TfaccelError(f"Timing keras-hub's generate at {shape_key(shape)} failed: {t.errors[BASELINE]}")
        base = t.measurements[BASELINE].p50_ms
        for name, err in t.errors.items():
            c = report.candidate(name)
            c.status, c.reason = DROPPED, f"generation at {shape_key(shape)} failed: {err}"
            generators.pop(name, None)
        for name, m in t.measurements.items():
            c = report.candidate(name)
            if name == BASELINE:
                c.status = KEPT
            md = m.to_dict()
            md["shape"] = shape_key(shape)
            c.measurements.append(md)
            c.tokens_per_s[shape_key(shape)] = b * n / (m.p50_ms / 1000)
            c.speedups[shape_key(shape)] = base / m.p50_ms
            if name in t.stopped:
                c.notes.append(f"timing at {shape_key(shape)}: {t.stopped[name]}")
            log(f"  {name:22s} {b * n / (m.p50_ms / 1000):8.1f} tokens/s  {base / m.p50_ms:5.2f}x  [{c.status}]")


def _rank(report) -> None:
    score_and_number(report)
    kept = [c for c in report.candidates if c.status == KEPT and c.score is not None and c.name != BASELINE]
    saved_models = [c for c in kept if c.kind == "saved_model"]
    if not saved_models:
        raise TfaccelError("No generate SavedModel was built within the budget, so there is no OUT/saved_model: "
                           + "; ".join(f"{c.name}: {c.status} {c.reason}".strip() for c in report.candidates
                                       if c.format == "savedmodel") + ". Raise --time-budget or the quality budget.")
    report.winner = max(saved_models, key=lambda c: c.score).name
    report.fastest_artifact = max(kept, key=lambda c: c.score).name


def _memory(report, work: Path, shape, source, budget, log) -> None:
    """RSS after load and peak RSS during one generation, in a fresh process, for each kept candidate."""
    from tfaccel.generation.memory import generation_memory

    b, p, n = shape
    for c in report.ranked():
        if c.status != KEPT or not c.path or c.name == BASELINE:
            continue
        if budget.total_s is not None and time.perf_counter() > budget.start + budget.total_s:
            c.notes.append("memory not measured: the time budget was spent")
            continue
        try:
            c.memory = generation_memory(work / c.path, batch=b, prompt_tokens=p, new_tokens=n,
                                         vocabulary_size=source.vocab_size or 1000)
            log(f"  {c.name}: fresh process RSS after load {c.memory['load_rss_mb']:.0f} MB, peak "
                f"{c.memory['peak_rss_mb']:.0f} MB")
        except TfaccelError as exc:
            c.notes.append(f"memory not measured: {first_line(exc)}")


# --------------------------------------------------------------------------------------------------
# the report


def generation_table(report: GenerationAutoReport) -> list[str]:
    """The ranked candidates as Markdown lines: tokens/s and speed-up per shape, quality, size, memory."""
    keys = [shape_key(s) for s in report.shapes]
    head = ["rank", "candidate", "format"]
    for k in keys:
        head += [f"tokens/s ({k})", f"speed-up ({k})"]
    head += ["perplexity ratio", "KL", "same top", "next-token cosine", "size MB", "RSS after load MB",
             "peak RSS MB", "build s", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in report.ranked():
        mark = " **(saved_model)**" if c.name == report.winner else ""
        mark += " **(fastest)**" if c.name == report.fastest_artifact and c.name != report.winner else ""
        row = [str(c.rank) if c.rank else "-", f"`{c.name}`{mark}", c.format]
        for k in keys:
            tps, sp = getattr(c, "tokens_per_s", {}).get(k), c.speedups.get(k)
            row += [f"{tps:.1f}" if tps else "-", f"{sp:.2f}x" if sp else "-"]
        q = getattr(c, "quality", None) or {}
        row += [f"{q['perplexity_ratio']:.5f}" if q else "-", f"{q['kl_divergence']:.2e}" if q else "-",
                f"{q['same_top']:.2%}" if q else "-"]
        cos = getattr(c, "next_token_cosine", None)
        mem = getattr(c, "memory", None) or {}
        row += [f"{cos:.5f}" if cos is not None else "-", f"{c.size_bytes / 1e6:.1f}" if c.size_bytes else "-",
                f"{mem['load_rss_mb']:.0f}" if mem else "-", f"{mem['peak_rss_mb']:.0f}" if mem else "-",
                f"{c.build_seconds:.0f}" if c.build_seconds is not None else "-",
                (c.status + (f": {c.reason}" if c.reason else "")).replace("|", "\\|")]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def generation_markdown(report: GenerationAutoReport) -> str:
    lines = [f"# tfaccel --auto: {report.source} (causal LM)", "", report.source_description.strip(), ""]
    if report.winner:
        w = report.candidate(report.winner)
        lines.append(f"**saved_model: `{w.name}`** ({' -> '.join(w.steps)}): "
                     + ", ".join(f"{w.tokens_per_s[k]:.1f} tokens/s ({v:.2f}x) at {k}" for k, v in w.speedups.items())
                     + f" vs `{BASELINE}`, written to `{report.final_saved_model}` (serves generate / generate_greedy).")
    if report.fastest_artifact and report.fastest_artifact != report.winner:
        f = report.candidate(report.fastest_artifact)
        lines.append(f"**Fastest of any format: `{f.name}`** ({f.format}; "
                     + ", ".join(f"{f.tokens_per_s[k]:.1f} tokens/s ({v:.2f}x) at {k}" for k, v in f.speedups.items())
                     + f"): `{report.fastest_artifact_path}` (run it with `tfaccel generate`).")
    lines += ["", f"Budget: {report.budget_rule}.", ""] + generation_table(report)
    lines += ["", f"Every candidate was timed as whole greedy generations (BATCHxPROMPT+NEW: the batch, the prompt "
              f"tokens, the new tokens), interleaved round-robin with `{BASELINE}` in one process; tokens/s = new tokens "
              "/ the median generation's wall time; candidates are ranked by the geometric mean of their speed-ups. "
              "Perplexity ratio, KL divergence and same top token are against the Keras model on held-out text; "
              "memory is a fresh process loading the artifact and generating once at the first shape."]
    return "\n".join(lines + markdown_tail(report, "tokens/s vs perplexity ratio"))


def write_generation_plot(report: GenerationAutoReport, path: str | Path) -> str | None:
    """Tokens/s at the first shape against the perplexity ratio (or next-token cosine without held-out text)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    key = shape_key(report.shapes[0])
    points = []
    for c in report.candidates:
        tps = getattr(c, "tokens_per_s", {}).get(key)
        q = getattr(c, "quality", None)
        y = 1.0 if c.name == BASELINE else (q["perplexity_ratio"] if q else getattr(c, "next_token_cosine", None))
        if tps and y is not None:
            points.append((c, tps, y))
    if not points:
        return None
    use_ppl = report.eval_windows is not None
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colors = {KEPT: "tab:green", DROPPED: "tab:red"}
    for c, x, y in points:
        ax.scatter(x, y, color=colors.get(c.status, "tab:gray"), s=40, zorder=3,
                   label=c.status if c.status not in ax.get_legend_handles_labels()[1] else None)
        if c.name in (report.winner, report.fastest_artifact):
            ax.scatter(x, y, s=220, facecolors="none", edgecolors="black", linewidths=1.5, zorder=4)
        ax.annotate(c.name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if use_ppl and report.max_perplexity_ratio is not None:
        ax.axhline(report.max_perplexity_ratio, color="tab:red", linestyle="--", linewidth=1, label="budget")
    ax.set_ylabel("perplexity ratio to the Keras model (held-out text)" if use_ppl else
                  "lowest next-token cosine vs the Keras model")
    ax.set_xlabel(f"tokens/s at {key} (right is faster)")
    ax.set_title(f"tfaccel --auto: {report.source}")
    return save_plot(fig, ax, path)
