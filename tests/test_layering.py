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


def test_serving_reads_models_only_through_the_registry():
    """serving/ loads models through ``training.registry``'s public surface (``Registry.load``),
    never from the trainer, the encoder or the drift profile's module directly."""
    for f in (REPO / "serving").rglob("*.py"):
        tree = ast.parse(f.read_text(), filename=str(f))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] if node.module != "training" else [f"training.{a.name}" for a in node.names]
            else:
                continue
            wrong = [n for n in names if n.split(".")[0] == "training" and n != "training.registry"]
            assert not wrong, f"{f.relative_to(REPO)} imports {wrong}: serving/ may import only training.registry"
