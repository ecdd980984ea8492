"""adapters_store sits below server: it may import kernels, never server (DESIGN: kernels <- adapters_store <- server)."""

from __future__ import annotations

import ast
from pathlib import Path

import adapters_store

PACKAGE = Path(adapters_store.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_adapters_store_never_imports_server_or_pickle() -> None:
    sources = sorted(PACKAGE.rglob("*.py"))
    assert sources
    for path in sources:
        for module in _imported_modules(path):
            top = module.split(".")[0]
            assert top not in ("server", "bench", "pickle"), f"{path.name} imports {module}"
