"""The package structure: dependencies between the packages of nanoflow point one way (server ->
engine -> runtime <- models; the tuner above the runtime), and light entry points stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"nanoflow": ROOT / "nanoflow", "nanoflow.kernels": ROOT / "kernels",
           "nanoflow.autotune": ROOT / "autotune"}  # fmt: skip


def _node(module: str) -> str:
    """A subpackage (nanoflow.engine) or a top-level module (nanoflow.config) of nanoflow."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _modules() -> dict[str, Path]:
    out = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            out[".".join((package, *parts)).removesuffix(".__init__")] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges between nodes for every import of a nanoflow module, function-level ones too."""
    modules = _modules()
    nodes = {_node(m) for m in modules}
    edges: dict[str, set[str]] = {n: set() for n in nodes}
    for module, path in modules.items():
        for stmt in ast.walk(ast.parse(path.read_text())):
            if isinstance(stmt, ast.Import):
                targets = [a.name for a in stmt.names]
            elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
                targets = [
                    f"{stmt.module}.{a.name}" if f"{stmt.module}.{a.name}" in nodes else stmt.module
                    for a in stmt.names
                ]
            else:
                continue
            for target in targets:
                if target.split(".")[0] == "nanoflow" and _node(target) != _node(module):
                    edges[_node(module)].add(_node(target))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_cycle_between_packages():
    edges = import_graph()
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_runtime_sits_below_engine_models_and_tuner():
    edges = import_graph()
    above = {"nanoflow.engine", "nanoflow.models", "nanoflow.autotune", "nanoflow.server"}
    assert not edges["nanoflow.runtime"] & above
    assert "nanoflow.runtime" in edges["nanoflow.models"]
    assert {n for n, e in edges.items() if "nanoflow.autotune" in e} == {"nanoflow.cli"}


def test_cycles_are_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _loads_torch(code: str) -> bool:
    probe = f"{code}\nimport sys\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] == "True"


def test_workloads_and_the_cli_parser_do_not_import_torch():
    assert not _loads_torch("import nanoflow.workloads")
    assert not _loads_torch("from nanoflow.cli.main import build_parser; build_parser()")
    assert _loads_torch("from nanoflow import LLM")
