"""Differentially private SQL: aggregate queries of a role whose policy says ``query: private``.

A dataset's policy may answer a role's SQL privately (``access.<role>.query: private``, or
``query: private`` for every role). Such a role's queries are aggregates only, released with
differential privacy by OpenDP (its Polars measurements: contribution bounding per subject,
clamping, calibrated discrete Laplace noise, and the accuracy of each statistic); nothing here
draws noise itself. :func:`lakehouse.sql.run_query` routes such a query here::

    res = run_query(ws, ws.actor("ana"), "SELECT region, count(*) AS n FROM customers GROUP BY region")
    res.table      # region, n, n_ci_low, n_ci_high  (noisy, with a 95% confidence interval)
    res.private    # PrivateRelease(epsilon=1.0, delta=0.0, mechanism=..., rule_ids=...)

What a private query may be (:func:`compile_plan` refuses the rest, saying what and why)::

    SELECT [g, ...,] agg [AS name], ... FROM <one governed table> [WHERE p] [GROUP BY g, ...] [ORDER BY g, ...]
    agg: COUNT(*) | COUNT(c) | SUM(c) | AVG(c)

* ``SUM``/``AVG`` clamp ``c`` to the policy's ``min``/``max`` of the column (a column without
  both numeric bounds is refused: its sensitivity would be unbounded); values are rounded to whole
  units and summed exactly (integer sums: the noise is calibrated to ``max - min``, no float error).
* ``GROUP BY`` keys are public — a column whose policy lists ``allowed`` values, or a bool column:
  every key gets a row (an empty group is noise around 0); a row whose key is NULL or outside the
  list is not counted; the release is pure ε-DP (δ = 0).
* Or, when the policy sets ``private_queries.delta_per_query``, keys found in the data (any other
  column the role sees, masked values included; never the subject key or a direct identifier):
  OpenDP's thresholded key release shows a group only where its noisy count clears a threshold
  calibrated to ε and δ (``PrivateRelease.threshold``), so a group of one person stays out except
  with probability δ. A query without ``COUNT(*)`` gets a hidden one to threshold on (it shares the
  query's ε). The query's δ is reserved in the ledger with its ε (``delta_per_query``,
  ``delta_per_analyst``). Without ``delta_per_query`` such a query is refused.
* ``WHERE`` is a row-wise predicate (comparisons, IN, BETWEEN, IS NULL, AND/OR/NOT of literals and
  columns) over public and quasi-identifier columns: no subquery, no function, never the subject key.
* Each subject contributes at most ``private_queries.contributions`` rows (the rest are dropped,
  by OpenDP's truncation on the subject key; a role that cannot see the key is answered only when
  the key is ``unique``, one row per subject). Silver of a dataset whose key is ``unique`` holds one
  row per subject by construction (``build_silver`` keeps each subject's latest row), so there a row
  is a subject and no truncation runs: the privacy unit is the same, one person.

How it runs (:func:`lakehouse.sql.run_query`): the gate decides ``query`` for the table; the plan is
compiled (refusals happen here, before any budget or data); the query's ε is reserved in the
privacy ledger (``PrivacyLedger.reserve_query``: per query, per dataset with training, per
analyst); the role's rows of the needed columns are read through the role's view (its masks and
row filter apply) on either engine; the OpenDP measurement releases the statistics; the ledger
commits the ε. A failure before the release releases the reservation.

Errors: :class:`~lakehouse.errors.SqlError` for a query the private layer cannot answer (exit 2);
:class:`~governance.errors.AccessDenied` for a budget the query would exceed (exit 3).
"""

from __future__ import annotations

import json
import logging
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import sqlglot
from sqlglot import exp

from governance.policy import ColumnClass, DatasetPolicy
from lakehouse.catalog import TableRef
from lakehouse.errors import SqlError

if TYPE_CHECKING:
    from governance.gate import Decision
    from governance.workspace import Workspace

__all__ = ["Aggregate", "PrivatePlan", "PrivateRelease", "compile_plan", "private_role", "ALPHA", "MECHANISM"]

ALPHA = 0.05  # the confidence intervals are 1 - ALPHA
MECHANISM = "OpenDP 0.16 Polars: discrete Laplace (counts and integer sums), per-subject truncation"
ID = "__lw_dp_id"  # the subject column of the fetched rows; never leaves this process
_LEN = "__lw_dp_len"  # the hidden count a thresholded key release needs when the query has no COUNT(*)
_MAX_ROWS = 2**30  # the public bound OpenDP needs on a table's length (overflow of integer sums)
_HINT = ("a private role's queries are aggregates: SELECT [group columns,] COUNT(*) | COUNT(c) | SUM(c) | AVG(c) "
         "FROM <table> [WHERE ...] [GROUP BY group columns]")
_PREDICATES = (exp.And, exp.Or, exp.Not, exp.Paren, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.In,
               exp.Between, exp.Is, exp.Column, exp.Identifier, exp.Literal, exp.Boolean, exp.Null, exp.Neg,
               exp.Tuple)
_OPEN_CLASSES = (ColumnClass.PUBLIC, ColumnClass.QUASI_IDENTIFIER)


@dataclass(frozen=True, slots=True)
class Aggregate:
    """One aggregate of the SELECT list: ``kind`` over ``column`` (None: ``COUNT(*)``), named ``name``."""

    kind: Literal["count", "count_column", "sum", "avg"]
    column: str | None
    name: str
    bounds: tuple[int, int] | None = None  # the clamping range of sum/avg (whole units)


@dataclass(frozen=True, slots=True)
class PrivateRelease:
    """What a private result is: noisy, at which ε and δ, by which mechanism, with which intervals.

    ``scales`` maps each released statistic (by its result name; an average as ``<name> (sum)`` and
    ``<name> (count)``) to the scale of its noise; ``rule_ids`` are the rules
    that allowed it (the gate's and the ledger's); ``run_id`` is its ledger run.
    """

    epsilon: float
    delta: float
    mechanism: str
    alpha: float
    rule_ids: tuple[str, ...]
    run_id: str | None = None
    scales: dict[str, float] = field(default_factory=dict)
    threshold: int | None = None  # group keys found in the data: shown only where the noisy count reached this

    def describe(self) -> str:
        """One line for people: ``differentially private: ε=1, δ=0, 95% CI in <col>_ci_low/_ci_high``."""
        keys = (f"; groups found in the data are shown only where their noisy count reached {self.threshold} "
                "(smaller groups are left out, not zero)") if self.threshold is not None else ""
        return (f"differentially private: ε={self.epsilon:g}, δ={self.delta:g} ({self.mechanism}); "
                f"{100 * (1 - self.alpha):g}% confidence intervals in <column>_ci_low / <column>_ci_high{keys}")


@dataclass(frozen=True)
class PrivatePlan:
    """A checked private query: what to read (:meth:`fetch_sql`) and how to release it (:meth:`release`).

    The plan is data-independent: the OpenDP measurement is built from the fetched table's schema,
    once per process for a plan, schema and ε, and invoked on each fetch.
    """

    dataset: str
    ref: TableRef
    table_sql: str  # the FROM clause as written (a view of the role)
    group_by: tuple[str, ...]
    keys: dict[str, tuple[Any, ...]]
    aggregates: tuple[Aggregate, ...]
    where: str | None  # the WHERE predicate, in DuckDB's dialect
    order: tuple[tuple[str, bool], ...]  # (group column, descending)
    epsilon: float
    contributions: int
    id_column: str | None  # the subject key as the role's view shows it; None: one row per subject
    delta: float = 0.0  # > 0: the group keys come from the data, released above OpenDP's threshold

    # -- reading ------------------------------------------------------------------------
    def fetch_sql(self, dialect: str = "duckdb") -> str:
        """The row-level query that reads what the release needs, through the role's view."""
        cols: list[Any] = []
        if self.id_column is not None:
            cols.append(exp.alias_(exp.column(self.id_column, quoted=True), ID, quoted=True))
        cols += [exp.column(g, quoted=True) for g in self.group_by]
        for col in sorted({a.column for a in self.aggregates if a.column}):
            numeric = any(a.column == col and a.kind in ("sum", "avg") for a in self.aggregates)
            c = exp.column(col, quoted=True)
            if numeric:  # whole units: summed exactly by OpenDP's integer sum
                cols.append(exp.alias_(exp.cast(exp.Round(this=exp.cast(c, "DOUBLE")), "BIGINT"), _value(col),
                                       quoted=True))
            else:
                cols.append(exp.alias_(exp.Not(this=exp.Is(this=c, expression=exp.Null())), _present(col),
                                       quoted=True))
        if not cols:
            cols.append(exp.alias_(exp.Literal.number(1), "__lw_dp_one", quoted=True))
        q = exp.select(*cols).from_(sqlglot.parse_one(self.table_sql, into=exp.Table, dialect="duckdb"))
        if self.where:
            q = q.where(sqlglot.parse_one(self.where, dialect="duckdb"))
        return q.sql(dialect=dialect)

    # -- releasing ----------------------------------------------------------------------
    def measurement(self, schema: pa.Schema) -> Any:
        """The OpenDP measurement of this plan over rows of ``schema`` (cached per process)."""
        import polars as pl

        empty = pl.from_arrow(schema.empty_table())
        assert isinstance(empty, pl.DataFrame)
        key = (self._signature(), str(empty.schema))
        with _CACHE_LOCK:
            hit = _MEASUREMENTS.get(key)
            if hit is not None:
                _MEASUREMENTS.move_to_end(key)
                return hit
        try:
            m = self._query(empty.lazy()).resolve()
        except Exception as exc:  # OpenDP cannot calibrate this release (e.g. a threshold search at a large ε)
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise SqlError(f"OpenDP cannot build the private release of this query at ε={self.epsilon:g}"
                           f"{f', δ={self.delta:g}' if self.thresholded else ''}: {first[:200]}",
                           hint="ask a smaller ε (--epsilon), or group by columns with public keys") from None
        with _CACHE_LOCK:
            _MEASUREMENTS[key] = m
            while len(_MEASUREMENTS) > 64:
                _MEASUREMENTS.popitem(last=False)
        return m

    def release(self, rows: pa.Table) -> tuple[pa.Table, dict[str, float]]:
        """Release the plan's statistics over ``rows`` (what :meth:`fetch_sql` returned).

        Returns the result table (group columns, then per aggregate ``<name>``, ``<name>_ci_low``,
        ``<name>_ci_high``) and the noise scale of each statistic. Each call draws fresh noise and
        spends the plan's ε: callers reserve it first.
        """
        import polars as pl

        m = self.measurement(rows.schema)
        frame = pl.from_arrow(rows)
        assert isinstance(frame, pl.DataFrame)
        out = m(frame.lazy()).collect()
        acc95, scales = _accuracy(m, ALPHA)
        acc_half = _accuracy(m, ALPHA / 2)[0] if any(a.kind == "avg" for a in self.aggregates) else {}
        if self.group_by:  # with_keys lists every key; order as asked (default: as the keys are listed)
            out = out.sort([g for g, _ in self.order] or list(self.group_by),
                           descending=[d for _, d in self.order] or False, nulls_last=True)
        data: dict[str, pa.Array] = {g: out[g].to_arrow() for g in self.group_by}
        for i, a in enumerate(self.aggregates):
            if a.kind == "avg":
                assert a.bounds is not None
                lo, hi = a.bounds
                s, n = out[f"__a{i}_sum"].to_list(), out[f"__a{i}_n"].to_list()
                ea, na = acc_half[f"__a{i}_sum"], acc_half[f"__a{i}_n"]
                vals, lows, highs = [], [], []
                for sv, nv in zip(s, n):
                    vals.append(min(max(sv / nv, lo), hi) if nv and nv > 0 else None)
                    n_lo, n_hi = nv - na, nv + na
                    if n_lo <= 0:  # the count may be zero: the mean is anywhere in the clamping range
                        lows.append(float(lo))
                        highs.append(float(hi))
                        continue
                    corners = [(sv + d) / c for d in (-ea, ea) for c in (n_lo, n_hi)]
                    lows.append(max(min(corners), lo))
                    highs.append(min(max(corners), hi))
                data[a.name] = pa.array(vals, pa.float64())
                data[f"{a.name}_ci_low"] = pa.array(lows, pa.float64())
                data[f"{a.name}_ci_high"] = pa.array(highs, pa.float64())
            else:
                col = f"__a{i}"
                v = out[col].to_list()
                half = acc95[col]
                typ = pa.int64() if a.kind in ("count", "count_column") else pa.float64()
                data[a.name] = pa.array([None if x is None else (int(x) if typ == pa.int64() else float(x)) for x in v],
                                        typ)
                data[f"{a.name}_ci_low"] = pa.array([None if x is None else float(x - half) for x in v], pa.float64())
                data[f"{a.name}_ci_high"] = pa.array([None if x is None else float(x + half) for x in v], pa.float64())
        return pa.table(data), self._named(scales)

    def _named(self, scales: dict[str, float]) -> dict[str, float]:
        """The noise scales by the statistic's name as the result shows it (an average: its noisy sum
        and count; the hidden count a thresholded release needs: ``(rows, for the threshold)``)."""
        out: dict[str, float] = {}
        for col, scale in scales.items():
            name = col
            for i, a in enumerate(self.aggregates):
                if col == f"__a{i}":
                    name = a.name
                elif col == f"__a{i}_sum":
                    name = f"{a.name} (sum)"
                elif col == f"__a{i}_n":
                    name = f"{a.name} (count)"
            if col == _LEN:
                name = "(rows, for the threshold)"
            out[name] = scale
        return out

    @property
    def thresholded(self) -> bool:
        """Whether the group keys are found in the data (a thresholded key release, δ > 0)."""
        return self.delta > 0

    def threshold(self, schema: pa.Schema) -> int | None:
        """The noisy count a group found in the data needs to be released (None: public keys)."""
        if not self.thresholded:
            return None
        import opendp.prelude as dp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = dp.summarize_polars_measurement(self.measurement(schema), ALPHA)
        found = [t for t in s["threshold"].to_list() if t is not None] if "threshold" in s.columns else []
        return int(found[0]) if found else None

    def _signature(self) -> tuple[Any, ...]:
        return (self.group_by, tuple(sorted((k, v) for k, v in self.keys.items())), self.aggregates,
                self.epsilon, self.contributions, self.id_column is not None, self.delta)

    def _query(self, data: Any) -> Any:
        import opendp.prelude as dp
        import polars as pl

        dp.enable_features("contrib")
        unit = (dp.unit_of(contributions=self.contributions, identifier=ID) if self.id_column is not None
                else dp.unit_of(contributions=1))
        log = logging.getLogger("opendp.context")  # its advice on large ε goes to stderr; the policy caps ε instead
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            loss = dp.loss_of(epsilon=self.epsilon, delta=self.delta) if self.thresholded \
                else dp.loss_of(epsilon=self.epsilon)
        finally:
            log.setLevel(level)
        ctx = dp.Context.compositor(
            data=data, privacy_unit=unit, privacy_loss=loss, split_evenly_over=1,
            margins=[dp.polars.Margin(by=[], max_length=_MAX_ROWS)],
        )
        q = ctx.query()
        if self.id_column is not None:
            # the subject's first rows in table order: a choice that depends on that subject's rows only
            # (as sound as OpenDP's random sample, about twice as fast on 1M subjects)
            q = q.truncate_per_group(self.contributions, keep="first")
        exprs = []
        for i, a in enumerate(self.aggregates):
            if a.kind == "count":
                exprs.append(dp.len(signed=True).alias(f"__a{i}"))
            elif a.kind == "count_column":
                present = pl.col(_present(a.column)).cast(pl.Int64)
                exprs.append(present.dp.sum((0, 1)).alias(f"__a{i}"))  # type: ignore[attr-defined]
            else:
                assert a.bounds is not None and a.column is not None
                s = pl.col(_value(a.column)).fill_null(0).dp.sum(a.bounds)  # type: ignore[attr-defined]
                if a.kind == "sum":
                    exprs.append(s.alias(f"__a{i}"))
                else:
                    exprs.append(s.alias(f"__a{i}_sum"))
                    n = pl.col(_value(a.column)).is_not_null().cast(pl.Int64)
                    exprs.append(n.dp.sum((0, 1)).alias(f"__a{i}_n"))  # type: ignore[attr-defined]
        if not self.group_by:
            return q.select(*exprs)
        if self.thresholded:  # keys found in the data: released where the noisy count clears the threshold
            if not any(a.kind == "count" for a in self.aggregates):
                exprs.append(dp.len(signed=True).alias(_LEN))  # the count OpenDP thresholds on (not shown)
            return q.group_by(list(self.group_by)).agg(*exprs)
        keys = pl.DataFrame(_key_product(self.keys, self.group_by))
        types = dict(data.collect_schema())
        keys = keys.with_columns(*(pl.col(g).cast(types[g]) for g in self.group_by))
        return q.group_by(list(self.group_by)).agg(*exprs).with_keys(keys.lazy())


_MEASUREMENTS: "OrderedDict[tuple[Any, ...], Any]" = OrderedDict()
_CACHE_LOCK = threading.Lock()


def _value(col: str) -> str:
    return f"__lw_dp_v_{col}"


def _present(col: str | None) -> str:
    return f"__lw_dp_p_{col}"


def _key_product(keys: dict[str, tuple[Any, ...]], cols: tuple[str, ...]) -> dict[str, list[Any]]:
    rows: list[tuple[Any, ...]] = [()]
    for c in cols:
        rows = [r + (k,) for r in rows for k in keys[c]]
    return {c: [r[i] for r in rows] for i, c in enumerate(cols)}


def _accuracy(m: Any, alpha: float) -> tuple[dict[str, float], dict[str, float]]:
    """Each statistic's (1 - alpha) half-width and noise scale, from OpenDP's summary."""
    import opendp.prelude as dp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = dp.summarize_polars_measurement(m, alpha)
    acc = dict(zip(s["column"].to_list(), s["accuracy"].to_list()))
    scales = dict(zip(s["column"].to_list(), s["scale"].to_list()))
    return acc, scales


# -- policy ------------------------------------------------------------------------------
def private_role(ws: "Workspace", decision: "Decision") -> tuple[DatasetPolicy, str] | None:
    """The dataset's policy and the role the gate decided by, when that role's queries are private."""
    ds = ws.policies.datasets.get(decision.resource.name)
    if ds is None:
        return None
    prefix = f"{ds.dataset}/access/"
    role = next((r[len(prefix):].split("/")[0] for r in decision.rule_ids if r.startswith(prefix)), None)
    if role is None or ds.query_mode(role) != "private":
        return None
    return ds, role


def may_be_private(ws: "Workspace", datasets: list[str]) -> bool:
    """Whether any role's queries over any of ``datasets`` are private (a cheap test before the gate)."""
    for name in datasets:
        ds = ws.policies.datasets.get(name)
        if ds is not None and (ds.query == "private" or any(a.query == "private" for a in ds.access.values())):
            return True
    return False


# -- compiling ---------------------------------------------------------------------------
def _refuse(what: str, why: str, hint: str = _HINT) -> SqlError:
    return SqlError(f"refused for a private role: {what} — {why}", hint=hint)


def compile_plan(sql: str, ws: "Workspace", ref: TableRef, decision: "Decision", *,
                 epsilon: float | None = None) -> PrivatePlan:
    """Check ``sql`` (already checked read-only over governed tables) as a private query of ``ref``.

    Args:
        sql: the query text (DuckDB dialect).
        ref: the one governed table it reads.
        decision: the gate's ``query`` decision for ``ref`` (its obligations: visible columns, masks).
        epsilon: the ε to spend (default and maximum: the policy's ``private_queries.epsilon_per_query``).

    Raises:
        SqlError: the query is not one the private layer can bound (the message says what and why).
    """
    found = private_role(ws, decision)
    if found is None:
        raise SqlError(f"{ref} is not answered privately for this role")
    ds, role = found
    pq = ds.private_queries
    eps = pq.epsilon_per_query if epsilon is None else float(epsilon)
    if not (eps > 0 and math.isfinite(eps)):
        raise SqlError(f"epsilon must be a positive number (got {epsilon!r})")
    tree = sqlglot.parse_one(sql, dialect="duckdb")
    if isinstance(tree, exp.SetOperation):
        raise _refuse(type(tree).__name__.upper(), "a set operation combines row sets; each part would need its "
                      "own budget and the result's sensitivity is not bounded here")
    if not isinstance(tree, exp.Select):
        raise _refuse("this statement", "only a single SELECT is answered privately")
    if tree.args.get("with") is not None:
        raise _refuse("WITH (a common table expression)", "the private layer reads one table directly")
    if tree.args.get("joins"):
        raise _refuse("JOIN", "a join can multiply one subject's rows; contributions are bounded on one table")
    if tree.args.get("distinct") is not None:
        raise _refuse("SELECT DISTINCT", "it releases the distinct values found in the data, which is not private")
    for arg, what, why in (
        ("having", "HAVING", "it filters on noisy aggregates and would hide which groups exist"),
        ("limit", "LIMIT", "a private result has one row per public group key; nothing to cut"),
        ("offset", "OFFSET", "a private result has one row per public group key; nothing to skip"),
        ("qualify", "QUALIFY", "window functions are not bounded"),
        ("windows", "WINDOW", "window functions are not bounded"),
        ("sample", "TABLESAMPLE", "sampling is not part of the private mechanism"),
    ):
        if tree.args.get(arg):
            raise _refuse(what, why)
    if any(True for _ in tree.find_all(exp.Window)):
        raise _refuse("a window function", "it returns a value per row, not a bounded aggregate")
    sub = [s for s in tree.find_all(exp.Select, exp.Subquery) if s is not tree]
    if sub:
        raise _refuse("a subquery", "the private layer reads one table directly")
    src = tree.args.get("from_") or tree.args.get("from")
    if src is None or not isinstance(src.this, exp.Table):
        raise _refuse("this FROM clause", "the private layer reads one governed table")
    table = src.this
    alias = table.alias_or_name.lower()
    policy_cols = ds.columns
    visible = set(decision.obligations.get("columns") or ())
    masks = dict(decision.obligations.get("masks") or {})

    def column_name(c: exp.Column, where: str) -> str:
        if c.table and c.table.lower() not in (alias, table.name.lower()):
            raise _refuse(f"column {c.sql(dialect='duckdb')}", "only the one table's columns are known here")
        name = c.name.lower()
        if name not in visible:
            raise SqlError(f"column {name} of {ref} is hidden from role {role} by the policy ({where})",
                           hint=f"policy rule {ds.dataset}/access/{role}/columns")
        return name

    # GROUP BY: plain columns with public keys.
    group: list[str] = []
    keys: dict[str, tuple[Any, ...]] = {}
    derived: list[str] = []  # group columns whose keys come from the data (thresholded, δ > 0)
    g = tree.args.get("group")
    if g is not None:
        if any(g.args.get(k) for k in ("rollup", "cube", "grouping_sets")):
            raise _refuse("ROLLUP / CUBE / GROUPING SETS", "each grouping set would spend budget of its own")
        for e in g.expressions:
            if not isinstance(e, exp.Column):
                raise _refuse(f"GROUP BY {e.sql(dialect='duckdb')}", "group by plain columns only (by name)")
            name = column_name(e, "GROUP BY")
            public = _public_keys(ds, name, masks, derived_ok=pq.delta_per_query is not None)
            if public is None:
                derived.append(name)
            else:
                keys[name] = public
            if name not in group:
                group.append(name)
    # SELECT list: group columns and aggregates.
    aggs: list[Aggregate] = []
    names: set[str] = set()
    for e in tree.expressions:
        inner = e.unalias() if isinstance(e, exp.Alias) else e
        if isinstance(inner, exp.Star) or (isinstance(inner, exp.Column) and isinstance(inner.this, exp.Star)):
            raise _refuse("SELECT *", "it returns rows, not aggregates")
        if isinstance(inner, exp.Column):
            name = column_name(inner, "SELECT")
            if name not in group:
                raise _refuse(f"the non-aggregate column {name}",
                              "a private role sees aggregates only; a column may appear only as a GROUP BY key")
            if isinstance(e, exp.Alias) and e.alias.lower() != name:
                raise _refuse(f"renaming the group column {name}", "group columns keep their names")
            continue
        agg = _aggregate(inner, e, column_name, ds, len(aggs))
        if agg.name in names or agg.name in group:
            raise _refuse(f"the duplicate output name {agg.name}", "name each aggregate uniquely (AS name)")
        names.add(agg.name)
        aggs.append(agg)
    if not aggs:
        raise _refuse("a query without an aggregate", "a private role sees aggregates only, never rows")
    # WHERE: a row-wise predicate over open columns.
    where = tree.args.get("where")
    where_sql = None
    if where is not None:
        for node in where.this.walk():
            if not isinstance(node, _PREDICATES):
                raise _refuse(f"{node.sql(dialect='duckdb')[:60]} in WHERE",
                              "only comparisons, IN, BETWEEN, IS [NOT] NULL and AND/OR/NOT of columns and literals "
                              "are allowed: a function or subquery could depend on other rows or leak values")
            if isinstance(node, exp.Column):
                name = column_name(node, "WHERE")
                pol = policy_cols.get(name)
                if name == ds.subject_key or (pol is not None and pol.class_ not in _OPEN_CLASSES):
                    cls = pol.class_.value if pol is not None else "?"
                    raise _refuse(f"WHERE on {name}", f"it is a {cls} column: filters use public and "
                                                      "quasi-identifier columns only")
        where_sql = where.this.sql(dialect="duckdb")
    # ORDER BY: group columns only.
    order: list[tuple[str, bool]] = []
    o = tree.args.get("order")
    if o is not None:
        for e in o.expressions:
            c = e.this
            if not isinstance(c, exp.Column) or c.name.lower() not in group:
                raise _refuse(f"ORDER BY {e.sql(dialect='duckdb')}",
                              "order by group columns only (ordering by a noisy value adds nothing)")
            order.append((c.name.lower(), bool(e.args.get("desc"))))
    key = ds.subject_key
    if ds.columns[key].unique and ref.layer == "silver":
        # Silver holds one row per subject when the key is unique (build_silver keeps each subject's latest
        # row): a row is a subject, so no per-subject truncation is needed — the same release, without
        # reading, passing and windowing a million subject keys.
        id_col: str | None = None
    elif key in visible and key not in masks or key in visible and masks.get(key) == "hash":
        id_col = key  # the token, or its keyed hash: one value per subject either way
    elif ds.columns[key].unique and pq.contributions == 1:
        id_col = None  # one row per subject (the contract says so): a row is a subject
    else:
        raise _refuse(f"{ref} for role {role}", f"the subject key {key} is not visible to the role, so one "
                      "subject's rows cannot be bounded", hint=f"show {key} (masked: hash) to {role} in the policy")
    table_sql = table.copy()
    return PrivatePlan(
        dataset=ds.dataset, ref=ref, table_sql=table_sql.sql(dialect="duckdb"), group_by=tuple(group), keys=keys,
        aggregates=tuple(aggs), where=where_sql, order=tuple(order), epsilon=eps, contributions=pq.contributions,
        id_column=id_col, delta=float(pq.delta_per_query) if derived and pq.delta_per_query else 0.0,
    )


def _public_keys(ds: DatasetPolicy, name: str, masks: dict[str, str], *,
                 derived_ok: bool = False) -> tuple[Any, ...] | None:
    """The column's public keys (the policy's ``allowed`` values, or a bool's two); None: its keys are
    to be found in the data by a thresholded release (only with ``private_queries.delta_per_query``)."""
    col = ds.columns.get(name)
    if name not in masks:
        if col is not None and col.allowed:
            return tuple(col.allowed)
        if col is not None and col.type == "bool":
            return (True, False)
    if col is not None and (name == ds.subject_key or col.class_ == ColumnClass.DIRECT_IDENTIFIER):
        raise _refuse(f"GROUP BY {name}", f"it is a {'subject key' if name == ds.subject_key else col.class_.value} "
                      "column: each value is one person's, so every group would be one person")
    if derived_ok:
        return None
    if name in masks:
        raise _refuse(f"GROUP BY {name}", f"the column is masked ({masks[name]}) for this role: its keys are not "
                      "the policy's, and releasing keys found in the data needs private_queries.delta_per_query",
                      hint=f"set private_queries.delta_per_query in the policy of '{ds.dataset}' (a thresholded "
                           "key release), or drop the GROUP BY")
    raise _refuse(f"GROUP BY {name}",
                  f"its keys are not public: the policy of '{ds.dataset}' lists no allowed values for {name}, and "
                  "releasing keys found in the data needs a thresholded key release (δ > 0), which this policy does "
                  "not allow", hint=f"declare columns.{name}.allowed, or set private_queries.delta_per_query, in the "
                                    f"policy of '{ds.dataset}'")


_AGG_NAMES = {exp.Count: "count", exp.Sum: "sum", exp.Avg: "avg"}


def _aggregate(inner: Any, e: Any, column_name: Any, ds: DatasetPolicy, i: int) -> Aggregate:
    kind = next((k for t, k in _AGG_NAMES.items() if type(inner) is t), None)
    if kind is None:
        shown = inner.sql(dialect="duckdb")[:60]
        if isinstance(inner, exp.AggFunc):
            raise _refuse(shown, "only COUNT, SUM and AVG are answered privately (MIN, MAX, medians, quantiles and "
                          "the like depend on single rows)")
        raise _refuse(shown, "a select item is a group column or COUNT / SUM / AVG of a column")
    arg = inner.this
    if isinstance(arg, exp.Distinct):
        raise _refuse(f"{kind.upper()}(DISTINCT …)", "distinct counts are not bounded by the private layer")
    if any(True for _ in inner.find_all(exp.Filter)) or isinstance(e.parent, exp.Filter):
        raise _refuse(f"{kind.upper()}(…) FILTER", "move the condition to WHERE")
    default = f"{kind}_star" if kind == "count" and isinstance(arg, exp.Star) else None
    if kind == "count" and isinstance(arg, exp.Star):
        name = e.alias if isinstance(e, exp.Alias) else "count_star"
        return Aggregate("count", None, name.lower() if name else default or f"agg{i}")
    if not isinstance(arg, exp.Column):
        raise _refuse(f"{kind.upper()}({arg.sql(dialect='duckdb') if arg else ''})",
                      "aggregates take one column by name (no expressions: their range would be unknown)")
    col = column_name(arg, kind.upper())
    name = (e.alias if isinstance(e, exp.Alias) else f"{kind}_{col}").lower()
    if kind == "count":
        return Aggregate("count_column", col, name)
    pol = ds.columns.get(col)
    if col == ds.subject_key or pol is None or pol.type not in ("int", "double") \
            or not isinstance(pol.min, (int, float)) or not isinstance(pol.max, (int, float)):
        why = ("it has no numeric min and max in the policy: without bounds one person could move the "
               "result without limit")
        raise _refuse(f"{kind.upper()}({col})", why, hint=f"declare columns.{col}.min and .max in the policy of "
                                                          f"'{ds.dataset}'")
    return Aggregate(kind, col, name, (math.floor(pol.min), math.ceil(pol.max)))  # type: ignore[arg-type]


def metadata(release: PrivateRelease) -> dict[bytes, bytes]:
    """The release, as Arrow schema metadata (``lakewarden.private``): travels with the table."""
    return {b"lakewarden.private": json.dumps({
        "epsilon": release.epsilon, "delta": release.delta, "mechanism": release.mechanism,
        "confidence": 1 - release.alpha, "rule_ids": list(release.rule_ids), "run_id": release.run_id,
        "noisy": True, "key_threshold": release.threshold,
    }).encode()}
