"""Compliance requests end to end: erasure through every layer, verification, certificates,
crash-resume at every step, access export, deadlines, and who may run them.

One lake (customers + transactions, features materialized, a small DP model, request-log
lines from the real predictor) is built per module and copied per test. Its customers policy
is the example's with ``ethnicity`` moved to ``protection: restricted`` (and out of the
sensitive feature view), so every column class and protection has a layer here. Subject ids
come from the generated files at run time: no personal data (not even synthetic) is in this file.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from cli_helpers import lw_in
from typer.testing import CliRunner

from governance.errors import AccessDenied, SubjectShredded
from governance.keys import generate_kek_b64
from features.erasure import online_rows
from governance.erasure import (
    CRASH_ENV, ErasureContext, RequestError, due_date, file_request, list_requests, request_status, run_request,
    scan, verify_certificate,
)
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.erasure import subject_rows

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
KEK_VAR = "REQUESTS_TEST_KEK"
FEATURES = ["customer_profile:income", "customer_profile:income_log", "customer_profile:region"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Build the lake once: returns its folder and the generated customers (ids, identifiers)."""
    from features.store import Features
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate
    from serving.model import GovernedPredictor
    from training.flow import train_model
    from training.trainer import TrainOptions

    d = tmp_path_factory.mktemp("requests") / "proj"
    shutil.copytree(REPO / "policies", d / "policies")
    pol = yaml.safe_load((d / "policies" / "customers.yaml").read_text())
    pol["columns"]["ethnicity"]["protection"] = "restricted"  # kept in restricted.customers only
    view = pol["features"]["customer_sensitive"]
    view["columns"] = [c for c in view["columns"] if c != "ethnicity"]
    (d / "policies" / "customers.yaml").write_text(yaml.safe_dump(pol, sort_keys=False))
    (d / "lakewarden.yaml").write_text(
        "version: 1\nname: reqtest\nstorage: {root: .lakewarden/tables}\n"
        f"keys: {{store: .lakewarden/keys/keystore.db, kek: {{provider: env, var: {KEK_VAR}}}}}\n"
        "audit: {checkpoint_every: 5}\npolicies: [policies/*.yaml]\n")
    os.environ[KEK_VAR] = generate_kek_b64()
    res = generate(d.parent / "landing", people=300, transactions_per_person=2, seed=8, bias=0.3)
    with open(res.files["customers"], newline="") as fh:
        people = [r for r in csv.DictReader(fh) if r["customer_id"]]
    with open(res.files["transactions"], newline="") as fh:
        tx_count: dict[str, int] = {}
        tx_rows: dict[str, list[dict[str, str]]] = {}
        for r in csv.DictReader(fh):
            tx_count[r["customer_id"]] = tx_count.get(r["customer_id"], 0) + 1
            tx_rows.setdefault(r["customer_id"], []).append(r)
    ws = Workspace.open(d / "lakewarden.yaml")
    dana = ws.actor("dana")
    for ds in ("customers", "transactions"):
        ingest(ws, dana, ds, [res.files[ds]])
        build_silver(ws, dana, ds)
    fs = Features(ws)
    fs.apply(ws.actor("pipeline"))
    fs.materialize(ws.actor("pipeline"))
    out = train_model(ws, ws.actor("sam"), name="credit", features=FEATURES, label="defaulted",
                      purpose="credit_scoring", options=TrainOptions(epochs=1, target_epsilon=2.0, accountant="rdp"),
                      mitigate=False)
    tokens = ws.keyring.tokens_for([p["customer_id"] for p in people[:6]], create=False)
    GovernedPredictor(ws, out.ref, ws.actor("mel")).score_tokens(tokens)  # request-log lines
    ws.close()
    return {"dir": d, "people": people, "tx": tx_count, "tx_rows": tx_rows}


@pytest.fixture
def lake(built: dict, tmp_path: Path):
    """A fresh copy of the built lake, opened."""
    d = tmp_path / "proj"
    shutil.copytree(built["dir"], d)
    ws = Workspace.open(d / "lakewarden.yaml")
    yield ws
    ws.close()


def _ids(built: dict, *idx: int) -> list[str]:
    return [built["people"][i]["customer_id"] for i in idx]


def _token(ws: Workspace, sid: str) -> str | None:
    return ws.keyring.token_for(sid, create=False)


def _erase(ws: Workspace, ids: list[str], **kw) -> str:
    carla = ws.actor("carla")
    st = file_request(ws, carla, "erase", ids)
    run_request(ws, carla, st.request_id, purge_now=True, **kw)
    return st.request_id


# -- the scanner is not blind --------------------------------------------------------------------
def test_scanner_finds_a_subject_that_is_still_held(lake: Workspace, built: dict):
    sid = _ids(built, 0)[0]
    tok = _token(lake, sid)
    ident = [(f"vault.customers.{c}", built["people"][0][c]) for c in ("name", "email", "phone") if built["people"][0][c]]
    ctx = ErasureContext("req_test", [tok], {tok: [("subject_id", sid), *ident]}, {tok: "S1"})
    rep = scan(lake, ctx)
    where = {(f.path.split("/")[2] if f.path.startswith(".lakewarden/tables") else f.path.split("/")[1], f.how)
             for f in rep.findings}
    assert ("bronze", "value") in where and ("silver", "value") in where  # tokens read from Parquet values
    assert ("feast", "bytes") in where  # the online store (SQLite)
    assert ("serving", "bytes") in where  # the request log
    assert any(f.how == "decrypted" for f in rep.findings)  # vault ciphertexts open while the key lives
    assert not any(f.what.endswith(("email", "name", "phone")) and f.how in ("bytes", "value") for f in rep.findings)


# -- erasure end to end --------------------------------------------------------------------------
def test_erasure_removes_the_subject_everywhere_and_is_certified(lake: Workspace, built: dict):
    sid = _ids(built, 1)[0]
    tok = _token(lake, sid)
    assert tok and subject_rows(lake, [tok])[TableRef("bronze", "customers")][1].num_rows == 1
    assert online_rows(lake, [tok])
    rid = _erase(lake, [sid])
    st = request_status(lake, lake.actor("carla"), rid)
    assert st.state == "done" and st.sla == "done" and st.completed_at and not st.late
    # gone from every current table and the online store, the key destroyed, the id unlinkable
    assert all(rows.num_rows == 0 for _v, rows in subject_rows(lake, [tok]).values())
    assert online_rows(lake, [tok]) == []
    assert lake.keyring.store.subject_state(tok) == "shredded"
    assert _token(lake, sid) is None
    erased = st.detail["erased"]
    assert erased["delta:bronze.customers"] == 1 and erased["delta:vault.customers"] == 1
    assert erased["delta:bronze.transactions"] == built["tx"].get(sid, 0)
    assert erased["online:customer_profile"] > 0
    # the model trained on silver holding the subject is flagged as the policy says (default: flag)
    assert st.detail["models_flagged"] == ["credit@1"] and st.detail["model_actions"] == {"credit@1": "flag"}
    flagged = lake.audit.query(action="requests.model_flagged").to_pylist()
    assert [r["resource"] for r in flagged] == ["model:credit@1"] and flagged[0]["outcome"] == "flag"
    # verified by a full scan that found nothing, and certified with a signature that checks
    cert = verify_certificate(lake, lake.actor("carla"), rid).data
    v = cert["verified"]
    assert v["findings"] == 0 and v["residual_rows"] == 0 and v["files_scanned"] > 50 and v["bytes_scanned"] > 0
    assert v["delta_versions"] >= 10 and v["parquet_values"] > 0
    assert cert["subjects"] == 1 and cert["done"]["keys_destroyed"] == 1
    assert cert["subject_digests"] == list(st.subject_digests)
    # nothing the system wrote names the subject: a fresh scan with the identifiers finds nothing
    ident = [(c, built["people"][1][c]) for c in ("name", "email", "phone") if built["people"][1][c]]
    rep = scan(lake, ErasureContext("x", [tok], {tok: [("subject_id", sid), *ident]}, {tok: "S1"}))
    assert rep.findings == []


def test_erasure_waits_for_history_retention_unless_purged_now(lake: Workspace, built: dict):
    sid = _ids(built, 2)[0]
    tok = _token(lake, sid)
    carla = lake.actor("carla")
    bronze_v0 = 0
    st = file_request(lake, carla, "erase", [sid])
    st = run_request(lake, carla, st.request_id)
    assert st.state == "awaiting_purge" and st.sla == "open"
    assert datetime.fromisoformat(st.detail["purge_after"]) - datetime.fromisoformat(st.detail["erased_at"]) == \
        timedelta(days=7)  # policies' retention.history
    # time travel still finds the rows until the purge, but nothing in them can be opened or linked
    old = Catalog(lake.config).open(TableRef("vault", "customers"), version=bronze_v0).to_pyarrow_table()
    row = old.filter(pc.equal(old["customer_id"], tok))
    assert row.num_rows == 1
    with pytest.raises(SubjectShredded):
        lake.keyring.open(row["email"][0].as_py(), token=tok, dataset="customers", column="email")
    assert _token(lake, sid) is None
    st = run_request(lake, carla, st.request_id)  # still inside the window: nothing changes
    assert st.state == "awaiting_purge"
    st = run_request(lake, carla, st.request_id, purge_now=True)
    assert st.state == "done" and st.detail["purge_now"] is True
    assert lake.audit.query(action="requests.purge_now").num_rows == 1
    # after the purge an old version has no readable rows of the subject: its files are gone
    try:
        old = Catalog(lake.config).open(TableRef("vault", "customers"), version=bronze_v0).to_pyarrow_table()
    except Exception:  # noqa: BLE001 - the version's files were vacuumed
        old = None
    if old is not None:
        assert old.filter(pc.equal(old["customer_id"], tok)).num_rows == 0


def test_embedded_sql_returns_nothing_for_an_erased_subject(lake: Workspace, built: dict):
    from lakehouse.sql import run_query

    sid = _ids(built, 3)[0]
    tok = _token(lake, sid)
    q = f"SELECT count(*) AS n FROM bronze.customers WHERE customer_id = '{tok}'"
    assert run_query(lake, lake.actor("carla"), q).table["n"][0].as_py() == 1
    rid = _erase(lake, [sid])
    assert request_status(lake, lake.actor("carla"), rid).state == "done"  # the query's audit record names no token
    for layer in ("bronze", "silver"):
        for ds in ("customers", "transactions"):
            q = f"SELECT count(*) AS n FROM {layer}.{ds} WHERE customer_id = '{tok}'"
            assert run_query(lake, lake.actor("carla"), q).table["n"][0].as_py() == 0


def test_batch_erasure_of_several_subjects_in_one_request(lake: Workspace, built: dict):
    ids = _ids(built, 10, 11, 12, 13, 14)
    toks = [_token(lake, s) for s in ids]
    before = Catalog(lake.config).open(TableRef("bronze", "customers")).count()
    rid = _erase(lake, ids)
    st = request_status(lake, lake.actor("carla"), rid)
    assert st.state == "done" and st.subjects == 5 and len(st.subject_digests) == 5
    assert Catalog(lake.config).open(TableRef("bronze", "customers")).count() == before - 5
    assert all(lake.keyring.store.subject_state(t) == "shredded" for t in toks)


def test_ledger_and_audit_hold_no_token_and_no_identifier(lake: Workspace, built: dict):
    sid = _ids(built, 4)[0]
    tok = _token(lake, sid)
    rid = _erase(lake, [sid])
    st = request_status(lake, lake.actor("carla"), rid)
    blob = json.dumps([s.to_dict() for s in list_requests(lake, lake.actor("carla"))])
    assert tok not in blob and sid not in blob and rid in blob
    events = lake.audit.query(resource=f"request:{rid}").to_pylist()
    assert events and all(e["subject_token"] is None for e in events)
    assert not any(tok in (e["details"] or "") or sid in (e["details"] or "") for e in events)
    assert st.subject_digests[0] in events[0]["details"]  # filed with the keyed digest
    # the probe (sealed tokens and identifiers) is destroyed with its key once done
    assert not list((lake.config.workspace_dir / "requests" / "probes").glob("*"))
    with pytest.raises(Exception):
        lake.keyring.store.system_key(f"request:{rid}", create=False)


def test_a_dvc_cached_copy_is_unlinkable_after_shredding(lake: Workspace, built: dict):
    sid = _ids(built, 5)[0]
    tok = _token(lake, sid)
    # a DVC-cached copy of bronze (what `dvc add` of the table would keep): DVC cannot edit it
    src = next(Path(Catalog(lake.config).uri(TableRef("bronze", "customers"))).rglob("*.parquet"))
    cache = lake.config.base_dir / ".dvc" / "cache" / "files" / "md5" / "ab"
    cache.mkdir(parents=True)
    tbl = Catalog(lake.config).open(TableRef("bronze", "customers")).to_pyarrow_table()
    import pyarrow.parquet as pq

    pq.write_table(tbl.filter(pc.equal(tbl["customer_id"], tok)), cache / "cdef0123")
    assert src.exists()
    rid = _erase(lake, [sid])
    v = request_status(lake, lake.actor("carla"), rid).detail["verification"]
    assert request_status(lake, lake.actor("carla"), rid).state == "done"
    assert v["unlinkable_copies"] >= 1 and v["findings"] == 0


# -- crashes ---------------------------------------------------------------------------------------
_RUNNER = """
import sys, warnings
warnings.filterwarnings("ignore")
from governance.workspace import Workspace
from governance.erasure import file_request, run_request
ws = Workspace.open(sys.argv[1])
carla = ws.actor("carla")
if sys.argv[2] == "file":
    print(file_request(ws, carla, "erase", sys.argv[3:]).request_id)
else:
    run_request(ws, carla, sys.argv[3], purge_now=True)
ws.close()
from lakewarden.process import exit_process
exit_process(0)  # as the lakewarden command ends (see lakewarden/process.py)
"""


def _sub(cfg: Path, *args: str, crash: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop(CRASH_ENV, None)
    if crash:
        env[CRASH_ENV] = crash
    return subprocess.run([sys.executable, "-c", _RUNNER, str(cfg), *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a process crashed at every step, then run again: 46-56 s
def test_a_crash_at_every_step_then_run_finishes_the_same(lake: Workspace, built: dict, tmp_path: Path):
    ids = _ids(built, 20, 21)
    toks = [_token(lake, s) for s in ids]
    cfg = lake.config.source
    lake.close()
    p = _sub(cfg, "file", *ids)
    assert p.returncode == 0, p.stderr[-2000:]
    rid = p.stdout.strip().splitlines()[-1]
    crashes = ["before:models_checked", "after:models_checked", "before:erased", "after:erased", "before:shredded",
               "after:shredded", "after:awaiting_purge", "before:purged", "after:purged", "before:verified",
               "after:verified", "before:certified", "after:certified", "before:done"]
    for crash in crashes:
        p = _sub(cfg, "run", rid, crash=crash)
        assert p.returncode == 77, f"{crash}: {p.stderr[-2000:]}"
    p = _sub(cfg, "run", rid)
    assert p.returncode == 0, p.stderr[-2000:]
    ws = Workspace.open(cfg)
    try:
        st = request_status(ws, ws.actor("carla"), rid)
        assert st.state == "done"
        states = [r for r in ws.audit.query(resource=f"request:{rid}").to_pylist() if r["action"] == "requests.certificate"]
        assert len(states) == 1  # certified once, though it crashed around certification
        cert = verify_certificate(ws, ws.actor("carla"), rid).data
        assert cert["verified"]["findings"] == 0 and cert["done"]["keys_destroyed"] == 2
        assert all(rows.num_rows == 0 for _v, rows in subject_rows(ws, toks).values())
        assert online_rows(ws, toks) == []
        # same end state as an erasure that never crashed, on a fresh copy of the lake
        ref_dir = tmp_path / "ref"
        shutil.copytree(built["dir"], ref_dir)
        with Workspace.open(ref_dir / "lakewarden.yaml") as ref:
            _erase(ref, ids)
            for t in Catalog(ref.config).list():
                assert Catalog(ws.config).open(t).count() == Catalog(ref.config).open(t).count(), t
    finally:
        ws.close()


# -- access -----------------------------------------------------------------------------------------
def test_access_export_matches_what_was_ingested(lake: Workspace, built: dict, tmp_path: Path):
    person = built["people"][30]
    sid = person["customer_id"]
    out = tmp_path / "export"
    st = file_request(lake, lake.actor("carla"), "access", [sid], out_dir=out)
    st = run_request(lake, lake.actor("carla"), st.request_id)
    assert st.state == "done" and st.kind == "access"
    doc = json.loads((out / "subject_data.json").read_text())
    by = {}
    for item in doc["items"]:
        by.setdefault(item["location"], []).append(item)
    vault = by["vault.customers"][0]["fields"]
    for c in ("name", "email", "phone"):
        assert vault[c] == (person[c] or None)
    assert by["vault.customers"][0]["version"] is not None
    assert len(by["bronze.customers"]) == 1 and len(by.get("bronze.transactions", [])) == built["tx"].get(sid, 0)
    bronze = by["bronze.customers"][0]["fields"]
    assert bronze["sex"] == person["sex"]  # opened with the subject key
    assert by["restricted.customers"][0]["fields"]["ethnicity"] == person["ethnicity"]
    assert not person["income"] or abs(float(bronze["income"]) - float(person["income"])) < 1e-6
    assert any(loc.startswith("online:") for loc in by)
    assert [p["model"] for p in doc["processing"]] == ["credit@1"] and doc["processing"][0]["lineage_run_ids"]
    rows = list(csv.DictReader((out / "subject_data.csv").open()))
    assert {"subject", "store", "location", "version", "column", "value"} <= set(rows[0])
    assert any(r["location"] == "vault.customers" and r["column"] == "email" and r["value"] == person["email"]
               for r in rows) or not person["email"]
    token = _token(lake, sid)
    assert token not in (out / "subject_data.json").read_text()  # the export names no pseudonym
    assert lake.audit.query(action="requests.exported").num_rows == 1


_REPR = re.compile(r"(?<!\w)b'")  # a Python bytes literal (b'\x01...'), which an export must never hold
SCORED = range(6)  # the fixture's predictor scored the first six generated customers


def _whole_person(built: dict) -> dict:
    """A scored customer whose generated row has every field and appears once."""
    ids = [p["customer_id"] for p in built["people"]]
    return next(built["people"][i] for i in SCORED
                if all(built["people"][i].values()) and ids.count(built["people"][i]["customer_id"]) == 1)


def _export(ws: Workspace, sid: str, out: Path) -> tuple[dict[str, list[dict]], dict[tuple[str, str], list[dict]], str]:
    """Run an access request; return JSON fields by location, CSV rows by (location, column), both texts."""
    carla = ws.actor("carla")
    st = file_request(ws, carla, "access", [sid], out_dir=out)
    assert run_request(ws, carla, st.request_id).state == "done"
    text = (out / "subject_data.json").read_text() + (out / "subject_data.csv").read_text()
    by: dict[str, list[dict]] = {}
    for item in json.loads((out / "subject_data.json").read_text())["items"]:
        by.setdefault(item["location"], []).append(item["fields"])
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in csv.DictReader((out / "subject_data.csv").open(newline="")):
        cells.setdefault((r["location"], r["column"]), []).append(r)
    return by, cells, text


def test_access_export_holds_plain_values_of_every_column_class(lake: Workspace, built: dict, tmp_path: Path):
    """Every store's values are the subject's plain data (compared with the generated rows): the
    lakehouse layers, the online store's sensitive feature (ciphertext in Feast, opened with the
    subject's key), the predictor's request log; no ciphertext and no bytes repr anywhere."""
    person = _whole_person(built)
    sid = person["customer_id"]
    by, cells, text = _export(lake, sid, tmp_path / "export")
    assert not _REPR.search(text) and "\\x" not in text

    def cell(location: str, column: str) -> str:
        rows = cells[(location, column)]
        assert len(rows) == 1 and rows[0]["encoding"] == "", (location, column, rows)
        return rows[0]["value"]

    year, zip3 = int(person["birth_date"][:4]), person["zip_code"][:3]
    # subject_key: the id as filed (the token, its pseudonym, is never exported)
    assert by["as filed"] == [{"subject_id": sid}] and cell("as filed", "subject_id") == sid
    assert _token(lake, sid) not in text
    # direct identifiers: the vault, opened
    for c in ("name", "email", "phone"):
        assert by["vault.customers"][0][c] == person[c] and cell("vault.customers", c) == person[c]
    for loc in ("bronze.customers", "silver.customers"):
        (f,) = by[loc]
        # quasi-identifiers as held (generalized at ingest: the year, the zip prefix)
        assert f["birth_date"] == year and cell(loc, "birth_date") == str(year)
        assert f["zip_code"] == zip3 and cell(loc, "zip_code") == zip3
        # sensitive, protection encrypt: opened with the subject's key
        assert f["sex"] == person["sex"] and cell(loc, "sex") == person["sex"]
        assert "ethnicity" not in f  # restricted: its own table
        # public
        assert abs(f["income"] - float(person["income"])) < 1e-6 and abs(float(cell(loc, "income")) - f["income"]) < 1e-9
        assert f["region"] == person["region"] and cell(loc, "region") == person["region"]
        assert f["defaulted"] is (person["defaulted"] == "true") and cell(loc, "defaulted") == person["defaulted"]
        assert datetime.fromisoformat(f["_ingested_at"]).tzinfo is not None  # timestamps in ISO 8601
    # sensitive, protection restricted
    assert by["restricted.customers"][0]["ethnicity"] == person["ethnicity"]
    assert cell("restricted.customers", "ethnicity") == person["ethnicity"]
    # the online store: the sensitive feature was ciphertext in Feast
    assert by["online:customer_sensitive"] == [{"sex": person["sex"]}]
    assert cell("online:customer_sensitive", "sex") == person["sex"]
    (prof,) = by["online:customer_profile"]
    assert prof["region"] == person["region"] and abs(prof["income"] - float(person["income"])) < 1e-6
    assert prof["birth_date"] == year and prof["zip_code"] == zip3
    # transactions, every one of them
    want = sorted((t["transaction_id"], float(t["amount"]), t["merchant_category"]) for t in built["tx_rows"][sid])
    got = sorted((f["transaction_id"], f["amount"], f["merchant_category"]) for f in by["bronze.transactions"])
    assert got == want and len(by["silver.transactions"]) == len(want)
    # the predictor's request log: the features it scored, as plain values
    (logged,) = by["serving/requests/credit.jsonl"]
    assert logged["features"]["region"] == person["region"] and 0 <= logged["score"] <= 1
    (log_cell,) = cells[("serving/requests/credit.jsonl", "features")]
    assert log_cell["encoding"] == "json" and json.loads(log_cell["value"]) == logged["features"]


def test_access_export_opens_a_quarantined_row(lake: Workspace, built: dict, tmp_path: Path):
    """A row quarantined with the subject's token: its original row, opened and parsed."""
    from lakehouse.ingest import ingest

    person = _whole_person(built)
    bad = {**person, "income": "-5"}  # fails the policy's min: quarantined with the subject's token
    src = tmp_path / "landing" / "customers_again.csv"
    src.parent.mkdir()
    with src.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(person))
        w.writeheader()
        w.writerow(bad)
    ingest(lake, lake.actor("dana"), "customers", [src])
    by, cells, text = _export(lake, person["customer_id"], tmp_path / "export")
    assert not _REPR.search(text)
    (q,) = by["quarantine.customers"]
    assert q["payload"]["email"] == person["email"] and q["payload"]["income"] in ("-5", -5, -5.0)
    assert "income" in q["reason"]
    (c,) = cells[("quarantine.customers", "payload")]
    assert c["encoding"] == "json" and json.loads(c["value"]) == q["payload"]


def test_export_values_encode_binary_with_a_type_marker():
    import base64

    from governance.erasure.access import _csv_cell, export_value

    blob = b"\x01H\x00\xff"
    assert export_value({"b": blob}) == {"b": {"type": "binary", "base64": base64.b64encode(blob).decode()}}
    assert _csv_cell(blob) == (base64.b64encode(blob).decode(), "base64")
    assert _csv_cell(None) == ("", "") and _csv_cell(True) == ("true", "")
    assert _csv_cell({"x": [1, 2]}) == ('{"x": [1, 2]}', "json")
    assert export_value(datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)) == "2026-01-02T03:04:00+00:00"
    assert export_value(float("nan")) == "nan"


def test_access_export_from_a_redis_online_store(lake: Workspace, built: dict, tmp_path: Path, redis_port: int):
    """Redis keeps features under hashed field names: the export names them and opens the sensitive one."""
    from features.store import Features

    person = _whole_person(built)
    cfg = lake.config.source
    lake.close()
    cfg.write_text(cfg.read_text() + "features:\n  registry: .lakewarden/feast/registry-redis.db\n"
                   f"  online: {{type: redis, connection_string: '127.0.0.1:{redis_port}'}}\n")
    with Workspace.open(cfg) as ws:
        fs = Features(ws)
        fs.apply(ws.actor("pipeline"))
        fs.materialize(ws.actor("pipeline"))
        by, cells, text = _export(ws, person["customer_id"], tmp_path / "export")
    assert not _REPR.search(text) and "field:" not in text
    assert by["online:customer_sensitive"] == [{"sex": person["sex"]}]
    assert cells[("online:customer_sensitive", "sex")][0]["value"] == person["sex"]
    (prof,) = by["online:customer_profile"]
    assert prof["region"] == person["region"] and prof["zip_code"] == person["zip_code"][:3]


# -- closed by default: required handlers ----------------------------------------------------------
@pytest.fixture
def reload_handlers(monkeypatch: pytest.MonkeyPatch):
    """Handlers as the entry points give them again after the test (which may break or remove some)."""
    from governance.erasure import load_handlers

    yield
    monkeypatch.undo()
    load_handlers(reload=True)


def test_the_required_handlers_are_declared_as_entry_points():
    import tomllib

    from governance.erasure import ENTRY_POINT_GROUP, REQUIRED_HANDLERS, require_handlers

    eps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert set(REQUIRED_HANDLERS) <= set(eps)
    assert REQUIRED_HANDLERS == ("lakehouse", "landing", "features", "models", "serving-logs")
    assert {h.name for h in require_handlers()} >= set(REQUIRED_HANDLERS)


def test_a_missing_required_handler_refuses_every_request_naming_it(lake: Workspace, built: dict, tmp_path: Path,
                                                                    reload_handlers: None):
    from governance.erasure import MissingHandlers, load_handlers, run_pending, unregister_handler

    carla = lake.actor("carla")
    sid = _ids(built, 70)[0]
    filed = file_request(lake, carla, "erase", [sid])
    load_handlers()
    assert unregister_handler("models") is not None and unregister_handler("landing") is not None
    calls = {
        "file erase": lambda: file_request(lake, carla, "erase", [sid]),
        "file access": lambda: file_request(lake, carla, "access", [sid], out_dir=tmp_path / "x"),
        "run": lambda: run_request(lake, carla, filed.request_id, purge_now=True),
        "run pending": lambda: run_pending(lake, carla, purge_now=True),
        "scan": lambda: scan(lake, ErasureContext("req_x", [_token(lake, sid)])),
    }
    for what, call in calls.items():
        with pytest.raises(MissingHandlers) as e:
            call()
        assert list(e.value.missing) == ["landing", "models"], what
        assert "'landing'" in str(e.value) and "'models'" in str(e.value) and e.value.exit_code == 2, what
    # nothing started: one request on file, still filed; its subject still there
    assert [(s.request_id, s.state) for s in list_requests(lake, carla)] == [(filed.request_id, "filed")]
    assert lake.keyring.store.subject_state(_token(lake, sid)) == "active"
    assert not (tmp_path / "x").exists()


def test_no_request_passes_models_checked_without_a_models_handler(lake: Workspace, built: dict,
                                                                   reload_handlers: None):
    from governance.erasure import ErasureHandler, MissingHandlers, load_handlers, register_handler

    carla = lake.actor("carla")
    filed = file_request(lake, carla, "erase", _ids(built, 71))
    load_handlers()
    register_handler(ErasureHandler(name="models", order=10))  # there, but checks no model
    with pytest.raises(MissingHandlers, match=r"'models' \(registered without 'models'\)"):
        run_request(lake, carla, filed.request_id, purge_now=True)
    assert request_status(lake, carla, filed.request_id).state == "filed"
    assert lake.audit.query(action="requests.models_checked").num_rows == 0


def test_a_broken_entry_point_is_a_missing_handler(lake: Workspace, built: dict, monkeypatch: pytest.MonkeyPatch,
                                                   reload_handlers: None):
    from importlib.metadata import EntryPoint

    import governance.erasure.handlers as handlers_mod
    from governance.erasure import ENTRY_POINT_GROUP, MissingHandlers, load_handlers

    real = handlers_mod._entry_points()
    broken = [ep for ep in real if ep.name not in ("models", "features")] + [
        EntryPoint("models", "training.no_such_module:HANDLER", ENTRY_POINT_GROUP),
        EntryPoint("features", "training.erasure:HANDLER", ENTRY_POINT_GROUP),  # names the "models" handler
    ]
    monkeypatch.setattr(handlers_mod, "_entry_points", lambda: broken)
    failed = load_handlers(reload=True)
    assert set(failed) == {"models", "features"}
    with pytest.raises(MissingHandlers) as e:
        file_request(lake, lake.actor("carla"), "erase", _ids(built, 72))
    assert list(e.value.missing) == ["features", "models"]
    assert "ModuleNotFoundError" in e.value.missing["models"]
    assert "not the ErasureHandler 'features'" in e.value.missing["features"]
    monkeypatch.setattr(handlers_mod, "_entry_points", lambda: [])  # none installed at all
    load_handlers(reload=True)
    with pytest.raises(MissingHandlers) as e:
        file_request(lake, lake.actor("carla"), "erase", _ids(built, 72))
    assert list(e.value.missing) == ["lakehouse", "landing", "features", "models", "serving-logs"]
    assert list_requests(lake, lake.actor("carla")) == []


def test_a_denied_actor_learns_nothing_about_requests(lake: Workspace, built: dict):
    """Every verb asks the gate first (and audits it): unknown and known ids get the same denial."""
    from governance.erasure import run_pending

    carla, dana = lake.actor("carla"), lake.actor("dana")
    rid = file_request(lake, carla, "erase", _ids(built, 73)).request_id
    for ident in (rid, "req_nope"):
        for call in (lambda: run_request(lake, dana, ident), lambda: request_status(lake, dana, ident),
                     lambda: verify_certificate(lake, dana, ident)):
            with pytest.raises(AccessDenied, match="roles/stages/request"):
                call()
    for call in (lambda: list_requests(lake, dana), lambda: run_pending(lake, dana)):
        with pytest.raises(AccessDenied, match="roles/stages/request"):
            call()
    assert lake.audit.query(outcome="deny", stage="request", actor="dana").num_rows == 8


# -- who may, deadlines, bad input -----------------------------------------------------------------
def test_only_a_compliance_officer_may_file_or_run(lake: Workspace, built: dict):
    sid = _ids(built, 40)[0]
    for user in ("dana", "ana", "sam", "mel"):
        with pytest.raises(AccessDenied, match="roles/stages/request"):
            file_request(lake, lake.actor(user), "erase", [sid])
    st = file_request(lake, lake.actor("carla"), "erase", [sid])
    with pytest.raises(AccessDenied):
        run_request(lake, lake.actor("dana"), st.request_id)
    denies = lake.audit.query(outcome="deny", stage="request").num_rows
    assert denies == 5


def test_bad_input_is_a_clear_error(lake: Workspace):
    carla = lake.actor("carla")
    with pytest.raises(RequestError, match="not known to the key store"):
        file_request(lake, carla, "erase", ["C-000000000-no-such"])
    with pytest.raises(RequestError, match="unknown regime"):
        file_request(lake, carla, "erase", ["x"], regime="hipaa")
    with pytest.raises(RequestError, match="at least one subject"):
        file_request(lake, carla, "erase", [" "])
    with pytest.raises(RequestError, match="output folder"):
        file_request(lake, carla, "access", ["x"])
    with pytest.raises(RequestError, match="no request"):
        request_status(lake, lake.actor("carla"), "req_nope")


@pytest.mark.parametrize(("filed", "regime", "due"), [
    ("2026-01-31T10:00:00", "gdpr", "2026-02-28T10:00:00"),
    ("2028-01-31T10:00:00", "gdpr", "2028-02-29T10:00:00"),
    ("2026-03-15T09:30:00", "gdpr", "2026-04-15T09:30:00"),
    ("2026-12-20T00:00:00", "gdpr", "2027-01-20T00:00:00"),
    ("2026-01-31T10:00:00", "ccpa", "2026-03-17T10:00:00"),
    ("2026-12-20T00:00:00", "ccpa", "2027-02-03T00:00:00"),
])
def test_legal_deadlines(filed: str, regime: str, due: str):
    f = datetime.fromisoformat(filed).replace(tzinfo=timezone.utc)
    assert due_date(f, regime) == datetime.fromisoformat(due).replace(tzinfo=timezone.utc)


# Filing dates where a month's length decides the deadline: a month after 31 January is 28 February,
# after 2 December is 2 January (31 days), after 31 December 23:30 UTC is 31 January 23:30.
FILED_AT = [datetime(2027, 1, 31, 9, tzinfo=timezone.utc), datetime(2027, 2, 28, 9, tzinfo=timezone.utc),
            datetime(2027, 4, 30, 9, tzinfo=timezone.utc), datetime(2026, 12, 2, 9, tzinfo=timezone.utc),
            datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc)]
GDPR_DUE = ["2027-02-28", "2027-03-28", "2027-05-30", "2027-01-02", "2027-01-31"]


@pytest.mark.parametrize(("filed", "gdpr_due"), list(zip(FILED_AT, GDPR_DUE)), ids=[d.date().isoformat() for d in FILED_AT])
def test_sla_status_over_time(lake: Workspace, built: dict, filed: datetime, gdpr_due: str):
    lake._clock = lambda: filed  # "now" is pinned: the deadline arithmetic, not today's date, is under test
    carla = lake.actor("carla")
    g = file_request(lake, carla, "erase", _ids(built, 50))
    c = file_request(lake, carla, "erase", _ids(built, 51), regime="ccpa")
    assert g.filed_at == filed and g.regime == "gdpr" and g.due_at.date().isoformat() == gdpr_due
    assert c.due_at - c.filed_at == timedelta(days=45)

    def sla(at: datetime) -> dict[str, tuple[str, bool]]:
        return {s.request_id: (s.sla, s.late) for s in list_requests(lake, lake.actor("carla"), now=at)}

    day, soon = timedelta(days=1), timedelta(days=lake.config.requests.due_soon_days)
    assert sla(filed + day) == {g.request_id: ("open", False), c.request_id: ("open", False)}
    assert sla(g.due_at - soon - day)[g.request_id] == ("open", False)
    assert sla(g.due_at - soon + day)[g.request_id] == ("due soon", False)
    assert sla(g.due_at)[g.request_id] == ("due soon", False)  # due that day: not late yet
    assert sla(g.due_at + timedelta(seconds=1))[g.request_id] == ("overdue", True)
    assert sla(c.due_at - day)[c.request_id] == ("due soon", False)
    assert sla(c.due_at + timedelta(seconds=1))[c.request_id] == ("overdue", True)
    run_request(lake, carla, g.request_id, purge_now=True)
    s = {x.request_id: x for x in list_requests(lake, lake.actor("carla"), now=g.due_at + 9 * day)}
    assert s[g.request_id].sla == "done" and s[g.request_id].late is False  # done on time, whatever the date now


# -- the CLI ------------------------------------------------------------------------------------------
def test_cli_erase_list_status_certificate_and_deny(lake: Workspace, built: dict):
    from lakewarden.cli import app

    cfg = str(lake.config.source)
    sid = _ids(built, 60)[0]
    runner = CliRunner()
    r = runner.invoke(app, ["--config", cfg, "--as", "ana", "requests", "erase", "--subject", sid])
    # main() maps the error to exit 3 (checked through a real process below)
    assert isinstance(r.exception, AccessDenied) and r.exception.exit_code == 3
    r = runner.invoke(app, ["--config", cfg, "--as", "carla", "requests", "erase", "--subject", sid, "--purge-now"])
    assert r.exit_code == 0, r.output
    assert "done" in r.output and "certificate" in r.output and sid not in r.output
    rid = r.output.split("filed ")[1].split()[0]
    r = runner.invoke(app, ["--config", cfg, "--as", "carla", "requests", "list"])
    assert r.exit_code == 0 and rid in r.output and "GDPR" in r.output
    r = runner.invoke(app, ["--config", cfg, "--as", "carla", "requests", "status", rid])
    assert r.exit_code == 0 and "state done" in r.output
    r = runner.invoke(app, ["--config", cfg, "--as", "carla", "requests", "certificate", rid])
    assert r.exit_code == 0 and "valid" in r.output


def test_cli_user_errors_are_one_line(lake: Workspace):
    cfg = str(lake.config.source)
    where = lake.config.base_dir
    p = lw_in(where, "--config", cfg, "--as", "carla", "requests", "status", "req_nope")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "no request 'req_nope'" in p.stderr
    p = lw_in(where, "--config", cfg, "--as", "dana", "requests", "list")
    assert p.returncode == 3 and "roles/stages/request" in p.stderr and "Traceback" not in p.stderr
    # gate first: a denied actor is refused before the id is looked up (not told it does not exist)
    p = lw_in(where, "--config", cfg, "--as", "dana", "requests", "run", "req_nope")
    assert p.returncode == 3 and "roles/stages/request" in p.stderr and "no request" not in p.stderr


def test_erasure_finds_rows_whatever_bucketing_a_table_was_written_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A table that does not record its bucketing (written before the property, or under another
    bucket count) is searched by its key column: no row survives a bucket computed differently."""
    import lakehouse.erasure as erasure_mod
    import lakehouse.ingest as ingest_mod
    from deltalake import DeltaTable
    from governance.keys import generate_kek_b64
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.erasure import _delete_subject_rows
    from lakehouse.ingest import ingest
    from lakehouse.synth import generate

    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "lakewarden.yaml").write_text(
        "version: 1\nname: t\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\npolicies: [policies/*.yaml]\n")
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    res = generate(tmp_path / "landing", people=80, transactions_per_person=2, seed=3)
    # An "old" writer: another bucket function, and no bucketing property on the tables.
    import pyarrow as pa

    monkeypatch.setattr(ingest_mod, "subject_buckets",
                        lambda toks, n: pa.array([None if t is None else len(t) % 3 for t in toks.to_pylist()], pa.int32()))
    monkeypatch.setattr(ingest_mod, "table_description", lambda buckets: None)
    with Workspace.open(tmp_path / "lakewarden.yaml") as ws:
        for ds in ("customers", "transactions"):
            ingest(ws, ws.actor("dana"), ds, [res.files[ds]])
        ref = TableRef("bronze", "transactions")
        dt = Catalog(ws.config).open(ref)
        assert not dt.metadata().description
        victim = dt.to_pyarrow_table(columns=["customer_id"])["customer_id"][0].as_py()
        assert erasure_mod.table_buckets(dt) is None
        deleted = _delete_subject_rows(ws, victim)
        assert deleted["bronze.transactions"] > 0 and deleted["bronze.customers"] == 1
        for r in (ref, TableRef("bronze", "customers"), TableRef("vault", "customers")):
            left = DeltaTable(Catalog(ws.config).uri(r)).to_pyarrow_table(columns=["customer_id"])
            assert victim not in left["customer_id"].to_pylist()


def test_new_tables_record_their_bucketing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from governance.keys import generate_kek_b64
    from lakehouse.catalog import Catalog, TableRef, subject_bucket, table_buckets
    from lakehouse.ingest import ingest
    from lakehouse.silver import build_silver
    from lakehouse.synth import generate

    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "lakewarden.yaml").write_text(
        "version: 1\nname: t\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\npolicies: [policies/*.yaml]\n")
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    res = generate(tmp_path / "landing", people=60, transactions_per_person=0, seed=4)
    with Workspace.open(tmp_path / "lakewarden.yaml") as ws:
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        build_silver(ws, ws.actor("dana"), "customers")
        cat = Catalog(ws.config)
        for layer in ("bronze", "vault", "silver"):
            dt = cat.open(TableRef(layer, "customers"))
            assert table_buckets(dt) == 16, layer
            t = dt.to_pyarrow_table(columns=["customer_id", "_subject_bucket"])
            assert all(subject_bucket(k, 16) == b for k, b in zip(t["customer_id"].to_pylist(), t["_subject_bucket"].to_pylist()))
