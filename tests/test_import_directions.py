"""The import directions of ``shared/DESIGN.md``, read from the source (every import statement, also
the ones inside functions)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lorkd.utils import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "lorkd"


def _imported_modules(path: Path) -> set[str]:
    """The absolute module names a file imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts[:-1])
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def _project_imports(folder: str) -> dict[str, set[str]]:
    """{file: the lorkd/callbacks modules it imports} for every file below ``lorkd/<folder>``."""
    found = {}
    for path in sorted((PACKAGE / folder).rglob("*.py")):
        imported = {name for name in _imported_modules(path) if name.split(".")[0] in ("lorkd", "callbacks")}
        found[str(path.relative_to(PROJECT_ROOT))] = imported
    return found


def test_the_parser_sees_relative_and_nested_imports() -> None:
    imports = _imported_modules(PACKAGE / "models" / "sat.py")
    assert "lorkd.models.decoder" in imports and "torch" in imports


def test_models_import_nothing_else_of_the_project() -> None:
    wrong = {
        path: sorted(name for name in names if not name.startswith("lorkd.models"))
        for path, names in _project_imports("models").items()
    }
    assert not {path: names for path, names in wrong.items() if names}


@pytest.mark.parametrize("forbidden", ["lorkd.models", "lorkd.experts", "lorkd.modules", "lorkd.checkpoints"])
def test_data_imports_no_model(forbidden: str) -> None:
    wrong = {
        path: sorted(name for name in names if name == forbidden or name.startswith(forbidden + "."))
        for path, names in _project_imports("data").items()
    }
    assert not {path: names for path, names in wrong.items() if names}


def test_nothing_in_lorkd_imports_the_top_level_callbacks() -> None:
    wrong = {
        path: sorted(name for name in names if name.split(".")[0] == "callbacks")
        for path, names in _project_imports("").items()
    }
    assert not {path: names for path, names in wrong.items() if names}
