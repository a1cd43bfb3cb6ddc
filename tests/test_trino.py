"""Trino for analysts, against a real Trino server (installed by infra/trino/install.sh).

Per role: masked columns come back masked, filtered rows are absent, forbidden tables are
denied, the audit table is visible only to compliance; the same query returns the same rows
on Trino and on the embedded engine; Trino sees new versions after ingest and erasure, and
reads tables that delta-rs checkpointed.

Without Trino installed these tests skip, unless LAKEWARDEN_REQUIRE_TRINO=1 (CI sets it:
`make test` installs Trino first), in which case a missing server is a failure.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable

from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import build_silver
from lakehouse.sql import run_query as run_embedded
from lakehouse.synth import generate
from lakehouse.trino import ADMIN_USER, TrinoDenied, TrinoServer, compile_rules, default_home, install, render_groups
from lakehouse.trino import run_query as run_trino

REPO = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("LAKEWARDEN_REQUIRE_TRINO") == "1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory):
    """A workspace with synthetic customers and transactions in bronze and silver, and Trino up."""
    home = default_home()
    if not (home / "bin" / "launcher").exists():
        if not REQUIRED:
            pytest.skip("Trino is not installed (run infra/trino/install.sh, or make test)")
        home = install()
    from governance.keys import generate_kek_b64

    d = tmp_path_factory.mktemp("trino")
    shutil.copytree(REPO / "policies", d / "policies")
    port = _free_port()
    (d / "lakewarden.yaml").write_text(
        "version: 1\nname: trinotest\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: TRINO_TEST_KEK}}\n"
        f"trino: {{host: 127.0.0.1, port: {port}}}\npolicies: [policies/*.yaml]\n"
    )
    os.environ["TRINO_TEST_KEK"] = generate_kek_b64()
    res = generate(d / "landing", people=600, transactions_per_person=4, seed=11, bias=0.5, bad_rows=0.02)
    ws = Workspace.open(d / "lakewarden.yaml")
    dana = ws.actor("dana")
    for ds in ("customers", "transactions"):
        ingest(ws, dana, ds, [res.files[ds]])
        build_silver(ws, dana, ds)
    srv = TrinoServer(ws, home=home)
    srv.start()
    srv.sync(dana)
    yield ws, srv
    srv.stop()
    ws.close()


def _rows(tbl: pa.Table) -> list[tuple]:
    def norm(v):
        if isinstance(v, float):
            return None if math.isnan(v) else round(v, 6)
        if isinstance(v, bytes):
            return v.hex()
        return v

    return sorted((tuple(norm(v) for v in r.values()) for r in tbl.to_pylist()), key=repr)


def both(ws: Workspace, user: str, sql: str) -> tuple[list[tuple], list[tuple]]:
    actor = ws.actor(user)
    return _rows(run_trino(ws, actor, sql)), _rows(run_embedded(ws, actor, sql).table)


# -- rules compiled from policy (no server needed) ----------------------------------------------
def test_rules_follow_the_gate(project: Path):
    ws = Workspace.open(project / "lakewarden.yaml")
    schema = pa.schema([("customer_id", pa.string()), ("birth_date", pa.int32()), ("sex", pa.binary()),
                        ("income", pa.float64()), ("region", pa.string()), ("income_z", pa.float64()),
                        ("_hash_customer_id", pa.string())])
    rules = compile_rules(ws, {("silver", "customers"): schema, ("bronze", "customers"): schema,
                               ("audit", "events"): pa.schema([("seq", pa.int64())])})
    by = {(r.get("group"), r.get("schema"), r.get("table")): r for r in rules["tables"]}
    analyst = by[("analyst", "silver", "customers")]
    cols = {c["name"]: c for c in analyst["columns"]}
    assert cols["sex"] == {"name": "sex", "allow": False}
    assert cols["income_z"] == {"name": "income_z", "allow": False}  # not in the analyst's column list
    # the keyed hash silver precomputed, read as Lakewarden's own user (the column is hidden from the role)
    assert cols["customer_id"] == {"name": "customer_id", "mask": '"_hash_customer_id"',
                                   "mask_environment": {"user": ADMIN_USER}}
    assert cols["_hash_customer_id"] == {"name": "_hash_customer_id", "allow": False}
    assert "floor" in cols["income"]["mask"] and "10000" in cols["income"]["mask"]
    assert analyst["filter"] == "region <> 'restricted'"
    assert ("analyst", "bronze", "customers") not in by  # no rule: denied
    assert by[("compliance_officer", "audit", "events")]["privileges"] == ["SELECT"]
    assert not any(r.get("group") == "analyst" and r.get("schema") == "audit" for r in rules["tables"])
    for r in rules["tables"]:
        if r.get("catalog") == "delta_lake":
            assert set(r["privileges"]) <= {"SELECT", "OWNERSHIP"}  # Trino stays read-only on the Delta tables
    ws.close()


def test_groups_map_users_and_single_role_identities(project: Path):
    ws = Workspace.open(project / "lakewarden.yaml")
    lines = dict(line.split(":") for line in render_groups(ws).splitlines())
    assert lines["analyst"] == "ana,ana@analyst"
    assert "pipeline@data_engineer" in lines["data_engineer"] and "pipeline@analyst" not in lines["analyst"]
    ws.close()


# -- against the server -----------------------------------------------------------------------
@pytest.mark.slow  # against the module's Trino server
def test_analyst_sees_masked_filtered_rows_same_as_embedded(lake):
    ws, _ = lake
    trino_rows, embedded_rows = both(ws, "ana", "SELECT customer_id, birth_date, zip_code, income, region FROM customers")
    assert trino_rows == embedded_rows
    assert len(trino_rows) > 500
    assert all(len(r[0]) == 32 for r in trino_rows)  # the keyed hash of the token (128 bits, hex)
    assert all(r[3] is None or r[3] % 10000 == 0 for r in trino_rows)  # bucketed income
    assert "restricted" not in {r[4] for r in trino_rows}  # row filter


@pytest.mark.slow  # against the module's Trino server
def test_hidden_column_and_forbidden_tables_are_denied(lake):
    ws, _ = lake
    ana = ws.actor("ana")
    for sql in ("SELECT sex FROM customers", "SELECT _hash_customer_id FROM customers", "SELECT count(*) FROM bronze.customers",
                "SELECT count(*) FROM audit.events", "SELECT count(*) FROM vault.customers"):
        with pytest.raises(TrinoDenied, match="Access Denied"):
            run_trino(ws, ana, sql)


@pytest.mark.slow  # against the module's Trino server
def test_unknown_user_is_denied(lake):
    ws, _ = lake
    from governance.gate import Actor

    with pytest.raises(TrinoDenied, match="Cannot access catalog"):
        run_trino(ws, Actor("mallory"), "SELECT count(*) FROM customers")


@pytest.mark.slow  # against the module's Trino server
def test_audit_table_only_for_compliance(lake):
    ws, _ = lake
    n = run_trino(ws, ws.actor("carla"), "SELECT count(*) AS n FROM audit.events")["n"][0].as_py()
    assert n > 0
    with pytest.raises(TrinoDenied):
        run_trino(ws, ws.actor("sam"), "SELECT count(*) FROM audit.events")


@pytest.mark.slow  # against the module's Trino server
def test_acting_in_one_role_only(lake):
    ws, _ = lake
    pipeline = ws.actor("pipeline")  # data_engineer + data_scientist + ml_engineer
    assert run_trino(ws, pipeline, "SELECT count(*) AS n FROM bronze.customers", role="data_engineer")["n"][0].as_py() > 0
    with pytest.raises(TrinoDenied):
        run_trino(ws, pipeline, "SELECT count(*) FROM bronze.customers", role="ml_engineer")


QUERY_SUITE = [
    ("ana", "SELECT region, count(*) AS n, avg(income) AS avg_income FROM customers GROUP BY region"),
    ("ana", "SELECT birth_date, count(*) AS n FROM customers WHERE birth_date < 1960 GROUP BY birth_date"),
    ("ana", "SELECT c.region, count(*) AS n, sum(t.amount) AS total FROM customers c "
            "JOIN transactions t ON c.customer_id = t.customer_id GROUP BY c.region"),
    ("ana", "SELECT channel, count(*) AS n, max(amount) AS top FROM transactions GROUP BY channel"),
    ("sam", "SELECT region, count(*) AS n, avg(income_z) AS z, count(sex) AS sex_visible FROM customers GROUP BY region"),
    ("sam", "SELECT customer_id, income_log FROM customers WHERE income > 150000"),
    ("carla", "SELECT region, count(*) AS n FROM customers GROUP BY region"),
    ("dana", "SELECT reason, count(*) AS n FROM quarantine.customers GROUP BY reason"),
    ("dana", "SELECT count(*) AS n, count(DISTINCT customer_id) AS subjects FROM bronze.transactions"),
]


@pytest.mark.slow  # against the module's Trino server
@pytest.mark.parametrize("user,sql", QUERY_SUITE, ids=[f"{u}-{i}" for i, (u, _) in enumerate(QUERY_SUITE)])
def test_same_rows_on_both_engines(lake, user: str, sql: str):
    ws, _ = lake
    trino_rows, embedded_rows = both(ws, user, sql)
    assert trino_rows == embedded_rows


@pytest.mark.slow  # against the module's Trino server
def test_sensitive_columns_are_null_for_data_scientists(lake):
    ws, _ = lake
    t = run_trino(ws, ws.actor("sam"), "SELECT count(*) AS n, count(sex) AS s, count(ethnicity) AS e FROM customers")
    assert t["n"][0].as_py() > 0 and t["s"][0].as_py() == 0 and t["e"][0].as_py() == 0


@pytest.mark.slow  # against the module's Trino server
def test_new_versions_are_seen_after_ingest_and_erasure(lake, tmp_path: Path):
    ws, srv = lake
    dana = ws.actor("dana")
    count = "SELECT count(*) AS n FROM bronze.customers"
    before = run_trino(ws, dana, count)["n"][0].as_py()
    res = generate(tmp_path / "more", people=50, transactions_per_person=0, seed=99)
    ingest(ws, dana, "customers", [res.files["customers"]])
    after = run_trino(ws, dana, count)["n"][0].as_py()
    assert after > before
    assert after == Catalog(ws.config).open(TableRef("bronze", "customers")).count()
    # An erasure deletes a subject's rows (the compliance issue adds key shredding and verification).
    dt = Catalog(ws.config).open(TableRef("bronze", "customers"))
    token = dt.to_pyarrow_table(columns=["customer_id"])["customer_id"][0].as_py()
    dt.delete(f"customer_id = '{token}'")
    srv.sync(dana)
    gone = run_trino(ws, dana, f"SELECT count(*) AS n FROM bronze.customers WHERE customer_id = '{token}'")
    assert gone["n"][0].as_py() == 0
    assert run_trino(ws, dana, count)["n"][0].as_py() == after - 1


@pytest.mark.slow  # against the module's Trino server
def test_tables_checkpointed_by_delta_rs_read_correctly(lake, tmp_path: Path):
    ws, srv = lake
    dana = ws.actor("dana")
    ref = TableRef("bronze", "transactions")
    dt = Catalog(ws.config).open(ref)
    dt.create_checkpoint()
    res = generate(tmp_path / "cp", people=30, transactions_per_person=3, seed=123)
    ingest(ws, dana, "transactions", [res.files["transactions"]])  # a commit after the checkpoint
    dt = DeltaTable(Catalog(ws.config).uri(ref))
    dt.create_checkpoint()
    assert (Path(Catalog(ws.config).uri(ref)) / "_delta_log" / "_last_checkpoint").exists()
    srv.sync(dana)
    n = run_trino(ws, dana, "SELECT count(*) AS n FROM bronze.transactions")["n"][0].as_py()
    assert n == DeltaTable(Catalog(ws.config).uri(ref)).count()
    trino_rows, embedded_rows = both(ws, "dana", "SELECT channel, count(*) AS n FROM bronze.transactions GROUP BY channel")
    assert trino_rows == embedded_rows


@pytest.mark.slow  # against the module's Trino server
def test_feature_store_with_the_trino_offline_store(lake, tmp_path: Path):
    """Feast's Trino offline store over the same silver tables gives the same training set."""
    import warnings

    from features.store import Features

    warnings.filterwarnings("ignore")
    ws, _ = lake
    feats = ["customer_profile:income", "customer_profile:region"]
    local = Features(ws)
    local.apply(ws.actor("pipeline"))
    want = local.training_set(ws.actor("sam"), purpose="credit_scoring", features=feats, label="defaulted")
    cfg = Path(ws.config.source)
    alt = cfg.with_name("lakewarden-trino-features.yaml")
    alt.write_text(cfg.read_text() + "features: {offline: trino, registry: .lakewarden/feast/registry-trino.db}\n")
    ws2 = Workspace.open(alt)
    fs = Features(ws2)
    fs.apply(ws2.actor("pipeline"))
    got = fs.training_set(ws2.actor("sam"), purpose="credit_scoring", features=feats, label="defaulted",
                          at=want.table["event_timestamp"][0].as_py())
    key = lambda t: sorted(zip(t["customer_id"].to_pylist(), t["income"].to_pylist(), t["region"].to_pylist()))  # noqa: E731
    if key(got.table) != key(want.table):  # say what Trino itself holds for the rows that differ
        diff = sorted({r[0] for r in set(key(got.table)) ^ set(key(want.table))})
        toks = ", ".join(f"'{t}'" for t in diff[:20])
        seen = run_trino(ws, ws.actor("dana"), "SELECT customer_id, income, region, CAST(_ingested_at AS varchar) AS at "
                         f"FROM silver.customers WHERE customer_id IN ({toks})")
        pytest.fail(f"{len(diff)} subject(s) differ between the offline stores; entity time "
                    f"{want.table['event_timestamp'][0].as_py()}; Trino's silver rows for them: {seen.to_pylist()}")
    fs.materialize(ws2.actor("pipeline"))
    tok = want.table["customer_id"][0].as_py()
    online = fs.online(ws2.actor("mel"), purpose="credit_scoring", features=feats, tokens=[tok])
    assert online["income"][0].as_py() == want.table["income"][0].as_py()
    ws2.close()


# -- rendered production and cluster configurations ------------------------------------------------
def _props(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))


def test_production_profile_closes_plain_http_and_requires_authentication(project: Path):
    from lakehouse.trino import render_profile

    ws = Workspace.open(project / "lakewarden.yaml")
    files = render_profile(ws, "production")
    cfg = _props(files["etc/config.properties"])
    assert cfg["http-server.http.enabled"] == "false" and cfg["http-server.https.enabled"] == "true"
    assert cfg["http-server.authentication.type"] == "PASSWORD"
    assert cfg["internal-communication.shared-secret"] == "${ENV:TRINO_SHARED_SECRET}"
    assert _props(files["etc/password-authenticator.properties"])["password-authenticator.name"] == "file"
    rules = __import__("json").loads(files["etc/rules.json"])
    assert any(r.get("group") == "analyst" and r.get("table") == "customers" and r.get("filter") for r in rules["tables"])
    cluster = render_profile(ws, "cluster")
    assert _props(cluster["coordinator/etc/config.properties"])["node-scheduler.include-coordinator"] == "false"
    assert _props(cluster["worker/etc/config.properties"])["coordinator"] == "false"
    worker_catalog = _props(cluster["worker/etc/catalog/delta_lake.properties"])
    assert worker_catalog["hive.metastore"] == "file"  # in the bucket, shared by every node: no metastore service
    assert worker_catalog["hive.metastore.catalog.dir"].startswith("s3://")
    assert "rules.json" not in " ".join(k for k in cluster if k.startswith("worker/"))
    ws.close()


@pytest.mark.parametrize("profile", ["production", "cluster"])
def test_committed_infra_configuration_is_current(profile: str):
    """infra/trino/<profile>/ is rendered from policies/: re-render after a policy change."""
    from lakehouse.trino import render_profile

    ws = Workspace.open(REPO / "lakewarden.yaml")
    for rel, text in render_profile(ws, profile).items():
        committed = REPO / "infra" / "trino" / profile / rel
        assert committed.read_text() == text, f"{committed} is stale: run lakewarden trino render --profile {profile}"


@pytest.mark.slow  # against the module's Trino server
def test_an_erased_subject_is_gone_for_trino_too(lake, tmp_path: Path):
    """A compliance erasure (requests) leaves Trino nothing to return for the subject."""
    import csv

    from governance.erasure import file_request, run_request

    ws, srv = lake
    dana = ws.actor("dana")
    res = generate(tmp_path / "erase", people=5, transactions_per_person=2, seed=4242)
    with open(res.files["customers"], newline="") as fh:
        sid = next(r["customer_id"] for r in csv.DictReader(fh) if r["customer_id"])
    for ds in ("customers", "transactions"):
        ingest(ws, dana, ds, [res.files[ds]])
    token = ws.keyring.token_for(sid, create=False)
    srv.sync(dana)
    q = f"SELECT count(*) AS n FROM bronze.customers WHERE customer_id = '{token}'"
    assert run_trino(ws, dana, q)["n"][0].as_py() >= 1
    carla = ws.actor("carla")
    st = run_request(ws, carla, file_request(ws, carla, "erase", [sid]).request_id, purge_now=True)
    assert st.state == "done", st.detail.get("findings")
    srv.sync(dana)
    for table in ("bronze.customers", "bronze.transactions", "silver.customers"):
        n = run_trino(ws, dana, f"SELECT count(*) AS n FROM {table} WHERE customer_id = '{token}'")["n"][0].as_py()
        assert n == 0, table
    assert run_trino(ws, dana, "SELECT count(*) AS n FROM bronze.customers")["n"][0].as_py() == \
        Catalog(ws.config).open(TableRef("bronze", "customers")).count()


# -- a server is only ours if it proves it -----------------------------------------------------------
def _second_workspace(root: Path, port: int, *extra: str) -> Workspace:
    """Another workspace (own folder, own id, no data) configured with the given Trino port."""
    shutil.copytree(REPO / "policies", root / "policies")
    (root / "lakewarden.yaml").write_text(
        "version: 1\nname: othertest\nstorage: {root: .lakewarden/tables}\n"
        "keys: {store: .lakewarden/keys/keystore.db, kek: {provider: env, var: TRINO_TEST_KEK}}\n"
        f"trino: {{host: 127.0.0.1, port: {port}}}\npolicies: [policies/*.yaml]\n" + "".join(extra)
    )
    return Workspace.open(root / "lakewarden.yaml")


@pytest.mark.slow  # against the module's Trino server
def test_another_workspaces_server_on_the_port_is_never_used(lake, tmp_path: Path):
    """Two workspaces with the same trino.port: the second refuses the first's server everywhere."""
    import subprocess
    import sys

    from features.store import Features
    from governance.identity import ForeignServer

    ws, srv = lake
    port = ws.config.trino.port
    other = _second_workspace(tmp_path, port, "features: {offline: trino}\n")
    theirs = TrinoServer(other, home=srv.home)
    assert theirs.workspace_id != srv.workspace_id
    assert srv.info()["environment"] == f"lakewarden_{srv.workspace_id}"  # the server itself says whose it is
    dana = other.actor("dana")
    calls = {
        "up": theirs.start, "status": theirs.status, "down": theirs.stop, "sync": lambda: theirs.sync(dana),
        "sql": lambda: run_trino(other, other.actor("ana"), "SELECT count(*) FROM customers"),
        "feast": lambda: Features(other).apply(other.actor("pipeline")),
    }
    for what, call in calls.items():
        with pytest.raises(ForeignServer) as e:
            call()
        msg = str(e.value)
        assert e.value.exit_code == 2, what
        assert f"127.0.0.1:{port}" in msg and srv.workspace_id in msg and theirs.workspace_id in msg, (what, msg)
        assert str(ws.config.workspace_dir.resolve()) in msg, (what, msg)  # where the other workspace is
    assert not (other.config.workspace_dir / "trino" / "etc").exists()  # nothing rendered, nothing registered
    assert srv.check_owner() is not None  # the first workspace's server still runs its own queries
    assert run_trino(ws, ws.actor("ana"), "SELECT count(*) AS n FROM customers")["n"][0].as_py() > 0
    env = {**os.environ, "LAKEWARDEN_CONFIG": str(other.config.source), "LAKEWARDEN_USER": "dana"}
    p = subprocess.run([sys.executable, "-m", "lakewarden", "trino", "up"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "belongs to another workspace" in p.stderr and srv.workspace_id in p.stderr and "up" not in p.stdout
    other.close()


def test_something_else_on_the_port_is_refused_without_starting_trino(tmp_path: Path):
    """A port held by a program that is not Trino: refused at once (no server launched, no wait)."""
    import threading

    from governance.identity import ForeignServer

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    ws = _second_workspace(tmp_path, port)
    try:
        with pytest.raises(ForeignServer, match="does not answer as Trino"):
            TrinoServer(ws, home=tmp_path / "no-trino-here").start(timeout=5)
        assert not (ws.config.workspace_dir / "trino" / "etc").exists()
    finally:
        listener.close()
        ws.close()


def test_k_min_holds_for_results_on_trino_too(lake):
    """A dataset with ``anonymity.k_min`` queried through ``lakehouse.trino.run_query``: a grouped answer
    whose groups hold k_min rows passes, a row-level cut and groups of one are refused (exit 3, the
    rule named, audited as a deny), exactly as on the embedded engine. Runs last in this module: it adds
    a dataset to the lake's policies."""
    import csv

    from lakehouse.anonymity import ResultRefused
    from test_anonymity import AGE_H, PATIENTS, PC_H, _patients_rows

    ws0, srv = lake
    (ws0.config.base_dir / "policies" / "patients.yaml").write_text(
        PATIENTS.replace("{age_h}", AGE_H).replace("{pc_h}", PC_H)
        .replace("{anonymity}", "anonymity: {k_min: 4, on_violation: generalize}"))
    src = ws0.config.base_dir / "patients.csv"
    rows = _patients_rows()
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ws = Workspace.open(ws0.config.source)
    try:
        dana = ws.actor("dana")
        ingest(ws, dana, "patients", [str(src)])
        build_silver(ws, dana, "patients")
        TrinoServer(ws, home=srv.home).sync(dana)
        ana = ws.actor("ana")
        got = run_trino(ws, ana, "SELECT age, count(*) AS n FROM patients GROUP BY age")
        assert sum(got["n"].to_pylist()) == 120 and min(got["n"].to_pylist()) >= 4
        for sql in ("SELECT age, postcode FROM patients LIMIT 3",
                    "SELECT age, patient_ref, count(*) AS n FROM patients GROUP BY age, patient_ref"):
            with pytest.raises(ResultRefused, match="patients/anonymity/k_min"):
                run_trino(ws, ana, sql)
        ws.audit.flush()
        from deltalake import DeltaTable

        ev = sorted((e for e in DeltaTable(ws.audit.table_uri).to_pyarrow_table().to_pylist()
                     if e["action"] == "sql.query" and e["actor"] == "ana"), key=lambda e: e["seq"])
        assert [e["outcome"] for e in ev[-3:]] == ["ok", "deny", "deny"], ev[-3:]
        assert all("patients/anonymity/k_min" in e["rule_ids"] and json.loads(e["details"])["engine"] == "trino"
                   for e in ev[-2:]), ev[-2:]
    finally:
        ws.close()
