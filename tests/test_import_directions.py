"""The import directions of ``shared/DESIGN.md`` ("Which way imports run"), read from the source of every
module of ``lorkd/`` and ``callbacks/`` (every import statement, also the ones inside functions):

- ``lorkd.models`` imports nothing else of the project; ``lorkd.experts`` only experts and models;
- ``lorkd.data`` imports no model (nor the layers built on models);
- nothing in ``lorkd/`` imports the top-level ``callbacks/``;
- ``lorkd.checkpoints`` imports no ``lorkd.data``;
- command modules are leaves: no library module imports one, and only command modules hold
  ``python -m`` entry points (``if __name__ == "__main__":``);
- no import cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

from lorkd.utils import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "lorkd"
# the Hydra apps and their jobs: leaves, imported only by other commands (and root scripts, tests)
COMMANDS = ("lorkd.cli", "lorkd.commands")
# what lorkd.data may not import: models and everything built on them
ABOVE_DATA = (
    "lorkd.models", "lorkd.experts", "lorkd.modules", "lorkd.checkpoints", "lorkd.inference",
    "lorkd.evaluation", "lorkd.prompts", "lorkd.losses", "lorkd.memory", "lorkd.training", "lorkd.api",
)  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@cache
def modules() -> dict[str, Path]:
    """{module name: file} of every module of ``lorkd/`` and ``callbacks/``."""
    files = sorted([*PACKAGE.rglob("*.py"), *(PROJECT_ROOT / "callbacks").rglob("*.py")])
    return {module_name(path): path for path in files}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_modules(path: Path) -> set[str]:
    """The absolute names a file imports (relative imports resolved against its package); for
    ``from X import Y``, ``X.Y`` where it is one of the project's modules (as ``import X.Y``: the parent
    package's own imports are not counted), else ``X``."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(modules())
            names.update(submodules)
            if len(submodules) < len(node.names):
                names.add(base)
    return names


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The project module ``name`` loads: itself, else its closest enclosing module (None: not ours, or
    a namespace package such as ``lorkd.checkpoints``, which runs no code)."""
    known = set(known)
    while name and name not in known:
        if (PROJECT_ROOT / name.replace(".", "/")).is_dir():
            return None
        name = name.rpartition(".")[0]
    return name or None


@cache
def graph() -> dict[str, frozenset[str]]:
    """{module: the project modules it imports anywhere in its file}, explicit imports only."""
    known = modules()
    return {
        name: frozenset(
            target for target in (_resolve(i, known) for i in imported_modules(path)) if target and target != name
        )
        for name, path in known.items()
    }


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, frozenset[str]], importer: Iterable[str], forbidden: Iterable[str]) -> dict[str, list[str]]:
    """{module under ``importer``: the modules under ``forbidden`` it imports}."""
    importer, forbidden = tuple(importer), tuple(forbidden)
    found = {
        name: sorted(t for t in targets if _under(t, forbidden))
        for name, targets in graph.items()
        if _under(name, importer)
    }
    return {name: targets for name, targets in found.items() if targets}


def command_violations(graph: dict[str, frozenset[str]]) -> dict[str, list[str]]:
    """{library module: the command modules it imports}."""
    found = {
        name: sorted(t for t in targets if _under(t, COMMANDS))
        for name, targets in graph.items()
        if not _under(name, COMMANDS)
    }
    return {name: targets for name, targets in found.items() if targets}


def cycles(graph: dict[str, frozenset[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def has_main_block(path: Path) -> bool:
    """Whether the file has an ``if __name__ == "__main__":`` block (a ``python -m`` entry point)."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            sides = [node.test.left, *node.test.comparators]
            if any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) and any(
                isinstance(s, ast.Constant) and s.value == "__main__" for s in sides
            ):
                return True
    return False


# ---- the checker itself ------------------------------------------------------------------------------


def test_the_parser_sees_relative_and_nested_imports() -> None:
    imports = imported_modules(PACKAGE / "models" / "sat.py")
    assert "lorkd.models.decoder" in imports and "torch" in imports
    nested = imported_modules(PACKAGE / "cli.py")  # the apps import their jobs inside functions
    assert "lorkd.training" in nested


def test_the_graph_covers_every_module() -> None:
    found = graph()
    assert set(found) == {module_name(p) for p in [*PACKAGE.rglob("*.py"), *(PROJECT_ROOT / "callbacks").rglob("*.py")]}
    assert "lorkd.checkpoints.schema" in found["lorkd.checkpoints.lorkd_official"]  # from lorkd.checkpoints import schema


def test_the_checks_catch_what_they_guard() -> None:
    """Each check on a small graph holding one of the violations found before issue 25."""
    bad = {
        "lorkd.data.manifest": frozenset({"lorkd.cli"}),
        "lorkd.cli": frozenset({"lorkd.data.manifest"}),
        "lorkd.data.image_reader": frozenset({"lorkd.data.dicom"}),
        "lorkd.data.dicom": frozenset({"lorkd.data.image_reader"}),
        "lorkd.checkpoints.lorkd_official": frozenset({"lorkd.data.transforms"}),
        "lorkd.evaluation.pipeline": frozenset({"lorkd.commands.predict"}),
        "lorkd.commands.predict": frozenset(),
        "lorkd.data.transforms": frozenset(),
    }
    assert cycles(bad) == [["lorkd.cli", "lorkd.data.manifest"], ["lorkd.data.dicom", "lorkd.data.image_reader"]]
    assert violations(bad, ["lorkd.checkpoints"], ["lorkd.data"]) == {
        "lorkd.checkpoints.lorkd_official": ["lorkd.data.transforms"]
    }
    assert command_violations(bad) == {
        "lorkd.data.manifest": ["lorkd.cli"], "lorkd.evaluation.pipeline": ["lorkd.commands.predict"]
    }  # fmt: skip


# ---- the rules ---------------------------------------------------------------------------------------


def test_models_import_nothing_else_of_the_project() -> None:
    found = graph()
    assert not {
        name: sorted(t for t in targets if not _under(t, ["lorkd.models"]))
        for name, targets in found.items()
        if _under(name, ["lorkd.models"]) and any(not _under(t, ["lorkd.models"]) for t in targets)
    }


def test_experts_import_only_experts_and_models() -> None:
    found = graph()
    allowed = ["lorkd.experts", "lorkd.models"]
    assert not {
        name: sorted(t for t in targets if not _under(t, allowed))
        for name, targets in found.items()
        if _under(name, ["lorkd.experts"]) and any(not _under(t, allowed) for t in targets)
    }


@pytest.mark.parametrize("forbidden", ABOVE_DATA)
def test_data_imports_no_model(forbidden: str) -> None:
    assert not violations(graph(), ["lorkd.data"], [forbidden])


def test_nothing_in_lorkd_imports_the_top_level_callbacks() -> None:
    assert not violations(graph(), ["lorkd"], ["callbacks"])


def test_checkpoints_import_no_data() -> None:
    assert not violations(graph(), ["lorkd.checkpoints"], ["lorkd.data"])


def test_commands_are_leaves() -> None:
    """No library module (models, data, inference, evaluation, checkpoints, ...) imports a command module."""
    assert not command_violations(graph())


def test_python_m_entry_points_live_in_command_modules() -> None:
    library = [name for name, path in modules().items() if not _under(name, COMMANDS) and has_main_block(path)]
    assert not library


def test_no_import_cycle() -> None:
    assert not cycles(dict(graph()))
