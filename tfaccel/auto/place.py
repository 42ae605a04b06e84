"""``--auto``, phase 7: put the winner in place inside the staged output folder: ``saved_model/`` (the
fastest SavedModel within the budget), ``fastest/`` (the fastest artifact of any format, when it is not
that SavedModel), the candidates' artifacts kept or removed, and the report written.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tfaccel.auto.auto_report import AutoReport
from tfaccel.core.files import link_tree


def place_outputs(report: AutoReport, work: Path, *, keep_candidates: bool) -> None:
    """Link the winner to ``work/saved_model`` and the fastest artifact to ``work/fastest``; remove the
    candidates' artifacts unless ``keep_candidates``; write the report into ``work``."""
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
    report.write(work)
