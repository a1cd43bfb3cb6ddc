"""The audit head's witness: an S3 bucket with Object Lock (COMPLIANCE) the audit writer cannot rewrite.

What the log cannot show from inside, it shows against the witness: a rollback of both the events
table and the head file (a), and a log rewritten and re-signed with the real key (b). The store
refuses the writer's attempts to overwrite or delete a published head (c), and a publication that
fails keeps the events and is caught up later (d). The local tables are folders; the witness is the
session's versitygw (``objectstore``), in a bucket of its own created with Object Lock.
"""

from __future__ import annotations

import json
import re
import shutil
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deltalake import DeltaTable, write_deltalake

from governance.audit import EVENT_SCHEMA, GENESIS, AuditLog, canonical_lines, chain
from governance.witness import ObjectLockWitness, Witness, WitnessError, WitnessState, witness_uri_problem

from tests.test_audit import KEY, T0, Clock  # the audit tests' signing key and injected clock

BUCKET = "lw-witness"


@pytest.fixture(scope="module")
def s3(objectstore):
    """A boto3 client on the session's store (explicit credentials: no environment needed), and
    the witness bucket, created once with Object Lock (its heads cannot be deleted: a bucket of
    its own, under the session's temporary folder)."""
    import boto3
    from botocore.config import Config

    c = boto3.client("s3", endpoint_url=objectstore.endpoint, region_name=objectstore.region,
                     aws_access_key_id=objectstore.access_key, aws_secret_access_key=objectstore.secret_key,
                     config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
    try:
        c.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    except c.exceptions.BucketAlreadyOwnedByYou:
        pass
    return c


@pytest.fixture
def witness(s3) -> ObjectLockWitness:
    """A witness under a prefix of this test's own (retention: one day; the store's clock enforces it)."""
    return ObjectLockWitness(f"s3://{BUCKET}/t-{uuid.uuid4().hex[:12]}", retention_days=1, client=s3)


def make_log(root: Path, witness: Witness | None, *, key: Ed25519PrivateKey | None = KEY, every: int = 5) -> AuditLog:
    return AuditLog(str(root / "events"), str(root / "checkpoints"), root / "state", signing_key=key,
                    public_key=KEY.public_key(), checkpoint_every=every, clock=Clock(), witness=witness)


def fill(log: AuditLog, n: int) -> int:
    for i in range(n):
        log.record("gate.decide", actor=f"user{i % 3}", outcome="allow", stage="query",
                   resource=f"table:silver.t{i % 2}", details={"i": i})
    return log.flush()


def kinds(rep) -> list[str]:
    return [f.kind for f in rep.findings]


def drop_newest_commit(table_uri: str) -> None:
    """What an attacker does to roll a Delta table back: delete its newest commit file."""
    newest = max((Path(table_uri) / "_delta_log").glob("*.json"))
    newest.unlink()


# -- the good path --------------------------------------------------------------------------------
def test_every_flush_publishes_its_signed_head(tmp_path: Path, witness: ObjectLockWitness):
    log = make_log(tmp_path, witness)
    for _ in range(3):
        fill(log, 5)
    st = witness.read()
    hashes = DeltaTable(log.table_uri).to_pyarrow_table().sort_by("seq")["hash"].to_pylist()
    assert [(h.seq, h.hash) for h in st.heads] == [(4, hashes[4]), (9, hashes[9]), (14, hashes[14])]
    assert log.head()["hash"] == hashes[14]
    body = witness.fetch(st.heads[-1])
    assert body["lock"].startswith("COMPLIANCE until ")
    fields = ("seq", "hash", "signature")
    assert {k: body[k] for k in fields} == {k: log.head()[k] for k in fields}
    rep = log.verify(witness=True)
    assert rep.ok, rep.findings
    w = rep.to_dict()["witness"]
    assert (w["reachable"], w["heads"], w["last_seq"], w.get("unwitnessed")) == (True, 3, 14, None)
    assert w["checked"] == [f"witness {witness.uri} reachable: 3 heads, last seq 14; every witnessed head "
                            "compared with the log (1 bodies fetched)"]
    assert log.witness_pending is None


# -- (a) a rollback of the table and the head file ------------------------------------------------
def test_rollback_of_table_and_head_passes_plain_verify_but_not_the_witness(tmp_path: Path, witness):
    log = make_log(tmp_path, witness)
    fill(log, 5)
    fill(log, 5)
    head_then = (tmp_path / "state" / "HEAD.json").read_bytes()  # seq 9
    fill(log, 5)  # seq 10..14, witnessed
    # The attacker rolls back both tables (their newest commits) and the head file.
    drop_newest_commit(log.table_uri)
    drop_newest_commit(log.checkpoints_uri)
    (tmp_path / "state" / "HEAD.json").write_bytes(head_then)

    plain = log.verify()
    assert plain.ok and (plain.events, plain.checkpoints, plain.head_seq) == (10, 2, 9)  # consistent: undetectable

    rep = log.verify(witness=True)
    assert kinds(rep) == ["rolled-back"]
    f = rep.first
    assert f.seq == 10
    assert "the witness holds a signed head at seq=14" in f.message
    assert ("the log ends at seq=9: the log and its head were rolled back or truncated "
            "(events seq=10..14 are gone)") in f.message
    assert rep.witness["last_seq"] == 14 and "caught_up" not in rep.witness
    assert len(witness.read().heads) == 3  # a log that does not check out is never published


def test_rollback_then_new_events_is_still_found(tmp_path: Path, witness):
    """After a rollback the writer goes on from the rolled-back head: the witness then holds two
    heads for one seq, and the old ones no longer match the log."""
    log = make_log(tmp_path, witness)
    fill(log, 5)
    head_then = (tmp_path / "state" / "HEAD.json").read_bytes()
    fill(log, 5)
    drop_newest_commit(log.table_uri)
    drop_newest_commit(log.checkpoints_uri)
    (tmp_path / "state" / "HEAD.json").write_bytes(head_then)
    fill(log, 5)  # seq 5..9 again, other events: a second head for seq=9 on the witness
    assert log.verify().ok
    rep = log.verify(witness=True)
    assert kinds(rep) == ["witness-mismatch", "witness-conflict"]
    assert rep.findings[0].seq == 9 and rep.findings[1].seq == 9


# -- (b) a log rewritten and re-signed with the real (stolen) key ---------------------------------
def test_resigned_log_passes_plain_verify_but_not_the_witness(tmp_path: Path, witness):
    log = make_log(tmp_path, witness)
    for _ in range(3):
        fill(log, 5)
    tbl = DeltaTable(log.table_uri).to_pyarrow_table().sort_by("seq")
    details = tbl["details"].to_pylist()
    details[3] = json.dumps({"i": 3, "note": "nothing to see"}, separators=(",", ":"), sort_keys=True)
    tbl = tbl.set_column(tbl.schema.get_field_index("details"), "details", pa.array(details, pa.string()))
    prevs, hashes, h = [], [], GENESIS
    for line in canonical_lines(tbl):
        prevs.append(h)
        h = chain(h, line)
        hashes.append(h)
    tbl = tbl.set_column(tbl.schema.get_field_index("prev_hash"), "prev_hash", pa.array(prevs, pa.string()))
    tbl = tbl.set_column(tbl.schema.get_field_index("hash"), "hash", pa.array(hashes, pa.string()))
    # The attacker holds the KEK and the key store, so the signing key: rewrite, re-sign everything.
    shutil.rmtree(log.table_uri)
    shutil.rmtree(log.checkpoints_uri)
    write_deltalake(log.table_uri, tbl.cast(EVENT_SCHEMA), configuration={"delta.appendOnly": "true"})
    thief = make_log(tmp_path, None)
    thief._write_checkpoints([(s, hashes[s]) for s in (4, 9, 14)])
    thief._write_head(14, hashes[14])

    plain = make_log(tmp_path, None, key=None).verify()
    assert plain.ok, plain.findings  # every signature verifies: the key is the real one

    rep = log.verify(witness=True)
    assert kinds(rep) == ["witness-mismatch"]
    assert rep.first.seq == 4
    assert rep.first.message.startswith("event seq=4 differs from the head witnessed for it (stored ")
    assert "re-signed with the signing key" in rep.first.message
    assert len(witness.read().heads) == 3


# -- (c) the witness refuses the writer's overwrite and delete ------------------------------------
def test_witness_refuses_overwrite_and_delete_of_a_published_head(tmp_path: Path, witness, s3):
    import botocore.exceptions

    log = make_log(tmp_path, witness)
    fill(log, 5)
    [h] = witness.read().heads

    def refused(call, **kw) -> tuple[int, str]:
        with pytest.raises(botocore.exceptions.ClientError) as e:
            call(Bucket=BUCKET, Key=h.key, **kw)
        return e.value.response["ResponseMetadata"]["HTTPStatusCode"], e.value.response["Error"]["Code"]

    # the writer's own credentials (the same client that published)
    assert refused(s3.put_object, Body=b"{}", IfNoneMatch="*") == (412, "PreconditionFailed")
    assert refused(s3.delete_object, VersionId=h.version_id) == (403, "AccessDenied")
    assert refused(s3.delete_object, VersionId=h.version_id, BypassGovernanceRetention=True) == (403, "AccessDenied")
    soon = {"Mode": "COMPLIANCE", "RetainUntilDate": datetime.now(timezone.utc) + timedelta(seconds=1)}
    assert refused(s3.put_object_retention, VersionId=h.version_id, Retention=soon) == (403, "AccessDenied")
    gov = {"Mode": "GOVERNANCE", "RetainUntilDate": datetime.now(timezone.utc) + timedelta(days=2)}
    assert refused(s3.put_object_retention, VersionId=h.version_id, Retention=gov,
                   BypassGovernanceRetention=True) == (403, "AccessDenied")
    assert witness.publish(log.head()) is False  # a retried publication is a no-op

    # What versioning allows: a second version and a delete marker. Both are visible, the first stays.
    s3.put_object(Bucket=BUCKET, Key=h.key, Body=b'{"seq":4}')
    s3.delete_object(Bucket=BUCKET, Key=h.key)
    assert witness.fetch(h)["hash"] == h.hash
    rep = log.verify(witness=True)
    assert kinds(rep) == ["witness-tampered", "witness-tampered"]
    assert f"the witnessed head {h.key} was overwritten" in rep.findings[0].message
    assert f"someone tried to delete the witnessed head {h.key}" in rep.findings[1].message


def test_a_head_written_to_the_witness_without_the_key_is_forged_not_a_rollback(tmp_path: Path, witness):
    """Whoever holds the witness credentials but not the signing key can add heads; they are named
    as forged and do not pass for a rollback."""
    log = make_log(tmp_path, witness)
    fill(log, 5)
    other = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    from governance.audit import _signed_message

    for seq in (40, 41):
        witness.publish({"seq": seq, "hash": "ab" * 32, "signed_at": T0.isoformat(), "key_id": "x",
                         "signature": other.sign(_signed_message("head", seq, "ab" * 32)).hex()})
    rep = log.verify(witness=True)
    assert kinds(rep) == ["witness-forged"]
    assert rep.first.seq == 40 and rep.witness["forged"] == 2 and rep.witness["last_seq"] == 4


def test_a_bucket_without_object_lock_is_not_a_witness(tmp_path: Path, s3, objectstore):
    plain = ObjectLockWitness(f"s3://lakewarden/wit-{uuid.uuid4().hex[:8]}", retention_days=1, client=s3)
    with pytest.raises(WitnessError, match="has no Object Lock: it is not a witness"):
        plain.publish({"seq": 0, "hash": "0" * 64, "signed_at": "x", "key_id": "k", "signature": "00"})
    log = make_log(tmp_path, plain)
    assert fill(log, 3) == 3  # the flush does not fail; the head waits
    assert "has no Object Lock" in log.witness_pending["error"]


# -- (d) a publication that fails -------------------------------------------------------------------
class Flaky(Witness):
    """The real witness behind a switch: ``down`` makes every call fail as an unreachable store would."""

    def __init__(self, inner: ObjectLockWitness) -> None:
        self.inner, self.uri, self.down, self.calls = inner, inner.uri, False, 0

    def _gate(self) -> None:
        self.calls += 1
        if self.down:
            raise WitnessError(f"cannot write to the audit witness {self.uri}: connection refused")

    def publish(self, head: Any) -> bool:
        self._gate()
        return self.inner.publish(head)

    def read(self) -> WitnessState:
        return self.inner.read()

    def fetch(self, head: Any) -> dict[str, Any]:
        return self.inner.fetch(head)


def test_a_failed_publication_keeps_the_events_and_is_caught_up(tmp_path: Path, witness):
    flaky = Flaky(witness)
    log = make_log(tmp_path, flaky)
    fill(log, 5)
    flaky.down = True
    assert fill(log, 5) == 5  # no exception: the events are committed and signed
    assert fill(log, 2) == 2
    pend = log.witness_pending
    assert (pend["since_seq"], pend["head"]["seq"], pend["attempts"]) == (9, 11, 2)
    assert "connection refused" in pend["error"]
    assert log.verify().ok and log.verify().events == 12  # nothing lost

    rep = log.verify(witness=True)  # the witness is still down: detected, named
    assert kinds(rep) == ["witness-unpublished"]
    assert rep.first.seq == 5
    assert rep.first.message.startswith("events seq=5..11 are signed here but not witnessed: cannot write to the "
                                        "audit witness")
    assert rep.witness["unwitnessed"] == [5, 11] and rep.witness["last_seq"] == 4

    flaky.down = False
    rep = log.verify(witness=True)  # caught up by verify
    assert rep.ok, rep.findings
    assert rep.witness["caught_up"] == 11 and rep.witness["last_seq"] == 11
    assert log.witness_pending is None
    assert [h.seq for h in witness.read().heads] == [4, 11]

    flaky.down = True
    fill(log, 3)
    flaky.down = False
    fill(log, 1)  # the next flush's head covers the one that failed
    assert log.witness_pending is None
    assert [h.seq for h in witness.read().heads] == [4, 11, 15]
    assert log.verify(witness=True).ok


def test_a_head_never_published_is_caught_up_or_reported(tmp_path: Path, witness):
    """A writer that stopped between signing and publishing (or skipped the witness) leaves no
    record: verify finds the signed head ahead of the witness all the same."""
    log = make_log(tmp_path, witness)
    fill(log, 5)
    fill(make_log(tmp_path, None), 5)  # seq 5..9 signed, never published
    rep = make_log(tmp_path, witness, key=None).verify(witness=True)
    assert rep.ok and rep.witness["caught_up"] == 9

    fill(make_log(tmp_path, None), 5)
    flaky = Flaky(witness)
    flaky.down = True
    rep = make_log(tmp_path, flaky, key=None).verify(witness=True)
    assert kinds(rep) == ["witness-unpublished"]
    assert "events seq=10..14 are signed here but not witnessed" in rep.first.message


def test_unreachable_witness_is_a_finding_not_a_pass(tmp_path: Path, witness):
    class Down(Flaky):
        def read(self) -> WitnessState:
            raise WitnessError("cannot read the audit witness: connection refused")

    log = make_log(tmp_path, witness)
    fill(log, 5)
    rep = make_log(tmp_path, Down(witness), key=None).verify(witness=True)
    assert kinds(rep) == ["witness-unreachable"]
    assert rep.witness["reachable"] is False
    assert rep.witness["not_checked"] == ["rollback and re-signing: the witness was not reachable"]
    assert kinds(make_log(tmp_path, None).verify(witness=True)) == ["witness-missing"]


# -- configuration and the CLI --------------------------------------------------------------------
def test_config_witness_is_off_by_default_and_takes_no_credentials():
    from pydantic import ValidationError

    from governance.config import AuditConfig

    assert AuditConfig().witness is None
    assert AuditConfig(witness="s3://audit-witness/prod").witness_retention_days == 365
    assert witness_uri_problem("s3://b/p") is None
    for bad, why in (("https://b/p", "a witness is s3://bucket/prefix"),
                     ("s3://AKIA:secret@b/p", "credentials come from the AWS_* environment"),
                     ("s3://b", "name a prefix")):
        with pytest.raises(ValidationError, match=re.escape(why)):
            AuditConfig(witness=bad)


def test_cli_verify_witness_makes_the_library_call(monkeypatch):
    from typer.testing import CliRunner

    import governance.audit_ops
    import lakewarden.commands.audit as cmd
    from governance.audit import VerifyReport

    calls: list[tuple[str, Any, Any]] = []
    ws, actor = object(), object()

    def verb(w, a, *, witness: bool = False):
        calls.append(("witness" if witness else "plain", w, a))
        return VerifyReport(events=10, head_seq=9, witness={
            "checked": ["witness s3://w/p reachable: 2 heads, last seq 9"], "lock": "COMPLIANCE until 2027-01-01",
            "not_checked": ["events seq=10..10: not witnessed yet"]} if witness else None)

    class St:
        def workspace(self):
            return ws

        def actor(self):
            return actor

    monkeypatch.setattr(cmd, "state", lambda ctx: St())
    monkeypatch.setattr(governance.audit_ops, "verify_audit", verb)
    r = CliRunner().invoke(cmd.audit_app, ["verify", "--witness"])
    assert r.exit_code == 0, r.output
    assert calls == [("witness", ws, actor)]
    assert "checked: witness s3://w/p reachable: 2 heads, last seq 9, COMPLIANCE until 2027-01-01" in r.output
    assert "not checked: events seq=10..10: not witnessed yet" in r.output
    calls.clear()
    assert CliRunner().invoke(cmd.audit_app, ["verify"]).exit_code == 0 and calls == [("plain", ws, actor)]


# -- end to end: the configured witness, the verb and the command ----------------------------------
def test_audit_verify_witness_end_to_end(tmp_path: Path, objectstore, s3):
    import yaml

    from tests.cli_helpers import lw_in

    shutil.copytree(Path(__file__).resolve().parents[1] / "policies", tmp_path / "policies")
    assert lw_in(tmp_path, "init", ".").returncode == 0
    cfg = yaml.safe_load((tmp_path / "lakewarden.yaml").read_text())
    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    cfg.setdefault("audit", {}).update(witness=f"s3://{BUCKET}/{prefix}", witness_retention_days=1)
    (tmp_path / "lakewarden.yaml").write_text(yaml.safe_dump(cfg))
    env = objectstore.env()
    for _ in range(2):
        lw_in(tmp_path, "--as", "ana", "gate", "check", "query", "--dataset", "customers", "--layer", "silver", env=env)
    ok = lw_in(tmp_path, "--as", "carla", "audit", "verify", "--witness", env=env)
    assert ok.returncode == 0, ok.stderr
    assert f"checked: witness s3://{BUCKET}/{prefix} reachable: " in ok.stdout and "COMPLIANCE until" in ok.stdout
    state = tmp_path / ".lakewarden" / "audit"
    head_then = (state / "HEAD.json").read_bytes()
    again = lw_in(tmp_path, "--as", "carla", "audit", "verify", "--witness", "--json", env=env)
    assert again.returncode == 0, again.stderr
    witnessed = json.loads(again.stdout)["witness"]["last_seq"]
    assert witnessed == json.loads(head_then)["seq"] + 1  # its own gate decision, flushed and published first

    # roll back the events table (the second verify's two flushes) and the head file to before it
    tables = tmp_path / ".lakewarden" / "tables" / "_audit"
    drop_newest_commit(str(tables / "events"))
    drop_newest_commit(str(tables / "events"))
    (state / "HEAD.json").write_bytes(head_then)
    assert lw_in(tmp_path, "--as", "carla", "audit", "verify", env=env).returncode == 0  # blind to it
    bad = lw_in(tmp_path, "--as", "carla", "audit", "verify", "--witness", env=env)
    assert bad.returncode == 4
    # the plain verify above went on from the rolled-back head: the witness's seq 5 is another event now
    assert f"event seq={json.loads(head_then)['seq'] + 1} differs from the head witnessed for it" in bad.stderr
    assert "rolled back and extended again" in bad.stderr


def test_the_witness_verb_refuses_an_actor_without_the_stage_and_audits_the_deny(workspace):
    from governance.audit_ops import verify_audit
    from governance.errors import AccessDenied

    with pytest.raises(AccessDenied) as denied:
        verify_audit(workspace, workspace.actor("nobody"), witness=True)
    assert denied.value.decision.rule_ids == ("roles/stages/audit",)
    workspace.audit.flush()
    events = workspace.audit.query(actor="nobody", action="gate.decide").to_pylist()
    assert [(e["outcome"], e["stage"]) for e in events] == [("deny", "audit")]
