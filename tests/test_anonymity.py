"""k-anonymity and l-diversity (issue #20): measured natively (lakehouse/anonymity.py), checked against
pycanon run out of process in its own virtualenv (``make oracle``: .venv-oracle), enforced at silver
(stop / generalize by the policy's hierarchy) and on query results; never a quasi-identifier's value
in a message."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from cli_helpers import lw_in

from governance.errors import PolicyError
from governance.policy import load_policies
from governance.workspace import Workspace
from lakehouse.anonymity import META_ANONYMITY, AnonymityError, ResultRefused, measure, privacy_risk
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import ingest
from lakehouse.silver import build_silver
from lakehouse.sql import run_query

REPO = Path(__file__).resolve().parent.parent
ORACLE = REPO / ".venv-oracle" / "bin" / "python"
_ORACLE_SCRIPT = """
import json, sys
import pandas as pd
from pycanon import anonymity
path, qi, sens = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
df = pd.read_csv(path, dtype=str, keep_default_na=False)  # an empty cell (NULL) is a value of its own
print(json.dumps({"k": int(anonymity.k_anonymity(df, qi)),
                  "l": {s: int(anonymity.l_diversity(df, qi, [s])) for s in sens}}))
"""


def oracle(table: pa.Table, qi: list[str], sens: list[str], tmp: Path) -> dict:
    """pycanon's k and l for ``table`` (written to CSV, read in the oracle's own interpreter)."""
    if not ORACLE.exists():
        if os.environ.get("LAKEWARDEN_REQUIRE_ORACLE") == "1":
            pytest.fail("the pycanon oracle is not installed (make oracle)")
        pytest.skip("the pycanon oracle is not installed (make oracle)")
    path = tmp / "oracle.csv"
    cols = [*qi, *sens]
    pacsv.write_csv(table.select(cols).cast(pa.schema([(c, pa.string()) for c in cols])), path)
    p = subprocess.run([str(ORACLE), "-c", _ORACLE_SCRIPT, str(path), json.dumps(qi), json.dumps(sens)],
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout)


# -- the measure, on a table with a known answer ----------------------------------------------
KNOWN = pa.table({
    "year": [1980, 1980, 1980, 1990, 1990, None, None, 2000, 2000],
    "zip": ["123", "123", "123", "456", "456", "789", "789", None, None],
    "sex": ["F", "M", "F", "F", "F", "M", None, "X", "X"],
})


def test_a_hand_made_table_has_its_known_k_and_l(tmp_path: Path):
    # classes: (1980,123)×3 {F,M}, (1990,456)×2 {F}, (NULL,789)×2 {M,NULL}, (2000,NULL)×2 {X}
    m = measure(KNOWN, ["year", "zip"], ["sex"], k_min=3, l_min=2)
    assert (m.rows, m.classes, m.k, m.sizes) == (9, 4, 2, ((2, 3), (3, 1)))
    assert (m.classes_below, m.rows_below, m.l["sex"], m.l_below["sex"]) == (3, 6, 1, 2)
    assert [c.id for c in m.smallest] == ["c1", "c2", "c3", "c4"] and [c.size for c in m.smallest] == [2, 2, 2, 3]
    assert not m.ok and not m.k_ok and not m.l_ok
    assert oracle(KNOWN, ["year", "zip"], ["sex"], tmp_path) == {"k": 2, "l": {"sex": 1}}


def test_no_quasi_identifier_means_one_class_and_an_empty_table_has_no_k():
    assert measure(KNOWN, [], ["sex"]).k == 9
    empty = measure(KNOWN.slice(0, 0), ["year"], k_min=5)
    assert (empty.k, empty.classes, empty.k_ok) == (None, 0, True)


# -- the demo's customers --------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    """2,000 generated customers (seed 11), ingested and built into silver; yields (workspace, folder)."""
    from conftest import make_project

    from lakehouse.synth import generate

    folder = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        make_project(folder, mp)
        ws = Workspace.open(folder / "lakewarden.yaml")
        res = generate(folder / "landing", people=2000, transactions_per_person=0, seed=11, bad_rows=0)
        ingest(ws, ws.actor("dana"), "customers", [res.files["customers"]])
        build_silver(ws, ws.actor("dana"), "customers")
        ws.audit.flush()
        yield ws, folder, os.environ["LAKEWARDEN_KEK"]
        ws.close()


def _silver_plain(ws: Workspace) -> pa.Table:
    t = Catalog(ws.config).open(TableRef("silver", "customers")).to_pyarrow_table()
    out = t.select(["birth_date", "zip_code"])
    for c in ("sex", "ethnicity"):
        vals = ws.keyring.open_arrow(t[c].combine_chunks(), t["customer_id"].combine_chunks(),
                                     dataset="customers", column=c)
        out = out.append_column(c, vals.cast(pa.string()))
    return out


def test_the_demo_customers_risk_is_the_known_answer_and_pycanons(demo, tmp_path: Path):
    ws, _, _ = demo
    rep = privacy_risk(ws, ws.actor("sam"), "customers", k_min=5)
    m = rep.measure
    plain = _silver_plain(ws)
    # the known answer, counted a third way (plain Python)
    classes = Counter(zip(plain["birth_date"].to_pylist(), plain["zip_code"].to_pylist()))
    assert m.rows == 2000 and m.classes == len(classes) and m.k == min(classes.values())
    assert m.rows_below == sum(n for n in classes.values() if n < 5)
    assert dict(m.sizes) == dict(Counter(classes.values()))
    for s in ("sex", "ethnicity"):
        per: dict = {}
        for key, v in zip(zip(plain["birth_date"].to_pylist(), plain["zip_code"].to_pylist()), plain[s].to_pylist()):
            per.setdefault(key, set()).add(v)
        assert m.l[s] == min(len(v) for v in per.values())
    assert oracle(plain, ["birth_date", "zip_code"], ["sex", "ethnicity"], tmp_path) == {"k": m.k, "l": dict(m.l)}
    assert (m.k, m.classes) == (1, 1949)  # seed 11: 2,000 people over (birth year, 3-digit ZIP) are almost all unique
    assert rep.sensitive_unmeasured == {} and rep.row_filter is None


def test_the_risk_report_says_what_it_could_not_open_and_audits_counts_only(demo):
    ws, _, _ = demo
    rep = privacy_risk(ws, ws.actor("ana"), "customers")  # analyst: sees the QIs, not the sensitive columns
    assert set(rep.sensitive_unmeasured) == {"sex", "ethnicity"}
    assert all(w.startswith("not opened") for w in rep.sensitive_unmeasured.values())
    assert rep.row_filter == "region <> 'restricted'" and rep.measure.l == {}
    ws.audit.flush()
    events = [e for e in _audit(ws) if e["action"] == "privacy.risk"]
    assert events and events[-1]["actor"] == "ana"
    details = json.loads(events[-1]["details"])
    assert {"k", "classes", "rows_below", "l"} <= set(details)
    plain = _silver_plain(ws)
    text = json.dumps(details)
    assert not any(f'"{z}"' in text for z in set(plain["zip_code"].to_pylist()) if z)


def test_existing_policies_build_silver_as_before(demo):
    ws, _, _ = demo
    last = Catalog(ws.config).open(TableRef("silver", "customers")).history(1)[0]
    assert META_ANONYMITY not in last


def test_the_cli_renders_the_report_without_values(demo):
    ws, folder, kek = demo
    p = lw_in(folder, "--as", "sam", "privacy", "risk", "customers", "--k-min", "3", env={"LAKEWARDEN_KEK": kek})
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for words in ("k-anonymity", "(birth_date, zip_code)", "k (smallest class)", "classes below k_min",
                  "l(sex)", "class sizes", "smallest classes", "c1"):
        assert words in out, words
    zips = {z for z in _silver_plain(ws)["zip_code"].to_pylist() if z}
    assert not any(f" {z} " in out for z in zips)
    denied = lw_in(folder, "--as", "mel", "privacy", "risk", "customers", env={"LAKEWARDEN_KEK": kek})
    assert denied.returncode == 3 and "roles/stages/query" in denied.stdout + denied.stderr


def _audit(ws: Workspace) -> list[dict]:
    from deltalake import DeltaTable

    uri = ws.audit.table_uri
    return DeltaTable(uri).to_pyarrow_table().to_pylist() if DeltaTable.is_deltatable(uri) else []


# -- another dataset: patients, with age buckets and postcode prefixes -------------------------
PATIENTS = """\
kind: dataset
dataset: patients
description: Patients of a fictional clinic.
subject_key: patient_ref
columns:
  patient_ref: {class: subject_key, type: string, required: true, unique: true}
  age:         {class: quasi_identifier, type: int, generalize: "bucket:10"{age_h}}
  postcode:    {class: quasi_identifier, type: string, generalize: "prefix:3"{pc_h}}
  diagnosis:   {class: sensitive, type: string, protection: encrypt}
  ward:        {class: public, type: string, required: true}
purposes:
  care: {description: Care quality reporting.}
  audit_equity: {description: Equity audit., sensitive: true}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [care]}
  analyst: {layers: [silver], purposes: [care]}
  data_scientist: {layers: [silver], purposes: [audit_equity]}
  compliance_officer: {layers: [bronze, silver, quarantine, vault], purposes: [care, audit_equity]}
{anonymity}
"""
AGE_H = ', hierarchy: ["bucket:10", "bucket:20", "bucket:40"]'
PC_H = ', hierarchy: ["prefix:3", "prefix:2", "prefix:1"]'
# postcode areas that are letters only, so that no size or count can look like one
AREAS = ["ABX", "ABY", "ACZ", "ADQ", "BDW", "BEV", "CFU", "CGT"]


def _patients_rows() -> list[dict[str, str]]:
    rows = []
    for i in range(120):
        area = AREAS[i % 8] if i < 110 else "ABX"
        age = 20 + (i * 7) % 60 if i < 110 else 95  # ten very old patients, in one area: small classes
        rows.append({"patient_ref": f"P{i:05d}", "age": str(age), "postcode": f"{area} {i % 9}QQ",
                     "diagnosis": ["J45", "E11", "I10"][i % 3], "ward": "north"})
    return rows


def _patients_ws(folder: Path, mp: pytest.MonkeyPatch, anonymity: str, *, age_h: str = AGE_H,
                 pc_h: str = PC_H) -> Workspace:
    from conftest import make_project

    make_project(folder, mp)
    (folder / "policies" / "patients.yaml").write_text(
        PATIENTS.replace("{age_h}", age_h).replace("{pc_h}", pc_h).replace("{anonymity}", anonymity))
    ws = Workspace.open(folder / "lakewarden.yaml")
    src = folder / "patients.csv"
    rows = _patients_rows()
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    rep = ingest(ws, ws.actor("dana"), "patients", [str(src)])
    assert rep.rows_accepted == 120
    return ws


def _qi_values(ws: Workspace) -> set[str]:
    t = Catalog(ws.config).open(TableRef("bronze", "patients")).to_pyarrow_table()
    return {str(v) for v in t["postcode"].to_pylist()} | {f"{v:g}" for v in t["age"].to_pylist()}


def test_stop_names_the_small_classes_sizes_and_no_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ws = _patients_ws(tmp_path, monkeypatch, "anonymity: {k_min: 3, on_violation: stop}")
    with pytest.raises(AnonymityError) as ei:
        build_silver(ws, ws.actor("dana"), "patients")
    msg = str(ei.value)
    assert "k=1 < k_min=3" in msg and "equivalence class(es) below k_min" in msg and "sizes 1×" in msg
    assert "c1 (1 row)" in msg and "on_violation: generalize" in msg
    assert not any(v in msg for v in _qi_values(ws) | set(AREAS)), msg
    assert not Catalog(ws.config).exists(TableRef("silver", "patients"))
    ws.audit.flush()
    ev = [e for e in _audit(ws) if e["action"] == "silver.anonymity"]
    assert ev and ev[-1]["outcome"] == "error"
    ws.close()


def test_generalize_climbs_the_hierarchy_until_k_min_holds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ws = _patients_ws(tmp_path, monkeypatch, "anonymity: {k_min: 4, l_min: 2, on_violation: generalize}")
    before = privacy_risk(ws, ws.actor("carla"), "patients", layer="bronze")
    assert before.measure.k == 1 and before.measure.k_min == 4
    rep = build_silver(ws, ws.actor("dana"), "patients")
    assert rep.rows == 120
    silver = Catalog(ws.config).open(TableRef("silver", "patients"))
    meta = json.loads(silver.history(1)[0][META_ANONYMITY])
    levels = meta["levels"]
    assert meta["k"] >= 4 and meta["l"]["diagnosis"] >= 2 and meta["classes_below"] == 0
    assert levels != {"age": "bucket:10", "postcode": "prefix:3"}
    t = silver.to_pyarrow_table()
    width = float(levels["age"].split(":")[1])
    assert all(v % width == 0 for v in t["age"].to_pylist())
    n = int(levels["postcode"].split(":")[1])
    assert {len(v) for v in t["postcode"].to_pylist()} == {n}
    after = privacy_risk(ws, ws.actor("sam"), "patients")
    assert after.measure.k == meta["k"] and after.measure.ok and after.applied["levels"] == levels
    assert after.measure.l == {"diagnosis": meta["l"]["diagnosis"]}  # sam may evaluate for audit_equity
    carla = privacy_risk(ws, ws.actor("carla"), "patients")  # compliance may not run evaluate: l is not opened
    assert carla.measure.l == {} and carla.sensitive_unmeasured == {"diagnosis": "not opened: denied by roles/stages/evaluate"}
    ws.close()


def test_generalize_stops_when_the_top_levels_are_not_enough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    ws = _patients_ws(tmp_path, monkeypatch, "anonymity: {k_min: 200, on_violation: generalize}")
    with pytest.raises(AnonymityError) as ei:
        build_silver(ws, ws.actor("dana"), "patients")
    msg = str(ei.value)
    assert "top level of every quasi-identifier's hierarchy" in msg and "age: bucket:40" in msg
    assert "postcode: prefix:1" in msg and "k=" in msg
    ws.close()


def test_a_query_result_below_k_min_is_refused_and_a_coarse_one_is_not(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    ws = _patients_ws(tmp_path, monkeypatch, "anonymity: {k_min: 4, on_violation: generalize}")
    build_silver(ws, ws.actor("dana"), "patients")
    ana = ws.actor("ana")
    assert run_query(ws, ana, "SELECT count(*) AS n FROM patients").table["n"][0].as_py() == 120
    assert run_query(ws, ana, "SELECT age, postcode FROM patients").table.num_rows == 120  # silver meets k_min
    for sql in ("SELECT age, postcode, ward FROM patients WHERE ward = 'north' LIMIT 3",
                "SELECT p AS area FROM (SELECT postcode AS p FROM patients) LIMIT 5",
                "SELECT age + 1, postcode FROM patients LIMIT 2",
                "SELECT patients FROM patients LIMIT 3",            # the whole row, as a struct
                "SELECT to_json(p) AS j FROM patients p LIMIT 3",   # the whole row, as JSON text
                "SELECT x FROM (SELECT p AS x FROM patients p) LIMIT 3"):
        with pytest.raises(ResultRefused) as ei:
            run_query(ws, ana, sql)
        msg = str(ei.value)
        assert "denied by policy rule patients/anonymity/k_min" in msg and "smaller than k_min=4" in msg, sql
        assert not any(v in msg for v in _qi_values(ws) | set(AREAS)), msg
    ws.audit.flush()
    last = [e for e in _audit(ws) if e["action"] == "sql.query"][-1]
    assert last["outcome"] == "deny" and "patients/anonymity/k_min" in last["rule_ids"], last
    ws.close()


def test_an_aggregate_is_measured_by_the_rows_behind_each_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """GROUP BY and DISTINCT results: each result row is one group; it must stand for k_min rows or more
    (a row-level measure would refuse every grouped answer, one row per group)."""
    ws = _patients_ws(tmp_path, monkeypatch, "anonymity: {k_min: 4, on_violation: generalize}")
    build_silver(ws, ws.actor("dana"), "patients")
    ana = ws.actor("ana")
    silver = Catalog(ws.config).open(TableRef("silver", "patients")).to_pyarrow_table()
    by_age = Counter(silver["age"].to_pylist())
    got = run_query(ws, ana, "SELECT age, count(*) AS n FROM patients GROUP BY age ORDER BY age").table
    assert dict(zip(got["age"].to_pylist(), got["n"].to_pylist())) == dict(by_age) and min(by_age.values()) >= 4
    assert run_query(ws, ana, "SELECT DISTINCT postcode FROM patients").table.num_rows == len(
        set(silver["postcode"].to_pylist()))
    assert run_query(ws, ana, "SELECT max(age) AS oldest, count(*) AS n FROM patients").table.num_rows == 1
    assert run_query(ws, ana, "SELECT age, count(*) AS n FROM patients GROUP BY age HAVING count(*) >= 1000"
                     ).table.num_rows == 0
    for sql in ("SELECT age, count(*) AS n FROM patients GROUP BY 1",       # an ordinal
                "SELECT age, count(*) AS n FROM patients GROUP BY ALL",     # DuckDB's GROUP BY ALL
                "SELECT age, count(*) AS n FROM patients GROUP BY age HAVING n >= 1"):  # HAVING an alias
        assert run_query(ws, ana, sql).table.num_rows == len(by_age), sql
    with pytest.raises(ResultRefused):  # GROUP BY ALL over one person's values: groups of one
        run_query(ws, ana, "SELECT age, patient_ref, count(*) AS n FROM patients GROUP BY ALL")
    # aggregates that hand out row values are measured as if those rows were released
    assert run_query(ws, ana, "SELECT list(age) AS ages FROM patients").table.num_rows == 1
    for sql in ("SELECT list(age) AS ages FROM (SELECT age FROM patients LIMIT 3)",
                "SELECT ward, string_agg(postcode, ',') AS pcs FROM (SELECT * FROM patients LIMIT 3) GROUP BY ward",
                "SELECT max(age) AS oldest FROM (SELECT age FROM patients LIMIT 3)"):
        with pytest.raises(ResultRefused):
            run_query(ws, ana, sql)
    assert run_query(ws, ana, "SELECT count(age) AS n FROM (SELECT age FROM patients LIMIT 3)").table.num_rows == 1
    with pytest.raises(ResultRefused):  # a ROLLUP is measured row-level: stricter
        run_query(ws, ana, "SELECT age, count(*) AS n FROM patients GROUP BY ROLLUP (age)")
    for sql in ("SELECT age, patient_ref, count(*) AS n FROM patients GROUP BY age, patient_ref",
                "SELECT DISTINCT age, patient_ref FROM patients"):
        with pytest.raises(ResultRefused) as ei:
            run_query(ws, ana, sql)
        msg = str(ei.value)
        assert "the result's groups (by age)" in msg and "1×120" in msg, msg
    ws.close()


# -- the policy ------------------------------------------------------------------------------
def _load_with(tmp_path: Path, text: str):
    d = tmp_path / "pol"
    d.mkdir(exist_ok=True)
    (d / "roles.yaml").write_text((REPO / "policies" / "roles.yaml").read_text())
    (d / "patients.yaml").write_text(text)
    return load_policies([d / "roles.yaml", d / "patients.yaml"])


@pytest.mark.parametrize("age_h, pc_h, anonymity, field, words", [
    (', hierarchy: ["bucket:20", "bucket:40"]', PC_H, "", "columns.age.hierarchy",
     ["must start with the column's generalize ('bucket:10')"]),
    (', hierarchy: ["bucket:10", "bucket:15"]', PC_H, "", "columns.age.hierarchy", ["not coarser", "nested"]),
    (AGE_H, ', hierarchy: ["prefix:3", "prefix:4"]', "", "columns.postcode.hierarchy", ["does not apply"]),
    (AGE_H, ', hierarchy: ["prefix:3"]', "", "columns.postcode.hierarchy", ["at least 2"]),
    ("", "", "anonymity: {k_min: 5, on_violation: generalize}", "anonymity.on_violation", ["needs a hierarchy"]),
    (AGE_H, PC_H, "anonymity: {k_min: 1}", "anonymity.k_min", ["greater than or equal to 2"]),
    (AGE_H, PC_H, "anonymity: {k_min: 5, on_violation: shrug}", "anonymity.on_violation", ["stop", "generalize"]),
    (AGE_H, PC_H, "anonymity: {k_min: 5, kmin: 3}", "anonymity.kmin", []),
])
def test_policy_errors_name_file_and_field(tmp_path: Path, age_h: str, pc_h: str, anonymity: str, field: str,
                                           words: list[str]):
    text = PATIENTS.replace("{age_h}", age_h).replace("{pc_h}", pc_h).replace("{anonymity}", anonymity)
    with pytest.raises(PolicyError) as ei:
        _load_with(tmp_path, text)
    err = ei.value
    assert err.path == str(tmp_path / "pol" / "patients.yaml") and err.field == field, str(err)
    assert err.line is not None
    for w in words:
        assert w in str(err), (w, str(err))


def test_hierarchy_on_an_encrypted_column_and_l_min_without_a_sealed_sensitive_column_are_refused(tmp_path: Path):
    enc = PATIENTS.replace("{age_h}", "").replace("{pc_h}", "").replace("{anonymity}", "").replace(
        'generalize: "prefix:3"', 'protection: encrypt, hierarchy: ["prefix:3", "prefix:2"]')
    with pytest.raises(PolicyError, match="hierarchy needs protection 'generalize'"):
        _load_with(tmp_path, enc)
    no_sens = PATIENTS.replace("{age_h}", AGE_H).replace("{pc_h}", "").replace(
        "{anonymity}", "anonymity: {k_min: 5, l_min: 2}").replace("protection: encrypt}", "protection: restricted}")
    with pytest.raises(PolicyError, match="l_min needs at least one sensitive column"):
        _load_with(tmp_path, no_sens)
    ok = _load_with(tmp_path, PATIENTS.replace("{age_h}", AGE_H).replace("{pc_h}", PC_H).replace(
        "{anonymity}", "anonymity: {k_min: 5, l_min: 2, on_violation: generalize}"))
    a = ok.dataset("patients").anonymity
    assert (a.k_min, a.l_min, a.on_violation) == (5, 2, "generalize")


def test_the_published_schema_knows_anonymity_and_hierarchy():
    from governance.policy_schema import render

    text = (REPO / "docs" / "policy.schema.json").read_text(encoding="utf-8")
    assert text == render(), "run: lakewarden policy schema --out docs/policy.schema.json"
    schema = json.loads(text)
    assert "anonymity" in schema["$defs"]["DatasetPolicy"]["properties"]
    assert "hierarchy" in schema["$defs"]["ColumnPolicy"]["properties"]


def test_privacy_risk_of_a_query_measures_the_export_without_refusing_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """``privacy risk DATASET --query SQL``: k of what the query would export (the classes ``sql`` would
    refuse), sizes only; an aggregate is measured by its groups; a result without quasi-identifiers is
    one class."""
    ws = _patients_ws(tmp_path, monkeypatch, "anonymity: {k_min: 4, on_violation: generalize}")
    build_silver(ws, ws.actor("dana"), "patients")
    ana = ws.actor("ana")
    rep = privacy_risk(ws, ana, "patients", query="SELECT age, postcode FROM patients LIMIT 3")
    assert rep.query and rep.measure.rows == 3 and rep.measure.k_min == 4 and not rep.measure.k_ok
    grouped = privacy_risk(ws, ana, "patients", query="SELECT age, count(*) AS n FROM patients GROUP BY age")
    assert grouped.measure.rows == 120 and grouped.measure.k >= 4 and grouped.measure.k_ok
    whole = privacy_risk(ws, ana, "patients", query="SELECT ward, count(*) AS n FROM patients GROUP BY ward")
    assert whole.measure.quasi_identifiers == () and whole.measure.classes == 1
    with pytest.raises(Exception, match="does not read 'customers'"):
        privacy_risk(ws, ana, "customers", query="SELECT age FROM patients")
    ws.audit.flush()
    ev = [e for e in _audit(ws) if e["action"] == "privacy.risk"]
    assert len(ev) == 3 and all("query_sha256" in e["details"] for e in ev)
    p = lw_in(tmp_path, "--as", "ana", "privacy", "risk", "patients", "--query",
              "SELECT age, postcode FROM patients LIMIT 3", env={"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]})
    assert p.returncode == 0, p.stderr
    assert "the query's result" in p.stdout and "k met" in p.stdout
    assert not any(v in p.stdout for v in _qi_values(ws) | set(AREAS))
    ws.close()
