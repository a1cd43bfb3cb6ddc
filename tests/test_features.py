"""The feature store: point-in-time correctness, purpose limitation, online = offline,
erasure from both stores, and Redis answering exactly like SQLite."""

from __future__ import annotations

import json

import shutil
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import make_project
from deltalake import DeltaTable, write_deltalake

from governance.errors import AccessDenied
from governance.workspace import Workspace
from features.store import FeatureError, Features
from lakehouse.anonymity import ResultRefused
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import build_silver
from lakehouse.synth import generate

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PROFILE = ["customer_profile:income", "customer_profile:region"]


def tok(i: int) -> str:
    return "sub_" + "abcdefghijklmnopqrstuvwxyz"[i % 26] * 26


def silver_rows(rows: list[dict]) -> pa.Table:
    n = len(rows)
    base = {
        "customer_id": [r["customer_id"] for r in rows], "birth_date": pa.array([1980] * n, pa.int32()),
        "zip_code": [r.get("zip_code", "941") for r in rows], "sex": pa.array([b"x"] * n, pa.binary()), "ethnicity": pa.array([b"y"] * n, pa.binary()),
        "income": [float(r["income"]) for r in rows], "region": [r.get("region", "north") for r in rows],
        "defaulted": [False] * n, "_subject_bucket": pa.array([0] * n, pa.int32()),
        "_ingested_at": pa.array([r["t"] for r in rows], pa.timestamp("us", tz="UTC")),
        "income_z": [0.0] * n, "income_log": [1.0] * n,
    }
    return pa.table(base)


def fill(workspace: Workspace, landing: Path) -> Workspace:
    """300 customers ingested, built into silver, their feature views applied and materialized."""
    res = generate(landing, people=300, transactions_per_person=0, seed=5)
    ingest(workspace, workspace.actor("dana"), "customers", [res.files["customers"]])
    build_silver(workspace, workspace.actor("dana"), "customers")
    fs = Features(workspace)
    fs.apply(workspace.actor("pipeline"))
    fs.materialize(workspace.actor("pipeline"))
    return workspace


@pytest.fixture
def lake(workspace: Workspace, tmp_path: Path) -> Workspace:
    """A lake of its own, for a test that writes to it (ingests, erases, changes its online store)."""
    return fill(workspace, tmp_path / "landing")


@pytest.fixture(scope="module")
def shared_lake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """One lake for the tests that only read it: they query features and the audit log, and assert
    nothing another reader's queries would change. A test that writes uses ``lake``."""
    root = tmp_path_factory.mktemp("features")
    with pytest.MonkeyPatch.context() as mp:
        ws = Workspace.open(make_project(root / "proj", mp) / "lakewarden.yaml")
        yield fill(ws, root / "landing")
        ws.close()


def test_a_training_set_below_k_min_is_refused_counting_each_subject_once(workspace: Workspace):
    """A training set is an export: with ``anonymity.k_min`` its quasi-identifier features must form
    classes of k_min distinct subjects. One subject at several label times counts once."""
    pol = workspace.config.base_dir / "policies" / "customers.yaml"
    pol.write_text(pol.read_text() + "anonymity: {k_min: 3}\n")
    ws = Workspace.open(workspace.config.source)
    a, b, c = tok(0), tok(1), tok(2)
    write_deltalake(Catalog(ws.config).uri(TableRef("silver", "customers")), silver_rows(
        [{"customer_id": s, "income": 10, "t": T0} for s in (a, b, c)]))
    fs = Features(ws)
    fs.apply(ws.actor("pipeline"))

    def entities(*subjects: str) -> pa.Table:
        return pa.table({"customer_id": list(subjects), "event_timestamp": pa.array(
            [T0 + timedelta(days=i + 1) for i in range(len(subjects))], pa.timestamp("us", tz="UTC"))})

    zips = [*PROFILE, "customer_profile:zip_code"]
    sam = ws.actor("sam")
    assert fs.training_set(sam, purpose="credit_scoring", features=zips, entities=entities(a, a, a, b, c)).table.num_rows == 5
    assert fs.training_set(sam, purpose="credit_scoring", features=PROFILE, entities=entities(a, a, a, b)).table.num_rows == 4
    with pytest.raises(ResultRefused) as ei:  # four rows, but two people share the zip code
        fs.training_set(sam, purpose="credit_scoring", features=zips, entities=entities(a, a, a, b))
    assert "customers/anonymity/k_min" in str(ei.value) and "zip_code" in str(ei.value) and "941" not in str(ei.value)
    ws.audit.flush()
    ev = [e for e in DeltaTable(ws.audit.table_uri).to_pyarrow_table().sort_by("seq").to_pylist()
          if e["action"] == "features.training_set"]
    assert [e["outcome"] for e in ev] == ["ok", "ok", "deny"] and "customers/anonymity/k_min" in ev[-1]["rule_ids"]
    ws.close()


def test_point_in_time_correct_no_label_leakage(workspace: Workspace):
    a, b = tok(0), tok(1)
    rows = [{"customer_id": a, "income": 10, "t": T0 + timedelta(days=1)},
            {"customer_id": a, "income": 30, "t": T0 + timedelta(days=3)},
            {"customer_id": b, "income": 50, "t": T0 + timedelta(days=5)}]
    write_deltalake(Catalog(workspace.config).uri(TableRef("silver", "customers")), silver_rows(rows))
    fs = Features(workspace)
    fs.apply(workspace.actor("pipeline"))
    entities = pa.table({
        "customer_id": [a, a, b, a],
        "event_timestamp": pa.array([T0 + timedelta(days=2), T0 + timedelta(days=4), T0 + timedelta(days=2), T0],
                                    pa.timestamp("us", tz="UTC")),
        "label": [1, 0, 1, 0],
    })
    ts = fs.training_set(workspace.actor("sam"), purpose="credit_scoring", features=PROFILE, entities=entities)
    got = [(r["customer_id"], r["event_timestamp"], r["income"]) for r in ts.table.to_pylist()]
    assert got == [
        (a, T0 + timedelta(days=2), 10.0),   # the later value (30) must not leak back
        (a, T0 + timedelta(days=4), 30.0),
        (b, T0 + timedelta(days=2), None),   # only a later row: no value, and the row is kept
        (a, T0, None),                       # before any value
    ]
    assert ts.table["label"].to_pylist() == [1, 0, 1, 0]


def test_purpose_limitation(shared_lake: Workspace):
    fs = Features(shared_lake)
    with pytest.raises(AccessDenied, match="customers/purposes/credit_scoring/sensitive"):
        fs.training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=["customer_sensitive:sex"])
    with pytest.raises(AccessDenied, match="customers/access/ml_engineer/purposes"):
        fs.online(shared_lake.actor("mel"), purpose="fairness_evaluation", features=["customer_sensitive:sex"], tokens=[tok(0)])
    ok = fs.training_set(shared_lake.actor("sam"), purpose="fairness_evaluation", features=["customer_sensitive:sex"])
    assert ok.table.num_rows == 300
    denials = shared_lake.audit.query(outcome="deny").to_pylist()
    assert {d["rule_ids"] for d in denials} >= {"customers/purposes/credit_scoring/sensitive",
                                                "customers/access/ml_engineer/purposes"}


def test_bad_requests_are_clear(shared_lake: Workspace):
    fs = Features(shared_lake)
    with pytest.raises(FeatureError, match="unknown feature view 'nope'"):
        fs.training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=["nope:x"])
    with pytest.raises(FeatureError, match="has no feature 'email'"):
        fs.training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=["customer_profile:email"])
    with pytest.raises(FeatureError, match="not subject tokens"):
        fs.online(shared_lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=["C-000000001"])
    when = datetime(2030, 1, 1, tzinfo=timezone.utc)
    ents = pa.table({"customer_id": [tok(1), "C-000000001", None, "C-000000001", tok(2)],
                     "event_timestamp": pa.array([when] * 5, pa.timestamp("us", tz="UTC"))})
    with pytest.raises(FeatureError, match="3 entity row"):  # both raw-id rows and the null, counted by row
        fs.training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=PROFILE, entities=ents)


def test_training_set_rows_come_back_in_entity_order(shared_lake: Workspace):
    fs = Features(shared_lake)
    toks = Catalog(shared_lake.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
    order = [7, 3, 3, 250, 0, 7, 99, 12, 3]  # repeats, and no particular order
    when = [datetime(2030, 1, 1 + i, tzinfo=timezone.utc) for i in range(len(order))]
    ents = pa.table({"customer_id": [toks[i] for i in order], "event_timestamp": pa.array(when, pa.timestamp("us", tz="UTC"))})
    ts = fs.training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=PROFILE, entities=ents)
    assert ts.table["customer_id"].to_pylist() == [toks[i] for i in order]
    assert ts.table["event_timestamp"].to_pylist() == when
    assert all(v is not None for v in ts.table[PROFILE[0].split(":")[1]].to_pylist())


def test_online_matches_offline_after_materialization(shared_lake: Workspace):
    fs = Features(shared_lake)
    ts = fs.training_set(shared_lake.actor("sam"), purpose="credit_scoring", features=PROFILE, label="defaulted")
    tokens = ts.table["customer_id"].to_pylist()
    online = fs.online(shared_lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=tokens)
    assert online["income"].to_pylist() == ts.table["income"].to_pylist()
    assert online["region"].to_pylist() == ts.table["region"].to_pylist()
    assert ts.sources == {"silver.customers": Catalog(shared_lake.config).open(TableRef("silver", "customers")).version()}
    runs = shared_lake.lineage.events(job="features.training_set")
    assert runs and runs[-1]["inputs"][0]["name"] == "silver.customers"


def test_online_lookups_are_audited_as_a_run_and_the_log_still_verifies(lake: Workspace):
    fs = Features(lake)
    tokens = Catalog(lake.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])
    tokens = tokens["customer_id"].to_pylist()[:3]
    lake.audit.flush()
    before = lake.audit.query().num_rows
    mel = lake.actor("mel")
    lake.gate.repeat_window = 3600  # not the machine's speed: the three lookups are one run
    table = fs.online(mel, purpose="credit_scoring", features=PROFILE, tokens=tokens)
    as_dict = fs.online(mel, purpose="credit_scoring", features=PROFILE, tokens=tokens, as_dict=True)
    assert as_dict["income"] == table["income"].to_pylist() and as_dict["customer_id"] == tokens
    fs.online(mel, purpose="credit_scoring", features=PROFILE, tokens=tokens[:1])
    lake.gate.close()
    lake.audit.flush()
    new = lake.audit.query().to_pylist()[before:]
    serve = [e for e in new if e["stage"] == "serve"]
    assert [e["action"] for e in serve] == ["gate.decide", "gate.decide.repeat"]
    first, rep = (json.loads(e["details"]) for e in serve)
    assert rep["run"] == first["run"] and rep["repeats"] == 2 and rep["tally"] == {"lookups": 3, "entities": 7}
    assert rep["purpose"] == "credit_scoring" and serve[1]["actor"] == "mel"
    assert lake.audit.verify().ok


def test_incremental_materialization_picks_up_new_subjects(lake: Workspace, tmp_path: Path):
    res = generate(tmp_path / "more", people=320, transactions_per_person=0, seed=5)  # 20 new people (prefix-stable)
    last_id = res.files["customers"].read_text().splitlines()[-1].split(",")[0].strip('"')
    rep = ingest(lake, lake.actor("dana"), "customers", [res.files["customers"]])
    assert rep.rows_accepted == 20  # the first 300 are duplicates of subjects already ingested
    build_silver(lake, lake.actor("dana"), "customers")
    fs = Features(lake)
    fs.materialize(lake.actor("pipeline"))
    new = lake.keyring.token_for(last_id, create=False)
    assert new is not None
    v = fs.online(lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=[new])
    assert v["income"][0].as_py() is not None


def _erase(ws: Workspace, token: str, *, layers: tuple[str, ...] = ("features", "lakehouse")) -> dict[str, int]:
    """Erase as an erasure request's ``erased`` step does, with the features (and lakehouse)
    handlers only: the features handler is under test here (tests/test_requests.py runs whole requests)."""
    from features.erasure import HANDLER as FEATURES
    from governance.erasure import ErasureContext
    from lakehouse.erasure import HANDLER as LAKEHOUSE

    ctx = ErasureContext("req_test", [token])
    out: dict[str, int] = {}
    for h in sorted((h for h in (FEATURES, LAKEHOUSE) if h.name in layers), key=lambda h: h.order):
        out.update(h.erase(ws, ctx))
    return out


def test_erasure_leaves_no_trace_in_either_store(lake: Workspace):
    fs = Features(lake)
    victim = Catalog(lake.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"][0].as_py()
    removed = _erase(lake, victim)
    assert removed["online:customer_profile"] > 0 and removed["delta:silver.customers"] == 1
    assert removed["delta:bronze.customers"] == 1
    assert fs.online(lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=[victim])["income"][0].as_py() is None
    ts = fs.training_set(lake.actor("sam"), purpose="credit_scoring", features=PROFILE)
    assert victim not in ts.table["customer_id"].to_pylist()
    for layer in ("bronze", "silver", "vault"):
        col = Catalog(lake.config).open(TableRef(layer, "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"]
        assert victim not in col.to_pylist()
    online_db = lake.config.path(lake.config.features.online.path)
    assert victim.encode() not in online_db.read_bytes()
    fs.materialize(lake.actor("pipeline"))  # a later materialization does not bring it back
    assert fs.online(lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=[victim])["income"][0].as_py() is None


# -- Redis ---------------------------------------------------------------------------------------
def test_redis_and_sqlite_give_the_same_answers(lake: Workspace, project: Path, redis_port: int):
    sqlite_fs = Features(lake)
    tokens = Catalog(lake.config).open(TableRef("silver", "customers")).to_pyarrow_table(columns=["customer_id"])["customer_id"].to_pylist()
    want = sqlite_fs.online(lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=tokens)
    cfg = project / "lakewarden.yaml"
    cfg.write_text(cfg.read_text() + f"features:\n  registry: .lakewarden/feast/registry-redis.db\n"
                   f"  online: {{type: redis, connection_string: '127.0.0.1:{redis_port}'}}\n")
    ws = Workspace.open(cfg)
    fs = Features(ws)
    fs.apply(ws.actor("pipeline"))
    fs.materialize(ws.actor("pipeline"))
    got = fs.online(ws.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=tokens)
    assert got.to_pylist() == want.to_pylist()
    removed = _erase(ws, tokens[0], layers=("features",))
    assert removed["online:customer_profile"] == 1
    again = fs.online(ws.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=[tokens[0]])
    assert again["income"][0].as_py() is None
    ws.close()


def test_entity_order_helper_scatters_a_permutation_and_sorts_anything_else():
    from features.store import _in_entity_order

    t = pa.table({"_lw_row": [0, 1, 2, 3], "v": ["a", "b", "c", "d"]})
    assert _in_entity_order(t, 4) is t  # already in order: untouched
    shuffled = t.take([2, 0, 3, 1])
    assert _in_entity_order(shuffled, 4).to_pydict() == t.to_pydict()
    dup = pa.table({"_lw_row": [2, 0, 2, 1], "v": ["c", "a", "c2", "b"]})  # not a permutation: sorted instead
    assert _in_entity_order(dup, 4)["_lw_row"].to_pylist() == [0, 1, 2, 2]


def test_a_redis_database_is_used_only_by_the_workspace_that_claimed_it(project: Path, redis_port: int,
                                                                          tmp_path: Path):
    """The first workspace marks an empty database as its own; another workspace is refused, and so
    is a database holding keys without a marker (nothing is written to either)."""
    import redis

    from features.online import MARKER
    from governance.identity import ForeignServer, workspace_id

    online = (f"features:\n  registry: .lakewarden/feast/registry-redis.db\n"
              f"  online: {{type: redis, connection_string: '127.0.0.1:{redis_port}'}}\n")
    cfg = project / "lakewarden.yaml"
    cfg.write_text(cfg.read_text() + online)
    first = Workspace.open(cfg)
    assert _erase(first, tok(0), layers=("features",)) == {"online:customer_profile": 0, "online:customer_sensitive": 0}
    r = redis.Redis(host="127.0.0.1", port=redis_port)
    assert r.get(MARKER).decode() == workspace_id(first.config)  # claimed on first use of the empty database
    shutil.copytree(project / "policies", tmp_path / "other" / "policies")
    (tmp_path / "other" / "lakewarden.yaml").write_text(cfg.read_text().replace("name: test", "name: other"))
    second = Workspace.open(tmp_path / "other" / "lakewarden.yaml")
    where = f"127.0.0.1:{redis_port} db 0"
    for call in (lambda: Features(second).apply(second.actor("pipeline")),
                 lambda: _erase(second, tok(1), layers=("features",))):
        with pytest.raises(ForeignServer) as e:
            call()
        msg = str(e.value)
        assert e.value.exit_code == 2 and where in msg and workspace_id(first.config) in msg, msg
        assert workspace_id(second.config) in msg and str(first.config.workspace_dir.resolve()) in msg, msg
    r.delete(MARKER)
    r.set("someone:else", "1")
    with pytest.raises(ForeignServer, match=r"holds 1 key\(s\) and no workspace marker"):
        _erase(first, tok(0), layers=("features",))
    assert r.get(MARKER) is None and r.dbsize() == 1
    r.close()
    first.close()
    second.close()
