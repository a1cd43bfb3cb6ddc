"""Governed ingest on Ray (issue #17): a real local cluster (``ray start --head`` plus a second
node, token authentication on), the batch work on its workers, one committer.

The same files ingested by the embedded engine and by Ray must give the same tables (values opened,
row for row), the same counts and reasons; a worker SIGKILLed mid-ingest leaves a rerun exactly
once. Subject values come from generated files at run time; none is in this file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable

from governance.keys import generate_kek_b64

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.slow]


def _project(folder: Path, *, kek: Path, store: Path | None = None, root: str = ".lakewarden/tables") -> Path:
    """A project whose KEK is a file (a Ray worker reads it on its own machine, like the driver)."""
    shutil.copytree(REPO / "policies", folder / "policies")
    keystore = str(store) if store else ".lakewarden/keys/keystore.db"
    (folder / "lakewarden.yaml").write_text(
        "version: 1\nname: ray\n"
        f"storage: {{root: '{root}'}}\n"
        f"keys: {{store: '{keystore}', kek: {{provider: file, path: '{kek}'}}}}\n"
        "policies: [policies/*.yaml]\n"
    )
    return folder


def _kek(path: Path) -> Path:
    path.write_text(generate_kek_b64() + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def ray_env(ray_cluster, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in ray_cluster.client_env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("LAKEWARDEN_CONFIG", raising=False)
    monkeypatch.delenv("LAKEWARDEN_USER", raising=False)
    return ray_cluster.client_env()


def _opened(ws, layer: str, ds: str) -> pa.Table:
    """A table's rows with every sealed value opened, sorted, without the ingest time."""
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import sealed_columns

    t = Catalog(ws.config).open(TableRef(layer, ds)).to_pyarrow_table()
    t = t.drop_columns([c for c in ("_ingested_at", "_quarantined_at") if c in t.column_names])
    ring = ws.keyring
    pol = ws.policies.dataset(ds)
    if layer == "quarantine":
        out = []
        for tok, blob in zip(t["subject_token"].to_pylist(), t["payload"].to_pylist()):
            if tok is None:
                out.append(ring.open_system(f"quarantine:{ds}", blob, dataset=f"quarantine.{ds}", column="row"))
            else:
                out.append(ring.open(blob, token=tok, dataset=f"quarantine.{ds}", column="row"))
        t = t.set_column(t.schema.get_field_index("payload"), "payload", pa.array(out, pa.binary()))
    else:
        for c in sealed_columns(pol):
            if c in t.column_names:
                opened = ring.open_arrow(t[c].combine_chunks(), t[pol.subject_key].combine_chunks(), dataset=ds, column=c)
                t = t.set_column(t.schema.get_field_index(c), c, opened)
    t = t.select(sorted(t.column_names))
    key = "row_number" if layer == "quarantine" else "_row"
    return t.sort_by([("_batch_id", "ascending"), (key, "ascending")])


def _plain(details: str) -> dict:
    d = json.loads(details)
    d.pop("engine", None)
    return d


def test_ray_and_the_embedded_engine_give_the_same_tables_and_counts(ray_env, tmp_path: Path):
    """Two workspaces sharing one key store (so tokens and data keys agree): one ingests in this
    process, the other on the Ray cluster's two nodes, in batches small enough for several
    commit groups. Every table holds the same rows (sealed values opened), the reports agree,
    and a rerun on Ray ingests nothing twice."""
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import LEDGER, ingest, sealed_columns
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    kek = _kek(tmp_path / "kek.key")
    a = _project(tmp_path / "a", kek=kek)
    res = generate(tmp_path / "landing", people=1500, transactions_per_person=4, seed=21, bad_rows=0.04)
    reports, tables, ledgers, audits = {}, {}, {}, {}
    for name, engine in (("a", "local"), ("b", "ray")):
        proj = a if name == "a" else _project(tmp_path / "b", kek=kek, store=a / ".lakewarden/keys/keystore.db")
        with Workspace.open(proj / "lakewarden.yaml") as ws:
            reports[name] = {}
            for ds in ("customers", "transactions"):
                f = proj / f"{ds}.csv"
                shutil.copy(res.files[ds], f)
                reports[name][ds] = ingest(ws, ws.actor("dana"), ds, [f], engine=engine, batch_rows=500)
            cat = Catalog(ws.config)
            # Both writers: the vault (nothing but ciphertext and tokens) uncompressed, its sealed
            # values' lengths delta-encoded.
            vault = cat.open(TableRef("vault", "customers"))
            meta = pq.ParquetFile(vault.file_uris()[0].removeprefix("file://")).metadata.row_group(0)
            cols = {meta.column(j).path_in_schema: meta.column(j) for j in range(meta.num_columns)}
            assert {c.compression for c in cols.values()} == {"UNCOMPRESSED"}, engine
            assert "DELTA_LENGTH_BYTE_ARRAY" in cols["email"].encodings, engine
            tables[name] = {(layer, ds): _opened(ws, layer, ds) for ds in ("customers", "transactions")
                            for layer in ("bronze", "vault", "quarantine") if cat.exists(TableRef(layer, ds))}
            for ds in ("customers", "transactions"):  # silver too: fitted here, applied per bucket on Ray
                built = build_silver(ws, ws.actor("dana"), ds, engine=engine)
                t = cat.open(TableRef("silver", ds)).to_pyarrow_table().drop_columns(["_ingested_at"])
                pol = ws.policies.dataset(ds)
                for c in sealed_columns(pol):  # sealed values carry random nonces: compare them opened
                    if c in t.column_names:
                        t = t.set_column(t.schema.get_field_index(c), c, ws.keyring.open_arrow(
                            t[c].combine_chunks(), t[pol.subject_key].combine_chunks(), dataset=ds, column=c))
                order = "customer_id" if ds == "customers" else "transaction_id"  # unique in each
                tables[name][("silver", ds)] = (t.select(sorted(t.column_names)).sort_by(order), built.stats)
            ledgers[name] = sorted(DeltaTable(ws.config.table_uri(LEDGER)).to_pyarrow_table(
                columns=["batch_id", "rows_read", "rows_accepted", "rows_quarantined"]).to_pylist(),
                key=lambda r: r["batch_id"])
            ws.audit.flush()
            audits[name] = sorted(ws.audit.query(action="ingest.batch")["details"].to_pylist())
            if engine == "ray":  # the same files again: every batch is in the ledger
                for ds in ("customers", "transactions"):
                    f = proj / f"{ds}.csv"
                    shutil.copy(res.files[ds], f)
                    again = ingest(ws, ws.actor("dana"), ds, [f], engine="ray", batch_rows=500)
                    assert again.rows_accepted == 0 and again.rows_skipped == again.rows_read
                assert ws.audit.verify().ok
    for ds in ("customers", "transactions"):
        la, lb = reports["a"][ds], reports["b"][ds]
        assert (lb.rows_read, lb.rows_accepted, lb.rows_quarantined, lb.batches) == \
               (la.rows_read, la.rows_accepted, la.rows_quarantined, la.batches)
        assert lb.reasons == la.reasons and lb.files[0].balanced
    assert reports["a"]["customers"].rows_quarantined > 0  # the bad rows were there to sort
    assert reports["a"]["transactions"].batches > 4  # several commit groups on Ray
    assert tables["a"].keys() == tables["b"].keys() and ("quarantine", "customers") in tables["a"]
    for k in tables["a"]:
        if k[0] == "silver":  # the same rows and fitted statistics (a float sum's last bit depends on row order)
            assert json.loads(json.dumps(tables["b"][k][1]), parse_float=lambda v: round(float(v), 6)) == \
                   json.loads(json.dumps(tables["a"][k][1]), parse_float=lambda v: round(float(v), 6)), k
            ta, tb = tables["a"][k][0], tables["b"][k][0]
            assert tb.num_rows == ta.num_rows > 0 and tb.schema == ta.schema, k
            for c in ta.column_names:
                if pa.types.is_floating(ta.schema.field(c).type):
                    assert np.allclose(tb[c].to_numpy(zero_copy_only=False), ta[c].to_numpy(zero_copy_only=False),
                                       rtol=1e-9, atol=1e-9, equal_nan=True), (k, c)
                else:
                    assert tb[c].equals(ta[c]), (k, c)
        else:
            assert tables["b"][k].equals(tables["a"][k]), k
    assert ledgers["b"] == ledgers["a"]
    assert [_plain(d) for d in audits["b"]] == [_plain(d) for d in audits["a"]]


LETTINGS = """\
kind: dataset
dataset: lettings
description: Tenancy applicants of a letting agency (fictional), partitioned by district.
owner: data_engineer
subject_key: client_ref
columns:
  client_ref:     {class: subject_key, type: string, required: true, unique: true, pattern: "^CL-[0-9]{6}$"}
  full_name:      {class: direct_identifier, type: string, max_length: 200}
  contact_email:  {class: direct_identifier, type: string, pattern: email}
  age:            {class: public, type: int, min: 18, max: 110}
  monthly_salary: {class: public, type: double, min: 0, max: 1000000}
  moved_in:       {class: public, type: date, min: "2000-01-01", max: "2030-12-31"}
  district:       {class: public, type: string, required: true, allowed: ["harbour side", "hills/north", "plain 50%", "Zürich-Süd"]}
  gender:         {class: sensitive, type: string, protection: restricted, allowed: [w, m]}
  risk:           {class: public, type: string, allowed: [good, bad]}
purposes:
  analytics: {description: Aggregate reporting.}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [analytics]}
  compliance_officer: {layers: [bronze, silver, quarantine, vault], purposes: [analytics]}
retention: {landing: 30d, bronze: 1y, silver: 1y, quarantine: 30d, history: 7d}
layout: {partition_by: [district], subject_buckets: 4}
landing: keep
"""


def _lettings_csv(path: Path, n: int) -> Path:
    """Fictional applicants; every 37th row breaks a rule, every 53rd repeats an earlier reference."""
    import csv

    districts = ["harbour side", "hills/north", "plain 50%", "Zürich-Süd"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["client_ref", "full_name", "contact_email", "age", "monthly_salary", "moved_in", "district",
                    "gender", "risk"])
        for i in range(n):
            ref = f"CL-{(i // 53 * 53 if i % 53 == 52 else i):06d}"
            age = "7" if i % 37 == 36 else str(18 + i % 70)
            w.writerow([ref, f"Applicant {i}", f"applicant{i}@example.org", age, f"{1000 + (i * 37) % 5000}.5",
                        f"20{10 + i % 15}-0{1 + i % 9}-1{i % 9}", districts[i % 4], "wm"[i % 2], ["good", "bad"][i % 3 == 0]])
    return path


def test_ray_workers_take_today_from_the_drivers_clock(ray_env, tmp_path: Path):
    """The workers check a contract's ``max: today`` at the driver's clock (sent with each batch),
    not their own machine's: with the workspace's clock at 2031-03-31, a birth date of that day is
    accepted and the next day's is quarantined; the rows carry the clock's ingest time."""
    from datetime import datetime, timezone

    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest

    now = datetime(2031, 3, 31, 23, 59, 59, tzinfo=timezone.utc)
    proj = _project(tmp_path / "p", kek=_kek(tmp_path / "kek.key"))
    born = ["2031-03-31", "2031-04-01", "1990-05-06"] * 200
    src = proj / "customers.csv"
    src.write_text("customer_id,name,email,phone,birth_date,zip_code,sex,ethnicity,income,region,defaulted\n" + "".join(
        f"C-{i:06d},Person {i},p{i}@example.org,+1 555-0100-{i:04d},{b},{10000 + i:05d},F,group_a,1000.5,north,false\n"
        for i, b in enumerate(born)))
    with Workspace.open(proj / "lakewarden.yaml", clock=lambda: now) as ws:
        rep = ingest(ws, ws.actor("dana"), "customers", [src], engine="ray", batch_rows=150)
        stamped = Catalog(ws.config).open(TableRef("bronze", "customers")).to_pyarrow_table(columns=["_ingested_at"])
    assert (rep.rows_accepted, rep.rows_quarantined) == (400, 200)
    assert dict(rep.reasons) == {"birth_date: above the maximum today": 200}
    assert set(stamped["_ingested_at"].to_pylist()) == {now}


def test_another_policy_partitioned_by_text_with_odd_characters(ray_env, tmp_path: Path):
    """A dataset the engines were not written for: other column names, a date, a restricted column,
    and partitions by a text column whose values hold a space, a slash, a percent sign and
    non-ASCII letters. Both engines give the same tables, silver included."""
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver

    kek = _kek(tmp_path / "kek.key")
    out = {}
    for name, engine in (("a", "local"), ("b", "ray")):
        proj = _project(tmp_path / name, kek=kek,
                        store=(tmp_path / "a" / ".lakewarden/keys/keystore.db") if name == "b" else None)
        (proj / "policies" / "lettings.yaml").write_text(LETTINGS)
        src = _lettings_csv(proj / "lettings.csv", 3000)
        with Workspace.open(proj / "lakewarden.yaml") as ws:
            rep = ingest(ws, ws.actor("dana"), "lettings", [src], engine=engine, batch_rows=400)
            build_silver(ws, ws.actor("dana"), "lettings", engine=engine)
            cat = Catalog(ws.config)
            tables = {}
            for layer in ("bronze", "restricted", "vault", "quarantine", "silver"):
                dt = cat.open(TableRef(layer, "lettings"))
                t = _opened(ws, layer, "lettings") if layer != "silver" else dt.to_pyarrow_table()
                if layer == "silver":
                    t = t.drop_columns(["_ingested_at"]).sort_by("client_ref")
                    t = t.select(sorted(t.column_names))
                tables[layer] = t
            assert dt.metadata().partition_columns == ["district", "_subject_bucket"]
            districts = set(cat.open(TableRef("bronze", "lettings")).to_pyarrow_table(columns=["district"])["district"]
                            .to_pylist())
        out[name] = (rep, tables, districts)
    (ra, ta, da), (rb, tb, db) = out["a"], out["b"]
    assert (rb.rows_read, rb.rows_accepted, rb.rows_quarantined) == (ra.rows_read, ra.rows_accepted, ra.rows_quarantined)
    assert ra.rows_quarantined > 0 and rb.reasons == ra.reasons
    assert db == da == {"harbour side", "hills/north", "plain 50%", "Zürich-Süd"}
    for layer in ta:
        assert tb[layer].num_rows == ta[layer].num_rows > 0, layer
        assert tb[layer].equals(ta[layer]), layer


def test_a_worker_sigkilled_mid_ingest_leaves_a_rerun_exactly_once(ray_env, ray_cluster, tmp_path: Path):
    """``lakewarden ingest --engine ray`` in a process of its own; once a group is committed, one
    of the workers is SIGKILLed. The run stops with a clear error (or ends, had the kill come
    late); a rerun then ingests exactly what is missing: every row once, each batch once."""
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import LEDGER
    from lakehouse.synth import generate

    proj = _project(tmp_path / "p", kek=_kek(tmp_path / "kek.key"))
    res = generate(tmp_path / "landing", people=4000, transactions_per_person=10, seed=22)
    src = res.files["transactions"]
    expected = sum(1 for _ in open(src)) - 1
    f = proj / "transactions.csv"
    shutil.copy(src, f)
    env = {**os.environ, **ray_env, "LAKEWARDEN_USER": "dana"}
    cmd = [sys.executable, "-m", "lakewarden", "--config", str(proj / "lakewarden.yaml"), "ingest", "transactions",
           str(f), "--engine", "ray", "--batch-rows", "1000"]
    run = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ledger = proj / ".lakewarden/tables" / LEDGER / "_delta_log"
    killed = None
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and run.poll() is None and killed is None:
        if ledger.exists() and any(ledger.glob("*.json")):
            pids = ray_cluster.worker_pids()
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed = pids[0]
        time.sleep(0.05)
    out, _ = run.communicate(timeout=180)
    assert killed is not None, out  # the kill came mid-ingest (40 batches; the first group commits after 2)
    if run.returncode != 0:
        assert "Ray worker died" in out and "rerun" in out and "Traceback" not in out, out
    shutil.copy(src, f)
    rerun = subprocess.run(cmd + ["--json"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        bronze = Catalog(ws.config).open(TableRef("bronze", "transactions")).to_pyarrow_table(columns=["_batch_id", "_row"])
        batches = DeltaTable(ws.config.table_uri(LEDGER)).to_pyarrow_table(columns=["batch_id"])
    assert bronze.num_rows == expected  # every row once
    pairs = pc.binary_join_element_wise(bronze["_batch_id"], pc.cast(bronze["_row"], pa.string()), ":")
    assert len(pc.unique(pairs)) == expected
    assert len(pc.unique(batches["batch_id"])) == batches.num_rows == -(-expected // 1000)  # each batch once


def test_ray_ingest_onto_the_object_store(ray_env, objectstore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Workers write the Parquet files straight into the bucket (the nodes carry the store's
    credentials), the driver commits them: the tables read back whole, and every data object
    under a table is one its Delta log names."""
    from governance.workspace import Workspace
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.ingest import ingest
    from lakehouse.synth import generate

    for k, v in objectstore.env().items():
        monkeypatch.setenv(k, v)
    prefix = "t" + uuid.uuid4().hex[:12]
    proj = _project(tmp_path / "p", kek=_kek(tmp_path / "kek.key"), root=f"s3://lakewarden/{prefix}")
    res = generate(tmp_path / "landing", people=600, transactions_per_person=2, seed=23, bad_rows=0.03)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        rep = ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]], engine="ray", batch_rows=200)
        dt = Catalog(ws.config).open(TableRef("bronze", "customers"))
        rows = dt.to_pyarrow_table(columns=["customer_id"]).num_rows
        named = {Path(u).name for u in dt.file_uris()}
    assert rep.files[0].balanced and rep.rows_quarantined > 0
    assert rows == rep.rows_accepted
    on_store = {p.name for p in (objectstore.root / "lakewarden" / prefix / "bronze" / "customers").rglob("*.parquet")}
    assert on_store == named
    assert not (proj / ".lakewarden" / "tables").exists()


def test_a_cluster_over_several_machines_needs_a_shared_lake_and_key_store(tmp_path: Path):
    """The check before any work: nodes on two machines with a local folder, or with a SQLite key
    store, are refused by name; with s3:// and postgresql:// they are accepted."""
    from governance.config import load_config
    from governance.cluster import ClusterError, check_cluster

    class TwoMachines:  # what ray.nodes() and ray.cluster_resources() answer for such a cluster
        @staticmethod
        def nodes():
            return [{"NodeManagerAddress": "10.0.0.1", "Alive": True}, {"NodeManagerAddress": "10.0.0.2", "Alive": True}]

        @staticmethod
        def cluster_resources():
            return {"CPU": 16.0}

    kek = _kek(tmp_path / "kek.key")
    local = load_config(_project(tmp_path / "l", kek=kek) / "lakewarden.yaml")
    with pytest.raises(ClusterError, match="storage.root is a local folder"):
        check_cluster(TwoMachines, local)
    s3_sqlite = load_config(_project(tmp_path / "s", kek=kek, root="s3://b/lake") / "lakewarden.yaml")
    with pytest.raises(ClusterError, match="keys.store is a local SQLite file"):
        check_cluster(TwoMachines, s3_sqlite)
    shared = load_config(_project(tmp_path / "p", kek=kek, root="s3://b/lake",
                                  store="postgresql://lw@db:5432/keys") / "lakewarden.yaml")  # type: ignore[arg-type]
    assert check_cluster(TwoMachines, shared) == 16


READINGS = REPO / "tests" / "fixtures" / "readings.yaml"  # many rows per subject over time; the bench uses it too


def test_a_point_in_time_training_set_on_ray_equals_feasts(ray_env, tmp_path: Path):
    """A dataset of many rows per subject over time (not the demo's): entity rows before a
    subject's first reading, between readings, on a reading's exact time and past a view's TTL.
    The join on Ray (per subject bucket) returns the table Feast's offline store returns, row for
    row; so does the default entity set of the demo's customers with its label."""
    import csv
    from datetime import datetime, timedelta, timezone

    from features.store import Features
    from governance.workspace import Workspace
    from lakehouse.catalog import TableRef
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    proj = _project(tmp_path / "p", kek=_kek(tmp_path / "kek.key"))
    shutil.copy(READINGS, proj / "policies" / "readings.yaml")
    rng = np.random.default_rng(5)
    t0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
    meters = [f"MTR{i:05d}" for i in range(300)]
    f = proj / "readings.csv"
    with open(f, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["meter_ref", "holder_name", "read_at", "kwh", "tariff", "occupants"])
        for i, m in enumerate(meters):
            hours = np.sort(rng.choice(24 * 20, size=1 + i % 9, replace=False))  # distinct times per meter
            for h in hours:
                w.writerow([m, f"Holder {i}", (t0 + timedelta(hours=int(h))).isoformat(),
                            f"{rng.uniform(0, 40):.3f}", ["day", "night", "flat"][int(h) % 3], int(h) % 6])
    res = generate(tmp_path / "landing", people=600, transactions_per_person=1, seed=3, bad_rows=0.0)
    shutil.copy(res.files["customers"], proj / "customers.csv")
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        dana, sam = ws.actor("dana"), ws.actor("sam")
        for ds in ("readings", "customers"):
            ingest(ws, dana, ds, [proj / f"{ds}.csv"])
            build_silver(ws, dana, ds)
        fs = Features(ws)
        fs.apply(ws.actor("dana"))
        silver = fs.catalog.open(TableRef("silver", "readings"))
        hist = silver.to_pyarrow_table(columns=["meter_ref", "read_at"])
        toks = sorted(set(hist["meter_ref"].to_pylist()))
        stamps = sorted(hist["read_at"].to_pylist())
        times = [t0 - timedelta(days=1), stamps[len(stamps) // 2], t0 + timedelta(days=7, hours=5),
                 t0 + timedelta(days=25), stamps[-1]]  # day 25: past the usage view's 2-day TTL for most
        ents = pa.table({"meter_ref": [t for t in toks for _ in times],
                         "event_timestamp": pa.array([x for _ in toks for x in times], pa.timestamp("us", tz="UTC"))})
        ents = ents.take(pa.array(rng.permutation(ents.num_rows)))  # entity order is the caller's, kept
        feats = ["usage:kwh", "usage:tariff", "household:occupants"]
        local = fs.training_set(sam, purpose="forecasting", features=feats, entities=ents)
        on_ray = fs.training_set(sam, purpose="forecasting", features=feats, entities=ents, engine="ray")
        assert on_ray.table.num_rows == local.table.num_rows == ents.num_rows
        assert on_ray.table.select(local.table.column_names).equals(local.table), "the two joins differ"
        kwh, occ = local.table["kwh"], local.table["occupants"]
        assert 0 < kwh.null_count < len(kwh)  # some found, some not (before the first reading, past the TTL)
        assert occ.null_count < kwh.null_count  # no TTL on household: older values still count
        assert on_ray.sources == local.sources
        # the demo's customers, every subject at one time, with the label taken from silver
        cust = ["customer_profile:income", "customer_profile:income_z", "customer_profile:region"]
        at = datetime(2030, 1, 1, tzinfo=timezone.utc)
        a = fs.training_set(sam, purpose="credit_scoring", features=cust, label="defaulted", at=at)
        b = fs.training_set(sam, purpose="credit_scoring", features=cust, label="defaulted", at=at, engine="ray")
        assert b.table.num_rows == a.table.num_rows > 500
        assert b.table.select(a.table.column_names).equals(a.table)
        ws.audit.flush()
        got = ws.audit.query(action="features.training_set")["details"].to_pylist()
        assert sorted(json.loads(d)["engine"] if isinstance(d, str) else d["engine"] for d in got) == \
               ["local", "local", "ray", "ray"]


def test_train_on_ray_builds_its_set_and_trains_there(ray_env, tmp_path: Path):
    """``lakewarden train --engine ray --processes 2``, the user's entry point: the training
    set is joined on the cluster and DP-SGD runs on Ray Train; the model is registered with the
    ledger's ε and the silver version it read, and the audit says where the set was built."""
    from features.store import Features
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    proj = _project(tmp_path / "p", kek=_kek(tmp_path / "kek.key"))
    res = generate(tmp_path / "landing", people=800, transactions_per_person=1, seed=4, bad_rows=0.0)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        build_silver(ws, ws.actor("dana"), "customers")
        Features(ws).apply(ws.actor("dana"))
    env = {**os.environ, **ray_env, "LAKEWARDEN_USER": "sam"}
    cmd = [sys.executable, "-m", "lakewarden", "--config", str(proj / "lakewarden.yaml"), "train", "--name", "credit",
           "--features", "customer_profile:income,customer_profile:income_z", "--label", "defaulted",
           "--purpose", "credit_scoring", "--epochs", "1", "--processes", "2", "--engine", "ray", "--no-mitigate"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "registered" in run.stdout and "Traceback" not in run.stderr, run.stdout
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        from training.registry import Registry

        card = Registry(ws).card("credit", 1)
        assert card.privacy.epsilon > 0 and card.data_versions
        ws.audit.flush()
        sets = ws.audit.query(action="features.training_set")["details"].to_pylist()
        assert [json.loads(d)["engine"] if isinstance(d, str) else d["engine"] for d in sets] == ["ray"]


def test_dp_training_on_ray_train_spends_the_single_process_epsilon(ray_env, tmp_path: Path):
    """DP-SGD over Ray Train's two workers (one per node): the same q, σ and steps as one process,
    so the same ε from one accountant; the model learns."""
    import numpy as np

    from governance.workspace import Workspace
    from training.trainer import TrainOptions, predict_proba, train, train_on_ray

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 4)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] + rng.normal(scale=0.5, size=3000) > 0).astype(np.float32)
    opts = TrainOptions(epochs=2, target_epsilon=2.0, delta=1e-5, accountant="rdp")
    one = train(X, y, opts)
    with Workspace.open(_project(tmp_path / "p", kek=_kek(tmp_path / "kek.key")) / "lakewarden.yaml") as ws:
        two = train_on_ray(ws, X, y, opts, workers=2)
    assert two.noise_multiplier == pytest.approx(one.noise_multiplier, rel=1e-9)
    assert two.epsilon == pytest.approx(one.epsilon, rel=1e-9) and two.epsilon <= 2.0 + 1e-6
    assert ((predict_proba(two, X) > 0.5) == (y > 0.5)).mean() > 0.7


def test_rows_cross_ray_sealed_and_bound_to_their_batch():
    """What crosses Ray's object store (shared memory, spilled to disk when short) is sealed: the
    plaintext is not in the blob, and a blob opens only as the batch and direction it was sealed for."""
    from cryptography.exceptions import InvalidTag

    from governance.cluster import Transit
    from lakehouse.readers import RawBatch

    value = "someone-" + uuid.uuid4().hex
    t = Transit(os.urandom(32), "ingest-1")
    raw = RawBatch(pa.table({"email": [value]}), first_row=1)
    blob = t.seal(raw, "b1", "raw")
    assert value.encode() not in blob
    assert t.open(blob, "b1", "raw").table.equals(raw.table)
    key = os.urandom(32)
    t = Transit(key, "ingest-1")
    blob = t.seal(raw, "b1", "raw")
    for batch, kind, ingest, k in (("b2", "raw", "ingest-1", key), ("b1", "unique", "ingest-1", key),
                                   ("b1", "raw", "ingest-2", key), ("b1", "raw", "ingest-1", os.urandom(32))):
        with pytest.raises(InvalidTag):
            Transit(k, ingest).open(blob, batch, kind)


def test_an_unknown_engine_is_named(workspace, tmp_path: Path):
    from lakehouse.errors import IngestError
    from lakehouse.ingest import ingest

    with pytest.raises(IngestError, match="unknown ingest engine 'spark'.*local, ray"):
        ingest(workspace, workspace.actor("dana"), "customers", [tmp_path / "x.csv"], engine="spark")
