"""The package's import graph, read from the source with `ast` (function-level imports included): dependencies run
one way (docs/architecture.md).

- no import cycle anywhere in src/bsmamba2;
- `kernels/` imports only kernel modules and the two leaves (`switches`, `functional`): no model code;
- the leaves import no bsmamba2 module;
- the two model modules do not import each other, and `kernels/` reads no environment variable itself.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "bsmamba2"
LEAVES = {"bsmamba2.switches", "bsmamba2.functional"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """bsmamba2 modules that `name` imports anywhere in its file (module, class or function level). `from a import b`
    counts as a.b when that is a module, else a; relative imports are resolved against the package."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_sees_function_level_imports(graph):
    assert "bsmamba2.fused_block" in graph["bsmamba2.mamba2"]  # imported inside `_fast_block`
    assert "bsmamba2.kernels.ssd" in graph["bsmamba2.kernels"]  # inside the lazy entry points


def test_no_import_cycle(graph):
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_a_cycle_would_be_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_no_model_code(graph):
    bad = {m: sorted(d for d in deps if not d.startswith("bsmamba2.kernels") and d not in LEAVES)
           for m, deps in graph.items() if m.startswith("bsmamba2.kernels")}
    assert not any(bad.values()), {m: d for m, d in bad.items() if d}


def test_leaves_import_no_bsmamba2_module(graph):
    for leaf in LEAVES:
        assert graph[leaf] == set(), (leaf, graph[leaf])


def test_model_modules_do_not_import_each_other(graph):
    assert "bsmamba2.roformer" not in graph["bsmamba2.model"]
    assert "bsmamba2.model" not in graph["bsmamba2.roformer"]


def test_environment_switches_are_read_in_the_leaf():
    """Every `BSMAMBA2_*` switch of the compute path is read through `bsmamba2.switches`: no other module under
    src/bsmamba2 reads os.environ for one, except the path/network settings documented there."""
    path_settings = {"BSMAMBA2_CACHE", "BSMAMBA2_OFFLINE", "BSMAMBA2_MIRROR", "BSMAMBA2_SHARED"}
    offenders = []
    for name, path in _modules().items():
        if name == "bsmamba2.switches":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("BSMAMBA2_"):
                if node.value not in path_settings:
                    offenders.append(f"{name}: {node.value}")
            if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.Constant) and str(v.value).startswith(
                    "BSMAMBA2_") for v in node.values):
                offenders.append(f"{name}: f-string")
    assert not offenders, offenders
    doc = (PKG / "switches.py").read_text(encoding="utf-8")
    for setting in path_settings:
        assert setting in doc  # documented beside the switches
