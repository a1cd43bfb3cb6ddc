"""Silver: bronze conformed — one row per subject where the key is unique, imputed,
standardized, normalized, with derived features — and the fitted statistics stored.

``build_silver`` fits the preprocessing statistics on the current bronze version
(mean, median, mode, standard deviation, min, max — in DuckDB), writes silver as
a new Delta version (overwrite, streamed in batches), and stores the statistics
twice: in the silver commit's metadata and as a row of the ``_stats/<dataset>``
table keyed by silver version. Training and serving load them with
:func:`load_stats` so every consumer applies exactly the transform silver used.

A rebuild with nothing new in bronze, the same policy and the same mask key is a no-op.

Every text column some role sees through the ``hash`` mask gets its keyed hash computed here,
once, into ``_hash_<column>`` (HMAC-SHA256 under the workspace's ``mask-hash`` system key,
truncated to 128 bits — 32 hex characters, as wide as a token — by the native core): both query engines then show that column in its place, so
the mask costs nothing per query, and the key never leaves the key store (Trino never sees
it). Rotating the key (:func:`rotate_mask_key`) rebuilds these columns.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, DeltaTable, WriterProperties, write_deltalake

from governance.gate import Actor, Gate, Resource
from governance.lineage import DatasetRef
from governance.policy import DatasetPolicy, Mask, MaskKind, PolicySet, Stage
from governance.workspace import Workspace
from lakehouse.anonymity import META_ANONYMITY, AnonymityError, Enforced, confirm, enforce, replace_sql
from lakehouse.catalog import Catalog, TableRef, table_buckets, table_configuration, table_description
from lakehouse.errors import LakehouseError
from lakehouse.masks import hash_column
from lakehouse.validate import q

STATS = "_stats"
_META_BRONZE = "lakewarden.bronze_version"
_META_POLICY = "lakewarden.policy_digest"
_META_STATS = "lakewarden.preprocess"
_META_HASH = "lakewarden.mask_hash"  # the mask key's id and the hashed columns
MASK_HASH_KEY = "mask-hash"
HASH_FORMAT = "hmac-sha256-128-hex"  # in the commit metadata: a silver built with another format rebuilds


@dataclass(frozen=True)
class SilverReport:
    dataset: str
    bronze_version: int
    silver_version: int
    rows: int
    stats: dict[str, Any]
    up_to_date: bool = False


def _fit(con: duckdb.DuckDBPyConnection, policy: DatasetPolicy) -> dict[str, Any]:
    """Fit imputation values, then standardization and normalization statistics on the imputed data."""
    p = policy.preprocess
    stats: dict[str, Any] = {"impute": {}, "standardize": {}, "normalize": {}}
    for col, how in p.impute.items():
        c = q(col)
        if isinstance(how, (int, float)) or how not in ("mean", "median", "mode"):
            val: Any = how
        elif how == "mean":
            val = con.execute(f"SELECT avg({c}) FROM base").fetchall()[0][0]
        elif how == "median":
            val = con.execute(f"SELECT median({c}) FROM base").fetchall()[0][0]
        else:
            val = con.execute(f"SELECT mode({c}) FROM base").fetchall()[0][0]
        stats["impute"][col] = {"method": how if isinstance(how, str) else "constant", "value": val}

    def imputed(col: str) -> str:
        if col in stats["impute"] and stats["impute"][col]["value"] is not None:
            return f"coalesce({q(col)}, {_lit(stats['impute'][col]['value'])})"
        return q(col)

    for col in p.standardize:
        mean, std = con.execute(f"SELECT avg({imputed(col)}), stddev_samp({imputed(col)}) FROM base").fetchall()[0]
        stats["standardize"][col] = {"mean": mean, "std": std}
    for col in p.normalize:
        lo, hi = con.execute(f"SELECT min({imputed(col)}), max({imputed(col)}) FROM base").fetchall()[0]
        stats["normalize"][col] = {"min": lo, "max": hi}
    return stats


def _lit(v: Any) -> str:
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if v is None:
        return "NULL"
    return repr(float(v)) if isinstance(v, float) else repr(v)


def transform_sql(policy: DatasetPolicy, stats: dict[str, Any], columns: list[str], source: str = "base") -> str:
    """The SQL that applies fitted statistics to rows of ``source``; the same for silver, training and serving."""
    p = policy.preprocess
    sel = []
    for col in columns:
        imp = stats["impute"].get(col)
        if imp is not None and imp["value"] is not None:
            sel.append(f"coalesce({q(col)}, {_lit(imp['value'])}) AS {q(col)}")
        else:
            sel.append(q(col))
    inner = f"SELECT {', '.join(sel)} FROM {source}"
    extra = []
    for col in p.standardize:
        s = stats["standardize"][col]
        if s["std"] in (None, 0) or s["mean"] is None:
            extra.append(f"CAST(0.0 AS DOUBLE) AS {q(col + '_z')}")
        else:
            extra.append(f"({q(col)} - {s['mean']!r}) / {s['std']!r} AS {q(col + '_z')}")
    for col in p.normalize:
        s = stats["normalize"][col]
        if s["min"] is None or s["max"] in (None, s["min"]):
            extra.append(f"CAST(0.0 AS DOUBLE) AS {q(col + '_01')}")
        else:
            extra.append(f"({q(col)} - {s['min']!r}) / ({s['max']!r} - {s['min']!r}) AS {q(col + '_01')}")
    for name, expr in p.derive.items():
        extra.append(f"({expr}) AS {q(name)}")
    return f"SELECT *{', ' if extra else ''}{', '.join(extra)} FROM ({inner})"


def hashed_columns(policies: PolicySet, dataset: str) -> list[str]:
    """The columns of ``dataset`` that some role sees through the ``hash`` mask in silver (the gate's
    own what-if decisions, one per role, so default masks count too)."""
    gate = Gate(policies)  # no audit: what-if decisions
    cols: set[str] = set()
    for role in sorted(policies.roles.roles):
        d = gate.decide(Stage.QUERY, Actor(f"role:{role}", (role,)), Resource.table(dataset, "silver"), {"layer": "silver"})
        if d.allowed:
            cols.update(c for c, m in (d.obligations.get("masks") or {}).items()
                        if Mask.model_validate(m).kind is MaskKind.HASH)
    return sorted(cols)


def mask_key_id(key: bytes) -> str:
    """A public name for a mask key (it identifies the key, reveals nothing of it)."""
    return hmac.new(key, b"lakewarden:key-id", hashlib.sha256).hexdigest()[:16]


def with_hashes(reader: pa.RecordBatchReader, cols: list[str], key: bytes) -> pa.RecordBatchReader:
    """``reader``'s batches with ``_hash_<column>`` appended for each text column in ``cols``."""
    from governance.keys.native import keyed_hashes

    names = [c for c in cols if c in reader.schema.names and pa.types.is_string(reader.schema.field(c).type)]
    if not names:
        return reader
    schema = reader.schema
    for c in names:
        schema = schema.append(pa.field(hash_column(c), pa.string()))

    def batches() -> Iterator[pa.RecordBatch]:
        for b in reader:
            arrays = list(b.columns) + [keyed_hashes(key, b.column(c)) for c in names]
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def build_silver(ws: Workspace, actor: Actor, dataset: str, *, batch_rows: int = 250_000,
                 engine: str = "local") -> SilverReport:
    """Rebuild ``silver.<dataset>`` from the current bronze version (gated as an ingest stage).

    ``engine``: ``local`` (DuckDB in this process) or ``ray``: the statistics are fitted here, and
    Ray workers apply them to the subject buckets (a subject's rows are all in one bucket, so
    deduplication is per bucket), writing silver's files; this process commits them in one
    overwrite (:func:`lakehouse.distributed.silver_on_ray`). The same rows either way."""
    if engine not in ("local", "ray"):
        raise LakehouseError(f"unknown engine {engine!r} (engines: local, ray)")
    ws.gate.enforce(Stage.INGEST, actor, Resource.table(dataset, "silver"))
    return _build(ws, actor, dataset, batch_rows=batch_rows, engine=engine)


def base_sql(policy: DatasetPolicy, source: str = "bronze") -> str:
    """Bronze deduplicated: a unique subject key keeps its latest row."""
    key = policy.subject_key
    dedupe = (
        f"QUALIFY row_number() OVER (PARTITION BY {q(key)} ORDER BY _ingested_at DESC, _row DESC) = 1"
        if policy.columns[key].unique
        else ""
    )
    return f"SELECT * FROM {source} {dedupe}"


def _build(ws: Workspace, actor: Actor, dataset: str, *, batch_rows: int = 250_000, engine: str = "local") -> SilverReport:
    policy = ws.policies.dataset(dataset)
    cat = Catalog(ws.config)
    bronze_ref, silver_ref = TableRef("bronze", dataset), TableRef("silver", dataset)
    bronze = cat.open(bronze_ref)
    bv = bronze.version()
    hashed = hashed_columns(ws.policies, dataset)
    hash_key = ws.keyring.system_key(MASK_HASH_KEY) if hashed else b""
    hash_meta = json.dumps({"key": mask_key_id(hash_key), "columns": hashed, "format": HASH_FORMAT}) if hashed else ""
    if cat.exists(silver_ref):
        last = cat.open(silver_ref).history(1)[0]
        if (str(last.get(_META_BRONZE)) == str(bv) and last.get(_META_POLICY) == ws.policies.digest
                and (last.get(_META_HASH) or "") == hash_meta):
            stats = json.loads(last[_META_STATS])
            sv = cat.open(silver_ref).version()
            return SilverReport(dataset, bv, sv, cat.open(silver_ref).count(), stats, up_to_date=True)

    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone='UTC'")
    con.register("bronze", bronze.to_pyarrow_dataset())
    business = [f.name for f in bronze.schema().fields if not f.name.startswith("_")]
    con.execute(f"CREATE TEMP VIEW base_raw AS {base_sql(policy)}")
    con.execute("CREATE TEMP VIEW base AS SELECT * FROM base_raw")
    stats = _fit(con, policy)
    columns = [*business, "_subject_bucket", "_ingested_at"]
    anonymity = _anonymity(ws, actor, con, policy, stats, columns, engine) if policy.anonymity is not None else None
    if anonymity is not None and any(anonymity.levels.values()):
        stats = _fit(con, policy)  # on the generalized rows (a quasi-identifier may be imputed)
    meta = {_META_BRONZE: str(bv), _META_POLICY: ws.policies.digest, _META_STATS: json.dumps(stats, sort_keys=True),
            _META_HASH: hash_meta}
    if anonymity is not None:
        meta[META_ANONYMITY] = json.dumps(anonymity.meta(policy), sort_keys=True)
    uri = cat.uri(silver_ref)
    if engine == "ray":
        from lakehouse.distributed import silver_on_ray

        silver_on_ray(ws, dataset, bronze, stats=stats, columns=columns, hashed=hashed, meta=meta)
    else:
        reader = transformed(con, policy, stats, columns, dataset, batch_rows)
        reader = with_hashes(reader, hashed, hash_key)
        write_deltalake(
            uri, reader, mode="overwrite", schema_mode="overwrite",
            partition_by=[*policy.layout.partition_by, "_subject_bucket"],
            configuration=table_configuration(reader.schema.names, policy.subject_key),
            description=table_description(table_buckets(bronze)),
            storage_options=cat.storage_options,
            writer_properties=WriterProperties(compression="ZSTD"),
            commit_properties=CommitProperties(custom_metadata=meta),
        )
    silver = DeltaTable(uri, storage_options=cat.storage_options)
    sv = silver.version()
    rows = silver.count()
    now = ws.now()
    write_deltalake(
        cat.config.table_uri(f"{STATS}/{dataset}"),
        pa.table(
            {"silver_version": [sv], "bronze_version": [bv], "policy_digest": [ws.policies.digest],
             "stats": [json.dumps(stats, sort_keys=True)], "fitted_at": [now]},
            schema=pa.schema([("silver_version", pa.int64()), ("bronze_version", pa.int64()),
                              ("policy_digest", pa.string()), ("stats", pa.string()),
                              ("fitted_at", pa.timestamp("us", tz="UTC"))]),
        ),
        mode="append", storage_options=cat.storage_options,
    )
    ws.lineage.emit(f"silver.{dataset}", inputs=[DatasetRef(str(bronze_ref), version=bv)],
                    outputs=[DatasetRef(str(silver_ref), version=sv)])
    details: dict[str, Any] = {"bronze_version": bv, "silver_version": sv, "rows": rows}
    if anonymity is not None:
        details["anonymity"] = anonymity.meta(policy)
    ws.audit.record("silver.build", actor=actor.name, outcome="ok", stage=Stage.INGEST.value,
                    resource=f"table:silver.{dataset}", details=details)
    con.close()
    return SilverReport(dataset, bv, sv, rows, stats)


def _anonymity(ws: Workspace, actor: Actor, con: duckdb.DuckDBPyConnection, policy: DatasetPolicy,
               stats: dict[str, Any], columns: list[str], engine: str) -> Enforced:
    """k-anonymity / l-diversity of the rows silver is about to hold (``lakehouse.anonymity``): met as
    ingested, met after climbing the hierarchy (``base`` is then redefined over ``base_raw`` with the
    quasi-identifiers at the chosen levels), or an :class:`AnonymityError` naming sizes, never values.
    The outcome is audited (``silver.anonymity``, counts and levels only)."""
    a = policy.anonymity
    assert a is not None
    qi = policy.quasi_identifiers()
    sens = policy.l_columns() if a.l_min is not None else []
    read = list(dict.fromkeys([*qi, *sens, *([policy.subject_key] if sens else [])]))

    def rows() -> pa.Table:
        return con.sql(f"SELECT {', '.join(q(c) for c in read)} FROM ({transform_sql(policy, stats, columns)})").to_arrow_table()

    resource = f"table:silver.{policy.dataset}"
    try:
        enforced = enforce(ws, policy, rows())
        if any(enforced.levels.values()):
            if engine == "ray":
                raise AnonymityError(
                    f"silver.{policy.dataset}: k_min needs generalization ({enforced.meta(policy)['levels']}), "
                    "which the ray engine does not apply yet", hint="build this dataset's silver with --engine local")
            con.execute(f"CREATE OR REPLACE TEMP VIEW base AS SELECT * {replace_sql(policy, enforced.levels)} FROM base_raw")
            enforced = confirm(ws, policy, rows(), enforced.levels)
    except AnonymityError as exc:
        ws.audit.record("silver.anonymity", actor=actor.name, outcome="error", stage=Stage.INGEST.value,
                        resource=resource, details={"error": exc.message, "k_min": a.k_min, "l_min": a.l_min,
                                                    "on_violation": a.on_violation})
        raise
    ws.audit.record("silver.anonymity", actor=actor.name, outcome="ok", stage=Stage.INGEST.value,
                    resource=resource, details=enforced.meta(policy))
    return enforced


def transformed(con: duckdb.DuckDBPyConnection, policy: DatasetPolicy, stats: dict[str, Any], columns: list[str],
                dataset: str, batch_rows: int) -> pa.RecordBatchReader:
    """``base`` (a view on ``con``) with the fitted statistics applied, as Arrow batches."""
    try:
        return con.sql(transform_sql(policy, stats, columns)).to_arrow_reader(batch_rows)
    except duckdb.Error as exc:
        raise LakehouseError(
            f"silver.{dataset}: a preprocess expression failed: {str(exc).splitlines()[0]}",
            hint=f"check preprocess.derive in policies/{dataset}.yaml",
        ) from None


def load_stats(ws: Workspace, dataset: str, *, silver_version: int | None = None) -> dict[str, Any]:
    """The preprocessing statistics silver used (its latest version, or ``silver_version``)."""
    uri = ws.config.table_uri(f"{STATS}/{dataset}")
    if not DeltaTable.is_deltatable(uri):
        raise LakehouseError(f"no preprocessing statistics for '{dataset}': build silver first")
    t = DeltaTable(uri).to_pyarrow_table()
    if silver_version is not None:
        t = t.filter(pc.equal(t["silver_version"], silver_version))
        if not t.num_rows:
            raise LakehouseError(f"no statistics recorded for silver.{dataset} version {silver_version}")
    t = t.sort_by([("silver_version", "descending"), ("fitted_at", "descending")])
    return json.loads(t["stats"][0].as_py())


def rotate_mask_key(ws: Workspace, actor: Actor) -> list[SilverReport]:
    """Replace the ``hash`` mask's key and rebuild every silver table that holds keyed hashes.

    Gated as ``keys`` on ``system:keys`` before anything changes. The rebuilds are part of the
    rotation (the same rows from the same bronze version, only the hash columns change), so they
    need no ``ingest`` right of their own, and no row reaches the caller. The old key is destroyed:
    its hashes can no longer be recomputed, so exports made before stop matching new ones.
    Audited as ``keys.rotate-mask``, and each rebuild as ``silver.build``.
    """
    ws.gate.enforce(Stage.KEYS, actor, Resource.system("keys"))
    cat = Catalog(ws.config)
    datasets = [ds for ds in sorted(ws.policies.datasets)
                if hashed_columns(ws.policies, ds) and cat.exists(TableRef("silver", ds))]
    old = mask_key_id(ws.keyring.system_key(MASK_HASH_KEY))
    ws.keyring.destroy_system_key(MASK_HASH_KEY)
    new = mask_key_id(ws.keyring.system_key(MASK_HASH_KEY))
    ws.audit.record("keys.rotate-mask", actor=actor.name, outcome="ok", resource="system:keys",
                    details={"from": old, "to": new, "rebuilds": datasets})
    ws.audit.flush()
    return [_build(ws, actor, ds) for ds in datasets]
