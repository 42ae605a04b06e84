"""``tfaccel optimize MODEL --auto``: build every candidate recipe this machine can run, validate each
against the reference within an accuracy budget, time them all interleaved in one process at the
user's shapes, and keep the fastest SavedModel within the budget.

Layout of the output folder::

    OUT/
      saved_model/                 the winner: the fastest SavedModel within the budget
      fastest/                     the fastest artifact of any format, when that is not the SavedModel
                                   (only with formats="all"; e.g. an onnxruntime int8 model)
      report.md, report.json       every candidate ranked: kept, or dropped with the reason
      latency_vs_accuracy.png      the candidates' latency against their accuracy (or cosine)
      candidates/NAME/...          every candidate's artifacts, with keep_candidates=True

Like :class:`tfaccel.Pipeline`, the run works in a hidden folder beside OUT and moves it into place
only when it succeeded.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from tfaccel.auto.auto_report import AutoReport
from tfaccel.auto.budget import TimeBudget
from tfaccel.auto.build import CandidateBuilder
from tfaccel.auto.groups import Groups
from tfaccel.auto.place import place_outputs
from tfaccel.auto.plan import check_options, new_report, plan_search
from tfaccel.auto.rank import rank, time_candidates
from tfaccel.auto.recipes import BASELINE, SOURCE_BASELINE, Recipe
from tfaccel.core.chain import ChainBuilder
from tfaccel.core.eval_data import load_data_file
from tfaccel.core.files import StagedOutput
from tfaccel.core.measure import check_shapes_fit
from tfaccel.core.source import ModelSource
from tfaccel.core.validation import Reference
from tfaccel.errors import PlanError

#: The default time budget of a run, in seconds: building, validating and timing all candidates
#: (model loading before it and the final write after it take seconds more). Candidates that would
#: not fit are not tried, with the reason (see :func:`optimize_auto`).
DEFAULT_TIME_BUDGET_S = 540.0


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def optimize_auto(
    model_or_source: Any,
    out: str | os.PathLike,
    *,
    max_accuracy_drop: float = 1.0,
    shapes: Sequence[tuple[int, int]] | None = None,
    formats: str | None = None,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
    finetune_data: Any = None,
    recipes: Sequence[Recipe | str] | None = None,
    runs: int = 20,
    warmup: int = 3,
    max_seconds_per_shape: float = 30.0,
    overwrite: bool = False,
    keep_candidates: bool = False,
    memory_check: bool = True,
    log: Callable[[str], None] | None = None,
    generation: dict[str, Any] | None = None,
) -> AutoReport:
    """Find the fastest validated SavedModel for this model, machine and accuracy budget.

    A keras-hub causal LM gets the generation search instead (:func:`tfaccel.auto.generation_search.
    optimize_causal_lm`): generation artifacts timed as whole generations at ``shapes`` given as
    ``(batch, prompt tokens, new tokens)`` (or ``"1x32+64"``), judged on held-out text; ``generation`` passes
    its own options (``max_perplexity_ratio``, ``max_kl``, ``runs``, ``memory``...).

    Every recipe of :data:`tfaccel.auto.recipes.RECIPES` that this machine can run is built from the
    same source on its own branch, validated against the reference, and timed interleaved with the
    others at ``shapes``. The fastest SavedModel within the budget becomes ``OUT/saved_model``.

    Two rules save time without changing the result's meaning, and the report states each one:
    recipes that share a first step and whose remaining steps are another candidate (the pruned ones:
    ``prune-structured+int8-xla`` -> ``int8-xla``) are built fastest counterpart first, after a quick
    interleaved timing of the counterparts. Once one of them is within budget, a sibling whose
    counterpart was clearly slower (:data:`tfaccel.auto.groups.DOMINANCE_MARGIN`, quartiles apart) is not tried
    ("dominated"). Candidates that would not fit the time budget are not tried ("time budget").

    Args:
        model_or_source: a :class:`tfaccel.ModelSource`, or anything :func:`tfaccel.load_source` takes
            (an example name, a .keras file, a preset folder, a keras.Model).
        out: the output folder (created only when the run succeeds).
        max_accuracy_drop: the budget, in accuracy points below the reference on the source's labelled
            eval split (1.0 = one point). Sources without labels are judged by each chain's cosine
            tolerance instead (the loosest of its steps', e.g. 0.98 for int8).
        shapes: (batch, sequence length) pairs to time at (default: batch 1 at the source's length).
            Candidates are ranked by their geometric-mean speed-up over these shapes.
        formats: "savedmodel" (SavedModel candidates only; the default) or "all" (also ONNX, LiteRT and
            TensorRT side artifacts; the fastest of any format is written to ``OUT/fastest``). A causal LM's
            default is "all" (its decoders are ONNX).
        time_budget_s: seconds for the whole search (default :data:`DEFAULT_TIME_BUDGET_S`; None: no
            limit). The baseline is always built. Building stops when the budget minus a reserve for
            timing (10%, 15-60 s) is spent; before that, a candidate is not tried when its steps' times
            measured earlier in the run say it would not fit, and structured pruning's distillation
            stops as soon as its measured step time says it would not finish in time. The final timing
            shares what is left. The report names every candidate not tried and why.
        finetune_data: data for the recipes that fine-tune (structured pruning): an .npz path (one array
            per input, optional ``labels``), a dict of arrays or an (inputs, labels) tuple. Without it
            only a source with its own training split (minilm-bbc) gets those recipes.
        recipes: a subset of recipe names, or your own :class:`Recipe` objects (default: the table).
        runs, warmup: timed and untimed calls per candidate and shape.
        max_seconds_per_shape: stop timing a candidate at a shape after this many seconds of calls
            (less when the time budget has less left). A candidate clearly slower than the fastest one
            (see :data:`tfaccel.auto.rank.STOP_SLOWER_MARGIN`) stops after 5 timed calls; the baseline is always timed fully.
        overwrite: replace an existing ``out`` (only when the new run succeeded).
        keep_candidates: also keep every candidate's artifacts under ``OUT/candidates``.
        memory_check: refuse before any work a shape whose estimated memory exceeds what this machine
            has available (:func:`tfaccel.core.measure.check_shapes_fit`).
        log: callable receiving progress lines (default: stderr).

    Returns:
        The :class:`AutoReport` (also written as report.json / report.md).

    Raises:
        PlanError: bad options, or an unknown recipe name.
        TfaccelError: ``out`` exists (without ``overwrite``), or the baseline itself failed.

    Example:
        >>> report = optimize_auto("minilm-bbc", "auto-out", max_accuracy_drop=1.0)  # doctest: +SKIP
        >>> report.winner, report.candidate(report.winner).speedups  # doctest: +SKIP
        ('prune-structured+int8-xla', {'1x128': 2.1})
    """
    from tfaccel.sources import load_source

    log = log or _default_log
    t_run = time.perf_counter()
    source = model_or_source if isinstance(model_or_source, ModelSource) else load_source(model_or_source,
                                                                                           progress=log)
    if source.task == "causal_lm" and source.kind == "keras":  # generation artifacts, judged on held-out text
        from tfaccel.auto.generation_search import optimize_causal_lm

        return optimize_causal_lm(source, out, shapes=shapes, formats="all" if formats is None else formats,
                                  time_budget_s=time_budget_s, recipes=recipes, overwrite=overwrite,
                                  keep_candidates=keep_candidates, log=log, **(generation or {}))
    formats = formats or "savedmodel"
    shapes = check_options(max_accuracy_drop, shapes or [(1, source.default_seq)], formats, time_budget_s,
                           runs, warmup)
    staged = StagedOutput(out, overwrite=overwrite, protect=[source.path], option="out")
    staged.check()  # before any work
    if memory_check:
        check_shapes_fit(source, shapes)
    if isinstance(finetune_data, (str, os.PathLike)):  # the user's file, checked even if no recipe reads it
        load_data_file(finetune_data, source, what="fine-tuning data (--train-data)", labels="optional")
    # 1. plan: every recipe, checked; the ones that cannot run here are in the report with the reason
    baseline = SOURCE_BASELINE if source.kind == "saved_model" else BASELINE
    report = new_report(source, shapes, max_accuracy_drop=max_accuracy_drop, formats=formats,
                        time_budget_s=time_budget_s, baseline=baseline)
    planned = plan_search(source, report, shapes, formats=formats, finetune_data=finetune_data, recipes=recipes)
    skipped = [c.name for c in report.candidates if c.status == "not a candidate"]
    log(f"--auto on {source.name}: {len(planned)} candidates ({', '.join(p.name for p in planned)})"
        + (f"; not candidates here: {', '.join(skipped)}" if skipped else "") + f". Budget: {report.budget_rule}."
        + (f" Time budget {time_budget_s:g}s." if time_budget_s is not None else ""))
    runners: dict[str, Any] = {}
    with staged:
        try:
            # 2-4. group, budget, build and validate (the reference is run once, at the sample batch size, so
            # XLA-compiled candidates compile once for validation and accuracy)
            builder = ChainBuilder(source, staged.path / "candidates", log)
            eval_batch = int(next(iter(source.sample_inputs.values())).shape[0])
            reference = Reference.of(builder.reference.runner(), source, eval_batch=eval_batch)
            if reference.labelled:
                report.reference_accuracy = reference.accuracy
                log(f"  reference accuracy {reference.accuracy:.4f} on {report.eval_examples} held-out examples")
            budget = TimeBudget(time_budget_s, t_run, builder.step_seconds, n_shapes=len(shapes), warmup=warmup)
            runners = CandidateBuilder(builder, reference, budget, Groups.of(planned), report, source.make_inputs,
                                       shapes, warmup, log).run(planned)
            # 5-6. time interleaved, rank
            time_candidates(report, runners, source.make_inputs, shapes, runs=runs, warmup=warmup, log=log,
                            max_seconds=lambda left: budget.seconds_per_timing(len(runners), left, max_seconds_per_shape))
            rank(report)
            runners.clear()
            # 7. place: the winner, the fastest of any format, the report
            report.total_seconds = time.perf_counter() - t_run
            place_outputs(report, staged.path, keep_candidates=keep_candidates)
            out = staged.commit()
        finally:
            runners.clear()
    report.out_dir = str(out)
    winner = report.candidate(report.winner)
    log(f"winner: {report.winner} ({', '.join(f'{v:.2f}x at {k}' for k, v in winner.speedups.items())} vs "
        f"{baseline}); wrote {out}/saved_model, {out}/report.md, {out}/report.json")
    return report


def optimize(
    model_or_source: Any,
    out: str | os.PathLike,
    *,
    auto: bool | None = None,
    steps: Sequence[Any] | None = None,
    max_accuracy_drop: float = 1.0,
    shapes: Sequence[tuple[int, int]] | None = None,
    formats: str | None = None,
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
    overwrite: bool = False,
    **kwargs: Any,
):
    """Optimize a model: ``auto=True`` (the default without ``steps``) searches the recipe table for the
    fastest SavedModel within the accuracy budget (:func:`optimize_auto`); ``steps=[...]`` runs exactly
    those steps (:class:`tfaccel.Pipeline`).

    Args:
        model_or_source: a ModelSource or anything :func:`tfaccel.load_source` takes.
        out: the output folder.
        auto: search the recipes (default when ``steps`` is None).
        steps: step names or Step objects, instead of ``auto``.
        max_accuracy_drop, formats, time_budget_s: see :func:`optimize_auto` (auto only).
        shapes: (batch, sequence length) pairs to measure at.
        overwrite: replace an existing ``out`` on success.
        **kwargs: more :func:`optimize_auto` options (auto) or :class:`tfaccel.Pipeline` options (steps).

    Returns:
        An :class:`AutoReport` (auto) or a :class:`tfaccel.core.report.Report` (steps).

    Example:
        >>> report = tfaccel.optimize("minilm-bbc", "out", max_accuracy_drop=1.0)  # doctest: +SKIP
        >>> report.final_saved_model_path  # doctest: +SKIP
        '/abs/out/saved_model'
    """
    from tfaccel.pipeline import Pipeline
    from tfaccel.sources import load_source

    if auto is None:
        auto = steps is None
    if auto and steps is not None:
        raise PlanError("Pass either auto=True (search the recipes) or steps=[...] (run those steps), not both.")
    if auto:
        return optimize_auto(model_or_source, out, max_accuracy_drop=max_accuracy_drop, shapes=shapes,
                             formats=formats, time_budget_s=time_budget_s, overwrite=overwrite, **kwargs)
    if not steps:
        raise PlanError("auto=False needs steps=[...], e.g. steps=['export', 'xla'].")
    source = model_or_source if isinstance(model_or_source, ModelSource) else load_source(model_or_source)
    pipe = Pipeline(steps, shapes=shapes or [(1, source.default_seq)], **kwargs)
    return pipe.run(source, out, overwrite=overwrite)
