"""The import floors (CONTRIBUTING.md, "Layout"): no import cycles, and every module imports only from its
own floor or below. Imports inside functions count: they are edges too, only later ones.

Floors, bottom up: 0 errors, compat | 1 core/ + the shared helpers | 2 techniques and examples/ |
3 the registry (steps) and the source loader (sources) | 4 pipeline, auto/ | 5 cli.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "tfaccel"

TECHNIQUES = ("export", "xla", "quantization", "pruning", "precision", "onnx", "openvino", "tensorrt", "generation",
              "distribute", "examples")
SHARED = ("saved_model", "servable", "causal_lm_spec")


def floor_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else ""
    if top in ("errors", "compat"):
        return 0
    if top == "core" or top in SHARED:
        return 1
    if top in TECHNIQUES:
        return 2
    if top in ("steps", "sources"):
        return 3
    if top in ("pipeline", "auto"):
        return 4
    if top in ("cli", "") or module == "tfaccel":
        return 5
    raise AssertionError(f"{module} has no floor: add it to tests/test_layering.py and CONTRIBUTING.md")


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def import_edges() -> dict[str, set[str]]:
    """module -> tfaccel modules it imports (module level and inside functions), resolved to the
    deepest existing module (``from tfaccel.onnx import OnnxStep`` -> ``tfaccel.onnx``)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        is_pkg = p.name == "__init__.py"
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = m.split(".") if is_pkg else m.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # "from tfaccel.pkg import submodule" imports the submodule (and runs the package's __init__,
                # which is the package's own business); "from tfaccel.pkg import name" imports the package.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for t in targets:
                if t.split(".")[0] == "tfaccel":
                    r = resolve(t)
                    if r and r != m:
                        edges[m].add(r)
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on, stack, out, counter = set(), [], [], [0]
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_the_cycle_finder_finds_a_cycle():
    # The check itself can fail: a three-module ring and a self-contained pair are found, a chain is not.
    found = cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": set(), "f": {"g"}, "g": {"f"}})
    assert sorted(found) == [["a", "b", "c"], ["f", "g"]]


def test_no_import_cycles():
    found = cycles(import_edges())
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(" -> ".join(c) for c in found)


def test_every_module_imports_only_its_floor_or_below():
    edges = import_edges()
    upward = [f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
              for m, targets in edges.items() for t in targets
              if floor_of(t) > floor_of(m) and not (m == "tfaccel" or m.startswith("tfaccel.") and t.startswith(m + "."))]
    assert not upward, "imports that go up a floor:\n" + "\n".join(sorted(upward))


@pytest.mark.parametrize("module", ["tfaccel.core.artifact", "tfaccel.core.step", "tfaccel.core.source"])
def test_core_imports_no_technique(module):
    techniques = [t for t in import_edges()[module] if floor_of(t) >= 2]
    assert not techniques, f"{module} imports {techniques}"


def test_auto_is_made_of_small_functions():
    # --auto is read phase by phase (auto/plan, groups, budget, build, rank, place): no function there grows
    # back into a search loop of hundreds of lines. Docstrings do not count.
    long = []
    for p in sorted((ROOT / "auto").glob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body
                doc = body[0].end_lineno - body[0].lineno + 1 if (
                    isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)) else 0
                lines = node.end_lineno - node.lineno + 1 - doc
                if lines > 100:
                    long.append(f"{p.name}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
