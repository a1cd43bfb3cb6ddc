"""Embedded SQL: masks (run in DuckDB, Trino text checked), query checks, policy views, audit, output."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import doctest
import hashlib
import hmac
import io
import json
import warnings

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import write_deltalake
from rich.console import Console

import lakehouse.masks as masks_mod
import lakehouse.sql as sql_mod
from governance.errors import AccessDenied
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import TableError
from governance.keys.native import keyed_hashes
from lakehouse.masks import MaskWarning, compile_mask, hash_column, mask_sql, quote_ident, sql_type
from lakehouse.silver import MASK_HASH_KEY, hashed_columns
from lakehouse.sql import QueryResult, SqlError, run_query
from lakewarden.commands.sqlout import write_result


def token(i: int) -> str:
    return "sub_" + base64.b32encode(hashlib.sha256(str(i).encode()).digest()).decode().lower()[:26]


def sha(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


T = [token(i) for i in range(6)]
CUSTOMERS = pa.table(
    {
        "customer_id": pa.array(T, pa.string()),
        "birth_date": pa.array([1980, 1975, 1990, 2001, None, 1966], pa.int32()),
        "zip_code": pa.array(["941", "100", "606", "021", "303", None], pa.string()),
        "sex": pa.array([b"\x01ct-a", b"\x01ct-b", b"\x01ct-c", None, b"\x01ct-e", b"\x01ct-f"], pa.binary()),
        "ethnicity": pa.array([b"\x02ct-a", None, b"\x02ct-c", b"\x02ct-d", b"\x02ct-e", b"\x02ct-f"], pa.binary()),
        "income": pa.array([12345.0, 56789.5, 99999.0, None, 10000.0, 9999.99], pa.float64()),
        "region": pa.array(["north", "south", "restricted", "north", "restricted", "east"], pa.string()),
        "defaulted": pa.array([False, True, False, None, True, False], pa.bool_()),
    }
)
VISIBLE_TO_ANA = ["customer_id", "birth_date", "zip_code", "income", "region", "defaulted"]
KEPT = [0, 1, 3, 5]  # rows whose region is not 'restricted'

TRANSACTIONS_POLICY = """\
kind: dataset
dataset: transactions
subject_key: customer_id
columns:
  customer_id: {class: subject_key, type: string}
  amount:      {class: public, type: double}
  merchant:    {class: public, type: string}
  channel:     {class: public, type: string}
purposes:
  analytics: {description: Aggregate reporting.}
access:
  analyst:
    layers: [silver]
    masks: {customer_id: hash, channel: year}   # 'year' does not fit a string column: NULL, flagged
    purposes: [analytics]
  data_scientist:
    layers: [silver]
"""
TRANSACTIONS = pa.table(
    {
        "customer_id": pa.array([T[0], T[0], T[1], T[2], T[5]], pa.string()),
        "amount": pa.array([10.0, 5.5, 100.0, 7.0, 1.25], pa.float64()),
        "merchant": pa.array(["m1", "m2", "m1", "m3", "m2"], pa.string()),
        "channel": pa.array(["web", "shop", "web", None, "web"], pa.string()),
    }
)


def mh(ws, value: str) -> str:
    """The ``hash`` mask's value: HMAC-SHA256 under the workspace's mask key, 128 bits in hex."""
    return hmac.new(ws.keyring.system_key(MASK_HASH_KEY), value.encode(), hashlib.sha256).hexdigest()[:32]


def put(ws, layer: str, dataset: str, table: pa.Table, mode: str = "error") -> None:
    """Write a table as silver does: with the keyed hash of every column a role sees hashed."""
    if layer == "silver":
        for c in hashed_columns(ws.policies, dataset):
            if c in table.column_names and hash_column(c) not in table.column_names:
                table = table.append_column(hash_column(c), keyed_hashes(ws.keyring.system_key(MASK_HASH_KEY), table[c]))
    extra = {"schema_mode": "overwrite"} if mode == "overwrite" else {}
    write_deltalake(Catalog(ws.config).uri(TableRef(layer, dataset)), table, mode=mode, **extra)


@pytest.fixture
def ws(project, workspace):
    """The test workspace with a transactions policy and silver customers + transactions tables."""
    (project / "policies" / "transactions.yaml").write_text(TRANSACTIONS_POLICY)  # before policies load
    put(workspace, "silver", "customers", CUSTOMERS)
    put(workspace, "silver", "transactions", TRANSACTIONS)
    return workspace


def ana(ws):
    return ws.actor("ana")


def sam(ws):
    return ws.actor("sam")


def events(ws, action: str | None = None) -> list[dict]:
    ws.audit.flush()
    return ws.audit.query(action=action).to_pylist()


# -- masks: DuckDB for real ---------------------------------------------------------------
def duck_eval(mask: str, typ: pa.DataType, values: list) -> tuple[list, pa.DataType]:
    con = duckdb.connect()
    try:
        con.register("t", pa.table({"c": pa.array(values, typ)}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MaskWarning)
            expr = mask_sql(mask, quote_ident("c", "duckdb"), typ, dialect="duckdb")
        out = con.sql(f"SELECT {expr} AS m, typeof(c) AS tc, typeof({expr}) AS tm FROM t").to_arrow_table()
        assert set(out.column("tc").to_pylist()) == set(out.column("tm").to_pylist()), expr  # same type
        return out.column("m").to_pylist(), out.schema.field("m").type
    finally:
        con.close()


DUCK_CASES = [
    ("null", pa.string(), ["a", None], [None, None]),
    ("redact", pa.string(), ["secret", "", None], ["****", "****", None]),
    ("partial:4", pa.string(), ["4111111111111111", "abcd", "héllo wörld", None], ["****1111", "****", "****örld", None]),
    ("prefix:3", pa.string(), ["94107", "9", None], ["941", "9", None]),
    ("prefix:2", pa.large_string(), ["abcdef", None], ["ab", None]),
    ("bucket:10000", pa.float64(), [12345.0, 9999.99, -1.0, None], [10000.0, 0.0, -10000.0, None]),
    ("bucket:0.5", pa.float64(), [1.3, -0.2, None], [1.0, -0.5, None]),
    ("bucket:10", pa.float32(), [12.5, None], [10.0, None]),
    ("bucket:10000", pa.int32(), [12345, -1, 0, -10000, None], [10000, -10000, 0, -10000, None]),
    ("bucket:100", pa.int8(), [127, -5, -100, -101, None], [100, -100, -100, None, None]),  # -200 does not fit int8
    ("bucket:1000", pa.int64(), [2**62 + 1234, -1, None], [(2**62 + 1234) // 1000 * 1000, -1000, None]),
    ("bucket:10", pa.decimal128(10, 2), [decimal.Decimal("123.45"), decimal.Decimal("-0.01"), None],
     [decimal.Decimal("120.00"), decimal.Decimal("-10.00"), None]),
    ("year", pa.date32(), [dt.date(2020, 5, 3), None], [dt.date(2020, 1, 1), None]),
    ("year", pa.timestamp("us"), [dt.datetime(2020, 5, 3, 4, 5), None], [dt.datetime(2020, 1, 1), None]),
    ("year", pa.timestamp("ns"), [dt.datetime(2021, 12, 31, 23, 59), None], [dt.datetime(2021, 1, 1), None]),
    ("year", pa.timestamp("us", tz="UTC"), [dt.datetime(2020, 1, 1, 0, 30, tzinfo=dt.timezone.utc), None],
     [dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc), None]),
    ("null", pa.binary(), [b"\x00ct", None], [None, None]),
    ("null", pa.bool_(), [True, None], [None, None]),
    ("null", pa.int64(), [1, None], [None, None]),
    ("null", pa.date32(), [dt.date(2020, 1, 1)], [None]),
    ("null", pa.list_(pa.int32()), [[1], None], [None, None]),
]


@pytest.mark.parametrize("mask,typ,values,expected", DUCK_CASES, ids=[f"{c[0]}-{c[1]}" for c in DUCK_CASES])
def test_masks_in_duckdb(mask, typ, values, expected):
    got, out_type = duck_eval(mask, typ, values)
    if pa.types.is_timestamp(typ) and typ.tz:
        got = [None if v is None else v.astimezone(dt.timezone.utc) for v in got]
    assert got == expected


MISFITS = [
    ("year", pa.int32()),  # silver's birth_date is already the year: a date mask does not fit it
    ("hash", pa.binary()),
    ("redact", pa.float64()),
    ("partial:4", pa.int64()),
    ("bucket:10", pa.string()),
    ("year", pa.string()),
    ("bucket:10", pa.date32()),
    ("redact", pa.bool_()),
    ("hash", pa.string()),  # a table without the keyed hash silver computes
    ("bucket:2.5", pa.int32()),
    ("bucket:1000", pa.int8()),
]


@pytest.mark.parametrize("mask,typ", MISFITS, ids=[f"{m}-{t}" for m, t in MISFITS])
def test_a_mask_that_does_not_fit_fails_closed(mask, typ):
    cm = compile_mask(mask, '"c"', typ, dialect="duckdb")
    assert not cm.fits and "NULL shown instead" in cm.reason and mask.split(":")[0] in cm.reason
    assert cm.sql == f"CAST(NULL AS {sql_type(typ, 'duckdb')})"
    with pytest.warns(MaskWarning, match="NULL shown instead"):
        mask_sql(mask, '"c"', typ, dialect="trino")
    sample = {pa.int32(): [1980], pa.binary(): [b"x"], pa.float64(): [1.5], pa.int64(): [7], pa.string(): ["x"],
              pa.date32(): [dt.date(2020, 1, 1)], pa.bool_(): [True], pa.int8(): [5]}[typ]
    assert duck_eval(mask, typ, sample)[0] == [None]


@pytest.mark.parametrize("bad", ["shuffle", "partial", "partial:0", "bucket:-5", "hash:3", "partial:2.5", ""])
def test_malformed_masks_are_caller_errors(bad):
    with pytest.raises(ValueError):
        compile_mask(bad, '"c"', pa.string(), dialect="duckdb")


def test_unknown_dialect_is_a_caller_error():
    with pytest.raises(ValueError, match="dialect"):
        mask_sql("hash", '"c"', pa.string(), dialect="postgres")  # type: ignore[arg-type]


# -- masks: Trino text --------------------------------------------------------------------
TRINO = [
    ("null", pa.string(), "CAST(NULL AS varchar)"),
    ("null", pa.binary(), "CAST(NULL AS varbinary)"),
    ("null", pa.bool_(), "CAST(NULL AS boolean)"),
    ("null", pa.timestamp("us", tz="UTC"), "CAST(NULL AS timestamp(3) with time zone)"),
    ("redact", pa.string(), """CASE WHEN "c" IS NULL THEN NULL ELSE CAST('****' AS varchar) END"""),
    ("hash", pa.string(), "CAST(NULL AS varchar)"),  # no precomputed keyed hash: fails closed
    ("partial:4", pa.string(),
     """CASE WHEN "c" IS NULL THEN NULL WHEN length("c") > 4 THEN '****' || substr("c", length("c") - 3) """
     """ELSE CAST('****' AS varchar) END"""),
    ("prefix:3", pa.string(), 'substr("c", 1, 3)'),
    ("bucket:10000", pa.float64(), 'CAST(floor("c" / 10000) * 10000 AS double)'),
    ("bucket:10000", pa.int32(),
     'CASE WHEN "c" < -2147480000 THEN NULL ELSE '
     'CAST(CAST("c" AS bigint) - (((CAST("c" AS bigint) % 10000) + 10000) % 10000) AS integer) END'),
    ("bucket:10", pa.decimal128(10, 2), 'CAST("c" - ((("c" % 10) + 10) % 10) AS decimal(10,2))'),
    ("year", pa.date32(), """date_trunc('year', "c")"""),
    ("year", pa.timestamp("us"), """date_trunc('year', "c")"""),
    ("year", pa.timestamp("us", tz="UTC"), """date_trunc('year', "c" AT TIME ZONE 'UTC')"""),
    ("year", pa.int32(), "CAST(NULL AS integer)"),  # fails closed
]


@pytest.mark.parametrize("mask,typ,expected", TRINO, ids=[f"{m}-{t}" for m, t, _ in TRINO])
def test_trino_mask_sql(mask, typ, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MaskWarning)
        assert mask_sql(mask, '"c"', typ, dialect="trino") == expected


def test_every_mask_kind_compiles_for_both_dialects():
    from governance.policy import MaskKind

    kinds = {k.value for k in MaskKind}
    fits = {"null": pa.string(), "redact": pa.string(), "hash": pa.string(), "partial": pa.string(),
            "prefix": pa.string(), "year": pa.date32(), "bucket": pa.float64()}
    assert set(fits) == kinds  # a new kind in the vocabulary must be compiled here too
    for k, typ in fits.items():
        m = k if k in ("null", "redact", "hash", "year") else f"{k}:3"
        for d in ("duckdb", "trino"):
            assert compile_mask(m, '"c"', typ, dialect=d, hashed='"_hash_c"').fits


def test_the_hash_mask_swaps_in_the_precomputed_keyed_hash():
    for d in ("duckdb", "trino"):
        cm = compile_mask("hash", '"c"', pa.string(), dialect=d, hashed='"_hash_c"')
        assert cm.fits and cm.sql == '"_hash_c"'
    cm = compile_mask("hash", '"c"', pa.string(), dialect="duckdb")
    assert not cm.fits and "rebuild silver" in cm.reason
    # the native core and the pure-Python fallback agree with hmac, nulls kept, slices too
    key = bytes(range(32))
    vals = pa.array([T[0], None, "é", " spaced ", ""] * 3).slice(2, 11)
    expected = [None if v is None else hmac.new(key, v.encode(), hashlib.sha256).hexdigest()[:32] for v in vals.to_pylist()]
    from governance.keys import native

    backends = ["python"] + (["native"] if native.backend() == "native" else [])
    for force in backends:
        got = keyed_hashes(key, vals, force=force)
        got.validate(full=True)
        assert got.to_pylist() == expected, force


def test_quote_ident_and_expressions():
    assert quote_ident("income", "duckdb") == '"income"'
    assert quote_ident('we"ird', "trino") == '"we""ird"'
    with pytest.raises(ValueError):
        quote_ident("", "duckdb")
    # a non-identifier column expression is parenthesized before it is masked
    assert mask_sql("bucket:10", "a + b", pa.float64(), dialect="duckdb") == "CAST(floor((a + b) / 10) * 10 AS DOUBLE)"


def test_masks_module_examples_run():
    assert doctest.testmod(masks_mod, optionflags=doctest.ELLIPSIS).failed == 0


# -- what each role sees ------------------------------------------------------------------
def test_analyst_sees_only_policy_columns_masked_and_filtered(ws):
    res = run_query(ws, ana(ws), "SELECT * FROM customers")
    assert isinstance(res, QueryResult)
    assert res.table.column_names == VISIBLE_TO_ANA
    assert res.tables == ("silver.customers",)
    # the analyst's masks in policies/customers.yaml (a known answer: a policy change shows up here)
    assert res.masked == {"silver.customers": {"customer_id": "hash", "income": "bucket:10000"}}
    assert res.row_filters == {"silver.customers": "region <> 'restricted'"}
    rows = sorted(res.table.to_pylist(), key=lambda r: r["customer_id"])
    kept = sorted((CUSTOMERS.slice(i, 1).to_pylist()[0] for i in KEPT), key=lambda r: mh(ws, r["customer_id"]))
    assert [r["customer_id"] for r in rows] == [mh(ws, r["customer_id"]) for r in kept]
    assert [r["income"] for r in rows] == [None if r["income"] is None else (r["income"] // 10000) * 10000 for r in kept]
    for c in ("birth_date", "zip_code", "region", "defaulted"):  # unmasked (silver already generalized them)
        assert [r[c] for r in rows] == [r[c] for r in kept]
    assert all(r["region"] != "restricted" for r in rows) and len(rows) == len(KEPT)
    assert res.warnings == ()
    assert res.table.schema.field("customer_id").type == pa.string()  # masks keep the column's type
    assert res.table.schema.field("income").type == pa.float64()


def test_a_mask_that_does_not_fit_shows_null_and_is_reported(ws):
    res = run_query(ws, ana(ws), "SELECT merchant, channel FROM transactions")
    assert res.table.column("channel").null_count == res.table.num_rows == TRANSACTIONS.num_rows
    assert res.table.schema.field("channel").type == pa.string()
    assert len(res.warnings) == 1 and res.warnings[0].startswith("silver.transactions.channel: mask 'year'")
    d = json.loads(events(ws, "sql.query")[-1]["details"])
    assert d["mask_fallbacks"] == list(res.warnings)


def test_derived_and_unclassified_columns(ws):
    """Silver adds derived features (income_z, income_log): visible where the role sees '*', never else.
    A column no policy names is never shown."""
    extra = CUSTOMERS.append_column("income_z", pa.array([0.1] * 6)).append_column("income_log", pa.array([9.0] * 6))
    extra = extra.append_column("_unclassified", pa.array(["x"] * 6))
    put(ws, "silver", "customers", extra, mode="overwrite")
    assert run_query(ws, ana(ws), "SELECT * FROM customers").table.column_names == VISIBLE_TO_ANA
    derived = ws.policies.datasets["customers"].derived_columns()
    assert run_query(ws, sam(ws), "SELECT * FROM customers").table.column_names == CUSTOMERS.column_names + [
        c for c in ("income_z", "income_log") if c in derived]
    with pytest.raises(SqlError, match="hidden"):
        run_query(ws, sam(ws), "SELECT _unclassified FROM customers")


def test_analyst_cannot_select_a_hidden_column(ws):
    with pytest.raises(SqlError) as ei:
        run_query(ws, ana(ws), "SELECT customer_id, sex FROM customers")
    msg = str(ei.value)
    assert "sex" in msg and "hidden" in msg and "policy" in msg and "analyst" in msg
    assert "\n" not in msg and ei.value.exit_code == 2
    with pytest.raises(SqlError, match="may also be hidden by your role's policy"):
        run_query(ws, ana(ws), "SELECT no_such_column FROM customers")
    with pytest.raises(SqlError, match="column sex of silver.customers is hidden from role analyst"):
        run_query(ws, ana(ws), "SELECT count(*) FROM customers c JOIN transactions t USING (customer_id) WHERE c.sex IS NULL")


def test_data_scientist_sees_all_columns_with_default_masks(ws):
    res = run_query(ws, sam(ws), "SELECT * FROM silver.customers")
    assert res.table.column_names == CUSTOMERS.column_names
    assert res.table.num_rows == CUSTOMERS.num_rows  # no row filter for data scientists
    assert res.masked == {"silver.customers": {"sex": "null", "ethnicity": "null"}}  # sensitive: NULL
    assert res.row_filters == {}
    got = res.table.sort_by("customer_id")
    want = CUSTOMERS.sort_by("customer_id")
    assert got.column("sex").null_count == got.num_rows and got.column("ethnicity").null_count == got.num_rows
    assert got.schema.field("sex").type == pa.binary()
    for c in ("customer_id", "birth_date", "zip_code", "income", "region", "defaulted"):
        assert got.column(c).to_pylist() == want.column(c).to_pylist()


def test_identifier_columns_are_redacted_by_default(ws):
    with_email = CUSTOMERS.append_column("email", pa.array(["a@example.org", None, "c@example.org", "d@x.io", "e@x.io", "f@x.io"]))
    put(ws, "silver", "customers", with_email, mode="overwrite")
    res = run_query(ws, sam(ws), "SELECT email FROM customers")
    assert res.masked["silver.customers"]["email"] == "redact"
    assert sorted(res.table.column("email").to_pylist(), key=str) == sorted(["****"] * 5 + [None], key=str)
    assert "email" not in run_query(ws, ana(ws), "SELECT * FROM customers").table.column_names


def test_bronze_is_denied_for_an_analyst(ws):
    put(ws, "bronze", "customers", CUSTOMERS)
    with pytest.raises(AccessDenied) as ei:
        run_query(ws, ana(ws), "SELECT count(*) FROM bronze.customers")
    assert ei.value.decision.rule_ids == ("customers/access/analyst/layers",)
    assert ei.value.exit_code == 3
    ev = events(ws, "sql.query")[-1]
    assert ev["outcome"] == "error" and json.loads(ev["details"])["error"] == "AccessDenied"


def test_unknown_role_stage_is_denied(ws):
    with pytest.raises(AccessDenied, match="roles/stages/query"):
        run_query(ws, ws.actor("mel"), "SELECT 1 FROM customers")


# -- what a query may be ------------------------------------------------------------------
REFUSED = [
    ("INSERT INTO customers VALUES (1)", "INSERT"),
    ("DELETE FROM customers", "DELETE"),
    ("UPDATE customers SET income = 0", "UPDATE"),
    ("CREATE TABLE x AS SELECT * FROM customers", "CREATE"),
    ("DROP VIEW customers", "DROP"),
    ("ALTER TABLE customers ADD COLUMN x INT", "ALTER"),
    ("COPY customers TO '/tmp/out.csv'", "COPY"),
    ("COPY (SELECT * FROM customers) TO '/tmp/out.parquet' (FORMAT parquet)", "COPY"),
    ("ATTACH '/tmp/other.db' AS other", "ATTACH"),
    ("DETACH other", "DETACH"),
    ("PRAGMA version", "PRAGMA"),
    ("SET enable_external_access = true", "SET"),
    ("RESET threads", "RESET"),
    ("INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("CALL pragma_version()", "CALL"),
    ("EXPORT DATABASE '/tmp/x'", "EXPORT"),
    ("EXPLAIN SELECT * FROM customers", "EXPLAIN"),
    ("DESCRIBE SELECT * FROM customers", "DESCRIBE"),  # DESCRIBE of a table is answered (test_describe_*)
    ("SUMMARIZE customers", "SUMMARIZE"),
    ("SHOW TABLES", "SHOW"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("VACUUM", "VACUUM"),
    ("USE silver", "USE"),
    ("WITH x AS (SELECT 1) INSERT INTO customers SELECT * FROM x", "INSERT"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("PIVOT customers ON region USING count(*)", "PIVOT"),
    ("SELECT * INTO copy_of_customers FROM customers", None),  # DuckDB: a syntax error
]


@pytest.mark.parametrize("sql,kind", REFUSED, ids=[r[0][:30] for r in REFUSED])
def test_only_read_only_queries(ws, sql, kind):
    with pytest.raises(SqlError) as ei:
        run_query(ws, sam(ws), sql)
    msg = str(ei.value)
    assert "\n" not in msg and ei.value.exit_code == 2
    if kind is not None:
        assert msg.startswith(f"refused {kind}: only read-only queries are allowed")


@pytest.mark.parametrize("sql", ["SELECT 1; SELECT 2", "SELECT * FROM customers; DROP VIEW customers"])
def test_one_statement_only(ws, sql):
    with pytest.raises(SqlError, match="exactly one statement"):
        run_query(ws, sam(ws), sql)


@pytest.mark.parametrize("sql", ["", "   ", " ; ", "-- nothing\n"])
def test_empty_query(ws, sql):
    with pytest.raises(SqlError):
        run_query(ws, sam(ws), sql)


FROM_REFUSED = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM read_parquet('/tmp/x.parquet')",
    "SELECT * FROM read_json('/tmp/x.json')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM delta_scan('/tmp/lake/silver/customers')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM '/etc/passwd'",
    "SELECT * FROM 'data/*.parquet'",
    "FROM 'customers.csv'",
    "SELECT * FROM query_table('customers')",
    "SELECT * FROM query('SELECT 1')",
    "SELECT * FROM duckdb_views()",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM range(3)",
    "SELECT * FROM customers, unnest([1, 2])",
    "SELECT * FROM customers c, LATERAL read_csv('/etc/passwd')",
    "SELECT * FROM customers WHERE region IN (SELECT column0 FROM read_csv('/etc/passwd'))",
    "SELECT (SELECT count(*) FROM read_parquet('/tmp/x.parquet')) AS n",
    "WITH x AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM x",
    "SELECT * FROM customers AT (VERSION => 0)",
]


@pytest.mark.parametrize("sql", FROM_REFUSED)
def test_table_functions_and_file_paths_are_refused(ws, sql):
    with pytest.raises(SqlError) as ei:
        run_query(ws, sam(ws), sql)
    assert "\n" not in str(ei.value)


def test_the_table_uri_itself_is_refused(ws):
    uri = Catalog(ws.config).uri(TableRef("silver", "customers"))
    for sql in (f"SELECT * FROM '{uri}/*.parquet'", f"SELECT * FROM delta_scan('{uri}')", f'SELECT * FROM "{uri}"'):
        with pytest.raises(SqlError):
            run_query(ws, sam(ws), sql)


def test_engine_refuses_files_even_past_the_checks(ws, monkeypatch):
    """Defence in depth: with the checks switched off, DuckDB itself refuses files and settings."""
    monkeypatch.setattr(sql_mod, "_check", lambda con, sql, ws: [])
    for sql in ("SELECT * FROM read_csv('/etc/passwd')", "SELECT * FROM read_parquet('/tmp/nothing.parquet')",
                "SELECT * FROM '/etc/passwd'"):
        with pytest.raises(SqlError) as ei:
            run_query(ws, sam(ws), sql)
        assert "disabled by configuration" in str(ei.value) or "does not exist" in str(ei.value)
    with pytest.raises(SqlError, match="locked"):
        run_query(ws, sam(ws), "SET enable_external_access = true")


@pytest.mark.parametrize("sql", [
    "SELECT * FROM duckdb_views",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM pg_catalog.pg_views",
    "SELECT * FROM temp.main.customers",
    "SELECT * FROM memory.main.customers",
    "SELECT * FROM main.customers",
    "SELECT * FROM __lw_raw_0123456789abcdef0123456789abcdef",
    # a CTE named like the raw table, referenced outside its scope, is a table reference, not the CTE
    "SELECT * FROM (WITH __lw_raw_x AS (SELECT 1) SELECT * FROM __lw_raw_x) q, __lw_raw_x",
])
def test_internal_objects_are_unreachable(ws, sql):
    with pytest.raises(SqlError, match="unknown|not allowed|too many"):
        run_query(ws, sam(ws), sql)


def test_raw_names_are_random_and_never_in_the_query(monkeypatch):
    seq = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr(sql_mod.secrets, "token_hex", lambda n: next(seq))
    assert sql_mod._internal_name(f"select * from __lw_raw_{'a' * 32}") == f"__lw_raw_{'b' * 32}"


def test_the_view_definitions_are_not_readable(ws, monkeypatch):
    names: list[str] = []
    real = sql_mod._internal_name
    monkeypatch.setattr(sql_mod, "_internal_name", lambda s: names.append(real(s)) or names[-1])
    res = run_query(ws, ana(ws), "SELECT count(*) AS n FROM customers")
    assert res.table.column("n").to_pylist() == [len(KEPT)] and len(names) == 1
    with pytest.raises(SqlError):  # the one from the last query is gone, and would be refused anyway
        run_query(ws, ana(ws), f"SELECT * FROM {names[0]}")


# -- DESCRIBE: the role's view of a table ----------------------------------------------------
def test_describe_shows_the_analyst_only_visible_columns_and_marks_masks(ws):
    res = run_query(ws, ana(ws), "DESCRIBE customers")
    rows = {r["column_name"]: r for r in res.table.to_pylist()}
    assert list(rows) == VISIBLE_TO_ANA  # the view's columns, in its order
    for hidden in ("sex", "ethnicity", "name", "email"):
        assert hidden not in rows
    assert {c for c, r in rows.items() if r["masked"]} == {"customer_id", "income"}
    assert rows["customer_id"]["mask"] == "hash" and rows["income"]["mask"] == "bucket:10000"
    assert rows["region"]["mask"] is None and rows["region"]["class"] == "public"
    assert rows["customer_id"]["class"] == "subject_key"
    assert rows["income"]["column_type"] == "DOUBLE"  # the type the query returns (masks keep it)
    assert res.tables == ("silver.customers",) and res.row_filters == {"silver.customers": "region <> 'restricted'"}
    assert list(rows) == run_query(ws, ana(ws), "SELECT * FROM customers LIMIT 0").table.column_names


@pytest.mark.parametrize("sql", ["describe customers;", "DESC silver.customers", "SHOW COLUMNS FROM customers",
                                 'show columns in "silver"."customers"', "DESCRIBE  silver . customers"])
def test_describe_spellings(ws, sql):
    assert run_query(ws, ana(ws), sql).table.column("column_name").to_pylist()[:2] == ["customer_id", "birth_date"]


def test_describe_is_gated_and_audited_like_a_query(ws):
    with pytest.raises(AccessDenied, match="customers/access/analyst/layers"):
        run_query(ws, ana(ws), "DESCRIBE bronze.customers")
    with pytest.raises(SqlError, match="unknown table 'payroll'"):
        run_query(ws, ana(ws), "DESCRIBE payroll")
    res = run_query(ws, sam(ws), "DESCRIBE customers")  # the data scientist sees sensitive columns, as NULL
    rows = {r["column_name"]: r for r in res.table.to_pylist()}
    assert rows["sex"]["masked"] and rows["sex"]["mask"] == "null"
    evs = events(ws)
    q = [e for e in evs if e["action"] == "sql.query"]
    assert [e["outcome"] for e in q[-3:]] == ["error", "error", "ok"]
    assert json.loads(q[-1]["details"])["tables"] == ["silver.customers"]
    gate = [e for e in evs if e["action"] == "gate.decide" and e["resource"] == "table:bronze.customers"]
    assert gate and gate[-1]["outcome"] == "deny"


def test_unknown_tables_list_the_governed_datasets(ws):
    with pytest.raises(SqlError, match=r"unknown table 'payroll': governed datasets are customers, transactions"):
        run_query(ws, ana(ws), "SELECT * FROM payroll")
    with pytest.raises(SqlError, match="unknown layer 'gold'"):
        run_query(ws, ana(ws), "SELECT * FROM gold.customers")


def test_governed_but_missing_table(ws):
    with pytest.raises(TableError, match="does not exist"):
        run_query(ws, ws.actor("dana"), "SELECT * FROM quarantine.customers")


def test_names_are_case_insensitive_and_ctes_work(ws):
    res = run_query(ws, ana(ws), 'SELECT count(*) AS n FROM SILVER."Customers"')
    assert res.table.column("n").to_pylist() == [len(KEPT)]
    q = "WITH r AS (SELECT region FROM customers) SELECT region, count(*) AS n FROM r GROUP BY region ORDER BY region"
    assert run_query(ws, ana(ws), q).table.to_pylist() == [
        {"region": "east", "n": 1}, {"region": "north", "n": 2}, {"region": "south", "n": 1}]
    # a CTE may shadow a dataset's name: then no governed table is used
    res = run_query(ws, ana(ws), "WITH customers AS (SELECT 1 AS x) SELECT * FROM customers")
    assert res.tables == () and res.table.to_pylist() == [{"x": 1}]


def test_aggregation_and_join_across_governed_tables(ws):
    q = """
        SELECT c.region, count(*) AS n, sum(t.amount) AS total, max(c.income) AS top_bucket
        FROM silver.customers c JOIN transactions t ON t.customer_id = c.customer_id
        GROUP BY c.region ORDER BY c.region
    """
    res = run_query(ws, ana(ws), q)
    assert res.tables == ("silver.customers", "silver.transactions")
    assert res.masked["silver.transactions"] == {"customer_id": "hash", "channel": "year"}
    # T[2] is in the restricted region: its transaction disappears with the customer row
    assert res.table.to_pylist() == [
        {"region": "east", "n": 1, "total": 1.25, "top_bucket": 0.0},
        {"region": "north", "n": 2, "total": 15.5, "top_bucket": 10000.0},
        {"region": "south", "n": 1, "total": 100.0, "top_bucket": 50000.0},
    ]
    union = run_query(ws, ana(ws), "SELECT customer_id FROM customers UNION SELECT customer_id FROM transactions")
    assert union.table.num_rows == len(KEPT) + 1  # T[2] still appears once, from transactions (no filter there)


def test_time_travel_by_version(ws):
    put(ws, "silver", "customers", CUSTOMERS.slice(0, 2), mode="overwrite")  # version 1
    assert run_query(ws, sam(ws), "SELECT count(*) AS n FROM customers").table.column("n").to_pylist() == [2]
    old = run_query(ws, sam(ws), "SELECT count(*) AS n FROM customers", version=0)
    assert old.table.column("n").to_pylist() == [CUSTOMERS.num_rows]
    with pytest.raises(TableError):
        run_query(ws, sam(ws), "SELECT count(*) FROM customers", version=7)


@pytest.mark.real_clock  # delta-rs dates versions by the log files' modification times
def test_time_travel_as_of(ws):
    import time

    between = dt.datetime.now(dt.timezone.utc)
    time.sleep(0.05)
    put(ws, "silver", "customers", CUSTOMERS.slice(0, 2), mode="overwrite")
    old = run_query(ws, sam(ws), "SELECT count(*) AS n FROM customers", as_of=between)
    assert old.table.column("n").to_pylist() == [CUSTOMERS.num_rows]


def test_run_query_docstring_example(ws):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in doctest.DocTestFinder().find(run_query, "run_query", globs={"ws": ws, "run_query": run_query}):
        runner.run(t)
    assert runner.summarize(verbose=False).attempted == 2 and runner.failures == 0


def test_max_rows(ws):
    res = run_query(ws, sam(ws), "SELECT * FROM customers", max_rows=2)
    assert res.table.num_rows == 2 and res.truncated
    res = run_query(ws, sam(ws), "SELECT * FROM customers", max_rows=100)
    assert res.table.num_rows == CUSTOMERS.num_rows and not res.truncated
    res = run_query(ws, sam(ws), "SELECT * FROM customers", max_rows=0)
    assert res.table.num_rows == 0 and res.truncated and res.table.column_names == CUSTOMERS.column_names


def test_engine_errors_are_one_line(ws):
    with pytest.raises(SqlError) as ei:
        run_query(ws, sam(ws), "SELECT CAST(region AS INTEGER) FROM customers")
    assert "\n" not in str(ei.value) and "Conversion" in str(ei.value)
    with pytest.raises(SqlError, match="syntax error"):
        run_query(ws, sam(ws), "SELEC * FROM customers")


# -- audit --------------------------------------------------------------------------------
def test_every_query_is_audited_without_plaintext(ws):
    q = "SELECT count(*) AS n FROM customers WHERE region = 'bob.smith@example.com' OR region <> ''"
    res = run_query(ws, ana(ws), q)
    evs = events(ws)
    gate = [e for e in evs if e["action"] == "gate.decide"]
    sqlq = [e for e in evs if e["action"] == "sql.query"]
    assert gate[-1]["resource"] == "table:silver.customers" and gate[-1]["outcome"] == "allow"
    assert sqlq[-1]["outcome"] == "ok" and sqlq[-1]["actor"] == "ana" and sqlq[-1]["resource"] == "sql"
    d = json.loads(sqlq[-1]["details"])
    assert d["tables"] == ["silver.customers"] and d["rows"] == res.table.num_rows == 1
    assert d["sql_sha256"] == sha(q)
    assert "[redacted:email]" in d["sql"] and "mask_fallbacks" not in d
    for e in evs:
        assert "bob.smith@example.com" not in json.dumps(e, default=str)
    with pytest.raises(SqlError):
        run_query(ws, ana(ws), "SELECT * FROM read_csv('/home/bob.smith@example.com/x.csv')")
    last = events(ws, "sql.query")[-1]
    assert last["outcome"] == "error" and "bob.smith@example.com" not in last["details"]
    assert json.loads(last["details"])["error"] == "SqlError"


def test_long_sql_is_truncated_in_the_audit(ws):
    q = "SELECT count(*) AS n FROM customers WHERE " + " OR ".join(f"region = 'r{i}'" for i in range(200))
    run_query(ws, ana(ws), q)
    d = json.loads(events(ws, "sql.query")[-1]["details"])
    assert len(d["sql"]) == 500 and d["sql_sha256"] == sha(q)


# -- output -------------------------------------------------------------------------------
def big_result(n: int = 60) -> QueryResult:
    t = pa.table({"i": pa.array(range(n), pa.int64()), "s": pa.array([f"[bold]v{i}" for i in range(n)]),
                  "b": pa.array([b"\x00\xff"] * n, pa.binary())})
    return QueryResult(table=t, tables=("silver.x",), masked={}, row_filters={})


def test_write_table():
    con = Console(record=True, width=120, file=io.StringIO())
    write_result(big_result(), "table", None, con)
    text = con.export_text()
    assert "… 10 more rows" in text and "v49" in text and "v50" not in text
    assert "[bold]v0" in text  # values are text, never markup


def test_write_csv_and_json(tmp_path):
    buf = io.StringIO()
    con = Console(file=buf, width=120)
    write_result(big_result(3), "csv", None, con)
    assert buf.getvalue().splitlines() == ['"i","s","b"', '0,"[bold]v0","00ff"', '1,"[bold]v1","00ff"', '2,"[bold]v2","00ff"']
    write_result(big_result(3), "json", tmp_path / "r.json", Console(file=io.StringIO()))
    assert json.loads((tmp_path / "r.json").read_text())[1] == {"i": 1, "s": "[bold]v1", "b": "00ff"}


def test_write_parquet_needs_out(tmp_path):
    with pytest.raises(SqlError, match="--out"):
        write_result(big_result(3), "parquet", None, Console(file=io.StringIO()))
    write_result(big_result(3), "parquet", tmp_path / "r.parquet", Console(file=io.StringIO()))
    assert pq.read_table(tmp_path / "r.parquet").equals(big_result(3).table)


# -- per-process caches: the gate and the data decide every query ---------------------------------
def test_a_repeated_query_is_gated_and_audited_every_time(ws):
    q = "SELECT count(*) AS n FROM customers"
    before = len(events(ws, "sql.query")), len(events(ws, "gate.decide"))
    for _ in range(3):
        assert run_query(ws, ana(ws), q).table.column("n").to_pylist() == [len(KEPT)]
    after = len(events(ws, "sql.query")), len(events(ws, "gate.decide"))
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)
    assert len(sql_mod._PREPARED._items) == 1  # one cached connection served all three


def test_cached_views_follow_new_commits_roles_and_policy_changes(ws, project):
    q = "SELECT count(*) AS n FROM customers"
    assert run_query(ws, ana(ws), q).table.column("n").to_pylist() == [len(KEPT)]
    assert run_query(ws, sam(ws), q).table.column("n").to_pylist() == [CUSTOMERS.num_rows]  # no row filter
    put(ws, "silver", "customers", CUSTOMERS.slice(0, 2), mode="overwrite")  # a new version
    assert run_query(ws, ana(ws), q).table.column("n").to_pylist() == [2]
    put(ws, "silver", "customers", CUSTOMERS, mode="append")
    assert run_query(ws, sam(ws), q).table.column("n").to_pylist() == [2 + CUSTOMERS.num_rows]
    # the analyst's masks are the policy's at each query: a new mask is applied at once
    ids = run_query(ws, ana(ws), "SELECT customer_id FROM customers ORDER BY 1 LIMIT 1").table.column(0).to_pylist()
    assert len(ids[0]) == 32  # hashed (128 bits, hex)
    policy = project / "policies" / "customers.yaml"
    policy.write_text(policy.read_text().replace('masks: {customer_id: hash, income: "bucket:10000"}',
                                                 'masks: {customer_id: "prefix:4", income: "bucket:10000"}'))
    from governance.workspace import Workspace

    with Workspace.open(project / "lakewarden.yaml") as ws2:
        ids = run_query(ws2, ana(ws2), "SELECT DISTINCT customer_id FROM customers").table.column(0).to_pylist()
    assert ids == ["sub_"]


def test_a_table_created_again_at_the_same_path_is_not_served_from_the_cache(ws):
    import shutil

    q = "SELECT count(*) AS n FROM customers"
    assert run_query(ws, sam(ws), q).table.column("n").to_pylist() == [CUSTOMERS.num_rows]
    shutil.rmtree(Catalog(ws.config).uri(TableRef("silver", "customers")))
    put(ws, "silver", "customers", CUSTOMERS.slice(0, 1))  # version 0 again, other files
    assert run_query(ws, sam(ws), q).table.column("n").to_pylist() == [1]


def test_a_query_naming_a_cached_raw_table_is_refused_and_never_served_from_it(ws):
    run_query(ws, ana(ws), "SELECT count(*) AS n FROM customers")
    (prepared,) = sql_mod._PREPARED._items.values()
    (raw,) = prepared.views.internal
    with pytest.raises(SqlError):
        run_query(ws, ana(ws), f"SELECT * FROM {raw}")
    # named in a string it is harmless, and the query runs on fresh views, not the cached ones
    res = run_query(ws, ana(ws), f"SELECT '{raw}' AS s, count(*) AS n FROM customers")
    assert res.table.column("n").to_pylist() == [len(KEPT)]
    assert sql_mod._PREPARED.acquire(next(iter(sql_mod._PREPARED._items)), raw) is None


def test_queries_from_many_threads_share_the_caches_safely(ws):
    from concurrent.futures import ThreadPoolExecutor

    qs = {"SELECT count(*) AS n FROM customers": len(KEPT),
          "SELECT count(*) AS n FROM transactions": TRANSACTIONS.num_rows,
          "SELECT count(*) AS n FROM customers c JOIN transactions t ON c.customer_id = t.customer_id": 4}
    jobs = [q for q in qs for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: run_query(ws, ana(ws), q).table.column("n").to_pylist()[0], jobs))
    assert got == [qs[q] for q in jobs]
    assert len(events(ws, "sql.query")) >= len(jobs)


def test_a_deny_is_not_cached_away(ws):
    run_query(ws, sam(ws), "SELECT count(*) FROM customers")
    for _ in range(2):
        with pytest.raises(AccessDenied):
            run_query(ws, ana(ws), "SELECT count(*) FROM bronze.customers")
