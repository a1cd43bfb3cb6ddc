"""The predictors' request logs, written by running predictors and rewritten by erasure.

``<workspace>/serving/requests/<model>.jsonl``: one JSON line per scored entity (token,
features, score). Two parties write it, possibly in different processes at the same time:
a predictor appends, an erasure rewrites the file without a subject's lines and renames the
new file over the old one. So that neither loses the other's work:

* **One lock.** Every append and every rewrite holds ``serving/requests/.lock`` (an
  exclusive ``flock``, :func:`governance.locks.file_lock`). A rewrite reads, filters and
  renames under it, so no line is appended to a file that is about to be replaced.
* **Never through a stale handle.** :func:`append_records` opens the path per append
  (``O_APPEND | O_CREAT``), writes whole lines and closes it. A running predictor uses a
  :class:`RequestLogWriter`, which keeps the lock file and the log open (an append costs a
  ``flock`` and a ``stat``, not two opens, a ``mkdir`` and a path resolution) and checks, under
  the lock, that its handles are the files now at their paths (device and inode): after an
  erasure renamed a new log over the old one, it reopens before writing. Either way a line is
  always written into the file now at the path.
* **Erased subjects stay out.** Before rewriting, the erasure adds the subjects' keyed digests
  (:func:`governance.erasure.subject_digest`: HMAC under a system key, never a token) to
  ``serving/requests/.erased``. Each append reads that list (when it changed) under the lock
  and drops records of erased subjects: a request scored just before the erasure (features
  read before the online store was erased) cannot write the token back afterwards.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.locks import file_lock
from governance.erasure import subject_digest

if TYPE_CHECKING:
    from governance.workspace import Workspace

__all__ = ["RequestLogWriter", "append_records", "log_dir", "log_lock", "mark_erased", "request_logs", "rewrite_without"]

_LOCK = ".lock"
_ERASED = ".erased"


def log_dir(ws: "Workspace") -> Path:
    """``<workspace>/serving/requests``: the request logs, their lock and the erased-digest list."""
    return ws.config.workspace_dir / "serving" / "requests"


def request_logs(ws: "Workspace") -> list[Path]:
    d = log_dir(ws)
    return sorted(d.glob("*.jsonl")) if d.is_dir() else []


@contextmanager
def log_lock(folder: Path) -> Iterator[None]:
    """Hold the request logs' lock (every append and every rewrite takes it)."""
    with file_lock(folder / _LOCK):
        yield


class _Erased:
    """The erased subjects' digests, re-read only when the file changed (stat per append)."""

    def __init__(self) -> None:
        self.stamp: tuple[int, int, int] | None = None
        self.digests: frozenset[str] = frozenset()

    def current(self, folder: Path) -> frozenset[str]:
        p = folder / _ERASED
        try:
            st = p.stat()
        except FileNotFoundError:
            self.stamp, self.digests = None, frozenset()
            return self.digests
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self.stamp:
            self.digests = frozenset(line.strip() for line in p.read_text().splitlines() if line.strip())
            self.stamp = stamp
        return self.digests


_ERASED_CACHE: dict[Path, _Erased] = {}


def append_records(ws: "Workspace", path: Path, records: Sequence[Mapping[str, Any]]) -> int:
    """Append ``records`` (each with a ``token``) to the log at ``path``; return how many were written.

    Under the logs' lock: records of subjects on the erased list are dropped, the file is
    opened (``O_APPEND``), written in whole lines and closed (a :class:`RequestLogWriter` used once).
    """
    if not records:
        return 0
    writer = RequestLogWriter(ws, path)
    try:
        return writer.append(records)
    finally:
        writer.close()


class RequestLogWriter:
    """Appends to one request log: under the logs' lock, records of subjects on the erased list
    dropped, whole lines into the file now at the path. A long-running predictor keeps one, with
    the lock file and the log open between appends. Thread-safe."""

    def __init__(self, ws: "Workspace", path: Path) -> None:
        self.ws = ws
        self.path = Path(path)
        self.folder = self.path.parent
        self.folder.mkdir(parents=True, exist_ok=True)
        self._erased = _ERASED_CACHE.setdefault(self.folder.resolve(), _Erased())
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._fd: int | None = None

    @staticmethod
    def _same(fd: int, path: Path) -> bool:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _locked(self) -> int:
        """flock the lock file that is now at its path (reopened if it was replaced); returns its fd."""
        lock = self.folder / _LOCK
        for _ in range(5):
            if self._lock_fd is None:
                self._lock_fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            if self._same(self._lock_fd, lock):
                return self._lock_fd
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None
        raise OSError(f"the request logs' lock {lock} keeps being replaced")

    def append(self, records: Sequence[Mapping[str, Any]]) -> int:
        """Append ``records`` (each with a ``token``); return how many were written."""
        if not records:
            return 0
        with self._mutex:
            fd = self._locked()
            try:
                erased = self._erased.current(self.folder)
                if erased:
                    records = [r for r in records if subject_digest(self.ws, str(r.get("token"))) not in erased]
                if not records:
                    return 0
                if self._fd is not None and not self._same(self._fd, self.path):
                    os.close(self._fd)  # an erasure renamed a new log over this one
                    self._fd = None
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                view = memoryview("".join(json.dumps(dict(r)) + "\n" for r in records).encode())
                while view:
                    view = view[os.write(self._fd, view):]
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return len(records)

    def close(self) -> None:
        with self._mutex:
            for fd in (self._fd, self._lock_fd):
                if fd is not None:
                    os.close(fd)
            self._fd = self._lock_fd = None


def mark_erased(ws: "Workspace", tokens: Iterable[str]) -> None:
    """Add the subjects' keyed digests to the erased list (idempotent; caller holds the lock)."""
    folder = log_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / _ERASED
    have = set(p.read_text().split()) if p.exists() else set()
    new = sorted({subject_digest(ws, t) for t in tokens} - have)
    if not new:
        return
    tmp = folder / (_ERASED + ".tmp")
    tmp.write_text("".join(f"{d}\n" for d in sorted(have | set(new))))
    os.replace(tmp, p)


def lines_of(path: Path, tokens: set[str]) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Every line of a log, with its parsed record when it names one of ``tokens``."""
    needles = [t.encode() for t in tokens]
    with path.open("rb") as fh:
        for line in fh:
            rec = None
            if any(t in line for t in needles):
                try:
                    rec = json.loads(line)
                except ValueError:
                    rec = {"unparsed": True}
                if not isinstance(rec, dict):
                    rec = {"unparsed": True}
            yield line, rec


def rewrite_without(path: Path, tokens: set[str]) -> int:
    """Rewrite one log without the lines naming ``tokens`` (new file renamed over the old one, so
    a crash leaves either whole file); the caller holds the lock. Returns lines removed."""
    removed = 0
    tmp = path.with_name(path.name + ".tmp")
    st = path.stat()
    with tmp.open("wb") as out:
        for line, rec in lines_of(path, tokens):
            if rec is not None:
                removed += 1
                continue
            out.write(line)
        out.flush()
        os.fsync(out.fileno())
    if removed:
        os.chmod(tmp, st.st_mode & 0o777)
        os.replace(tmp, path)
    else:
        tmp.unlink()
    return removed
