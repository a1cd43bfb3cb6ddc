"""The lakehouse's erasure handler: delete subjects' rows from every governed table, purge history.

Bronze, silver, vault, restricted and quarantine of every dataset, matched on the subject
token (never a plaintext id). Each table gets a new Delta version without the rows.

* **Few files rewritten.** Tables are partitioned by ``_subject_bucket``: only the subjects'
  bucket partitions are searched (reading the key column), and only the data files that hold
  their rows are rewritten, swapped in one commit of remove and add actions.
* **No token in the Delta log.** delta-rs writes a DELETE's predicate into the commit (it
  would copy the token); the erasure's commit names files and row counts only, and governed
  tables keep no min/max statistics on token columns
  (:func:`lakehouse.catalog.table_configuration`). (delta-rs 1.6's DELETE also rewrites
  strings as ``string_view``, which breaks filtered reads through pyarrow datasets; the
  rewritten files keep the table's types.)
* **Quarantine.** Rows quarantined with the subject's token are deleted; rows quarantined
  *without* a valid key (sealed under the dataset's quarantine key) are opened and deleted
  when they carry one of the subject's identifiers.
* **Kept landing files** (``landing: keep``), wherever they lie: their own handler
  (:data:`LANDING_HANDLER`, entry point ``landing``) rewrites them without the subjects' rows
  in their own format, and the scanner reads them under their labels (:mod:`lakehouse.landing`).
* **History.** Files the delete removed stay on disk for time travel until :func:`purge`
  vacuums them (the request waits for the policy's ``retention.history``, or an officer's
  audited ``--purge-now``). Until then the subject's key is already shredded, so the old
  copies can be neither decrypted nor linked.
"""

from __future__ import annotations

import json
import os
import posixpath
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.transaction import AddAction, RemoveAction
from deltalake.exceptions import CommitFailedError

from governance.errors import LakewardenError
from governance.keys import TOKEN_RE
from governance.policy import Protection
from governance.erasure import (
    SEALED_SHREDDED, SEALED_UNREADABLE, AccessItem, ErasureContext, ErasureHandler, Needles, open_sealed,
)
from governance.workspace import Workspace
from lakehouse import landing
from lakehouse.catalog import Catalog, TableRef, subject_bucket, table_buckets
from governance.objectstore import is_remote, purge_old_versions
from lakehouse.maintenance import expire_log, token_stats, vacuum_files

__all__ = ["sealed_columns", "subject_rows", "HANDLER", "LANDING_HANDLER"]


def _check(tokens: Sequence[str]) -> list[str]:
    toks = list(dict.fromkeys(tokens))
    if not toks or not all(isinstance(t, str) and TOKEN_RE.match(t) for t in toks):
        raise ValueError("erasure works on subject tokens (sub_...), never on identifiers")
    return toks


def _column(ws: Workspace, ref: TableRef) -> str | None:
    pol = ws.policies.datasets.get(ref.dataset)
    if pol is None:
        return None
    return "subject_token" if ref.layer == "quarantine" else pol.subject_key


def _plain_types(tbl: pa.Table) -> pa.Table:
    """View types (which some delta-rs rewrites produce) as plain string/binary, the tables' own types."""
    fields = []
    for f in tbl.schema:
        t = f.type
        if pa.types.is_string_view(t) or pa.types.is_large_string(t):
            t = pa.string()
        elif pa.types.is_binary_view(t) or pa.types.is_large_binary(t):
            t = pa.binary()
        fields.append(f.with_type(t))
    schema = pa.schema(fields)
    return tbl if schema == tbl.schema else tbl.cast(schema)


def _delete_subject_rows(ws: Workspace, tokens: str | Sequence[str]) -> dict[str, int]:
    """Delete the subjects' rows from every governed table; return rows deleted per table.

    The lakehouse handler's work, not a verb: no gate, no audit, no key destruction, no
    verification. Erase through :mod:`governance.erasure` (``lakewarden requests erase``).
    """
    toks = _check([tokens] if isinstance(tokens, str) else tokens)
    cat = Catalog(ws.config)
    out: dict[str, int] = {}
    for ref in cat.list():
        column = _column(ws, ref)
        if column is None:
            continue
        out[str(ref)] = _delete(cat, ref, column, toks)
    return out


def _delete(cat: Catalog, ref: TableRef, column: str, tokens: Sequence[str]) -> int:
    """Rewrite the data files that hold the subjects' rows, without them (one commit; none if
    nothing matches).

    Only the subjects' bucket partitions are searched, file by file, reading the key column;
    a file with a match is rewritten whole without those rows and swapped for the new one in
    one commit of remove and add actions. The log records file paths and row counts, never a
    predicate (a DELETE's would copy the token), and the new files keep the table's own types.
    """
    for attempt in range(8):
        dt = cat.open(ref)
        if column not in {f.name for f in dt.schema().fields}:
            return 0
        bs = _buckets_holding(dt, column, tokens)
        if bs is not None and not bs:
            return 0
        ds = dt.to_pyarrow_dataset()
        flt = None if bs is None else pc.field("_subject_bucket").isin(bs)
        value_set = pa.array(list(tokens), pa.string())
        meta = {a["path"]: a for a in pa.table(dt.get_add_actions(flatten=False)).to_pylist()}
        now = int(time.time() * 1000)
        compression = _compression(cat)

        def rewrite(frag: Any) -> tuple[int, list[Any], str | None]:
            """The file without the subjects' rows: (rows removed, actions, new file or None)."""
            keys = frag.to_table(columns=[column])[column]
            hit = pc.fill_null(pc.is_in(keys.cast(pa.string()), value_set=value_set), False)
            k = int(pc.sum(hit).as_py() or 0)
            if k == 0:
                return 0, [], None
            old = meta[frag.path]
            pv = {c: (None if v is None else str(v)) for c, v in (old.get("partition") or {}).items()}
            acts: list[Any] = [RemoveAction(path=frag.path, data_change=True, deletion_timestamp=now,
                                            size=old["size_bytes"], partition_values=pv)]
            keep = frag.to_table(columns=frag.physical_schema.names).filter(pc.invert(hit))
            if not keep.num_rows:
                return k, acts, None
            rel = f"{posixpath.dirname(frag.path)}/part-erasure-{uuid.uuid4()}.{compression.lower()}.parquet".lstrip("/")
            pq.write_table(keep, rel, filesystem=ds.filesystem, compression=compression,
                           coerce_timestamps="us", allow_truncated_timestamps=False)
            acts.append(AddAction(path=rel, size=ds.filesystem.get_file_info(rel).size, partition_values=pv,
                                  modification_time=now, data_change=True,
                                  stats=json.dumps({"numRecords": keep.num_rows})))
            return k, acts, rel

        # Files are read, filtered and written in parallel (Arrow and Parquet release the GIL).
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            done = list(pool.map(rewrite, ds.get_fragments(filter=flt)))
        n = sum(k for k, _, _ in done)
        actions: list[Any] = [a for _, acts, _ in done for a in acts]
        written = [rel for _, _, rel in done if rel]
        if n == 0:
            return 0  # already erased (a rerun after a crash): no new version
        try:
            dt.create_write_transaction(
                actions, mode="append", schema=dt.schema(), partition_by=list(dt.metadata().partition_columns) or None,
                commit_properties=CommitProperties(custom_metadata={"lakewarden.operation": "erasure"}),
            )
            # A checkpoint after the deletion: the history purge can then drop the log entries
            # before it once they leave the window (old add actions may carry token statistics).
            cat.open(ref).create_checkpoint()
            return n
        except CommitFailedError:
            for rel in written:  # never committed: not part of any version
                ds.filesystem.delete_file(rel)
            time.sleep(0.05 * 2**attempt)
    raise LakewardenError(f"{ref}: could not commit the deletion (concurrent writers)", hint="run the request again")


def _buckets_holding(dt: DeltaTable, column: str, tokens: Sequence[str]) -> list[int] | None:
    """The ``_subject_bucket`` partitions that may hold the subjects' rows (None: not bucketed).

    Computed from the tokens when the table records its bucketing (one partition per subject);
    otherwise — a table written before that property, or under another bucket count — found by
    reading the key column, so no row is missed because a bucket would be computed differently.
    """
    if "_subject_bucket" not in dt.metadata().partition_columns:
        return None
    n = table_buckets(dt)
    if n is not None:
        return sorted({subject_bucket(t, n) for t in tokens})
    t = dt.to_pyarrow_dataset().to_table(columns=[column, "_subject_bucket"])
    hit = pc.is_in(t[column].cast(pa.string()), value_set=pa.array(list(tokens), pa.string()))
    return sorted(set(pc.filter(t["_subject_bucket"], pc.fill_null(hit, False)).to_pylist()))


def _compression(cat: Catalog) -> str:
    c = cat.config.storage.compression
    return "UNCOMPRESSED" if c == "none" else c.upper()


def _quarantine_without_key(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    """Delete quarantined rows sealed under a dataset key that carry a subject's identifiers."""
    needles = Needles([n for n in ctx.needles() if not n[0].endswith(":token")])
    if needles.rx is None:
        return {}
    cat = Catalog(ws.config)
    out: dict[str, int] = {}
    for ref in cat.list():
        if ref.layer != "quarantine":
            continue
        dt = cat.open(ref)
        full = dt.to_pyarrow_table()
        doomed = []
        for i, (t, p) in enumerate(zip(full["subject_token"].to_pylist(), full["payload"].to_pylist())):
            if t is not None or p is None:
                continue
            try:
                plain = ws.keyring.open_system(f"quarantine:{ref.dataset}", p, dataset=f"quarantine.{ref.dataset}",
                                               column="row")
            except LakewardenError:
                continue
            if needles.find(plain):
                doomed.append(i)
        if doomed:
            mask = pc.invert(pc.is_in(pa.array(range(full.num_rows)), value_set=pa.array(doomed)))
            write_deltalake(dt, _plain_types(full.filter(mask)), mode="overwrite",
                            storage_options=cat.storage_options,
                            commit_properties=CommitProperties(custom_metadata={"lakewarden.operation": "erasure"}))
            out[f"delta:{ref} (no key)"] = len(doomed)
    return out


def subject_rows(ws: Workspace, tokens: Sequence[str], *, version_of: dict[str, int] | None = None
                 ) -> dict[TableRef, tuple[int, pa.Table]]:
    """The subjects' rows in each governed table's current version: ``{ref: (version, rows)}``."""
    toks = _check(tokens)
    cat = Catalog(ws.config)
    out: dict[TableRef, tuple[int, pa.Table]] = {}
    for ref in cat.list():
        column = _column(ws, ref)
        if column is None:
            continue
        dt = cat.open(ref, version=(version_of or {}).get(str(ref)))
        if column not in {f.name for f in dt.schema().fields}:
            continue
        bs = _buckets_holding(dt, column, toks)
        expr = None if bs is None else pc.field("_subject_bucket").isin(bs)
        # Partition pruning only: files written by different writers may type strings differently
        # (string vs string_view), which a value filter pushed into the scan cannot compare.
        tbl = dt.to_pyarrow_dataset().to_table(filter=expr)
        keys = tbl[column].cast(pa.string())
        out[ref] = (dt.version(), tbl.filter(pc.is_in(keys, value_set=pa.array(toks, pa.string()))))
    return out


def _purge_history(ws: Workspace, retention_hours: int | None = None) -> dict[str, int]:
    """VACUUM every governed table (full: orphans too); ``None`` keeps each policy's history window.

    Returns files deleted per table. ``retention_hours=0`` removes every file the current
    version does not need — time travel to older versions ends there. A table whose Delta log
    carries token statistics (written before they were turned off) also loses the log entries
    before its newest checkpoint older than the window: they would keep an erased token.
    """
    cat = Catalog(ws.config)
    out: dict[str, int] = {}
    for ref in cat.list():
        pol = ws.policies.datasets.get(ref.dataset)
        window = int(pol.retention.history.total_seconds() // 3600) if pol else 168
        hours = window if retention_hours is None else retention_hours
        files, old = vacuum_files(cat, ref, hours, dry_run=False)
        out[str(ref)] = len(files)
        ts = token_stats(ws, ref)
        if ts is not None and ts.log_files:  # a table written before token statistics were turned off
            out[f"{ref} (log entries)"] = expire_log(cat, ref, older_than_hours=hours)
            if is_remote(cat.uri(ref)):  # the expired log entries, too, stay as older versions
                old += purge_old_versions(cat.uri(ref))
        if old:
            out[f"{ref} (older object versions)"] = old
    return out


def _trino_logs(ws: Workspace) -> list[Path]:
    d = ws.config.workspace_dir / "trino" / "data" / "var" / "log"
    return sorted(p for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def scrub_trino_logs(ws: Workspace, tokens: Sequence[str], *, dry_run: bool = False) -> dict[str, int]:
    """Rewrite the local Trino server's logs without lines naming a token (a query that filtered
    on a subject's token is logged verbatim); returns lines removed per file."""
    toks = [t.encode() for t in tokens]
    out: dict[str, int] = {}
    for p in _trino_logs(ws):
        kept, n = [], 0
        with p.open("rb") as fh:
            for line in fh:
                if any(t in line for t in toks):
                    n += 1
                else:
                    kept.append(line)
        if n and not dry_run:
            tmp = p.with_name(p.name + ".lw-tmp")
            tmp.write_bytes(b"".join(kept))
            os.replace(tmp, p)
        if n:
            out[f"trino-log:{p.name}"] = n
    return out


# -- the handler ----------------------------------------------------------------------------------
def _erase(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    out = _quarantine_without_key(ws, ctx)
    out.update({f"delta:{k}": v for k, v in _delete_subject_rows(ws, ctx.tokens).items()})
    out.update(scrub_trino_logs(ws, ctx.tokens))
    return out


def _purge(ws: Workspace, ctx: ErasureContext, retention_hours: int | None) -> dict[str, int]:
    return {f"delta:{k}": v for k, v in _purge_history(ws, retention_hours).items()}


def _residual(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    out = {f"delta:{ref}": rows.num_rows for ref, (_v, rows) in subject_rows(ws, ctx.tokens).items()}
    out.update(scrub_trino_logs(ws, ctx.tokens, dry_run=True))
    return out


def sealed_columns(ws: Workspace, ref: TableRef) -> dict[str, tuple[str, str]]:
    """``{column: (dataset, column)}``: the associated data each sealed column of a table was sealed with.

    Ingest seals encrypted, vault and restricted columns under ``(<dataset>, <column>)`` and a
    quarantined row's original under ``(quarantine.<dataset>, row)``; silver carries bronze's
    ciphertexts unchanged.
    """
    pol = ws.policies.datasets.get(ref.dataset)
    if pol is None:
        return {}
    if ref.layer == "quarantine":
        return {"payload": (f"quarantine.{ref.dataset}", "row")}
    sealed = (Protection.ENCRYPT, Protection.VAULT, Protection.RESTRICTED)
    return {c: (ref.dataset, c) for c, col in pol.columns.items() if col.protection in sealed}


def _open(ws: Workspace, ref: TableRef, rows: pa.Table, key: str) -> list[dict[str, Any]]:
    """Rows as dicts with every sealed column opened under the subject's key (plain values).

    A quarantined row's payload (its original row, as JSON) is opened and parsed. Bytes in a
    column the policy does not seal stay bytes (the export encodes them as base64).
    """
    sealed = sealed_columns(ws, ref)
    out = []
    for r in rows.to_pylist():
        tok = r.get(key)
        rec: dict[str, Any] = {}
        for c, v in r.items():
            if c == key:
                continue
            if isinstance(v, (bytes, bytearray)) and tok and c in sealed:
                ds, col = sealed[c]
                v = open_sealed(ws, v, token=tok, dataset=ds, column=col)
                if ref.layer == "quarantine" and v not in (SEALED_SHREDDED, SEALED_UNREADABLE):
                    try:
                        v = json.loads(v)
                    except ValueError:
                        pass  # a row that never parsed: its text as it came
            rec[c] = v
        out.append(rec)
    return out


def _identifiers(ws: Workspace, tokens: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for ref, (_v, rows) in subject_rows(ws, tokens).items():
        if ref.layer != "vault":
            continue
        key = ws.policies.datasets[ref.dataset].subject_key
        for tok, rec in zip(rows[key].to_pylist(), _open(ws, ref, rows, key)):
            for c, v in rec.items():
                if c.startswith("_") or v is None or not isinstance(v, str) or v in (SEALED_SHREDDED, SEALED_UNREADABLE):
                    continue
                pair = (f"vault.{ref.dataset}.{c}", v)
                if pair not in out.setdefault(tok, []):
                    out[tok].append(pair)
    return out


def _access(ws: Workspace, ctx: ErasureContext) -> list[AccessItem]:
    items: list[AccessItem] = []
    for ref, (version, rows) in subject_rows(ws, ctx.tokens).items():
        key = _column(ws, ref) or ""
        for tok, rec in zip(rows[key].to_pylist(), _open(ws, ref, rows, key)):
            items.append(AccessItem("delta", str(ref), ctx.labels.get(tok, "subject"), rec, version))
    return items


HANDLER = ErasureHandler(
    name="lakehouse", order=40, erase=_erase, purge=_purge, residual=_residual, identifiers=_identifiers,
    access=_access,
)
"""Entry point ``lakehouse`` of ``lakewarden.erasure_handlers``: governed tables, their history, Trino's logs."""

LANDING_HANDLER = ErasureHandler(
    name="landing", order=45, erase=landing.erase_subjects, residual=landing.residual_rows,
    scan_files=landing.scan_files,
)
"""Entry point ``landing``: kept landing files wherever they lie (:mod:`lakehouse.landing`)."""
