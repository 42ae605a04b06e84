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

import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tfaccel.auto.auto_report import (
    DROPPED,
    FAILED,
    KEPT,
    NOT_A_CANDIDATE,
    NOT_TRIED,
    AutoCandidate,
    AutoReport,
)
from tfaccel.auto.recipes import (
    BASELINE,
    FORMAT_CHOICES,
    SOURCE_BASELINE,
    Recipe,
    plan_candidates,
    step_key,
)
from tfaccel.core.artifact import Artifact, kind_name
from tfaccel.core.files import StagedOutput, link_tree
from tfaccel.core.source import ModelSource
from tfaccel.core.timer import InterleavedTiming, time_interleaved
from tfaccel.core.validation import Tolerance, classification_accuracy, compare_outputs
from tfaccel.errors import PlanError, TfaccelError, ValidationError

#: The default time budget of a run, in seconds: building, validating and timing all candidates
#: (model loading before it and the final write after it take seconds more). Candidates that would
#: not fit are not tried, with the reason (see :func:`optimize_auto`).
DEFAULT_TIME_BUDGET_S = 540.0
#: In the final timing, stop timing a candidate that is clearly slower than the fastest one (its
#: fastest quarter of calls slower than the fastest's slowest quarter, and a median over this factor).
STOP_SLOWER_MARGIN = 1.2
#: A candidate whose counterpart (the same chain without its first step) was clearly slower than a
#: sibling's counterpart by this factor, in a quick timing, is dominated (see :func:`optimize_auto`).
DOMINANCE_MARGIN = 1.1


def _default_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def chain_tolerance(steps: Sequence[Any]) -> Tolerance:
    """The output bound of a chain of steps when no labelled data judges it: the loosest cosine of
    its steps, and the sum of their max-abs-diff limits (unchecked if any step leaves it unchecked)."""
    cosines = [s.tolerance.min_cosine for s in steps if s.tolerance.min_cosine is not None]
    diffs = [s.tolerance.max_abs_diff for s in steps]
    return Tolerance(max_abs_diff=None if any(d is None for d in diffs) else float(sum(diffs)),
                     min_cosine=min(cosines) if cosines else None, max_accuracy_drop=None)


def _check_options(max_accuracy_drop, shapes, formats, time_budget_s, runs, warmup) -> list[tuple[int, int]]:
    ok = isinstance(max_accuracy_drop, (int, float)) and not isinstance(max_accuracy_drop, bool)
    if not ok or not math.isfinite(max_accuracy_drop) or max_accuracy_drop < 0:
        raise PlanError(f"max_accuracy_drop is in accuracy points (1.0 = one point) and must be a number >= 0. "
                        f"Received: max_accuracy_drop={max_accuracy_drop!r}")
    if formats not in FORMAT_CHOICES:
        raise PlanError(f"formats must be one of {FORMAT_CHOICES}. Received: formats={formats!r}")
    if time_budget_s is not None and (not isinstance(time_budget_s, (int, float)) or time_budget_s < 0):
        raise PlanError(f"time_budget_s must be seconds >= 0 or None. Received: time_budget_s={time_budget_s!r}")
    if not isinstance(runs, int) or runs < 3:
        raise PlanError(f"runs must be an int >= 3 (a median needs a few calls). Received: runs={runs!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise PlanError(f"warmup must be an int >= 1 (the first call traces/compiles). Received: warmup={warmup!r}")
    out = []
    for s in shapes:
        if len(tuple(s)) != 2 or not all(isinstance(v, int) and v >= 1 for v in s):
            raise PlanError(f"shapes are (batch, sequence length) pairs of positive ints. Received: {s!r}")
        out.append((int(s[0]), int(s[1])))
    return out


class _Builder:
    """Builds recipes' steps with shared prefixes: two recipes starting with the same steps (same
    settings) reuse the artifacts, e.g. prune-structured once for prune-structured+xla and +int8."""

    def __init__(self, source: ModelSource, work: Path, log: Callable[[str], None]):
        self.source, self.work, self.log = source, work, log
        src = source
        self.reference = Artifact.of_source(src)
        self.cache: dict[tuple[str, ...], tuple[Artifact, float, list[str]] | BaseException] = {}
        #: step name -> seconds its last build took in this run (what later candidates are estimated by)
        self.step_seconds: dict[str, float] = {}

    def unbuilt(self, steps: list, keys: list[str]) -> list:
        """The steps of a chain whose artifacts are not built (or cached) yet."""
        return [s for k, s in enumerate(steps) if tuple(keys[: k + 1]) not in self.cache]

    def build(self, name: str, steps: list, keys: list[str],
              deadline_for: Callable[[int], float | None] = lambda k: None) -> tuple[Artifact, float, list[str]]:
        """The artifact after ``steps``; returns (artifact, seconds of all its steps, notes).
        ``deadline_for(k)`` is the ``time.perf_counter()`` by which step ``k`` should be done (or None):
        steps that can stop long work (distillation) stop when they would not make it."""
        from tfaccel.core.step import StepContext
        from tfaccel.pruning.distillation import DistillationOverBudget

        artifact, seconds, notes = self.reference, 0.0, []
        for k, step in enumerate(steps):
            prefix = tuple(keys[: k + 1])
            cached = self.cache.get(prefix)
            if isinstance(cached, DistillationOverBudget):
                raise cached
            if isinstance(cached, BaseException):
                raise TfaccelError(f"step '{step.name}' failed earlier in this run: {_first_line(cached)}")
            if cached is not None:
                artifact, s, n = cached
                seconds += s
                notes = list(n)
                continue
            if step.consumes != artifact.kind:
                raise PlanError(f"step '{step.name}' needs a {kind_name(step.consumes)}, the step before gives a "
                                f"{kind_name(artifact.kind)}")
            stage = self.work / "candidates" / name / f"{k + 1:02d}-{step.name}"
            stage.mkdir(parents=True)
            own: list[str] = []
            ctx = StepContext(source=self.source, stage_dir=stage, log=self.log, notes=own, deadline=deadline_for(k))
            self.log(f"  {step.name}: {kind_name(step.consumes)} -> {kind_name(step.produces)}")
            t0 = time.perf_counter()
            try:
                artifact = step.apply(artifact, ctx)
            except BaseException as exc:
                self.cache[prefix] = exc
                shutil.rmtree(stage, ignore_errors=True)
                raise
            s = time.perf_counter() - t0
            self.step_seconds[step.name] = s
            seconds += s
            notes = notes + [f"{step.name}: {n}" for n in own]
            self.cache[prefix] = (artifact, s, list(notes))
        return artifact, seconds, notes

    def forget_keras(self, still_needed: set[tuple[str, ...]]) -> None:
        """Drop in-memory Keras models no later recipe builds on (their files stay on disk)."""
        for prefix, value in list(self.cache.items()):
            if isinstance(value, tuple) and value[0].kind == "keras" and prefix not in still_needed:
                del self.cache[prefix]


def optimize_auto(
    model_or_source: Any,
    out: str | os.PathLike,
    *,
    max_accuracy_drop: float = 1.0,
    shapes: Sequence[tuple[int, int]] | None = None,
    formats: str = "savedmodel",
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S,
    finetune_data: Any = None,
    recipes: Sequence[Recipe | str] | None = None,
    runs: int = 20,
    warmup: int = 3,
    max_seconds_per_shape: float = 30.0,
    overwrite: bool = False,
    keep_candidates: bool = False,
    log: Callable[[str], None] | None = None,
) -> AutoReport:
    """Find the fastest validated SavedModel for this model, machine and accuracy budget.

    Every recipe of :data:`tfaccel.auto.recipes.RECIPES` that this machine can run is built from the
    same source on its own branch, validated against the reference, and timed interleaved with the
    others at ``shapes``. The fastest SavedModel within the budget becomes ``OUT/saved_model``.

    Two rules save time without changing the result's meaning, and the report states each one:
    recipes that share a first step and whose remaining steps are another candidate (the pruned ones:
    ``prune-structured+int8-xla`` -> ``int8-xla``) are built fastest counterpart first, after a quick
    interleaved timing of the counterparts. Once one of them is within budget, a sibling whose
    counterpart was clearly slower (:data:`DOMINANCE_MARGIN`, quartiles apart) is not tried
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
        formats: "savedmodel" (SavedModel candidates only) or "all" (also ONNX, LiteRT and TensorRT
            side artifacts; the fastest of any format is written to ``OUT/fastest``).
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
            (see :data:`STOP_SLOWER_MARGIN`) stops after 5 timed calls; the baseline is always timed fully.
        overwrite: replace an existing ``out`` (only when the new run succeeded).
        keep_candidates: also keep every candidate's artifacts under ``OUT/candidates``.
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
    from tfaccel.compat import capabilities
    from tfaccel.pipeline import Pipeline
    from tfaccel.pruning.distillation import DistillationOverBudget
    from tfaccel.sources import load_source

    log = log or _default_log
    t_run = time.perf_counter()
    source = model_or_source if isinstance(model_or_source, ModelSource) else load_source(model_or_source,
                                                                                           progress=log)
    shapes = _check_options(max_accuracy_drop, shapes or [(1, source.default_seq)], formats, time_budget_s,
                            runs, warmup)
    staged = StagedOutput(out, overwrite=overwrite, protect=[source.path])
    staged.check()
    if source.kind not in ("keras", "saved_model"):
        raise PlanError(f"--auto needs a Keras model (a .keras file, a preset folder or an example name) or a "
                        f"SavedModel; {source.name} is a {kind_name(source.kind)}.")
    # A SavedModel source is its own baseline; the recipes that apply to it are the ones whose steps take a
    # SavedModel (xla, the side artifacts), without their leading export.
    sm_source = source.kind == "saved_model"
    baseline = SOURCE_BASELINE if sm_source else BASELINE

    caps = capabilities()
    has_data = finetune_data is not None or source.train_split is not None
    plan = plan_candidates(caps, finetune_data=has_data, formats=formats, recipes=recipes)
    step_defaults = {"prune-structured": {"data": finetune_data}} if finetune_data is not None else {}

    labelled = source.eval_labels is not None and source.task == "classification"
    n_eval = len(source.eval_labels) if labelled else None
    budget_rule = (f"at most {max_accuracy_drop:g} accuracy point{'' if max_accuracy_drop == 1 else 's'} below the reference on {n_eval} labelled "
                   "examples" if labelled else
                   "no labelled data: each candidate's outputs must stay within its steps' cosine tolerance "
                   "(the loosest of them) of the reference on the sample inputs")
    report = AutoReport(source=source.name, source_description=source.description, task=source.task,
                        shapes=[list(s) for s in shapes], max_accuracy_drop=float(max_accuracy_drop),
                        budget_rule=budget_rule, formats=formats, capabilities=caps.to_dict(), baseline=baseline,
                        time_budget_s=time_budget_s, eval_examples=n_eval)

    # Plan every runnable recipe first: impossible chains and steps that cannot run here are reported
    # before any work (Pipeline.plan checks kinds and calls each step's check()).
    planned: list[tuple[AutoCandidate, Recipe | None, list, list[str]]] = []
    for pc in plan:
        r = pc.recipe
        cand = AutoCandidate(name=r.name, description=r.description, format=r.format,
                             steps=[s.describe() for s in r.steps], status=NOT_TRIED)
        report.candidates.append(cand)
        if not pc.runnable:
            cand.status, cand.reason = NOT_A_CANDIDATE, pc.reason
            continue
        if sm_source and r.name == BASELINE:
            cand.name, cand.steps = SOURCE_BASELINE, []
            cand.description = "the SavedModel as given (the baseline)"
            planned.append((cand, r, [], []))
            continue
        made = r.make_steps(step_defaults)
        if sm_source and made and made[0].name == "export":
            made = made[1:]
        try:
            steps = Pipeline(made, shapes=shapes, measure=False, log=lambda _m: None).plan(source)
        except TfaccelError as exc:
            cand.status, cand.reason = NOT_A_CANDIDATE, f"cannot run here: {str(exc).splitlines()[0]}"
            continue
        # Pipeline.plan keeps the recipe's steps in order and may append an export.
        specs = r.steps[1:] if sm_source and r.steps[0].name == "export" else r.steps
        cand.steps = [specs[i].describe() if i < len(specs) else s.name for i, s in enumerate(steps)]
        planned.append((cand, r, steps, [step_key(s) for s in steps]))
    if not planned or planned[0][0].name != baseline:
        raise TfaccelError(f"The baseline recipe '{baseline}' cannot run on {source.name}: "
                           f"{report.candidate(baseline).reason}")

    n = len(planned)
    skipped = [c.name for c in report.candidates if c.status == NOT_A_CANDIDATE]
    log(f"--auto on {source.name}: {n} candidates ({', '.join(c.name for c, *_ in planned)})"
        + (f"; not candidates here: {', '.join(skipped)}" if skipped else "") + f". Budget: {budget_rule}."
        + (f" Time budget {time_budget_s:g}s." if time_budget_s is not None else ""))

    # Groups: a candidate whose chain without its first step is another candidate's chain (its
    # counterpart: prune-structured+int8-xla -> int8-xla, prune-structured -> export) belongs to the group
    # of that first step. A group's members are built in the order of their counterparts' speed, and a
    # member whose counterpart is clearly slower than a within-budget member's is dominated.
    by_keys = {tuple(k): c.name for c, _r, _s, k in planned}
    counterpart = {c.name: by_keys[tuple(k[1:])] for c, _r, _s, k in planned
                   if len(k) > 1 and tuple(k[1:]) in by_keys}
    members: dict[str, list[str]] = {}
    for c, _r, _s, k in planned:
        if c.name in counterpart:
            members.setdefault(k[0], []).append(c.name)
    group_of = {name: g for g, names in members.items() if len(names) > 1 for name in names}
    group_step = {c.name: s[0].name for c, _r, s, _k in planned if c.name in group_of}
    # The last part of the time budget is kept for timing all candidates (at least 3 calls each).
    reserve = min(60.0, max(15.0, 0.1 * time_budget_s)) if time_budget_s is not None else 0.0
    build_deadline = t_run + time_budget_s - reserve if time_budget_s is not None else None

    runners: dict[str, Any] = {}
    staged.__enter__()
    work = staged.path
    try:
        builder = _Builder(source, work, log)
        ref_runner = builder.reference.runner()
        ref_out = ref_runner(source.sample_inputs)
        # Evaluate at the sample inputs' batch size: XLA-compiled candidates compile once for both.
        eval_batch = int(next(iter(source.sample_inputs.values())).shape[0])
        if labelled:
            report.reference_accuracy = classification_accuracy(ref_runner, source.eval_inputs, source.eval_labels,
                                                                batch_size=eval_batch)
            log(f"  reference accuracy {report.reference_accuracy:.4f} on {n_eval} held-out examples")
        del ref_runner

        validate_s: list[float] = []  # seconds each candidate's validation took

        def after_steps_s(todo: list) -> float:
            """Seconds ``todo`` took earlier in this run (0 for steps not built yet), plus a validation."""
            return (sum(builder.step_seconds.get(st.name, 0.0) for st in todo)
                    + sum(validate_s) / max(1, len(validate_s)))

        def estimate(todo: list) -> float | None:
            """Seconds to build ``todo`` and validate, from this run's measured step and validation
            times (None when a step has not been built yet in this run)."""
            if any(st.name not in builder.step_seconds for st in todo):
                return None
            return after_steps_s(todo)

        def deadline_for(steps: list) -> Callable[[int], float | None]:
            def at(k: int) -> float | None:
                return None if build_deadline is None else build_deadline - after_steps_s(steps[k + 1:])
            return at

        queue = list(planned)
        ordered: set[str] = set()
        quick: dict[str, list[InterleavedTiming]] = {}  # group -> quick timings of its counterparts, per shape
        i = 0
        while i < len(queue):
            cand, _recipe, steps, keys = queue[i]
            group = group_of.get(cand.name)
            if group is not None and group not in ordered:
                ordered.add(group)
                quick[group] = _order_group(group, queue, i, members[group], counterpart, runners, source, shapes,
                                            report, group_step[cand.name], warmup, log)
                cand, _recipe, steps, keys = queue[i]
            i += 1
            now = time.perf_counter()
            elapsed = now - t_run
            if i > 1 and build_deadline is not None:
                left = build_deadline - now
                est = estimate(builder.unbuilt(steps, keys))
                if left <= 0 or (est is not None and est > left):
                    cand.status = NOT_TRIED
                    cand.reason = (f"time budget of {time_budget_s:g}s: building stopped after {elapsed:.0f}s (the "
                                   f"last {reserve:.0f}s are kept for timing)" if left <= 0 else
                                   f"time budget of {time_budget_s:g}s: it needs about {est:.0f}s to build and "
                                   f"validate (its steps' times measured earlier in this run), {left:.0f}s of "
                                   f"building time were left")
                    log(f"[{i}/{n}] {cand.name}: not tried: {cand.reason}")
                    continue
            if group is not None:
                why = _dominated(cand, members[group], counterpart, quick[group], report, group_step[cand.name])
                if why:
                    cand.status, cand.reason = NOT_TRIED, why
                    log(f"[{i}/{n}] {cand.name}: not tried: {why}")
                    continue
            log(f"[{i}/{n}] {cand.name}: {' -> '.join(cand.steps)}  ({elapsed:.0f}s elapsed)")
            try:
                artifact, seconds, notes = builder.build(cand.name, steps, keys, deadline_for(steps))
            except DistillationOverBudget as exc:
                cand.status, cand.reason = NOT_TRIED, f"time budget of {time_budget_s:g}s: {exc}"
                log(f"  not tried: {cand.reason}")
                continue
            except Exception as exc:
                if cand.name == baseline:
                    raise
                cand.status, cand.reason = FAILED, _first_line(exc)
                log(f"  FAILED: {cand.reason}")
                continue
            finally:
                later_prefixes = {tuple(k[: j + 1]) for _c, _r, _s, k in queue[i:] for j in range(len(k))}
                builder.forget_keras(later_prefixes)
            t_val = time.perf_counter()
            cand.kind, cand.build_seconds, cand.notes = artifact.kind, seconds, notes
            cand.size_bytes = artifact.size_bytes()
            cand.path = (str(Path(artifact.path).relative_to(work)) if Path(artifact.path).is_relative_to(work)
                         else str(artifact.path)) if artifact.path else None  # the source itself: absolute
            try:
                runner = artifact.runner()
                comp = compare_outputs(ref_out, runner(source.sample_inputs))
                cand.max_abs_diff, cand.min_cosine = comp.max_abs_diff, comp.min_cosine
                if labelled:
                    cand.accuracy = classification_accuracy(runner, source.eval_inputs, source.eval_labels,
                                                            batch_size=eval_batch)
                    cand.accuracy_drop_points = (report.reference_accuracy - cand.accuracy) * 100
            except Exception as exc:  # e.g. ValidationError: output names changed
                if cand.name == baseline:
                    raise
                cand.status, cand.reason = FAILED, f"does not run: {_first_line(exc)}"
                log(f"  FAILED: {cand.reason}")
                continue
            validate_s.append(time.perf_counter() - t_val)
            breaches = _budget_breaches(comp, cand, steps, labelled, max_accuracy_drop)
            cand.status = DROPPED if breaches else KEPT
            cand.reason = "over budget: " + "; ".join(breaches) if breaches else ""
            log(f"  built in {seconds:.0f}s (validated in {validate_s[-1]:.0f}s), {cand.size_bytes / 1e6:.1f} MB, "
                f"cosine {comp.min_cosine:.6f}"
                + (f", accuracy {cand.accuracy:.4f} ({0.0 - cand.accuracy_drop_points:+.2f} pts)" if labelled else "")
                + (f": DROPPED ({cand.reason})" if breaches else ": within budget"))
            if cand.name == baseline and breaches:
                raise ValidationError(f"The baseline {baseline} does not match the reference: {'; '.join(breaches)}")
            runners[cand.name] = runner

        timing_left = t_run + time_budget_s - time.perf_counter() if time_budget_s is not None else None
        per_runner = max_seconds_per_shape if timing_left is None else max(
            0.5, min(max_seconds_per_shape, 0.7 * timing_left / (len(runners) * len(shapes))))
        _time_all(report, runners, source, shapes, runs=runs, warmup=warmup, max_seconds=per_runner, log=log)
        _rank(report)
        runners.clear()
        winner = report.candidate(report.winner)
        link_tree(work / winner.path, work / "saved_model")
        report.final_saved_model = "saved_model"
        if report.fastest_artifact and report.fastest_artifact != report.winner:
            fast = report.candidate(report.fastest_artifact)
            stage = (work / fast.path) if (work / fast.path).is_dir() else (work / fast.path).parent
            link_tree(stage, work / "fastest")
            inner = (work / fast.path).relative_to(stage)
            report.fastest_artifact_path = str(Path("fastest") / inner) if str(inner) != "." else "fastest"
        elif report.fastest_artifact:
            report.fastest_artifact_path = "saved_model"
        if not keep_candidates:
            shutil.rmtree(work / "candidates", ignore_errors=True)
            for c in report.candidates:
                c.path = None
        report.total_seconds = time.perf_counter() - t_run
        report.write(work)
        out = staged.commit()
    finally:
        runners.clear()
        staged.__exit__(None, None, None)
    report.out_dir = str(out)
    log(f"winner: {report.winner} ({', '.join(f'{v:.2f}x at {k}' for k, v in winner.speedups.items())} vs "
        f"{baseline}); wrote {out}/saved_model, {out}/report.md, {out}/report.json")
    return report


def _budget_breaches(comp, cand: AutoCandidate, steps, labelled: bool, max_accuracy_drop: float) -> list[str]:
    """Why a candidate is over the budget (empty: within it)."""
    if not math.isfinite(comp.max_abs_diff):
        return ["non-finite outputs (inf/NaN) on the sample inputs"]
    if labelled:
        if cand.accuracy_drop_points > max_accuracy_drop + 1e-7:
            return [f"accuracy {cand.accuracy:.4f} is {cand.accuracy_drop_points:.2f} points below the reference "
                    f"(budget {max_accuracy_drop:g})"]
        return []
    tol = chain_tolerance(steps)
    return [f"{b} (tolerance of {'+'.join(s.name for s in steps)})" for b in comp.breaches(tol)]


def _time_all(report: AutoReport, runners: dict[str, Any], source: ModelSource, shapes, *, runs: int, warmup: int,
              max_seconds: float, log) -> None:
    """Time every validated candidate (within the budget or not: the plot shows both) interleaved."""
    for batch, seq in shapes:
        log(f"timing {len(runners)} candidates interleaved at batch {batch} x seq {seq} ({runs} runs each, "
            f"round-robin, at most {max_seconds:.3g}s of calls each; clearly slower ones stop after 5)")
        timing = time_interleaved(runners, source.make_inputs(batch, seq), seq=seq, runs=runs, warmup=warmup,
                                  max_seconds=max_seconds, stop_slower=STOP_SLOWER_MARGIN, keep={report.baseline})
        for name, err in timing.errors.items():
            c = report.candidate(name)
            if name == report.baseline:
                raise TfaccelError(f"Timing the baseline '{report.baseline}' at {batch}x{seq} failed: {err}")
            c.status, c.reason = DROPPED, f"timing at {batch}x{seq} failed: {err}"
            runners.pop(name)
            log(f"  {name}: timing FAILED: {err}")
        for name, why in timing.stopped.items():
            report.candidate(name).notes.append(f"timing at {batch}x{seq}: {why}")
        ms = timing.measurements
        base = ms[report.baseline].p50_ms
        for name, m in ms.items():
            c = report.candidate(name)
            c.measurements.append(m.to_dict())
            c.speedups[f"{batch}x{seq}"] = base / m.p50_ms
            log(f"  {name:30s} p50 {m.p50_ms:9.2f} ms  p95 {m.p95_ms:9.2f} ms  {base / m.p50_ms:5.2f}x  "
                f"({m.runs} runs{', stopped: clearly slower' if name in timing.stopped else ''}) [{c.status}]")


def _order_group(group: str, queue: list, at: int, names: list[str], counterpart: dict[str, str],
                 runners: dict[str, Any], source: ModelSource, shapes, report: AutoReport, first_step: str,
                 warmup: int, log) -> list[InterleavedTiming]:
    """Time the group's counterparts that are built (a quick interleaved round at every shape), and
    move the group's members to ``queue[at:]`` fastest counterpart first (untimed ones last, in table
    order). Returns the quick timings, one per shape."""
    timed = {counterpart[n] for n in names if counterpart[n] in runners}
    quick: list[InterleavedTiming] = []
    if len(timed) > 1:
        for batch, seq in shapes:
            quick.append(time_interleaved({n: runners[n] for n in runners if n in timed}, source.make_inputs(batch, seq),
                                          seq=seq, runs=5, warmup=max(2, warmup), max_seconds=5.0))

    def speed(name: str) -> float:
        ms = [t.measurements.get(counterpart[name]) for t in quick]
        if not quick or any(m is None for m in ms):
            return math.inf
        return math.exp(sum(math.log(m.p50_ms) for m in ms) / len(ms))

    mine = [item for item in queue[at:] if item[0].name in names]
    rest = [item for item in queue[at:] if item[0].name not in names]
    mine.sort(key=lambda item: speed(item[0].name))  # stable: untimed ones keep table order
    queue[at:] = mine + rest
    if quick:
        b, s = shapes[0]
        order = ", ".join(f"{item[0].name} ({counterpart[item[0].name]} "
                          + (f"{quick[0].measurements[counterpart[item[0].name]].p50_ms:.1f} ms" if math.isfinite(
                              speed(item[0].name)) else "not timed") + ")" for item in mine)
        note = (f"the {first_step} candidates were built in the order of their counterparts' speed (the same chain "
                f"without {first_step}; quick interleaved timing, 5 calls each, p50 at {b}x{s}): {order}")
        report.run_notes.append(note)
        log(f"  {note}")
    return quick


def _dominated(cand: AutoCandidate, names: list[str], counterpart: dict[str, str], quick: list[InterleavedTiming],
               report: AutoReport, first_step: str) -> str:
    """Why ``cand`` is not worth building (empty: it is): a sibling built within the budget whose
    counterpart was clearly faster than ``cand``'s at every shape in the quick timing."""
    if not quick:
        return ""
    mine = counterpart[cand.name]
    for other in names:
        c = report.candidate(other)
        if other == cand.name or c.status != KEPT or c.format != cand.format:
            continue
        theirs = counterpart[other]
        if all(t.clearly_slower(mine, theirs, DOMINANCE_MARGIN) for t in quick):
            t = quick[0]
            b, s = report.shapes[0]
            return (f"dominated: without {first_step}, {mine} was clearly slower than {theirs} (p50 "
                    f"{t.measurements[mine].p50_ms:.1f} vs {t.measurements[theirs].p50_ms:.1f} ms at {b}x{s}"
                    f"{' and the other shapes' if len(quick) > 1 else ''}, quick interleaved timing), and "
                    f"{other} is within budget")
    return ""


def _rank(report: AutoReport) -> None:
    """Score (geometric-mean speed-up), rank, and pick the winner and the fastest of any format."""
    n_shapes = len(report.shapes)
    for c in report.candidates:
        if len(c.speedups) == n_shapes and c.status in (KEPT, DROPPED):
            c.score = math.exp(sum(math.log(v) for v in c.speedups.values()) / n_shapes)
    for i, c in enumerate(report.ranked(), 1):
        c.rank = i if c.score is not None else None
    kept = [c for c in report.candidates if c.status == KEPT and c.score is not None]
    saved_models = [c for c in kept if c.kind == "saved_model"]
    report.winner = max(saved_models, key=lambda c: c.score).name
    report.fastest_artifact = max(kept, key=lambda c: c.score).name


def optimize(
    model_or_source: Any,
    out: str | os.PathLike,
    *,
    auto: bool | None = None,
    steps: Sequence[Any] | None = None,
    max_accuracy_drop: float = 1.0,
    shapes: Sequence[tuple[int, int]] | None = None,
    formats: str = "savedmodel",
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
