"""Secrets stay secret (issue #19): a scan for the session's secrets where they must never be.

Every secret the test session sees (passwords, tokens, KEKs, shared secrets) is registered here
with what it is — by the server fixtures and by wrappers around the library points every secret
passes through (:func:`watch_sources`). The scans then look for them:

* :func:`scan_files`: every file under a folder, looking *inside* Parquet (each string and binary
  column decoded: Delta tables are zstd-compressed, a byte scan sees nothing), gzip, zstd, zip and
  SQLite files, and at the raw bytes of every file (Delta ``_delta_log`` JSON, logs, manifests).
  Places meant to hold secrets are left out by an explicit allow-list (:data:`ALLOWED`), each with
  its reason; files over a size bound are skipped and counted.
* :func:`scan_processes`: every process's arguments (``/proc/*/cmdline``). The environment is the
  intended channel for a server's secrets and is not scanned.

A finding names the place and *what* was found (``"Keycloak password of carla"``) and a short
hash of the value, never the value itself::

    reg = Registry()
    reg.register(realm.passwords["carla"], "Keycloak password of carla")
    report = scan_files(tmp, reg)
    assert not report.findings, report.format()

Byte secrets (a KEK) are also looked for as base64 (standard and urlsafe, with and without
padding) and hex. Values shorter than :data:`MIN_LENGTH` bytes, made of fewer than
:data:`MIN_DISTINCT` distinct bytes, or counting up or down in steady steps (``bytes(range(32))``,
a test's fixed KEK) are ignored: they match by chance (Parquet's bit-packed runs hold such
sequences). So are values committed to the repository (the tests' fixed tokens, the crypto test
vectors' KEKs): a value in git is public, not a secret the run made.

Matching is many needles at once: every 8-byte window of every needle is indexed, and the data is
probed every ``min(len) - 7`` bytes (any occurrence covers such a probe), only inside runs of
token characters for needles made of them — so a large binary file costs little.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import gzip
import hashlib
import io
import os
import re
import sqlite3
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIN_LENGTH = 12
MIN_DISTINCT = 6  # "AAAA…" or "0000…" is a placeholder, not a secret, and matches by chance
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_DECODED_BYTES = 256 * 1024 * 1024
_W = 8  # window length of the index
_TOKEN_CHARS = rb"A-Za-z0-9+/=_\-.~"
_RUN = re.compile(rb"[" + _TOKEN_CHARS + rb"]{%d,}" % MIN_LENGTH)
_TOKEN_BYTE = re.compile(rb"[" + _TOKEN_CHARS + rb"]+\Z")
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{%d,}" % MIN_LENGTH)
_PRINTABLE = re.compile(rb"[\x20-\x7e]+\Z")


def fingerprint(value: bytes) -> str:
    """A short, non-reversible name for a value (first 10 hex digits of its SHA-256)."""
    return hashlib.sha256(value).hexdigest()[:10]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Secret:
    what: str
    fingerprint: str


def _steady(raw: bytes) -> bool:
    """Whether ``raw`` counts up or down by one fixed step (mod 256): a pattern, not a random key."""
    return len({(b - a) % 256 for a, b in zip(raw, raw[1:])}) == 1


@functools.lru_cache(maxsize=1)
def _committed() -> bytes:
    """Every file git tracks in this repository, joined: what is public by being committed."""
    import subprocess

    top = Path(__file__).resolve().parents[1]
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=top, capture_output=True, check=True,
                               timeout=30).stdout.split(b"\0")
    except (OSError, subprocess.SubprocessError):
        return b""
    parts = []
    for n in filter(None, names):
        try:
            parts.append((top / os.fsdecode(n)).read_bytes())
        except OSError:
            continue
    return b"\0".join(parts)


def _public(raw: bytes) -> bool:
    """Whether ``raw`` (or, for bytes that are not text, its hex or base64) is committed to git."""
    blob = _committed()
    if raw in blob:
        return True
    if _TOKEN_BYTE.match(raw):
        return False
    return any(enc in blob for enc in (raw.hex().encode(), base64.b64encode(raw).rstrip(b"="),
                                       base64.urlsafe_b64encode(raw).rstrip(b"=")))


class Registry:
    """Secret values and what each is. Thread-safe; the first description of a value wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[bytes, Secret] = {}
        self._matcher: _Matcher | None = None
        self.allowed_paths: dict[str, str] = {}  # resolved path → why it may hold a secret

    def allow(self, path: str | os.PathLike[str], reason: str) -> None:
        """Leave the file ``path`` out of file scans: it is meant to hold a secret (a KEK file)."""
        with self._lock:
            self.allowed_paths[os.path.realpath(path)] = reason

    def register(self, value: str | bytes | bytearray | None, what: str) -> bool:
        """Remember ``value`` as a secret described by ``what``; ``True`` when it was taken (values
        shorter than :data:`MIN_LENGTH` bytes or of fewer than :data:`MIN_DISTINCT` distinct bytes,
        steady sequences, values committed to git, and ``None``, are not)."""
        if value is None:
            return False
        raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if len(raw) < MIN_LENGTH or len(set(raw)) < MIN_DISTINCT or _steady(raw) or _public(raw):
            return False
        with self._lock:
            if raw in self._values:
                return False
            self._values[raw] = Secret(what, fingerprint(raw))
            self._matcher = None
        return True

    def __len__(self) -> int:
        return len(self._values)

    def needles(self) -> dict[bytes, tuple[Secret, str]]:
        """Every byte string to look for → (the secret, how it is encoded)."""
        out: dict[bytes, tuple[Secret, str]] = {}
        with self._lock:
            items = list(self._values.items())
        for raw, s in items:
            out.setdefault(raw, (s, "plain"))
            if _TOKEN_BYTE.match(raw):
                continue  # a text secret: its own bytes are what a leak would show
            for enc, how in ((base64.b64encode(raw), "base64"), (base64.urlsafe_b64encode(raw), "base64url"),
                             (raw.hex().encode(), "hex"), (raw.hex().upper().encode(), "hex")):
                out.setdefault(enc, (s, how))
                stripped = enc.rstrip(b"=")
                if len(stripped) >= MIN_LENGTH:
                    out.setdefault(stripped, (s, how))
        return out

    def matcher(self) -> "_Matcher":
        m = self._matcher
        if m is None:
            m = self._matcher = _Matcher(self.needles())
        return m


REGISTRY = Registry()


def register(value: str | bytes | bytearray | None, what: str) -> bool:
    """Register ``value`` in the session's :data:`REGISTRY` (see :meth:`Registry.register`)."""
    return REGISTRY.register(value, what)


class _Index:
    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        self.step = max(1, min((len(n) for n in needles), default=_W) - _W + 1)
        self.windows: dict[bytes, list[tuple[int, int]]] = {}
        for i, n in enumerate(needles):
            for j in range(len(n) - _W + 1):
                self.windows.setdefault(n[j:j + _W], []).append((i, j))

    def _keys(self) -> Any:
        import numpy as np

        keys = getattr(self, "_sorted", None)
        if keys is None:
            keys = self._sorted = np.unique(np.frombuffer(b"".join(self.windows), dtype="<u8"))
        return keys

    def probe_all(self, data: bytes, found: set[bytes]) -> None:
        """:meth:`probe` over all of ``data``, the window look-ups vectorized (binary files)."""
        import numpy as np
        from numpy.lib.stride_tricks import as_strided

        n = (len(data) - _W) // self.step + 1
        if n <= 0:
            return
        keys = self._keys()
        arr = np.frombuffer(data, dtype=np.uint8)
        for lo in range(0, n, 1 << 20):
            hi = min(n, lo + (1 << 20))
            win = as_strided(arr[lo * self.step:], shape=(hi - lo, _W), strides=(self.step, 1))
            vals = np.ascontiguousarray(win).view("<u8").ravel()
            idx = np.minimum(np.searchsorted(keys, vals), len(keys) - 1)
            for k in np.nonzero(keys[idx] == vals)[0]:
                p = (lo + int(k)) * self.step
                self.probe(data, p, min(len(data), p + self.step + max(map(len, self.needles))), found, anchor=p)

    def probe(self, data: bytes, start: int, end: int, found: set[bytes], *, anchor: int | None = None) -> None:
        get, needles, w = self.windows.get, self.needles, _W
        lo = 0 if anchor is not None else start
        for p in ((anchor,) if anchor is not None else range(start, end - w + 1, self.step)):
            hits = get(data[p:p + w])
            if hits:
                for i, j in hits:
                    q = p - j
                    n = needles[i]
                    if q >= lo and data[q:q + len(n)] == n:
                        found.add(n)


_TABLES: dict[Any, Any] = {}


def _runs(data: bytes, run: re.Pattern[bytes]) -> Iterator[tuple[int, int]]:
    """(start, end) of every run of ``run``'s characters at least :data:`MIN_LENGTH` long.

    A regex crawls through a large binary file, so there numpy finds the aligned blocks of
    ``MIN_LENGTH // 2`` bytes made only of run characters first (any run that long holds one), and
    the regex reads only around them."""
    if len(data) < 1 << 16:
        for m in run.finditer(data):
            yield m.start(), m.end()
        return
    import numpy as np

    table = _TABLES.get(run)
    if table is None:
        table = _TABLES[run] = np.array([bool(run.fullmatch(bytes([b]) * MIN_LENGTH)) for b in range(256)])
    b = MIN_LENGTH // 2
    n = len(data) // b
    full = table[np.frombuffer(data, dtype=np.uint8, count=n * b)].reshape(n, b).all(axis=1)
    idx = np.nonzero(full)[0]
    if not len(idx):
        return
    cuts = np.nonzero(np.diff(idx) > 1)[0]
    firsts, lasts = idx[np.r_[0, cuts + 1]], idx[np.r_[cuts, len(idx) - 1]]
    for first, last in zip(firsts.tolist(), lasts.tolist()):
        lo, hi = max(0, (first - 1) * b), min(len(data), (last + 2) * b)
        for m in run.finditer(data, lo, hi):
            yield m.start(), m.end()


class _Matcher:
    """All needles at once: token-character needles (passwords, tokens, encoded keys) probed inside
    runs of token characters, other printable ones inside printable runs, raw bytes everywhere."""

    def __init__(self, needles: dict[bytes, tuple[Secret, str]]) -> None:
        self.meta = needles
        text = [n for n in needles if _TOKEN_BYTE.match(n)]
        printable = [n for n in needles if not _TOKEN_BYTE.match(n) and _PRINTABLE.match(n)]
        binary = [n for n in needles if not _PRINTABLE.match(n)]
        self.runs = [(_RUN, _Index(text)) if text else None, (_PRINTABLE_RUN, _Index(printable)) if printable else None]
        self.binary = _Index(binary) if binary else None

    def search(self, data: bytes | memoryview) -> set[bytes]:
        data = bytes(data)
        found: set[bytes] = set()
        for pair in self.runs:
            if pair is not None:
                run, index = pair
                for start, end in _runs(data, run):
                    index.probe(data, start, end, found)
        if self.binary is not None:
            self.binary.probe_all(data, found)
        return found


# --------------------------------------------------------------------------- findings and report


@dataclass(frozen=True)
class Finding:
    """A secret where it must not be: ``where`` (a path or a process), ``how`` (the layer it was
    read through: raw bytes, a Parquet column, a SQLite table…), ``what`` and its fingerprint."""

    where: str
    how: str
    what: str
    fingerprint: str
    encoding: str = "plain"

    def line(self) -> str:
        enc = "" if self.encoding == "plain" else f", as {self.encoding}"
        return f"{self.where} [{self.how}]: {self.what} (sha256 {self.fingerprint}…{enc})"


@dataclass
class ScanReport:
    """What a scan looked at and what it found."""

    root: str = ""
    findings: list[Finding] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    too_large: list[tuple[str, int]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    allowed: dict[str, int] = field(default_factory=dict)  # reason → files left out
    secrets: int = 0
    seconds: float = 0.0

    def merge(self, other: "ScanReport") -> None:
        self.findings += other.findings
        self.files += other.files
        self.bytes += other.bytes
        self.too_large += other.too_large
        self.unreadable += other.unreadable
        for k, v in other.allowed.items():
            self.allowed[k] = self.allowed.get(k, 0) + v
        self.seconds += other.seconds
        self.secrets = max(self.secrets, other.secrets)

    def format(self) -> str:
        head = (f"secrets scan of {self.root or '(processes)'}: {self.secrets} secret(s) looked for in "
                f"{self.files} file(s), {self.bytes / 1e6:.1f} MB, {self.seconds:.2f} s; "
                f"{len(self.findings)} finding(s)")
        lines = [head]
        lines += [f"  LEAK {f.line()}" for f in self.findings]
        for reason, n in sorted(self.allowed.items()):
            lines.append(f"  allowed ({n} file(s)): {reason}")
        if self.too_large:
            lines.append(f"  skipped {len(self.too_large)} file(s) over {MAX_FILE_BYTES // 2**20} MB: "
                         + ", ".join(f"{p} ({n / 1e6:.0f} MB)" for p, n in self.too_large[:10]))
        if self.unreadable:
            lines.append(f"  unreadable {len(self.unreadable)} file(s): "
                         + ", ".join(f"{p} ({why})" for p, why in self.unreadable[:10]))
        return "\n".join(lines)


# --------------------------------------------------------------------------- allow-list


@dataclass(frozen=True)
class Allowed:
    """A place meant to hold secrets, left out of the file scan, and why.

    ``pattern``: a glob on the path relative to the scanned folder (``*`` crosses ``/``);
    ``folder_marker``: a folder holding a file of this name is left out whole;
    ``head``: and (with ``pattern``) the file's first 4 KiB hold these bytes.
    """

    reason: str
    pattern: str | None = None
    folder_marker: str | None = None
    head: bytes | None = None


PLANTED_MARKER = ".secrets-scan-planted"

ALLOWED: tuple[Allowed, ...] = (
    Allowed("known answers planted by tests/test_secrets_scan.py (the scanner's own test data)",
            folder_marker=PLANTED_MARKER),
    Allowed("token cache of `lakewarden login` (0600, in a 0700 folder: where the tokens are meant to be)",
            pattern="*.cache/lakewarden/tokens/*"),
    Allowed("KEK file (0600, secrets/: the key itself, the file provider's whole point)", pattern="*secrets/*.key"),
    Allowed("KEK file (0600, secrets/: the key itself, the file provider's whole point)", pattern="*secrets/*.kek"),
    Allowed("KEK file (0600, secrets/: the key itself, the file provider's whole point)", pattern="*kek.key"),
    Allowed("private key PEM written by governance.tls.write_private (0600)", pattern="*.pem",
            head=b"PRIVATE KEY-----"),
    Allowed("PostgreSQL data folder (binary heap; the key store holds wrapped keys only, the role a SCRAM hash)",
            folder_marker="PG_VERSION"),
    Allowed("Keycloak's own database (hashed passwords, the realms' signing keys)", folder_marker="keycloakdb.mv.db"),
)


def _allowed_file(rel: str, path: Path, rules: Iterable[Allowed]) -> Allowed | None:
    for r in rules:
        if r.pattern is None or not fnmatch.fnmatchcase(rel, r.pattern):
            continue
        if r.head is not None:
            try:
                with open(path, "rb") as f:
                    if r.head not in f.read(4096):
                        continue
            except OSError:
                continue
        return r
    return None


def harvest(root: Path | str, registry: Registry = REGISTRY) -> int:
    """Register the secrets held by allowed files under ``root`` that other processes made (a
    ``lakewarden login`` subprocess's tokens, a KEK file a CLI generated): they are left out of the
    scan, but must appear nowhere else. Returns how many new values were taken."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        if PLANTED_MARKER in filenames:
            dirnames[:] = []
            continue
        for name in filenames:
            path = Path(dirpath) / name
            try:
                n += _harvest_file(path, path.relative_to(root).as_posix(), registry)
            except (OSError, ValueError, UnicodeDecodeError, AttributeError, TypeError):
                continue
    return n


def _harvest_file(path: Path, rel: str, registry: Registry) -> int:
    import json

    if path.is_symlink() or not path.is_file():
        return 0
    n = 0
    if fnmatch.fnmatchcase(rel, "*.cache/lakewarden/tokens/*.json"):
        d = json.loads(path.read_text())
        for k in ("access_token", "refresh_token", "id_token"):
            n += registry.register(d.get(k), f"{k.replace('_', ' ')} cached by lakewarden login")
    elif any(fnmatch.fnmatchcase(rel, p) for p in ("*secrets/*.key", "*secrets/*.kek", "*kek.key")):
        text = path.read_text(encoding="ascii").strip()
        n += registry.register(text, f"KEK (base64, from a KEK file {path.name})")
        s = text.replace("-", "+").replace("_", "/")
        n += registry.register(base64.b64decode(s + "=" * (-len(s) % 4)), f"KEK (from a KEK file {path.name})")
    return n


# --------------------------------------------------------------------------- reading inside files


def _arrow_buffers(arr: Any) -> Iterator[bytes]:
    """The bytes of every string/binary value of an Arrow array (nested types walked)."""
    import pyarrow as pa
    import pyarrow.types as t

    ty = arr.type
    if t.is_dictionary(ty):
        yield from _arrow_buffers(arr.dictionary)
    elif t.is_string(ty) or t.is_binary(ty) or t.is_large_string(ty) or t.is_large_binary(ty):
        buf = arr.buffers()[2]
        if buf is not None:
            yield buf.to_pybytes()
    elif t.is_fixed_size_binary(ty):
        buf = arr.buffers()[1]
        if buf is not None:
            yield buf.to_pybytes()
    elif getattr(t, "is_string_view", lambda _: False)(ty) or getattr(t, "is_binary_view", lambda _: False)(ty):
        yield from _arrow_buffers(arr.cast(pa.large_binary()))
    elif t.is_struct(ty):
        for i in range(ty.num_fields):
            yield from _arrow_buffers(arr.field(i))
    elif t.is_map(ty):
        yield from _arrow_buffers(arr.keys)
        yield from _arrow_buffers(arr.items)
    elif (t.is_list(ty) or t.is_large_list(ty) or t.is_fixed_size_list(ty)
          or getattr(t, "is_list_view", lambda _: False)(ty)):
        yield from _arrow_buffers(arr.values)


def _parquet_layers(path: Path) -> Iterator[tuple[str, bytes]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    meta = pf.schema_arrow.metadata or {}
    if meta:
        yield "parquet metadata", b"\n".join(k + b"=" + v for k, v in meta.items())
    names = pf.schema_arrow.names
    for rg in range(pf.num_row_groups):
        table = pf.read_row_group(rg)
        for name, col in zip(names, table.columns, strict=True):
            for chunk in col.chunks:
                for buf in _arrow_buffers(chunk):
                    yield f"parquet column {name}", buf


def _bounded(stream: io.RawIOBase | Any) -> bytes:
    out = stream.read(MAX_DECODED_BYTES + 1)
    return out[:MAX_DECODED_BYTES]


def _sqlite_layers(path: Path) -> Iterator[tuple[str, bytes]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for tname in tables:
            parts: list[bytes] = []
            for row in conn.execute(f'SELECT * FROM "{tname.replace(chr(34), chr(34) * 2)}"'):
                for v in row:
                    if isinstance(v, str):
                        parts.append(v.encode("utf-8", "replace"))
                    elif isinstance(v, bytes):
                        parts.append(v)
            if parts:
                yield f"sqlite table {tname}", b"\n".join(parts)
    finally:
        conn.close()


def _layers(path: Path, head: bytes) -> Iterator[tuple[str, bytes]]:
    """(how, bytes) for every readable layer of the file beyond its raw bytes."""
    if head[:4] == b"PAR1":
        yield from _parquet_layers(path)
    elif head[:2] == b"\x1f\x8b":
        with gzip.open(path, "rb") as f:
            yield "gzip", _bounded(f)
    elif head[:4] == b"\x28\xb5\x2f\xfd":
        import zstandard

        with open(path, "rb") as raw, zstandard.ZstdDecompressor().stream_reader(raw) as f:
            yield "zstd", _bounded(f)
    elif head[:16] == b"SQLite format 3\x00":
        yield from _sqlite_layers(path)
    elif head[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as z:
            total = 0
            for info in z.infolist():
                if info.is_dir() or total + info.file_size > MAX_DECODED_BYTES:
                    continue
                total += info.file_size
                yield f"zip member {info.filename}", z.read(info)


# --------------------------------------------------------------------------- scans


def _record(report: ScanReport, matcher: _Matcher, data: bytes, where: str, how: str, seen: set) -> None:
    for needle in matcher.search(data):
        secret, enc = matcher.meta[needle]
        key = (where, how, secret.fingerprint)
        if key not in seen:
            seen.add(key)
            report.findings.append(Finding(where, how, secret.what, secret.fingerprint, enc))


def scan_files(root: Path | str, secrets: Registry = REGISTRY, *, exclude: Iterable[Allowed] = ALLOWED,
               max_bytes: int = MAX_FILE_BYTES, skip: Iterable[Path] = ()) -> ScanReport:
    """Look for every secret of ``secrets`` in every file under ``root`` (symbolic links not
    followed), inside the formats :func:`_layers` reads too. ``exclude``: the allow-list;
    ``skip``: folders not to enter at all (already scanned, say). Paths in the report are relative
    to ``root``."""
    t0 = time.monotonic()
    root = Path(root)
    report = ScanReport(root=str(root), secrets=len(secrets))
    rules = tuple(exclude)
    matcher = secrets.matcher()
    markers = {r.folder_marker: r for r in rules if r.folder_marker}
    skipped = {Path(p).resolve() for p in skip}
    seen: set = set()
    if not root.is_dir() or len(secrets) == 0:
        report.seconds = time.monotonic() - t0
        return report
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        rule = next((markers[m] for m in markers if m in filenames), None)
        if rule is not None or here.resolve() in skipped:
            if rule is not None:
                n = sum(len(f) for _, _, f in os.walk(here))
                report.allowed[rule.reason] = report.allowed.get(rule.reason, 0) + n
            dirnames[:] = []
            continue
        for name in filenames:
            path = here / name
            rel = path.relative_to(root).as_posix()
            try:
                st = path.lstat()
            except OSError as exc:
                report.unreadable.append((rel, exc.strerror or type(exc).__name__))
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            allowed = _allowed_file(rel, path, rules)
            if allowed is None and secrets.allowed_paths:
                why = secrets.allowed_paths.get(os.path.realpath(path))
                allowed = Allowed(why) if why else None
            if allowed is not None:
                report.allowed[allowed.reason] = report.allowed.get(allowed.reason, 0) + 1
                continue
            if st.st_size > max_bytes:
                report.too_large.append((rel, st.st_size))
                continue
            try:
                data = path.read_bytes()
            except OSError as exc:
                report.unreadable.append((rel, exc.strerror or type(exc).__name__))
                continue
            report.files += 1
            report.bytes += len(data)
            _record(report, matcher, data, rel, "raw bytes", seen)
            try:
                for how, layer in _layers(path, data[:16]):
                    report.bytes += len(layer)
                    _record(report, matcher, layer, rel, how, seen)
            except Exception as exc:  # noqa: BLE001 - half-written or another format: its raw bytes were scanned
                report.unreadable.append((rel, f"{type(exc).__name__} reading inside"))
    report.seconds = time.monotonic() - t0
    return report


def scan_processes(secrets: Registry = REGISTRY, *, proc: Path = Path("/proc")) -> list[Finding]:
    """Look for every secret in every process's arguments (``/proc/<pid>/cmdline``); a finding
    names the pid and the program, never the arguments."""
    matcher = secrets.matcher()
    out: list[Finding] = []
    seen: set = set()
    if len(secrets) == 0:
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
        except OSError:
            continue
        if not cmd:
            continue
        prog = os.path.basename(cmd.split(b"\0", 1)[0].decode("utf-8", "replace"))[:60]
        for needle in matcher.search(cmd):
            secret, enc = matcher.meta[needle]
            key = (d.name, secret.fingerprint)
            if key not in seen:
                seen.add(key)
                out.append(Finding(f"pid {d.name} ({prog})", "process arguments", secret.what, secret.fingerprint, enc))
    return out


# --------------------------------------------------------------------------- where secrets come from


def _describe_claims(claims: Any) -> str:
    if isinstance(claims, dict):
        who = claims.get("preferred_username") or claims.get("sub") or "?"
        return f"access token of {who}"
    return "access token"


class _Wrapped:
    """The originals that :func:`watch_sources` replaced, to put back."""

    def __init__(self) -> None:
        self.undo: list[Callable[[], None]] = []

    def restore(self) -> None:
        while self.undo:
            self.undo.pop()()


def _after(f: Callable, observe: Callable[..., None]) -> Callable:
    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = f(*args, **kwargs)
        try:
            observe(result, *args, **kwargs)
        except Exception:  # noqa: BLE001 - watching must never change what the product does
            pass
        return result

    wrapper.__secrets_scan_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


_PACKAGES = ("governance", "lakehouse", "serving", "training", "features", "pipeline", "lakewarden", "test_",
             "conftest", "cli_helpers")


def _patch_method(done: _Wrapped, cls: type, name: str, observe: Callable[..., None]) -> None:
    raw = cls.__dict__[name]
    if isinstance(raw, classmethod):
        new: Any = classmethod(_after(raw.__func__, observe))
    else:
        new = _after(raw, observe)
    setattr(cls, name, new)
    done.undo.append(lambda: setattr(cls, name, raw))


def _patch_function(done: _Wrapped, module: Any, name: str, observe: Callable[..., None]) -> None:
    """Replace ``module.name`` and every binding of the same function in already-imported project
    and test modules (``from x import f`` copies)."""
    original = getattr(module, name)
    new = _after(original, observe)
    for mod in list(sys.modules.values()):
        mname = getattr(mod, "__name__", "") or ""
        if mod is not module and not mname.startswith(_PACKAGES):
            continue
        d = getattr(mod, "__dict__", None)
        if not isinstance(d, dict):
            continue
        for k, v in list(d.items()):
            if v is original:
                setattr(mod, k, new)
                done.undo.append(functools.partial(setattr, mod, k, original))


def watch_sources(registry: Registry = REGISTRY) -> Callable[[], None]:
    """Wrap the library points every secret of the session passes through, so that each value is
    registered as it is made or seen; returns the function that puts the originals back.

    Secrets made inside subprocesses (the CLI's) do not pass here: :func:`harvest` takes those the
    allowed files hold."""
    from governance import authn, idp, objectstore, tokens
    from governance.keys import kek, pgserver
    from lakehouse import trino, trino_cluster

    reg = registry.register
    done = _Wrapped()

    _patch_method(done, authn.TokenVerifier, "verify",
                  lambda claims, self, token, *a, **k: reg(token, _describe_claims(claims) + " (verified)"))
    _patch_method(done, authn.Authenticator, "actor",
                  lambda actor, self, token, *a, **k: reg(token, f"access token of {getattr(actor, 'name', '?')}"))

    def token_set(ts: Any, *a: Any, **k: Any) -> None:
        reg(ts.access_token, f"access token (client {ts.client_id})")
        reg(ts.refresh_token, f"refresh token (client {ts.client_id})")

    _patch_method(done, tokens.TokenSet, "from_response", token_set)
    _patch_method(done, idp.Realm, "password_token",
                  lambda tok, self, user, *a, **k: reg(tok, f"access token of {user} (realm {self.name})"))

    def realm(_: Any, self: Any, *a: Any, **k: Any) -> None:
        for user, pw in dict(self.passwords).items():
            reg(pw, f"Keycloak password of {user} (realm {self.name})")

    _patch_method(done, idp.Realm, "__init__", realm)
    _patch_method(done, idp.LocalKeycloak, "__init__",
                  lambda _, self, *a, **k: reg(self._admin_password, "Keycloak bootstrap admin password"))
    _patch_method(done, pgserver.LocalPostgres, "__init__",
                  lambda _, self, *a, **k: reg(self.password, "PostgreSQL password"))
    _patch_method(done, objectstore.LocalObjectStore, "__init__",
                  lambda _, self, *a, **k: reg(self.secret_key, "S3 secret key of the local object store"))

    kek_file = "KEK file (the file provider's key: read or written by governance.keys.kek)"

    def local_kek(_: Any, self: Any, key: bytes, *a: Any, **k: Any) -> None:
        reg(bytes(key), f"KEK {self.key_id} ({self.source.split(':', 1)[0]})")
        if self.source.startswith("file:"):  # kek_from_file and generate_kek_file name their file
            registry.allow(self.source[len("file:"):], kek_file)

    _patch_method(done, kek.LocalKek, "__init__", local_kek)
    _patch_function(done, kek, "generate_kek_b64", lambda text, *a, **k: reg(text, "KEK (base64, generated)"))

    def trino_cluster_init(_: Any, self: Any, *a: Any, **k: Any) -> None:
        for user, pw in dict(self._passwords).items():
            reg(pw, f"Trino password of {user}")
        reg(self._secret, "Trino internal shared secret")

    _patch_method(done, trino_cluster.TrinoCluster, "__init__", trino_cluster_init)
    _patch_function(done, trino, "password_hash",
                    lambda _, password, *a, **k: reg(password, "Trino password (hashed by password_hash)"))
    try:
        from governance import cluster
    except ImportError:  # pragma: no cover - part of the package
        pass
    else:
        _patch_method(done, cluster.LocalRayCluster, "__init__",
                      lambda _, self, *a, **k: reg(self.token, "Ray cluster auth token"))
    return done.restore


__all__ = ["ALLOWED", "MAX_FILE_BYTES", "MIN_LENGTH", "PLANTED_MARKER", "REGISTRY", "Allowed", "Finding", "Registry",
           "ScanReport",
           "fingerprint", "harvest", "register", "scan_files", "scan_processes", "watch_sources"]
