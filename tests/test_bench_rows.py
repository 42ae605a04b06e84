"""`benchmarks/run.py --rows`: which rows a value picks (no model runs here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bench_modules():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("bench_run", REPO / "benchmarks" / "run.py")
        run = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run)
        import workloads
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return run, workloads


def test_rows_with_a_comma_in_their_name_can_be_picked_and_unknown_pieces_are_named():
    run, wl = _bench_modules()
    w = wl.workloads()["gpt2-small"]
    names = [r.name for r in [*w.rows, *w.generation_rows]]
    with_comma = [n for n in names if "," in n]
    assert with_comma, "no row name with a comma left: this test has nothing to check"
    text = ",".join(["keras-hub generate (greedy)", *with_comma[:2], "tfaccel int8", "no such row"])
    chosen, unknown = run.select_rows(text, names)
    assert chosen == {"keras-hub generate (greedy)", *with_comma[:2], "tfaccel int8"}
    assert unknown == ["no such row"]
    # spaces after the commas, inside a name too, do not matter
    spaced = with_comma[0].replace(",", " ,  ")
    assert run.select_rows(f" {spaced} , tfaccel int8", names) == ({with_comma[0], "tfaccel int8"}, [])
    assert run.select_rows("", names) == (set(), [])
