"""Kept landing files: where they are, so that erasure reaches them wherever they lie.

A dataset policy with ``landing: keep`` leaves the plaintext source file after ingest, often
in a folder outside the workspace (an export share). Ingest records each kept file in the
ledger ``_ingest/landing`` (an append-only Delta table next to ``_ingest/batches``):

=================  =========================================================================
dataset            the dataset the file was ingested into
path_digest        HMAC-SHA256 of the file's absolute path under the system key
                   ``landing-digest`` (32 hex): names the file in reports and certificates
path               the absolute path, sealed (AES-256-GCM) under the system key
                   ``landing-path`` — a path may carry a person's name, so never plaintext
format             csv, parquet or jsonl
event              ``kept`` (ingest), ``rewritten`` (an erasure removed rows from it)
content_digest     ``rewritten`` only: keyed digest of the file's new bytes
=================  =========================================================================

Erasure (:func:`erase_subjects`) rewrites each kept file that still exists without the
subjects' rows, in its own format: CSV and JSON Lines line by line (other rows keep their
exact bytes), Parquet row group by row group (schema, metadata and compression kept). A row
goes when its subject key is one of the subjects' ids; a row without a subject key (or one
the parser cannot split) goes when it carries one of their identifiers. The new file is
renamed over the old one (a crash leaves either whole file) and keeps its mode and times
(retention counts a landing file's age from its modification time). The ``rewritten`` event
is recorded *before* the rename: ingest skips a file whose bytes are an erasure's rewrite, so
ingesting the kept file again neither brings the subject back nor duplicates other rows
(their batches changed, so batch ids alone would not find them ingested).

The scanner reads every kept file that still exists (:func:`scan_files`), reporting it by its
label ``landing:<dataset>:<digest16><suffix>``, never by its path. Files recorded before this
ledger existed are not known to it: only file names were kept then.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from governance.errors import LakewardenError
from lakehouse.readers import detect_format

if TYPE_CHECKING:
    from governance.erasure import ErasureContext
    from governance.workspace import Workspace

__all__ = ["LEDGER", "KeptFile", "erase_subjects", "is_erasure_rewrite", "kept_files", "record_kept",
           "residual_rows", "scan_files"]

LEDGER = "_ingest/landing"
PATH_KEY = "landing-path"
DIGEST_KEY = "landing-digest"
_SEAL = {"dataset": "ingest.landing", "column": "path"}
SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("path_digest", pa.string(), nullable=False),
        pa.field("path", pa.binary(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("event", pa.string(), nullable=False),
        pa.field("content_digest", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("actor", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class KeptFile:
    """A kept landing file as the ledger knows it; ``path`` is opened in memory only."""

    dataset: str
    digest: str
    path: Path
    format: str

    @property
    def label(self) -> str:
        """How reports name the file: dataset, path digest and suffix — never the path."""
        return f"landing:{self.dataset}:{self.digest[:16]}{self.path.suffix.lower()}"


# -- the ledger -----------------------------------------------------------------------------------
def _mac(ws: "Workspace", data: bytes) -> str:
    return hmac.new(ws.keyring.system_key(DIGEST_KEY), data, hashlib.sha256).hexdigest()[:32]


def _path_digest(ws: "Workspace", path: Path) -> str:
    return _mac(ws, os.fsencode(str(path.resolve())))


def content_digest(ws: "Workspace", path: Path) -> str:
    """Keyed digest (HMAC-SHA256 under ``landing-digest``) of a file's bytes."""
    h = hmac.new(ws.keyring.system_key(DIGEST_KEY), digestmod=hashlib.sha256)
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:32]


def _rows(ws: "Workspace") -> list[dict[str, Any]]:
    uri = ws.config.table_uri(LEDGER)
    so = dict(ws.config.storage.options) or None
    if not DeltaTable.is_deltatable(uri, storage_options=so):
        return []
    return DeltaTable(uri, storage_options=so).to_pyarrow_table().to_pylist()


def _append(ws: "Workspace", row: dict[str, Any]) -> None:
    uri = ws.config.table_uri(LEDGER)
    so = dict(ws.config.storage.options) or None
    tbl = pa.Table.from_pylist([row], schema=SCHEMA)
    for attempt in range(8):
        try:
            write_deltalake(uri, tbl, mode="append", configuration={"delta.appendOnly": "true"}, storage_options=so)
            return
        except CommitFailedError:
            time.sleep(0.05 * 2**attempt)
    raise LakewardenError(f"{LEDGER}: could not commit (concurrent writers)", hint="run it again")


def _now(ws: "Workspace") -> datetime:
    clock = getattr(ws, "_clock", None)
    return (clock() if clock else datetime.now(timezone.utc)).astimezone(timezone.utc)


def record_kept(ws: "Workspace", dataset: str, path: Path, *, actor: str | None = None) -> KeptFile:
    """Record that ``path`` was ingested into ``dataset`` and kept (once per dataset and path)."""
    path = path.resolve()
    digest = _path_digest(ws, path)
    fmt = detect_format(path)
    if not any(r["dataset"] == dataset and r["path_digest"] == digest for r in _rows(ws)):
        _append(ws, {"dataset": dataset, "path_digest": digest,
                     "path": ws.keyring.seal_system(PATH_KEY, os.fsencode(str(path)), **_SEAL),
                     "format": fmt, "event": "kept", "content_digest": None, "at": _now(ws), "actor": actor})
    return KeptFile(dataset, digest, path, fmt)


def kept_files(ws: "Workspace") -> list[KeptFile]:
    """Every kept landing file the ledger records (whether or not it still exists), paths opened."""
    out: dict[tuple[str, str], KeptFile] = {}
    for r in _rows(ws):
        k = (r["dataset"], r["path_digest"])
        if r["event"] != "kept" or k in out:
            continue
        raw = ws.keyring.open_system(PATH_KEY, r["path"], **_SEAL)
        out[k] = KeptFile(r["dataset"], r["path_digest"], Path(os.fsdecode(raw)), r["format"])
    return sorted(out.values(), key=lambda f: (f.dataset, f.digest))


def is_erasure_rewrite(ws: "Workspace", dataset: str, path: Path) -> bool:
    """True when ``path``'s bytes are those an erasure left in a kept file of ``dataset``: its
    rows were ingested before (ingest skips it)."""
    done = {r["content_digest"] for r in _rows(ws) if r["dataset"] == dataset and r["event"] == "rewritten"}
    return bool(done) and content_digest(ws, path) in done


def scan_files(ws: "Workspace") -> dict[Path, str]:
    """Kept landing files that exist, each with the label reports name it by (for the scanner)."""
    return {f.path: f.label for f in kept_files(ws) if f.path.is_file()}


# -- finding the subjects' rows ---------------------------------------------------------------------
class _Match:
    """Which rows are the subjects': by subject key, or (rows without one) by an identifier."""

    def __init__(self, ws: "Workspace", dataset: str, ctx: "ErasureContext") -> None:
        from governance.erasure import Needles

        self.key = ws.policies.dataset(dataset).subject_key.lower()
        self.ids = {v.strip() for t in ctx.tokens for label, v in ctx.identifiers.get(t, []) if label == "subject_id"}
        self.needles = Needles([n for n in ctx.needles() if not n[0].endswith(":token")])

    def keyed(self, value: Any) -> bool | None:
        """True: the subjects' key; False: another subject's; None: no key in the row."""
        if value is None:
            return None
        s = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        s = s.strip()
        return None if not s else s in self.ids

    def carries(self, raw: bytes) -> bool:
        return bool(self.needles.find(raw))


def _csv_records(fh: Any) -> Iterator[bytes]:
    """Physical lines joined into CSV records (a quoted field may hold newlines: quotes pair up)."""
    buf = b""
    for line in fh:
        buf += line
        if buf.count(b'"') % 2 == 0:
            yield buf
            buf = b""
    if buf:
        yield buf


def _fields(rec: bytes) -> list[str]:
    text = rec.decode("utf-8", "surrogateescape")
    return next(csv.reader(io.StringIO(text, newline="")), [])


def _csv_drop(src: Path, out: Any, m: _Match) -> tuple[int, int]:
    removed = kept = 0
    with src.open("rb") as fh:
        recs = _csv_records(fh)
        head = next(recs, b"")
        out.write(head)
        names = [n.strip().lower() for n in _fields(head.lstrip(b"\xef\xbb\xbf"))]
        at = names.index(m.key) if m.key in names else None
        for rec in recs:
            f = _fields(rec)
            if not f:  # a blank line
                out.write(rec)
                continue
            hit = m.keyed(f[at]) if at is not None and len(f) == len(names) else None
            if hit or (hit is None and m.carries(rec)):
                removed += 1
                continue
            kept += 1
            out.write(rec)
    return removed, kept


def _jsonl_drop(src: Path, out: Any, m: _Match) -> tuple[int, int]:
    removed = kept = 0
    with src.open("rb") as fh:
        for line in fh:
            hit = None
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    obj = None
                if isinstance(obj, dict):
                    keys = [k for k in obj if isinstance(k, str) and k.strip().lower() == m.key]
                    hit = m.keyed(obj[keys[0]]) if keys else None
            if hit or (hit is None and line.strip() and m.carries(line)):
                removed += 1
                continue
            kept += 1
            out.write(line)
    return removed, kept


def _parquet_hits(tbl: pa.Table, m: _Match) -> pa.Array:
    names = {n.strip().lower(): n for n in tbl.column_names}
    n = tbl.num_rows
    if m.key in names:
        col = tbl[names[m.key]]
        if not pa.types.is_string(col.type):
            col = pc.cast(col, pa.string())
        col = pc.utf8_trim_whitespace(col)
        keyed = pc.fill_null(pc.is_in(col, value_set=pa.array(sorted(m.ids), pa.string())), False)
        keyless = pc.fill_null(pc.equal(col, ""), True)
    else:
        keyed = pa.array([False] * n)
        keyless = pa.array([True] * n)
    hits = keyed
    if m.needles.rx2 is not None and pc.any(keyless).as_py():
        carried = pa.array([False] * n)
        for c in tbl.column_names:
            t = tbl[c].type
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                carried = pc.or_(carried, pc.fill_null(pc.match_substring_regex(tbl[c], m.needles.rx2), False))
        hits = pc.or_(hits, pc.and_(keyless, carried))
    return hits


def _parquet_rewrite(src: Path, tmp: Path, m: _Match) -> tuple[int, int]:
    pf = pq.ParquetFile(src)
    md = pf.metadata
    comp = md.row_group(0).column(0).compression if md.num_row_groups and md.num_columns else "SNAPPY"
    comp = {"UNCOMPRESSED": "none", "LZ4_RAW": "lz4"}.get(comp, comp.lower())
    removed = kept = 0
    with pq.ParquetWriter(tmp, pf.schema_arrow, compression=comp) as w:
        for i in range(pf.num_row_groups):
            rg = pf.read_row_group(i)
            hit = _parquet_hits(rg, m)
            k = int(pc.sum(pc.cast(hit, pa.int64())).as_py() or 0)
            removed += k
            rest = rg.filter(pc.invert(hit)) if k else rg
            kept += rest.num_rows
            if rest.num_rows:
                w.write_table(rest)
    return removed, kept


def _rewrite(ws: "Workspace", f: KeptFile, m: _Match) -> int:
    """Rewrite one kept file without the subjects' rows; returns rows removed (0: file untouched)."""
    src = f.path
    st = src.stat()
    tmp = src.with_name(f".{src.name}.lw-erasure")
    try:
        if f.format == "parquet":
            removed, _kept = _parquet_rewrite(src, tmp, m)
        else:
            with tmp.open("wb") as out:
                removed, _kept = (_csv_drop if f.format == "csv" else _jsonl_drop)(src, out, m)
        if not removed:
            tmp.unlink()
            return 0
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, st.st_mode & 0o7777)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # retention counts age from mtime
        # Recorded before the rename: a crash in between leaves a digest that matches no file.
        _append(ws, {"dataset": f.dataset, "path_digest": f.digest, "path": b"", "format": f.format,
                     "event": "rewritten", "content_digest": content_digest(ws, tmp), "at": _now(ws),
                     "actor": None})
        os.replace(tmp, src)
        return removed
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


def erase_subjects(ws: "Workspace", ctx: "ErasureContext") -> dict[str, int]:
    """Rewrite every kept landing file that still exists without the subjects' rows.

    Returns rows removed per file (``landing:<dataset>:<digest>``). A file that cannot be
    rewritten (unreadable, folder not writable) is reported as ``… (not rewritten: <error>)``
    and left as it is: the scanner then finds the subject in it and the request stops at
    ``verification_failed`` naming the file's label.
    """
    out: dict[str, int] = {}
    matchers: dict[str, _Match] = {}
    for f in kept_files(ws):
        if not f.path.is_file():
            out[f"{f.label} (gone)"] = 0
            continue
        if f.dataset not in ws.policies.datasets:
            continue
        m = matchers.setdefault(f.dataset, _Match(ws, f.dataset, ctx))
        try:
            out[f.label] = _rewrite(ws, f, m)
        except (OSError, pa.ArrowException, ValueError) as exc:
            out[f"{f.label} (not rewritten: {type(exc).__name__})"] = 0
    return out


def residual_rows(ws: "Workspace", ctx: "ErasureContext") -> dict[str, int]:
    """Rows still in kept landing files whose subject key is one of the subjects' ids."""
    out: dict[str, int] = {}
    for f in kept_files(ws):
        if not f.path.is_file() or f.dataset not in ws.policies.datasets:
            continue
        m = _Match(ws, f.dataset, ctx)
        try:
            out[f.label] = _count(f, m)
        except (OSError, pa.ArrowException, ValueError):
            out[f"{f.label} (unreadable)"] = 1
    return out


def _count(f: KeptFile, m: _Match) -> int:
    class _Null:
        def write(self, _b: bytes) -> None:
            pass

    if f.format == "parquet":
        pf = pq.ParquetFile(f.path)
        return sum(int(pc.sum(pc.cast(_parquet_hits(pf.read_row_group(i), m), pa.int64())).as_py() or 0)
                   for i in range(pf.num_row_groups))
    return (_csv_drop if f.format == "csv" else _jsonl_drop)(f.path, _Null(), m)[0]
