"""Governed ingest on a Ray cluster: the same batch code on the workers, one committer.

``ingest(..., engine="ray")`` (``lakewarden ingest --engine ray``, the pipeline's ``ingest.engine``)
runs each batch's expensive work on Ray workers, and keeps on the driver what must be decided once
and in order:

- **driver**: the gate, reading the landing files into batches, each batch's content id (batches
  already in the ledger are skipped), uniqueness across batches, every Delta commit, the ledger,
  the audit and lineage;
- **workers** (one Ray actor per CPU, spread over the nodes): text and shape, the contract's rules,
  tokens and keys from the key store, the sort into accepted and quarantined rows, sealing, and
  the Parquet files, written straight into the tables' folders. A worker returns only small things:
  each batch's unique columns (for the driver's ordered rules), then its counts and the files'
  add actions.

A worker runs :class:`lakehouse.ingest.BatchWork`, the object the embedded ingest runs in its
threads, so the rules, tokens, sealing and quarantine are the same code. The driver commits a group
of batches with ``DeltaTable.create_write_transaction``: one commit per table per group, carrying
every batch's application transaction ``lakewarden.ingest.<batch id>`` (the same as the embedded
path's). A rerun skips what the ledger holds, and a table that already holds a batch's transaction
does not get it twice, so a crash anywhere (driver or worker, even SIGKILL) leaves a rerun exactly
once. Files a dead run wrote but never committed are not part of any table; ``tables vacuum``
removes them once they are older than the retention.

Row data that crosses Ray (a landing batch to a worker, a batch's unique columns back) is sealed
under a key from the key store (:class:`Transit`): Ray's object store lives in shared memory and
spills to local disk, and plaintext identifiers must not land there.

Where a cluster's nodes are more than one machine, the workers must reach the same tables and the
same keys: ``storage.root`` on object storage and ``keys.store`` on PostgreSQL, checked before any
work. A worker reads the key-encryption key and the object store's credentials from its own
environment (set where ``ray start`` runs); nothing secret goes through Ray.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError
from deltalake.schema import Field as DeltaField
from deltalake.transaction import AddAction

from governance.config import ProjectConfig
from governance.gate import Actor
from governance.cluster import TRANSIT_KEY, Transit, check_cluster, connect
from governance.objectstore import filesystem
from governance.pii import redact
from governance.policy import DatasetPolicy
from governance.workspace import Workspace
from lakehouse.catalog import TableRef, stats_columns, table_configuration, table_description
from lakehouse.errors import IngestError
from lakehouse.ingest import _COMMIT_RETRIES, BatchWork, FileReport, Ingestor, Progress, ciphertext_only
from lakehouse.readers import RawBatch, header
from lakehouse.validate import ShapePlan, plan_shape

LAYERS = ("quarantine", "vault", "restricted", "bronze")  # commit order: bronze last, as on one machine
_NULL_PARTITION = "__HIVE_DEFAULT_PARTITION__"


# -- files a worker writes --------------------------------------------------------------------
@dataclass(frozen=True)
class WrittenFile:
    path: str  # relative to the table's root, as stored (not URI-encoded: delta-rs encodes it)
    size: int
    partition_values: dict[str, str | None]
    stats: str

    def action(self, now_ms: int) -> AddAction:
        return AddAction(self.path, self.size, self.partition_values, now_ms, True, self.stats)


def partition_value(v: Any) -> str | None:
    """A partition value as the Delta protocol serializes it."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime):
        return v.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f") if v.tzinfo else v.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, date):
        return v.isoformat()
    return str(v)


def _stat(v: Any) -> Any:
    if isinstance(v, date):
        return v.isoformat()
    return v


def file_stats(tbl: pa.Table, columns: list[str]) -> str:
    """Delta statistics of one file: rows, nulls, and min/max of its numbers and dates. Only
    ``columns`` (never a token or a sealed value: see :func:`lakehouse.catalog.stats_columns`)."""
    nulls, mins, maxs = {}, {}, {}
    for c in columns:
        col = tbl[c]
        nulls[c] = col.null_count
        t = col.type
        if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_date(t)):
            continue
        if col.null_count == len(col):
            continue
        mm = pc.min_max(col).as_py()
        lo, hi = mm["min"], mm["max"]
        if pa.types.is_floating(t) and not (np.isfinite(lo) and np.isfinite(hi) and not pc.any(pc.is_nan(col)).as_py()):
            continue
        mins[c], maxs[c] = _stat(lo), _stat(hi)
    return json.dumps({"numRecords": tbl.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls},
                      separators=(",", ":"))


def _partition_slices(tbl: pa.Table, partition_by: list[str]) -> list[tuple[dict[str, str | None], pa.Table]]:
    """The table's rows grouped by their partition values (sorted once, then sliced)."""
    if not partition_by or not tbl.num_rows:
        return [({}, tbl)] if tbl.num_rows else []
    codes = np.zeros(tbl.num_rows, dtype=np.int64)
    for c in partition_by:
        enc = pc.dictionary_encode(tbl[c].combine_chunks(), null_encoding="encode")
        n = len(enc.dictionary)
        codes = codes * max(n, 1) + np.asarray(enc.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    ordered = tbl.take(pa.array(order))
    sorted_codes = codes[order]
    starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
    ends = np.r_[starts[1:], len(sorted_codes)]
    out = []
    for s, e in zip(starts, ends):
        part = ordered.slice(int(s), int(e - s))
        values = {c: partition_value(part[c][0].as_py()) for c in partition_by}
        out.append((values, part.drop_columns(partition_by)))
    return out


def write_files(uri: str, tbl: pa.Table, *, partition_by: list[str], subject_key: str, sealed: list[str],
                compression: str) -> list[WrittenFile]:
    """Write ``tbl`` as Parquet files under a Delta table's root, one per partition, and return
    what the driver needs to commit them. As in the embedded writer: sealed columns get no
    dictionary and no statistics, their lengths delta-encoded, and so are the row numbers; a
    table of nothing but ciphertext and tokens is written without block compression."""
    fs, root = filesystem(uri)
    if ciphertext_only(tbl.column_names, sealed, subject_key):
        compression = "none"
    codec = "NONE" if compression == "none" else compression.upper()
    suffix = "" if codec == "NONE" else f".{compression}"
    local = isinstance(fs, pafs.LocalFileSystem)
    written = []
    for values, part in _partition_slices(tbl, partition_by):
        folder = "/".join(f"{c}={_NULL_PARTITION if v is None else quote(v, safe='')}" for c, v in values.items())
        name = f"part-00000-{uuid.uuid4()}-c000{suffix}.parquet"
        rel = f"{folder}/{name}" if folder else name
        path = f"{root}/{rel}"
        if local:  # an object store has no folders to make
            fs.create_dir(f"{root}/{folder}" if folder else root, recursive=True)
        plain = [c for c in part.column_names if c not in sealed]
        encoding = {c: "DELTA_LENGTH_BYTE_ARRAY" for c in sealed if c in part.column_names}
        if "_row" in part.column_names:
            encoding["_row"] = "DELTA_BINARY_PACKED"
        pq.write_table(part, path, filesystem=fs, compression=codec, write_statistics=plain,
                       use_dictionary=[c for c in plain if c not in encoding], column_encoding=encoding or None)
        size = fs.get_file_info(path).size
        stats_cols = [c for c in stats_columns(part.column_names, subject_key) if c not in sealed]
        written.append(WrittenFile(rel, size, values, file_stats(part, stats_cols)))
    return written


# -- the worker ---------------------------------------------------------------------------------
class IngestWorker:
    """A Ray actor: one dataset's :class:`BatchWork` with its own key store connection and DuckDB.

    A batch passes twice: :meth:`check` (held here, only its unique columns go back), then, once
    the driver has decided the rules that need every earlier batch, :meth:`protect`."""

    def __init__(self, config: ProjectConfig, policy: DatasetPolicy, dataset: str, buckets: int, ingest_id: str) -> None:
        self.ws = Workspace(config)
        self.config = config
        self.work = BatchWork(policy, self.ws.keyring, dataset, buckets=buckets, compression=config.storage.compression)
        self.transit = Transit(self.ws.keyring.system_key(TRANSIT_KEY), ingest_id)
        self.dataset = dataset
        self.held: dict[str, tuple[RawBatch, Any]] = {}

    def pid(self) -> int:
        return os.getpid()

    def peak_rss_mb(self) -> float:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def check(self, batch_id: str, sealed_raw: bytes, plan: ShapePlan, now: datetime) -> bytes | None:
        """The batch's rules, tokens and keys; what goes back (sealed) is its unique columns and tokens.
        ``now``: the driver's clock, for "today" in the contract's bounds."""
        raw: RawBatch = self.transit.open(sealed_raw, batch_id, "raw")
        checked = self.work._check(raw, plan, now)
        self.held[batch_id] = (raw, checked)
        if checked is None:
            return None
        out, subjects = checked
        small = out.select(["_row", "_reason", *(f"_t_{c}" for c in self.work.validator.unique)])
        if subjects is not None:
            small = small.append_column("_token", subjects[0])
        return self.transit.seal(small, batch_id, "unique")

    def protect(self, batch_id: str, reasons: pa.Array | None, source: str, now: datetime) -> dict[str, Any]:
        raw, checked = self.held.pop(batch_id)
        out, subjects = (None, None) if checked is None else checked
        accepted, n_acc, quarantine = self.work._sort(out, subjects, reasons, raw, batch_id, source, now,
                                                      lambda f, *a: f(*a))
        counts = Counter(self.work.reasons)
        self.work.reasons.clear()
        tables = dict(accepted or {})
        tables["quarantine"] = quarantine
        files: dict[str, tuple[pa.Schema, list[WrittenFile]]] = {}
        key = self.work.policy.subject_key
        for layer in LAYERS:
            tbl = tables.get(layer)
            if tbl is None or not tbl.num_rows:
                continue
            uri = self.config.table_uri(f"{layer}/{self.dataset}")
            parts = [] if layer == "quarantine" else self.work.partitions(tbl.column_names)
            files[layer] = (tbl.schema, write_files(uri, tbl, partition_by=parts, subject_key=key,
                                                    sealed=self.work.sealed_cols, compression=self.work.compression))
        return {"accepted": n_acc, "quarantined": quarantine.num_rows, "reasons": counts, "files": files}

    def close(self) -> None:
        self.work.validator.close()
        self.ws.close()


# -- the driver -------------------------------------------------------------------------------
@dataclass
class _Pending:
    batch_id: str
    first_row: int
    rows_read: int
    worker: Any
    ref: Any


class RayIngestor(Ingestor):
    """The embedded :class:`Ingestor`'s driver half (done batches, ordered rules, commits, ledger,
    audit), with the batch work on Ray workers."""

    def __init__(self, ws: Workspace, actor: Actor, dataset: str, *, batch_rows: int, progress: Progress | None,
                 workers: int | None = None, address: str | None = None) -> None:
        super().__init__(ws, actor, dataset, batch_rows=batch_rows, progress=progress, workers=1)
        self.ray = connect(address)
        cpus = check_cluster(self.ray, ws.config)
        n = workers or cpus
        remote = self.ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0, scheduling_strategy="SPREAD")
        cls = remote(IngestWorker)
        ingest_id = uuid.uuid4().hex
        self.transit = Transit(self.ring.system_key(TRANSIT_KEY), ingest_id)
        self.actors = [cls.remote(ws.config, self.policy, dataset, self.buckets, ingest_id) for _ in range(n)]
        self.workers = n
        self.worker_peak_rss_mb: list[float] = []
        # Where the driver's time goes: the rest of "total" is its own work (reading, batch ids,
        # sealing for transit, ordered rules), which bounds how many workers one driver can feed.
        self.driver_seconds: Counter = Counter()

    # -- the loop -----------------------------------------------------------------------------
    def ingest_file(self, path: Path, *, skip: bool = False) -> FileReport:
        t0 = time.perf_counter()
        try:
            return self._ingest_file(path, skip=skip)
        finally:
            self.driver_seconds["total"] += time.perf_counter() - t0

    def _ingest_file(self, path: Path, *, skip: bool = False) -> FileReport:
        source = redact(path.name)[0]
        rep = FileReport(source=source)
        plan = plan_shape(self.policy, header(path), source=path.name, policy_file=f"policies/{self.dataset}.yaml")
        rep.dropped_columns, rep.filled_columns = plan.dropped, plan.filled
        checking: deque[_Pending] = deque()
        protecting: deque[_Pending] = deque()
        group: list[tuple[_Pending, dict[str, Any]]] = []
        n = len(self.actors)
        turn = 0
        for raw, batch_id in self._new_batches(path, rep, skip=skip):
            worker = self.actors[turn % n]
            turn += 1
            checking.append(_Pending(batch_id, raw.first_row, raw.rows_read, worker,
                                     worker.check.remote(batch_id, self.transit.seal(raw, batch_id, "raw"), plan,
                                                         self.ws.now())))
            del raw
            if len(checking) >= n:
                protecting.append(self._decide(checking.popleft(), source))
            while len(protecting) > n:
                group.append(self._collect(protecting.popleft(), rep))
            if len(group) >= n:
                self._commit_group(group, source)
                group = []
        while checking:
            protecting.append(self._decide(checking.popleft(), source))
        while protecting:
            group.append(self._collect(protecting.popleft(), rep))
        if group:
            self._commit_group(group, source)
        if not rep.balanced:  # never expected: it would mean a row was lost
            raise IngestError(
                f"{path.name}: row counts do not add up (read {rep.rows_read}, accepted {rep.rows_accepted}, "
                f"quarantined {rep.rows_quarantined}, skipped {rep.rows_skipped})"
            )
        return rep

    def _get(self, ref: Any) -> Any:
        """A worker's result; its error re-raised as itself (a user's mistake stays a clean error),
        a dead worker as an IngestError that says what a rerun does."""
        ray = self.ray
        t0 = time.perf_counter()
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise cause from None
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError) as exc:
            raise IngestError(
                f"a Ray worker died during ingest of {self.dataset} ({type(exc).__name__}); the batches committed "
                "before stay committed, and a rerun ingests exactly what is missing"
            ) from None
        finally:
            self.driver_seconds["waiting for workers"] += time.perf_counter() - t0

    def _decide(self, p: _Pending, source: str) -> _Pending:
        """The ordered rules on the batch's unique columns, in file order; then its protection starts."""
        sealed = self._get(p.ref)
        small = None if sealed is None else self.transit.open(sealed, p.batch_id, "unique")
        reasons = None
        if small is not None:
            small = self.validator.dedupe(small)
            tokens = small["_token"].combine_chunks() if "_token" in small.column_names else None
            reasons = self._final_reasons(small, tokens)
        now = self.ws.now()
        return _Pending(p.batch_id, p.first_row, p.rows_read, p.worker,
                        p.worker.protect.remote(p.batch_id, reasons, source, now))

    def _collect(self, p: _Pending, rep: FileReport) -> tuple[_Pending, dict[str, Any]]:
        res = self._get(p.ref)
        rep.rows_accepted += res["accepted"]
        rep.rows_quarantined += res["quarantined"]
        self.reasons.update(res["reasons"])
        if self.progress:
            self.progress(rep.source, p.rows_read)
        return p, res

    # -- the commit ---------------------------------------------------------------------------
    def _commit_group(self, group: list[tuple[_Pending, dict[str, Any]]], source: str) -> None:
        t0 = time.perf_counter()
        try:
            self._commit_group_timed(group, source)
        finally:
            self.driver_seconds["committing"] += time.perf_counter() - t0

    def _commit_group_timed(self, group: list[tuple[_Pending, dict[str, Any]]], source: str) -> None:
        """One commit per table for the group (bronze last), then the ledger's rows, then the audit."""
        for layer in LAYERS:
            entries = [(p.batch_id, res["files"][layer]) for p, res in group if layer in res["files"]]
            if entries:
                self._commit_files(TableRef(layer, self.dataset), entries)
        now = self.ws.now()
        self._ledger_rows([(p.batch_id, source, p.first_row, p.rows_read, res["accepted"], res["quarantined"], now)
                           for p, res in group])
        for p, res in group:
            self.ws.audit.record(
                "ingest.batch", actor=self.actor.name, outcome="ok", stage="ingest",
                resource=f"dataset:{self.dataset}",
                details={"batch_id": p.batch_id, "rows_read": p.rows_read, "accepted": res["accepted"],
                         "quarantined": res["quarantined"], "engine": "ray"},
            )

    def _commit_files(self, ref: TableRef, entries: list[tuple[str, tuple[pa.Schema, list[WrittenFile]]]]) -> None:
        uri = self.catalog.uri(ref)
        so = self.catalog.storage_options
        schema = entries[0][1][0]
        partition_by = [] if ref.layer == "quarantine" else self.partitions(schema.names)
        for attempt in range(_COMMIT_RETRIES):
            if not DeltaTable.is_deltatable(uri, storage_options=so):
                DeltaTable.create(
                    uri, schema, mode="ignore", partition_by=partition_by or None, storage_options=so,
                    configuration=table_configuration(schema.names, self.policy.subject_key),
                    description=table_description(self.buckets if "_subject_bucket" in schema.names else None),
                )
            dt = DeltaTable(uri, storage_options=so)
            todo, stale = [], []
            for bid, (_, files) in entries:
                done = dt.transaction_version(f"lakewarden.ingest.{bid}")
                (stale if done is not None and done >= 0 else todo).append((bid, files))
            self._remove([f for _, files in stale for f in files], uri)  # a rerun's copies of committed batches
            if not todo:
                self.versions[str(ref)] = dt.version()
                return
            self._evolve(dt, ref, schema)
            now_ms = int(time.time() * 1000)
            try:
                dt.create_write_transaction(
                    [f.action(now_ms) for _, files in todo for f in files], "append", schema, partition_by or None,
                    commit_properties=CommitProperties(
                        app_transactions=[Transaction(app_id=f"lakewarden.ingest.{bid}", version=0) for bid, _ in todo]
                    ),
                )
                self.versions[str(ref)] = DeltaTable(uri, storage_options=so).version()
                return
            except CommitFailedError:
                entries = todo
                time.sleep(0.05 * (2**attempt))
        raise IngestError(f"{ref}: could not commit after {_COMMIT_RETRIES} attempts (concurrent writers)")

    def _evolve(self, dt: DeltaTable, ref: TableRef, schema: pa.Schema) -> None:
        """New policy columns: added to the table first (schema_evolution merge), or refused by name."""
        names = {f.name for f in dt.schema().fields}
        new = [f for f in schema if f.name not in names]
        if not new:
            return
        if self.policy.contract.schema_evolution != "merge":
            raise IngestError(
                f"{ref}: the policy added column(s) {', '.join(sorted(f.name for f in new))} since the table was "
                "created and contract.schema_evolution is reject"
            )
        dt.alter.add_columns([DeltaField.from_arrow(f.with_nullable(True)) for f in new])  # type: ignore[attr-defined]

    def _remove(self, files: list[WrittenFile], uri: str) -> None:
        if not files:
            return
        fs, root = filesystem(uri)
        for f in files:
            try:
                fs.delete_file(f"{root}/{f.path}")
            except (FileNotFoundError, OSError):
                pass

    def close(self) -> None:
        try:
            actors = getattr(self, "actors", [])
            if actors:  # each says its peak memory and closes its key store; a dead one is not waited for
                ready, _ = self.ray.wait([a.peak_rss_mb.remote() for a in actors], num_returns=len(actors), timeout=10)
                for r in ready:
                    try:
                        self.worker_peak_rss_mb.append(round(self.ray.get(r), 1))
                    except self.ray.exceptions.RayError:  # a worker that died says nothing
                        pass
                self.ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10)
            for a in actors:
                self.ray.kill(a)
        finally:
            super().close()


__all__ = ["IngestWorker", "RayIngestor", "WrittenFile", "file_stats", "partition_value", "write_files"]




# -- silver on Ray ----------------------------------------------------------------------------------
def _silver_chunk(config: ProjectConfig, policy: DatasetPolicy, dataset: str, bronze_version: int, buckets: list[int],
                  stats: dict[str, Any], columns: list[str], hashed: list[str]) -> dict[str, Any]:
    """A Ray task: silver for some subject buckets of one bronze version. A subject's rows are all
    in one bucket, so the deduplication (latest row per subject) is exact per bucket. Nothing of
    the rows goes back: the files are written into silver's folder, their add actions returned."""
    import duckdb

    from lakehouse.silver import MASK_HASH_KEY, base_sql, transformed, with_hashes

    so = config.storage.options or None
    bronze = DeltaTable(config.table_uri(f"bronze/{dataset}"), version=bronze_version, storage_options=so)
    rows = bronze.to_pyarrow_dataset().to_table(filter=pc.field("_subject_bucket").isin(buckets))
    key = b""
    if hashed:
        ws = Workspace(config)
        try:
            key = ws.keyring.system_key(MASK_HASH_KEY)
        finally:
            ws.close()
    con = duckdb.connect(":memory:")
    try:
        con.execute("SET TimeZone='UTC'")
        con.register("bronze", rows)
        con.execute(f"CREATE TEMP VIEW base AS {base_sql(policy)}")
        out = with_hashes(transformed(con, policy, stats, columns, dataset, 250_000), hashed, key).read_all()
    finally:
        con.close()
    files = write_files(config.table_uri(f"silver/{dataset}"), out,
                        partition_by=[*policy.layout.partition_by, "_subject_bucket"], subject_key=policy.subject_key,
                        sealed=[], compression="zstd")
    return {"rows": out.num_rows, "schema": out.schema, "files": files}


def silver_on_ray(ws: Workspace, dataset: str, bronze: DeltaTable, *, stats: dict[str, Any], columns: list[str],
                  hashed: list[str], meta: dict[str, str]) -> int:
    """Silver's files written by Ray tasks (the subject buckets split over the cluster's CPUs, two
    chunks per CPU), committed here in one overwrite carrying ``meta``; returns the rows written."""
    from lakehouse.catalog import table_buckets

    ray = connect()
    cpus = check_cluster(ray, ws.config)
    policy = ws.policies.dataset(dataset)
    buckets = sorted(v for v in pc.unique(
        bronze.to_pyarrow_dataset().to_table(columns=["_subject_bucket"])["_subject_bucket"]).to_pylist() if v is not None)
    chunks = [c for c in (buckets[i::2 * cpus] for i in range(2 * cpus)) if c]
    task = ray.remote(num_cpus=1, max_retries=0)(_silver_chunk)
    refs = [task.remote(ws.config, policy, dataset, bronze.version(), c, stats, columns, hashed) for c in chunks]
    results = []
    try:
        for r in refs:
            results.append(ray.get(r))
    except ray.exceptions.RayTaskError as exc:
        raise (exc.cause if getattr(exc, "cause", None) is not None else exc) from None
    except ray.exceptions.RayError as exc:
        raise IngestError(f"a Ray worker died building silver.{dataset} ({type(exc).__name__}); silver is unchanged, "
                          "run it again") from None
    uri = ws.config.table_uri(f"silver/{dataset}")
    so = ws.config.storage.options or None
    schemas = [r["schema"] for r in results if r["rows"]]
    schema = schemas[0] if schemas else results[0]["schema"] if results else None
    if schema is None:
        raise IngestError(f"silver.{dataset}: bronze has no subject buckets to build from")
    partition_by = [*policy.layout.partition_by, "_subject_bucket"]
    if not DeltaTable.is_deltatable(uri, storage_options=so):
        DeltaTable.create(uri, schema, mode="ignore", partition_by=partition_by, storage_options=so,
                          configuration=table_configuration(schema.names, policy.subject_key),
                          description=table_description(table_buckets(bronze)))
    now_ms = int(time.time() * 1000)
    DeltaTable(uri, storage_options=so).create_write_transaction(
        [f.action(now_ms) for r in results for f in r["files"]], "overwrite", schema, partition_by,
        commit_properties=CommitProperties(custom_metadata=meta),
    )
    return sum(r["rows"] for r in results)
