"""The audit log: hash chain, signed checkpoints, tamper detection, queries, no personal data."""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from deltalake import DeltaTable, write_deltalake

from governance.audit import EVENT_SCHEMA, GENESIS, AuditLog, canonical_lines, chain
from governance.errors import AuditError, AuditTampered

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


def make_log(root: Path, *, key: Ed25519PrivateKey | None = KEY, public=None, every: int = 5) -> AuditLog:
    return AuditLog(
        str(root / "events"), str(root / "checkpoints"), root / "state",
        signing_key=key, public_key=public, checkpoint_every=every, clock=Clock(),
    )


def fill(log: AuditLog, n: int, *, start: int = 0) -> None:
    for i in range(start, start + n):
        log.record(
            "gate.decide", actor=f"user{i % 3}", outcome="allow" if i % 4 else "deny", stage="query",
            resource=f"table:silver.t{i % 2}", rule_ids=("r/a", f"r/{i}"), details={"i": i, "pipe": "a|b\\c"},
        )
    log.flush()


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    lg = make_log(tmp_path)
    fill(lg, 23)
    return lg


def events(log: AuditLog) -> pa.Table:
    return DeltaTable(log.table_uri).to_pyarrow_table().sort_by("seq")


def rewrite(log: AuditLog, tbl: pa.Table) -> None:
    """What an attacker with file system access does: replace the table with other rows."""
    shutil.rmtree(log.table_uri)
    write_deltalake(log.table_uri, tbl.cast(EVENT_SCHEMA), configuration={"delta.appendOnly": "true"})


def set_cell(tbl: pa.Table, row: int, col: str, value) -> pa.Table:
    vals = tbl[col].to_pylist()
    vals[row] = value
    i = tbl.schema.get_field_index(col)
    return tbl.set_column(i, tbl.schema.field(i), pa.array(vals, tbl.schema.field(col).type))


# -- the good path --------------------------------------------------------------------------
def test_chain_checkpoints_and_head(log: AuditLog):
    rep = log.verify()
    assert rep.ok, rep.findings
    assert (rep.events, rep.checkpoints, rep.head_seq) == (23, 4, 22)
    cps = DeltaTable(log.checkpoints_uri).to_pyarrow_table().sort_by("seq")
    assert cps["seq"].to_pylist() == [4, 9, 14, 19]
    head = json.loads((log.state_dir / "HEAD.json").read_text())
    assert head["seq"] == 22 and head["key_id"].startswith("ed25519:")


def test_canonical_encoding_known_answer(tmp_path: Path):
    lg = make_log(tmp_path)
    lg.record("gate.decide", actor="ana", outcome="allow", stage="query", resource="table:silver.customers",
              rule_ids=("a/b", "c"), details={"z": 1, "a": "x|y\\"})
    lg.flush()
    t = events(lg)
    line = canonical_lines(t)[0]
    assert line == (
        'lw1|0|1767323046000000|ana|gate.decide|query|table:silver.customers|\\N|allow|a/b,c|'
        '{"a":"x\\|y\\\\\\\\","z":1}'
    )
    assert t["prev_hash"][0].as_py() == GENESIS
    assert t["hash"][0].as_py() == chain(GENESIS, line)
    # sha256("000…0|" + line), computed once with hashlib and pinned here
    assert t["hash"][0].as_py() == "5d66a93aa9c7d83f1c90c4c943aa69d703edfcd3ce4357abddde1a6a31971012"


def test_table_is_append_only(log: AuditLog):
    dt = DeltaTable(log.table_uri)
    assert dt.metadata().configuration["delta.appendOnly"] == "true"
    with pytest.raises(Exception):
        dt.delete("seq = 3")
    assert log.verify().ok


def test_appends_across_flushes_and_instances_continue_the_chain(tmp_path: Path):
    a = make_log(tmp_path)
    fill(a, 7)
    b = make_log(tmp_path)  # a second writer (another process, later) picks up the head
    fill(b, 6, start=7)
    fill(a, 4, start=13)
    rep = a.verify()
    assert rep.ok and rep.events == 17
    assert events(a)["seq"].to_pylist() == list(range(17))


def _writer(root: str, n: int) -> None:
    lg = make_log(Path(root))
    for _ in range(n):
        fill(lg, 10)


def test_two_processes_appending_concurrently_lose_nothing(tmp_path: Path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rep = make_log(tmp_path).verify()
    assert rep.ok, rep.findings
    assert rep.events == 300


# -- tampering ----------------------------------------------------------------------------
def test_edit_is_detected_and_named(log: AuditLog):
    t = events(log)
    rewrite(log, set_cell(t, 7, "outcome", "allow" if t["outcome"][7].as_py() == "deny" else "deny"))
    f = log.verify().first
    assert (f.seq, f.kind) == (7, "edited")
    assert "seq=7" in f.message


def test_edit_of_a_data_file_in_place_is_detected(log: AuditLog):
    # Tamper below Delta: rewrite the Parquet file that holds the events, keeping its name.
    (path,) = [p for p in Path(log.table_uri).glob("*.parquet")]
    t = pq.read_table(path)
    pq.write_table(set_cell(t, 11, "actor", "someone_else"), path)
    rep = log.verify()
    assert (rep.first.seq, rep.first.kind) == (11, "edited")
    assert "file-modified" in [f.kind for f in rep.findings]


def test_deletion_is_detected_and_named(log: AuditLog):
    t = events(log)
    rewrite(log, t.filter(pc.not_equal(t["seq"], 9)))
    f = log.verify().first
    assert (f.seq, f.kind) == (9, "deleted")
    assert "seq=9 is missing" in f.message


def test_insertion_with_duplicate_seq_is_detected(log: AuditLog):
    t = events(log)
    forged = set_cell(t.slice(8, 1), 0, "actor", "mallory")
    rewrite(log, pa.concat_tables([t.slice(0, 9), forged, t.slice(9)]))
    f = log.verify().first
    assert (f.seq, f.kind) == (8, "inserted")


def test_insertion_with_renumbering_is_detected(log: AuditLog):
    t = events(log)
    # The attacker builds a well-formed event after seq 7 and shifts every later seq by one.
    fake = t.slice(7, 1)
    fake = set_cell(fake, 0, "seq", 8)
    fake = set_cell(fake, 0, "actor", "mallory")
    fake = set_cell(fake, 0, "prev_hash", t["hash"][7].as_py())
    fake = set_cell(fake, 0, "hash", chain(t["hash"][7].as_py(), canonical_lines(fake)[0]))
    tail = t.slice(8)
    tail = tail.set_column(0, tail.schema.field(0), pc.add(tail["seq"], 1))
    rewrite(log, pa.concat_tables([t.slice(0, 8), fake, tail]))
    f = log.verify().first
    assert (f.seq, f.kind) == (8, "inserted")


def test_reordering_is_detected(log: AuditLog):
    t = events(log)
    rows = t.to_pylist()
    a, b = rows[12], rows[13]
    rows[12], rows[13] = {**b, "seq": 12}, {**a, "seq": 13}
    rewrite(log, pa.Table.from_pylist(rows, schema=EVENT_SCHEMA))
    f = log.verify().first
    assert (f.seq, f.kind) == (12, "reordered")


def test_truncation_is_detected(log: AuditLog):
    t = events(log)
    rewrite(log, t.slice(0, 20))
    f = log.verify().first
    assert f.kind == "truncated"
    assert f.seq == 20
    assert "seq=20..22 were truncated" in f.message


def test_truncation_below_a_checkpoint_is_detected_even_without_the_head(log: AuditLog):
    t = events(log)
    rewrite(log, t.slice(0, 12))
    (log.state_dir / "HEAD.json").unlink()
    kinds = [f.kind for f in log.verify().findings]
    assert "truncated" in kinds and "head-missing" in kinds


def test_a_rewrite_with_recomputed_hashes_breaks_the_signed_checkpoint(log: AuditLog):
    t = events(log)
    rows = t.to_pylist()
    rows[3]["actor"] = "mallory"
    h = GENESIS
    for r in rows:  # the attacker re-chains everything, but cannot re-sign
        r["prev_hash"] = h
        r["hash"] = h = chain(h, canonical_lines(pa.Table.from_pylist([r], schema=EVENT_SCHEMA))[0])
    rewrite(log, pa.Table.from_pylist(rows, schema=EVENT_SCHEMA))
    f = log.verify().first
    assert f.kind == "rewritten"
    assert "checkpoint signed at seq=4" in f.message
    assert f.seq == 0


def test_forged_signatures_are_detected(tmp_path: Path, log: AuditLog):
    head = json.loads((log.state_dir / "HEAD.json").read_text())
    other = Ed25519PrivateKey.generate()
    from governance.audit import _signed_message

    head["signature"] = other.sign(_signed_message("head", head["seq"], head["hash"])).hex()
    (log.state_dir / "HEAD.json").write_text(json.dumps(head))
    assert log.verify().first.kind == "forged-head"


def test_verify_with_the_wrong_public_key_fails(tmp_path: Path, log: AuditLog):
    reader = make_log(tmp_path, key=None, public=Ed25519PrivateKey.generate().public_key())
    assert reader.verify().first.kind == "forged-checkpoint"


def test_audit_tampered_exception_names_the_event(log: AuditLog):
    t = events(log)
    rewrite(log, t.filter(pc.not_equal(t["seq"], 2)))
    with pytest.raises(AuditTampered) as exc:
        log.verify().raise_if_bad()
    assert exc.value.seq == 2 and exc.value.kind == "deleted" and exc.value.exit_code == 4


def test_a_writer_that_crashed_before_signing_leaves_an_unsigned_tail_that_the_next_flush_signs(tmp_path: Path):
    lg = make_log(tmp_path)
    fill(lg, 6)
    saved = (lg.state_dir / "HEAD.json").read_text()
    fill(lg, 3, start=6)
    (lg.state_dir / "HEAD.json").write_text(saved)  # as if the process died after the Delta commit
    f = lg.verify().first
    assert (f.seq, f.kind) == (6, "unsigned-tail")
    fill(make_log(tmp_path), 2, start=9)
    rep = lg.verify()
    assert rep.ok and rep.events == 11


def test_read_only_log_can_verify_but_not_append(tmp_path: Path, log: AuditLog):
    ro = make_log(tmp_path, key=None, public=KEY.public_key())
    assert ro.verify().ok
    ro.record("x", actor="a", outcome="ok")
    with pytest.raises(AuditError, match="read-only"):
        ro.flush()


# -- queries and content ------------------------------------------------------------------
def test_query_filters(log: AuditLog):
    assert log.query(actor="user1").num_rows == 8
    assert set(log.query(outcome="deny")["seq"].to_pylist()) == {0, 4, 8, 12, 16, 20}
    assert log.query(resource="table:silver.t1").num_rows == 11
    assert log.query(since=T0 + timedelta(seconds=21))["seq"].to_pylist() == [20, 21, 22]
    assert log.query(until=T0 + timedelta(seconds=3))["seq"].to_pylist() == [0, 1]
    assert log.query(limit=2)["seq"].to_pylist() == [21, 22]
    assert log.query(action="nope").num_rows == 0


def test_events_never_hold_raw_identifiers(tmp_path: Path):
    lg = make_log(tmp_path)
    with pytest.raises(ValueError, match="pseudonymous"):
        lg.record("x", actor="a", outcome="ok", subject_token="alice@example.com")
    lg.record("x", actor="a", outcome="ok", resource="file:/landing/jane.doe@example.com.csv",
              details={"note": "call +1 415-555-0100 or write jane.doe@example.com"})
    lg.flush()
    assert lg.redactions == 3
    row = events(lg).to_pylist()[0]
    assert "example.com" not in row["details"] and "555-0100" not in row["details"]
    assert "[redacted:email]" in row["resource"]
    for f in tmp_path.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert b"jane.doe" not in data and b"555-0100" not in data, f
    assert lg.verify().ok


# -- the time-bounded flush: what a SIGKILL of a long-running process can lose ----------------------
def _wait_for_events(log: AuditLog, n: int, timeout: float = 60.0) -> int:
    """Poll (bounded in time) until the table holds ``n`` events; returns how many it holds."""
    import time

    deadline = time.monotonic() + timeout
    have = 0
    while time.monotonic() < deadline:
        try:
            have = DeltaTable(log.table_uri).to_pyarrow_table(columns=["seq"]).num_rows
        except Exception:  # noqa: BLE001 - the table does not exist yet
            have = 0
        if have >= n:
            return have
        time.sleep(0.05)
    return have


def _wait_for_head(log: AuditLog, seq: int, timeout: float = 60.0) -> int | None:
    """Poll (bounded in time) until the signed head records ``seq``. A flush commits the events
    first and signs the head after, so events in the table alone do not mean the flush is done."""
    import time

    deadline = time.monotonic() + timeout
    head = None
    while time.monotonic() < deadline:
        try:
            head = json.loads((log.state_dir / "HEAD.json").read_text())["seq"]
        except (OSError, ValueError, KeyError):
            head = None
        if head is not None and head >= seq:
            return head
        time.sleep(0.05)
    return head


def test_a_background_flush_writes_waiting_events_within_the_interval(tmp_path: Path):
    log = make_log(tmp_path, every=1000)
    log.flush_interval = 0.1
    for i in range(3):
        log.record("x.y", actor="u", outcome="ok", details={"i": i})
    assert _wait_for_events(log, 3) == 3 and log.pending == 0  # nobody called flush
    log.record("x.y", actor="u", outcome="ok", details={"i": 3})
    log.close()  # stops the flusher and writes the rest
    assert events(log).num_rows == 4 and log.verify().ok


def _killed_writer(root: str, ready) -> None:
    log = make_log(Path(root), every=1000)
    log.flush_interval = 0.2
    for i in range(5):
        log.record("serve.predict", actor="mel", outcome="ok", details={"i": i})
    ready.set()
    import time

    time.sleep(600)  # a server that never calls flush or close


def test_a_sigkilled_process_loses_at_most_the_interval(tmp_path: Path):
    import os
    import signal

    ctx = mp.get_context("spawn")  # a fork would copy delta-rs's runtime in a state it cannot use
    ready = ctx.Event()
    p = ctx.Process(target=_killed_writer, args=(str(tmp_path), ready))
    p.start()
    try:
        assert ready.wait(60)
        log = make_log(tmp_path, key=None, public=KEY.public_key())
        assert _wait_for_events(log, 5) == 5
        assert _wait_for_head(log, 4) == 4  # the flush signs its head after the commit
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    assert log.verify().ok


def test_a_failed_write_keeps_the_events_and_a_commit_is_never_written_twice(tmp_path: Path, monkeypatch):
    log = make_log(tmp_path, every=1000)
    fill(log, 2)
    for i in range(3):
        log.record("x.y", actor="u", outcome="ok", details={"i": i})
    real = log._write_events
    monkeypatch.setattr(log, "_write_events", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        log.flush()
    assert log.pending == 3  # back in the buffer, in order
    monkeypatch.setattr(log, "_write_events", real)
    log.record("x.y", actor="u", outcome="ok", details={"i": 3})
    assert log.flush() == 4
    assert [json.loads(d)["i"] for d in events(log)["details"].to_pylist()[-4:]] == [0, 1, 2, 3]
    # a failure after the commit (signing the head): the events are in the table, not re-queued
    log.record("x.y", actor="u", outcome="ok", details={"i": 4})
    monkeypatch.setattr(log, "_write_head", lambda *a, **k: (_ for _ in ()).throw(OSError("head")))
    with pytest.raises(OSError):
        log.flush()
    assert log.pending == 0 and events(log).num_rows == 7


def test_threads_recording_while_the_flusher_writes_keep_every_event_whole(tmp_path: Path):
    import threading

    log = make_log(tmp_path, every=1000)
    log.flush_interval = 0.05

    def writer(k: int) -> None:
        for i in range(300):
            log.record("x.y", actor=f"t{k}", outcome="ok", resource=f"r{k}", details={"k": k, "i": i})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    t = events(log)
    assert t.num_rows == 1200 and log.verify().ok
    for a, r, d in zip(t["actor"].to_pylist(), t["resource"].to_pylist(), t["details"].to_pylist()):
        assert a[1:] == r[1:] == str(json.loads(d)["k"])


def test_many_small_flushes_are_compacted_and_still_verify(tmp_path: Path):
    log = make_log(tmp_path, every=7)
    log.compact_every = 10
    for i in range(25):  # one flush (one commit, one file) each, as a time-bounded flusher makes
        log.record("x.y", actor="u", outcome="ok", details={"i": i})
        log.flush()
    dt = DeltaTable(log.table_uri)
    assert dt.version() == 1 + 24 + 2  # the empty table, 25 appends and two compactions (after commits 10 and 20)
    assert len(dt.file_uris()) < 10
    ops = [h.get("operation") for h in dt.history()]
    assert ops.count("OPTIMIZE") == 2
    rep = log.verify()
    assert rep.ok and rep.events == 25
    assert [json.loads(d)["i"] for d in events(log)["details"].to_pylist()] == list(range(25))
    # tampering is still found after compaction
    t = events(log)
    rewrite(log, set_cell(t, 3, "actor", "mallory"))
    assert not log.verify().ok
