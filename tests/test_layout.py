"""The package's shape: no import cycle inside vaeflow, the library never imports the
experiments, small modules, and the papers' settings travel with an installed wheel."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vaeflow"
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The vaeflow modules that ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name}
            for name, path in files.items()}


def test_no_import_cycle() -> None:
    graph = _graph()
    # A package's __init__ re-exporting its own submodules is not a cycle of the design.
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_the_experiments() -> None:
    experiments = {p.stem for p in (ROOT / "experiments").glob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        tops = {m.split(".")[0] for m in _imports(path)}
        assert not tops & experiments, f"{path} imports {tops & experiments}"


def test_modules_are_small_or_say_why() -> None:
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert "lines because" in doc, (
                f"{path.relative_to(ROOT)} has {lines} lines and no stated reason"
            )


@pytest.mark.slow
def test_installed_wheel_carries_the_papers_settings(tmp_path: Path) -> None:
    """A non-editable install, used from an empty folder, resolves the paper's FFJORD."""
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-compile", "--quiet", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    missing_tool = ("No module named", "invalid command 'bdist_wheel'")  # an old setuptools
    if build.returncode != 0 and any(m in build.stderr for m in missing_tool):
        pytest.skip(f"cannot build here: {build.stderr.strip().splitlines()[-1]}")
    assert build.returncode == 0, build.stderr
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "VAEFLOW_DATA": str(empty)}
    out = subprocess.run(
        [sys.executable, "-c", "import sys, vaeflow.cli; sys.exit(vaeflow.cli.main(sys.argv[1:]))",
         "train", "--dataset", "static_mnist", "--flow", "ffjord", "--print-config"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["flow_kwargs"]["hidden_dims"] == [1024, 1024]
    assert shown["flow_kwargs"]["rank"] == 64 and shown["flow_kwargs"]["num_blocks"] == 2
    assert shown["num_parameters"] == 145_473_121
    import_path = subprocess.run(
        [sys.executable, "-c", "import vaeflow; print(vaeflow.__file__)"],
        cwd=empty, env=env, capture_output=True, text=True, timeout=60,
    ).stdout
    assert str(target) in import_path  # the installed copy, not the checkout
