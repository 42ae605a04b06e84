"""`benchmarks/run.py` rows: which rows ``--rows`` picks (no model runs), and a row that applies only on some
hardware, built on bert-tiny on both sides of its ``tfaccel.compat`` decision."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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


def test_the_bf16_einsum_row_runs_only_where_bf16_is_native_and_keeps_keras_einsums(tmp_path):
    from conftest import graph_nodes

    from tfaccel import load_source
    from tfaccel.compat import override_capabilities

    _, wl = _bench_modules()
    rows = {r.name: r for r in wl.default_rows()}
    einsum_row, default_row = rows[wl.BF16_EINSUM_ROW], rows["tfaccel mixed_bfloat16"]
    ctx = wl.BuildContext(source=load_source("bert-tiny"), work_dir=tmp_path, log=lambda m: None)
    with override_capabilities(cpu_features={"bf16": False, "amx": False}, gpus=()):
        with pytest.raises(wl.NotApplicable, match="bf16 is native; here no GPU and the CPU"):
            einsum_row.build(ctx)
    with override_capabilities(cpu_features={"bf16": True}, gpus=()):
        einsum, default = einsum_row.build(ctx), default_row.build(ctx)
    # the same bf16 Keras model (one built prefix), exported with Keras' einsums and with 2-D products
    assert einsum.steps == default.steps == ("mixed_bfloat16", "export") and einsum.path != default.path
    assert [n.op for n in graph_nodes(einsum.path)].count("Einsum") == 8
    assert "Einsum" not in [n.op for n in graph_nodes(default.path)]
    assert any("2-D MatMul" in n for n in default.notes) and not any("2-D MatMul" in n for n in einsum.notes)
