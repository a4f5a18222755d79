"""The package's layers: a folder per role, and lower folders never import higher ones.

api cli demo            the faces (and the package's __init__)
live/  batch/  mockserver/    the executors and the built-in endpoint; none knows another
show/                   what a user sees of a job
job/                    the job folder as durable state
errors records reader config stats answers cost    the ground floor
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchq"

GROUND = {"errors", "records", "reader", "config", "stats", "answers", "cost"}
LAYERS = {"job": 1, "show": 2, "live": 3, "batch": 3, "mockserver": 3}
FACES = {"api", "cli", "demo", "auto", "__init__", "__main__"}


def _part(module: str) -> str:
    """``batchq.live.runner`` -> ``live``; ``batchq.errors`` -> ``errors``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(part: str) -> int:
    if part in GROUND:
        return 0
    if part in FACES:
        return 4
    return LAYERS[part]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("batchq"):
            if node.module == "batchq":  # from batchq import __version__ / a subpackage
                found.update(f"batchq.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("batchq"))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in MODULES:
        rel = path.relative_to(PACKAGE)
        _layer(rel.parts[0].removesuffix(".py"))  # KeyError names a module left out


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_a_higher_or_sibling_role(path: Path) -> None:
    own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    for module in _imports(path):
        other = _part(module)
        if other in (own, "__version__"):
            continue
        mine, theirs = _layer(own), _layer(other)
        # the executors are peers that never know each other; other layers may share
        assert theirs < mine or theirs == mine != 3, f"{path.name} ({own}) imports {module}"
