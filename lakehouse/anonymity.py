"""k-anonymity and l-diversity: measured over the policy's quasi-identifiers, enforced at silver and
on query results (issue #20).

An *equivalence class* is the set of rows that share one combination of quasi-identifier values
(NULL is a value of its own). ``k`` is the size of the smallest class; a class of size 1 is a row
that the quasi-identifiers alone single out. Distinct ``l`` of a sensitive column is the smallest
number of distinct values (NULL counting as one) that column takes within a class: ``l = 1`` means
that knowing someone's class tells their value.

:func:`measure` computes both over an Arrow table in one DuckDB ``GROUP BY`` (NULLs group
together, as above). It names the smallest classes by rank only (``c1``, ``c2``, … in order of
size): a report never carries the values that make a class small.

Used by:

* :func:`privacy_risk` — the verb of ``lakewarden privacy risk DATASET``, gated ``query`` on the
  table (the actor must see the quasi-identifiers; a role's row filter limits the rows measured)
  and audited as ``privacy.risk`` (counts only). Sensitive columns are sealed per subject; ``l`` is
  measured only where the gate lets the actor open them (stage ``evaluate`` with a purpose that
  allows sensitive attributes, as fairness evaluation does); otherwise the report says why not.
* :func:`enforce` — the silver build: with ``anonymity.k_min`` set, a build that does not meet it
  stops (``on_violation: stop``) or climbs the quasi-identifiers' ``hierarchy`` one level of one
  column at a time (``generalize``; see :func:`choose_levels`).
* :func:`check_result` — SQL results on either engine (``lakehouse.sql.run_query``,
  ``lakehouse.trino.run_query``): a result that carries quasi-identifier columns of a dataset with
  ``k_min`` is refused when its classes are smaller (a row-level result: its own rows; an aggregate:
  the rows behind each group). A connection straight to Trino, past Lakewarden, is not checked:
  Trino's compiled rules cannot count classes.
* :func:`check_training_set` — training sets (``features.store.Features.training_set``): classes
  of distinct subjects over the quasi-identifier features.

A refusal is :class:`ResultRefused` (an ``AccessDenied``, exit 3, rule ``<dataset>/anonymity/k_min``),
audited as a deny by the verb that refused.

Nothing here prints or logs values; errors carry sizes and counts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from governance.errors import AccessDenied
from governance.gate import Actor, Resource
from governance.policy import ColumnPolicy, DatasetPolicy, Stage
from lakehouse.errors import LakehouseError

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = [
    "AnonymityError", "AnonymityMeasure", "ClassInfo", "ResultRefused", "RiskReport", "check_result",
    "check_training_set", "choose_levels", "enforce", "group_sizes_sql", "level_sql", "measure", "measure_sizes",
    "privacy_risk",
]

META_ANONYMITY = "lakewarden.anonymity"  # silver commit metadata: levels applied, k and l achieved


class AnonymityError(LakehouseError):
    """k_min or l_min does not hold and cannot be reached: the message names sizes, never values."""


@dataclass(frozen=True, slots=True)
class ClassInfo:
    """One equivalence class, named by its rank (``c1`` is the smallest), never by its values."""

    id: str
    size: int
    l: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AnonymityMeasure:
    """k, the class-size distribution and l per sensitive column, with what falls below the thresholds.

    ``sizes``: ``(class size, number of classes of that size)``, smallest first.
    ``classes_below`` / ``rows_below``: classes smaller than ``k_min``, and the rows in them.
    ``l``: column -> distinct l (None when the table is empty). ``l_below``: column -> classes below ``l_min``.
    """

    rows: int
    classes: int
    k: int | None
    quasi_identifiers: tuple[str, ...]
    sizes: tuple[tuple[int, int], ...]
    smallest: tuple[ClassInfo, ...]
    k_min: int | None = None
    classes_below: int = 0
    rows_below: int = 0
    l: Mapping[str, int | None] = field(default_factory=dict)
    l_min: int | None = None
    l_below: Mapping[str, int] = field(default_factory=dict)

    @property
    def k_ok(self) -> bool:
        return self.k_min is None or self.rows == 0 or (self.k or 0) >= self.k_min

    @property
    def l_ok(self) -> bool:
        return self.l_min is None or all(v is None or v >= self.l_min for v in self.l.values())

    @property
    def ok(self) -> bool:
        return self.k_ok and self.l_ok

    def sizes_text(self, below: int | None = None, most: int = 8) -> str:
        """``'1×12, 2×5'``: class sizes (and how many classes have each), those below ``below`` only."""
        items = [(s, n) for s, n in self.sizes if below is None or s < below]
        text = ", ".join(f"{s}×{n}" for s, n in items[:most])
        return text + (", …" if len(items) > most else "")

    def summary(self) -> dict[str, Any]:
        """Counts only: for audit details and commit metadata."""
        return {"rows": self.rows, "classes": self.classes, "k": self.k, "k_min": self.k_min,
                "classes_below": self.classes_below, "rows_below": self.rows_below,
                "l": dict(self.l), "l_min": self.l_min, "l_below": dict(self.l_below)}


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def measure(
    table: pa.Table,
    quasi_identifiers: Sequence[str],
    sensitive: Sequence[str] = (),
    *,
    k_min: int | None = None,
    l_min: int | None = None,
    smallest: int = 5,
    con: duckdb.DuckDBPyConnection | None = None,
) -> AnonymityMeasure:
    """k (and distinct l per ``sensitive`` column) of ``table`` over ``quasi_identifiers``.

    Example::

        >>> t = pa.table({"y": [1980, 1980, 1990, 1990, 1990], "s": ["a", "b", "a", "a", "a"]})
        >>> m = measure(t, ["y"], ["s"], k_min=3)
        >>> (m.k, m.classes, m.classes_below, m.rows_below, m.l["s"], m.smallest[0].size)
        (2, 2, 1, 2, 1, 2)
    """
    qi = list(quasi_identifiers)
    for c in [*qi, *sensitive]:
        if c not in table.column_names:
            raise LakehouseError(f"column '{c}' is not in the table measured (columns: {', '.join(table.column_names)})")
    own = con is None
    con = con or duckdb.connect(":memory:")
    try:
        con.register("_anon_t", table.select([*dict.fromkeys([*qi, *sensitive])]) if qi or sensitive else table)
        group = f"GROUP BY {', '.join(_q(c) for c in qi)}" if qi else ""
        ls = "".join(
            f", count(DISTINCT {_q(s)}) + CAST(count(*) > count({_q(s)}) AS INTEGER) AS {_q('l_' + s)}"
            for s in sensitive
        )
        order = f"hash({', '.join(_q(c) for c in qi)})" if qi else "1"
        con.execute(f"CREATE OR REPLACE TEMP TABLE _anon_c AS SELECT count(*) AS n{ls}, {order} AS h "
                    f"FROM _anon_t {group}")
        rows, classes, k = con.execute("SELECT coalesce(sum(n), 0), count(*), min(n) FROM _anon_c").fetchone()
        if rows == 0:
            classes, k = 0, None
        sizes = tuple((int(s), int(n)) for s, n in con.execute(
            "SELECT n, count(*) FROM _anon_c GROUP BY n ORDER BY n").fetchall())
        below = rows_below = 0
        if k_min is not None:
            below, rows_below = con.execute(
                f"SELECT count(*), coalesce(sum(n), 0) FROM _anon_c WHERE n < {int(k_min)}").fetchone()
        l: dict[str, int | None] = {}
        l_below: dict[str, int] = {}
        for s in sensitive:
            l[s] = con.execute(f"SELECT min({_q('l_' + s)}) FROM _anon_c").fetchone()[0]
            if l_min is not None:
                l_below[s] = con.execute(f"SELECT count(*) FROM _anon_c WHERE {_q('l_' + s)} < {int(l_min)}").fetchone()[0]
        lcols = "".join(f", {_q('l_' + s)}" for s in sensitive)
        least = con.execute(
            f"SELECT n{lcols} FROM _anon_c ORDER BY n{lcols}, h LIMIT {max(0, int(smallest))}").fetchall()
        small = tuple(ClassInfo(f"c{i + 1}", int(r[0]), {s: int(v) for s, v in zip(sensitive, r[1:])})
                      for i, r in enumerate(least))
        con.execute("DROP TABLE _anon_c")
        con.unregister("_anon_t")
    finally:
        if own:
            con.close()
    return AnonymityMeasure(
        rows=int(rows), classes=int(classes), k=None if k is None else int(k), quasi_identifiers=tuple(qi),
        sizes=sizes, smallest=small, k_min=k_min, classes_below=int(below), rows_below=int(rows_below),
        l=l, l_min=l_min, l_below=l_below,
    )


# -- generalization hierarchy ---------------------------------------------------------------
def level_sql(col: ColumnPolicy, level: str, expr: str) -> str:
    """SQL that takes a value stored at the column's ingest level (``generalize``) to ``level``
    (one of its ``hierarchy``), keeping the stored type (int years, text, double buckets)."""
    base = col.generalize or ""
    if level == base:
        return expr
    kind = base.partition(":")[0]
    lk, _, la = level.partition(":")
    if kind == "year":
        width = 10 if level == "decade" else int(la)
        return f"CAST(floor({expr} / {width}) * {width} AS INTEGER)"
    if kind == "month":
        return f"left({expr}, 4)" if level == "year" else f"left({expr}, 3) || '0'"
    if kind == "prefix":
        return f"left({expr}, {int(la)})"
    if kind == "bucket":
        v = float(la)
        return f"floor({expr} / {v!r}) * {v!r}"
    raise LakehouseError(f"unsupported generalization level {level!r} for generalize {base!r}")


def _apply(policy: DatasetPolicy, table: pa.Table, levels: Mapping[str, int],
           con: duckdb.DuckDBPyConnection) -> pa.Table:
    """``table`` with each quasi-identifier taken to its chosen hierarchy level."""
    moved = {c: i for c, i in levels.items() if i > 0}
    if not moved:
        return table
    con.register("_anon_src", table)
    sel = []
    for name in table.column_names:
        if name in moved:
            col = policy.columns[name]
            sel.append(f"{level_sql(col, (col.hierarchy or [])[moved[name]], _q(name))} AS {_q(name)}")
        else:
            sel.append(_q(name))
    out = con.sql(f"SELECT {', '.join(sel)} FROM _anon_src").to_arrow_table()
    con.unregister("_anon_src")
    return out


def replace_sql(policy: DatasetPolicy, levels: Mapping[str, int]) -> str:
    """``* REPLACE (…)`` list for a view that shows the quasi-identifiers at ``levels`` ("" if none moved)."""
    parts = []
    for name, i in levels.items():
        if i > 0:
            col = policy.columns[name]
            parts.append(f"{level_sql(col, (col.hierarchy or [])[i], _q(name))} AS {_q(name)}")
    return f"REPLACE ({', '.join(parts)})" if parts else ""


def choose_levels(
    policy: DatasetPolicy, table: pa.Table, sensitive: Sequence[str] = (), *, k_min: int, l_min: int | None = None,
) -> tuple[dict[str, int], AnonymityMeasure]:
    """The hierarchy levels (quasi-identifier -> index into its ``hierarchy``; 0 = the ingest's level) at
    which ``table`` meets ``k_min`` (and ``l_min``), and the measure there.

    Greedy, one level of one column per step: each column that has a next level is tried one level
    up, and the step taken is the one that leaves the fewest rows in classes below ``k_min`` (plus,
    with ``l_min``, the number of classes below it per sensitive column) — the move that merges most small classes — ties going to
    the column listed first in the policy. Levels nest (the policy checks it), so a step only merges
    classes and k never falls. Raises :class:`AnonymityError` when every column is at its top
    level and the thresholds still fail.
    """
    qi = policy.quasi_identifiers()
    levels = {c: 0 for c in qi}
    con = duckdb.connect(":memory:")
    try:
        cur = measure(table, qi, sensitive, k_min=k_min, l_min=l_min, con=con)
        while not cur.ok:
            best: tuple[int, int, str, AnonymityMeasure] | None = None
            for order, c in enumerate(qi):
                top = len(policy.columns[c].hierarchy or [policy.columns[c].generalize])
                if levels[c] + 1 >= top:
                    continue
                levels[c] += 1
                m = measure(_apply(policy, table, levels, con), qi, sensitive, k_min=k_min, l_min=l_min, con=con)
                score = m.rows_below + (sum(m.l_below.values()) if l_min else 0)
                levels[c] -= 1
                if best is None or (score, order) < (best[0], best[1]):
                    best = (score, order, c, m)
            if best is None:
                raise AnonymityError(
                    f"{_what(policy.dataset, cur)} even at the top level of every quasi-identifier's hierarchy "
                    f"({_levels_text(policy, levels)})",
                    hint=f"add coarser levels to the hierarchies in the policy of '{policy.dataset}', or lower k_min",
                )
            levels[best[2]] += 1
            cur = best[3]
    finally:
        con.close()
    return levels, cur


def _levels_text(policy: DatasetPolicy, levels: Mapping[str, int]) -> str:
    return ", ".join(f"{c}: {(policy.columns[c].hierarchy or [policy.columns[c].generalize])[i]}"
                     for c, i in levels.items())


def _what(dataset: str, m: AnonymityMeasure) -> str:
    """The violation in counts and sizes only."""
    parts = []
    if not m.k_ok:
        parts.append(f"k={m.k} < k_min={m.k_min}: {m.classes_below} equivalence class(es) below k_min "
                     f"(sizes {m.sizes_text(below=m.k_min)}; {m.rows_below} row(s)); smallest: "
                     + ", ".join(f"{c.id} ({c.size} row{'s' if c.size != 1 else ''})" for c in m.smallest[:3]))
    if not m.l_ok:
        for s, v in m.l.items():
            if v is not None and m.l_min is not None and v < m.l_min:
                parts.append(f"l({s})={v} < l_min={m.l_min}: {m.l_below.get(s, 0)} class(es) below l_min")
    return f"silver.{dataset}: anonymity not met over ({', '.join(m.quasi_identifiers)}): " + "; ".join(parts)


# -- reading the sensitive columns -----------------------------------------------------------
def open_sensitive(ws: "Workspace", policy: DatasetPolicy, table: pa.Table, columns: Sequence[str]) -> pa.Table:
    """``table`` with each sealed column in ``columns`` replaced by its plaintext (in memory only)."""
    opened = ws.keyring.open_arrow_columns({c: table[c] for c in columns}, table[policy.subject_key],
                                           dataset=policy.dataset)  # each subject's key looked up once
    out = table
    for c in columns:
        out = out.set_column(out.column_names.index(c), c, pc.cast(opened[c], pa.string()))
    return out


# -- the silver build ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Enforced:
    levels: dict[str, int]
    measure: AnonymityMeasure

    def meta(self, policy: DatasetPolicy) -> dict[str, Any]:
        return {"levels": {c: (policy.columns[c].hierarchy or [policy.columns[c].generalize])[i]
                           for c, i in self.levels.items()},
                "on_violation": policy.anonymity.on_violation if policy.anonymity else None,
                **self.measure.summary()}


def _policy_measure(ws: "Workspace", policy: DatasetPolicy, table: pa.Table) -> tuple[pa.Table, AnonymityMeasure]:
    a = policy.anonymity
    assert a is not None
    qi = policy.quasi_identifiers()
    sens = policy.l_columns() if a.l_min is not None else []
    data = open_sensitive(ws, policy, table, sens) if sens else table
    data = data.select([*qi, *sens])
    return data, measure(data, qi, sens, k_min=a.k_min, l_min=a.l_min)


def enforce(ws: "Workspace", policy: DatasetPolicy, table: pa.Table) -> Enforced:
    """Check silver's rows (``table``: the quasi-identifiers, the encrypted sensitive columns if
    ``l_min`` is set, and the subject key) against the policy's ``anonymity``; return the hierarchy
    levels to apply (all 0 when the thresholds hold as ingested).

    The build opens the sensitive values in memory to count them per class, as the enforcer the
    policy asks for; only counts leave this function. Raises :class:`AnonymityError` (stop, or
    generalize that cannot reach the thresholds)."""
    a = policy.anonymity
    assert a is not None
    data, m = _policy_measure(ws, policy, table)
    if m.ok:
        return Enforced({c: 0 for c in policy.quasi_identifiers()}, m)
    if a.on_violation == "stop":
        raise AnonymityError(
            _what(policy.dataset, m),
            hint=f"coarsen the quasi-identifiers or set anonymity.on_violation: generalize with a hierarchy "
                 f"in the policy of '{policy.dataset}'",
        )
    sens = [c for c in data.column_names if c not in policy.quasi_identifiers()]
    levels, m = choose_levels(policy, data, sens, k_min=a.k_min, l_min=a.l_min)
    return Enforced(levels, m)


def confirm(ws: "Workspace", policy: DatasetPolicy, table: pa.Table, levels: Mapping[str, int]) -> Enforced:
    """Measure the rows silver will hold once generalized (``table`` read through the new levels) and
    raise :class:`AnonymityError` if they miss the thresholds after all."""
    _, m = _policy_measure(ws, policy, table)
    if not m.ok:
        raise AnonymityError(_what(policy.dataset, m) + f" (at {_levels_text(policy, levels)})")
    return Enforced(dict(levels), m)


# -- the verb: lakewarden privacy risk -------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RiskReport:
    """What ``privacy risk`` found: the measure, and what it could not measure and why."""

    dataset: str
    layer: str
    version: int
    measure: AnonymityMeasure
    sensitive_unmeasured: Mapping[str, str]
    row_filter: str | None = None
    applied: Mapping[str, Any] | None = None  # silver's commit metadata: levels the build applied
    query: str | None = None  # measured: this query's result (an export), not the table


def _purpose_for_sensitive(ws: "Workspace", actor: Actor, policy: DatasetPolicy) -> str | None:
    roles = actor.roles or ws.policies.roles_of(actor.name)
    for role in roles:
        acc = policy.access.get(role)
        for p in acc.purposes if acc else ():
            spec = policy.purposes.get(p)
            if spec is not None and spec.sensitive:
                return p
    return None


def privacy_risk(
    ws: "Workspace",
    actor: Actor,
    dataset: str,
    *,
    layer: str = "silver",
    k_min: int | None = None,
    l_min: int | None = None,
    purpose: str | None = None,
    smallest: int = 5,
    query: str | None = None,
) -> RiskReport:
    """k and l of ``layer.dataset`` over the policy's quasi-identifiers, as ``actor``; with ``query``,
    k of what that query would export instead (:func:`query_risk`).

    Gated ``query`` on the table, with the quasi-identifiers as the columns asked for (a role that
    may not see them is refused; a role's row filter limits the rows measured, and the report says
    so). l is measured per encrypted sensitive column only where the gate allows ``actor`` to open
    it (stage ``evaluate``, ``purpose`` or else the first purpose of the actor's access that allows
    sensitive attributes); otherwise ``sensitive_unmeasured`` names the reason. ``k_min``/``l_min``
    default to the policy's ``anonymity``. Audited as ``privacy.risk`` with counts only.

    Raises:
        AccessDenied: the gate refused.
        TableError / LakehouseError: no such table, or a bad argument.
    """
    from lakehouse.catalog import Catalog, TableRef
    from lakehouse.errors import TableError

    if query is not None:
        return query_risk(ws, actor, dataset, query, k_min=k_min, smallest=smallest)
    if layer not in ("bronze", "silver"):
        raise LakehouseError(f"privacy risk measures the bronze or silver layer (got {layer!r})")
    if k_min is not None and k_min < 1:
        raise LakehouseError(f"--k-min must be 1 or more (got {k_min})")
    if l_min is not None and l_min < 1:
        raise LakehouseError(f"--l-min must be 1 or more (got {l_min})")
    policy = ws.policies.datasets.get(dataset)
    qi = policy.quasi_identifiers() if policy else []
    decision = ws.gate.enforce(Stage.QUERY, actor, Resource.table(dataset, layer), {"layer": layer, "columns": qi})
    assert policy is not None  # the gate denies an unknown dataset
    a = policy.anonymity
    k_min = k_min if k_min is not None else (a.k_min if a else None)
    l_min = l_min if l_min is not None else (a.l_min if a else None)
    cat = Catalog(ws.config)
    ref = TableRef(layer, dataset)
    if not cat.exists(ref):
        raise TableError(f"table {ref} does not exist", hint=f"ingest '{dataset}' (and build silver) first")
    dt = cat.open(ref)
    version = dt.version()
    names = {f.name for f in dt.schema().fields}
    unmeasured: dict[str, str] = {}
    sens: list[str] = []
    for c in policy.l_columns():
        if c not in names:
            unmeasured[c] = f"not in {ref}"
            continue
        p = purpose or _purpose_for_sensitive(ws, actor, policy)
        if p is None:
            unmeasured[c] = "not opened: none of your roles' purposes allows sensitive attributes"
            continue
        d = ws.gate.decide(Stage.EVALUATE, actor, Resource.dataset(dataset), {"purpose": p, "columns": [c]})
        if not d.allowed:
            unmeasured[c] = f"not opened: denied by {d.rule_ids[-1] if d.rule_ids else 'the gate'}"
            continue
        sens.append(c)
    for c in policy.columns:
        col = policy.columns[c]
        if col.class_.value == "sensitive" and c not in policy.l_columns():
            unmeasured[c] = f"protection '{col.protection.value if col.protection else ''}': not in {ref}"
    missing = [c for c in qi if c not in names]
    if missing:
        raise TableError(f"{ref} has no column(s) {', '.join(missing)}", hint="rebuild it under the current policy")
    read = list(dict.fromkeys([*qi, *sens, *([policy.subject_key] if sens else [])]))
    row_filter = decision.obligations.get("row_filter") if decision.obligations else None
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone='UTC'")
        con.register("_t", dt.to_pyarrow_dataset())
        where = f" WHERE ({row_filter})" if row_filter else ""
        table = con.sql(f"SELECT {', '.join(_q(c) for c in read)} FROM _t{where}").to_arrow_table() if read else \
            con.sql(f"SELECT count(*) AS n FROM _t{where}").to_arrow_table()
        if sens:
            table = open_sensitive(ws, policy, table, sens)
        if not read:  # no quasi-identifier: the whole table is one class
            n = table["n"][0].as_py()
            table = pa.table({"_all": pa.repeat(pa.scalar(0), n)})
        m = measure(table, qi, sens, k_min=k_min, l_min=l_min, smallest=smallest, con=con)
    finally:
        con.close()
    applied = None
    if layer == "silver":
        last = dt.history(1)[0] if version is not None else {}
        if last.get(META_ANONYMITY):
            applied = json.loads(last[META_ANONYMITY])
    ws.audit.record(
        "privacy.risk", actor=actor.name, outcome="ok", stage=Stage.QUERY.value, resource=f"table:{ref}",
        details={"version": version, **m.summary(), "quasi_identifiers": qi,
                 "unmeasured": sorted(unmeasured), "row_filter": bool(row_filter)},
    )
    return RiskReport(dataset, layer, version, m, unmeasured, row_filter, applied)


def query_risk(ws: "Workspace", actor: Actor, dataset: str, query: str, *, k_min: int | None = None,
               smallest: int = 5) -> RiskReport:
    """k of the export ``query`` would make, over ``dataset``'s quasi-identifiers, as ``actor`` (the
    same gate, masks and row filter as ``lakewarden sql``): measured, not refused, so that an analyst
    can see why an export would be refused and how far it is from k_min. Sizes only, never values.
    A result without quasi-identifier columns is one class. l is not measured on query results.

    Raises:
        SqlError: the query is not one the SQL layer accepts, does not read ``dataset``, or the role's
            queries over it are private (their exports are noisy aggregates: k does not apply).
        AccessDenied: the gate refused a table.
    """
    import hashlib

    from governance.pii import redact
    from lakehouse.catalog import Catalog
    from lakehouse.errors import SqlError
    from lakehouse.sql import _checked, _decide, _execute, _is_private

    policy = ws.policies.datasets.get(dataset)
    if policy is None:
        raise SqlError(f"no dataset '{dataset}' in the policies")
    if k_min is not None and k_min < 1:
        raise LakehouseError(f"--k-min must be 1 or more (got {k_min})")
    uses = _checked(query, ws)
    mine = [u for u in uses if u.ref.dataset == dataset]
    if not mine:
        raise SqlError(f"the query does not read '{dataset}' (it reads {', '.join(str(u.ref) for u in uses)})")
    decided = _decide(ws, actor, uses, version=None, as_of=None)
    if _is_private(ws, uses, [d.decision for d in decided]):
        raise SqlError(f"your role's queries over '{dataset}' are private: they export noisy aggregates, to which "
                       "k-anonymity does not apply")
    table = _execute(ws, actor, query, uses, version=None, as_of=None, max_rows=None, decided=decided).table
    k_min = k_min if k_min is not None else (policy.anonymity.k_min if policy.anonymity else None)

    def sizes(q: str) -> pa.Table:
        return _execute(ws, actor, q, uses, version=None, as_of=None, max_rows=None, decided=decided).table

    found = result_measure(policy, query, table, k_min=k_min, sizes=sizes, smallest=smallest)
    m = found[1] if found is not None else measure(table, [], k_min=k_min, smallest=0)
    ref = mine[0].ref
    version = Catalog(ws.config).open(ref).version()
    ws.audit.record(
        "privacy.risk", actor=actor.name, outcome="ok", stage=Stage.QUERY.value, resource=f"table:{ref}",
        details={"version": version, **m.summary(), "quasi_identifiers": list(m.quasi_identifiers),
                 "query_sha256": hashlib.sha256(query.encode("utf-8")).hexdigest(), "query": redact(query)[0][:500]},
    )
    return RiskReport(dataset, ref.layer, version, m, {c: "not measured on query results"
                                                       for c in policy.l_columns()}, None, None, query)


# -- query results (exports) -----------------------------------------------------------------
def _qi_outputs(sql: str, result_columns: Sequence[str], qi_names: set[str], *, dialect: str = "duckdb") -> list[str]:
    """Result columns that carry a quasi-identifier: named like one, an alias of an expression over one
    (through any depth of subqueries and CTEs), or an unnamed expression that mentions one."""
    carriers = _carriers(sql, qi_names, dialect)
    out = []
    for col in result_columns:
        low = col.lower()
        if low in carriers or (not re.match(r"count(_star)?\s*\(", low)  # a count hands out no value
                               and any(re.search(rf"\b{re.escape(c)}\b", low) for c in carriers)):
            out.append(col)
    return out


def _counted(node: Any) -> bool:
    """Whether a column reference sits inside a COUNT (which hands out how many, not a value)."""
    from sqlglot import exp

    parent = node.parent
    while parent is not None:
        if isinstance(parent, exp.Count):
            return True
        if isinstance(parent, (exp.Select, exp.Alias)):
            return False
        parent = parent.parent
    return False


def _carriers(sql: str, qi_names: set[str], dialect: str) -> set[str]:
    """The quasi-identifiers' names, lower case, and every alias of an expression over one of them.
    A table's name or alias used as a value (DuckDB's ``SELECT t FROM t``: the whole row as a struct;
    ``to_json(t)``) carries every column of it, so those names are carriers too."""
    import sqlglot
    from sqlglot import exp

    carriers = {n.lower() for n in qi_names}
    try:
        tree = sqlglot.parse_one(sql, read=dialect)
    except sqlglot.errors.ParseError:
        tree = None
    if tree is not None:
        rows = {t.alias_or_name.lower() for t in tree.find_all(exp.Table)}
        rows |= {q.alias.lower() for q in tree.find_all(exp.Subquery) if q.alias}
        rows |= {c.alias.lower() for c in tree.find_all(exp.CTE) if c.alias}
        carriers |= {c.name.lower() for c in tree.find_all(exp.Column) if not c.table and c.name.lower() in rows}
        changed = True
        while changed:
            changed = False
            for al in tree.find_all(exp.Alias):
                name = al.alias.lower()
                if name and name not in carriers and any(
                        c.name.lower() in carriers and not _counted(c) for c in al.this.find_all(exp.Column)):
                    carriers.add(name)
                    changed = True
    return carriers


class ResultRefused(AccessDenied):
    """A result (a query's, a training set's) that would break the policy's ``k_min``: a policy refusal
    (exit 3) under the rule ``<dataset>/anonymity/k_min``, audited as a deny by the verb that refused it.
    The message carries sizes and counts, never values."""

    def __init__(self, decision: Any, *, hint: str | None = None) -> None:
        super().__init__(decision)
        self.hint = hint


def _refused(actor: Actor, dataset: str, what: str, m: AnonymityMeasure, *, layer: str = "silver",
             hint: str) -> ResultRefused:
    from governance.gate import Decision

    k_min = m.k_min or 0
    reason = (f"{what} form(s) {m.classes_below} class(es) smaller than k_min={k_min} (k={m.k}; sizes "
              f"{m.sizes_text(below=k_min)}; {m.rows_below} of {m.rows} rows)")
    decision = Decision(False, (reason,), (f"{dataset}/anonymity/k_min",), Stage.QUERY, actor,
                        Resource.table(dataset, layer))
    return ResultRefused(decision, hint=hint)


def measure_sizes(sizes: Sequence[int], quasi_identifiers: Sequence[str], *, k_min: int | None) -> AnonymityMeasure:
    """A measure from class sizes already counted (an aggregate's groups: each group is a class)."""
    counted: dict[int, int] = {}
    for n in sizes:
        counted[int(n)] = counted.get(int(n), 0) + 1
    below = [n for n in sizes if k_min is not None and n < k_min]
    return AnonymityMeasure(
        rows=int(sum(sizes)), classes=len(sizes), k=min(sizes) if sizes else None,
        quasi_identifiers=tuple(quasi_identifiers), sizes=tuple(sorted(counted.items())), smallest=(),
        k_min=k_min, classes_below=len(below), rows_below=int(sum(below)),
    )


SIZE_COLUMN = "__lw_class_size"


def group_sizes_sql(sql: str, dialect: str = "duckdb", *, having: bool = True,
                    qi_names: set[str] | None = None) -> str | None:
    """For a query whose top level aggregates (GROUP BY, DISTINCT, or aggregates without GROUP BY): the
    query that counts the rows behind each of its result rows (one column, ``__lw_class_size``), over
    the same FROM, joins, WHERE, GROUP BY and HAVING. None for a row-level query (each result row is
    then one row of a class) or one whose shape is not recognised (measured row-level: stricter)."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read=dialect)
    except sqlglot.errors.ParseError:
        return None
    if not isinstance(tree, exp.Select) or tree.args.get("with") is not None:
        return None
    group = tree.args.get("group")
    distinct = tree.args.get("distinct") is not None
    aggregated = any(isinstance(e.unalias() if isinstance(e, exp.Alias) else e, exp.AggFunc)
                     or any(True for _ in e.find_all(exp.AggFunc)) for e in tree.expressions)
    if any(True for _ in tree.find_all(exp.Window)):
        return None  # a window keeps one output row per input row: row-level
    if group is None and not distinct and not aggregated:
        return None
    items = [e.unalias() if isinstance(e, exp.Alias) else e for e in tree.expressions]
    aliases = {e.alias.lower(): e.unalias() for e in tree.expressions if isinstance(e, exp.Alias) and e.alias}
    keys: list[Any] = []
    if group is not None:
        if group.args.get("all"):  # GROUP BY ALL: the select items that aggregate nothing
            keys = [i for i in items if not any(True for _ in i.find_all(exp.AggFunc))]
        else:
            for g in group.expressions:
                if isinstance(g, (exp.Rollup, exp.Cube, exp.GroupingSets)) or any(
                        group.args.get(k) for k in ("rollup", "cube", "grouping_sets")):
                    return None  # several groupings in one result: measured row-level (stricter)
                if isinstance(g, exp.Literal) and not g.is_string:  # GROUP BY 1: the first select item
                    n = int(g.this)
                    if not 1 <= n <= len(items):
                        return None
                    keys.append(items[n - 1])
                elif isinstance(g, exp.Column) and not g.table and g.name.lower() in aliases:
                    target = aliases[g.name.lower()]  # GROUP BY an alias of the select list
                    if not (isinstance(target, exp.Column) and target.name.lower() == g.name.lower()):
                        return None  # an alias that may also name a column: ambiguous, measured row-level
                    keys.append(target)
                else:
                    keys.append(g)
    elif distinct:  # SELECT DISTINCT a, b: the classes are the distinct rows
        keys = items
    if qi_names:
        # An aggregate other than COUNT over a quasi-identifier hands out row values (list, string_agg,
        # histogram, min, max, any_value) or what few rows decide (avg, sum): its values are counted as
        # classes of their own within each group, as if its rows were released.
        carriers = _carriers(sql, qi_names, dialect)
        seen = {k.sql(dialect=dialect) for k in keys}
        for item in items:
            for agg in item.find_all(exp.AggFunc):
                if isinstance(agg, exp.Count):
                    continue
                for c in agg.find_all(exp.Column):
                    if c.name.lower() in carriers and c.sql(dialect=dialect) not in seen:
                        seen.add(c.sql(dialect=dialect))
                        keys.append(c)
    q = tree.copy()
    for arg in ("order", "limit", "offset", "distinct", *(() if having else ("having",))):
        q.set(arg, None)
    q.set("group", exp.Group(expressions=[k.copy() for k in keys]) if keys else None)
    q.set("expressions", [exp.alias_(exp.Count(this=exp.Star()), SIZE_COLUMN, quoted=True)])
    return q.sql(dialect=dialect)


def result_measure(policy: DatasetPolicy, sql: str, table: pa.Table, *, k_min: int | None, sizes: Any = None,
                   dialect: str = "duckdb", counted: list[int] | None = None, smallest: int = 0,
                   ) -> tuple[list[str], AnonymityMeasure, str, list[int] | None] | None:
    """The classes of a query result over ``policy``'s quasi-identifiers: ``(columns, measure, what,
    group sizes)``, or None when the result carries none of them. A row-level result is measured on
    its own rows (listing its ``smallest`` classes by rank); an aggregate (GROUP BY, DISTINCT) by the
    rows behind each result row, counted by ``sizes(group_sizes_sql(sql))`` (``counted``: sizes
    already counted for this query)."""
    qi = set(policy.quasi_identifiers())
    cols = _qi_outputs(sql, table.column_names, qi, dialect=dialect)
    if not cols:
        return None
    sizing = group_sizes_sql(sql, dialect, qi_names=qi) if sizes is not None or counted is not None else None
    if sizing is not None and counted is None:
        # HAVING may name the select list's aliases, which the counting query no longer has: without
        # it, every group is counted (stricter); a query that cannot be counted is measured row-level.
        for having in (True, False):
            attempt = sizing if having else group_sizes_sql(sql, dialect, having=False, qi_names=qi)
            if attempt is None or (not having and attempt == sizing):
                continue
            try:
                got = sizes(attempt)
            except LakehouseError:
                continue
            counted = [int(v) for v in got.column(SIZE_COLUMN).to_pylist() if v is not None]
            break
    if sizing is not None and counted is not None:
        return cols, measure_sizes(counted, cols, k_min=k_min), f"the result's groups (by {', '.join(cols)})", counted
    return (cols, measure(table, cols, k_min=k_min, smallest=smallest),
            f"the result's quasi-identifier column(s) {', '.join(cols)}", None)


def check_result(ws: "Workspace", actor: Actor, sql: str, datasets: Sequence[str], table: pa.Table, *,
                 sizes: Any = None, dialect: str = "duckdb") -> None:
    """Refuse a query result whose quasi-identifier columns, of a dataset with ``anonymity.k_min``, form
    a class smaller than k_min (:class:`ResultRefused`, rule ``<dataset>/anonymity/k_min``).

    A row-level result is measured over its quasi-identifier columns (each row one member of its class).
    An aggregate result (GROUP BY, DISTINCT) is measured by the rows behind each result row: ``sizes``
    runs :func:`group_sizes_sql` through the same governed views and engine, and every group must hold
    at least k_min rows (the minimum cell size of statistical disclosure control). Results without
    such columns, and datasets without ``anonymity``, pass untouched.
    """
    counted: list[int] | None = None
    for ds in dict.fromkeys(datasets):
        policy = ws.policies.datasets.get(ds)
        if policy is None or policy.anonymity is None or table.num_rows == 0:
            continue
        found = result_measure(policy, sql, table, k_min=policy.anonymity.k_min, sizes=sizes, dialect=dialect,
                               counted=counted)
        if found is None:
            continue
        _, m, what, counted = found
        if not m.k_ok:
            raise _refused(actor, ds, what, m, hint="select coarser values (e.g. a decade, a shorter prefix) or "
                           "larger groups; `lakewarden privacy risk` measures the table")


def check_training_set(ws: "Workspace", actor: Actor, policy: DatasetPolicy, table: pa.Table) -> None:
    """Refuse a training set (an export) whose quasi-identifier columns form a class of fewer than
    ``anonymity.k_min`` distinct subjects (:class:`ResultRefused`). A subject with rows at several times
    counts once per class it is in, so repeated entity rows cannot make a class look larger."""
    if policy.anonymity is None or table.num_rows == 0:
        return
    qi = [c for c in policy.quasi_identifiers() if c in table.column_names]
    if not qi:
        return
    key = policy.subject_key
    cols = [key, *qi] if key in table.column_names else qi
    con = duckdb.connect(":memory:")
    try:
        con.register("_ts", table.select(cols))
        distinct = con.execute(f"SELECT DISTINCT {', '.join(_q(c) for c in cols)} FROM _ts").to_arrow_table()
    finally:
        con.close()
    m = measure(distinct, qi, k_min=policy.anonymity.k_min, smallest=0)
    if not m.k_ok:
        raise _refused(actor, policy.dataset, f"the training set's quasi-identifier column(s) {', '.join(qi)}",
                       m, hint="select coarser features, or more entities; `lakewarden privacy risk` measures "
                       "silver")
