"""Embedded SQL over governed tables: each role sees exactly what its policy allows.

``run_query`` answers one read-only query with DuckDB, in a fresh in-memory
connection where every governed table the query names is a *view* that shows
only the role's visible columns, each through its mask, and only the rows its
row filter keeps. The raw table is registered under a random name that the
query cannot reach::

    with Workspace.open() as ws:
        res = run_query(ws, ws.actor("ana"), "SELECT region, count(*) FROM customers GROUP BY region")
        res.table            # a pyarrow.Table
        res.masked           # {"silver.customers": {"customer_id": "hash", "income": "bucket:10000", ...}}

How a query is checked, before any data is touched:

1. DuckDB's own parser: exactly one statement, of type SELECT.
2. sqlglot (duckdb dialect): the statement is a SELECT / WITH … SELECT / UNION /
   INTERSECT / EXCEPT (no ``SELECT … INTO``, SUMMARIZE, PIVOT statement, no DESCRIBE but of a
   table: see below);
   every table reference that is not a CTE (resolved by scope) is ``dataset`` or
   ``layer.dataset`` of a governed dataset; FROM holds no table function, file path
   or ``AT (VERSION => …)``.
3. DuckDB's serialized parse tree (``json_serialize_sql``) again: no table
   function anywhere, and every base table is one the second step found or a CTE
   name — so a difference between the two parsers fails closed.
4. The policy gate decides ``query`` for each table (``AccessDenied`` propagates).
5. The query runs with ``enable_external_access=false`` and a locked configuration
   (no files, no extensions, no ``SET``).
6. A table the role queries privately (``query: private`` in the policy) is answered by
   ``lakehouse.private_sql``: aggregates only, with differential privacy, the query's ε reserved in
   the privacy ledger first (``QueryResult.private`` says so; on both engines).
7. A dataset whose policy sets ``anonymity.k_min``: a result carrying its quasi-identifier
   columns is refused when they form a class smaller than k_min — its own rows for a row-level
   query, the rows behind each group for an aggregate (``lakehouse.anonymity.check_result``:
   ``ResultRefused``, exit 3, rule ``<dataset>/anonymity/k_min``, audited as a deny).

``DESCRIBE <table>`` (or ``DESC``, ``SHOW COLUMNS FROM|IN <table>``) of one governed table is
answered too: the columns of the role's view (hidden ones absent) with their type, policy class
and mask — gated (``query``) and audited (``sql.query``) exactly like a query of the table.

Errors (see ``lakehouse.errors``)::

    SqlError       a bad or refused query (exit code 2): one line (DuckDB's first line), never a traceback
    TableError     a governed table does not exist, or not at that version (exit code 2)
    AccessDenied   the gate denied a table (exit code 3), from governance
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import duckdb
import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.optimizer.scope import traverse_scope

from governance.errors import AccessDenied, LakewardenError
from governance.gate import Actor, Resource
from governance.pii import redact
from governance.policy import Stage
from lakehouse.catalog import LAYERS, Catalog, TableRef
from lakehouse.errors import SqlError
from lakehouse.masks import compile_mask, hash_column, quote_ident

if TYPE_CHECKING:
    from governance.workspace import Workspace
    from lakehouse.private_sql import PrivateRelease

__all__ = ["QueryResult", "SqlError", "run_query"]

_READ_ONLY = "SELECT, WITH … SELECT, UNION, INTERSECT, EXCEPT; DESCRIBE <table>"
_AUDIT_SQL_CHARS = 500
_PATHLIKE = re.compile(r"[/\\.*?:~]")
_HIDDEN_COLUMN = re.compile(r'(?:Referenced column|does not have a column named) "?([^"\s!]+)"?', re.IGNORECASE)
# DuckDB table references allowed in the parse tree; anything else (TABLE_FUNCTION, SHOW_REF, ...) is refused.
_DUCK_REFS = {"BASE_TABLE", "JOIN", "SUBQUERY", "EXPRESSION_LIST", "EMPTY", "PIVOT"}


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What a query returned and under which obligations.

    ``tables`` are the governed tables used (``layer.dataset``); ``masked`` maps each to
    ``{column: mask}`` as applied; ``row_filters`` each table's row filter (where it has
    one). ``truncated`` is True when ``max_rows`` cut the result. ``warnings`` lists masks
    that did not fit their column's type and showed NULL instead (fail closed). ``private`` is set
    when the result is differentially private (noisy): its ε, δ, mechanism and confidence level.
    """

    table: pa.Table
    tables: tuple[str, ...]
    masked: dict[str, dict[str, str]]
    row_filters: dict[str, str]
    truncated: bool = False
    warnings: tuple[str, ...] = field(default=())
    private: "PrivateRelease | None" = None


@dataclass(slots=True)
class _Use:
    """One governed table the query uses, and how it is spelled there."""

    ref: TableRef
    bare: bool = False  # referenced as `dataset` (a view in main)
    qualified: bool = False  # referenced as `layer.dataset` (a view in schema `layer`)


# -- public API ---------------------------------------------------------------------------
def run_query(
    ws: "Workspace",
    actor: Actor,
    sql: str,
    *,
    version: int | None = None,
    as_of: datetime | str | None = None,
    max_rows: int | None = None,
    role: str | None = None,
    engine: str = "embedded",
    epsilon: float | None = None,
) -> QueryResult:
    """Run one read-only query as ``actor``, through the policy's masks and row filters.

    Args:
        ws: the workspace (policies, gate, audit, configuration).
        actor: who asks; their roles come from policy.
        sql: one SELECT statement in DuckDB's dialect. Tables are ``dataset``
            (the silver layer) or ``layer.dataset``.
        version, as_of: time travel, applied to every table in the query.
        max_rows: return at most this many rows (``truncated`` says whether more existed).
        role: act in this one of the actor's roles only (a role they do not hold is a deny,
            ``builtin/role-not-held``, audited).
        engine: ``embedded`` (DuckDB in this process) or ``trino`` (the local Trino server,
            which applies the same policy compiled to its access rules; no time travel).
        epsilon: for a role whose queries are private, the ε this query spends (default and
            most: the policy's ``private_queries.epsilon_per_query``); refused for exact queries.

    Returns:
        A :class:`QueryResult`.

    Raises:
        SqlError: the query is malformed, not read-only, names a table function, a file
            or an ungoverned table, or fails in DuckDB.
        AccessDenied: the gate denied a table, or a private query would exceed a privacy budget
            (the decision names the rule).
        TableError: a governed table does not exist (yet) or the version cannot be read.

    Example::

        >>> res = run_query(ws, ws.actor("ana"), "SELECT count(*) AS n FROM customers")
        >>> res.tables, res.row_filters
        (('silver.customers',), {'silver.customers': "region <> 'restricted'"})
    """
    if engine not in ("embedded", "trino"):
        raise SqlError(f"unknown engine {engine!r}: use embedded or trino")
    if max_rows is not None and max_rows < 0:
        raise SqlError(f"max_rows must be 0 or more (got {max_rows})")
    # In one role only: a role the actor does not hold is the gate's deny (builtin/role-not-held).
    in_role = actor if role is None else ws.gate.narrow(actor, role, Stage.QUERY, Resource.system("sql"))
    if engine == "trino":  # Trino decides each table by the same policy, compiled to its rules
        from lakehouse.trino import run_query as run_trino

        ws.gate.require_stage(Stage.QUERY, actor, Resource.system("sql"))

        if version is not None or as_of is not None:
            raise SqlError("time travel (--version/--as-of) is available on the embedded engine")
        private = _trino_private(ws, in_role, sql, epsilon=epsilon, max_rows=max_rows)
        if private is not None:
            return private
        if epsilon is not None:
            raise SqlError("epsilon applies to differentially private queries only (this role's are exact)")
        return QueryResult(run_trino(ws, actor, sql, role=role, max_rows=max_rows), (), {}, {})  # Trino narrows user@role
    actor = in_role
    used: list[str] = []
    try:
        described = _DESCRIBE.match(sql or "")
        if described:  # DESCRIBE t / SHOW COLUMNS FROM t: the columns the role's view has
            use = _describe_target(described.group("name"), ws)
            used = [str(use.ref)]
            with _connection() as con:
                result = _describe(con, ws, actor, sql, use, version=version, as_of=as_of)
        else:
            uses = _checked(sql, ws)
            used = [str(u.ref) for u in uses]
            decided = _decide(ws, actor, uses, version=version, as_of=as_of)  # the gate, every query
            if _is_private(ws, uses, [d.decision for d in decided]):
                result = _private(ws, actor, sql, uses, [d.decision for d in decided], decided=decided,
                                  epsilon=epsilon, max_rows=max_rows, version=version, as_of=as_of)
                _audit(ws, actor, sql, used, outcome="ok", rows=result.table.num_rows, private=result.private)
                return result
            if epsilon is not None:
                raise SqlError("epsilon applies to differentially private queries only (this role's are exact)")
            result = _execute(ws, actor, sql, uses, version=version, as_of=as_of, max_rows=max_rows, decided=decided)
            if any(ws.policies.datasets[u.ref.dataset].anonymity for u in uses):
                from lakehouse.anonymity import check_result  # k_min holds for results too (issue #20)

                def sizes(q: str) -> pa.Table:  # the rows behind each group, through the same views
                    return _execute(ws, actor, q, uses, version=version, as_of=as_of, max_rows=None,
                                    decided=decided).table

                check_result(ws, actor, sql, [u.ref.dataset for u in uses], result.table, sizes=sizes)
    except LakewardenError as exc:
        _audit(ws, actor, sql, used, outcome="deny" if _refused_here(exc) else "error", error=exc)
        raise
    _audit(ws, actor, sql, used, outcome="ok", rows=result.table.num_rows, warnings=result.warnings)
    return result


# -- differentially private queries (lakehouse.private_sql) -----------------------------------
def _is_private(ws: "Workspace", uses: list[_Use], decisions: list[Any]) -> bool:
    from lakehouse.private_sql import may_be_private, private_role

    if not may_be_private(ws, [u.ref.dataset for u in uses]):
        return False
    return any(private_role(ws, d) is not None for d in decisions)


def _private(
    ws: "Workspace",
    actor: Actor,
    sql: str,
    uses: list[_Use],
    decisions: list[Any],
    *,
    decided: list["_Decided"],
    epsilon: float | None,
    max_rows: int | None,
    version: int | None = None,
    as_of: datetime | str | None = None,
) -> QueryResult:
    """Answer a private role's query: compile (refusals first), reserve ε, read the role's rows (its
    governed view on the embedded engine, whichever engine was asked), release with OpenDP, commit ε."""
    from governance.ledger import PrivacyLedger
    from lakehouse.private_sql import ALPHA, MECHANISM, PrivateRelease, compile_plan, metadata

    if len(uses) != 1:
        raise SqlError(
            f"refused for a private role: a query over {len(uses)} tables — a private role's queries read one "
            "table (joins and unions can multiply one subject's rows)",
            hint="query one table: SELECT [group columns,] COUNT(*) | SUM(c) | AVG(c) FROM <table> ...",
        )
    ref = uses[0].ref
    plan = compile_plan(sql, ws, ref, decisions[0], epsilon=epsilon)
    ledger = PrivacyLedger(ws)
    reservation = ledger.reserve_query(actor, plan.dataset, epsilon=plan.epsilon, delta=plan.delta, layer=ref.layer)
    drawn = False
    try:
        fetched = _execute(ws, actor, plan.fetch_sql("duckdb"), uses, version=version, as_of=as_of, max_rows=None,
                           decided=decided)
        rows, masked, row_filters = fetched.table, fetched.masked, fetched.row_filters
        plan.measurement(rows.schema)  # built before anything is drawn: a failure here spends nothing
        drawn = True
        table, scales = plan.release(rows)
    except BaseException:
        if drawn:  # noise was drawn on the data: it counts, whatever happened next
            ledger.commit(reservation.run_id, epsilon=plan.epsilon, actor=actor.name)
        else:
            ledger.release(reservation.run_id, actor=actor.name)
        raise
    ledger.commit(reservation.run_id, epsilon=plan.epsilon, actor=actor.name)
    release = PrivateRelease(
        epsilon=plan.epsilon, delta=plan.delta, mechanism=MECHANISM, alpha=ALPHA,
        rule_ids=(*decisions[0].rule_ids, *reservation.decision.rule_ids), run_id=reservation.run_id, scales=scales,
        threshold=plan.threshold(rows.schema),
    )
    truncated = max_rows is not None and table.num_rows > max_rows
    if truncated:
        table = table.slice(0, max_rows)
    return QueryResult(table=table.replace_schema_metadata(metadata(release)), tables=(str(ref),), masked=masked,
                       row_filters=row_filters, truncated=truncated, private=release)


def _trino_private(ws: "Workspace", actor: Actor, sql: str, *, epsilon: float | None,
                   max_rows: int | None) -> QueryResult | None:
    """On the Trino engine: a query some of whose tables the actor's role reads privately is answered by
    the private layer (None: an ordinary Trino query). ``actor`` is the caller narrowed to its role. Trino
    itself gives a private role no rows (its compiled rules deny the table, so a direct connection gets no
    exact answer); the private layer reads the role's governed view on the embedded engine, the same
    rows under the same masks and row filter, and releases only the noisy aggregates."""
    from lakehouse.private_sql import may_be_private

    if not may_be_private(ws, list(ws.policies.datasets)):
        return None
    try:
        uses = _checked(sql, ws)
    except SqlError:
        # Not DuckDB-readable: Trino answers it, unless a private role could be reading a table.
        roles = actor.roles or ws.policies.roles_of(actor.name)
        if any(ds.query_mode(r) == "private" for ds in ws.policies.datasets.values() for r in roles if r in ds.access):
            raise
        return None
    if not may_be_private(ws, [u.ref.dataset for u in uses]):
        return None
    decided = _decide(ws, actor, uses, version=None, as_of=None)
    decisions = [d.decision for d in decided]
    if not _is_private(ws, uses, decisions):
        return None
    used = [str(u.ref) for u in uses]
    try:  # Trino's rules deny a private role its rows (compile_rules): they are read from the governed views
        result = _private(ws, actor, sql, uses, decisions, decided=decided, epsilon=epsilon, max_rows=max_rows)
    except LakewardenError as exc:
        _audit(ws, actor, sql, used, outcome="error", error=exc)
        raise
    _audit(ws, actor, sql, used, outcome="ok", rows=result.table.num_rows, private=result.private)
    return result


# -- checking -----------------------------------------------------------------------------
def _new_connection() -> duckdb.DuckDBPyConnection:
    con = duckdb.connect(":memory:")
    for stmt in (
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET TimeZone = 'UTC'",
    ):
        con.execute(stmt)
    return con


@contextlib.contextmanager
def _connection() -> Iterator[duckdb.DuckDBPyConnection]:
    con = _new_connection()
    try:
        yield con
    finally:
        con.close()


_CHECKER: duckdb.DuckDBPyConnection | None = None
_CHECKER_LOCK = threading.Lock()


@contextlib.contextmanager
def _checker() -> Iterator[duckdb.DuckDBPyConnection]:
    """The process's parsing connection (DuckDB's parser and ``json_serialize_sql`` only): no table,
    no file access, a locked configuration; one query at a time."""
    global _CHECKER
    with _CHECKER_LOCK:
        if _CHECKER is None:
            con = _new_connection()
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            _CHECKER = con
        yield _CHECKER


_CHECKED: "OrderedDict[tuple[str, tuple[str, ...]], tuple[tuple[TableRef, bool, bool], ...]]" = OrderedDict()
_CHECKED_MAX = 256


def _checked(sql: str, ws: "Workspace") -> list[_Use]:
    """:func:`_check`, remembered per process for a query text and set of governed datasets (all the
    check depends on): a repeated query skips the three parsers. Refusals are not remembered."""
    key = (sql, tuple(sorted(ws.policies.datasets)))
    with _CHECKER_LOCK:
        hit = _CHECKED.get(key)
        if hit is not None:
            _CHECKED.move_to_end(key)
    if hit is None:
        with _checker() as con:
            uses = _check(con, sql, ws)
        hit = tuple((u.ref, u.bare, u.qualified) for u in uses)
        with _CHECKER_LOCK:
            _CHECKED[key] = hit
            while len(_CHECKED) > _CHECKED_MAX:
                _CHECKED.popitem(last=False)
    return [_Use(ref, bare, qualified) for ref, bare, qualified in hit]


def _check(con: duckdb.DuckDBPyConnection, sql: str, ws: "Workspace") -> list[_Use]:
    """Validate the query (three ways, see the module docstring); return the tables it uses."""
    if not sql or not sql.strip() or not sql.strip().strip(";").strip():
        raise SqlError("empty query", hint='give one SELECT statement, e.g. "SELECT count(*) FROM customers"')
    # 1. DuckDB's parser decides what kind of statement this is.
    try:
        stmts = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise SqlError(_first_line(exc)) from None
    if len(stmts) != 1:
        raise SqlError(f"exactly one statement is allowed (got {len(stmts)})", hint="remove the extra ';'-separated statements")
    kind = stmts[0].type.name if hasattr(stmts[0].type, "name") else str(stmts[0].type).rpartition(".")[2]
    if kind != "SELECT":
        word = sql.strip().split(None, 1)[0].upper()
        # name it as written (INSTALL, CHECKPOINT, USE) unless that word says nothing (WITH, a parenthesis)
        raise _refused(word if word.isalpha() and word not in ("WITH", "FROM") else kind.replace("_", " "))
    # 2. sqlglot: the statement's shape and every table reference.
    tree = _parse(sql)
    if not isinstance(tree, (exp.Select, exp.SetOperation)):
        raise _refused(_kind_of(tree, sql))
    if tree.find(exp.Into) is not None:
        raise _refused("SELECT … INTO (it creates a table)")
    governed = ws.policies.datasets
    uses: dict[TableRef, _Use] = {}
    for table in _real_tables(tree):
        ref, qualified = _resolve(table, governed)
        use = uses.setdefault(ref, _Use(ref))
        use.qualified |= qualified
        use.bare |= not qualified
    # 3. DuckDB's parse tree must agree: no table function, no base table the checks above did not see.
    _cross_check(con, sql, uses, _cte_names(tree))
    return list(uses.values())


def _parse(sql: str) -> exp.Expression:
    log = logging.getLogger("sqlglot")
    level = log.level
    log.setLevel(logging.ERROR)  # sqlglot warns on stderr when it falls back to a generic Command
    try:
        stmts = [s for s in sqlglot.parse(sql, dialect="duckdb") if s is not None]
    except sqlglot.errors.ParseError as exc:
        e = exc.errors[0] if exc.errors else {}
        where = f" at line {e.get('line')}, column {e.get('col')}" if e.get("line") else ""
        desc = str(e.get("description") or str(exc).splitlines()[0])
        raise SqlError(f"the query cannot be verified: {desc}{where}", hint="use plain SELECT syntax") from None
    except sqlglot.errors.SqlglotError as exc:
        raise SqlError(f"the query cannot be verified: {str(exc).splitlines()[0]}") from None
    finally:
        log.setLevel(level)
    if len(stmts) != 1:
        raise SqlError(f"exactly one statement is allowed (got {len(stmts)})")
    return stmts[0]


def _refused(kind: str) -> SqlError:
    return SqlError(f"refused {kind}: only read-only queries are allowed ({_READ_ONLY})")


def _kind_of(tree: exp.Expression, sql: str) -> str:
    if isinstance(tree, exp.Command):
        return str(tree.this).upper()
    if isinstance(tree, exp.Create):
        return f"CREATE {tree.args.get('kind') or ''}".strip()
    if isinstance(tree, (exp.Column, exp.Identifier)):  # e.g. a bare CHECKPOINT parses as a column
        return sql.strip().split()[0].upper()
    return type(tree).__name__.upper()


def _real_tables(tree: exp.Expression) -> list[exp.Table]:
    """Every table reference that is not a CTE (scope-resolved); FROM sources are checked on the way."""
    for node in tree.find_all(exp.From, exp.Join, exp.Lateral):
        src = node.this
        if isinstance(node, exp.Lateral):
            if not isinstance(src, exp.Subquery):
                raise _table_function(src)
        elif not isinstance(src, (exp.Table, exp.Subquery, exp.Lateral, exp.Values)):
            raise _table_function(src)
    cte_refs: set[int] = set()
    try:
        for scope in traverse_scope(tree):
            for node, source in scope.selected_sources.values():
                if isinstance(node, exp.Table) and not isinstance(source, exp.Table):
                    cte_refs.add(id(node))
    except Exception:  # noqa: BLE001 - scope analysis failed: count every table as real (fail closed)
        cte_refs = set()
    tables = []
    for t in tree.find_all(exp.Table):
        if not isinstance(t.this, exp.Identifier):
            raise _table_function(t.this)
        if t.args.get("version") is not None:
            raise SqlError(
                f"time travel in SQL ({t.sql(dialect='duckdb')}) is not supported",
                hint="use --version or --as-of, which apply to every table of the query",
            )
        if id(t) not in cte_refs:
            tables.append(t)
    return tables


def _table_function(node: exp.Expression | None) -> SqlError:
    text = node.sql(dialect="duckdb") if isinstance(node, exp.Expression) else str(node)
    if len(text) > 60:
        text = text[:57] + "..."
    return SqlError(
        f"table functions and file paths are not allowed in FROM ({text})",
        hint="query governed tables by name: <dataset> or <layer>.<dataset>",
    )


def _resolve(table: exp.Table, governed: dict[str, Any]) -> tuple[TableRef, bool]:
    name = table.name
    known = ", ".join(sorted(governed)) or "none"
    if table.catalog or (table.db and "." in table.db):
        raise SqlError(
            f"table {table.sql(dialect='duckdb')} has too many name parts",
            hint="name tables <dataset> or <layer>.<dataset>",
        )
    if _PATHLIKE.search(name) or (table.db and _PATHLIKE.search(table.db)):
        raise SqlError(
            f"file paths are not allowed in FROM ({name!r})",
            hint=f"query governed tables by name; governed datasets: {known}",
        )
    layer = table.db.lower() if table.db else "silver"
    if layer not in LAYERS:
        raise SqlError(
            f"unknown layer {table.db!r} in {table.sql(dialect='duckdb')} (layers: {', '.join(LAYERS)})",
            hint="name tables <dataset> or <layer>.<dataset>",
        )
    dataset = name.lower()
    if dataset not in governed:
        raise SqlError(f"unknown table {name!r}: governed datasets are {known}", hint="name tables <dataset> or <layer>.<dataset>")
    return TableRef(layer, dataset), bool(table.db)


def _cte_names(tree: exp.Expression) -> set[str]:
    return {cte.alias_or_name.lower() for cte in tree.find_all(exp.CTE)}


def _cross_check(con: duckdb.DuckDBPyConnection, sql: str, uses: dict[TableRef, _Use], ctes: set[str]) -> None:
    try:
        raw = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
        tree = json.loads(raw)
    except (duckdb.Error, ValueError, IndexError) as exc:
        raise SqlError(f"the query cannot be verified: {_first_line(exc)}") from None
    if tree.get("error"):
        raise SqlError(f"the query cannot be verified: {str(tree.get('error_message', '')).splitlines()[0]}")
    bare = {u.ref.dataset for u in uses.values() if u.bare}
    qualified = {(u.ref.layer, u.ref.dataset) for u in uses.values() if u.qualified}
    for ref in _duck_refs(tree):
        kind = ref.get("type")
        if kind not in _DUCK_REFS:
            fn = (ref.get("function") or {}).get("function_name") if isinstance(ref.get("function"), dict) else None
            if kind == "TABLE_FUNCTION":
                raise _table_function(exp.to_identifier(f"{fn}(...)") if fn else None)
            raise SqlError(f"{kind.replace('_', ' ').lower() if kind else 'this'} is not allowed in FROM")
        if kind != "BASE_TABLE":
            continue
        if ref.get("at_clause"):
            raise SqlError("time travel in SQL is not supported", hint="use --version or --as-of")
        cat, schema, name = (str(ref.get(k) or "").lower() for k in ("catalog_name", "schema_name", "table_name"))
        ok = not cat and ((schema, name) in qualified if schema else (name in bare or name in ctes))
        if not ok:
            shown = ".".join(p for p in (cat, schema, name) if p)
            raise SqlError(f"the query cannot be verified: table {shown!r} was not recognised as a governed table")


def _duck_refs(o: Any) -> Iterator[dict[str, Any]]:
    """Table references in DuckDB's serialized parse tree (dicts with alias and sample, no class)."""
    if isinstance(o, dict):
        if "class" not in o and "alias" in o and "sample" in o and not str(o.get("type", "")).endswith("_NODE"):
            yield o
        for v in o.values():
            yield from _duck_refs(v)
    elif isinstance(o, list):
        for v in o:
            yield from _duck_refs(v)


# -- executing ----------------------------------------------------------------------------
# Columns a layer adds to the policy's (the gate decides which policy columns a role sees).
# Quarantine shows why and where a row was rejected, never its encrypted payload.
LAYER_COLUMNS: dict[str, tuple[str, ...]] = {
    "bronze": ("_batch_id", "_ingested_at"),
    "silver": ("_ingested_at",),
    "quarantine": ("_batch_id", "source", "row_number", "reason", "subject_token", "_quarantined_at"),
    "vault": ("_batch_id", "_ingested_at"),
    "restricted": ("_batch_id", "_ingested_at"),
}

@dataclass(slots=True)
class _Views:
    """What registering the governed views found: masks applied, row filters, mask fallbacks,
    hidden columns (for helpful errors) and the raw internal names (kept out of messages)."""

    masked: dict[str, dict[str, str]] = field(default_factory=dict)
    row_filters: dict[str, str] = field(default_factory=dict)
    warns: list[str] = field(default_factory=list)
    hidden: dict[str, tuple[str, str]] = field(default_factory=dict)  # column -> (table, role)
    internal: dict[str, str] = field(default_factory=dict)  # raw name -> table
    classes: dict[str, dict[str, str]] = field(default_factory=dict)  # table -> column -> policy class


def _execute(
    ws: "Workspace",
    actor: Actor,
    sql: str,
    uses: list[_Use],
    *,
    version: int | None,
    as_of: datetime | str | None,
    max_rows: int | None,
    decided: list["_Decided"] | None = None,
) -> QueryResult:
    if decided is None:
        decided = _decide(ws, actor, uses, version=version, as_of=as_of)  # the gate, every query
    lowered = sql.lower()
    prepared = None
    if version is None and as_of is None:  # the latest versions: views may come from the cache
        prepared = _PREPARED.acquire(_view_key(ws, decided), lowered)
    if prepared is None:
        con = _new_connection()
        try:
            v = _create_views(con, ws, decided, lowered)
            # From here on the query cannot read files, load extensions or change settings.
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        prepared = _Prepared(con, v)
        prepared.lock.acquire()
        if version is None and as_of is None:
            _PREPARED.put(_view_key(ws, decided), prepared)
    try:
        v = prepared.views
        try:
            rel = prepared.con.sql(sql)
            table, truncated = _fetch(rel, max_rows)
        except duckdb.Error as exc:
            raise _engine_error(exc, v.hidden, v.internal) from None
    finally:
        prepared.release()
    return QueryResult(
        table=table,
        tables=tuple(str(u.ref) for u in uses),
        masked=v.masked,
        row_filters=v.row_filters,
        truncated=truncated,
        warnings=tuple(v.warns),
    )


# -- per-process caches ---------------------------------------------------------------------
# What does not change between queries is kept per process: each table's latest snapshot (the
# opened Delta table and its Arrow dataset, refreshed incrementally), and DuckDB connections that
# hold one set of views, keyed by everything a view is made of — each table's version and
# identity, the gate's obligations for it (columns, masks, row filter), the rule that decided,
# and the policy digest. The gate still decides (and audits) every table of every query; a
# cached connection is used only when that decision and the data are exactly those it was built
# from. Time travel (version/as_of) is never cached.
@dataclass(slots=True)
class _Snapshot:
    table: Any  # deltalake.DeltaTable
    version: int
    identity: tuple[Any, ...]  # the table's metadata id and, on local storage, its first commit's inode
    dataset: Any  # pyarrow dataset of ``version``


@dataclass(slots=True)
class _Decided:
    use: _Use
    decision: Any  # governance.gate.Decision
    version: int | None
    identity: tuple[Any, ...]
    dataset: Any


class _Prepared:
    """One DuckDB connection with one set of governed views, locked down; one query at a time."""

    __slots__ = ("con", "views", "lock", "cached")

    def __init__(self, con: duckdb.DuckDBPyConnection, views: "_Views") -> None:
        self.con, self.views, self.lock, self.cached = con, views, threading.Lock(), False

    def release(self) -> None:
        close = not self.cached
        self.lock.release()
        if close:
            with contextlib.suppress(Exception):
                self.con.close()


class _PreparedCache:
    """A small LRU of :class:`_Prepared` connections; a busy one is not shared (the caller builds
    its own)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._items: "OrderedDict[tuple[Any, ...], _Prepared]" = OrderedDict()

    def acquire(self, key: tuple[Any, ...], sql_lower: str) -> _Prepared | None:
        with self._lock:
            p = self._items.get(key)
            if p is None or not p.lock.acquire(blocking=False):
                return None
            self._items.move_to_end(key)
        if any(raw in sql_lower for raw in p.views.internal):  # never let a query name a raw table
            p.lock.release()
            return None
        return p

    def put(self, key: tuple[Any, ...], p: _Prepared) -> None:
        with self._lock:
            if key in self._items:
                return  # another thread cached the same views first: this one closes after use
            p.cached = True
            self._items[key] = p
            while len(self._items) > self.size:
                _, old = self._items.popitem(last=False)
                if old.lock.acquire(blocking=False):
                    with contextlib.suppress(Exception):
                        old.con.close()
                    old.lock.release()
                else:  # in use: its user closes it on release
                    old.cached = False

    def clear(self) -> None:
        with self._lock:
            items, self._items = list(self._items.values()), OrderedDict()
        for p in items:
            p.cached = False
            if p.lock.acquire(blocking=False):
                p.release()


_PREPARED = _PreparedCache(8)
_SNAPSHOTS: dict[str, _Snapshot] = {}
_SNAPSHOTS_LOCK = threading.Lock()


def clear_caches() -> None:
    """Forget every cached query check, table snapshot and view connection of this process."""
    _PREPARED.clear()
    with _CHECKER_LOCK:
        _CHECKED.clear()
    with _SNAPSHOTS_LOCK:
        _SNAPSHOTS.clear()


def _first_commit(uri: str) -> tuple[int, int] | None:
    """The first commit file's inode and mtime on local storage (a table deleted and created again
    at the same path has another), None elsewhere."""
    if "://" in uri and not uri.startswith("file://"):
        return None
    path = Path(uri.removeprefix("file://")) / "_delta_log" / "00000000000000000000.json"
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _latest(catalog: Catalog, ref: TableRef) -> _Snapshot:
    """The table's latest snapshot, from the cache when only new commits need reading."""
    uri = catalog.uri(ref)
    first = _first_commit(uri)
    with _SNAPSHOTS_LOCK:
        snap = _SNAPSHOTS.get(uri)
        if snap is not None and first is not None and snap.identity[1:] == (first,):
            try:
                snap.table.update_incremental()
                version = snap.table.version()
                if version != snap.version or snap.table.metadata().id != snap.identity[0]:
                    snap = _Snapshot(snap.table, version, (snap.table.metadata().id, first),
                                     snap.table.to_pyarrow_dataset())
                    _SNAPSHOTS[uri] = snap
                return snap
            except Exception:  # noqa: BLE001 - reopen from scratch below
                _SNAPSHOTS.pop(uri, None)
    dt = catalog.open(ref)
    snap = _Snapshot(dt, dt.version(), (dt.metadata().id, first), dt.to_pyarrow_dataset())
    if first is not None:  # local storage: the first commit tells a recreated table apart
        with _SNAPSHOTS_LOCK:
            _SNAPSHOTS[uri] = snap
    return snap


def _decide(
    ws: "Workspace", actor: Actor, uses: list[_Use], *, version: int | None, as_of: datetime | str | None
) -> list[_Decided]:
    """Gate each table (``query``, audited) and open the version the query reads."""
    catalog = Catalog(ws.config)
    out = []
    for use in uses:
        ref = use.ref
        decision = ws.gate.enforce(Stage.QUERY, actor, Resource.table(ref.dataset, ref.layer), {"layer": ref.layer})
        if version is None and as_of is None:
            snap = _latest(catalog, ref)
            out.append(_Decided(use, decision, snap.version, snap.identity, snap.dataset))
        else:
            dt = catalog.open(ref, version=version, as_of=as_of)
            out.append(_Decided(use, decision, dt.version(), (), dt.to_pyarrow_dataset()))
    return out


def _view_key(ws: "Workspace", decided: list[_Decided]) -> tuple[Any, ...]:
    parts: list[Any] = [ws.policies.digest, ws.config.table_uri("")]
    for d in decided:
        ob = json.dumps(dict(d.decision.obligations), sort_keys=True, default=str)
        parts.append((str(d.use.ref), d.use.bare, d.use.qualified, d.version, d.identity, ob,
                      tuple(d.decision.rule_ids)))
    return tuple(parts)


def _register_views(
    con: duckdb.DuckDBPyConnection,
    ws: "Workspace",
    actor: Actor,
    sql: str,
    uses: list[_Use],
    *,
    version: int | None,
    as_of: datetime | str | None,
) -> _Views:
    """Gate each table (``query``) and create its view (see :func:`_create_views`)."""
    return _create_views(con, ws, _decide(ws, actor, uses, version=version, as_of=as_of), sql.lower())


def _create_views(con: duckdb.DuckDBPyConnection, ws: "Workspace", decided: list[_Decided], lowered: str) -> _Views:
    """Create each decided table's view: visible columns through their masks, rows through the row
    filter, over the Delta version registered under a random internal name."""
    out = _Views()
    masked, row_filters, warns, hidden, internal = out.masked, out.row_filters, out.warns, out.hidden, out.internal
    schemas: set[str] = set()
    for d in decided:
        use, decision, dataset = d.use, d.decision, d.dataset
        ref = use.ref
        ob = decision.obligations
        raw = _internal_name(lowered)
        internal[raw] = str(ref)
        con.register(raw, dataset)
        visible = set(ob.get("columns") or ()) | set(LAYER_COLUMNS.get(ref.layer, ()))
        masks: dict[str, str] = dict(ob.get("masks") or {})
        role = next((r.split("/")[2] for r in decision.rule_ids if r.startswith(f"{ref.dataset}/access/")), "?")
        policy_cols = ws.policies.datasets[ref.dataset].columns
        for c in [*policy_cols, *dataset.schema.names]:
            if c not in visible:
                hidden.setdefault(c, (str(ref), role))
        cols, applied = [], {}
        for f in dataset.schema:
            if f.name not in visible:
                continue
            q = quote_ident(f.name, "duckdb")
            if f.name in masks:
                hc = hash_column(f.name)
                hashed = quote_ident(hc, "duckdb") if hc in dataset.schema.names else None
                try:
                    cm = compile_mask(masks[f.name], q, f.type, dialect="duckdb", hashed=hashed)
                except ValueError as exc:  # in the vocabulary's shape but not usable (e.g. partial:2.5)
                    raise SqlError(
                        f"cannot apply mask {masks[f.name]!r} to {ref}.{f.name}: {exc}",
                        hint=f"fix access.{role}.masks in the policy of '{ref.dataset}'",
                    ) from None
                applied[f.name] = masks[f.name]
                if not cm.fits:
                    warns.append(f"{ref}.{f.name}: {cm.reason}")
                cols.append(f"{cm.sql} AS {q}")
            else:
                cols.append(q)
        if not cols:
            raise SqlError(
                f"role {role} sees no column of {ref}",
                hint=f"the table's columns are not among those the policy of '{ref.dataset}' shows to {role}",
            )
        masked[str(ref)] = applied
        view = f"SELECT {', '.join(cols)} FROM {quote_ident(raw)}"
        rf = ob.get("row_filter")
        if rf:
            row_filters[str(ref)] = rf
            view += f" WHERE ({rf})"
        targets = []
        if use.bare:
            targets.append(f"main.{quote_ident(ref.dataset)}")
        if use.qualified:
            if ref.layer not in schemas:
                con.execute(f"CREATE SCHEMA {quote_ident(ref.layer)}")
                schemas.add(ref.layer)
            targets.append(f"{quote_ident(ref.layer)}.{quote_ident(ref.dataset)}")
        for target in targets:
            try:
                con.execute(f"CREATE VIEW {target} AS {view}")
            except duckdb.Error as exc:
                raise SqlError(
                    f"cannot apply the policy of '{ref.dataset}' for role {role} to {ref}: "
                    f"{_scrub(_first_line(exc), internal)}",
                    hint="the policy's row filter or masks do not fit the table; tell the dataset owner",
                ) from None
        out.classes[str(ref)] = {c: policy_cols[c].class_.value for c in policy_cols}
    return out


_NAME_PART = r'(?:"[^"]+"|[A-Za-z_][A-Za-z0-9_]*)'
_DESCRIBE = re.compile(
    rf"^\s*(?:DESCRIBE|DESC|SHOW\s+COLUMNS\s+(?:FROM|IN))\s+(?P<name>{_NAME_PART}(?:\s*\.\s*{_NAME_PART})?)\s*;?\s*$",
    re.IGNORECASE,
)
# The layer's own columns (LAYER_COLUMNS) and silver's derived features have no policy class.
_SYSTEM, _DERIVED = "system", "derived"


def _describe_target(name: str, ws: "Workspace") -> _Use:
    try:
        table = exp.to_table(re.sub(r"\s*\.\s*", ".", name), dialect="duckdb")
    except sqlglot.errors.SqlglotError as exc:
        raise SqlError(f"cannot read the table name {name!r}: {str(exc).splitlines()[0]}") from None
    ref, qualified = _resolve(table, ws.policies.datasets)
    return _Use(ref, bare=not qualified, qualified=qualified)


def _describe(
    con: duckdb.DuckDBPyConnection,
    ws: "Workspace",
    actor: Actor,
    sql: str,
    use: _Use,
    *,
    version: int | None,
    as_of: datetime | str | None,
) -> QueryResult:
    """``DESCRIBE`` a governed table as the role sees it: DuckDB's description of the role's view
    (the same view a query reads, gated the same way), so a hidden column is absent and a column's
    type is what the query returns; each column's policy class (``system`` for the layer's own
    columns, ``derived`` for silver's derived features), whether it is masked, and the mask."""
    ref = use.ref
    v = _register_views(con, ws, actor, sql, [use], version=version, as_of=as_of)
    target = f"{quote_ident(ref.layer)}.{quote_ident(ref.dataset)}" if use.qualified else f"main.{quote_ident(ref.dataset)}"
    try:
        rows = con.execute(f"DESCRIBE {target}").fetchall()
    except duckdb.Error as exc:
        raise SqlError(_scrub(_first_line(exc), v.internal)) from None
    classes, masks = v.classes.get(str(ref), {}), v.masked.get(str(ref), {})
    layer_cols = set(LAYER_COLUMNS.get(ref.layer, ()))
    names = [r[0] for r in rows]
    table = pa.table({
        "column_name": pa.array(names, pa.string()),
        "column_type": pa.array([r[1] for r in rows], pa.string()),
        "class": pa.array([classes.get(c) or (_SYSTEM if c in layer_cols else _DERIVED) for c in names], pa.string()),
        "masked": pa.array([c in masks for c in names], pa.bool_()),
        "mask": pa.array([masks.get(c) for c in names], pa.string()),
    })
    return QueryResult(table=table, tables=(str(ref),), masked=v.masked, row_filters=v.row_filters,
                       warnings=tuple(v.warns))


def _internal_name(sql_lower: str) -> str:
    while True:
        name = f"__lw_raw_{secrets.token_hex(16)}"
        if name not in sql_lower:  # the query cannot name what it does not contain
            return name


def _fetch(rel: Any, max_rows: int | None) -> tuple[pa.Table, bool]:
    if rel is None:  # not a query after all (cannot happen after _check): nothing to return
        raise SqlError("the statement returned no result")
    batch = 1_000_000 if max_rows is None else max(1, min(max_rows + 1, 1_000_000))
    reader = rel.to_arrow_reader(batch) if hasattr(rel, "to_arrow_reader") else rel.fetch_record_batch(batch)
    try:
        if max_rows is None:
            return reader.read_all(), False
        batches, n = [], 0
        for b in reader:
            batches.append(b)
            n += b.num_rows
            if n > max_rows:
                break
        table = pa.Table.from_batches(batches, schema=reader.schema)
        return table.slice(0, max_rows), table.num_rows > max_rows
    finally:
        with contextlib.suppress(Exception):
            reader.close()


def _engine_error(exc: duckdb.Error, hidden: dict[str, tuple[str, str]], internal: dict[str, str]) -> SqlError:
    line = _scrub(_first_line(exc), internal)
    m = _HIDDEN_COLUMN.search(line)
    if m:
        col = m.group(1).split(".")[-1].lower()
        if col in hidden:
            table, role = hidden[col]
            return SqlError(
                f"{line} — column {col} of {table} is hidden from role {role} by the policy",
                hint=f"policy rule {table.split('.')[-1]}/access/{role}/columns; SELECT * shows what the role may see",
            )
        return SqlError(f"{line} (it may also be hidden by your role's policy)", hint="SELECT * shows what the role may see")
    return SqlError(line)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _scrub(text: str, internal: dict[str, str]) -> str:
    for raw, name in internal.items():
        text = re.sub(re.escape(raw), name, text, flags=re.IGNORECASE)
    return text


# -- audit --------------------------------------------------------------------------------
def _audit(
    ws: "Workspace",
    actor: Actor,
    sql: str,
    tables: list[str],
    *,
    outcome: Literal["ok", "error", "deny"],
    rows: int | None = None,
    error: BaseException | None = None,
    warnings: tuple[str, ...] = (),
    private: "PrivateRelease | None" = None,
) -> None:
    text, _ = redact(sql or "")
    details: dict[str, Any] = {
        "tables": tables,
        "sql_sha256": hashlib.sha256((sql or "").encode("utf-8")).hexdigest(),
        "sql": text[:_AUDIT_SQL_CHARS],
    }
    if rows is not None:
        details["rows"] = rows
    if warnings:
        details["mask_fallbacks"] = list(warnings)
    if private is not None:  # what the release spent and under which rules; never a value
        details.update({"private": True, "epsilon": private.epsilon, "delta": private.delta,
                        "mechanism": private.mechanism, "rule_ids": list(private.rule_ids), "run_id": private.run_id})
    rule_ids: tuple[str, ...] = ()
    if error is not None:
        details["error"] = "AccessDenied" if isinstance(error, AccessDenied) else type(error).__name__
        if _refused_here(error):  # refused by a rule checked here, not by the gate: the deny is recorded here
            assert isinstance(error, AccessDenied)
            rule_ids = tuple(error.decision.rule_ids)
            details["reasons"] = list(error.decision.reasons)
        elif not isinstance(error, AccessDenied):  # a deny is already audited, with its rule, by the gate
            details["message"] = str(error.message if isinstance(error, LakewardenError) else error)[:300]
    ws.audit.record("sql.query", actor=actor.name, outcome=outcome, stage="query", resource="sql", rule_ids=rule_ids,
                    details=details)


def _refused_here(exc: BaseException) -> bool:
    """A result refused after it ran (k_min): a deny the gate did not record."""
    from lakehouse.anonymity import ResultRefused

    return isinstance(exc, ResultRefused)
