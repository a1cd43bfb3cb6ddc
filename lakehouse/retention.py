"""Retention: delete what the policy says may no longer be kept, and say exactly what went.

Each dataset policy's ``retention`` names how long each layer keeps a row::

    retention: {landing: 7d, bronze: 2y, silver: 2y, quarantine: 90d, history: 7d}

=============  =====================  ===================================================
table          kept for               by the row's
=============  =====================  ===================================================
bronze         ``retention.bronze``   ``_ingested_at``
vault          ``retention.bronze``   ``_ingested_at`` (split off the bronze row at ingest)
restricted     ``retention.bronze``   ``_ingested_at`` (likewise)
silver         ``retention.silver``   ``_ingested_at`` (carried over from bronze)
quarantine     ``retention.quarantine`` ``_quarantined_at``
landing files  ``retention.landing``  file time, and only files the ingest ledger shows
                                      were ingested into the dataset
=============  =====================  ===================================================

A layer without a retention keeps its rows. Deleting rows writes a new Delta version;
the files that held them stay readable by time travel until VACUUM removes them, so
every table is then vacuumed with the policy's ``retention.history`` window: files that
left the table longer ago than that are deleted for good.

:func:`enforce_retention` asks the gate first (stage ``maintain`` on each dataset: data
engineers and compliance officers), for every dataset before touching any. Each table
gets one audit event (``retention.enforce``: counts, versions, the cutoff; never a value),
each dataset whose tables changed one lineage run (``retention.<dataset>``: the versions
before → after). A dry run counts what would go and changes nothing (it writes only its
own audit events). Like ``vacuum``, the library defaults to a dry run.

Example::

    rep = enforce_retention(ws, ws.actor("dana"), dry_run=False)
    for t in rep.tables:
        assert t.rows_before == t.rows_deleted + t.rows_after
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import CommitFailedError

from governance.gate import Actor, Resource
from governance.lineage import DatasetRef
from governance.pii import redact
from governance.policy import DatasetPolicy, Stage
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import TableError
from lakehouse.ingest import LEDGER
from lakehouse.maintenance import vacuum_files

__all__ = ["LandingRetention", "RetentionReport", "TableRetention", "enforce_retention", "RULES"]

# layer -> (which retention field, which timestamp column)
RULES: dict[str, tuple[str, str]] = {
    "bronze": ("bronze", "_ingested_at"),
    "vault": ("bronze", "_ingested_at"),
    "restricted": ("bronze", "_ingested_at"),
    "silver": ("silver", "_ingested_at"),
    "quarantine": ("quarantine", "_quarantined_at"),
}
_RETRIES = 8


@dataclass(frozen=True)
class TableRetention:
    """What retention did (or would do) to one table. ``rows_before == rows_deleted + rows_after``."""

    table: str
    keep: timedelta | None  # None: the policy keeps this layer's rows
    column: str | None  # the timestamp column judged by; None when the table has none
    cutoff: datetime | None  # rows older than this go
    rows_before: int
    rows_deleted: int
    rows_after: int
    version_before: int
    version_after: int
    history_hours: int
    files_vacuumed: int
    old_versions_purged: int = 0  # on a bucket that keeps versions: what vacuum left as older versions

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_days"] = None if self.keep is None else self.keep.total_seconds() / 86400
        d["cutoff"] = None if self.cutoff is None else self.cutoff.isoformat()
        del d["keep"]
        return d


@dataclass(frozen=True)
class LandingRetention:
    """Landing files of one dataset: removed (ingested and older than the window) and left."""

    dataset: str
    keep: timedelta | None
    files_removed: int
    files_kept: int  # ingested, still inside the window


@dataclass
class RetentionReport:
    dry_run: bool
    now: datetime
    tables: list[TableRetention] = field(default_factory=list)
    landing: list[LandingRetention] = field(default_factory=list)
    landing_dir: str | None = None
    landing_not_ingested: int = 0  # files in the landing folder no dataset has ingested: left alone
    lineage_runs: list[str] = field(default_factory=list)

    @property
    def rows_deleted(self) -> int:
        return sum(t.rows_deleted for t in self.tables)

    @property
    def files_vacuumed(self) -> int:
        return sum(t.files_vacuumed for t in self.tables)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "now": self.now.isoformat(),
            "rows_deleted": self.rows_deleted,
            "files_vacuumed": self.files_vacuumed,
            "tables": [t.to_dict() for t in self.tables],
            "landing_dir": self.landing_dir,
            "landing": [
                {"dataset": x.dataset, "keep_days": None if x.keep is None else x.keep.total_seconds() / 86400,
                 "files_removed": x.files_removed, "files_kept": x.files_kept}
                for x in self.landing
            ],
            "landing_not_ingested": self.landing_not_ingested,
            "lineage_runs": self.lineage_runs,
        }


def enforce_retention(
    ws: Workspace,
    actor: Actor,
    *,
    dry_run: bool = True,
    datasets: Iterable[str] | None = None,
    landing_dir: str | os.PathLike[str] | None = None,
    now: datetime | None = None,
) -> RetentionReport:
    """Apply every dataset policy's retention (see the module docstring).

    Args:
        ws: the workspace.
        actor: who runs it; the gate decides ``maintain`` on each dataset, all before any change.
        dry_run: count what would go and change nothing (the default).
        datasets: only these datasets (default: every dataset with a policy).
        landing_dir: the folder landing files are kept in; None leaves landing files alone.
        now: the time retention is measured from (default: now, UTC).

    Raises:
        AccessDenied: the actor may not maintain one of the datasets (nothing was changed).
        PolicyError: an unknown dataset was named.
        TableError: ``landing_dir`` is not a folder, ``now`` is naive, or a table cannot be changed.
    """
    now = now or datetime.now(timezone.utc)
    if now.tzinfo is None:
        raise TableError("retention needs an aware time (with a timezone), e.g. 2026-01-31T00:00+00:00")
    names = sorted(ws.policies.datasets) if datasets is None else list(dict.fromkeys(datasets))
    policies = {n: ws.policies.dataset(n) for n in names}
    landing = Path(landing_dir) if landing_dir is not None else None
    if landing is not None and not landing.is_dir():
        raise TableError(f"landing folder {landing} does not exist or is not a folder")
    for n in names:  # every dataset is decided before anything changes
        ws.gate.enforce(Stage.MAINTAIN, actor, Resource.dataset(n), {"dataset": n})
    cat = Catalog(ws.config)
    rep = RetentionReport(dry_run=dry_run, now=now, landing_dir=None if landing is None else str(landing))
    present = cat.list()
    for n in names:
        pol = policies[n]
        changed: list[TableRetention] = []
        for ref in (r for r in present if r.dataset == n and r.layer in RULES):
            t = _table(cat, ref, pol, now, dry_run)
            rep.tables.append(t)
            ws.audit.record("retention.enforce", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                            resource=f"table:{ref}", details={"dry_run": dry_run, **_audit_details(t)})
            if t.rows_deleted and not dry_run:
                changed.append(t)
        if changed:
            rep.lineage_runs.append(_lineage(ws, n, changed))
    if landing is not None:
        rep.landing, rep.landing_not_ingested = _landing(ws, policies, landing, now, dry_run)
        for lr in rep.landing:
            ws.audit.record("retention.landing", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                            resource=f"dataset:{lr.dataset}",
                            details={"dry_run": dry_run, "files_removed": lr.files_removed, "files_kept": lr.files_kept})
    ws.audit.flush()
    return rep


def _audit_details(t: TableRetention) -> dict[str, Any]:
    d = t.to_dict()
    del d["table"]
    return d


def _table(cat: Catalog, ref: TableRef, pol: DatasetPolicy, now: datetime, dry_run: bool) -> TableRetention:
    field_name, column = RULES[ref.layer]
    keep: timedelta | None = getattr(pol.retention, field_name)
    hours = int(pol.retention.history.total_seconds() // 3600)
    dt = cat.open(ref)
    version_before = dt.version()
    has_column = column in {f.name for f in dt.schema().fields}
    cutoff = now - keep if keep is not None and has_column else None
    before = dt.to_pyarrow_dataset().count_rows()
    deleted = 0
    if cutoff is not None:
        old = pc.field(column) < cutoff
        deleted = dt.to_pyarrow_dataset().count_rows(filter=old)
        if deleted and not dry_run:
            dt, deleted, before = _delete(cat, ref, column, cutoff)
    files, purged = vacuum_files(cat, ref, hours, dry_run=dry_run)
    if not dry_run:
        dt = cat.open(ref)
    after = before - deleted if dry_run else dt.to_pyarrow_dataset().count_rows()
    return TableRetention(
        table=str(ref), keep=keep, column=column if has_column else None, cutoff=cutoff, rows_before=before,
        rows_deleted=deleted, rows_after=after, version_before=version_before, version_after=dt.version(),
        history_hours=hours, files_vacuumed=len(files), old_versions_purged=purged,
    )


def _delete(cat: Catalog, ref: TableRef, column: str, cutoff: datetime) -> tuple[DeltaTable, int, int]:
    """Delete rows older than ``cutoff``; returns the table, rows deleted and rows just before."""
    literal = cutoff.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    for attempt in range(_RETRIES):
        dt = cat.open(ref)
        before = dt.to_pyarrow_dataset().count_rows()
        try:
            metrics = dt.delete(f"{column} < '{literal}'")
            return dt, int(metrics.get("num_deleted_rows", 0) or 0), before
        except CommitFailedError:
            time.sleep(0.05 * 2**attempt)
    raise TableError(f"{ref}: could not commit the retention delete after {_RETRIES} attempts (concurrent writers)")


def _ingested_sources(ws: Workspace, dataset: str) -> set[str]:
    uri = ws.config.table_uri(LEDGER)
    so = dict(ws.config.storage.options) or None
    if not DeltaTable.is_deltatable(uri, storage_options=so):
        return set()
    tbl = DeltaTable(uri, storage_options=so).to_pyarrow_dataset().to_table(
        columns=["source"], filter=pc.field("dataset") == dataset)
    return {s for s in tbl["source"].to_pylist() if s}


def _landing(ws: Workspace, policies: dict[str, DatasetPolicy], folder: Path, now: datetime,
             dry_run: bool) -> tuple[list[LandingRetention], int]:
    """Remove landing files an ingest took in whose window has passed; leave files never ingested."""
    owner: dict[str, str] = {}
    for n in policies:
        for source in _ingested_sources(ws, n):
            owner.setdefault(source, n)
    removed = dict.fromkeys(policies, 0)
    kept = dict.fromkeys(policies, 0)
    not_ingested = 0
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        n = owner.get(redact(p.name)[0])
        if n is None:
            not_ingested += 1
            continue
        keep = policies[n].retention.landing
        landed = datetime.fromtimestamp(p.stat().st_mtime, timezone.utc)
        if keep is not None and landed < now - keep:
            if not dry_run:
                p.unlink()
            removed[n] += 1
        else:
            kept[n] += 1
    out = [LandingRetention(n, policies[n].retention.landing, removed[n], kept[n]) for n in policies]
    return out, not_ingested


def _lineage(ws: Workspace, dataset: str, tables: list[TableRetention]) -> str:
    return ws.lineage.emit(
        f"retention.{dataset}",
        inputs=[DatasetRef(t.table, version=t.version_before) for t in tables],
        outputs=[DatasetRef(t.table, version=t.version_after) for t in tables],
        facets={"rows_deleted": {t.table: t.rows_deleted for t in tables},
                "cutoff": {t.table: t.cutoff.isoformat() if t.cutoff else None for t in tables}},
    )
