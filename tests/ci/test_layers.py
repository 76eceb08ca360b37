"""The layers of the code (pyproject.toml [tool.importlinter], docs/design.md) and the absence of import circles.

`lint-imports` checks that no module imports from a layer above its own; the graph built here with `ast`
(module-level and function-level imports alike) checks that no two modules of bench/, editors/ and
tasks/ import each other, directly or through others. The last test shows an upward import is caught.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("bench", "editors", "tasks")
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True))")


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the tree at `root` (its pyproject.toml and its packages, not the installed ones)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([sys.executable, "-c", LINT], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def modules(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of the project's packages (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its code (inside functions too)."""
    mods = modules(root)

    def known(name: str) -> str | None:  # the longest prefix of `name` that is a module of the project
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps |= {m for t in targets if t.split(".")[0] in PACKAGES and (m := known(t)) and m != name}
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, iterative)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_layer_contracts_are_kept() -> None:
    res = lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def test_no_import_circle() -> None:
    graph = import_graph(ROOT)
    assert "bench.executors.sweep" in graph["bench.executors"] and "tasks.records" in graph["tasks.files"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """A copy of the tree where a foundation module imports the command line breaks the layers contract."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__", "data", "hparams",
                                                                                  "*.json"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "bench" / "core" / "progress.py"
    target.write_text(target.read_text(encoding="utf-8") + "\n\ndef _upward():\n    from bench.cli import app\n\n"
                      "    return app\n", encoding="utf-8")
    res = lint(tmp_path)
    assert res.returncode != 0, res.stdout + res.stderr
    assert "BROKEN" in res.stdout and "bench.core.progress -> bench.cli" in res.stdout, res.stdout + res.stderr
    graph = import_graph(tmp_path)
    assert "bench.cli" in graph["bench.core.progress"]
    assert find_cycle(graph) is not None  # bench.cli reaches bench.core.progress: the upward import closes a circle
