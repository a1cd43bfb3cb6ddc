"""Data contracts: type every cell, check every rule, give every rejected row a reason.

The rules are defined by one DuckDB query per batch over the Arrow data (no copies
into Python). With the native core they run in Rust, one pass per column, and the
query decides only the rows whose values the core leaves to it (forms outside its
strict grammars): see ``native/src/validate.rs`` and :meth:`Validator._check_native`.
In the query each column is typed with ``TRY_CAST``; a ``CASE`` expression
yields the first rule a row breaks — missing required value, not a valid type,
too long, a spreadsheet formula (CSV injection), pattern, allowed values,
range, or a duplicate of a unique column (within the batch, earlier batches of
this ingest, or the table). Reasons name the column and the rule, never the
value, so they can be stored in plaintext. Quasi-identifiers are generalized in
the same query (year, month, prefix:N, bucket:W).

Uniqueness across batches keeps 64-bit hashes of accepted values: in the native
core's hash set when it is built (a batch is checked in one pass over the batch,
whatever came before; in memory, 24 bytes a value measured at 10M), else in DuckDB
(8 bytes a value, spilled to disk past 1 GB, but each batch is joined against every
earlier hash). A hash collision (odds about n²/2⁶⁵) would quarantine a row as a
duplicate, never accept a duplicate.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

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
    """A bound in SQL; "today" is the query's ``$today`` (a date) or ``$now`` (an instant), bound
    from the validator's clock when the query runs."""
    if col.type in ("date", "timestamp"):
        if b == "today":
            return "CAST($today AS DATE)" if col.type == "date" else "CAST($now AS TIMESTAMPTZ)"
        d = f"DATE {lit(str(date.fromisoformat(str(b))))}"
        return d if col.type == "date" else f"CAST({d} AS TIMESTAMPTZ)"
    return repr(float(b))


def _today_params(sql: str, now: datetime) -> dict[str, Any] | None:
    """The values of the ``$today`` and ``$now`` a query names (see :func:`_bound`)."""
    params = {k: v for k, v in (("today", now.date()), ("now", now)) if f"${k}" in sql}
    return params or None


def _show(b: float | str) -> str:
    return f"{b:g}" if isinstance(b, float) else str(b)


# Rule codes in the order a column's rules are tried (the native core's codes, see native/src/validate.rs).
MISSING, INVALID, TOO_LONG, FORMULA, PATTERN, NOT_ALLOWED, BELOW, ABOVE = range(1, 9)


def reason_texts(name: str, col: ColumnPolicy) -> dict[int, str]:
    """What a rejected row's reason says for each rule of a column: the column and the rule, never
    the value."""
    label = col.pattern if col.pattern in ("email", "phone", "zip5") else "declared"
    return {
        MISSING: f"{name}: missing (required)",
        INVALID: f"{name}: not a valid {col.type}",
        TOO_LONG: f"{name}: longer than {col.max_length} characters",
        FORMULA: f"{name}: starts like a spreadsheet formula (CSV injection)",
        PATTERN: f"{name}: does not match the {label} pattern",
        NOT_ALLOWED: f"{name}: not one of the allowed values",
        BELOW: f"{name}: below the minimum {_show(col.min)}" if col.min is not None else "",
        ABOVE: f"{name}: above the maximum {_show(col.max)}" if col.max is not None else "",
    }


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


# The named patterns the native core matches itself (``native/src/validate.rs``'s ``named_pattern``).
NAMED_PATTERN_CODES = {"email": 1, "phone": 2, "zip5": 3}


class NativeSpec(NamedTuple):
    """One column's rules as the native core reads them (``native/src/validate.rs``'s ``Spec``)."""

    kind: int
    required: bool
    max_length: int | None
    formula: bool
    allowed: list[bytes] | None
    lo: float | None
    hi: float | None
    lo_i: int | None
    hi_i: int | None
    generalize: int
    param: float
    pattern: int = 0  # a named pattern the core checks itself (NAMED_PATTERN_CODES), or 0


_KIND = {"string": 0, "int": 1, "double": 2, "bool": 3, "date": 4, "timestamp": 5}  # the native core's type codes


def _instant(typ: str, b: float | str, now: datetime) -> int:
    """A date or timestamp bound as the core compares it: days, or µs since the epoch (UTC);
    "today" is the clock's date (UTC) for a date and its instant for a timestamp (the SQL's
    ``$today`` and ``$now``)."""
    if typ == "date":
        d = now.date() if b == "today" else date.fromisoformat(str(b))
        return (d - date(1970, 1, 1)).days
    if b == "today":
        return int(now.timestamp()) * 1_000_000 + now.microsecond
    return (date.fromisoformat(str(b)) - date(1970, 1, 1)).days * 86_400_000_000


ARROW_TYPE = {
    "string": pa.string(),
    "int": pa.int64(),
    "double": pa.float64(),
    "bool": pa.bool_(),
    "date": pa.date32(),
    "timestamp": pa.timestamp("us", tz="UTC"),
}


class Validator:
    """Validates batches of one ingest; keeps the hashes of unique values seen so far.

    ``clock`` (the workspace's; UTC now when not given) says what "today" is for a ``min`` or
    ``max`` of ``today``: read once per batch, the same instant for the native core and DuckDB.
    """

    def __init__(self, policy: DatasetPolicy, *, clock: Callable[[], datetime] | None = None) -> None:
        self.policy = policy
        self.clock = clock or (lambda: datetime.now(timezone.utc))
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

    def check(self, batch: pa.Table, first_row: int, pre_reason: pa.Array | None, *,
              now: datetime | None = None) -> pa.Table:
        """Every rule but uniqueness across batches; safe to run for several batches at once
        (each thread has its own DuckDB cursor). Follow with :meth:`dedupe`, in file order.
        ``now``: the instant "today" stands for (the clock's when not given; a Ray worker gets
        the driver's)."""
        n = batch.num_rows
        rows = pa.array(np.arange(first_row, first_row + n, dtype=np.int64))
        now = (now or self.clock()).astimezone(timezone.utc)
        specs = self._native_specs(batch.schema, now) if n else None
        if specs is not None:
            return self._check_native(batch, rows, pre_reason, specs, now)
        return self._check_sql(batch, rows, pre_reason, now)

    def _check_sql(self, batch: pa.Table, rows: pa.Array, pre_reason: pa.Array | None, now: datetime) -> pa.Table:
        """The rules as one DuckDB query: the reference, and the path for what the core leaves."""
        n = batch.num_rows
        b = batch.append_column("_row", rows)
        b = b.append_column("_pre", pre_reason if pre_reason is not None else pa.nulls(n, pa.string()))
        con = self._cursor()
        con.register("batch", b)
        try:
            sql = self._sql(b.schema)
            return con.sql(sql, params=_today_params(sql, now)).to_arrow_table()
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
            say = {k: lit(r) for k, r in reason_texts(name, col).items()}
            if col.required or name == pol.subject_key:
                checks.append(f"WHEN {vv} IS NULL THEN {say[MISSING]}")
            checks.append(f"WHEN {vv} IS NOT NULL AND {tq} IS NULL THEN {say[INVALID]}")
            if col.type == "string":
                checks.append(f"WHEN length({vv}) > {col.max_length} THEN {say[TOO_LONG]}")
                if not col.allowed:  # a list of allowed values already excludes formulas
                    first = f"left({vv}, 1)"
                    checks.append(
                        f"WHEN {first} IN ('=', '@', chr(9), chr(13)) OR ({first} IN ('+', '-') AND "
                        f"regexp_matches({vv}, {lit(FORMULA_RE)})) THEN {say[FORMULA]}"
                    )
                if col.regex:
                    checks.append(f"WHEN NOT regexp_full_match({vv}, {lit(col.regex)}) THEN {say[PATTERN]}")
            if col.allowed:
                vals = ", ".join(lit(a) for a in col.allowed)
                checks.append(f"WHEN {tq} NOT IN ({vals}) THEN {say[NOT_ALLOWED]}")
            if col.min is not None:
                checks.append(f"WHEN {tq} < {_bound(col, col.min)} THEN {say[BELOW]}")
            if col.max is not None:
                checks.append(f"WHEN {tq} > {_bound(col, col.max)} THEN {say[ABOVE]}")
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

    # -- the native fast path -------------------------------------------------------
    def _native_specs(self, schema: pa.Schema, now: datetime) -> list[NativeSpec] | None:
        """The native core's spec of each policy column, or None when a column's source is not text
        or it uses a rule the core does not run (then the whole batch goes to DuckDB)."""
        if native.backend() != "native":
            return None
        specs = []
        for name, col in self.policy.columns.items():
            t = schema.field(name).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
                return None
            g = (col.generalize or "") if col.protection is Protection.GENERALIZE else ""
            kind, _, param = g.partition(":")
            gen = {"": 0, "year": 1, "month": 2, "prefix": 3, "bucket": 4}.get(kind)
            fits = {0: True, 1: col.type in ("date", "timestamp"), 2: col.type in ("date", "timestamp"),
                    3: col.type == "string", 4: col.type in ("int", "double")}
            if gen is None or not fits[gen]:
                return None
            if col.allowed and col.type != "string":
                return None
            if (col.min is not None or col.max is not None) and col.type not in ("int", "double", "date", "timestamp"):
                return None
            lo = hi = lo_i = hi_i = None
            if col.type in ("int", "double"):
                lo = None if col.min is None else float(col.min)
                hi = None if col.max is None else float(col.max)
            elif col.type in ("date", "timestamp"):
                lo_i = None if col.min is None else _instant(col.type, col.min, now)
                hi_i = None if col.max is None else _instant(col.type, col.max, now)
            specs.append(NativeSpec(
                kind=_KIND[col.type], required=bool(col.required or name == self.policy.subject_key),
                max_length=col.max_length if col.type == "string" else None,
                formula=col.type == "string" and not col.allowed,
                allowed=[a.encode() for a in col.allowed] if col.allowed else None,
                lo=lo, hi=hi, lo_i=lo_i, hi_i=hi_i, generalize=gen, param=float(param) if param else 0.0,
                pattern=NAMED_PATTERN_CODES.get(col.pattern or "", 0) if col.type == "string" else 0,
            ))
        return specs

    def _check_native(self, batch: pa.Table, rows: pa.Array, pre: pa.Array | None, specs: list[NativeSpec],
                      now: datetime) -> pa.Table:
        pol = self.policy
        names = list(pol.columns)
        types = [(ARROW_TYPE[c.type], generalize_sql(c, "x")[1] if c.protection is Protection.GENERALIZE else None)
                 for c in pol.columns.values()]
        undecided, cols = native.check_text([batch[n] for n in names], specs, types)
        n = batch.num_rows
        # Patterns of the policy's own: DuckDB's own regular expressions, on the trimmed text; only
        # failures come back. The core checked the named ones (email, phone, zip5) itself.
        codes = [c for c, _, _ in cols]
        for j, (name, col) in enumerate(pol.columns.items()):
            if col.type == "string" and col.regex and not specs[j].pattern:
                typed = cols[j][1]
                con = self._cursor()
                con.register("_pat", pa.table({"i": pa.array(np.arange(n, dtype=np.int32)), "v": typed}))
                try:
                    bad = con.sql(f"SELECT i FROM _pat WHERE NOT regexp_full_match(v, {lit(col.regex)})").fetchnumpy()["i"]
                finally:
                    con.unregister("_pat")
                if len(bad):
                    c = codes[j].copy()
                    later = (c[bad] == 0) | (c[bad] > PATTERN)
                    c[bad[later]] = PATTERN
                    codes[j] = c
        # The first rule broken, columns in policy order: its reason.
        labels: list[str | None] = [None]
        for name, col in pol.columns.items():
            texts = reason_texts(name, col)
            labels += [texts[k] for k in range(1, 9)]
        idx = np.zeros(n, dtype=np.int32)
        for j in reversed(range(len(names))):
            c = codes[j]
            hit = c != 0
            if hit.any():
                idx[hit] = 1 + 8 * j + c[hit].astype(np.int32) - 1
        reason = pc.take(pa.array(labels, pa.string()), pa.array(idx))
        if pre is not None and pre.null_count < len(pre):
            reason = pc.coalesce(pre, reason)
        ok = pc.is_null(reason)
        out: dict[str, pa.Array] = {"_row": rows, "_reason": reason}
        for (name, col), (_, _, general) in zip(pol.columns.items(), cols):
            if general is not None:
                out[name] = pc.if_else(ok, general, pa.nulls(n, general.type))
        for name, (_, typed, _) in zip(names, cols):
            out["_t_" + name] = typed
        rejected = np.flatnonzero(~ok.to_numpy(zero_copy_only=False))
        for name, col, (_, typed, _) in zip(names, pol.columns.values(), cols):
            if not len(rejected):
                out["_v_" + name] = pa.nulls(n, pa.string())
            elif col.type == "string":
                out["_v_" + name] = pc.if_else(ok, pa.nulls(n, pa.string()), typed)
            else:  # the trimmed text of rejected rows only
                at = np.full(n, -1, dtype=np.int64)
                at[rejected] = np.arange(len(rejected))
                text = native.trim_text(batch[name].take(pa.array(rejected)))
                out["_v_" + name] = text.take(pa.array(at, mask=at < 0))
        table = pa.table(out)
        if undecided.any():  # values in forms the core leaves to DuckDB: those rows, decided there
            odd = pa.array(undecided.astype(bool))
            slow = self._check_sql(batch.filter(odd), rows.filter(odd), None if pre is None else pre.filter(odd), now)
            table = pa.concat_tables([table.filter(pc.invert(odd)), slow.select(table.column_names).cast(table.schema)])
        return table

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
