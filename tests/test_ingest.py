"""Governed ingest: bad input of every kind gets a clear message or a quarantined row with a reason,
never a traceback and never a lost row; exactly once across reruns and SIGKILL; concurrent writers
lose nothing; nothing written holds plaintext identifiers."""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from cli_helpers import lw_in
from deltalake import DeltaTable

from governance.errors import AccessDenied, LakewardenError
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import IngestError, TableError
from lakehouse.ingest import LEDGER, ingest
from lakehouse.silver import build_silver, load_stats

HEADER = ["customer_id", "name", "email", "phone", "birth_date", "zip_code", "sex", "ethnicity", "income", "region",
          "defaulted"]


def person(i: int, **over: str) -> dict[str, str]:
    row = {
        "customer_id": f"C-{i:09d}",
        "name": f"Person{i} Example",
        "email": f"person{i}@example.org",
        "phone": f"+1 555-01{i % 100:02d}-{i % 10000:04d}",
        "birth_date": f"{1950 + i % 50}-0{1 + i % 9}-1{i % 9}",
        "zip_code": f"{10000 + (i * 7919) % 89999:05d}",
        "sex": "FMX"[i % 3],
        "ethnicity": f"group_{'abcdef'[i % 6]}",
        "income": f"{20000 + (i * 37) % 90000}.5",
        "region": ["north", "south", "east", "west"][i % 4],
        "defaulted": "true" if i % 5 == 0 else "false",
    }
    row.update(over)
    return row


def write_csv(path: Path, rows: list[dict[str, str]], header: list[str] = HEADER) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def run(ws: Workspace, *paths: Path | str, dataset: str = "customers", user: str = "dana", **kw):
    rep = ingest(ws, ws.actor(user), dataset, [str(p) for p in paths], **kw)
    assert rep.rows_read == rep.rows_accepted + rep.rows_quarantined + rep.rows_skipped
    for f in rep.files:
        assert f.balanced
    return rep


def table(ws: Workspace, layer: str, dataset: str = "customers") -> pa.Table:
    return Catalog(ws.config).open(TableRef(layer, dataset)).to_pyarrow_table()


# -- the good path ----------------------------------------------------------------------------
def test_ingest_protects_and_reports(workspace: Workspace, tmp_path: Path):
    f = write_csv(tmp_path / "people.csv", [person(i) for i in range(50)])
    rep = run(workspace, f)
    assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (50, 50, 0)
    assert rep.files[0].landing == "removed" and not f.exists()
    bronze = table(workspace, "bronze")
    assert bronze.num_rows == 50
    assert "name" not in bronze.column_names and "email" not in bronze.column_names
    assert all(t.startswith("sub_") for t in bronze["customer_id"].to_pylist())
    assert set(bronze["birth_date"].to_pylist()) <= set(range(1950, 2000))  # generalized to the year
    assert all(len(z) == 3 for z in bronze["zip_code"].to_pylist())
    assert pa.types.is_binary(bronze.schema.field("sex").type)
    dt = Catalog(workspace.config).open(TableRef("bronze", "customers"))
    assert dt.metadata().partition_columns == ["_subject_bucket"]
    assert all(p.endswith(".zstd.parquet") for p in dt.file_uris())
    # The vault opens with the subject's key, back to the original value.
    vault = table(workspace, "vault").sort_by("_row")
    tok, blob = vault["customer_id"][0].as_py(), vault["email"][0].as_py()
    assert workspace.keyring.open(blob, token=tok, dataset="customers", column="email") == b"person0@example.org"
    assert workspace.keyring.token_for("C-000000000", create=False) == tok


@pytest.mark.parametrize("blank", [[], [3, 7]], ids=["every-row-has-vault-values", "two-rows-have-none"])
def test_the_vault_holds_a_row_for_each_person_with_a_vault_value(workspace: Workspace, tmp_path: Path,
                                                                     blank: list[int]):
    """A batch whose every row has a vault value is written as it is; a row without any is left
    out of the vault (and stays in bronze)."""
    none = {"name": "", "email": "", "phone": "", "birth_date": "", "zip_code": ""}
    rows = [person(i, **(none if i in blank else {})) for i in range(12)]
    rep = run(workspace, write_csv(tmp_path / "people.csv", rows))
    assert (rep.rows_accepted, rep.rows_quarantined) == (12, 0)
    assert table(workspace, "bronze").num_rows == 12
    vault = table(workspace, "vault").sort_by("_row")
    kept = [i for i in range(12) if i not in blank]
    assert vault.num_rows == len(kept)
    for i, tok, blob in zip(kept, vault["customer_id"].to_pylist(), vault["email"].to_pylist()):  # in row order
        assert workspace.keyring.open(blob, token=tok, dataset="customers", column="email") == f"person{i}@example.org".encode()


def test_same_batch_twice_is_a_noop(workspace: Workspace, tmp_path: Path):
    rows = [person(i) for i in range(30)]
    run(workspace, write_csv(tmp_path / "a.csv", rows), batch_rows=10)
    v = Catalog(workspace.config).open(TableRef("bronze", "customers")).version()
    rep = run(workspace, write_csv(tmp_path / "b.csv", rows), batch_rows=10)
    assert (rep.rows_skipped, rep.batches_skipped, rep.rows_accepted) == (30, 3, 0)
    assert Catalog(workspace.config).open(TableRef("bronze", "customers")).version() == v
    assert table(workspace, "bronze").num_rows == 30


def test_a_file_several_times_the_batch_streams_through(workspace: Workspace, tmp_path: Path):
    f = write_csv(tmp_path / "big.csv", [person(i) for i in range(2500)])
    rep = run(workspace, f, batch_rows=300)
    assert rep.batches == 9 and rep.rows_accepted == 2500
    ledger = DeltaTable(workspace.config.table_uri(LEDGER)).to_pyarrow_table()
    assert sorted(ledger["first_row"].to_pylist()) == list(range(1, 2500, 300))


def test_parquet_and_jsonl(workspace: Workspace, tmp_path: Path):
    rows = [person(i) for i in range(20)]
    pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "p.parquet")
    with open(tmp_path / "p.jsonl", "w") as fh:
        for r in rows[10:]:
            fh.write(json.dumps({**r, "income": float(r["income"]), "defaulted": r["defaulted"] == "true"}) + "\n")
    rep = run(workspace, tmp_path / "p.parquet", tmp_path / "p.jsonl")
    assert rep.rows_accepted == 20 and rep.rows_quarantined == 0


def test_landing_kept_when_policy_says_so(project: Path, tmp_path: Path):
    pol = project / "policies" / "customers.yaml"
    pol.write_text(pol.read_text().replace("landing: remove", "landing: keep"))
    ws = Workspace.open(project / "lakewarden.yaml")
    f = write_csv(tmp_path / "k.csv", [person(1)])
    rep = run(ws, f)
    assert f.exists() and rep.files[0].landing.startswith("kept")
    ws.close()


# -- bad input: a quarantined row with a reason ------------------------------------------------
ROW_CASES = {
    "wrong type": ({"income": "abc"}, "income: not a valid double"),
    "null subject key": ({"customer_id": ""}, "customer_id: missing (required)"),
    "blank subject key": ({"customer_id": "   "}, "customer_id: missing (required)"),
    "oversized field": ({"name": "x" * 5000}, "name: longer than 200 characters"),
    "formula injection": ({"name": "=HYPERLINK(\"http://x\")"}, "name: starts like a spreadsheet formula (CSV injection)"),
    "formula injection with +": ({"name": "+cmd|' /C calc'!A0"}, "name: starts like a spreadsheet formula (CSV injection)"),
    "pattern": ({"email": "not-an-email"}, "email: does not match the email pattern"),
    "allowed values": ({"sex": "Q"}, "sex: not one of the allowed values"),
    "below minimum": ({"income": "-5"}, "income: below the minimum 0"),
    "future birth date": ({"birth_date": "2999-01-01"}, "birth_date: above the maximum today"),
    "bad date format": ({"birth_date": "31/12/1990"}, "birth_date: not a valid date"),
    "bad bool": ({"defaulted": "maybe"}, "defaulted: not a valid bool"),
    "missing required value": ({"region": ""}, "region: missing (required)"),
}


@pytest.mark.parametrize("case", sorted(ROW_CASES))
def test_bad_rows_are_quarantined_with_a_reason(workspace: Workspace, tmp_path: Path, case: str):
    over, reason = ROW_CASES[case]
    f = write_csv(tmp_path / "x.csv", [person(1), person(2, **over), person(3)])
    rep = run(workspace, f)
    assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (3, 2, 1)
    assert dict(rep.reasons) == {reason: 1}
    q = table(workspace, "quarantine")
    assert q["reason"].to_pylist() == [reason] and q["row_number"].to_pylist() == [2]


@pytest.mark.parametrize("backend", ["native", "python"])
def test_today_in_the_contract_is_the_workspace_clocks_day(project: Path, tmp_path: Path, backend: str,
                                                           monkeypatch: pytest.MonkeyPatch):
    """``max: today``, the rows' ingest time and silver's statistics' time come from the workspace's clock:
    on a clock set to 2031-03-31 a birth date of that day is accepted (the real date would call it
    the future) and the next day's is not, on the native core and on DuckDB alike."""
    from datetime import datetime, timezone

    from governance.keys import native

    if backend == "python":
        monkeypatch.setattr(native, "_native", None)
        monkeypatch.setattr(native, "_SHARED_SQLITE", False)
    elif native.backend() != "native":
        pytest.skip("native core not built")
    now = datetime(2031, 3, 31, 23, 59, 59, tzinfo=timezone.utc)
    ws = Workspace.open(project / "lakewarden.yaml", clock=lambda: now)
    try:
        f = write_csv(tmp_path / "x.csv", [person(1, birth_date="2031-03-31"), person(2, birth_date="2031-04-01"),
                                           person(3, birth_date="2031-02-28")])
        rep = run(ws, f)
        assert (rep.rows_accepted, rep.rows_quarantined) == (2, 1)
        assert dict(rep.reasons) == {"birth_date: above the maximum today": 1}
        assert table(ws, "quarantine")["row_number"].to_pylist() == [2]
        bronze = table(ws, "bronze")
        assert sorted(bronze["birth_date"].to_pylist()) == [2031, 2031]  # generalized to the year
        assert set(bronze["_ingested_at"].to_pylist()) == {now}
        if backend == "native":  # silver's statistics carry the same clock
            from deltalake import DeltaTable

            from lakehouse.silver import STATS

            build_silver(ws, ws.actor("dana"), "customers")
            fitted = DeltaTable(ws.config.table_uri(f"{STATS}/customers")).to_pyarrow_table()["fitted_at"]
            assert fitted.to_pylist() == [now]
    finally:
        ws.close()


def test_quarantined_row_keeps_the_original_only_encrypted(workspace: Workspace, tmp_path: Path):
    run(workspace, write_csv(tmp_path / "x.csv", [person(7, email="bad@@example.org")]))
    q = table(workspace, "quarantine").to_pylist()[0]
    tok = q["subject_token"]
    assert tok == workspace.keyring.token_for("C-000000007", create=False)
    original = json.loads(workspace.keyring.open(q["payload"], token=tok, dataset="quarantine.customers", column="row"))
    assert original["email"] == "bad@@example.org"


def test_duplicate_keys_within_a_file_and_across_ingests(workspace: Workspace, tmp_path: Path):
    rep = run(workspace, write_csv(tmp_path / "a.csv", [person(1), person(2), person(1, name="Other")]))
    assert dict(rep.reasons) == {"customer_id: duplicate value within the file": 1}
    rep = run(workspace, write_csv(tmp_path / "b.csv", [person(2, name="Again"), person(3)]))
    assert dict(rep.reasons) == {"customer_id: duplicate of a subject already ingested": 1}
    assert table(workspace, "bronze").num_rows == 3


def test_duplicates_across_batches_of_a_later_ingest(workspace: Workspace, tmp_path: Path):
    """A second ingest in batches of two: new people only (the lookup is skipped), then a batch that
    repeats someone from the first ingest and someone from an earlier batch of this one."""
    run(workspace, write_csv(tmp_path / "a.csv", [person(1), person(2)]))
    rows = [person(3), person(4), person(5), person(1, name="Again"), person(6), person(3, name="Twice")]
    rep = run(workspace, write_csv(tmp_path / "b.csv", rows), batch_rows=2)
    assert rep.rows_accepted == 4 and rep.rows_quarantined == 2, dict(rep.reasons)
    assert sum(rep.reasons.values()) == 2 and all("customer_id: duplicate" in r for r in rep.reasons)
    assert table(workspace, "bronze").num_rows == 6


def test_a_fresh_batch_is_still_checked_against_the_batches_in_flight_with_it(workspace: Workspace, tmp_path: Path):
    """Batches in flight together may reach the key store in either order: a subject created by a later
    batch can be in the earlier one, which then found it known. A batch whose subjects were all just
    created skips the lookup in the table, never in those batches."""
    from lakehouse.ingest import Ingestor

    run(workspace, write_csv(tmp_path / "a.csv", [person(1)]))  # the table exists: duplicates are looked up
    ing = Ingestor(workspace, workspace.actor("dana"), "customers", batch_rows=None, progress=None, workers=2)
    try:
        out = pa.table({"_row": [1], "_reason": pa.nulls(1, pa.string())})
        assert ing._final_reasons(out, pa.array(["sub_x"]), fresh=False).null_count == 1   # earlier batch: accepted
        again = ing._final_reasons(out, pa.array(["sub_x"]), fresh=True)                    # the later, "fresh" one
        assert again.to_pylist() == ["customer_id: duplicate of a subject already ingested"]
        old = table(workspace, "bronze")["customer_id"][0].as_py()
        assert ing._final_reasons(out, pa.array([old]), fresh=False).null_count == 0        # in the table
    finally:
        ing.close()


def test_bad_utf8_is_quarantined(workspace: Workspace, tmp_path: Path):
    f = write_csv(tmp_path / "u.csv", [person(1), person(2)])
    f.write_bytes(f.read_bytes().replace(b"Person2 Example", b"Person2 \xff\xfe"))
    rep = run(workspace, f)
    assert dict(rep.reasons) == {"name: not valid UTF-8 text": 1} and rep.rows_accepted == 1


def test_short_and_long_rows_are_quarantined(workspace: Workspace, tmp_path: Path):
    f = write_csv(tmp_path / "t.csv", [person(1), person(2)])
    with open(f, "a") as fh:
        fh.write("C-000000009,Too,many,fields,1990-01-01,12345,F,group_a,1,north,true,EXTRA\n")
        fh.write("C-000000010,Truncated,row\n")
    rep = run(workspace, f)
    assert rep.rows_read == 4 and rep.rows_accepted == 2
    assert dict(rep.reasons) == {
        "malformed CSV row: expected 11 fields, got 12": 1,
        "malformed CSV row: expected 11 fields, got 3": 1,
    }


def test_jsonl_bad_lines(workspace: Workspace, tmp_path: Path):
    p = tmp_path / "j.jsonl"
    good = person(1)
    lone = json.dumps({**person(3), "name": "x"}).replace('"x"', '"\\ud800"')  # valid JSON, no text
    p.write_text("\n".join([json.dumps(good), "{not json", json.dumps([1, 2]), json.dumps({**person(2), "name": {"first": "x"}}),
                            lone]) + "\n")
    rep = run(workspace, p)
    assert rep.rows_read == 5 and rep.rows_accepted == 1
    assert set(rep.reasons) == {"invalid JSON (Expecting property name enclosed in double quotes)",
                                "a JSON line must be an object", "nested objects or arrays are not allowed",
                                "field 'name' is not valid Unicode text (an unpaired surrogate escape)"}


def test_parquet_with_wrong_values(workspace: Workspace, tmp_path: Path):
    rows = [person(1), person(2, income="lots")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "w.parquet")
    rep = run(workspace, tmp_path / "w.parquet")
    assert dict(rep.reasons) == {"income: not a valid double": 1}


def test_header_only_file_reads_zero_rows(workspace: Workspace, tmp_path: Path):
    rep = run(workspace, write_csv(tmp_path / "h.csv", []))
    assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (0, 0, 0)


def test_header_is_matched_case_insensitively_and_bom_is_ignored(workspace: Workspace, tmp_path: Path):
    f = tmp_path / "bom.csv"
    write_csv(f, [person(1)])
    text = f.read_text().replace("customer_id", "Customer_ID", 1)
    f.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert run(workspace, f).rows_accepted == 1


# -- bad input: a clear error, nothing written -------------------------------------------------
def raw_file(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


FILE_CASES = [
    ("empty file", lambda d: raw_file(d / "e.csv", b""), "e.csv: the file is empty (0 bytes)"),
    ("missing required column", lambda d: write_csv(d / "m.csv", [person(1)], [h for h in HEADER if h != "customer_id"]),
     "m.csv: required column(s) missing: customer_id; nothing was ingested"),
    ("column without policy", lambda d: write_csv(d / "c.csv", [{**person(1), "shoe_size": "44"}], [*HEADER, "shoe_size"]),
     "c.csv: column(s) 'shoe_size' have no policy in policies/customers.yaml; nothing was ingested"),
    ("unsupported type", lambda d: raw_file(d / "x.xlsx", b"PK"),
     "x.xlsx: unsupported file type '.xlsx' (use .csv, .parquet or .jsonl)"),
    ("damaged parquet", lambda d: raw_file(d / "d.parquet", b"not parquet at all"),
     "d.parquet: not a readable Parquet file"),
    ("duplicate header", lambda d: write_csv(d / "dup.csv", [person(1)], [*HEADER, "income"]),
     "dup.csv: column 'income' appears twice"),
    ("no such file", lambda d: d / "nope.csv", "nope.csv: no such file"),
    ("a folder", lambda d: d, "is a folder; name the files or use a glob"),
    ("glob matches nothing", lambda d: str(d / "*.nothing"), "no files match"),
]


@pytest.mark.parametrize("case,make,message", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files_get_a_clear_error_and_write_nothing(workspace: Workspace, tmp_path: Path, case, make, message):
    src = tmp_path / "in"
    src.mkdir()
    target = make(src)
    with pytest.raises(IngestError) as exc:
        ingest(workspace, workspace.actor("dana"), "customers", [str(target)])
    assert message in str(exc.value)
    assert "\n" not in exc.value.message.strip()
    assert not Catalog(workspace.config).exists(TableRef("bronze", "customers"))


def test_truncated_inside_a_quoted_field_is_quarantined_not_lost(workspace: Workspace, tmp_path: Path):
    f = write_csv(tmp_path / "q.csv", [person(1)])
    with open(f, "a") as fh:
        fh.write('C-000000002,"Unterminated name,x@example.org')
    rep = run(workspace, f)
    assert (rep.rows_read, rep.rows_accepted, rep.rows_quarantined) == (2, 1, 1)
    assert list(rep.reasons) == ["malformed CSV row: expected 11 fields, got 2"]


@pytest.mark.parametrize("name", ["../etc/passwd", "customers/../../x", "Customers", "cust omers", "cust;drop", ""])
def test_odd_dataset_names_are_refused(workspace: Workspace, tmp_path: Path, name: str):
    with pytest.raises(TableError, match="invalid dataset name"):
        ingest(workspace, workspace.actor("dana"), name, [str(write_csv(tmp_path / "a.csv", [person(1)]))])


def test_unknown_dataset_and_denied_actor(workspace: Workspace, tmp_path: Path):
    f = write_csv(tmp_path / "a.csv", [person(1)])
    with pytest.raises(AccessDenied, match="builtin/unknown-dataset: no policy governs dataset 'payroll'"):
        ingest(workspace, workspace.actor("dana"), "payroll", [str(f)])
    with pytest.raises(AccessDenied, match="roles/stages/ingest"):
        ingest(workspace, workspace.actor("ana"), "customers", [str(f)])


def test_missing_optional_column_is_filled_or_rejected(project: Path, tmp_path: Path):
    ws = Workspace.open(project / "lakewarden.yaml")
    f = write_csv(tmp_path / "a.csv", [person(1)], [h for h in HEADER if h != "phone"])
    rep = run(ws, f)
    assert rep.files[0].filled_columns == ["phone"] and rep.rows_accepted == 1
    ws.close()
    pol = project / "policies" / "customers.yaml"
    pol.write_text(pol.read_text().replace('missing_columns: "null"', "missing_columns: reject"))
    ws = Workspace.open(project / "lakewarden.yaml")
    with pytest.raises(IngestError, match="column\\(s\\) missing: phone"):
        ingest(ws, ws.actor("dana"), "customers", [str(write_csv(tmp_path / "b.csv", [person(2)], [h for h in HEADER if h != "phone"]))])
    ws.close()


def test_unknown_column_dropped_when_policy_says_so(project: Path, tmp_path: Path):
    pol = project / "policies" / "customers.yaml"
    pol.write_text(pol.read_text().replace("unknown_columns: reject", "unknown_columns: drop"))
    ws = Workspace.open(project / "lakewarden.yaml")
    rep = run(ws, write_csv(tmp_path / "c.csv", [{**person(1), "shoe_size": "44"}], [*HEADER, "shoe_size"]))
    assert rep.files[0].dropped_columns == ["shoe_size"]
    assert "shoe_size" not in table(ws, "bronze").column_names
    ws.close()


def test_cli_reports_bad_input_without_traceback(project: Path, tmp_path: Path):
    env = {"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]}
    f = write_csv(tmp_path / "c.csv", [{**person(1), "shoe_size": "44"}], [*HEADER, "shoe_size"])
    p = lw_in(project, "ingest", "customers", str(f), user="dana", env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "have no policy" in p.stderr and "hint: classify them" in p.stderr
    ok = write_csv(tmp_path / "ok.csv", [person(1), person(2, sex="?")])
    p = lw_in(project, "ingest", "customers", str(ok), "--json", user="dana", env=env)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert (out["rows_read"], out["rows_accepted"], out["rows_quarantined"]) == (2, 1, 1)


# -- crashes and concurrency --------------------------------------------------------------------
KILL_SCRIPT = """
import sys
from governance.workspace import Workspace
from lakehouse.ingest import ingest
ws = Workspace.open(sys.argv[1])
ingest(ws, ws.actor("dana"), "customers", [sys.argv[2]], batch_rows=200)
ws.close()
"""


def test_sigkill_mid_ingest_then_rerun_is_exactly_once(project: Path, tmp_path: Path):
    n = 6000
    rows = [person(i, **({"email": "broken"} if i % 97 == 0 else {})) for i in range(n)]
    f = write_csv(tmp_path / "big.csv", rows)
    keep = project / "policies" / "customers.yaml"
    keep.write_text(keep.read_text().replace("landing: remove", "landing: keep"))
    env = {**os.environ, "LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"]}
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(project / "lakewarden.yaml"), str(f)], env=env)
    ledger = Path(Workspace.open(project / "lakewarden.yaml").config.table_uri(LEDGER))
    deadline = time.time() + 90
    while time.time() < deadline:  # wait until a few batches are committed, then kill without warning
        if (ledger / "_delta_log").is_dir() and len(list((ledger / "_delta_log").glob("*.json"))) >= 4:
            break
        assert p.poll() is None, "the ingest ended before its fourth commit"
        time.sleep(0.05)
    else:
        pytest.fail("the ingest did not commit 4 batches in 90 s")
    assert p.poll() is None, "the ingest ended before the kill"
    p.send_signal(signal.SIGKILL)
    p.wait(30)
    ws = Workspace.open(project / "lakewarden.yaml")
    partial = table(ws, "bronze").num_rows
    bad = len([i for i in range(n) if i % 97 == 0])
    assert 0 < partial < n - bad  # the table is readable mid-way
    rep = run(ws, f, batch_rows=200)
    bronze = table(ws, "bronze")
    assert bronze.num_rows == n - bad
    assert len(set(bronze["customer_id"].to_pylist())) == n - bad
    q = table(ws, "quarantine")
    assert q.num_rows == bad
    assert rep.rows_skipped > 0
    ws.close()


def _ingest_proc(config: str, path: str) -> None:
    ws = Workspace.open(config)
    ingest(ws, ws.actor("dana"), "customers", [path], batch_rows=100)
    ws.close()


def test_two_concurrent_ingests_lose_no_rows(project: Path, tmp_path: Path):
    a = write_csv(tmp_path / "a.csv", [person(i) for i in range(0, 1000)])
    b = write_csv(tmp_path / "b.csv", [person(i) for i in range(1000, 2000)])
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_ingest_proc, args=(str(project / "lakewarden.yaml"), str(x))) for x in (a, b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
        assert p.exitcode == 0
    ws = Workspace.open(project / "lakewarden.yaml")
    bronze = table(ws, "bronze")
    assert bronze.num_rows == 2000 and len(set(bronze["customer_id"].to_pylist())) == 2000
    assert ws.audit.verify().ok
    ws.close()


# -- what is written -----------------------------------------------------------------------------
def test_no_file_written_holds_plaintext_identifiers(project: Path, tmp_path: Path):
    ws = Workspace.open(project / "lakewarden.yaml")
    rows = [person(i) for i in range(300)] + [person(900, email="broken-address"), person(901, income="x")]
    run(ws, write_csv(tmp_path / "p.csv", rows), batch_rows=100)
    build_silver(ws, ws.actor("dana"), "customers")
    ws.close()
    needles = set()
    for r in rows:
        needles.update({r["customer_id"], r["name"], r["email"], r["phone"], r["birth_date"]})
    needles = {n.encode() for n in needles if n}
    hits = []
    for f in project.rglob("*"):
        if f.is_file() and "policies" not in f.parts:
            data = f.read_bytes()
            hits += [(str(f.relative_to(project)), n) for n in needles if n in data]
    assert not hits, hits[:5]


def test_schema_evolution_merge_and_reject(project: Path, tmp_path: Path):
    ws = Workspace.open(project / "lakewarden.yaml")
    run(ws, write_csv(tmp_path / "a.csv", [person(1)]))
    ws.close()
    pol = project / "policies" / "customers.yaml"
    text = pol.read_text().replace("  defaulted:   {class: public, type: bool}",
                                   "  defaulted:   {class: public, type: bool}\n  segment:     {class: public, type: string}")
    pol.write_text(text)
    ws = Workspace.open(project / "lakewarden.yaml")
    run(ws, write_csv(tmp_path / "b.csv", [{**person(2), "segment": "retail"}], [*HEADER, "segment"]))
    assert table(ws, "bronze").sort_by("_row")["segment"].to_pylist() in ([None, "retail"], ["retail", None])
    ws.close()
    pol.write_text(text.replace("schema_evolution: merge", "schema_evolution: reject")
                   .replace("  segment:     {class: public, type: string}", "  segment:     {class: public, type: string}\n  tier: {class: public, type: string}"))
    ws = Workspace.open(project / "lakewarden.yaml")
    with pytest.raises(IngestError, match="added column\\(s\\) tier"):
        ingest(ws, ws.actor("dana"), "customers", [str(write_csv(tmp_path / "c.csv", [person(3)]))])
    ws.close()


# -- silver ------------------------------------------------------------------------------------------
def test_silver_fits_and_stores_statistics(workspace: Workspace, tmp_path: Path):
    rows = [person(i) for i in range(40)] + [person(40, income="")]
    run(workspace, write_csv(tmp_path / "s.csv", rows))
    rep = build_silver(workspace, workspace.actor("dana"), "customers")
    incomes = sorted(float(r["income"]) for r in rows[:40])
    median = (incomes[19] + incomes[20]) / 2
    assert rep.stats["impute"]["income"] == {"method": "median", "value": pytest.approx(median)}
    silver = table(workspace, "silver")
    assert silver.num_rows == 41
    assert {"income_z", "income_log"} <= set(silver.column_names)
    imputed = [r for r in silver.to_pylist() if r["customer_id"] == workspace.keyring.token_for("C-000000040", create=False)]
    assert imputed[0]["income"] == pytest.approx(median)
    z = silver["income_z"].to_pylist()
    assert abs(sum(z) / len(z)) < 1e-9
    assert load_stats(workspace, "customers") == rep.stats
    again = build_silver(workspace, workspace.actor("dana"), "customers")
    assert again.up_to_date and again.silver_version == rep.silver_version


def test_time_travel_by_version(workspace: Workspace, tmp_path: Path):
    run(workspace, write_csv(tmp_path / "a.csv", [person(1)]))
    run(workspace, write_csv(tmp_path / "b.csv", [person(2), person(3)]))
    cat = Catalog(workspace.config)
    assert cat.open(TableRef("bronze", "customers"), version=0).to_pyarrow_table().num_rows == 1
    assert cat.open(TableRef("bronze", "customers")).to_pyarrow_table().num_rows == 3
    with pytest.raises(LakewardenError, match="version 99"):
        cat.open(TableRef("bronze", "customers"), version=99)


def test_subject_buckets_spread_evenly_over_all_buckets():
    """Erasure rewrites one bucket partition per subject: every bucket must be in use, evenly."""
    from collections import Counter

    import pyarrow as pa

    from governance.keys import native
    from lakehouse.catalog import subject_bucket, subject_buckets

    toks = native.new_tokens(16_000)
    counts = Counter(subject_bucket(t, 16) for t in toks)
    assert set(counts) == set(range(16))
    assert max(counts.values()) < 1.15 * 1000 and min(counts.values()) > 0.85 * 1000
    assert all(subject_bucket(t, 16) == subject_bucket(t, 16) for t in toks[:10])  # stable
    # the column version (what ingest runs) is the same function; NULL stays NULL
    col = pa.array([*toks[:500], None, *toks[500:1000]])
    for n in (1, 7, 16, 4096):
        assert subject_buckets(col, n).to_pylist() == [None if t is None else subject_bucket(t, n) for t in col.to_pylist()]


def test_parquet_files_skip_dictionaries_and_statistics_where_they_buy_nothing(workspace: Workspace, tmp_path: Path):
    """Sealed columns: neither, and their lengths delta-encoded; the subject token: no statistics,
    and no dictionary when the rows are mostly distinct subjects (delta-encoded lengths then); row
    numbers delta-encoded; a unique column keeps its statistics (data skipping) but no
    dictionary; other columns keep both. The storage's compression applies to a table with
    anything but ciphertext and tokens in it (bronze); the vault, nothing but those, is written
    uncompressed. Every table reads back the same."""
    people = [person(i) for i in range(300)]
    run(workspace, write_csv(tmp_path / "c.csv", people))
    assert workspace.config.storage.compression == "zstd"

    def columns(ref: TableRef) -> dict:
        dt = Catalog(workspace.config).open(ref)
        meta = pq.ParquetFile(dt.file_uris()[0].removeprefix("file://")).metadata
        return {meta.row_group(0).column(j).path_in_schema: meta.row_group(0).column(j) for j in range(meta.num_columns)}

    cols = columns(TableRef("bronze", "customers"))

    def dictionary(c: str) -> bool:
        return any("DICTIONARY" in e for e in cols[c].encodings)

    assert not cols["customer_id"].is_stats_set and not dictionary("customer_id")
    assert "DELTA_LENGTH_BYTE_ARRAY" in cols["customer_id"].encodings
    assert not cols["sex"].is_stats_set and not dictionary("sex")  # sealed in place
    assert "DELTA_LENGTH_BYTE_ARRAY" in cols["sex"].encodings
    assert "DELTA_BINARY_PACKED" in cols["_row"].encodings
    assert cols["income"].is_stats_set and cols["region"].is_stats_set and dictionary("region")
    assert {c.compression for c in cols.values()} == {"ZSTD"}
    vault = columns(TableRef("vault", "customers"))
    assert {c.compression for c in vault.values()} == {"UNCOMPRESSED"}
    assert all("DELTA_LENGTH_BYTE_ARRAY" in vault[c].encodings for c in ("customer_id", "name", "email", "phone"))
    rows = table(workspace, "vault").sort_by("_row")
    emails = workspace.keyring.open_arrow(rows["email"], rows["customer_id"], dataset="customers", column="email")
    assert emails.to_pylist() == [p["email"].encode() for p in people]
    bronze = table(workspace, "bronze").sort_by("_row")
    sexes = workspace.keyring.open_arrow(bronze["sex"], bronze["customer_id"], dataset="customers", column="sex")
    assert sexes.to_pylist() == [p["sex"].encode() for p in people]

    from lakehouse.synth import generate

    res = generate(tmp_path / "landing", people=50, transactions_per_person=40, seed=3)
    run(workspace, res.files["customers"])
    run(workspace, res.files["transactions"], dataset="transactions")
    tx = Catalog(workspace.config).open(TableRef("bronze", "transactions"))
    meta = pq.ParquetFile(tx.file_uris()[0].removeprefix("file://")).metadata
    cols = {meta.row_group(0).column(j).path_in_schema: meta.row_group(0).column(j) for j in range(meta.num_columns)}
    assert cols["transaction_id"].is_stats_set and not dictionary("transaction_id")  # unique
    assert not cols["customer_id"].is_stats_set and dictionary("customer_id")  # 40 rows a subject
