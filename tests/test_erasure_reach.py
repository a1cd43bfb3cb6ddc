"""Erasure reaches what earlier versions missed (issue #12): kept landing files outside the
workspace, a running predictor's request log, and Delta statistics on token columns of tables
written before they were turned off.

Each check ends with an independent byte-level look at every file (not the scanner's own
report): the subject's id, name and e-mail (and, where it says so, the token) are nowhere.
Subject values come from the generated files at run time; none is in this file.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from governance.keys import generate_kek_b64
from governance.erasure import ErasureContext, file_request, request_status, run_request, verify_certificate
from governance.workspace import Workspace
from lakehouse import landing
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.synth import generate

pytestmark = pytest.mark.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
CONFIG = ("version: 1\nname: reach\nstorage: {root: .lakewarden/tables}\n"
          "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: LAKEWARDEN_KEK}}\n"
          "policies: [policies/*.yaml]\n")


def _project(base: Path, *, keep: bool) -> Path:
    proj = base / "proj"
    shutil.copytree(REPO / "policies", proj / "policies")
    if keep:
        for ds in ("customers", "transactions"):
            p = proj / "policies" / f"{ds}.yaml"
            text = p.read_text()
            assert "landing: remove" in text
            p.write_text(text.replace("landing: remove", "landing: keep"))
    (proj / "lakewarden.yaml").write_text(CONFIG)
    return proj


def _people(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r["customer_id"]]


def _unique_person(people: list[dict[str, str]], tx: dict[str, int] | None = None) -> dict[str, str]:
    """Someone whose name and e-mail nobody else has (and, when given, with transactions)."""
    names = [p["name"] for p in people]
    mails = [p["email"] for p in people]
    for p in people:
        if p["name"] and p["email"] and names.count(p["name"]) == 1 and mails.count(p["email"]) == 1 \
                and (tx is None or tx.get(p["customer_id"], 0) > 0):
            return p
    raise AssertionError("no person with a unique name and e-mail in the generated file")


def _traces(roots: list[Path], needles: dict[str, bytes], *, skip: tuple[Path, ...] = ()) -> list[str]:
    """Independent byte-level grep: ``what in file`` for every needle found in every file (and file name)."""
    out = []
    for root in roots:
        for f in sorted(root.rglob("*")):
            if any(f == s or s in f.parents for s in skip):
                continue
            for what, b in needles.items():
                if b in os.fsencode(str(f.relative_to(root))):
                    out.append(f"{what} in the name {f.name}")
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                out.extend(f"{what} in {f.relative_to(root)}" for what, b in needles.items() if b in data)
    return out


def _erase(ws: Workspace, ids: list[str]) -> str:
    carla = ws.actor("carla")
    st = file_request(ws, carla, "erase", ids)
    run_request(ws, carla, st.request_id, purge_now=True)
    return st.request_id


# -- 1. kept landing files, wherever they lie ------------------------------------------------------
def test_kept_landing_files_outside_the_workspace_are_rewritten_scanned_and_certified(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = _project(tmp_path, keep=True)
    exports = tmp_path / "exports"  # outside the project folder and its workspace
    res = generate(exports, people=80, transactions_per_person=2, seed=5)
    people = _people(res.files["customers"])
    tx: dict[str, int] = {}
    with open(res.files["transactions"], newline="") as fh:
        for r in csv.DictReader(fh):
            tx[r["customer_id"]] = tx.get(r["customer_id"], 0) + 1
    person = _unique_person(people, tx)
    sid = person["customer_id"]
    rows_before = {ds: pacsv.read_csv(res.files[ds]).num_rows for ds in ("customers", "transactions")}
    mtimes = {ds: res.files[ds].stat().st_mtime_ns for ds in ("customers", "transactions")}
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        for ds in ("customers", "transactions"):
            rep = ingest(ws, ws.actor("dana"), ds, [res.files[ds]])
            assert rep.files[0].landing.startswith("kept")
        kept = landing.kept_files(ws)
        assert sorted(f.path for f in kept) == sorted(res.files[ds].resolve() for ds in ("customers", "transactions"))
        # the ledger and everything else in the workspace holds no plaintext path of a kept file
        assert _traces([proj], {"path": os.fsencode(str(exports.resolve()))}) == []
        tok = ws.keyring.token_for(sid, create=False)

        rid = _erase(ws, [sid])
        st = request_status(ws, ws.actor("carla"), rid)
        assert st.state == "done", st.detail.get("findings")
        erased = st.detail["erased"]
        labels = {f.dataset: f.label for f in kept}
        assert erased[labels["customers"]] == 1 and erased[labels["transactions"]] == tx[sid]
        cert = verify_certificate(ws, ws.actor("carla"), rid).data
        assert sorted(cert["verified"]["labelled_files"]) == sorted(labels.values())
        assert set(labels.values()) <= set(cert["verified"]["roots"])  # the certificate lists what was scanned
        assert cert["done"]["rows_deleted"][labels["customers"]] == 1
        assert str(exports) not in json.dumps(cert) and str(exports) not in json.dumps(st.to_dict())

        # the kept files keep their format, other rows and their age (retention counts from mtime)
        for ds in ("customers", "transactions"):
            after = pacsv.read_csv(res.files[ds])
            assert after.num_rows == rows_before[ds] - (1 if ds == "customers" else tx[sid])
            assert sid not in after["customer_id"].to_pylist()
            assert res.files[ds].stat().st_mtime_ns == mtimes[ds]
        # ingesting the rewritten file again brings nobody back and duplicates nothing
        bronze = Catalog(ws.config).open(TableRef("bronze", "customers")).count()
        again = ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        assert again.rows_accepted == 0 and again.rows_skipped == again.rows_read == rows_before["customers"] - 1
        assert Catalog(ws.config).open(TableRef("bronze", "customers")).count() == bronze
        assert ws.keyring.token_for(sid, create=False) is None
    # independent byte-level scan of the workspace and the landing folder
    needles = {"id": sid.encode(), "name": person["name"].encode(), "email": person["email"].encode()}
    assert _traces([proj, exports], needles) == []
    keystore = proj / ".lakewarden" / "keys"
    assert _traces([proj, exports], {"token": tok.encode()}, skip=(keystore,)) == []  # key store: shred tombstone


def test_a_kept_file_still_holding_the_subject_stops_at_verification_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A row of another subject carries the erased subject's e-mail: the rewrite may not drop it
    (it is someone else's), so the request must not certify — the finding names the file by its
    label only."""
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = _project(tmp_path, keep=True)
    exports = tmp_path / "exports"
    res = generate(exports, people=40, transactions_per_person=0, seed=6)
    people = _people(res.files["customers"])
    person = _unique_person(people)
    other = next(p for p in people if p["customer_id"] != person["customer_id"] and p["email"])
    text = res.files["customers"].read_text()
    res.files["customers"].write_text(text.replace(other["email"], person["email"]))
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        label = landing.kept_files(ws)[0].label
        rid = _erase(ws, [person["customer_id"]])
        st = request_status(ws, ws.actor("carla"), rid)
        assert st.state == "verification_failed"
        assert st.detail["findings"] and all(f.startswith(f"{label}: S1:") for f in st.detail["findings"])
        assert f"{label}: S1:vault.customers.email (bytes)" in st.detail["findings"]
        blob = json.dumps(st.to_dict())
        assert person["email"] not in blob and str(exports) not in blob and "customers.csv" not in blob
        with pytest.raises(Exception, match="no certificate"):
            verify_certificate(ws, ws.actor("carla"), rid)
        # the subject's own row is gone; the other subject's row stays
        ids = pacsv.read_csv(res.files["customers"])["customer_id"].to_pylist()
        assert person["customer_id"] not in ids and other["customer_id"] in ids


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_kept_files_are_rewritten_in_their_own_format(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = _project(tmp_path, keep=True)
    rows = [{"customer_id": f"C-{i:09d}", "name": f"Person Number{i}", "email": f"p{i}@example.test",
             "income": str(1000 + i)} for i in range(50)]
    victim, keyless_twin = rows[7], {"customer_id": "", "name": "", "email": rows[7]["email"], "income": "1"}
    rows.append(keyless_twin)  # no subject key, but the victim's e-mail: a malformed copy of their row
    src = tmp_path / "share" / f"export.{fmt}"
    src.parent.mkdir()
    tbl = pa.Table.from_pylist(rows)
    if fmt == "parquet":
        pq.write_table(tbl.replace_schema_metadata({"origin": "crm"}), src, compression="zstd", row_group_size=16)
    elif fmt == "jsonl":
        src.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json, mentions " + victim["email"] + "\n")
    else:  # quoted fields with newlines: the victim's record and another subject's
        multi = {7: '"Person\nNumber7"', 10: '"Person\nNumber10"'}
        src.write_text("customer_id,name,email,income\n" + "".join(
            f'{r["customer_id"]},{multi.get(i, r["name"])},{r["email"]},{r["income"]}\n' for i, r in enumerate(rows)))
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    original = src.read_bytes()
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        kept = landing.record_kept(ws, "customers", src, actor="dana")
        tok = "sub_" + "a" * 26
        ctx = ErasureContext("req_x", [tok], {tok: [("subject_id", victim["customer_id"]),
                                                    ("vault.customers.name", victim["name"]),
                                                    ("vault.customers.email", victim["email"])]}, {tok: "S1"})
        assert landing.residual_rows(ws, ctx)[kept.label] >= 1
        out = landing.erase_subjects(ws, ctx)
        removed = 3 if fmt == "jsonl" else 2  # the victim's row, the keyless copy (and the line naming them)
        assert out[kept.label] == removed
        assert landing.residual_rows(ws, ctx)[kept.label] == 0
        assert landing.erase_subjects(ws, ctx)[kept.label] == 0  # idempotent: nothing left
        assert src.stat().st_mtime_ns == 1_600_000_000_000_000_000
        assert landing.is_erasure_rewrite(ws, "customers", src)
        src.write_bytes(original)
        assert not landing.is_erasure_rewrite(ws, "customers", src)
        landing.erase_subjects(ws, ctx)
    data = src.read_bytes()
    assert victim["customer_id"].encode() not in data and victim["email"].encode() not in data
    if fmt == "parquet":
        pf = pq.ParquetFile(src)
        assert pf.schema_arrow.metadata[b"origin"] == b"crm"
        assert pf.metadata.row_group(0).column(0).compression == "ZSTD"
        got = pf.read()
        assert got.num_rows == len(rows) - 2 and got.schema.remove_metadata() == tbl.schema
    elif fmt == "jsonl":
        lines = data.decode().splitlines()
        assert len(lines) == len(rows) - 2
        assert lines[0] == json.dumps(rows[0])  # other lines keep their bytes
    else:
        got = pacsv.read_csv(src)
        assert got.num_rows == len(rows) - 2 and victim["customer_id"] not in got["customer_id"].to_pylist()
        assert got["name"][9].as_py() == "Person\nNumber10"  # another subject's multi-line record, kept whole
        assert data == original.replace(b'C-000000007,"Person\nNumber7",p7@example.test,1007\n', b"").replace(
            b",,p7@example.test,1\n", b"")


# -- 2. the request log of a running predictor --------------------------------------------------------
@pytest.mark.parametrize("kept_open", [False, True], ids=["append_records", "RequestLogWriter"])
def test_appends_racing_an_erasure_lose_nothing_and_bring_nobody_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       kept_open: bool):
    """Appenders (threads standing in for a predictor's requests) and erasures interleave however
    they do: every other subject's line survives, and the erased one is never written back — also
    through the predictor's writer, which keeps its handles open across the erasure's rename."""
    from serving import erasure as serving_erasure
    from serving.requestlog import RequestLogWriter, append_records, log_dir

    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = _project(tmp_path, keep=False)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        log = log_dir(ws) / "credit.jsonl"
        victim, others = "sub_" + "v" * 26, ["sub_" + c * 26 for c in "abcd"]
        append_records(ws, log, [{"token": victim, "score": 0.5}])
        n_each = 150
        shared = RequestLogWriter(ws, log) if kept_open else None

        def writer(tok: str) -> None:
            for i in range(n_each):
                recs = [{"token": tok, "i": i}, {"token": victim, "i": i}]
                if shared is not None:
                    shared.append(recs)
                else:
                    append_records(ws, log, recs)

        threads = [threading.Thread(target=writer, args=(t,)) for t in others]
        for t in threads:
            t.start()
        ctx = ErasureContext("req_x", [victim], {}, {victim: "S1"})
        serving_erasure.HANDLER.erase(ws, ctx)  # while they write
        for t in threads:
            t.join()
        serving_erasure.HANDLER.erase(ws, ctx)  # lines written before the erasure took the lock
        assert append_records(ws, log, [{"token": victim, "late": True}]) == 0  # scored before, logged after
        if shared is not None:
            assert shared.append([{"token": victim, "late": True}]) == 0
            shared.close()
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        assert victim.encode() not in log.read_bytes()
        for tok in others:
            assert sorted(r["i"] for r in recs if r["token"] == tok) == list(range(n_each))
        assert serving_erasure.HANDLER.residual(ws, ctx) == {"request-log:credit.jsonl": 0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"},
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.slow  # trains a model and starts a predictor process: 18 s here
def test_a_running_predictor_keeps_no_trace_of_an_erased_subject(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from features.store import Features
    from lakehouse.silver import build_silver
    from serving.monitor import request_log_path
    from training.flow import train_model
    from training.trainer import TrainOptions

    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = _project(tmp_path, keep=False)
    res = generate(tmp_path / "landing", people=300, transactions_per_person=0, seed=9, bias=0.3)
    people = _people(res.files["customers"])
    person = _unique_person(people)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        build_silver(ws, ws.actor("dana"), "customers")
        fs = Features(ws)
        fs.apply(ws.actor("pipeline"))
        fs.materialize(ws.actor("pipeline"))
        out = train_model(ws, ws.actor("sam"), name="credit", purpose="credit_scoring", label="defaulted",
                          features=["customer_profile:income", "customer_profile:income_log", "customer_profile:region"],
                          options=TrainOptions(epochs=1, target_epsilon=2.0, accountant="rdp"), mitigate=False)
        ws.audit.flush()
        tok = ws.keyring.token_for(person["customer_id"], create=False)
        others = [t for t in ws.keyring.tokens_for([p["customer_id"] for p in people[:40]], create=False) if t != tok][:5]
        log = request_log_path(ws, "credit")
    port = _free_port()
    env = {**os.environ, "LAKEWARDEN_CONFIG": str(proj / "lakewarden.yaml"), "LAKEWARDEN_USER": "mel",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    server_log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "lakewarden", "serve", "--model", str(out.ref), "--port", str(port)],
                            env=env, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/v2/models/credit/ready", timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
                time.sleep(0.2)
        else:
            pytest.fail("the predictor was not ready in 600 tries")
        predict = f"{url}/v1/models/credit:predict"
        assert _post(predict, {"instances": [tok, *others[:2]]})[0] == 200
        assert tok.encode() in log.read_bytes()
        inode = log.stat().st_ino
        with Workspace.open(proj / "lakewarden.yaml") as ws:
            rid = _erase(ws, [person["customer_id"]])  # while the predictor runs
            st = request_status(ws, ws.actor("carla"), rid)
            assert st.state == "done", st.detail.get("findings")
            assert st.detail["erased"]["request-log:credit.jsonl"] == 1
        assert log.stat().st_ino != inode  # the erasure replaced the file the predictor had written to
        code, resp = _post(predict, {"instances": [tok]})
        assert code == 404  # erased from the online store
        assert _post(predict, {"instances": others})[0] == 200
        recs = [json.loads(x) for x in log.read_text().splitlines()]
        # the new requests landed in the new file (no stale handle), the erased subject's did not
        assert [r["token"] for r in recs[-len(others):]] == others
        assert sum(r["token"] == others[0] for r in recs) == 2
        assert tok.encode() not in log.read_bytes()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        server_log.close()
    needles = {"id": person["customer_id"].encode(), "name": person["name"].encode(),
               "email": person["email"].encode()}
    assert _traces([proj], needles) == []
    keystore = proj / ".lakewarden" / "keys"
    assert _traces([proj], {"token": tok.encode()}, skip=(keystore,)) == []  # key store: shred tombstone


# -- 3. token statistics written before they were turned off -------------------------------------------
def test_token_statistics_are_found_rewritten_by_optimize_and_gone_after_an_erasure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import lakehouse.ingest as ingest_mod
    from typer.testing import CliRunner

    from lakehouse.maintenance import optimize, token_stats, token_stats_report
    from lakewarden.cli import app

    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = _project(tmp_path, keep=False)
    res = generate(tmp_path / "landing", people=60, transactions_per_person=2, seed=7)
    people = _people(res.files["customers"])
    half = len(people) // 2
    first, second = tmp_path / "landing" / "c1.csv", tmp_path / "landing" / "c2.csv"
    for path, part in ((first, people[:half]), (second, people[half:])):
        with path.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(people[0]))
            w.writeheader()
            w.writerows(part)
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        # an "old" writer: tables created without the property that keeps token columns out of the stats
        # (and Parquet statistics on every column, as Lakewarden wrote them before it turned them off
        # for the token column)
        from deltalake import WriterProperties

        original = ingest_mod.table_configuration
        original_props = ingest_mod.BatchWork._writer_properties
        monkeypatch.setattr(ingest_mod, "table_configuration", lambda columns, key: {})
        monkeypatch.setattr(ingest_mod.BatchWork, "_writer_properties", lambda self, tbl: WriterProperties(compression="ZSTD"))
        ingest(ws, ws.actor("dana"), "customers", [first])
        ingest(ws, ws.actor("dana"), "transactions", [res.files["transactions"]])
        monkeypatch.setattr(ingest_mod, "table_configuration", original)
        monkeypatch.setattr(ingest_mod.BatchWork, "_writer_properties", original_props)
        bronze = TableRef("bronze", "customers")
        log_dir = Path(Catalog(ws.config).uri(bronze)) / "_delta_log"
        tokens = ws.keyring.tokens_for([p["customer_id"] for p in people[:half]], create=False)
        assert any(t.encode() in f.read_bytes() for f in log_dir.iterdir() if f.is_file() for t in tokens)
        found = {t.table: t for t in token_stats_report(ws)}
        assert {"bronze.customers", "vault.customers", "bronze.transactions"} <= set(found)
        ts = found["bronze.customers"]
        assert ts.writes and ts.current_files and ts.log_files and ts.columns == ("customer_id",)
        assert ts.describe().startswith("bronze.customers: Delta statistics on token column(s) customer_id")
        r = CliRunner().invoke(app, ["--config", str(proj / "lakewarden.yaml"), "policy", "check"])
        assert r.exit_code == 0 and "bronze.customers: Delta statistics on token column(s)" in r.output

        out = optimize(ws, ws.actor("dana"), bronze)
        assert out.token_stats_files_rewritten == len(ts.current_files) and out.token_stats_property
        after = token_stats(ws, bronze)
        assert after is not None and not after.writes and not after.current_files and after.log_files
        rows = Catalog(ws.config).open(bronze).count()
        assert rows == half
        ingest(ws, ws.actor("dana"), "customers", [second])  # appends after optimize carry no token stats
        again = token_stats(ws, bronze)
        assert again is not None and not again.current_files and again.log_files == after.log_files

        # erasure of a subject whose token is a file's min or max in the logs of this table (old
        # commits) and of one never optimized (bronze.transactions)
        logs = {t: [f.read_bytes() for f in (Path(Catalog(ws.config).uri(TableRef.parse(t))) / "_delta_log").iterdir()
                    if f.is_file()] for t in ("bronze.customers", "bronze.transactions")}
        victim = tok = None
        for p in people[:half]:
            t = ws.keyring.token_for(p["customer_id"], create=False)
            if all(any(t.encode() in b for b in bs) for bs in logs.values()) and \
                    [q["email"] for q in people].count(p["email"]) == 1 and p["email"]:
                victim, tok = p, t
                break
        assert victim is not None
        rid = _erase(ws, [victim["customer_id"]])
        st = request_status(ws, ws.actor("carla"), rid)
        assert st.state == "done", st.detail.get("findings")
        for t in ("bronze.customers", "bronze.transactions", "vault.customers"):
            d = Path(Catalog(ws.config).uri(TableRef.parse(t))) / "_delta_log"
            assert not any(tok.encode() in f.read_bytes() for f in d.iterdir() if f.is_file()), t
        assert Catalog(ws.config).open(bronze).count() == len(people) - 1
        assert Catalog(ws.config).open(TableRef("bronze", "transactions")).count() > 0  # loads from its checkpoint
    keystore = proj / ".lakewarden" / "keys"
    assert _traces([proj], {"token": tok.encode(), "id": victim["customer_id"].encode(),
                            "email": victim["email"].encode()}, skip=(keystore,)) == []
