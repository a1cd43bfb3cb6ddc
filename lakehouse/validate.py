"""Data contracts: type every cell, check every rule, give every rejected row a reason.

Validation runs as one DuckDB query per batch over the Arrow data (no copies
into Python): each column is typed with ``TRY_CAST``; a ``CASE`` expression
yields the first rule a row breaks — missing required value, not a valid type,
too long, a spreadsheet formula (CSV injection), pattern, allowed values,
range, or a duplicate of a unique column (within the batch, earlier batches of
this ingest, or the table). Reasons name the column and the rule, never the
value, so they can be stored in plaintext. Quasi-identifiers are generalized in
the same query (year, month, prefix:N, bucket:W).

Uniqueness across batches keeps 64-bit hashes of accepted values: in the native
core's hash set when it is built (a batch is checked in one pass over the batch,
whatever came before; about 14 bytes a value), else in DuckDB (8 bytes a value,
but each batch is joined against every earlier hash). A hash collision (odds about
n²/2⁶⁵) would quarantine a row as a duplicate, never accept a duplicate.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import date

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from governance.keys import native
from governance.policy import ColumnClass, ColumnPolicy, DatasetPolicy, Protection
from lakehouse.errors import IngestError

_SQL_TYPE = {
    "string": "VARCHAR",
    "int": "BIGINT",
    "double": "DOUBLE",
    "bool": "BOOLEAN",
    "date": "DATE",
    "timestamp": "TIMESTAMPTZ",
}
_TRUE = ("true", "t", "yes", "y", "1")
_FALSE = ("false", "f", "no", "n", "0")
# A cell a spreadsheet would evaluate: =, @, tab, CR, or +/- not followed by something numeric-looking.
FORMULA_RE = r"^[=@\t\r]|^[+-][^0-9 .(]"


def q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def lit(value: object) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return repr(value)


@dataclass
class ShapePlan:
    """How a file's columns map to the policy: what to read, drop, and fill with NULL."""

    rename: dict[str, str]  # file column -> policy column
    dropped: list[str] = field(default_factory=list)
    filled: list[str] = field(default_factory=list)


def plan_shape(policy: DatasetPolicy, names: list[str], *, source: str, policy_file: str = "") -> ShapePlan:
    """Check a file's header against the policy (schema drift) and decide what to do, or refuse."""
    lookup = {n.lower(): n for n in policy.columns}
    rename: dict[str, str] = {}
    unknown = []
    for n in names:
        key = n.strip().lower()
        if key in lookup:
            if lookup[key] in rename.values():
                raise IngestError(f"{source}: column '{n}' appears twice (names are compared case-insensitively)")
            rename[n] = lookup[key]
        else:
            unknown.append(n)
    plan = ShapePlan(rename)
    where = f" in {policy_file}" if policy_file else ""
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10])
        if policy.contract.unknown_columns == "reject":
            raise IngestError(
                f"{source}: column(s) {shown} have no policy{where}; nothing was ingested",
                hint="classify them in the dataset policy, or set contract.unknown_columns: drop",
            )
        plan.dropped = unknown
    present = set(rename.values())
    missing = [c for c in policy.columns if c not in present]
    required_missing = [c for c in missing if policy.columns[c].required or c == policy.subject_key]
    if required_missing:
        raise IngestError(f"{source}: required column(s) missing: {', '.join(required_missing)}; nothing was ingested")
    if missing:
        if policy.contract.missing_columns == "reject":
            raise IngestError(
                f"{source}: column(s) missing: {', '.join(missing)}; nothing was ingested",
                hint="add them to the file, or set contract.missing_columns: null",
            )
        plan.filled = missing
    return plan


def _value(name: str, src_type: pa.DataType) -> str:
    """The cleaned source value: text is trimmed and empty text is NULL."""
    if pa.types.is_string(src_type) or pa.types.is_large_string(src_type):
        return f"NULLIF(trim({q(name)}), '')"
    return q(name)


def _typed(col: ColumnPolicy, v: str, src_type: pa.DataType) -> str:
    text = pa.types.is_string(src_type) or pa.types.is_large_string(src_type)
    if col.type == "bool" and text:
        return (
            f"CASE WHEN lower({v}) IN ({', '.join(map(lit, _TRUE))}) THEN TRUE "
            f"WHEN lower({v}) IN ({', '.join(map(lit, _FALSE))}) THEN FALSE END"
        )
    if col.type == "string":
        return v if text else f"CAST({v} AS VARCHAR)"
    return f"TRY_CAST({v} AS {_SQL_TYPE[col.type]})"


def _bound(col: ColumnPolicy, b: float | str) -> str:
    if col.type in ("date", "timestamp"):
        d = "current_date" if b == "today" else f"DATE {lit(str(date.fromisoformat(str(b))))}"
        return d if col.type == "date" else f"CAST({d} AS TIMESTAMPTZ)" if b != "today" else "now()"
    return repr(float(b))


def _show(b: float | str) -> str:
    return f"{b:g}" if isinstance(b, float) else str(b)


def generalize_sql(col: ColumnPolicy, typed: str) -> tuple[str, pa.DataType]:
    """SQL for a generalized quasi-identifier and its Arrow type."""
    g = col.generalize or ""
    if g == "year":
        return f"CAST(year({typed}) AS INTEGER)", pa.int32()
    if g == "month":
        return f"strftime({typed}, '%Y-%m')", pa.string()
    kind, _, n = g.partition(":")
    if kind == "prefix":
        return f"left(CAST({typed} AS VARCHAR), {int(n)})", pa.string()
    if kind == "bucket":
        return f"floor(CAST({typed} AS DOUBLE) / {float(n)!r}) * {float(n)!r}", pa.float64()
    raise IngestError(f"unsupported generalization {g!r}")


ARROW_TYPE = {
    "string": pa.string(),
    "int": pa.int64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


class Validator:
    """Validates batches of one ingest; keeps the hashes of unique values seen so far."""

    def __init__(self, policy: DatasetPolicy) -> None:
        self.policy = policy
        self.con = duckdb.connect(":memory:")
        self.con.execute("SET TimeZone='UTC'")
        self.con.execute("SET threads TO 2")
        self.con.execute("SET memory_limit = '1GB'")  # bounded: DuckDB spills rather than grows
        self.con.execute("SET preserve_insertion_order = false")  # rows carry their own _row number
        self.unique = [n for n, c in policy.columns.items() if c.unique]
        self._local = threading.local()
        self._lock = threading.Lock()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        sets = {n: native.unique_set() for n in self.unique}
        self._sets: dict[str, native.UniqueSet] | None = None if None in sets.values() else sets  # type: ignore[assignment]
        if self._sets is None:
            for n in self.unique:
                self.con.execute(f"CREATE TABLE {q('seen_' + n)} (h UBIGINT)")

    def preload_unique(self, name: str, values: pa.Array | pa.ChunkedArray) -> None:
        """Hashes of values already in the table, so a re-sent value is a duplicate."""
        if self._sets is not None:
            for chunk in values.chunks if isinstance(values, pa.ChunkedArray) else [values]:
                self._sets[name].add(chunk)
            return
        tbl = pa.table({"v": values})
        self.con.register("_pre", tbl)
        self.con.execute(f"INSERT INTO {q('seen_' + name)} SELECT hash(v) FROM _pre WHERE v IS NOT NULL")
        self.con.unregister("_pre")

    def validate(self, batch: pa.Table, first_row: int, pre_reason: pa.Array | None) -> pa.Table:
        """Return ``_row``, ``_reason`` (NULL = accepted) and one typed (or generalized) column per policy column."""
        return self.dedupe(self.check(batch, first_row, pre_reason))

    def check(self, batch: pa.Table, first_row: int, pre_reason: pa.Array | None) -> pa.Table:
        """Every rule but uniqueness across batches; safe to run for several batches at once
        (each thread has its own DuckDB cursor). Follow with :meth:`dedupe`, in file order."""
        n = batch.num_rows
        b = batch.append_column("_row", pa.array(range(first_row, first_row + n), pa.int64()))
        b = b.append_column("_pre", pre_reason if pre_reason is not None else pa.nulls(n, pa.string()))
        con = self._cursor()
        con.register("batch", b)
        try:
            return con.sql(self._sql(b.schema)).to_arrow_table()
        finally:
            con.unregister("batch")

    def dedupe(self, out: pa.Table) -> pa.Table:
        """Mark repeats of unique columns (within the batch, and against earlier batches and the
        table), then remember this batch's accepted values. Batches must come in file order."""
        with self._lock:
            if self._sets is not None:
                return self._dedupe_native(out, self._sets)
            for c in self.unique:
                out = self._duplicates(out, c)
            if self.unique and out.num_rows:
                self.con.register("_acc", out)
                for c in self.unique:
                    self.con.execute(
                        f"INSERT INTO {q('seen_' + c)} SELECT hash({q('_t_' + c)}) FROM _acc "
                        f"WHERE _reason IS NULL AND {q('_t_' + c)} IS NOT NULL"
                    )
                self.con.unregister("_acc")
        return out

    def _dedupe_native(self, out: pa.Table, sets: dict[str, native.UniqueSet]) -> pa.Table:
        if not out.num_rows:
            return out
        for c, seen in sets.items():
            kinds = seen.check(out["_t_" + c], out["_row"], pc.is_null(out["_reason"]))
            if kinds.any():
                out = _mark(out, c, pa.array(kinds == seen.WITHIN), pa.array(kinds == seen.BEFORE))
        accepted = pc.is_null(out["_reason"])
        for seen in sets.values():
            seen.commit(accepted)
        return out

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._local.cur = self.con.cursor()
            cur.execute("SET TimeZone='UTC'")  # a session setting: each cursor needs its own
            with self._lock:
                self._cursors.append(cur)
        return cur

    def _duplicates(self, out: pa.Table, name: str) -> pa.Table:
        """Mark a unique column's repeats: within the batch (the first row wins), then against earlier batches."""
        t = "_t_" + name
        self.con.register("_cand", out.select(["_row", "_reason", t]))
        try:
            dup = self.con.sql(
                f"""
                WITH c AS (SELECT _row, {q(t)} AS v, hash({q(t)}) AS h FROM _cand
                           WHERE _reason IS NULL AND {q(t)} IS NOT NULL),
                     within AS (SELECT _row FROM (SELECT _row, row_number() OVER (PARTITION BY v ORDER BY _row) AS rn
                                                  FROM c WHERE v IN (SELECT v FROM c GROUP BY v HAVING count(*) > 1))
                                WHERE rn > 1),
                     before AS (SELECT c._row FROM c SEMI JOIN {q('seen_' + name)} s ON c.h = s.h)
                SELECT _row, 'w' AS kind FROM within UNION ALL SELECT _row, 'b' FROM before
                """
            ).to_arrow_table()
        finally:
            self.con.unregister("_cand")
        if not dup.num_rows:
            return out
        within = pc.is_in(out["_row"], value_set=dup.filter(pc.equal(dup["kind"], "w"))["_row"])
        before = pc.is_in(out["_row"], value_set=dup.filter(pc.equal(dup["kind"], "b"))["_row"])
        return _mark(out, name, within, pc.and_(pc.invert(within), before))

    def _sql(self, schema: pa.Schema) -> str:
        pol = self.policy
        typed_cols, out_cols, checks = [], [], ["WHEN _pre IS NOT NULL THEN _pre"]
        for name, col in pol.columns.items():
            src_type = schema.field(name).type
            v = _value(name, src_type)
            t = _typed(col, v, src_type)
            typed_cols.append(f"{t} AS {q('_t_' + name)}")
            tq = q("_t_" + name)
            vq = f"_v_{name}"
            typed_cols.append(f"{v} AS {q(vq)}")
            vv = q(vq)
            if col.required or name == pol.subject_key:
                checks.append(f"WHEN {vv} IS NULL THEN {lit(name + ': missing (required)')}")
            checks.append(f"WHEN {vv} IS NOT NULL AND {tq} IS NULL THEN {lit(f'{name}: not a valid {col.type}')}")
            if col.type == "string":
                checks.append(
                    f"WHEN length({vv}) > {col.max_length} THEN {lit(f'{name}: longer than {col.max_length} characters')}"
                )
                if not col.allowed:  # a list of allowed values already excludes formulas
                    first = f"left({vv}, 1)"
                    checks.append(
                        f"WHEN {first} IN ('=', '@', chr(9), chr(13)) OR ({first} IN ('+', '-') AND "
                        f"regexp_matches({vv}, {lit(FORMULA_RE)})) THEN "
                        f"{lit(name + ': starts like a spreadsheet formula (CSV injection)')}"
                    )
                if col.regex:
                    label = col.pattern if col.pattern in ("email", "phone", "zip5") else "declared"
                    checks.append(
                        f"WHEN NOT regexp_full_match({vv}, {lit(col.regex)}) THEN "
                        f"{lit(f'{name}: does not match the {label} pattern')}"
                    )
            if col.allowed:
                vals = ", ".join(lit(a) for a in col.allowed)
                checks.append(f"WHEN {tq} NOT IN ({vals}) THEN {lit(name + ': not one of the allowed values')}")
            if col.min is not None:
                checks.append(f"WHEN {tq} < {_bound(col, col.min)} THEN {lit(f'{name}: below the minimum {_show(col.min)}')}")
            if col.max is not None:
                checks.append(f"WHEN {tq} > {_bound(col, col.max)} THEN {lit(f'{name}: above the maximum {_show(col.max)}')}")
            if col.protection is Protection.GENERALIZE:
                g, _ = generalize_sql(col, tq)
                out_cols.append(f"CASE WHEN _reason IS NULL THEN {g} END AS {q(name)}")
            # Other columns' output is their typed value: ``_t_<name>`` (see :func:`output_column`).
        inner = (
            "SELECT _row, _pre, " + ", ".join(typed_cols) + " FROM batch"
        )
        reason = "CASE " + " ".join(checks) + " END AS _reason"
        mid = f"SELECT *, {reason} FROM ({inner})"
        # Raw values (_v_*) of rejected rows only: quarantine encrypts their originals. Accepted
        # rows' raw text is not copied out of DuckDB a second time.
        raw = ", ".join(f"CASE WHEN _reason IS NOT NULL THEN {q(f'_v_{n}')} END AS {q(f'_v_{n}')}" for n in pol.columns)
        typed = ", ".join(q("_t_" + n) for n in pol.columns)
        return f"SELECT _row, _reason, {''.join(c + ', ' for c in out_cols)}{typed}, {raw} FROM ({mid})"

    def close(self) -> None:
        for cur in self._cursors:
            cur.close()
        self.con.close()


def _mark(out: pa.Table, name: str, within: pa.Array, before: pa.Array) -> pa.Table:
    """Give a unique column's repeats their reason: ``within`` the file, or ``before`` (already
    ingested; only rows not ``within``)."""
    reason = pc.if_else(within, f"{name}: duplicate value within the file", out["_reason"])
    reason = pc.if_else(before, f"{name}: duplicate of a value already ingested", reason)
    return out.set_column(out.schema.get_field_index("_reason"), "_reason", reason)


def output_column(checked: pa.Table, name: str) -> pa.ChunkedArray:
    """A policy column's output in a checked batch: generalized when the policy generalizes it,
    else its typed value."""
    return checked[name] if name in checked.column_names else checked["_t_" + name]


def output_type(col: ColumnPolicy) -> pa.DataType:
    """The Arrow type a column has in bronze, after protection."""
    if col.protection in (Protection.ENCRYPT, Protection.VAULT, Protection.RESTRICTED):
        return pa.binary()
    if col.protection is Protection.GENERALIZE:
        _, t = generalize_sql(col, "x")
        return t
    if col.class_ is ColumnClass.SUBJECT_KEY:
        return pa.string()
    return ARROW_TYPE[col.type]
