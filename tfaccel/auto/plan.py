"""``--auto``, phase 1: check the options and plan every candidate before any work.

Every recipe of the table becomes an :class:`~tfaccel.auto.auto_report.AutoCandidate` in the report: a
candidate with its planned steps (:meth:`tfaccel.Pipeline.plan` checks the artifact kinds and calls each
step's ``check``), or "not a candidate" with the reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from tfaccel.auto.auto_report import NOT_A_CANDIDATE, NOT_TRIED, AutoCandidate, AutoReport
from tfaccel.auto.recipes import BASELINE, FORMAT_CHOICES, SOURCE_BASELINE, Recipe, plan_candidates
from tfaccel.compat import capabilities
from tfaccel.core.artifact import kind_name
from tfaccel.core.chain import step_key
from tfaccel.core.measure import check_shapes
from tfaccel.core.source import ModelSource
from tfaccel.core.step import Step
from tfaccel.errors import DataFileError, PlanError, TfaccelError


@dataclasses.dataclass
class Planned:
    """A candidate that will be tried: its report row, its steps (planned) and their keys."""

    cand: AutoCandidate
    steps: list[Step]
    keys: list[str]

    @property
    def name(self) -> str:
        return self.cand.name


def check_options(max_accuracy_drop, shapes, formats, time_budget_s, runs, warmup) -> list[tuple[int, int]]:
    """Validate ``optimize_auto``'s options (PlanError naming the value); returns the shapes as int pairs."""
    ok = isinstance(max_accuracy_drop, (int, float)) and not isinstance(max_accuracy_drop, bool)
    if not ok or not math.isfinite(max_accuracy_drop) or max_accuracy_drop < 0:
        raise PlanError(f"max_accuracy_drop is in accuracy points (1.0 = one point) and must be a number >= 0. "
                        f"Received: max_accuracy_drop={max_accuracy_drop!r}")
    if formats not in FORMAT_CHOICES:
        raise PlanError(f"formats must be one of {FORMAT_CHOICES}. Received: formats={formats!r}")
    if time_budget_s is not None and (not isinstance(time_budget_s, (int, float)) or not time_budget_s >= 0):
        raise PlanError(f"time_budget_s must be seconds >= 0 or None. Received: time_budget_s={time_budget_s!r}")
    if not isinstance(runs, int) or runs < 3:
        raise PlanError(f"runs must be an int >= 3 (a median needs a few calls). Received: runs={runs!r}")
    if not isinstance(warmup, int) or warmup < 1:
        raise PlanError(f"warmup must be an int >= 1 (the first call traces/compiles). Received: warmup={warmup!r}")
    return check_shapes(shapes)  # ArgumentError with an example: shapes=(1, 64) or "1x128" are not lists of pairs


def new_report(source: ModelSource, shapes, *, max_accuracy_drop: float, formats: str, time_budget_s,
               baseline: str) -> AutoReport:
    """The report skeleton: the source, the budget rule, the machine."""
    labelled = source.eval_labels is not None and source.task == "classification"
    n_eval = len(source.eval_labels) if labelled else None
    points = f"{max_accuracy_drop:g} accuracy point{'' if max_accuracy_drop == 1 else 's'}"
    budget_rule = (f"at most {points} below the reference on {n_eval} labelled examples" if labelled else
                   "no labelled data: each candidate's outputs must stay within its steps' cosine tolerance "
                   "(the loosest of them) of the reference on the sample inputs")
    return AutoReport(source=source.name, source_description=source.description, task=source.task,
                      shapes=[list(s) for s in shapes], max_accuracy_drop=float(max_accuracy_drop),
                      budget_rule=budget_rule, formats=formats, capabilities=capabilities().to_dict(),
                      baseline=baseline, time_budget_s=time_budget_s, eval_examples=n_eval)


def plan_search(source: ModelSource, report: AutoReport, shapes, *, formats: str, finetune_data: Any,
                recipes: Sequence[Recipe | str] | None) -> list[Planned]:
    """Every recipe this machine, the data and ``formats`` allow, planned (steps made and checked), the
    baseline first. The others are in ``report.candidates`` as "not a candidate" with the reason.

    A SavedModel source is its own baseline; the recipes that apply to it are the ones whose steps take
    a SavedModel (xla, the side artifacts), without their leading export.

    Raises:
        PlanError: the source is not a Keras model or SavedModel, or the baseline cannot run.
        DataFileError: a data file the user gave cannot be used (before any work, whatever recipe).
    """
    from tfaccel.pipeline import Pipeline

    if source.kind not in ("keras", "saved_model"):
        raise PlanError(f"--auto needs a Keras model (a .keras file, a preset folder or an example name) or a "
                        f"SavedModel; {source.name} is {kind_name(source.kind)}.")
    sm_source = source.kind == "saved_model"
    has_data = finetune_data is not None or source.train_split is not None
    step_defaults = {"prune-structured": {"data": finetune_data}} if finetune_data is not None else {}
    planned: list[Planned] = []
    for pc in plan_candidates(capabilities(), finetune_data=has_data, formats=formats, recipes=recipes):
        r = pc.recipe
        cand = AutoCandidate(name=r.name, description=r.description, format=r.format,
                             steps=[s.describe() for s in r.steps], status=NOT_TRIED)
        report.candidates.append(cand)
        if not pc.runnable:
            cand.status, cand.reason = NOT_A_CANDIDATE, pc.reason
            continue
        if sm_source and r.name == BASELINE:
            cand.name, cand.steps, cand.description = SOURCE_BASELINE, [], "the SavedModel as given (the baseline)"
            planned.append(Planned(cand, [], []))
            continue
        made = r.make_steps(step_defaults)
        specs = list(r.steps)
        if sm_source and made and made[0].name == "export":
            made, specs = made[1:], specs[1:]
        try:
            steps = Pipeline(made, shapes=shapes, measure=False, log=lambda _m: None).plan(source)
        except DataFileError:
            raise  # the user's file is wrong: stop now, whatever recipe found it
        except TfaccelError as exc:
            cand.status, cand.reason = NOT_A_CANDIDATE, f"cannot run here: {str(exc).splitlines()[0]}"
            continue
        same = next((why for why in (s.same_as_another_at(shapes) for s in steps) if why), "")
        if same:
            cand.status, cand.reason = NOT_A_CANDIDATE, same
            continue
        # Pipeline.plan keeps the recipe's steps in order and may append an export.
        cand.steps = [specs[i].describe() if i < len(specs) else s.name for i, s in enumerate(steps)]
        planned.append(Planned(cand, steps, [step_key(s) for s in steps]))
    if not planned or planned[0].name != report.baseline:
        raise PlanError(f"The baseline recipe '{report.baseline}' cannot run on {source.name}: "
                        f"{report.candidate(report.baseline).reason}")
    return planned
