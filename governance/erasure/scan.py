"""Verification: read every file the system keeps and look for subjects that must be gone.

The scanner looks for each subject's token and plaintext identifiers (held in memory only)
in every file under the workspace, the storage root, the DVC cache and any local DVC remote,
plus folders the layers name and *labelled* files wherever they lie (kept landing files: a
report names them by their label, ``landing:<dataset>:<digest>``, never by a path that may
carry a person's name; the path itself is searched as well):

* Parquet files (Delta data of every version still on disk, Delta checkpoints): the *values*
  are read — every string and binary leaf, nested ones included — because compressed pages
  hide their bytes; the raw bytes are searched too (footers carry min/max statistics).
* every other file (Delta commit JSON, SQLite online stores with their free pages, model
  artifacts, request logs, lineage and audit files, DVC objects): raw bytes.
* Kafka log segments (a local broker under the workspace, and ``streaming.log_dirs``): record
  batches decoded (``kafka_log``: gzip, snappy, lz4, zstd), every key, value and header
  searched, sealed stream envelopes of live subjects opened; a batch it cannot decode is
  listed (``kafka_undecoded``), and a subject's token there after the shred is unlinkable.
* a storage root on an object store (``s3://bucket/prefix``): every object under the prefix,
  and every older version of it where the bucket keeps versions, is read the same way (each
  downloaded to a private temporary file, scanned, deleted) and named ``s3://bucket/key``
  (``?versionId=...`` for an older version). A store that cannot list versions is said so in
  ``excluded``.
* ciphertexts the system can still open: values sealed for a subject whose key is alive are
  opened with the key ring, and quarantined rows sealed under a dataset's system key are
  opened and searched (a bad row can carry a person's identifiers without a valid key).

Copies the system cannot rewrite — the DVC cache and DVC remotes (``dvc gc`` cannot remove
one record) — are where crypto-shredding does the work: a *token* found there, once the
subject's key and blind index are destroyed, links to nobody and opens nothing; it is
counted as an ``unlinkable_copies`` entry, not a finding. An identifier in plaintext, or a
ciphertext that still opens, is a finding wherever it is.

Excluded, and said so in the report: the key store (it keeps a tombstone of shredded tokens
— random, unlinkable once the key and blind index are gone — by design) and the request's
own sealed probe (destroyed when the request completes).

Findings name the file and *what* matched (``S1:token``, ``S1:email``), never the value.

A scan is part of a request: it refuses to start unless every required handler is there
(:func:`~governance.erasure.handlers.require_handlers`), and reads what each handler names
(``scan_roots``, ``scan_files``) besides the folders above.
"""

from __future__ import annotations

import configparser
import contextvars
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from governance.erasure import kafka_log
from governance.erasure.handlers import ErasureContext, require_handlers
from governance.errors import LakewardenError
from governance.objectstore import is_remote

if TYPE_CHECKING:
    from governance.workspace import Workspace

_CHUNK = 8 << 20
_LABELS: contextvars.ContextVar[Mapping[Path, str]] = contextvars.ContextVar("scan_labels", default={})
# While an object of a remote storage root is scanned: (the local folder standing for the root,
# the temporary file, its label ``s3://bucket/key[?versionId=...]``).
_REMOTE: contextvars.ContextVar[tuple[Path, Path, str] | None] = contextvars.ContextVar("scan_remote", default=None)
_PARQUET_MAGIC = b"PAR1"


@dataclass(frozen=True, slots=True)
class Finding:
    path: str
    what: str  # e.g. "S1:token", "S1:vault.customers.email"
    how: str  # bytes | value | decrypted | system-sealed

    def describe(self) -> str:
        return f"{self.path}: {self.what} ({self.how})"


@dataclass(slots=True)
class ScanReport:
    roots: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    parquet_files: int = 0
    parquet_values: int = 0
    sqlite_files: int = 0
    delta_tables: int = 0
    delta_versions: int = 0
    decrypt_attempts: int = 0
    system_sealed_opened: int = 0
    kafka_segments: int = 0
    kafka_records: int = 0
    kafka_undecoded: list[str] = field(default_factory=list)  # "<segment>: why": batches the scan could not read
    objects: int = 0  # objects read from a remote storage root (every version counted)
    old_versions: int = 0  # of which older (non-current) versions
    excluded: list[str] = field(default_factory=list)
    labelled: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    unlinkable: list[Finding] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "roots": self.roots, "files_scanned": self.files, "bytes_scanned": self.bytes,
            "parquet_files": self.parquet_files, "parquet_values": self.parquet_values,
            "sqlite_files": self.sqlite_files, "delta_tables": self.delta_tables,
            "delta_versions": self.delta_versions, "decrypt_attempts": self.decrypt_attempts,
            "system_sealed_opened": self.system_sealed_opened, "kafka_segments": self.kafka_segments,
            "kafka_records": self.kafka_records, "kafka_undecoded": self.kafka_undecoded,
            "objects": self.objects, "old_versions": self.old_versions, "excluded": self.excluded,
            "labelled_files": self.labelled,
            "findings": len(self.findings), "unlinkable_copies": len(self.unlinkable),
        }


class Needles:
    """Many byte strings searched at once (one regex alternation; RE2 for Arrow values)."""

    def __init__(self, needles: Sequence[tuple[str, bytes]]) -> None:
        self.by_bytes: dict[bytes, str] = {}
        for what, b in needles:
            self.by_bytes.setdefault(b, what)
        alts = sorted(self.by_bytes, key=len, reverse=True)
        self.maxlen = max((len(b) for b in alts), default=0)
        self.rx = re.compile(b"|".join(re.escape(b) for b in alts)) if alts else None
        self.rx2 = "|".join(_re2_escape(b.decode("utf-8", "replace")) for b in alts) if alts else None

    def find(self, data: bytes) -> set[str]:
        if self.rx is None:
            return set()
        return {self.by_bytes[m.group(0)] for m in self.rx.finditer(data)}


def _re2_escape(s: str) -> str:
    return "".join("\\" + c if not c.isalnum() else c for c in s)


def scan(
    ws: "Workspace",
    ctx: ErasureContext,
    *,
    extra_roots: Iterable[Path] = (),
    exclude: Iterable[Path] = (),
    labelled: Mapping[Path, str] | None = None,
) -> ScanReport:
    """Scan everything the system keeps for the subjects of ``ctx``; see the module docstring.

    Every handler's ``scan_roots`` and ``scan_files`` are read besides ``extra_roots`` and
    ``labelled``: files to read wherever they lie (e.g. kept landing files outside the
    workspace), each named in the report by its label instead of its path (a path may carry a
    person's name); the path itself is searched too (a finding ``how="path"``).

    Raises:
        MissingHandlers: a required handler is missing (the scan would miss its stores).
    """
    hs = require_handlers()
    extra_roots = [*extra_roots, *(p for h in hs if h.scan_roots for p in h.scan_roots(ws))]
    labelled = {**{p: lab for h in hs if h.scan_files for p, lab in h.scan_files(ws).items()}, **(labelled or {})}
    labels = {Path(p).resolve(): lab for p, lab in labelled.items()}
    reset = _LABELS.set(labels)
    try:
        return _scan(ws, ctx, extra_roots, exclude, labels)
    finally:
        _LABELS.reset(reset)


def _scan(ws: "Workspace", ctx: ErasureContext, extra_roots: Iterable[Path], exclude: Iterable[Path],
          labels: Mapping[Path, str]) -> ScanReport:
    rep = ScanReport()
    needles = Needles(ctx.needles())
    rep.labelled = sorted(labels.values())
    excluded = {p.resolve() for p in exclude}
    from governance.keys.pgstore import is_dsn, redacted

    if is_dsn(ws.config.keys.store):  # a database server: its files are not ours to read
        rep.excluded = [f"key store {redacted(ws.config.keys.store)} (a PostgreSQL server; a shred is final once its KEK "
                        "generation is retired)", "the request's sealed probe"]
    else:
        ks = ws.config.path(ws.config.keys.store).resolve()
        excluded |= {ks, Path(str(ks) + "-journal"), Path(str(ks) + "-wal")}
        rep.excluded = ["key store (shred tombstones, by design)", "the request's sealed probe"]
    live = [t for t in ctx.tokens if ws.keyring.store.subject_state(t) == "active"]
    immutable = [r.resolve() for r in _dvc_roots(ws)]
    seen: set[Path] = set()
    for p, lab in sorted(labels.items(), key=lambda kv: kv[1]):
        for what in needles.find(os.fsencode(str(p))):
            rep.findings.append(Finding(lab, what, "path"))
    for root in _roots(ws, [*extra_roots, *(p for p in labels if p.exists())]):
        rep.roots.append(_rel(ws, root))
        for path in _walk(root):
            rp = path.resolve()
            if rp in seen or rp in excluded:
                continue
            seen.add(rp)
            before = len(rep.findings)
            _scan_file(ws, rp, needles, live, rep)
            if not live and (any(r == rp or r in rp.parents for r in immutable) or kafka_log.is_segment(rp)):
                keep = [f for f in rep.findings[before:] if not (f.what.endswith(":token") and f.how != "decrypted")]
                rep.unlinkable.extend(f for f in rep.findings[before:] if f not in keep)
                rep.findings[before:] = keep
    storage = ws.config.table_uri("x")[:-2]
    if is_remote(storage):
        _scan_remote(ws, storage, needles, live, rep)
    return rep


def _scan_remote(ws: "Workspace", root_uri: str, needles: Needles, live: list[str], rep: ScanReport) -> None:
    """Every object (every version the bucket keeps) under a remote storage root, each downloaded
    to a private temporary folder at its relative key, scanned like a local file, then deleted."""
    import shutil
    import tempfile
    from urllib.parse import urlparse

    from governance.objectstore import s3_client

    u = urlparse(root_uri)
    bucket, prefix = u.netloc, u.path.strip("/")
    rep.roots.append(root_uri)
    client = s3_client()
    try:
        items = list(_object_versions(client, bucket, prefix))
    except _NoVersions as exc:
        rep.excluded.append(f"older object versions under {root_uri}: not listed ({exc}); current objects read")
        items = [(key, None, True) for key in _current_objects(client, bucket, prefix)]
    mirror = Path(tempfile.mkdtemp(prefix="lakewarden-scan-"))  # 0700: a copy of what the bucket holds
    try:
        for n, (key, version, latest) in enumerate(items):
            rel = key[len(prefix):].lstrip("/") if prefix else key
            base = mirror / str(n)
            local = base / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            extra = {} if version in (None, "null") else {"VersionId": version}
            client.download_file(bucket, key, str(local), ExtraArgs=extra or None)
            label = f"s3://{bucket}/{key}" + ("" if latest or not extra else f"?versionId={version}")
            token = _REMOTE.set((base, local, label))
            try:
                rep.objects += 1
                rep.old_versions += not latest
                _scan_file(ws, local, needles, live, rep)
            finally:
                _REMOTE.reset(token)
                shutil.rmtree(base, ignore_errors=True)
    finally:
        shutil.rmtree(mirror, ignore_errors=True)


class _NoVersions(Exception):
    pass


def _object_versions(client: Any, bucket: str, prefix: str) -> Iterator[tuple[str, str | None, bool]]:
    """(key, version id, is the current version) of every object version under the prefix."""
    import botocore.exceptions

    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
            for v in page.get("Versions", []):
                yield v["Key"], v.get("VersionId"), bool(v.get("IsLatest", True))
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NotImplemented", "MethodNotAllowed", "InvalidRequest", "AccessDenied"):
            raise _NoVersions(code) from None
        raise


def _current_objects(client: Any, bucket: str, prefix: str) -> Iterator[str]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            yield o["Key"]


def _dvc_roots(ws: "Workspace") -> list[Path]:
    dvc = ws.config.base_dir / ".dvc"
    return [dvc / "cache", *_dvc_remotes(dvc)]


def _roots(ws: "Workspace", extra: Iterable[Path]) -> list[Path]:
    cfg = ws.config
    roots = [cfg.workspace_dir]
    storage = cfg.table_uri("x")[:-2]
    if "://" not in storage:
        roots.append(Path(storage))
    roots.extend(_dvc_roots(ws))
    roots.extend(extra)
    out: list[Path] = []
    for r in roots:
        r = r.resolve()
        if r.exists() and not any(r == o or o in r.parents for o in out):
            out = [o for o in out if r not in o.parents]
            out.append(r)
    return out


def _dvc_remotes(dvc: Path) -> list[Path]:
    """Local DVC remotes (``url`` without a scheme) from .dvc/config and .dvc/config.local."""
    out = []
    for name in ("config", "config.local"):
        p = dvc / name
        if not p.exists():
            continue
        cp = configparser.ConfigParser()
        try:
            cp.read(p)
        except configparser.Error:
            continue
        for sec in cp.sections():
            if sec.startswith("remote") and cp.has_option(sec, "url"):
                url = cp.get(sec, "url").strip()
                if "://" not in url:
                    q = Path(url)
                    out.append(q if q.is_absolute() else (dvc / q).resolve())
    return out


def _walk(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            if p.is_file() and not p.is_symlink():
                yield p


def _rel(ws: "Workspace", p: Path) -> str:
    remote = _REMOTE.get()
    if remote is not None and p == remote[1]:
        return remote[2]
    lab = _LABELS.get().get(p)
    if lab is not None:
        return lab
    try:
        return str(p.relative_to(ws.config.base_dir.resolve()))
    except ValueError:
        return str(p)


def _scan_file(ws: "Workspace", path: Path, needles: Needles, live: list[str], rep: ScanReport) -> None:
    rep.files += 1
    size = path.stat().st_size
    rep.bytes += size
    if path.name.endswith(".json") and path.parent.name == "_delta_log":
        rep.delta_versions += 1
    if path.name == "00000000000000000000.json":
        rep.delta_tables += 1
    head = b""
    with path.open("rb") as fh:
        head = fh.read(16)
    if head.startswith(b"SQLite format 3"):
        rep.sqlite_files += 1
    for what in _bytes_hits(path, needles):
        rep.findings.append(Finding(_rel(ws, path), what, "bytes"))
    if head.startswith(_PARQUET_MAGIC):
        _scan_parquet(ws, path, needles, live, rep)
    elif kafka_log.is_segment(path):
        _scan_kafka(ws, path, needles, live, rep)


def _scan_kafka(ws: "Workspace", path: Path, needles: Needles, live: list[str], rep: ScanReport) -> None:
    """A broker's log segment, record by record, decompressed: keys, values and headers are
    searched; a record sealed for a subject whose key is alive is opened and searched too."""
    stats = kafka_log.SegmentStats()
    hits: set[str] = set()
    opened: set[str] = set()
    live_set = set(live)
    datasets = list(ws.policies.datasets)
    for _offset, parts in kafka_log.records(path, stats):
        for part in parts:
            hits |= needles.find(part)
        value = parts[1] if len(parts) > 1 else (parts[0] if parts else b"")
        if live_set and value.startswith(b'{"lakewarden"'):
            opened |= _open_envelope(ws, value, live_set, datasets, needles, rep)
    rep.kafka_segments += 1
    rep.kafka_records += stats.records
    if stats.undecoded:
        rep.kafka_undecoded.append(f"{_rel(ws, path)}: {stats.undecoded} batch(es) not read ({stats.why})")
    for what in hits:
        rep.findings.append(Finding(_rel(ws, path), what, "kafka-record"))
    for what in opened:
        rep.findings.append(Finding(_rel(ws, path), what, "decrypted"))


def _open_envelope(ws: "Workspace", value: bytes, live: set[str], datasets: list[str], needles: Needles,
                   rep: ScanReport) -> set[str]:
    import base64
    import json

    try:
        env = json.loads(value)
        tok, blob = env["subject"], base64.b64decode(env["record"])
    except Exception:  # noqa: BLE001 - not an envelope after all: its bytes were searched
        return set()
    if tok not in live:
        return set()
    for ds in datasets:
        rep.decrypt_attempts += 1
        try:
            plain = ws.keyring.open(blob, token=tok, dataset=f"stream.{ds}", column="record")
        except LakewardenError:
            continue
        return {f"{_label(needles, tok)}:stream.{ds}", *needles.find(plain)}
    return set()


def _bytes_hits(path: Path, needles: Needles) -> set[str]:
    hits: set[str] = set()
    if needles.rx is None:
        return hits
    keep = max(needles.maxlen - 1, 0)
    tail = b""
    with path.open("rb") as fh:
        while True:
            chunk = fh.read(_CHUNK)
            if not chunk:
                break
            data = tail + chunk
            hits |= needles.find(data)
            tail = data[-keep:] if keep else b""
    return hits


def _leaves(arr: pa.ChunkedArray | pa.Array, name: str) -> Iterator[tuple[str, pa.Array]]:
    """String and binary leaves of a column, nested lists/structs/maps flattened."""
    if isinstance(arr, pa.ChunkedArray):
        for chunk in arr.chunks:
            yield from _leaves(chunk, name)
        return
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        yield name, arr
    elif pa.types.is_map(t):  # Delta checkpoints: partitionValues, tags, configuration
        yield from _leaves(arr.keys, f"{name}.key")
        yield from _leaves(arr.items, f"{name}.value")
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        yield from _leaves(arr.flatten(), name)
    elif pa.types.is_struct(t):
        for i in range(t.num_fields):
            yield from _leaves(arr.field(i), f"{name}.{t.field(i).name}")


def _scan_parquet(ws: "Workspace", path: Path, needles: Needles, live: list[str], rep: ScanReport) -> None:
    try:
        tbl = pq.read_table(path)
    except Exception:  # noqa: BLE001 - a file that only looks like Parquet: its bytes were scanned
        return
    rep.parquet_files += 1
    hits: set[str] = set()
    for col in tbl.column_names:
        for _leaf, arr in _leaves(tbl[col], col):
            rep.parquet_values += len(arr) - arr.null_count
            if needles.rx2 is None or len(arr) == arr.null_count:
                continue
            if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
                continue  # ciphertexts: handled below; raw bytes were searched already
            m = pc.match_substring_regex(arr, needles.rx2)
            if pc.any(m).as_py():
                for v in arr.filter(m).to_pylist()[:100]:
                    hits |= needles.find(v.encode("utf-8"))
    for what in hits:
        rep.findings.append(Finding(_rel(ws, path), what, "value"))
    _decrypt_checks(ws, path, tbl, needles, live, rep)


def _table_of(ws: "Workspace", path: Path) -> tuple[str, str] | None:
    """``(layer, dataset)`` when ``path`` lies in a governed table ``<root>/<layer>/<dataset>/``."""
    remote = _REMOTE.get()
    root = remote[0] if remote is not None else Path(ws.config.table_uri("x")[:-2]).resolve()
    try:
        parts = path.relative_to(root).parts
    except ValueError:
        return None
    if len(parts) >= 3 and parts[0] in ("bronze", "silver", "quarantine", "vault", "restricted"):
        return parts[0], parts[1]
    return None


def _decrypt_checks(ws: "Workspace", path: Path, tbl: pa.Table, needles: Needles, live: list[str],
                    rep: ScanReport) -> None:
    where = _table_of(ws, path)
    if where is None:
        return
    layer, ds = where
    ring = ws.keyring
    pol = ws.policies.datasets.get(ds)
    if layer == "quarantine" and "payload" in tbl.column_names and "subject_token" in tbl.column_names:
        toks = tbl["subject_token"].to_pylist()
        blobs = tbl["payload"].to_pylist()
        for t, b in zip(toks, blobs):
            if b is None:
                continue
            try:
                if t is None:
                    plain = ring.open_system(f"quarantine:{ds}", b, dataset=f"quarantine.{ds}", column="row")
                    rep.system_sealed_opened += 1
                elif t in live:
                    rep.decrypt_attempts += 1
                    plain = ring.open(b, token=t, dataset=f"quarantine.{ds}", column="row")
                else:
                    continue
            except LakewardenError:
                continue
            for what in needles.find(plain):
                rep.findings.append(Finding(_rel(ws, path), what, "decrypted"))
        return
    if not live or pol is None or pol.subject_key not in tbl.column_names:
        return
    keys = tbl[pol.subject_key].to_pylist()
    live_set = set(live)
    for col in tbl.column_names:
        if not pa.types.is_binary(tbl.schema.field(col).type):
            continue
        for t, b in zip(keys, tbl[col].to_pylist()):
            if b is None or t not in live_set:
                continue
            rep.decrypt_attempts += 1
            try:
                ring.open(b, token=t, dataset=ds, column=col)
            except LakewardenError:
                continue
            rep.findings.append(Finding(_rel(ws, path), f"{_label(needles, t)}:{col}", "decrypted"))


def _label(needles: Needles, token: str) -> str:
    return needles.by_bytes.get(token.encode(), "subject:token").split(":")[0]


__all__ = ["Finding", "Needles", "ScanReport", "scan"]
