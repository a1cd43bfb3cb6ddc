"""Streaming ingest against a real Kafka broker (KRaft, loopback): governed micro-batches, bad
messages quarantined with reasons, exactly once across SIGKILLs and rebalances, the broker's log
in erasure's reach, the lag metric."""

from __future__ import annotations

import base64
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from cli_helpers import _env_for
from deltalake import DeltaTable

from governance.erasure import kafka_log
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import StreamError
from lakehouse.ingest import LEDGER
from lakehouse.stream import SealedProducer, app_id, seal_dataset, status, stream
from lakehouse.broker import create_topic

REPO = Path(__file__).resolve().parents[1]


def _topic(kafka, partitions: int = 1, **config: str) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    create_topic(kafka.bootstrap, name, partitions=partitions, config=config or None)
    return name


def _producer(kafka, **conf):
    from confluent_kafka import Producer

    return Producer({"bootstrap.servers": kafka.bootstrap, **conf})


def _records(tmp: Path, people: int, which: str = "customers", seed: int = 7) -> list[dict]:
    from lakehouse.synth import generate

    out = tmp / f"synth-{which}-{people}-{seed}"
    if not out.exists():
        generate(out, people=people, fmt="jsonl", transactions_per_person=3, seed=seed)
    return [json.loads(line) for line in (out / f"{which}.jsonl").read_text().splitlines() if line.strip()]


def _table(ws, layer: str, dataset: str):
    cat = Catalog(ws.config)
    ref = TableRef(layer, dataset)
    return cat.open(ref).to_pyarrow_dataset().to_table() if cat.exists(ref) else None


def _segments(kafka, topic: str) -> list[Path]:
    return sorted(p for d in kafka.log_dir.glob(f"{topic}-*") for p in d.glob("*.log"))


def _ledger_version(uri: str) -> int:
    """The ingest ledger's Delta version (-1 before its first commit): it moves once per committed batch."""
    return DeltaTable(uri).version() if DeltaTable.is_deltatable(uri) else -1


def _policy_patch(project: Path, dataset: str, **stream_cfg) -> None:
    p = project / "policies" / f"{dataset}.yaml"
    doc = yaml.safe_load(p.read_text())
    doc["stream"] = stream_cfg
    p.write_text(yaml.safe_dump(doc, sort_keys=False))


def test_sealed_records_are_ingested_and_every_bad_message_is_quarantined_with_its_reason(
        kafka, project, tmp_path):
    from governance.workspace import Workspace

    _policy_patch(project, "customers", max_message_bytes=4096)
    ws = Workspace.open(project / "lakewarden.yaml")
    dana = ws.actor("dana")
    topic = _topic(kafka, partitions=2)
    recs = _records(tmp_path, 60)
    good, odd = recs[:50], recs[50:]
    with SealedProducer(ws, dana, "customers", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(good)
        prod.send([{**odd[0], "email": "not-an-email"}])  # breaks the contract: a validation reason
        prod.send([{**odd[1], "nickname": "x"}])  # a field the policy does not know
        prod.send([{**odd[2], "name": {"first": "A"}}])  # nested
    # Messages no SealedProducer would send.
    ring = ws.keyring
    tok_a, tok_b = ring.tokens_for([odd[3]["customer_id"], odd[4]["customer_id"]])
    wrong = ring.seal(json.dumps(odd[3]), token=tok_b, dataset=seal_dataset("customers"), column="record")
    ok_blob = ring.seal(json.dumps(odd[5]), token=ring.token_for(odd[5]["customer_id"]),
                        dataset=seal_dataset("customers"), column="record")
    tampered = bytearray(ok_blob)
    tampered[-1] ^= 1

    def env(tok: str, blob: bytes) -> bytes:
        return json.dumps({"lakewarden": "sealed/v1", "subject": tok, "record": base64.b64encode(blob).decode()}).encode()

    bad = [b"not json at all", b"[1, 2, 3]", b"\xff\xfe\xfa", json.dumps(odd[6]).encode(),  # unsealed
           env(tok_b, wrong), env(ring.token_for(odd[5]["customer_id"]), bytes(tampered)),
           b'{"lakewarden": "sealed/v1"}', b'{"x": "' + b"a" * 5000 + b'"}', None]
    p = _producer(kafka)
    for i, v in enumerate(bad):
        p.produce(topic, value=v, partition=i % 2)
    p.flush(30)
    total = len(good) + 3 + len(bad)

    rep = stream(ws, dana, "customers", topic, bootstrap=kafka.bootstrap, batch_records=20, batch_seconds=0.5,
                 until_idle=1.0)
    assert rep.rows_read == total
    assert rep.rows_accepted == len(good)
    assert rep.rows_quarantined == total - len(good)
    assert set(rep.partitions) == {0, 1} and all(pr.balanced for pr in rep.partitions.values())
    reasons = "\n".join(rep.reasons)
    for expected in ("email", "unexpected field(s) 'nickname'", "nested objects", "invalid JSON",
                     "must be a JSON object", "not valid UTF-8", "not sealed for its subject",
                     "sealed for another subject than its customer_id", "sealed record cannot be opened: tampered",
                     "not a sealed/v1 envelope", "oversized message (5,009 bytes > stream.max_message_bytes 4,096)",
                     "without a value"):
        assert expected in reasons, (expected, reasons)

    bronze, quarantine = _table(ws, "bronze", "customers"), _table(ws, "quarantine", "customers")
    assert bronze.num_rows == len(good) and quarantine.num_rows == total - len(good)
    assert "base64:" not in str(quarantine["reason"].to_pylist())  # reasons name no value
    # A row's number is its offset in its partition; the quarantine says where a record came from.
    assert set(quarantine["source"].to_pylist()) == {f"kafka:{topic}/0", f"kafka:{topic}/1"}
    rows = sorted(status(ws, "customers", topic), key=lambda r: r["partition"])
    assert sum(r["rows_read"] for r in rows) == total
    assert all(r["rows_read"] == r["accepted"] + r["quarantined"] for r in rows)
    assert {r["partition"]: r["last_offset"] for r in rows} == {p: pr.last_offset for p, pr in rep.partitions.items()}

    # Exactly once: a second run resumes after the last committed offset and reads nothing again.
    again = stream(ws, dana, "customers", topic, bootstrap=kafka.bootstrap, batch_records=20, batch_seconds=0.5,
                   until_idle=1.0)
    assert again.rows_read == 0
    assert _table(ws, "bronze", "customers").num_rows == len(good)

    # The broker's log holds no plaintext of the sealed records (every segment decoded).
    emails = {r["email"].encode() for r in good}
    for seg in _segments(kafka, topic):
        for _off, parts in kafka_log.records(seg):
            assert not any(e in part for part in parts for e in emails)
    ws.audit.flush()
    kinds = {a for a in ws.audit.query()["action"].to_pylist() if a.startswith(("stream.", "ingest."))}
    assert {"stream.produce", "stream.start", "stream.assign", "stream.stop", "ingest.batch"} <= kinds, kinds
    ws.close()


def test_a_policy_we_did_not_design_streams_with_its_own_subject_key_types_and_protections(kafka, project):
    """Clinic visits: another subject key (patient_ref), JSON numbers for an encrypted double and
    date strings, a vaulted identifier, a restricted column; repeat subjects; one record that
    breaks the contract and one sealed for another patient than the one it names."""
    from test_ingest_parallel import VISITS

    from governance.workspace import Workspace

    (project / "policies" / "visits.yaml").write_text(VISITS)
    ws = Workspace.open(project / "lakewarden.yaml")
    dana = ws.actor("dana")
    topic = _topic(kafka, partitions=2)
    recs = [{"patient_ref": f"P{i % 9:04d}", "nhs_number": str(900000000 + i), "visit_date": f"2024-0{1 + i % 9}-1{i % 9}",
             "weight_kg": 50 + i % 40 + 0.5, "diagnosis": ["J45", "E11", "I10", None][i % 4],
             "postcode": f"SW{i % 10}A 1AA", "clinic": "north"} for i in range(40)]
    with SealedProducer(ws, dana, "visits", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(recs)
        prod.send([{**recs[0], "weight_kg": "heavy"}])  # not a double
    ring = ws.keyring
    tok = ring.token_for("P0001")
    blob = ring.seal(json.dumps({**recs[2], "patient_ref": "P0002"}), token=tok, dataset=seal_dataset("visits"),
                     column="record")
    p = _producer(kafka)
    p.produce(topic, key=tok.encode(), value=json.dumps(
        {"lakewarden": "sealed/v1", "subject": tok, "record": base64.b64encode(blob).decode()}).encode())
    p.flush(30)

    rep = stream(ws, dana, "visits", topic, bootstrap=kafka.bootstrap, batch_records=15, batch_seconds=0.5,
                 until_idle=1.0)
    assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (42, 40, 2)
    reasons = "\n".join(rep.reasons)
    assert "weight_kg" in reasons and "sealed for another subject than its patient_ref" in reasons, reasons
    bronze = _table(ws, "bronze", "visits")
    assert len(set(bronze["patient_ref"].to_pylist())) == 9  # one token per patient across batches
    assert "nhs_number" not in bronze.column_names and "diagnosis" not in bronze.column_names
    assert not any(r["nhs_number"] in str(bronze.to_pylist()) for r in recs)
    weights = ring.open_arrow(bronze["weight_kg"].combine_chunks(), bronze["patient_ref"].combine_chunks(),
                              dataset="visits", column="weight_kg").to_pylist()
    assert sorted(float(w) for w in weights) == sorted(r["weight_kg"] for r in recs)  # the typed value's text
    vault = _table(ws, "vault", "visits")
    nhs = ring.open_arrow(vault["nhs_number"].combine_chunks(), vault["patient_ref"].combine_chunks(),
                          dataset="visits", column="nhs_number").to_pylist()
    assert sorted(v.decode() for v in nhs) == sorted(r["nhs_number"] for r in recs)
    ws.close()


def test_raw_records_need_a_retention_cap_and_the_stream_refuses_a_topic_that_keeps_them_longer(kafka, project,
                                                                                                   tmp_path):
    from governance.workspace import Workspace

    with pytest.raises(Exception, match="max_topic_retention"):
        _policy_patch(project, "transactions", sealed="optional")
        Workspace.open(project / "lakewarden.yaml").policies.dataset("transactions")
    _policy_patch(project, "transactions", sealed="optional", max_topic_retention="24h")
    ws = Workspace.open(project / "lakewarden.yaml")
    dana = ws.actor("dana")
    week = _topic(kafka, **{"retention.ms": str(7 * 86_400_000)})
    with pytest.raises(StreamError, match=r"keeps records 168h, longer than .* \(24h\)"):
        stream(ws, dana, "transactions", week, bootstrap=kafka.bootstrap, until_idle=0.5)
    with pytest.raises(StreamError, match="does not exist"):
        stream(ws, dana, "transactions", "no-such-topic", bootstrap=kafka.bootstrap, until_idle=0.5)
    half_day = _topic(kafka, **{"retention.ms": str(12 * 3_600_000)})
    tx = _records(tmp_path, 20, "transactions")
    p = _producer(kafka)
    for r in tx:
        p.produce(half_day, value=json.dumps(r).encode())
    p.flush(30)
    rep = stream(ws, dana, "transactions", half_day, bootstrap=kafka.bootstrap, batch_seconds=0.3, until_idle=1.0)
    assert rep.rows_read == len(tx) and rep.rows_accepted == len(tx)
    ws.close()


@pytest.mark.parametrize("codec", ["gzip", "snappy", "lz4", "zstd"])
def test_the_segment_reader_decodes_every_compression_codec(kafka, codec):
    topic = _topic(kafka)
    p = _producer(kafka, **{"compression.type": codec, "linger.ms": 50})
    values = [f'{{"email": "person{i}@example.org", "pad": "{"x" * 200}"}}'.encode() for i in range(30)]
    for v in values:
        p.produce(topic, value=v, key=b"k")
    p.flush(30)
    stats = kafka_log.SegmentStats()
    got = [parts for seg in _segments(kafka, topic) for _o, parts in kafka_log.records(seg, stats)]
    assert stats.undecoded == 0 and stats.records == 30
    assert [parts[1] for parts in got] == values
    if codec != "none":  # compressed: the raw bytes alone would not show the emails
        raw = b"".join(seg.read_bytes() for seg in _segments(kafka, topic))
        assert raw.count(b"@example.org") < 30


@pytest.mark.slow
def test_an_erasure_reaches_the_topic_sealed_records_become_unreadable_raw_ones_fail_verification(
        kafka, project, tmp_path):
    from governance.erasure.workflow import file_request, run_request
    from governance.workspace import Workspace

    cfg = yaml.safe_load((project / "lakewarden.yaml").read_text())
    cfg["streaming"] = {"log_dirs": [str(kafka.log_dir)]}
    (project / "lakewarden.yaml").write_text(yaml.safe_dump(cfg))
    ws = Workspace.open(project / "lakewarden.yaml")
    dana, carla = ws.actor("dana"), ws.actor("carla")
    topic = _topic(kafka, partitions=2)
    # People of their own (the broker is shared by the session): another test's raw copy of the
    # same person would rightly fail this erasure's verification.
    recs = _records(tmp_path, 40, seed=4242)
    with SealedProducer(ws, dana, "customers", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(recs)
    rep = stream(ws, dana, "customers", topic, bootstrap=kafka.bootstrap, batch_seconds=0.3, until_idle=1.0)
    assert rep.rows_accepted == len(recs)
    gone, kept = recs[3], recs[4]
    tok_gone, tok_kept = ws.keyring.tokens_for([gone["customer_id"], kept["customer_id"]], create=False)

    st = file_request(ws, carla, "erase", [gone["customer_id"]])
    st = run_request(ws, carla, st.request_id, purge_now=True)
    assert st.state == "done", json.dumps(st.to_dict()["detail"], default=str)[-4000:]
    v = st.detail["verification"]
    assert v["kafka_segments"] >= 2 and v["kafka_records"] >= len(recs) and v["unlinkable_copies"] >= 1, v

    # An independent scan of the broker's data folder: nothing of theirs can be read.
    needles = [str(gone[k]).encode() for k in ("customer_id", "name", "email", "phone")]
    ring, opened_kept, shredded = ws.keyring, 0, 0
    for path in kafka.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not any(n in data for n in needles), path
        if path.is_file() and kafka_log.is_segment(path):
            for _off, parts in kafka_log.records(path):
                assert not any(n in part for part in parts for n in needles), path
                # (other tests of the session left broken envelopes in this broker on purpose)
                try:
                    env = json.loads(parts[-1]) if parts and parts[-1].startswith(b'{"lakewarden"') else None
                except ValueError:
                    continue
                if not isinstance(env, dict) or env.get("subject") not in (tok_gone, tok_kept):
                    continue
                blob = base64.b64decode(env["record"])
                if env["subject"] == tok_gone:
                    with pytest.raises(Exception) as exc:
                        ring.open(blob, token=tok_gone, dataset=seal_dataset("customers"), column="record")
                    assert type(exc.value).__name__ in ("SubjectShredded", "KeyManagementError")
                    shredded += 1
                elif env["subject"] == tok_kept:
                    assert json.loads(ring.open(blob, token=tok_kept, dataset=seal_dataset("customers"),
                                                column="record"))["email"] == kept["email"]
                    opened_kept += 1
    assert shredded == 1 and opened_kept == 1

    # A raw (unsealed) record of a person stays readable in the broker until retention drops it:
    # the scanner decodes the (lz4) segment and the request cannot pass verification.
    _policy_patch(project, "transactions", sealed="optional", max_topic_retention="24h")
    ws.close()
    ws = Workspace.open(project / "lakewarden.yaml")
    carla, dana = ws.actor("carla"), ws.actor("dana")
    raw_topic = _topic(kafka, **{"retention.ms": str(3_600_000)})
    who = recs[5]
    p = _producer(kafka, **{"compression.type": "lz4"})
    for i in range(3):
        p.produce(raw_topic, value=json.dumps({
            "transaction_id": f"T-{900000000000 + i}", "customer_id": who["customer_id"], "ts": "2024-03-01T10:00:00",
            "amount": "12.5", "merchant_category": "grocery", "channel": "card"}).encode())
    p.flush(30)
    stream(ws, dana, "transactions", raw_topic, bootstrap=kafka.bootstrap, batch_seconds=0.3, until_idle=1.0)
    st = file_request(ws, carla, "erase", [who["customer_id"]])
    st = run_request(ws, carla, st.request_id, purge_now=True)
    assert st.state == "verification_failed", st
    detail = json.dumps(st.to_dict()["detail"], default=str)
    assert f"{raw_topic}-0/00000000000000000000.log" in detail and "kafka-record" in detail, detail
    ws.close()


def _lw_stream(project: Path, topic: str, bootstrap: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    e = _env_for("dana", {"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"], **(env or {})})
    return subprocess.Popen(
        [sys.executable, "-m", "lakewarden", "stream", "transactions", "--topic", topic, "--bootstrap", bootstrap,
         "--batch-records", "30", "--batch-seconds", "0.3", "--until-idle", "1.5", "--json", *extra],
        cwd=project, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _exactly_once(ws, topic: str, produced: list[dict], bad: int, partitions: int) -> None:
    bronze = _table(ws, "bronze", "transactions")
    ids = bronze["transaction_id"].to_pylist()
    assert len(ids) == len(set(ids)), "a record landed twice"
    assert set(ids) == {r["transaction_id"] for r in produced}, "a record is missing"
    q = _table(ws, "quarantine", "transactions")
    keys = list(zip(q["source"].to_pylist(), q["row_number"].to_pylist())) if q is not None else []
    assert len(keys) == len(set(keys)) == bad
    rows = status(ws, "transactions", topic)
    assert len(rows) == partitions
    assert sum(r["rows_read"] for r in rows) == len(produced) + bad
    assert all(r["rows_read"] == r["accepted"] + r["quarantined"] for r in rows)
    led = DeltaTable(ws.config.table_uri(LEDGER)).to_pyarrow_dataset().to_table(
        filter=pc.starts_with(pc.field("source"), f"kafka:{topic}/"))
    assert len(set(led["batch_id"].to_pylist())) == led.num_rows, "a batch was recorded twice"
    for p in range(partitions):
        w = DeltaTable(ws.config.table_uri("bronze/transactions")).transaction_version(app_id("transactions", topic, p))
        assert w is not None


@pytest.mark.slow
def test_sigkill_at_random_points_twenty_times_never_duplicates_or_loses_a_record(kafka, project, tmp_path):
    """At least 20 consumers SIGKILLed at random moments, then one that finishes: every record once,
    counts add up.

    A quarter of the kills fall at a random time (often while the consumer starts or joins); the
    rest wait until the consumer has committed a batch in this trial, then a random 0-0.4 s more,
    so they land inside the next batch's writes, whatever the machine's speed. The topic is topped
    up before a trial whenever fewer than 900 records are left unread, so a fast machine never
    drains it (a CI run once did, after 7 cut trials of 1,800 records); trials go on past 20,
    up to 40, until 10 were cut and 8 of those after a commit of their own."""
    from governance.workspace import Workspace

    ws = Workspace.open(project / "lakewarden.yaml")
    dana = ws.actor("dana")
    ledger_uri = ws.config.table_uri(LEDGER)
    topic = _topic(kafka, partitions=3)
    pool = _records(tmp_path, 2400, "transactions")  # 7,200 records, sent 600 at a time as needed
    sent: list[dict] = []
    bad = [b"{broken", b"42", json.dumps({"transaction_id": "T-1"}).encode()] * 3

    def top_up() -> None:
        read = sum(r["rows_read"] for r in status(ws, "transactions", topic))
        if len(sent) + len(bad) - read >= 900 or len(sent) == len(pool):
            return
        chunk = pool[len(sent):len(sent) + 600]
        with SealedProducer(ws, dana, "transactions", topic, bootstrap=kafka.bootstrap) as prod:
            prod.send(chunk)
        sent.extend(chunk)

    p = _producer(kafka)
    for i, v in enumerate(bad):
        p.produce(topic, value=v, partition=i % 3)
    p.flush(30)
    top_up()
    top_up()

    rng = random.Random(1234)
    trials = killed = mid_stream = 0
    # A static member (group.instance.id) takes its partitions back at once after a SIGKILL,
    # instead of waiting for the session timeout of the dead one.
    env = {"LAKEWARDEN_KAFKA_GROUP_INSTANCE_ID": "trial"}
    while trials < 40 and (trials < 20 or killed < 10 or mid_stream < 8):
        trials += 1
        top_up()
        start = _ledger_version(ledger_uri)
        proc = _lw_stream(project, topic, kafka.bootstrap, env=env)
        after_commit = rng.random() >= 0.25
        deadline = time.monotonic() + (60.0 if after_commit else rng.uniform(0.2, 3.0))
        while proc.poll() is None and time.monotonic() < deadline:
            if after_commit and _ledger_version(ledger_uri) > start:
                time.sleep(rng.uniform(0.0, 0.4))
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            killed += 1
            mid_stream += _ledger_version(ledger_uri) > start
        else:
            assert proc.returncode == 0, proc.stderr.read()
    ws.close()
    assert killed >= 10 and mid_stream >= 8, (trials, killed, mid_stream, f"{len(sent)} of {len(pool)} sent")
    proc = _lw_stream(project, topic, kafka.bootstrap, env=env)
    out, errs = proc.communicate(timeout=240)
    assert proc.returncode == 0, errs
    ws = Workspace.open(project / "lakewarden.yaml")
    _exactly_once(ws, topic, sent, len(bad), 3)
    ws.close()


@pytest.mark.slow
def test_a_second_consumer_joining_takes_partitions_over_without_duplicates(kafka, project, tmp_path):
    """A second consumer joins while the first is mid-stream; once the group shows it holding
    partitions, more records arrive, so it must read some, and nothing lands twice."""
    from confluent_kafka.admin import AdminClient

    from governance.workspace import Workspace

    ws = Workspace.open(project / "lakewarden.yaml")
    dana = ws.actor("dana")
    topic = _topic(kafka, partitions=3)
    tx = _records(tmp_path, 120, "transactions")
    half = len(tx) // 2
    ledger_uri = ws.config.table_uri(LEDGER)
    with SealedProducer(ws, dana, "transactions", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(tx[:half])

    def second_holds_partitions() -> bool:
        desc = admin.describe_consumer_groups(["lakewarden.transactions"])["lakewarden.transactions"].result(10)
        return any(m.client_id == "second" and m.assignment.topic_partitions for m in desc.members)

    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    start = _ledger_version(ledger_uri)
    # Both consumers stop after 20 s without a record: the producer below must get its second half out
    # within that, after the rebalance, on a loaded machine too.
    args = ("--batch-records", "10", "--until-idle", "20")
    first = _lw_stream(project, topic, kafka.bootstrap, *args, env={"LAKEWARDEN_KAFKA_CLIENT_ID": "first"})
    deadline = time.monotonic() + 120
    while _ledger_version(ledger_uri) == start and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the second joins once the first is under way, however fast the machine
    second = _lw_stream(project, topic, kafka.bootstrap, *args, env={"LAKEWARDEN_KAFKA_CLIENT_ID": "second"})
    deadline = time.monotonic() + 120
    while not second_holds_partitions() and second.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert second_holds_partitions(), "the second consumer never got a partition"
    with SealedProducer(ws, dana, "transactions", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(tx[half:])  # round-robin over every partition, the second's included
    ws.close()
    outs = [json.loads(p.communicate(timeout=300)[0]) for p in (first, second)]
    assert sum(o["rows_read"] for o in outs) >= len(tx)  # a revoked partition's batch is never lost
    assert outs[0]["rows_read"] > 0 and outs[1]["rows_read"] > 0, outs
    ws = Workspace.open(project / "lakewarden.yaml")
    _exactly_once(ws, topic, tx, 0, 3)
    ws.close()


def test_the_lag_metric_is_served_for_prometheus(kafka, workspace, tmp_path):
    from lakehouse.broker import free_port

    dana = workspace.actor("dana")
    topic = _topic(kafka)
    tx = _records(tmp_path, 30, "transactions")
    with SealedProducer(workspace, dana, "transactions", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(tx)
    port = free_port()
    stop = threading.Event()
    result = {}

    def run():
        result["rep"] = stream(workspace, dana, "transactions", topic, bootstrap=kafka.bootstrap, batch_seconds=0.2,
                               metrics_port=port, stop=stop)

    t = threading.Thread(target=run)
    t.start()
    body = ""
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            if f'lakewarden_stream_records_total{{dataset="transactions",outcome="accepted",topic="{topic}"}} {len(tx)}' \
                    in body and "lakewarden_stream_lag_records{" in body \
                    and "lakewarden_stream_commit_latency_seconds_bucket" in body:
                break  # the counter moves before the latency is observed: wait for both
            time.sleep(0.3)
    finally:
        stop.set()
        t.join(60)
    assert f'lakewarden_stream_records_total{{dataset="transactions",outcome="accepted",topic="{topic}"}} {len(tx)}' \
        in body, body
    assert f'lakewarden_stream_lag_records{{dataset="transactions",partition="0",topic="{topic}"}}' in body
    assert "lakewarden_stream_commit_latency_seconds_bucket" in body
    assert result["rep"].rows_accepted == len(tx)


def test_stream_refuses_a_role_without_ingest_and_bad_batch_settings(kafka, workspace):
    from governance.errors import LakewardenError

    topic = _topic(kafka)
    with pytest.raises(LakewardenError, match="denied|not allowed|may not"):
        stream(workspace, workspace.actor("ana"), "transactions", topic, bootstrap=kafka.bootstrap, until_idle=0.5)
    with pytest.raises(LakewardenError, match="denied|not allowed|may not"):
        SealedProducer(workspace, workspace.actor("ana"), "transactions", topic, bootstrap=kafka.bootstrap)
    with pytest.raises(StreamError, match="at least 1 record"):
        stream(workspace, workspace.actor("dana"), "transactions", topic, batch_records=0)
    with pytest.raises(StreamError, match="no subject key 'customer_id'"):
        SealedProducer(workspace, workspace.actor("dana"), "transactions", topic,
                       bootstrap=kafka.bootstrap).send([{"amount": 1}])


def test_a_pipeline_source_can_be_a_topic_ingest_streams_until_caught_up(kafka, project, tmp_path, monkeypatch):
    from governance.workspace import Workspace
    from lakewarden.pipeline.params import load_params
    from lakewarden.pipeline.steps import step_ingest, step_sources

    ws = Workspace.open(project / "lakewarden.yaml")
    dana = ws.actor("dana")
    topic = _topic(kafka, partitions=2)
    _records(tmp_path, 20)
    (project / "landing").mkdir()
    (project / "landing" / "customers.jsonl").write_text((tmp_path / "synth-customers-20-7" / "customers.jsonl").read_text())
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sources"] = {"customers": "landing/customers.jsonl", "transactions": f"kafka://{kafka.bootstrap}/{topic}"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    tx = _records(tmp_path, 20, "transactions")
    with SealedProducer(ws, dana, "transactions", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(tx[:30])
    pl = ws.actor("pipeline")
    p = load_params(project / "params.yaml", ws)
    first = step_sources(ws, pl, p)
    assert first["changed"]
    man = json.loads((project / "pipeline" / "sources.json").read_text())
    assert sum(man["datasets"]["transactions"]["stream"]["end_offsets"].values()) == 30
    out = step_ingest(ws, pl, p)
    assert out["transactions"]["rows_read"] == 30 and out["transactions"]["rows_accepted"] == 30
    assert step_sources(ws, pl, p)["changed"] is False  # nothing new on the topic: downstream stays
    with SealedProducer(ws, dana, "transactions", topic, bootstrap=kafka.bootstrap) as prod:
        prod.send(tx[30:40])
    assert step_sources(ws, pl, p)["changed"] is True
    again = step_ingest(ws, pl, p)
    assert again["transactions"]["rows_read"] == 10  # only the new records
    assert _table(ws, "bronze", "transactions").num_rows == 40
    with pytest.raises(Exception, match="kafka:TOPIC"):
        params["sources"]["transactions"] = ["kafka:a", "landing/x.csv"]
        (project / "params.yaml").write_text(yaml.safe_dump(params))
        load_params(project / "params.yaml", ws)
    ws.close()
