"""docs/roles.md (which role each command needs) stays true to the code.

* every command of the CLI is in ``lakewarden.command_stages.COMMAND_STAGES``, and nothing else;
* the document's table is the one rendered from that map and policies/roles.yaml;
* each command, run by a user who holds no role, is refused by the stage the map lists first
  (``roles/stages/<stage>``) — or, where the map says "not gated", asks the gate nothing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from pathlib import Path

import pytest
import typer

from lakewarden.command_stages import COMMAND_STAGES, DOC, parse_table, render_table

REPO = Path(__file__).resolve().parents[1]
TOKEN = "sub_" + "a" * 26
REQ = "req_000000000000"


def _cli_commands() -> set[str]:
    from lakewarden.cli import app

    def walk(c, prefix=()):  # noqa: ANN001, ANN202
        if hasattr(c, "commands"):
            for n, sub in c.commands.items():
                yield from walk(sub, (*prefix, n))
        else:
            yield " ".join(prefix)

    return set(walk(typer.main.get_command(app)))


def test_every_command_is_listed():
    cli = _cli_commands()
    assert cli - set(COMMAND_STAGES) == set(), "add these commands to lakewarden/command_stages.py"
    assert set(COMMAND_STAGES) - cli == set(), "these are not commands any more"


def test_the_document_holds_the_rendered_table():
    text = DOC.read_text(encoding="utf-8")
    assert render_table() in text, "run: python -m lakewarden.command_stages --write"
    rows = parse_table(text)
    assert rows["features apply"]["stages"] == "`maintain`" and "data_engineer" in rows["features apply"]["roles"]
    assert rows["sql"]["roles"] == "data_engineer, analyst, data_scientist, compliance_officer"
    assert rows["models list"]["stages"] == "not gated"


def _args(t: Path) -> dict[str, list[str]]:
    """Arguments that bring each command to its first gate decision (or, ungated, to its end)."""
    return {
        "audit query": [], "audit report": ["--html", str(t / "r.html")], "audit verify": [],
        "deploy": ["credit@1", "--target", "k8s", "--out", str(t / "k8s")],
        "deployments list": [], "deployments stop": ["--all"],
        "features apply": [], "features materialize": [],
        "features online": ["--features", "customer_profile:income", "--purpose", "credit_scoring", "--tokens", TOKEN],
        "features training-set": ["--features", "customer_profile:income", "--purpose", "credit_scoring"],
        "generate": ["--out", str(t / "landing2"), "--people", "5"],
        "login": [], "logout": [],
        "ingest": ["customers", str(t / "kept" / "customers.csv")],
        "init": [str(t / "elsewhere")], "keys new-kek": ["--out", str(t / "k2.key")],
        "keys rotate": ["--new-kek-file", str(t / "new.key")], "keys rotate-mask": [], "keys status": [],
        "lineage show": ["silver.customers"], "models approve": ["credit@1"], "models list": [],
        "models show": ["credit@1"], "monitor": ["--model", "credit@1"],
        "policy check": [], "policy schema": ["--out", str(t / "schema.json")], "policy show": ["customers"],
        "policy suggest": [str(t / "kept" / "customers.csv"), "--out", "-"], "privacy status": [], "privacy risk": ["customers"],
        "requests access": ["--subject", "C-000000001", "--out", str(t / "export")],
        "requests erase": ["--subject", "C-000000001"], "requests certificate": [REQ], "requests list": [],
        "requests status": [REQ], "requests run": [REQ], "trino sync": [], "pipeline summary": [],
        "pipeline checkout": ["--out", str(t / "restored")], "pipeline render": [], "pipeline trace": [],
        "serve": ["--model", "credit@1", "--port", "1"],
        "silver": ["customers"], "sql": ["SELECT count(*) FROM customers"],
        "tables describe": ["silver.customers"], "tables history": ["silver.customers"], "tables list": [],
        "tables optimize": ["silver.customers"], "tables vacuum": ["silver.customers"],
        "tables enforce-retention": ["--dry-run"],
        "train": ["--name", "m", "--features", "customer_profile:income", "--label", "defaulted",
                  "--purpose", "credit_scoring"],
        "trino down": [], "trino up": [], "trino render": ["--profile", "production", "--out", str(t / "trino")],
        "trino status": [],
        "stream": ["transactions", "--topic", "tx", "--bootstrap", "127.0.0.1:1", "--until-idle", "1"],
        "produce": ["customers", str(t / "kept" / "customers.csv"), "--topic", "tx", "--bootstrap", "127.0.0.1:1"],
        "broker start": ["--port", "1"], "broker stop": [],
        "broker create-topic": ["tx", "--bootstrap", "127.0.0.1:1"],
    }


# Reached only with state this test does not build (a running Trino, the reference pipeline's
# manifests and params): their stages are read from the code, not probed.
# `requests run` finds the request (or the open ones) before it asks the gate, so a role-less user
# reaches the gate only with a request on file.
# gate check asks for the stage it is given; pipeline stage asks for its step's stages (tests/test_verbs.py).
NOT_PROBED = {"gate check", "pipeline stage"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_a_user_with_no_role_is_refused_by_the_listed_stage(project: Path, monkeypatch: pytest.MonkeyPatch):
    import governance.gate as gate_mod
    from governance.keys import generate_kek_file
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from lakewarden.cli import main
    from training.profile import Profile
    from training.registry import Registry

    t = project
    ws = Workspace.open(t / "lakewarden.yaml")
    res = generate(t / "landing", people=40, transactions_per_person=0, seed=2)
    (t / "kept").mkdir()
    shutil.copy(res.files["customers"], t / "kept" / "customers.csv")  # ingest removes its landing file
    ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
    build_silver(ws, ws.actor("dana"), "customers")
    ref = Profile.from_samples({"income": [1.0, 2.0, 3.0, 4.0]}, [0.1, 0.2, 0.3, 0.4], bins=2)
    Registry(ws).register(ws.actor("sam"), name="credit", dataset="customers",
                          files={"model.pt": b"w", "reference.json": ref.to_json().encode()},
                          card_fields={"purpose": "credit_scoring", "features": ["customer_profile:income"],
                                       "label": "defaulted", "privacy": {"epsilon": 3.0, "delta": 1e-5, "accountant": "prv"}})
    ws.close()
    generate_kek_file(t / "new.key")
    asked: list[str] = []
    real = gate_mod.Gate.decide

    def decide(self, stage, actor, resource, context=None):  # noqa: ANN001, ANN202
        if actor.name == "nobody":
            asked.append(gate_mod.Stage(stage).value)
        return real(self, stage, actor, resource, context)

    monkeypatch.setattr(gate_mod.Gate, "decide", decide)
    monkeypatch.chdir(t)
    wrong = []
    args = _args(t)
    assert set(args) | NOT_PROBED == set(COMMAND_STAGES)
    for cmd, extra in args.items():
        asked.clear()
        err = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            warnings.simplefilter("ignore")
            try:
                main(["--as", "nobody", *cmd.split(), *extra])
                code = 0
            except SystemExit as e:
                code = e.code
        want = COMMAND_STAGES[cmd]
        got = asked[0] if asked else None
        if want and (got != want[0] or code != 3 or f"roles/stages/{want[0]}" not in err.getvalue()):
            wrong.append(f"{cmd}: expected a refusal by roles/stages/{want[0]}, got stage {got}, exit {code}: "
                         f"{err.getvalue().strip()[:200]}")
        if not want and (asked or code == 3):
            wrong.append(f"{cmd}: listed as not gated, but asked {asked} (exit {code})")
    assert not wrong, "\n".join(wrong)
    assert os.environ.get("LAKEWARDEN_USER") is None
