"""Batches checked in parallel, and sealed by either backend, give what one batch at a time gives:
the same rows accepted, the same quarantine reasons (uniqueness across batch boundaries
included), the same plaintexts behind the ciphertexts, exactly once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_ingest import person, run, table, write_csv

from governance.keys import native
from tests.keystore_helpers import check_layout
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.ingest import LEDGER


def _rows() -> list[dict[str, str]]:
    rows = [person(i) for i in range(120)]
    rows[40] = person(3)  # the same customer as row 3, in another batch: a duplicate across batches
    rows[41] = person(41, email="not-an-email")
    rows[42] = person(42, region="nowhere")
    rows[43] = person(3)  # and again, later
    rows[90] = person(90, customer_id="   ")
    rows[91] = person(91, sex="Q")
    return rows


def _outcome(ws: Workspace) -> tuple[list, list, dict]:
    quarantine = table(ws, "quarantine").sort_by("row_number")
    reasons = list(zip(quarantine["row_number"].to_pylist(), quarantine["reason"].to_pylist()))
    bronze = table(ws, "bronze").sort_by("_row")
    vault = table(ws, "vault").sort_by("_row")
    opened = {}
    for col in ("name", "email", "phone"):
        vals = ws.keyring.open_arrow(vault[col].combine_chunks(), vault["customer_id"].combine_chunks(),
                                     dataset="customers", column=col)
        opened[col] = dict(zip(vault["_row"].to_pylist(), vals.cast(pa.string()).to_pylist()))
    sex = ws.keyring.open_arrow(bronze["sex"].combine_chunks(), bronze["customer_id"].combine_chunks(),
                                dataset="customers", column="sex")
    opened["sex"] = dict(zip(bronze["_row"].to_pylist(), sex.cast(pa.string()).to_pylist()))
    return bronze["_row"].to_pylist(), reasons, opened


def test_parallel_batches_give_what_one_at_a_time_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from conftest import make_project

    results = []
    for workers in (1, 3):
        folder = tmp_path / f"w{workers}"
        ws = Workspace.open(make_project(folder, monkeypatch) / "lakewarden.yaml")
        f = write_csv(folder / "people.csv", _rows())
        seen = []
        rep = run(ws, f, batch_rows=9, workers=workers, progress=lambda src, n: seen.append(n))
        assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (120, 114, 6)
        assert rep.batches == 14 and sum(seen) == 120 and len(seen) == 14
        results.append(_outcome(ws))
        # exactly once: the same file again writes nothing
        f2 = write_csv(folder / "again.csv", _rows())
        again = run(ws, f2, batch_rows=9, workers=workers)
        assert again.rows_skipped == 120 and again.batches_skipped == 14
        ws.close()
    (rows1, reasons1, opened1), (rows3, reasons3, opened3) = results
    assert rows1 == rows3
    assert reasons1 == reasons3
    assert [r for r, _ in reasons1] == [41, 42, 43, 44, 91, 92]  # row numbers count data rows from 1
    assert all("duplicate" in why for r, why in reasons1 if r in (41, 44))
    assert opened1 == opened3
    assert opened1["email"][8] == "person7@example.org" and opened1["sex"][8] == "FMX"[7 % 3]


def test_both_backends_ingest_the_same_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if native.backend() != "native":
        pytest.skip("native core not built")
    from conftest import make_project

    results = []
    for backend in ("native", "python"):
        folder = tmp_path / backend
        ws = Workspace.open(make_project(folder, monkeypatch) / "lakewarden.yaml")
        with monkeypatch.context() as m:
            if backend == "python":
                m.setattr(native, "_native", None)
                m.setattr(native, "_SHARED_SQLITE", False)
            run(ws, write_csv(folder / "people.csv", _rows()), batch_rows=25)
        results.append(_outcome(ws))
        # the other backend reads what this one wrote
        bronze = table(ws, "bronze")
        token_of_row = dict(zip(bronze["_row"].to_pylist(), bronze["customer_id"].to_pylist()))
        assert ws.keyring.tokens_for([f"C-{i:09d}" for i in (0, 7, 119)], create=False) == [
            token_of_row[i + 1] for i in (0, 7, 119)
        ]
        ws.close()
    assert results[0] == results[1]


def test_the_ledger_has_one_row_per_batch_after_a_parallel_ingest(workspace: Workspace, tmp_path: Path):
    from deltalake import DeltaTable

    run(workspace, write_csv(tmp_path / "people.csv", [person(i) for i in range(100)]), batch_rows=10, workers=4)
    ledger = DeltaTable(workspace.config.table_uri(LEDGER)).to_pyarrow_table()
    assert ledger.num_rows == 10 and len(set(ledger["batch_id"].to_pylist())) == 10
    firsts = sorted(ledger["first_row"].to_pylist())
    assert [b - a for a, b in zip(firsts, firsts[1:])] == [10] * 9
    assert pc.sum(ledger["rows_accepted"]).as_py() == 100


VISITS = """\
kind: dataset
dataset: visits
description: Clinic visits (fictional); several visits per patient.
subject_key: patient_ref
columns:
  patient_ref: {class: subject_key, type: string, required: true}
  nhs_number:  {class: direct_identifier, type: string}
  visit_date:  {class: sensitive, type: date, protection: encrypt}
  weight_kg:   {class: sensitive, type: double, protection: encrypt}
  diagnosis:   {class: sensitive, type: string, protection: restricted}
  postcode:    {class: quasi_identifier, type: string, generalize: "prefix:2"}
  clinic:      {class: public, type: string, required: true}
purposes:
  care: {description: Care quality reporting.}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [care]}
  compliance_officer: {layers: [bronze, silver, quarantine, vault], purposes: [care]}
"""


def _ingest_own_policy(folder: Path, monkeypatch: pytest.MonkeyPatch, dataset: str, policy: str,
                       rows: list[dict[str, str]], *, workers: int, force_python: bool) -> tuple[Workspace, Any]:
    """A project at ``folder`` with ``policy`` for ``dataset``, whose ``rows`` (a CSV) are ingested
    in batches of 16 on ``workers`` threads, on the native core or (``force_python``) the
    pure-Python fallback: ``(the open workspace, the ingest report)``."""
    import csv

    from conftest import make_project

    make_project(folder, monkeypatch)
    (folder / "policies" / f"{dataset}.yaml").write_text(policy)
    src = folder / f"{dataset}.csv"
    with open(src, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ws = Workspace.open(folder / "lakewarden.yaml")
    with monkeypatch.context() as m:
        if force_python:
            m.setattr(native, "_native", None)
            m.setattr(native, "_SHARED_SQLITE", False)
        rep = run(ws, src, dataset=dataset, batch_rows=16, workers=workers)
    return ws, rep


def test_a_policy_we_did_not_design_ingests_the_same_on_both_backends_and_any_pool(tmp_path: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch):
    """Another subject key, repeat subjects, an encrypted date and double, a restricted column, a
    generalized one: the plaintexts behind the ciphertexts are the typed values, whichever path."""
    rows = [{"patient_ref": f"P{i % 37:04d}", "nhs_number": f"{900000000 + i}" if i % 5 else "",
             "visit_date": f"2024-0{1 + i % 9}-1{i % 9}", "weight_kg": f"{50 + i % 40}.5",
             "diagnosis": ["J45", "E11", "I10", ""][i % 4], "postcode": f"SW{i % 10}A 1AA", "clinic": "north"}
            for i in range(150)]
    rows[60]["weight_kg"] = "heavy"  # not a double: quarantined
    outcomes = []
    for label, workers, force_python in (("native-1", 1, False), ("native-3", 3, False), ("python-2", 2, True)):
        if force_python and native.backend() != "native":
            continue
        ws, rep = _ingest_own_policy(tmp_path / label, monkeypatch, "visits", VISITS, rows,
                                     workers=workers, force_python=force_python)
        assert (rep.rows_accepted, rep.rows_quarantined) == (149, 1)
        bronze = table(ws, "bronze", "visits").sort_by("_row")
        assert len(set(bronze["patient_ref"].to_pylist())) == 37  # one token per patient across batches
        assert "nhs_number" not in bronze.column_names and "diagnosis" not in bronze.column_names
        opened = {}
        for layer, col in (("bronze", "visit_date"), ("bronze", "weight_kg"), ("vault", "nhs_number"),
                           ("restricted", "diagnosis")):
            t = table(ws, layer, "visits").sort_by("_row")
            vals = ws.keyring.open_arrow(t[col].combine_chunks(), t["patient_ref"].combine_chunks(),
                                         dataset="visits", column=col)
            opened[col] = dict(zip(t["_row"].to_pylist(), vals.cast(pa.string()).to_pylist()))
        opened["postcode"] = dict(zip(bronze["_row"].to_pylist(), bronze["postcode"].to_pylist()))
        outcomes.append(opened)
        # Compression where something compresses: bronze (public and generalized columns beside the
        # ciphertext) keeps the storage's codec; the vault and the restricted table, nothing but
        # ciphertext and tokens, are written without one.
        for layer in ("bronze", "vault", "restricted"):
            codecs = set()
            for uri in Catalog(ws.config).open(TableRef(layer, "visits")).file_uris():
                md = pq.ParquetFile(uri.removeprefix("file://")).metadata
                codecs |= {md.row_group(g).column(j).compression
                           for g in range(md.num_row_groups) for j in range(md.num_columns)}
            assert codecs == ({"ZSTD"} if layer == "bronze" else {"UNCOMPRESSED"}), (label, layer, codecs)
        ws.close()
    assert all(o == outcomes[0] for o in outcomes)
    first = outcomes[0]
    assert first["weight_kg"][1] == "50.5" and first["visit_date"][1] == "2024-01-10"
    assert first["nhs_number"][2] == "900000001" and 1 not in first["nhs_number"]  # empty: nothing vaulted
    assert first["diagnosis"][2] == "E11" and first["postcode"][1] == "SW"
    assert 61 not in first["weight_kg"]  # the quarantined row


def test_the_token_cache_starting_again_mid_ingest_loses_no_token(workspace: Workspace, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """Transactions keep a per-ingest cache of tokens; when it is full it starts again from the
    batch at hand, and every row still gets its customer's token."""
    import lakehouse.ingest as ingest_mod
    from lakehouse.synth import generate

    res = generate(tmp_path / "landing", people=40, transactions_per_person=5, seed=7)
    run(workspace, res.files["customers"])
    monkeypatch.setattr(ingest_mod.Ingestor, "TOKEN_CACHE_MAX", 12)
    rep = run(workspace, res.files["transactions"], dataset="transactions", batch_rows=15, workers=2)
    assert rep.batches > 5 and rep.rows_accepted > 0
    bronze = table(workspace, "bronze", "transactions")
    tokens = bronze["customer_id"].to_pylist()
    assert None not in tokens
    assert set(tokens) <= set(table(workspace, "bronze", "customers")["customer_id"].to_pylist())


MEMBERS = """\
kind: dataset
dataset: members
description: Gym members (fictional); one row per member, keyed by membership number.
subject_key: member_no
columns:
  member_no: {class: subject_key, type: string, required: true, unique: true}
  full_name: {class: direct_identifier, type: string}
  tier:      {class: sensitive, type: string, protection: encrypt, allowed: [bronze, silver, gold]}
  joined:    {class: public, type: date}
purposes:
  ops: {description: Membership operations.}
access:
  data_engineer: {layers: [bronze, silver, quarantine], purposes: [ops]}
  compliance_officer: {layers: [bronze, silver, quarantine, vault], purposes: [ops]}
"""


def test_a_unique_subject_key_goes_to_the_key_store_as_it_is_and_repeats_still_get_one_subject(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A dataset with a unique subject key hands its key column to the key store without hashing
    the ids first. Another policy (a membership number, a text label sealed, a vaulted name): a
    member repeated within a batch and one repeated across batches are quarantined as duplicates
    with the first row's token, every member has exactly one subject in the key store, and the
    sealed values open to the input, on both backends."""
    rows = [{"member_no": f"M-{i:05d}", "full_name": f"Name {i}", "tier": ["bronze", "silver", "gold"][i % 3],
             "joined": f"2023-0{1 + i % 9}-0{1 + i % 8}"} for i in range(120)]
    rows.insert(5, dict(rows[3]))  # a repeat in the first batch (rows of 16)
    rows.append(dict(rows[40]))    # a repeat of a member from an earlier batch
    for label, force_python in (("native", False), ("python", True)):
        if force_python and native.backend() != "native":
            continue
        folder = tmp_path / label
        ws, rep = _ingest_own_policy(folder, monkeypatch, "members", MEMBERS, rows, workers=3, force_python=force_python)
        assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (122, 120, 2)
        assert sum(rep.reasons.values()) == 2 and all("member_no: duplicate" in r for r in rep.reasons)
        bronze = table(ws, "bronze", "members").sort_by("_row")
        assert len(set(bronze["member_no"].to_pylist())) == 120
        tiers = ws.keyring.open_arrow(bronze["tier"].combine_chunks(), bronze["member_no"].combine_chunks(),
                                      dataset="members", column="tier")
        assert tiers.cast(pa.string()).to_pylist() == [r["tier"] for r in rows[:5] + rows[6:121]]
        vault = table(ws, "vault", "members").sort_by("_row")
        names = ws.keyring.open_arrow(vault["full_name"].combine_chunks(), vault["member_no"].combine_chunks(),
                                      dataset="members", column="full_name")
        assert names.cast(pa.string()).to_pylist()[:4] == ["Name 0", "Name 1", "Name 2", "Name 3"]
        store = ws.config.keys.store if Path(ws.config.keys.store).is_absolute() else folder / ws.config.keys.store
        ws.close()
        assert check_layout(store)[0] == 120
