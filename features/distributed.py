"""Point-in-time training sets on a Ray cluster, for silver tables too large for one process.

Why not Feast's own Ray offline store (``feast.infra.offline_stores.contrib.ray_offline_store``,
Feast 0.67)? Read on 2026-12-04, it does not give Feast's answer:

* it reads a ``FileSource`` with ``read_parquet`` over the folder, so a Delta table's removed
  files (older versions, erased subjects' rows) come back, the pitfall of ../shared/STACK-FACTS.md;
* it never applies a feature view's TTL (``ttl`` appears nowhere in it), so a value older than
  the TTL is joined where Feast's other stores give NULL;
* its large-table join matches feature rows inside fixed time windows (``window_size_for_joins``,
  1 h), so the latest value from an earlier window is missed.

So the join here is Feast's point-in-time rule, written once, and run per subject bucket:
for each entity row (subject, ``event_timestamp``) and each feature view, the feature row of
the same subject with the greatest timestamp ``<= event_timestamp``, unless it is older than
``event_timestamp - ttl`` (then NULL). That is the ``ibis`` store's predicate
(``ts <= entity_ts`` and ``ts + ttl >= entity_ts``, latest first), which the local path runs;
a test checks that both engines return the same table.

Silver is partitioned by ``_subject_bucket``, and all of a subject's rows are in one bucket, so
the join is exact per bucket. The buckets are split over the cluster's CPUs (two shares per
CPU); each Ray task reads only its buckets' files of the pinned silver version (partition
pruning, on the local disk or the bucket) and joins them with its share of the entity rows in
DuckDB (``ASOF LEFT JOIN``). The driver holds the entity rows and the result, never silver's
history. What crosses Ray: subject tokens, timestamps and the feature values, the same bytes
silver's Parquet files hold; no identifier, no key, no credential (each node reads ``AWS_*``
from its own environment).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from governance.cluster import check_cluster, connect
from governance.config import ProjectConfig
from lakehouse.catalog import subject_buckets, table_buckets
from features.store import FeatureError
from lakehouse.masks import quote_ident

__all__ = ["ViewJoin", "point_in_time_on_ray", "RayJoinError"]


class RayJoinError(FeatureError):
    """A Ray task of the join failed or its worker died (nothing was written: run it again)."""


@dataclass(frozen=True)
class ViewJoin:
    """One feature view's part of a training set: its timestamp column, TTL and requested columns."""

    name: str
    timestamp: str
    ttl: timedelta | None
    columns: tuple[str, ...]


def _q(name: str) -> str:
    return quote_ident(name, "duckdb")


def _join_sql(key: str, view: ViewJoin) -> str:
    """Feast's point-in-time rule for one view, over ``e`` (entity rows) and ``f`` (feature rows)."""
    cols = ", ".join(f"f.{_q(c)} AS {_q(c)}" for c in view.columns)
    feats = ", ".join(_q(c) for c in view.columns)
    ttl = view.ttl.total_seconds() if view.ttl else 0
    keep = f"j._lw_fts >= j.event_timestamp - to_microseconds({int(ttl * 1_000_000)})" if ttl else "j._lw_fts IS NOT NULL"
    return (
        f"WITH fv AS (SELECT {_q(key)} AS _lw_key, CAST({_q(view.timestamp)} AS TIMESTAMPTZ) AS _lw_fts, {feats} "
        f"FROM f WHERE {_q(view.timestamp)} IS NOT NULL), "
        f"j AS (SELECT e._lw_row, e.event_timestamp, f._lw_fts, {cols} FROM e ASOF LEFT JOIN fv AS f "
        f"ON e._lw_key = f._lw_key AND e.event_timestamp >= f._lw_fts) "
        f"SELECT j._lw_row, " + ", ".join(f"CASE WHEN {keep} THEN j.{_q(c)} END AS {_q(c)}" for c in view.columns)
        + " FROM j ORDER BY j._lw_row"
    )


def _join_chunk(uri: str, version: int, storage_options: dict[str, str] | None, key: str, buckets: list[int] | None,
                entities: pa.Table, views: list[ViewJoin]) -> list[pa.Table]:
    """A Ray task: the join for some subject buckets; one table (``_lw_row`` + columns) per view."""
    import duckdb

    columns = sorted({key, *(v.timestamp for v in views), *(c for v in views for c in v.columns)})
    dt = DeltaTable(uri, version=version, storage_options=storage_options)
    flt = None if buckets is None else pc.field("_subject_bucket").isin(buckets)
    rows = dt.to_pyarrow_dataset().to_table(columns=columns, filter=flt)
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone='UTC'")
        con.register("e", entities)
        con.register("f", rows)
        return [con.execute(_join_sql(key, v)).to_arrow_table() for v in views]
    finally:
        con.close()


def point_in_time_on_ray(config: ProjectConfig, uri: str, version: int, key: str, entities: pa.Table,
                         views: list[ViewJoin], types: dict[str, pa.DataType]) -> pa.Table:
    """The feature columns of every entity row, in entity row order (``types``: each column's type).

    ``entities`` holds the subject tokens in ``key`` and ``event_timestamp``. The silver table at
    ``uri`` is read at ``version``, so every task sees the same snapshot.
    """
    ray = connect()
    cpus = check_cluster(ray, config)
    so = dict(config.storage.options) or None
    dt = DeltaTable(uri, version=version, storage_options=so)
    n = table_buckets(dt) if "_subject_bucket" in dt.metadata().partition_columns else None
    ents = pa.table({
        "_lw_key": entities[key].cast(pa.string()),
        "event_timestamp": entities["event_timestamp"].cast(pa.timestamp("us", tz="UTC")),
        "_lw_row": pa.array(np.arange(entities.num_rows, dtype=np.int64)),
    })
    shares: list[tuple[list[int] | None, pa.Table]] = []
    if n is None:  # not bucketed: one task reads the whole version
        shares.append((None, ents))
    else:
        of_row = np.asarray(subject_buckets(ents["_lw_key"], n).to_numpy(zero_copy_only=False))
        present = np.unique(of_row)
        for i in range(2 * cpus):
            mine = present[i::2 * cpus]
            if len(mine):
                shares.append(([int(b) for b in mine], ents.filter(pa.array(np.isin(of_row, mine)))))
    task = ray.remote(num_cpus=1, max_retries=0)(_join_chunk)
    refs = [task.remote(uri, version, so, key, b, part, views) for b, part in shares]
    try:
        parts = [ray.get(r) for r in refs]
    except ray.exceptions.RayTaskError as exc:
        raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None
    except ray.exceptions.RayError as exc:
        raise RayJoinError(f"a Ray worker died during the point-in-time join ({type(exc).__name__}); "
                           "nothing was written: run it again") from None
    out: dict[str, pa.ChunkedArray] = {}
    for i, view in enumerate(views):
        joined = pa.concat_tables([p[i] for p in parts]) if parts else None
        if joined is None or joined.num_rows == 0:
            for c in view.columns:
                out[c] = pa.chunked_array([pa.nulls(entities.num_rows, types[c])])
            continue
        order = pc.sort_indices(joined["_lw_row"])
        joined = joined.take(order)
        if joined.num_rows != entities.num_rows:
            raise RayJoinError(f"the join of view '{view.name}' returned {joined.num_rows} rows for "
                               f"{entities.num_rows} entity rows")
        for c in view.columns:
            out[c] = joined[c].cast(types[c])
    return pa.table(out)

