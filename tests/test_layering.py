"""The dependency rule of docs/architecture.md holds in the imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OURS = {"governance", "lakehouse", "features", "training", "serving", "lakewarden"}
ALLOWED = {
    "governance": set(),
    "lakehouse": {"governance"},
    "features": {"governance", "lakehouse"},
    "training": {"governance", "features"},
    "serving": {"governance", "features", "training"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & OURS


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_only_what_the_rule_allows(layer: str):
    files = list((REPO / layer).rglob("*.py"))
    assert files, f"{layer}/ has no Python files"
    for f in files:
        wrong = imported_packages(f) - ALLOWED[layer] - {layer}
        assert not wrong, f"{f.relative_to(REPO)} imports {sorted(wrong)}, which {layer}/ may not import"
