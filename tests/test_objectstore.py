"""Tables on an S3-compatible object store (issue #17): a real server on loopback (versitygw,
infra/objectstore/install.sh), the governed lake on it, and an erasure that reaches every object
and every older version the bucket keeps.

The store's own guarantees come first: delta-rs commits with ``If-None-Match: *``, so a store
that ignores it loses commits under concurrent writers (Garage did, measured). Subject values
come from generated files at run time; none is in this file.
"""

from __future__ import annotations

import csv
import os
import multiprocessing as mp
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pytest

from governance.keys import generate_kek_b64

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore")


def _env(monkeypatch: pytest.MonkeyPatch, store) -> None:
    for k, v in store.env().items():
        monkeypatch.setenv(k, v)


def _prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


# -- the store itself -------------------------------------------------------------------------------
def test_the_store_refuses_a_conditional_put_on_an_existing_key(objectstore, monkeypatch: pytest.MonkeyPatch):
    import botocore.exceptions

    from governance.objectstore import s3_client

    _env(monkeypatch, objectstore)
    c = s3_client()
    key = f"{_prefix()}/_delta_log/00000000000000000001.json"
    c.put_object(Bucket="lakewarden", Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        c.put_object(Bucket="lakewarden", Key=key, Body=b"second", IfNoneMatch="*")
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert c.get_object(Bucket="lakewarden", Key=key)["Body"].read() == b"first"  # not overwritten


def _writer(env: dict[str, str], uri: str, w: int, commits: int) -> None:
    import os
    import time

    os.environ.update(env)
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError

    for i in range(commits):
        for attempt in range(100):  # bounded: a conflict retries with backoff
            try:
                write_deltalake(uri, pa.table({"writer": [w] * 10, "commit": [i] * 10}), mode="append")
                break
            except CommitFailedError:
                if attempt == 99:
                    raise
                time.sleep(0.01 * (1 + attempt % 10))


def test_three_concurrent_writers_lose_no_commit(objectstore, monkeypatch: pytest.MonkeyPatch):
    from deltalake import DeltaTable, write_deltalake

    _env(monkeypatch, objectstore)
    uri = f"s3://lakewarden/{_prefix()}/race"
    write_deltalake(uri, pa.table({"writer": pa.array([], pa.int64()), "commit": pa.array([], pa.int64())}))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(objectstore.env(), uri, w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    dt = DeltaTable(uri)
    t = dt.to_pyarrow_table()
    assert t.num_rows == 3 * 15 * 10 and dt.version() == 45  # every row of every commit, one version each
    pairs = set(zip(t["writer"].to_pylist(), t["commit"].to_pylist()))
    assert pairs == {(w, i) for w in range(3) for i in range(15)}


def _auditor(env: dict[str, str], root: str, state: str, key: bytes, w: int, rounds: int) -> None:
    import os

    os.environ.update(env)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from governance.audit import AuditLog

    log = AuditLog(f"{root}/_audit/events", f"{root}/_audit/checkpoints", state,
                   signing_key=Ed25519PrivateKey.from_private_bytes(key), checkpoint_every=1000, flush_every=10**9)
    for r in range(rounds):
        for i in range(20):
            log.record("test.event", actor=f"writer{w}", outcome="ok", details={"round": r, "i": i})
        log.flush()
    log.close()


def test_audit_writers_on_two_machines_extend_one_chain(objectstore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two writers with their own workspace folders (so their own file locks and heads, as on two
    machines) append to one audit log in the bucket at once. Each append carries the chain's
    Delta transaction, so one that read a stale tail is refused and re-chains: one chain, every
    event once, and a third machine's verify (no head of its own) finds every flush's end signed."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from governance.audit import AuditLog

    _env(monkeypatch, objectstore)
    root = f"s3://lakewarden/{_prefix()}"
    key = os.urandom(32)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_auditor, args=(objectstore.env(), root, str(tmp_path / f"m{w}"), key, w, 8))
             for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    sk = Ed25519PrivateKey.from_private_bytes(key)
    third = AuditLog(f"{root}/_audit/events", f"{root}/_audit/checkpoints", tmp_path / "m3", public_key=sk.public_key())
    rep = third.verify()
    assert rep.ok, rep.to_dict()
    events = third.query()
    assert events.num_rows == 2 * 8 * 20 and events["seq"].to_pylist() == list(range(320))
    assert sorted(events["actor"].to_pylist()) == ["writer0"] * 160 + ["writer1"] * 160
    for w in range(2):  # each machine's own head is valid too
        assert AuditLog(f"{root}/_audit/events", f"{root}/_audit/checkpoints", tmp_path / f"m{w}",
                        public_key=sk.public_key()).verify().ok


# -- the governed lake on the store -----------------------------------------------------------------
def _project(base: Path, root: str) -> Path:
    proj = base / "proj"
    shutil.copytree(REPO / "policies", proj / "policies")
    (proj / "lakewarden.yaml").write_text(
        "version: 1\nname: s3\n"
        f"storage: {{root: '{root}'}}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\n"
        "policies: [policies/*.yaml]\n"
    )
    return proj


def _versioned_bucket(store) -> tuple[str, object]:
    """A new bucket that keeps versions, and a client for it."""
    from governance.objectstore import s3_client

    bucket = "lwv" + uuid.uuid4().hex[:10]
    store.create_bucket(bucket)
    c = s3_client()
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    return bucket, c


def _objects(store, prefix: str) -> list[Path]:
    base = store.root / "lakewarden" / prefix
    return sorted(p for p in base.rglob("*") if p.is_file())


def test_the_governed_lake_lives_on_the_object_store(objectstore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.sql import run_query
    from lakehouse.synth import generate

    _env(monkeypatch, objectstore)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    prefix = _prefix()
    proj = _project(tmp_path, f"s3://lakewarden/{prefix}")
    res = generate(tmp_path / "landing", people=300, transactions_per_person=3, seed=11, bad_rows=0.02)
    with open(res.files["customers"], newline="") as fh:
        people = [r for r in csv.DictReader(fh) if r["email"] and "@" in r["email"]][:50]
    copy = tmp_path / "again" / "customers.csv"  # the landing file is removed once ingested
    copy.parent.mkdir()
    shutil.copy(res.files["customers"], copy)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        reps = {ds: ingest(ws, ws.actor("dana"), ds, [res.files[ds]]) for ds in ("customers", "transactions")}
        for ds in ("customers", "transactions"):
            build_silver(ws, ws.actor("dana"), ds)
        tables = Catalog(ws.config).list()
        n = run_query(ws, ws.actor("dana"), "select count(*) as n from customers").table["n"][0].as_py()
        from features.store import Features  # Feast reads silver from the bucket too

        fs = Features(ws)
        fs.apply(ws.actor("dana"))
        fs.materialize(ws.actor("dana"))
        silver = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id", "income"])
        online = fs.online(ws.actor("mel"), purpose="credit_scoring", features=["customer_profile:income"],
                           tokens=silver["customer_id"].to_pylist()[:20])
        again = ingest(ws, ws.actor("dana"), "customers", [copy])  # the same rows again: exactly once
        ws.audit.flush()
        verified = ws.audit.verify()
    for ds, rep in reps.items():
        assert rep.files[0].balanced and rep.rows_accepted > 0
    assert reps["customers"].rows_quarantined > 0  # the bad rows went to quarantine, on the store too
    assert n == reps["customers"].rows_accepted
    assert online["income"].to_pylist() == silver["income"].to_pylist()[:20]  # materialized from the bucket
    assert again.rows_accepted == 0 and again.rows_skipped == again.rows_read
    assert {TableRef("bronze", "customers"), TableRef("silver", "transactions"), TableRef("vault", "customers"),
            TableRef("quarantine", "customers")} <= set(tables)
    assert verified.ok and verified.events > 0
    keys = {str(p.relative_to(objectstore.root / "lakewarden" / prefix)).split("/")[0] for p in _objects(objectstore, prefix)}
    assert {"bronze", "silver", "vault", "quarantine", "_audit", "_lineage", "_ingest"} <= keys
    assert not (proj / ".lakewarden" / "tables").exists()  # nothing fell back to a local folder
    # the store holds no plaintext identifier of anyone (bytes of every object, Parquet pages included)
    blobs = b"".join(p.read_bytes() for p in _objects(objectstore, prefix) if p.suffix == ".json")
    assert not any(p["email"].encode() in blobs for p in people)


def _holds(parquet: bytes, value: str) -> bool:
    """Whether any string value of a Parquet file (compressed pages decoded) equals ``value``."""
    import io

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    t = pq.read_table(io.BytesIO(parquet))
    return any(pc.any(pc.equal(t[c], value)).as_py() for c in t.column_names if pa.types.is_string(t[c].type))


def test_an_erasure_reaches_every_object_and_every_older_version(
        objectstore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """On a bucket that keeps versions, VACUUM only hides files behind delete markers: the request
    purges the older versions, and its scan reads every object and version the bucket lists."""
    from governance.erasure import file_request, request_status, run_request, verify_certificate
    from governance.erasure.handlers import ErasureContext
    from governance.erasure.scan import scan
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    _env(monkeypatch, objectstore)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    bucket, c = _versioned_bucket(objectstore)
    proj = _project(tmp_path, f"s3://{bucket}/lake")
    res = generate(tmp_path / "landing", people=120, transactions_per_person=2, seed=12)
    with open(res.files["customers"], newline="") as fh:
        person = next(r for r in csv.DictReader(fh) if r["customer_id"] and r["email"])
    sid = person["customer_id"]
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        for ds in ("customers", "transactions"):
            ingest(ws, ws.actor("dana"), ds, [res.files[ds]])
            build_silver(ws, ws.actor("dana"), ds)
        tok = ws.keyring.token_for(sid, create=False)
        # before: the scanner reads the bucket and finds the subject there (it is not blind to it)
        before = scan(ws, ErasureContext("probe", [tok], {tok: [("subject_id", sid)]}, {tok: "S1"}))
        assert f"s3://{bucket}/lake" in before.roots and before.objects > 0
        assert any(f.path.startswith(f"s3://{bucket}/lake/bronze/") for f in before.findings)
        carla = ws.actor("carla")
        st = file_request(ws, carla, "erase", [sid])
        run_request(ws, carla, st.request_id, purge_now=True)
        done = request_status(ws, carla, st.request_id)
        assert done.state == "done", done.detail.get("findings")
        assert {k for k, n in done.detail["purged"].items() if "(older object versions)" in k and n > 0}
        cert = verify_certificate(ws, carla, st.request_id).data
        assert f"s3://{bucket}/lake" in cert["verified"]["roots"]
        assert cert["verified"]["objects"] > 0
    # independent of the scanner: no version of any object still holds the subject's token
    hits = []
    for page in c.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="lake/"):
        for v in page.get("Versions", []):
            body = c.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
            if tok.encode() in body or sid.encode() in body or (v["Key"].endswith(".parquet") and _holds(body, tok)):
                hits.append(v["Key"])
        assert not page.get("DeleteMarkers")  # purged along with the older versions
    assert hits == []


def test_the_scanner_reads_the_older_versions_a_bucket_keeps(objectstore, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch):
    """An identifier overwritten in place is gone from the current object but not from the bucket:
    the scan names the older version; on a store that lists no versions it says so."""
    from governance.erasure.handlers import ErasureContext
    from governance.erasure.scan import scan
    from governance.workspace import Workspace

    _env(monkeypatch, objectstore)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    bucket, c = _versioned_bucket(objectstore)
    proj = _project(tmp_path, f"s3://{bucket}/lake")
    ident = "id-" + uuid.uuid4().hex  # made at run time
    c.put_object(Bucket=bucket, Key="lake/exports/x.txt", Body=f"row,{ident}\n".encode())
    c.put_object(Bucket=bucket, Key="lake/exports/x.txt", Body=b"row,\n")  # overwritten in place
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        rep = scan(ws, ErasureContext("probe", ["tok_x"], {"tok_x": [("subject_id", ident)]}, {"tok_x": "S1"}))
    assert rep.objects == 2 and rep.old_versions == 1
    assert [f.path.split("?")[0] for f in rep.findings] == [f"s3://{bucket}/lake/exports/x.txt"]
    assert "?versionId=" in rep.findings[0].path


@pytest.mark.slow  # starts a Trino server of its own
def test_trino_reads_the_lake_on_the_object_store_with_the_analysts_masks(
        objectstore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The same tables, read by Trino's native S3 file system (credentials from the server's
    environment, never in its catalog file), give an analyst the same masked rows as the embedded
    engine; an erased subject is gone for Trino too."""
    import math
    import socket

    from governance.erasure import file_request, run_request
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.sql import run_query as run_embedded
    from lakehouse.synth import generate
    from lakehouse.trino import TrinoServer, default_home, install
    from lakehouse.trino import run_query as run_trino

    home = default_home()
    if not (home / "bin" / "launcher").exists():
        if os.environ.get("LAKEWARDEN_REQUIRE_TRINO") != "1":
            pytest.skip("Trino is not installed (run infra/trino/install.sh, or make test)")
        home = install()
    _env(monkeypatch, objectstore)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    prefix = _prefix()
    proj = _project(tmp_path, f"s3://lakewarden/{prefix}")
    cfg = proj / "lakewarden.yaml"
    cfg.write_text(cfg.read_text() + f"trino: {{host: 127.0.0.1, port: {port}}}\n")
    res = generate(tmp_path / "landing", people=200, transactions_per_person=2, seed=13)
    with open(res.files["customers"], newline="") as fh:
        sid = next(r["customer_id"] for r in csv.DictReader(fh) if r["customer_id"])

    def rows(tbl: pa.Table) -> list[tuple]:
        norm = lambda v: None if isinstance(v, float) and math.isnan(v) else (round(v, 6) if isinstance(v, float) else v)  # noqa: E731
        return sorted((tuple(norm(v) for v in r.values()) for r in tbl.to_pylist()), key=repr)

    with Workspace.open(cfg) as ws:
        dana, ana, carla = ws.actor("dana"), ws.actor("ana"), ws.actor("carla")
        for ds in ("customers", "transactions"):
            ingest(ws, dana, ds, [res.files[ds]])
            build_silver(ws, dana, ds)
        token = ws.keyring.token_for(sid, create=False)
        srv = TrinoServer(ws, home=home)
        catalog_file = (srv.etc / "catalog").glob("*.properties")
        try:
            srv.start()
            srv.sync(dana)
            for text in (p.read_text() for p in catalog_file):
                assert objectstore.secret_key not in text and objectstore.access_key not in text
            sql = "SELECT customer_id, birth_date, zip_code, income, region FROM customers"
            on_trino, embedded = rows(run_trino(ws, ana, sql)), rows(run_embedded(ws, ana, sql).table)
            assert on_trino == embedded and len(on_trino) > 150
            q = f"SELECT count(*) AS n FROM bronze.customers WHERE customer_id = '{token}'"
            assert run_trino(ws, dana, q)["n"][0].as_py() == 1
            st = run_request(ws, carla, file_request(ws, carla, "erase", [sid]).request_id, purge_now=True)
            assert st.state == "done", st.detail.get("findings")
            srv.sync(dana)
            assert run_trino(ws, dana, q)["n"][0].as_py() == 0
        finally:
            srv.stop()


def test_retention_on_a_versioned_bucket_leaves_no_older_version_of_expired_rows(
        objectstore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Retention deletes expired rows and vacuums the history; on a bucket that keeps versions the
    vacuumed files would stay readable by version id, so it purges them too."""
    from datetime import timedelta

    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.retention import enforce_retention
    from lakehouse.synth import generate

    _env(monkeypatch, objectstore)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    bucket, c = _versioned_bucket(objectstore)
    proj = _project(tmp_path, f"s3://{bucket}/lake")
    pol = proj / "policies" / "customers.yaml"
    pol.write_text(pol.read_text().replace("history: 7d", "history: 0h"))
    res = generate(tmp_path / "landing", people=90, transactions_per_person=1, seed=14)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        uri = f"s3://{bucket}/lake/bronze/customers"
        bronze = DeltaTable(uri)
        t = bronze.to_pyarrow_table(columns=["customer_id", "_row", "_ingested_at"])
        newest = pc.max(t["_ingested_at"]).as_py()
        expired = t.filter(pc.less_equal(t["_row"], 30))["customer_id"].to_pylist()
        assert 10 < len(expired) < 40
        bronze.update(updates={"_ingested_at": "'2001-01-01T00:00:00Z'"}, predicate="_row <= 30")
        rep = enforce_retention(ws, ws.actor("dana"), dry_run=False, datasets=["customers"],
                                now=newest + timedelta(days=1))  # the clock, from the data: no wall time
    by = {x.table: x for x in rep.tables}
    b = by["bronze.customers"]
    assert b.rows_deleted == len(expired) and b.rows_after == b.rows_before - len(expired)
    assert b.files_vacuumed > 0 and b.old_versions_purged > 0
    left = DeltaTable(uri).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
    assert not set(expired) & set(left)
    found = []
    for page in c.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix="lake/bronze/customers/"):
        assert not page.get("DeleteMarkers")
        for v in page.get("Versions", []):
            if v["Key"].endswith(".parquet"):
                body = c.get_object(Bucket=bucket, Key=v["Key"], VersionId=v["VersionId"])["Body"].read()
                found += [tok for tok in expired[:5] if _holds(body, tok)]
    assert found == []


def test_a_root_the_store_cannot_serve_is_refused_by_name(objectstore, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """A missing bucket is not an empty lake, refused credentials are named, plain HTTP needs
    AWS_ALLOW_HTTP: each a clear error before anything is read or written."""
    from governance.objectstore import ObjectStoreError
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog

    _env(monkeypatch, objectstore)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    missing = "lwmissing" + uuid.uuid4().hex[:8]
    with Workspace.open(_project(tmp_path / "a", f"s3://{missing}/lake") / "lakewarden.yaml") as ws:
        with pytest.raises(ObjectStoreError, match=f"bucket '{missing}' .* does not exist"):
            Catalog(ws.config).list()
        with pytest.raises(ObjectStoreError, match="does not exist"):
            ws.audit.record("x.y", actor="u", outcome="ok")
    other = "lwcreds" + uuid.uuid4().hex[:8]
    objectstore.create_bucket(other)
    cfg = _project(tmp_path / "b", f"s3://{other}/lake") / "lakewarden.yaml"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with Workspace.open(cfg) as ws, pytest.raises(ObjectStoreError) as exc:
        Catalog(ws.config)
    assert "AWS_SECRET_ACCESS_KEY" in exc.value.hint and "not-the-secret" not in str(exc.value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", objectstore.secret_key)
    monkeypatch.delenv("AWS_ALLOW_HTTP")
    with Workspace.open(cfg) as ws, pytest.raises(ObjectStoreError, match="AWS_ALLOW_HTTP"):
        Catalog(ws.config)
