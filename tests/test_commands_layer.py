"""The command layer only parses, calls one verb and renders; and no module imports itself in a circle.

The verbs (tests/test_verbs.py) are the only place that decides and audits. A command module
that reached for the gate, the audit log, the key ring or the lineage store would be a lock that
a library caller — a notebook, a scheduler, a future REST API — walks around.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("governance", "lakehouse", "features", "training", "serving", "lakewarden")
COMMAND_LAYER = sorted((REPO / "lakewarden" / "commands").glob("*.py")) + [REPO / "lakewarden" / "cli.py"]

# Attributes of a workspace that only verbs may touch, and the calls that decide or audit.
KERNEL_PARTS = {"gate", "audit", "keyring", "lineage"}
DECIDING_CALLS = {"enforce", "decide", "narrow", "require_stage", "check_stage"}
# Modules and names a command has no use for: the verbs hold the gate and the audit log.
KERNEL_IMPORTS = {"governance.audit"}
KERNEL_NAMES = {"Gate", "AuditLog", "KeyRing", "LineageStore", "Decision"}


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in KERNEL_PARTS:
            out.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.Call):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
            if name in DECIDING_CALLS or name == "Decision":
                out.append(f"line {node.lineno}: {name}(...)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in KERNEL_IMPORTS:
                out.append(f"line {node.lineno}: from {node.module} import ...")
            out += [f"line {node.lineno}: imports {a.name}" for a in node.names
                    if a.name in KERNEL_NAMES and not _type_only(tree, node)]
    return out


def _type_only(tree: ast.Module, node: ast.stmt) -> bool:
    """Imported under ``if TYPE_CHECKING:`` (for annotations, never called)."""
    for block in ast.walk(tree):
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test) and node in block.body:
            return True
    return False


def test_the_command_layer_exists_and_is_split_by_group():
    names = {p.stem for p in COMMAND_LAYER}
    assert {"cli", "audit", "keys", "lakehouse", "requests", "pipeline", "trino"} <= names


@pytest.mark.parametrize("path", COMMAND_LAYER, ids=lambda p: str(p.relative_to(REPO)))
def test_a_command_module_never_decides_or_audits(path: Path):
    assert not _offences(path), f"{path.relative_to(REPO)} decides or audits itself (call a verb): {_offences(path)}"


def test_the_check_catches_a_command_that_decides(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("from governance.gate import Decision\n"
                   "def cmd(ws, actor):\n    ws.gate.enforce('keys', actor, None)\n    ws.audit.record('x')\n")
    assert len(_offences(bad)) >= 4


# -- import cycles ------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _import_time_edges(path: Path, name: str, known: set[str]) -> set[str]:
    """Modules ``name`` imports when it is imported: top-level statements only, not inside
    functions (lazy imports) nor under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()

    def visit(stmts: list[ast.stmt]) -> None:
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for sub in getattr(node, block, []) or []:
                        visit(sub.body if isinstance(sub, ast.ExceptHandler) else [sub])
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join([*pkg, *([base] if base else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    out.add(sub if sub in known else base)

    visit(tree.body)
    edges = set()
    for m in out:  # importing a.b.c imports a and a.b too
        parts = m.split(".")
        edges.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return {e for e in edges if e in known and e != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_no_module_imports_itself_in_a_circle():
    mods = _modules()
    known = set(mods)
    graph = {}
    for name, path in mods.items():
        edges = _import_time_edges(path, name, known)
        # A package's own __init__ is imported before any of its modules: not an edge back.
        graph[name] = {e for e in edges if not name.startswith(e + ".")}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# -- a command maps its arguments to one verb ---------------------------------------------------
def _run(args: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    from lakewarden.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            main(args)
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue()


class _Recorder:
    """Stands in for a verb: records how the command called it and returns a canned typed result."""

    def __init__(self, result: object) -> None:
        self.result = result
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args: object, **kwargs: object) -> object:
        self.calls.append((args, kwargs))
        return self.result


CASES = {
    "keys rotate": (["keys", "rotate", "--new-kek-file", "new.key"], "governance.key_ops", "rotate_kek",
                    lambda: __import__("governance.key_ops", fromlist=["Rotation"]).Rotation(3, "kek-a", "kek-b", "{x}"),
                    {"new_kek_file": Path("new.key"), "new_kek_env": None}),
    "keys status": (["keys", "status"], "governance.key_ops", "key_status", lambda: {"subjects": 0}, {}),
    "lineage show": (["lineage", "show", "silver.customers", "--direction", "up", "--depth", "2"],
                     "governance.lineage_ops", "lineage_of",
                     lambda: __import__("governance.lineage_ops", fromlist=["LineageView"]).LineageView("x", None, None),
                     {"direction": "up", "depth": 2}),
    "gate check": (["gate", "check", "train", "--dataset", "customers", "--purpose", "credit_scoring",
                    "--columns", "income, region"], "governance.gate", "check_access", None,
                   {"dataset": "customers", "purpose": "credit_scoring", "columns": ["income", "region"], "layer": None,
                    "model": None, "epsilon": None, "epsilon_spent": None}),
    "sql": (["sql", "SELECT 1", "--role", "analyst", "--engine", "trino", "--max-rows", "5"], "lakehouse.sql", "run_query",
            None, {"role": "analyst", "engine": "trino", "max_rows": 5, "version": None, "as_of": None}),
    "trino down": (["trino", "down"], "lakehouse.trino", "trino_down", lambda: None, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_command_calls_its_verb_with_the_arguments_mapped(case: str, project: Path, monkeypatch: pytest.MonkeyPatch):
    import importlib

    args, module, verb, result, expected = CASES[case]
    if result is None:  # a real result type for the renderer: build it from the real verb's module
        if verb == "check_access":
            from governance.gate import Actor, Decision, Resource
            from governance.stages import Stage

            made = Decision(True, ("allowed",), ("roles/x/stages/train",), Stage.TRAIN, Actor("carla", ("x",)),
                            Resource.dataset("customers"))
        else:
            import pyarrow as pa

            from lakehouse.sql import QueryResult

            made = QueryResult(pa.table({"a": [1]}), (), {}, {})
    else:
        made = result()
    rec = _Recorder(made)
    monkeypatch.setattr(importlib.import_module(module), verb, rec)
    monkeypatch.chdir(project)
    code, out = _run(["--as", "carla", *args])
    assert code == 0, out
    assert len(rec.calls) == 1, rec.calls
    (ws, actor, *_), kwargs = rec.calls[0]
    assert actor.name == "carla"
    for k, v in expected.items():
        assert kwargs.get(k) == v, (k, kwargs)
