"""The package's rooms import only below themselves (docs/ARCHITECTURE.md has the map).

Every import in src/exo_tools, lazy and type-checking ones included, is resolved to the
room it comes from; a room may use only the rooms listed for it here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "exo_tools"

# Each room and the rooms it may import (besides itself). Top-level modules other than
# the composition root are rooms of their own.
ALLOWED: dict[str, frozenset[str]] = {
    "types": frozenset(),
    "proto": frozenset(),
    "blas": frozenset(),
    "tools": frozenset({"types"}),
    "models": frozenset({"types"}),
    "constraints": frozenset({"types", "tools", "models"}),
    "engine": frozenset({"types", "models", "constraints"}),
    "cluster": frozenset({"types", "proto"}),
    "placement": frozenset({"types", "proto", "cluster", "engine", "models", "constraints"}),
    "serving": frozenset({"types", "tools", "constraints", "models"}),
    "api": frozenset({"types", "serving", "tools", "constraints", "models"}),
}
# The composition root wires every room together.
ROOT_MODULES = frozenset({"__init__", "__main__", "cli", "node"})


def _room(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imported_rooms(path: Path, package: Path = PACKAGE) -> set[tuple[str, int]]:
    """(room, line) of every exo_tools import in the module at `path` of `package`."""
    module_parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if module_parts[-1] == "__init__":
        module_parts.pop()
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[list[str]] = []
        if isinstance(node, ast.Import):
            targets = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                is_package = path.name == "__init__.py"
                base = module_parts[: len(module_parts) - node.level + (1 if is_package else 0)]
                target = base + (node.module.split(".") if node.module else [])
                # `from . import x` names submodules: each is its own target.
                names = [[*target, alias.name] for alias in node.names]
                targets = [target] if node.module else names
            elif node.module:
                targets = [node.module.split(".")]
        for target in targets:
            # The package's own attributes (its __version__) belong to no room.
            if len(target) > 1 and target[0] == "exo_tools" and not target[1].startswith("__"):
                found.add((target[1], node.lineno))
    return found


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "proto" not in p.relative_to(PACKAGE).parts)


def test_every_room_is_mapped() -> None:
    rooms = {_room(path) for path in _modules()} - ROOT_MODULES
    assert rooms <= set(ALLOWED), f"rooms without a rule: {sorted(rooms - set(ALLOWED))}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_only_below(path: Path) -> None:
    room = _room(path)
    if room in ROOT_MODULES:
        return
    allowed = ALLOWED[room] | {room}
    wrong = sorted(
        f"line {line}: exo_tools.{target}"
        for target, line in _imported_rooms(path)
        if target not in allowed
    )
    assert not wrong, f"{room}/ may import only {sorted(allowed)}; {path.name} imports {wrong}"


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    """A check that cannot fail is no check: upward imports in each form are caught."""
    module = tmp_path / "exo_tools" / "engine" / "bad.py"
    module.parent.mkdir(parents=True)
    module.write_text(
        "from ..api.server import create_app\n"
        "from .. import serving\n"
        "def lazy():\n"
        "    import exo_tools.cluster.wire\n"
        "from .core import StageEngine\n"
    )
    rooms = {room for room, _ in _imported_rooms(module, tmp_path / "exo_tools")}
    assert rooms == {"api", "serving", "cluster", "engine"}
