"""lakehouse.synth: deterministic, bounded-memory synthetic customers and transactions."""

from __future__ import annotations

import doctest
import hashlib
import json
import re
from datetime import date, datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lakehouse import synth
from lakehouse.synth import (
    BAD_ROW_KINDS,
    CHANNELS,
    CUSTOMERS_SCHEMA,
    EMAIL_DOMAINS,
    ETHNICITIES,
    MAX_NAME_LENGTH,
    MERCHANT_CATEGORIES,
    REGIONS,
    SEXES,
    TRANSACTIONS_SCHEMA,
    SynthOptions,
    generate,
    iter_customers,
    iter_transactions,
    read_landing,
)

EMAIL = re.compile(r"[a-z0-9._]+@example\.(org|com|net)")
PHONE = re.compile(r"\+1 [2-9]\d\d-555-01\d\d")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes(result: synth.SynthResult) -> dict[str, str]:
    return {name: sha256(path) for name, path in result.files.items()}


def table(batches) -> pa.Table:
    return pa.Table.from_batches(list(batches))


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> synth.SynthResult:
    return generate(tmp_path_factory.mktemp("small"), people=2_000, transactions_per_person=5, seed=11)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_another_seed_different(tmp_path: Path):
    args = dict(people=700, transactions_per_person=4, seed=3, bad_rows=0.05)
    first = hashes(generate(tmp_path / "a", **args))
    assert hashes(generate(tmp_path / "b", **args)) == first
    other = hashes(generate(tmp_path / "c", **{**args, "seed": 4}))
    assert other["customers"] != first["customers"]
    assert other["transactions"] != first["transactions"]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_other_formats_are_deterministic_too(tmp_path: Path, fmt: str):
    a = generate(tmp_path / "a", people=300, transactions_per_person=3, seed=1, fmt=fmt)
    b = generate(tmp_path / "b", people=300, transactions_per_person=3, seed=1, fmt=fmt)
    assert hashes(a) == hashes(b)


def test_chunk_rows_changes_batching_not_bytes(tmp_path: Path):
    args = dict(people=900, transactions_per_person=4, seed=2, bad_rows=0.02)
    assert hashes(generate(tmp_path / "a", **args)) == hashes(generate(tmp_path / "b", chunk_rows=97, **args))


def test_a_smaller_dataset_is_a_prefix_of_a_larger_one():
    few = table(iter_customers(people=50, seed=8))
    many = table(iter_customers(people=9_000, seed=8))  # crosses a block boundary
    assert few.equals(many.slice(0, 50))
    tx_few = table(iter_transactions(people=50, transactions_per_person=3, seed=8))
    tx_many = table(iter_transactions(people=9_000, transactions_per_person=3, seed=8))
    assert tx_few.equals(tx_many.slice(0, tx_few.num_rows))


def test_bias_moves_only_income_and_the_label():
    fair = table(iter_customers(people=1_000, seed=5, bias=0.0))
    biased = table(iter_customers(people=1_000, seed=5, bias=0.8))
    same = [c for c in CUSTOMERS_SCHEMA.names if c not in ("income", "defaulted")]
    assert fair.select(same).equals(biased.select(same))
    assert not fair.column("defaulted").equals(biased.column("defaulted"))


def test_iterators_stream_what_generate_writes(small: synth.SynthResult):
    customers = table(iter_customers(people=2_000, seed=11, chunk_rows=300))
    transactions = table(iter_transactions(people=2_000, transactions_per_person=5, seed=11, chunk_rows=1_000))
    assert customers.equals(read_landing(small.files["customers"]))
    assert transactions.equals(read_landing(small.files["transactions"]))


def test_iterators_yield_batches_of_chunk_rows():
    sizes = [b.num_rows for b in iter_customers(people=1_000, chunk_rows=300)]
    assert sizes == [300, 300, 300, 100]
    assert all(isinstance(b, pa.RecordBatch) for b in iter_transactions(people=10, chunk_rows=7))


# ----------------------------------------------------------------------------- shape and content


def test_files_rows_and_schemas(small: synth.SynthResult):
    assert {n: p.name for n, p in small.files.items()} == {
        "customers": "customers.csv",
        "transactions": "transactions.csv",
    }
    customers = read_landing(small.files["customers"])
    transactions = read_landing(small.files["transactions"])
    assert customers.schema == CUSTOMERS_SCHEMA
    assert transactions.schema == TRANSACTIONS_SCHEMA
    assert small.rows == {"customers": 2_000, "transactions": transactions.num_rows}
    assert small.bad_rows == {}
    assert 8_000 < transactions.num_rows < 12_000  # around people * transactions_per_person
    header = small.files["customers"].read_text().splitlines()[0]
    assert header == ",".join(f'"{c}"' for c in CUSTOMERS_SCHEMA.names)
    assert sorted(p.name for p in small.files["customers"].parent.iterdir()) == ["customers.csv", "transactions.csv"]


def test_parquet_files_carry_the_exact_schema(tmp_path: Path):
    result = generate(tmp_path, people=50, seed=1, fmt="parquet")
    assert pq.read_schema(result.files["customers"]).remove_metadata() == CUSTOMERS_SCHEMA
    assert pq.read_schema(result.files["transactions"]).remove_metadata() == TRANSACTIONS_SCHEMA


def test_customer_values(small: synth.SynthResult):
    rows = read_landing(small.files["customers"]).to_pylist()
    ids = [r["customer_id"] for r in rows]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"C-\d{9}", i) for i in ids)
    assert all(EMAIL.fullmatch(r["email"]) for r in rows)
    assert {r["email"].split("@")[1] for r in rows} == set(EMAIL_DOMAINS)
    assert all(PHONE.fullmatch(r["phone"]) for r in rows)
    assert all(re.fullmatch(r"\d{5}", r["zip_code"]) for r in rows)
    assert all(re.fullmatch(r"[A-Z][A-Za-z]* [A-Z][A-Za-z]*", r["name"]) for r in rows)
    jan1 = date(2024, 1, 1)
    ages = [(jan1 - r["birth_date"]).days / 365.25 for r in rows]
    assert min(ages) >= 18 and max(ages) < 91
    assert {r["sex"] for r in rows} == set(SEXES)
    assert {r["ethnicity"] for r in rows} == set(ETHNICITIES)
    assert {r["region"] for r in rows} == set(REGIONS)
    assert all(r["income"] > 0 for r in rows)
    share = {v: sum(r["region"] == v for r in rows) / len(rows) for v in REGIONS}
    assert 0.005 < share["restricted"] < 0.04
    eth = [sum(r["ethnicity"] == g for r in rows) for g in ETHNICITIES]
    assert eth == sorted(eth, reverse=True) and eth[0] > 3 * eth[-1]  # unequal group sizes
    assert sum(r["sex"] == "X" for r in rows) < 0.05 * len(rows)


def test_transaction_values(small: synth.SynthResult):
    tx = read_landing(small.files["transactions"])
    ids = tx.column("transaction_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"T-\d{12}", i) for i in ids)
    customers = set(read_landing(small.files["customers"]).column("customer_id").to_pylist())
    assert set(tx.column("customer_id").to_pylist()) <= customers
    lo, hi = pc.min_max(tx.column("ts")).values()
    assert datetime(2024, 1, 1, tzinfo=timezone.utc) <= lo.as_py()
    assert hi.as_py() < datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert pc.min(tx.column("amount")).as_py() > 0
    assert pc.max(tx.column("amount")).as_py() > 20 * pc.approximate_median(tx.column("amount")).as_py()
    assert set(tx.column("merchant_category").to_pylist()) == set(MERCHANT_CATEGORIES)
    assert len(MERCHANT_CATEGORIES) == 12
    assert set(tx.column("channel").to_pylist()) == set(CHANNELS)
    line = small.files["transactions"].read_text().splitlines()[1]
    assert re.fullmatch(r'"T-\d{12}","C-\d{9}","2024-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z",[\d.]+,"\w+","\w+"', line)


def test_transactions_follow_the_configured_year():
    tx = table(iter_transactions(people=20, seed=1, year=2019))
    assert {t.year for t in tx.column("ts").to_pylist()} == {2019}


def test_overlong_names_are_always_over_the_limit():
    rows = table(iter_customers(people=8_000, seed=3, bad_rows=0.2)).to_pylist()
    found = find_bad_rows(rows)
    assert found["overlong_name"] > 150
    assert min(len(r["name"]) for r in rows if len(r["name"]) > 64) > MAX_NAME_LENGTH


def test_no_transactions_is_allowed(tmp_path: Path):
    result = generate(tmp_path, people=3, transactions_per_person=0)
    assert result.rows == {"customers": 3, "transactions": 0}
    assert read_landing(result.files["transactions"]).num_rows == 0


# ----------------------------------------------------------------------------- bias


def default_rates(customers: pa.Table, column: str) -> dict[str, float]:
    stats = customers.group_by(column).aggregate([("defaulted", "mean")]).to_pylist()
    return {s[column]: s["defaulted_mean"] for s in stats}


def gap(rates: dict[str, float]) -> float:
    return max(rates.values()) - min(rates.values())


def test_bias_controls_the_default_rate_gap_between_groups():
    fair = table(iter_customers(people=20_000, seed=0, bias=0.0))
    biased = table(iter_customers(people=20_000, seed=0, bias=0.8))
    assert gap(default_rates(fair, "ethnicity")) < 0.05
    rates = default_rates(biased, "ethnicity")
    assert gap(rates) > 0.2
    assert min(rates["group_e"], rates["group_f"]) > max(rates[g] for g in ("group_a", "group_b", "group_c", "group_d"))
    fair_sex, biased_sex = default_rates(fair, "sex"), default_rates(biased, "sex")
    assert abs(fair_sex["F"] - fair_sex["M"]) < 0.02
    assert biased_sex["F"] - biased_sex["M"] > 0.04
    assert 0.05 < pc.mean(fair.column("defaulted").cast(pa.float64())).as_py() < 0.25


def test_lower_income_defaults_more():
    customers = table(iter_customers(people=20_000, seed=0, bias=0.0))
    median = pc.approximate_median(customers.column("income")).as_py()
    low = customers.filter(pc.less(customers.column("income"), median))
    high = customers.filter(pc.greater_equal(customers.column("income"), median))
    rate = lambda t: pc.mean(t.column("defaulted").cast(pa.float64())).as_py()  # noqa: E731
    assert rate(low) > 1.5 * rate(high)


# ----------------------------------------------------------------------------- bad rows


def find_bad_rows(rows: list[dict], year: int = 2024) -> dict[str, int]:
    """What a validator would find; every injected row has exactly one defect."""
    found = dict.fromkeys(BAD_ROW_KINDS, 0)
    seen: set[str] = set()
    for r in rows:
        defects = []
        if r["customer_id"] == "":
            defects.append("empty_customer_id")
        elif r["customer_id"] in seen:
            defects.append("duplicate_customer_id")
        seen.add(r["customer_id"])
        if not EMAIL.fullmatch(r["email"]):
            defects.append("invalid_email")
        if r["income"] < 0:
            defects.append("negative_income")
        if r["birth_date"] > date(year, 1, 1):
            defects.append("future_birth_date")
        if r["region"] not in REGIONS:
            defects.append("unknown_region")
        if len(r["name"]) > MAX_NAME_LENGTH:
            defects.append("overlong_name")
        assert len(defects) <= 1, (r, defects)
        for d in defects:
            found[d] += 1
    return found


def test_bad_rows_are_counted_exactly(tmp_path: Path):
    result = generate(tmp_path, people=3_000, transactions_per_person=1, seed=9, bad_rows=0.05)
    rows = read_landing(result.files["customers"]).to_pylist()
    assert set(result.bad_rows) == set(BAD_ROW_KINDS)
    assert all(n > 0 for n in result.bad_rows.values())
    assert 100 < sum(result.bad_rows.values()) < 200
    assert result.rows["customers"] == len(rows) == 3_000 + sum(result.bad_rows.values())
    assert find_bad_rows(rows) == result.bad_rows


def test_bad_rows_leave_good_rows_and_transactions_alone(tmp_path: Path):
    clean = generate(tmp_path / "clean", people=500, transactions_per_person=2, seed=4)
    dirty = generate(tmp_path / "dirty", people=500, transactions_per_person=2, seed=4, bad_rows=0.1)
    assert sha256(clean.files["transactions"]) == sha256(dirty.files["transactions"])
    good = [tuple(r.values()) for r in read_landing(clean.files["customers"]).to_pylist()]
    rest = iter(tuple(r.values()) for r in read_landing(dirty.files["customers"]).to_pylist())
    assert all(any(row == other for other in rest) for row in good)  # good rows, in order


def test_bad_rows_are_spread_through_the_file(tmp_path: Path):
    result = generate(tmp_path, people=2_000, transactions_per_person=0, seed=2, bad_rows=0.05)
    rows = read_landing(result.files["customers"]).to_pylist()
    flagged = [i for i, r in enumerate(rows) if r["customer_id"] == "" or r["income"] < 0]
    assert flagged[0] < len(rows) // 3 and flagged[-1] > 2 * len(rows) // 3


# ----------------------------------------------------------------------------- formats


def test_parquet_and_jsonl_hold_the_same_values_as_csv(tmp_path: Path):
    args = dict(people=400, transactions_per_person=3, seed=6, bad_rows=0.05)
    results = {fmt: generate(tmp_path / fmt, fmt=fmt, **args) for fmt in ("csv", "parquet", "jsonl")}
    for dataset in ("customers", "transactions"):
        expected = read_landing(results["csv"].files[dataset])
        for fmt in ("parquet", "jsonl"):
            assert results[fmt].files[dataset].suffix == f".{fmt}"
            assert read_landing(results[fmt].files[dataset]).equals(expected), (fmt, dataset)
    first = json.loads(results["jsonl"].files["transactions"].read_text().splitlines()[0])
    assert list(first) == TRANSACTIONS_SCHEMA.names
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", first["ts"])


def test_jsonl_escapes_strings(tmp_path: Path):
    schema = pa.schema([("s", pa.string()), ("x", pa.float64())])
    values = ["plain", 'a "quote"', "back\\slash", "new\nline", "tab\tand é"]
    writer = synth._open_writer("jsonl", tmp_path / "t.jsonl", schema, 2)
    writer.write(pa.table({"s": values, "x": [1.5, -2.0, 0.1, 1e20, 3.0]}, schema=schema))
    assert writer.close() == 5
    lines = (tmp_path / "t.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["s"] for line in lines] == values
    assert [json.loads(line)["x"] for line in lines] == [1.5, -2.0, 0.1, 1e20, 3.0]


# ----------------------------------------------------------------------------- the call


def test_existing_files_are_not_overwritten_unless_asked(tmp_path: Path):
    first = generate(tmp_path, people=5, seed=1)
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        generate(tmp_path, people=5, seed=2)
    assert hashes(generate(tmp_path, people=5, seed=1, overwrite=True)) == hashes(first)


def test_progress_reports_people_done_per_dataset(tmp_path: Path):
    calls: list[tuple[str, int, int]] = []
    generate(tmp_path, people=10_000, transactions_per_person=1, progress=lambda *a: calls.append(a))
    assert calls == [
        ("customers", 8_192, 10_000),
        ("transactions", 8_192, 10_000),
        ("customers", 10_000, 10_000),
        ("transactions", 10_000, 10_000),
    ]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("people", 0, "people must be between 1 and 100,000,000; got 0"),
        ("people", 2.5, "people must be an integer; got 2.5"),
        ("people", True, "people must be an integer; got True"),
        ("bias", 1.5, "bias must be in [0, 1]; got 1.5"),
        ("bias", -0.1, "bias must be in [0, 1]; got -0.1"),
        ("bias", float("nan"), "bias must be in [0, 1]; got nan"),
        ("bad_rows", 0.6, "bad_rows must be in [0, 0.5]; got 0.6"),
        ("transactions_per_person", -1, "transactions_per_person must be a finite number >= 0; got -1"),
        ("seed", -1, "seed must be at least 0; got -1"),
        ("chunk_rows", 0, "chunk_rows must be at least 1; got 0"),
        ("fmt", "xml", "fmt must be one of 'csv', 'parquet', 'jsonl'; got 'xml'"),
        ("year", 1999, "year must be between 2000 and 2099; got 1999"),
    ],
)
def test_invalid_arguments_raise_clear_value_errors(tmp_path: Path, option: str, value, message: str):
    kwargs = {"people": 10, option: value}
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        generate(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())  # nothing written


def test_iterators_validate_too():
    with pytest.raises(ValueError, match=r"bias must be in \[0, 1\]"):
        iter_customers(people=10, bias=2)
    with pytest.raises(ValueError, match="people must be between"):
        iter_transactions(people=0)


def test_too_many_transactions_are_refused():
    with pytest.raises(ValueError, match="transaction ids have 12 digits"):
        SynthOptions(people=100_000_000, transactions_per_person=2_000)


def test_read_landing_refuses_unknown_files(tmp_path: Path):
    with pytest.raises(ValueError, match="expected customers.<ext> or transactions.<ext>"):
        read_landing(tmp_path / "orders.csv")


def test_module_example_runs():
    failures, tried = doctest.testmod(synth)
    assert tried > 0 and failures == 0
