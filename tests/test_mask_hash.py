"""The `hash` mask's keyed hash: computed once by silver, swapped in by both engines, rotated with
its key (issue #16). Trino's side is checked in tests/test_trino.py against the real server."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path

import pytest
from deltalake import DeltaTable

from governance.errors import AccessDenied
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import MASK_HASH_KEY, build_silver, hashed_columns, mask_key_id, rotate_mask_key
from lakehouse.sql import SqlError, run_query
from lakehouse.synth import generate


@pytest.fixture
def lake(workspace: Workspace, tmp_path: Path) -> Workspace:
    res = generate(tmp_path / "landing", people=200, transactions_per_person=2, seed=3)
    for ds in ("customers", "transactions"):
        ingest(workspace, workspace.actor("dana"), ds, [res.files[ds]])
        build_silver(workspace, workspace.actor("dana"), ds)
    return workspace


def silver(ws: Workspace, ds: str) -> DeltaTable:
    return Catalog(ws.config).open(TableRef("silver", ds))


def keyed(ws: Workspace, v: str) -> str:
    return hmac.new(ws.keyring.system_key(MASK_HASH_KEY), v.encode(), hashlib.sha256).hexdigest()[:32]


def test_the_columns_some_role_sees_hashed_get_a_keyed_hash(workspace: Workspace):
    # policies/: the analyst sees customer_id hashed in both datasets, nothing else hashed
    assert hashed_columns(workspace.policies, "customers") == ["customer_id"]
    assert hashed_columns(workspace.policies, "transactions") == ["customer_id"]


def test_silver_holds_the_keyed_hash_and_the_analyst_sees_it(lake: Workspace):
    for ds in ("customers", "transactions"):
        t = silver(lake, ds).to_pyarrow_table(columns=["customer_id", "_hash_customer_id"])
        assert t.num_rows > 0
        assert t["_hash_customer_id"].to_pylist() == [keyed(lake, v) for v in t["customer_id"].to_pylist()]
        # no statistics of the hash column in the Delta log, as for the token itself
        stats = []
        for f in (Path(silver(lake, ds).table_uri.removeprefix("file://")) / "_delta_log").glob("*.json"):
            for line in f.read_text().splitlines():
                add = json.loads(line).get("add")
                if add and add.get("stats"):
                    stats.append(json.loads(add["stats"]))
        assert stats and all("_hash_customer_id" not in s.get("minValues", {}) for s in stats)
        assert any("income" in s.get("minValues", {}) for s in stats) or ds == "transactions"
    ana, sam = lake.actor("ana"), lake.actor("sam")
    seen = run_query(lake, ana, "SELECT customer_id FROM customers").table["customer_id"].to_pylist()
    raw = run_query(lake, sam, "SELECT customer_id FROM customers").table["customer_id"].to_pylist()
    assert set(seen) <= {keyed(lake, v) for v in raw} and len(seen) > 100
    # the hashed key still joins across datasets, as the token does
    n = run_query(lake, ana, "SELECT count(*) AS n FROM customers c JOIN transactions t ON c.customer_id = t.customer_id")
    assert n.table["n"][0].as_py() > 0
    for who in (ana, sam):  # the hash column itself is nobody's to select
        with pytest.raises(SqlError, match="hidden"):
            run_query(lake, who, "SELECT _hash_customer_id FROM customers")


def test_a_silver_table_without_the_hash_shows_null_and_says_why(lake: Workspace):
    from deltalake import write_deltalake

    t = silver(lake, "customers").to_pyarrow_table()
    t = t.drop_columns(["_hash_customer_id"])
    write_deltalake(Catalog(lake.config).uri(TableRef("silver", "customers")), t, mode="overwrite",
                    schema_mode="overwrite")
    res = run_query(lake, lake.actor("ana"), "SELECT customer_id FROM customers")
    assert res.table["customer_id"].null_count == res.table.num_rows
    assert any("rebuild silver" in w for w in res.warnings)


def test_rebuild_is_a_no_op_until_the_key_rotates(lake: Workspace):
    before = silver(lake, "customers").version()
    assert build_silver(lake, lake.actor("dana"), "customers").up_to_date
    old_key = lake.keyring.system_key(MASK_HASH_KEY)
    meta = json.loads(silver(lake, "customers").history(1)[0]["lakewarden.mask_hash"])
    assert meta == {"key": mask_key_id(old_key), "columns": ["customer_id"], "format": "hmac-sha256-128-hex"}
    old = run_query(lake, lake.actor("ana"), "SELECT customer_id FROM customers ORDER BY 1").table["customer_id"]

    with pytest.raises(AccessDenied):  # the analyst may not rotate keys; nothing changed
        rotate_mask_key(lake, lake.actor("ana"))
    assert lake.keyring.system_key(MASK_HASH_KEY) == old_key

    reports = rotate_mask_key(lake, lake.actor("carla"))  # the compliance officer holds `keys`
    assert sorted(r.dataset for r in reports) == ["customers", "transactions"]
    assert all(not r.up_to_date for r in reports) and silver(lake, "customers").version() == before + 1
    new = run_query(lake, lake.actor("ana"), "SELECT customer_id FROM customers ORDER BY 1").table["customer_id"]
    assert len(new) == len(old) and not set(new.to_pylist()) & set(old.to_pylist())
    ev = [e for e in lake.audit.query(action="keys.rotate-mask").to_pylist()]
    assert ev and json.loads(ev[-1]["details"])["rebuilds"] == ["customers", "transactions"]


CLINIC = """\
kind: dataset
dataset: visits
description: Clinic visits (fictional); several visits per patient.
subject_key: patient_ref
columns:
  patient_ref: {class: subject_key, type: string, required: true}
  postcode:    {class: public, type: string}
  clinic:      {class: public, type: string, required: true}
  visits_n:    {class: public, type: int}
purposes:
  care: {description: Care quality reporting.}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [care]}
  analyst:
    layers: [silver]
    masks: {patient_ref: hash, postcode: hash, visits_n: hash}
    purposes: [care]
"""


def test_a_policy_we_did_not_design_gets_its_hashes_and_a_misfit_stays_null(tmp_path: Path, monkeypatch):
    """Another subject key, a second hashed text column, and `hash` on a number (which no hash
    column can serve: NULL, flagged, and nothing computed for it)."""
    from conftest import make_project

    folder = tmp_path / "clinic"
    make_project(folder, monkeypatch)
    (folder / "policies" / "visits.yaml").write_text(CLINIC)
    src = folder / "visits.csv"
    src.write_text("patient_ref,postcode,clinic,visits_n\n" + "".join(
        f"P{i % 7:03d},SW{i % 3}A,{'north' if i % 2 else 'south'},{i}\n" for i in range(40)))
    with Workspace.open(folder / "lakewarden.yaml") as ws:
        ingest(ws, ws.actor("dana"), "visits", [src])
        build_silver(ws, ws.actor("dana"), "visits")
        assert hashed_columns(ws.policies, "visits") == ["patient_ref", "postcode", "visits_n"]
        t = silver(ws, "visits").to_pyarrow_table()
        assert {"_hash_patient_ref", "_hash_postcode"} <= set(t.column_names)
        assert "_hash_visits_n" not in t.column_names  # not text: nothing to hash
        assert t["_hash_postcode"].to_pylist() == [keyed(ws, v) for v in t["postcode"].to_pylist()]
        res = run_query(ws, ws.actor("ana"), "SELECT patient_ref, postcode, visits_n, clinic FROM visits")
        assert res.table.num_rows == 40
        assert set(res.table["postcode"].to_pylist()) == {keyed(ws, f"SW{k}A") for k in range(3)}
        assert len(set(res.table["patient_ref"].to_pylist())) == 7
        assert res.table["visits_n"].null_count == 40
        assert any("visits_n" in w for w in res.warnings)
