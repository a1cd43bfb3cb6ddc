"""Every verb decides and audits itself: a library caller who skips the command line skips nothing.

Each user-visible action is a library function that takes the actor, asks the gate, writes the
audit record and returns a typed result. Here each is called as a notebook or a scheduler would
call it, by an actor who holds no role: it must be refused by the gate's stage rule, and the deny
must be in the audit log. Nothing exists yet in the workspace (no table, no model, no request),
so a verb that looked anything up before asking the gate would fail here with another error —
a refused actor must not learn whether a table, a model or a request exists.

tests/test_commands_layer.py holds the other half: the command layer itself never touches the
gate or the audit log.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from governance.errors import AccessDenied

NOBODY = "nobody"  # no role in policies/roles.yaml
TOKEN = "sub_" + "a" * 26
REQ = "req_000000000000"  # no such request: a refused actor must not learn that


def _verbs(tmp: Path) -> dict[str, tuple[str, Callable[[Any, Any], Any]]]:
    """verb -> (the stage it must ask for first, a call of it as a library user)."""
    from features.store import Features
    from governance.audit_ops import query_audit, verify_audit
    from governance.erasure import (
        file_request, list_requests, request_status, run_pending, run_request, verify_certificate,
    )
    from governance.gate import check_access
    from governance.key_ops import key_status, rotate_kek
    from governance.lineage_ops import lineage_of
    from governance.report import build_report
    from lakewarden.pipeline import checkout, run_step, summary
    from lakehouse.catalog import TableRef
    from lakehouse.ingest import ingest
    from lakehouse.maintenance import optimize, vacuum
    from lakehouse.retention import enforce_retention
    from lakehouse.silver import build_silver
    from lakehouse.sql import run_query
    from lakehouse.trino import trino_down, trino_sync, trino_up
    from serving.deploy import deploy, stop_deployments
    from serving.model import serve
    from serving.monitor import monitor_model
    from training.flow import train_model
    from training.registry import Registry

    kek = tmp / "new.kek"
    silver = TableRef.parse("silver.customers")
    return {
        "query": ("query", lambda ws, a: run_query(ws, a, "SELECT count(*) FROM customers")),
        "query on trino": ("query", lambda ws, a: run_query(ws, a, "SELECT 1 FROM customers", engine="trino")),
        "ingest": ("ingest", lambda ws, a: ingest(ws, a, "customers", [tmp / "customers.csv"])),
        "silver": ("ingest", lambda ws, a: build_silver(ws, a, "customers")),
        "optimize": ("maintain", lambda ws, a: optimize(ws, a, silver)),
        "vacuum": ("maintain", lambda ws, a: vacuum(ws, a, silver, dry_run=True)),
        "enforce retention": ("maintain", lambda ws, a: enforce_retention(ws, a, dry_run=True)),
        "gate check": ("train", lambda ws, a: check_access(ws, a, "train", dataset="customers", purpose="credit_scoring")),
        "audit verify": ("audit", verify_audit),
        "audit query": ("audit", lambda ws, a: query_audit(ws, a, limit=5)),
        "audit report": ("audit", lambda ws, a: build_report(ws, a)),
        "key status": ("keys", key_status),
        "key rotation": ("keys", lambda ws, a: rotate_kek(ws, a, new_kek_file=kek)),
        "lineage": ("lineage", lambda ws, a: lineage_of(ws, a, "silver.customers")),
        "trino up": ("maintain", trino_up),
        "trino down": ("maintain", trino_down),
        "trino sync": ("maintain", trino_sync),
        "features apply": ("maintain", lambda ws, a: Features(ws).apply(a)),
        "features materialize": ("maintain", lambda ws, a: Features(ws).materialize(a)),
        "training set": ("features", lambda ws, a: Features(ws).training_set(
            a, purpose="credit_scoring", features=["customer_profile:income"], label="defaulted")),
        "online features": ("serve", lambda ws, a: Features(ws).online(
            a, purpose="credit_scoring", features=["customer_profile:income"], tokens=[TOKEN])),
        "approve": ("approve", lambda ws, a: Registry(ws).approve(a, "credit@1")),
        "deploy": ("deploy", lambda ws, a: deploy(ws, a, "credit@1", target="k8s", out_dir=tmp / "k8s")),
        "stop deployments": ("deploy", lambda ws, a: stop_deployments(ws, a, all_models=True)),
        "serve": ("serve", lambda ws, a: serve(ws, "credit@1", a, port=1)),
        "monitor": ("serve", lambda ws, a: monitor_model(ws, a, "credit@1")),
        "train": ("features", lambda ws, a: train_model(ws, a, name="credit", features=["customer_profile:income"],
                                                        label="defaulted", purpose="credit_scoring")),
        "pipeline ingest step": ("ingest", lambda ws, a: run_step(ws, a, "ingest", _params(tmp))),
        "pipeline checkout": ("maintain", lambda ws, a: checkout(ws, a, tmp / "out", manifest=tmp / "silver.json")),
        "pipeline summary": ("audit", summary),
        "erasure request": ("request", lambda ws, a: file_request(ws, a, "erase", ["C-000000001"])),
        "access request": ("request", lambda ws, a: file_request(ws, a, "access", ["C-000000001"], out_dir=tmp / "x")),
        "run a request": ("request", lambda ws, a: run_request(ws, a, REQ)),
        "run pending requests": ("request", run_pending),
        "list requests": ("request", list_requests),
        "request status": ("request", lambda ws, a: request_status(ws, a, REQ)),
        "erasure certificate": ("request", lambda ws, a: verify_certificate(ws, a, REQ)),
    }


def _params(tmp: Path) -> Path:
    p = tmp / "params.yaml"
    p.write_text("sources: {customers: customers.csv}\n"
                 "train: {features: ['customer_profile:income'], label: defaulted, purpose: credit_scoring}\n")
    return p


VERBS = sorted(_verbs(Path("/nonexistent")))


@pytest.mark.parametrize("verb", VERBS)
def test_a_verb_refuses_an_actor_without_the_stage_and_audits_the_deny(verb: str, workspace, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    stage, call = _verbs(tmp_path)[verb]
    monkeypatch.chdir(tmp_path)  # no pipeline manifests, params or landing files of this repository
    (tmp_path / "customers.csv").write_text("customer_id,email\nc1,a@example.org\n")
    with pytest.raises(AccessDenied) as denied:
        call(workspace, workspace.actor(NOBODY))
    assert denied.value.decision.rule_ids == (f"roles/stages/{stage}",), denied.value.decision
    workspace.audit.flush()
    events = workspace.audit.query(actor=NOBODY, action="gate.decide").to_pylist()
    assert [(e["outcome"], e["stage"], e["rule_ids"]) for e in events] == [("deny", stage, f"roles/stages/{stage}")]


def test_acting_in_a_role_one_does_not_hold_is_a_deny_in_the_log(workspace):
    from lakehouse.sql import run_query

    ana = workspace.actor("ana")
    assert "compliance_officer" not in ana.roles
    with pytest.raises(AccessDenied) as denied:
        run_query(workspace, ana, "SELECT 1", role="compliance_officer")
    assert denied.value.decision.rule_ids == ("builtin/role-not-held",)
    workspace.audit.flush()
    (event,) = workspace.audit.query(actor="ana", action="gate.decide").to_pylist()
    assert (event["outcome"], event["rule_ids"]) == ("deny", "builtin/role-not-held")
    assert '"role":"compliance_officer"' in event["details"]
