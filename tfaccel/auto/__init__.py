"""``tfaccel optimize MODEL --auto``: the fastest validated SavedModel for this model, machine and
accuracy budget.

- :mod:`tfaccel.auto.recipes`: THE table of candidate recipes (policy only; each step says where it runs).
- :mod:`tfaccel.auto.search`: :func:`optimize_auto`, the phases in order:
  :mod:`~tfaccel.auto.plan` (options, every recipe planned and checked), :mod:`~tfaccel.auto.groups`
  (candidates sharing a first step, fastest counterpart first, dominance), :mod:`~tfaccel.auto.budget`
  (the time budget), :mod:`~tfaccel.auto.build` (build with shared prefixes, validate against the
  reference), :mod:`~tfaccel.auto.rank` (time interleaved, rank), :mod:`~tfaccel.auto.place` (the
  winner, the fastest artifact, the report).
- :mod:`tfaccel.auto.auto_report`: the ranked report (Markdown, JSON, latency-vs-accuracy PNG).

Example:
    >>> import tfaccel
    >>> report = tfaccel.optimize("minilm-bbc", "out", max_accuracy_drop=1.0)  # doctest: +SKIP
    >>> print(report.to_markdown())  # doctest: +SKIP
"""

from tfaccel.auto.auto_report import AutoCandidate, AutoReport
from tfaccel.auto.recipes import (
    RECIPES,
    PlannedCandidate,
    Recipe,
    StepSpec,
    plan_candidates,
    recipe_table,
)
from tfaccel.auto.search import DEFAULT_TIME_BUDGET_S, optimize, optimize_auto
from tfaccel.core.timer import InterleavedTiming, time_interleaved

__all__ = [
    "DEFAULT_TIME_BUDGET_S",
    "RECIPES",
    "AutoCandidate",
    "AutoReport",
    "InterleavedTiming",
    "PlannedCandidate",
    "Recipe",
    "StepSpec",
    "optimize",
    "optimize_auto",
    "plan_candidates",
    "recipe_table",
    "time_interleaved",
]
