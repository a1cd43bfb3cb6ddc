"""Table maintenance and inspection: list, describe, history, optimize, vacuum; token statistics.

Destructive verbs default to safe, like delta-rs: ``vacuum`` is a dry run unless
``dry_run=False``, and keeps the dataset policy's ``retention.history`` (time
travel window) unless a shorter one is named explicitly with
``enforce_retention=False``. Optimize and vacuum are gated (stage ``maintain``)
and audited.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import CommitProperties
from deltalake.exceptions import CommitFailedError
from deltalake.transaction import AddAction, RemoveAction

from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace
from lakehouse.catalog import SUBJECT_COLUMNS, Catalog, TableRef, table_configuration
from lakehouse.errors import TableError
from governance.objectstore import filesystem, is_remote, purge_old_versions


@dataclass(frozen=True)
class TableInfo:
    ref: TableRef
    version: int
    rows: int
    files: int
    bytes: int
    partitions: tuple[str, ...]
    modified: datetime | None


def _info(cat: Catalog, ref: TableRef) -> TableInfo:
    dt = cat.open(ref)
    adds = pa.table(dt.get_add_actions(flatten=True))
    rows = sum(v or 0 for v in adds["num_records"].to_pylist()) if "num_records" in adds.column_names else dt.count()
    size = sum(adds["size_bytes"].to_pylist()) if adds.num_rows else 0
    ts = dt.history(1)[0].get("timestamp")
    return TableInfo(
        ref, dt.version(), rows, adds.num_rows, size, tuple(dt.metadata().partition_columns),
        datetime.fromtimestamp(ts / 1000, timezone.utc) if ts else None,
    )


def list_tables(ws: Workspace) -> list[TableInfo]:
    cat = Catalog(ws.config)
    return [_info(cat, ref) for ref in cat.list()]


def describe(ws: Workspace, ref: TableRef) -> dict[str, Any]:
    """Schema with each column's policy class and protection, layout, properties and size."""
    cat = Catalog(ws.config)
    dt = cat.open(ref)
    info = _info(cat, ref)
    policy = ws.policies.datasets.get(ref.dataset)
    cols = []
    for f in dt.schema().fields:
        pc_ = policy.columns.get(f.name) if policy else None
        if pc_ is not None:
            cls, prot = pc_.class_.value, (pc_.protection.value if pc_.protection else "")
        elif policy is not None and f.name in policy.derived_columns():
            cls, prot = "public", "derived"
        else:
            cls, prot = ("system" if f.name.startswith("_") else "unclassified"), ""
        cols.append({"name": f.name, "type": str(f.type.type if hasattr(f.type, "type") else f.type), "class": cls, "protection": prot})
    return {
        "table": str(ref),
        "uri": cat.uri(ref),
        "version": info.version,
        "rows": info.rows,
        "files": info.files,
        "bytes": info.bytes,
        "partition_columns": list(info.partitions),
        "properties": dict(dt.metadata().configuration),
        "columns": cols,
    }


def history(ws: Workspace, ref: TableRef, *, limit: int | None = 20) -> list[dict[str, Any]]:
    dt = Catalog(ws.config).open(ref)
    out = []
    for h in dt.history(limit):
        m = h.get("operationMetrics") or {}
        out.append(
            {
                "version": h.get("version"),
                "time": datetime.fromtimestamp(h["timestamp"] / 1000, timezone.utc) if h.get("timestamp") else None,
                "operation": h.get("operation"),
                "rows_added": m.get("num_added_rows"),
                "files_added": m.get("num_added_files"),
                "files_removed": m.get("num_removed_files"),
                "mode": (h.get("operationParameters") or {}).get("mode"),
            }
        )
    return out


@dataclass(frozen=True)
class Optimized:
    """What ``optimize`` did to a table: files compacted, the new version, token statistics removed."""

    table: str
    version: int
    files_added: int | None
    files_removed: int | None
    token_stats_property: str | None = None  # the property set so new files carry no token statistics
    token_stats_files_rewritten: int | None = None  # current files rewritten without them
    token_stats_log_files: int | None = None  # older log files that still carry them (gone with history)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Vacuumed:
    """What ``vacuum`` removed (or, on a dry run, would remove) from a table's storage."""

    table: str
    dry_run: bool
    retention_hours: int
    files: int
    paths: tuple[str, ...]  # the first 50, sorted
    old_versions_purged: int = 0  # on a bucket that keeps versions: the removed files' older versions

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "paths": list(self.paths)}


def optimize(ws: Workspace, actor: Actor, ref: TableRef) -> Optimized:
    """Compact small files (bin-packing); data is unchanged, a new version is written.

    A table written before token statistics were turned off is fixed first (see
    :func:`token_stats`): the property that keeps them off is set, and the current files whose
    add actions carry min/max of a token column are rewritten (one commit, ``dataChange``
    false) with a row count only. Older log entries keep theirs until history is purged.
    """
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.table(ref.dataset, ref.layer))
    cat = Catalog(ws.config)
    ts = token_stats(ws, ref)
    fixed: dict[str, Any] = {}
    if ts is not None and ts.writes:
        dt = cat.open(ref)
        pol = ws.policies.datasets.get(ref.dataset)
        conf = table_configuration([f.name for f in dt.schema().fields], pol.subject_key if pol else SUBJECT_COLUMNS[0])
        dt.alter.set_table_properties(conf, raise_if_not_exists=False)
        fixed["token_stats_property"] = conf[_STATS_PROP]
    if ts is not None and ts.current_files:
        fixed["token_stats_files_rewritten"] = _rewrite_without_stats(cat, ref, set(ts.current_files))
    dt = cat.open(ref)
    metrics = dt.optimize.compact()
    after = token_stats(ws, ref)
    out = Optimized(
        table=str(ref), version=dt.version(), files_added=metrics.get("numFilesAdded"),
        files_removed=metrics.get("numFilesRemoved"), **fixed,
        token_stats_log_files=after.log_files if after is not None and after.log_files else None,  # gone with history
    )
    details = {k: v for k, v in out.to_dict().items() if k != "table"}
    ws.audit.record("tables.optimize", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource=f"table:{ref}", details=details)
    return out


def vacuum(
    ws: Workspace,
    actor: Actor,
    ref: TableRef,
    *,
    dry_run: bool = True,
    retention_hours: int | None = None,
    enforce_retention: bool = True,
) -> Vacuumed:
    """Remove files no version within the retention window needs (dry run by default).

    The window defaults to the dataset policy's ``retention.history``. A shorter window
    than that needs ``enforce_retention=False``: it cuts time travel short.
    """
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.table(ref.dataset, ref.layer))
    policy = ws.policies.datasets.get(ref.dataset)
    window = int(policy.retention.history.total_seconds() // 3600) if policy else 168
    hours = window if retention_hours is None else retention_hours
    if hours < window and enforce_retention:
        raise TableError(
            f"a {hours} h retention is shorter than the policy's history window of {window} h for '{ref.dataset}'",
            hint="pass --no-enforce-retention to cut time travel short on purpose",
        )
    files, purged = vacuum_files(Catalog(ws.config), ref, hours, dry_run=dry_run)
    out = Vacuumed(str(ref), dry_run, hours, len(files), tuple(sorted(files)[:50]), purged)
    ws.audit.record("tables.vacuum", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value, resource=f"table:{ref}",
                    details={"dry_run": dry_run, "retention_hours": hours, "files": len(files),
                             "old_versions_purged": purged})
    return out


def vacuum_files(cat: Catalog, ref: TableRef, hours: int, *, dry_run: bool) -> tuple[list[str], int]:
    """VACUUM (full: orphans too) with a ``hours`` window: the files it removed (or would), and
    how many older object versions were purged after it. On a bucket that keeps versions a delete
    only adds a delete marker, so what vacuum removed would stay readable by version id; every
    vacuum of Lakewarden's (maintenance, retention, erasure) purges those versions too."""
    files = cat.open(ref).vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=False, full=True)
    purged = 0 if dry_run or not is_remote(cat.uri(ref)) else purge_old_versions(cat.uri(ref))
    return files, purged


# -- token statistics in the Delta log ----------------------------------------------------------------
# Governed tables are created with no data-skipping statistics on token columns
# (``delta.dataSkippingStatsColumns``, :func:`lakehouse.catalog.table_configuration`): a file's
# min/max in the log would copy a token, and the log outlives the rows an erasure deletes. A
# table written before that property (or by another writer) has them; these helpers find them,
# ``optimize`` removes them from the current files, and the erasure's history purge removes the
# log entries that still carry them.
_STATS_PROP = "delta.dataSkippingStatsColumns"


@dataclass(frozen=True)
class TokenStats:
    """Where a table's Delta log carries statistics (min/max) of its token columns."""

    table: str
    columns: tuple[str, ...]
    writes: bool  # the table's properties let new files carry them
    current_files: tuple[str, ...]  # current data files whose add action carries them
    log_files: int  # commit and checkpoint files in _delta_log that carry them (history included)

    def describe(self) -> str:
        """One line naming the table (never a value)."""
        parts = []
        if self.current_files:
            parts.append(f"{len(self.current_files)} current file(s)")
        if self.log_files:
            parts.append(f"{self.log_files} log file(s)")
        if self.writes:
            parts.append("new writes")
        return (f"{self.table}: Delta statistics on token column(s) {', '.join(self.columns)} in "
                f"{', '.join(parts)} (written before token statistics were turned off): "
                f"run `lakewarden tables optimize {self.table}`; old log entries go when history is purged")


def _token_columns(ws: Workspace, ref: TableRef, names: list[str]) -> list[str]:
    pol = ws.policies.datasets.get(ref.dataset)
    cols = {*SUBJECT_COLUMNS, *([pol.subject_key] if pol else [])}
    return [c for c in names if c in cols]


def _carries(stats: str | None, cols: list[str]) -> bool:
    if not stats or not any(f'"{c}"' in stats for c in cols):
        return False
    try:
        d = json.loads(stats)
    except ValueError:
        return True  # unreadable: count it, the bytes hold the name
    return any(c in (d.get(k) or {}) for k in ("minValues", "maxValues") for c in cols)


def _log_version(name: str) -> int | None:
    head = name.split(".", 1)[0]
    return int(head) if head.isdigit() and len(head) == 20 else None


def _log_files(uri: str) -> tuple[pafs.FileSystem, str, list[pafs.FileInfo]] | None:
    """The table's ``_delta_log`` entries (files, sorted by name) on a local folder or an object
    store, or None when it has no log."""
    fs, base = filesystem(uri)
    log = f"{base}/_delta_log"
    infos = fs.get_file_info(pafs.FileSelector(log, allow_not_found=True))
    files = sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.base_name)
    return (fs, log, files) if files else None


def scan_log(uri: str, cols: list[str]) -> tuple[dict[str, bool], int]:
    """Replay a table's ``_delta_log`` (local or on an object store): current files (path -> carries
    token stats) and how many commit/checkpoint files carry them anywhere in the history still there."""
    found = _log_files(uri)
    if found is None:
        return {}, 0
    fs, log_dir, infos = found
    cp_version = -1
    names = [i.base_name for i in infos]
    if "_last_checkpoint" in names:
        try:
            with fs.open_input_stream(f"{log_dir}/_last_checkpoint") as fh:
                cp_version = int(json.loads(fh.read())["version"])
        except (ValueError, KeyError, OSError):
            cp_version = -1
    current: dict[str, bool] = {}
    carrying = 0
    for name in names:
        v = _log_version(name)
        if v is None or ".checkpoint" not in name or not name.endswith(".parquet"):
            continue
        add = pq.read_table(f"{log_dir}/{name}", columns=["add"], filesystem=fs).column("add").combine_chunks()
        valid = add.is_valid().to_pylist()
        paths = add.field("path").to_pylist()
        stats = add.field("stats").to_pylist()
        hit = False
        for ok, p, st in zip(valid, paths, stats):
            if not ok:
                continue
            c = _carries(st, cols)
            hit |= c
            if v == cp_version:
                current[p] = c
        carrying += hit
    for name in names:
        v = _log_version(name)
        if v is None or not name.endswith(".json"):
            continue
        hit = False
        with fs.open_input_stream(f"{log_dir}/{name}") as fh:
            for line in fh.read().decode("utf-8").splitlines():
                if not line.strip():
                    continue
                act = json.loads(line)
                if "add" in act:
                    c = _carries(act["add"].get("stats"), cols)
                    hit |= c
                    if v > cp_version:
                        current[act["add"]["path"]] = c
                elif "remove" in act:
                    hit |= _carries(act["remove"].get("stats"), cols)
                    if v > cp_version:
                        current.pop(act["remove"]["path"], None)
        carrying += hit
    return current, carrying


def token_stats(ws: Workspace, ref: TableRef) -> TokenStats | None:
    """The table's token statistics, or None when it has none (or is not on local storage)."""
    cat = Catalog(ws.config)
    uri = cat.uri(ref)
    if not cat.exists(ref):
        return None
    dt = cat.open(ref)
    cols = _token_columns(ws, ref, [f.name for f in dt.schema().fields])
    if not cols:
        return None
    prop = dt.metadata().configuration.get(_STATS_PROP)
    listed = {c.strip().strip("`") for c in prop.split(",")} if prop is not None else None
    writes = listed is None or any(c in listed for c in cols)
    current, carrying = scan_log(uri, cols)
    files = tuple(sorted(p for p, c in current.items() if c))
    if not (writes or files or carrying):
        return None
    return TokenStats(str(ref), tuple(cols), writes, files, carrying)


def token_stats_report(ws: Workspace) -> list[TokenStats]:
    """Every governed table whose Delta log carries (or would carry) token statistics."""
    out = []
    for ref in Catalog(ws.config).list():
        ts = token_stats(ws, ref)
        if ts is not None:
            out.append(ts)
    return out


def _rewrite_without_stats(cat: Catalog, ref: TableRef, paths: set[str]) -> int:
    """Rewrite these current files as they are, committed with a row count as their only
    statistic (one commit of remove and add actions, ``dataChange`` false)."""
    compression = "UNCOMPRESSED" if cat.config.storage.compression == "none" else cat.config.storage.compression.upper()
    for attempt in range(8):
        dt = cat.open(ref)
        ds = dt.to_pyarrow_dataset()
        meta = {a["path"]: a for a in pa.table(dt.get_add_actions(flatten=False)).to_pylist()}
        now = int(time.time() * 1000)
        actions: list[Any] = []
        written: list[str] = []
        for frag in ds.get_fragments():
            if frag.path not in paths or frag.path not in meta:
                continue
            old = meta[frag.path]
            pv = {c: (None if v is None else str(v)) for c, v in (old.get("partition") or {}).items()}
            tbl = frag.to_table(columns=frag.physical_schema.names)
            rel = f"{posixpath.dirname(frag.path)}/part-nostats-{uuid.uuid4()}.{compression.lower()}.parquet".lstrip("/")
            pq.write_table(tbl, rel, filesystem=ds.filesystem, compression=compression,
                           coerce_timestamps="us", allow_truncated_timestamps=False)
            written.append(rel)
            actions.append(RemoveAction(path=frag.path, data_change=False, deletion_timestamp=now,
                                        size=old["size_bytes"], partition_values=pv))
            actions.append(AddAction(path=rel, size=ds.filesystem.get_file_info(rel).size, partition_values=pv,
                                     modification_time=now, data_change=False,
                                     stats=json.dumps({"numRecords": tbl.num_rows})))
        if not written:
            return 0
        try:
            dt.create_write_transaction(
                actions, mode="append", schema=dt.schema(),
                partition_by=list(dt.metadata().partition_columns) or None,
                commit_properties=CommitProperties(custom_metadata={"lakewarden.operation": "drop-token-stats"}),
            )
            return len(written)
        except CommitFailedError:
            for rel in written:
                ds.filesystem.delete_file(rel)
            time.sleep(0.05 * 2**attempt)
    raise TableError(f"{ref}: could not commit the rewrite (concurrent writers)", hint="run it again")


def expire_log(cat: Catalog, ref: TableRef, *, older_than_hours: int, now: float | None = None) -> int:
    """Checkpoint the table and delete the log entries (commits, checkpoints) before the newest
    checkpoint whose commit is older than the window; returns files deleted.

    What Delta's own log cleanup does, with the policy's history window instead of
    ``delta.logRetentionDuration``: versions before that checkpoint can no longer be loaded
    (their data files are vacuumed with the same window).
    """
    uri = cat.uri(ref)
    if not cat.exists(ref):
        return 0
    dt = cat.open(ref)
    dt.create_checkpoint()
    found = _log_files(uri)
    if found is None:
        return 0
    fs, log_dir, infos = found
    cutoff = (time.time() if now is None else now) - older_than_hours * 3600
    by_name = {i.base_name: i for i in infos}
    cps = sorted({v for n in by_name if ".checkpoint" in n and (v := _log_version(n)) is not None})
    keep_from = None
    for v in reversed(cps):
        commit = by_name.get(f"{v:020d}.json")
        if commit is None or commit.mtime.timestamp() <= cutoff or older_than_hours == 0:
            keep_from = v
            break
    if keep_from is None:
        return 0
    n = 0
    for name in sorted(by_name):
        v = _log_version(name)
        if v is not None and v < keep_from:
            fs.delete_file(f"{log_dir}/{name}")
            n += 1
    return n
