"""The workspace as the stages will use it: lazy parts, shredding, rotation, and no plaintext PII on disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from governance.errors import AuditError, KekUnavailable, SubjectShredded
from governance.gate import Resource
from governance.keys import generate_kek_b64
from governance.lineage import DatasetRef
from governance.workspace import Workspace

PEOPLE = {
    "C-000117": ("Ada Lovelace", "ada.lovelace@example.org", "+44 20 7946 0958"),
    "C-000342": ("Grace Hopper", "grace.hopper@example.org", "+1 202-555-0147"),
}


def test_parts_open_lazily_policies_need_no_kek(project: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LAKEWARDEN_KEK")
    ws = Workspace.open(project / "lakewarden.yaml")
    assert "customers" in ws.policies.datasets
    with pytest.raises(KekUnavailable, match="LAKEWARDEN_KEK"):
        ws.keyring  # noqa: B018
    ws.close()


def test_nothing_written_holds_plaintext_personal_data(project: Path, workspace: Workspace):
    ring, gate = workspace.keyring, workspace.gate
    for subject_id, (name, email, phone) in PEOPLE.items():
        token = ring.token_for(subject_id)
        for column, value in (("name", name), ("email", email), ("phone", phone)):
            ring.seal(value, token=token, dataset="customers_vault", column=column)
        gate.decide("query", workspace.actor("carla"), Resource.table("customers", "vault"), {"subject_token": token})
        workspace.audit.record("request.access", actor="carla", outcome="ok", subject_token=token,
                               details={"exported_items": 3, "note": f"sent to {email}"})
    workspace.lineage.emit("ingest.customers", inputs=[DatasetRef("landing.customers", kind="file")],
                           outputs=[DatasetRef("bronze.customers", version=0)])
    workspace.close()
    assert workspace.audit.verify().ok
    needles = [v.encode() for sid, vals in PEOPLE.items() for v in (sid, *vals)]
    scanned = []
    for f in project.rglob("*"):
        if f.is_file() and "policies" not in f.parts:
            data = f.read_bytes()
            scanned.append(f.relative_to(project).as_posix())
            for n in needles:
                assert n not in data, f"{n!r} found in {f}"
    # the key store, the audit events and checkpoints, the head, and lineage were all among them
    for part in ("keystore.db", "_audit/events/", "_audit/events/_delta_log/", "audit/HEAD.json", "_lineage/events/"):
        assert any(part in s for s in scanned), (part, scanned)


def test_shredding_makes_every_copy_unreadable(workspace: Workspace):
    ring = workspace.keyring
    token = ring.token_for("C-000117")
    blob = ring.seal("ada.lovelace@example.org", token=token, dataset="customers_vault", column="email")
    copy = bytes(blob)  # e.g. the same bytes in Delta history or the DVC cache
    ring.shred(token)
    for b in (blob, copy):
        with pytest.raises(SubjectShredded):
            ring.open(b, token=token, dataset="customers_vault", column="email")
    assert ring.token_for("C-000117", create=False) is None  # the id no longer links to the old token


def test_kek_rotation_keeps_data_and_audit_readable(project: Path, monkeypatch: pytest.MonkeyPatch):
    ws = Workspace.open(project / "lakewarden.yaml")
    token = ws.keyring.token_for("C-000342")
    blob = ws.keyring.seal("Grace Hopper", token=token, dataset="customers_vault", column="name")
    ws.audit.record("x", actor="carla", outcome="ok")
    ws.close()
    new = generate_kek_b64()
    monkeypatch.setenv("NEW_KEK", new)
    ws = Workspace.open(project / "lakewarden.yaml")
    from governance.keys import kek_from_env

    assert ws.keyring.rotate_kek(kek_from_env("NEW_KEK")) >= 3  # the DEK plus system keys
    ws.close()
    monkeypatch.setenv("LAKEWARDEN_KEK", new)
    ws = Workspace.open(project / "lakewarden.yaml")
    assert ws.keyring.open(blob, token=token, dataset="customers_vault", column="name") == b"Grace Hopper"
    ws.audit.record("y", actor="carla", outcome="ok")  # same signing key after rotation
    ws.close()
    assert ws.audit.verify().ok


def test_a_pinned_audit_key_refuses_another(project: Path):
    cfg = project / "lakewarden.yaml"
    cfg.write_text(cfg.read_text().replace("audit: {checkpoint_every: 5}", "audit: {checkpoint_every: 5, public_key: '" + "ab" * 32 + "'}"))
    ws = Workspace.open(cfg)
    with pytest.raises(AuditError, match="does not match audit.public_key"):
        ws.audit  # noqa: B018
