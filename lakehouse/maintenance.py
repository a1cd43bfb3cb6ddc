"""Table maintenance and inspection: list, describe, history, optimize, vacuum.

Destructive verbs default to safe, like delta-rs: ``vacuum`` is a dry run unless
``dry_run=False``, and keeps the dataset policy's ``retention.history`` (time
travel window) unless a shorter one is named explicitly with
``enforce_retention=False``. Optimize and vacuum are gated (stage ``maintain``)
and audited.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from governance.gate import Actor, Resource
from governance.policy import Stage
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import TableError


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


def optimize(ws: Workspace, actor: Actor, ref: TableRef) -> dict[str, Any]:
    """Compact small files (bin-packing); data is unchanged, a new version is written."""
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.table(ref.dataset, ref.layer))
    dt = Catalog(ws.config).open(ref)
    metrics = dt.optimize.compact()
    out = {
        "files_added": metrics.get("numFilesAdded"),
        "files_removed": metrics.get("numFilesRemoved"),
        "version": dt.version(),
    }
    ws.audit.record("tables.optimize", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource=f"table:{ref}", details=out)
    return out


def vacuum(
    ws: Workspace,
    actor: Actor,
    ref: TableRef,
    *,
    dry_run: bool = True,
    retention_hours: int | None = None,
    enforce_retention: bool = True,
) -> dict[str, Any]:
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
    dt = Catalog(ws.config).open(ref)
    files = dt.vacuum(retention_hours=hours, dry_run=dry_run, enforce_retention_duration=False, full=True)
    out = {"dry_run": dry_run, "retention_hours": hours, "files": len(files), "paths": sorted(files)[:50]}
    ws.audit.record("tables.vacuum", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource=f"table:{ref}", details={k: v for k, v in out.items() if k != "paths"})
    return out
