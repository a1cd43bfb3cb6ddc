"""The key store: wrapped per-subject data keys in an SQLite file that truly deletes.

One SQLite file holds, wrapped by the KEK, every subject's data key (DEK) and
the system keys (blind index, audit signing, ...). It must never be versioned
(not git, not DVC, not in table snapshots): crypto-shredding works because
this is the only place a DEK exists, and deleting it here is final.

How deletion is made real:

* ``PRAGMA secure_delete=ON`` overwrites deleted cells with zeros;
* ``journal_mode=DELETE`` (not WAL: the WAL file would keep old pages after a
  delete) and ``synchronous=FULL``;
* a rotation ends with ``VACUUM``, which rebuilds the file without free pages
  (``temp_store=MEMORY`` keeps VACUUM's copy off disk). A shred does not need
  one for confidentiality — ``secure_delete=ON`` zeroes the deleted cells and
  the pages it frees (a test reads the file's bytes after a shred) — and a
  VACUUM costs time in proportion to the whole store, so a shred vacuums only
  when free pages pass a quarter of the file (to give the space back).

Copies outside this file (filesystem snapshots, backups of the file, SSD
remapping) are outside its reach: back the key store up only with a retention
shorter than the erasure deadline.

Tables (schema version 5; a version-2, -3 or -4 store is converted when opened, a version-1 store
keeps its own ``subjects`` and works as before)::

    meta(name, wrapped, kek_id, created_at)           system keys
    keyblocks(first_id, n, kek_id, created_at, wrapped)   the data keys of ids first_id .. first_id+n-1
    bi_runs(run, level, fences)                       the blind indexes, in sorted runs ...
    bi_parts(run, part, entries)                      ... cut into parts of 1,024 entries
    lsm(name, value)                                  ``last_id``, ``last_run``
    shredded(token, shredded_at)                      tombstones

:mod:`governance.keys.runs` describes the layout and is its reference (the native core's bulk path,
``native/src/keystore.rs``, writes the same). A token is a keyed permutation of its row id
(:func:`wire.derived_tokens`, under the ``subject-token`` system key, since version 2); ids are
never reused, so a shredded subject's token never comes back, and a lookup by token decrypts it to
its id and reads the id's block (only the token's own spelling is accepted). A batch of new
subjects is a few key blocks and one run of its blind indexes' keys (their first 16 bytes) with
the ids, in key order; runs are merged by level. The history that led here, each step measured
(#15): version 1 kept random tokens in a token index, version 2 derived them from row ids,
version 3 moved the blind indexes off the rows into a main and a recent index merged
geometrically, version 4 kept the recent index in per-batch runs, and version 5 stores a batch
as blocks and a run instead of a row and an index entry per subject (10M new subjects in 14.6 s
instead of 31.3 s: ``bench_keystore.py --growth``).

Each wrapped key is bound to its subject by the wrapping AAD
(``b"lakewarden:dek\\x00" + token``, ``b"lakewarden:meta\\x00" + name``), so a
wrapped DEK copied to another subject's place does not unwrap.

Unwrapped keys live only in process memory (a bounded dict, cleared on shred,
rotation and close). A process that has a DEK cached keeps it until it shreds,
rotates or closes: another process's shred takes effect for it only then.
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from itertools import repeat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from governance.errors import DecryptionError, KeyManagementError, SubjectShredded
from governance.keys import hazmat, wire
from governance.keys import runs as layout
from governance.keys.kek import InsecureKeyFileWarning, KeyEncryptionKey, _makedirs_private

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["KeyStore", "SubjectKeys", "BLIND_INDEX_KEY", "TOKEN_KEY", "TOKEN_PREFIX", "TOKEN_RE"]

SCHEMA_VERSION = 5
# Schema 5: once FANOUT runs of blind indexes share a level they are merged into one run of the
# next (governance/keys/runs.py, native/src/keystore.rs: merge_levels).
FANOUT = layout.FANOUT
TOKEN_PREFIX = "sub_"
# The one definition of what a subject token looks like: "sub_" + 26 lowercase base32 characters.
TOKEN_RE = re.compile(r"^sub_[a-z2-7]{26}$")
BLIND_INDEX_KEY = "blind-index"
TOKEN_KEY = "subject-token"  # version 2 and later: tokens are a keyed permutation of row ids
_DEK_AAD = wire.DEK_AAD_PREFIX  # the wire formats: governance/keys/wire.py
_META_AAD = wire.META_AAD_PREFIX
_PAGE_SIZE = 16384  # new stores only; an existing store keeps its page size
_CHUNK = 999  # bound parameters per IN (...) query; SQLite's historic limit

def _sequence(c: sqlite3.Connection) -> int:
    """The last row id ever given to a subject in a schema 2-4 store (``AUTOINCREMENT``'s sequence)."""
    return c.execute("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name='subjects'), 0)").fetchone()[0]


class SubjectKeys(NamedTuple):
    """Tokens of a column of subject ids (null where unknown) and, when asked for, their data
    keys: 32 bytes per id, in the same order (zeros where unknown)."""

    tokens: pa.Array
    keys: bytes | None
    created: int | None = None  # how many of the ids were new subjects, created by this call (None: not counted)


def _chunks(items: Sequence[Any], size: int = _CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _in_query(template: str, n: int) -> str:
    return template.format(",".join("?" * n))


def _check_token(token: object) -> str:
    if not isinstance(token, str):
        raise TypeError(f"subject token must be str, got {type(token).__name__}")
    return token


class KeyStore:
    """Per-subject data keys and system keys, wrapped by a KEK, in one SQLite file.

    Args:
        path: the store file; created (mode 0600, parent dirs 0700) if missing.
        kek: the key-encryption key; it must be the one the store was created
            or last rotated with.
        clock: returns the current time (injected by tests); defaults to UTC now.
        cache_size: at most this many unwrapped DEKs are kept in memory.

    Raises:
        KeyManagementError: the file is not a key store, is from a newer
            version, or its keys are wrapped by another KEK.

    Example::

        with KeyStore(workspace / ".lakewarden/keystore.db", kek) as store:
            token = store.token_for("alice@example.com")
            dek = store.dek(token)
            store.shred(token)
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        kek: KeyEncryptionKey,
        *,
        clock: Callable[[], datetime] | None = None,
        cache_size: int = 262_144,
    ) -> None:
        self._path = Path(path).expanduser()
        self._open(kek, clock, cache_size)

    def _open(self, kek: KeyEncryptionKey, clock: Callable[[], datetime] | None, cache_size: int) -> None:
        """Check the arguments, connect, create or check the schema and the KEK (both stores)."""
        if not isinstance(kek, KeyEncryptionKey):
            raise TypeError(f"kek must be a KeyEncryptionKey, got {type(kek).__name__}")
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self._kek = kek
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._cache_size = cache_size
        self._lock = threading.RLock()
        self._deks: OrderedDict[str, bytes] = OrderedDict()
        self._runs = layout.Runs()
        self._system: dict[str, bytes] = {}
        self._conn: Any = None
        self._tkey: bytes | None = None
        self._conn = self._connect()
        try:
            self._init_schema()
            self._check_kek()
            # version 2 and later: the token permutation key, loaded once (lookups by token run inside transactions)
            self._tkey = self._system_key(TOKEN_KEY, create=True) if self._version >= 2 else None
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> sqlite3.Connection:
        p = self._path
        _makedirs_private(p.parent)
        new = False
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            new = True
        except FileExistsError:
            if os.name == "posix":
                mode = stat.S_IMODE(p.stat().st_mode)
                if mode & 0o077:
                    warnings.warn(
                        f"key store {p} is readable or writable by group or others (mode {mode:#o}); "
                        f"restrict it with `chmod 600 {p}`",
                        InsecureKeyFileWarning,
                        stacklevel=3,
                    )
        except OSError as exc:
            raise KeyManagementError(f"cannot create key store {p}: {exc.strerror}") from None
        else:
            if os.name == "posix":
                os.fchmod(fd, 0o600)
            os.close(fd)
        try:
            conn = sqlite3.connect(str(p), isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as exc:
            raise KeyManagementError(f"cannot open key store {p}: {exc}") from exc
        try:
            if new:  # before the first table: larger pages make bulk subject creation ~10% faster
                conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            conn.execute("PRAGMA secure_delete=ON")
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA cache_size=-65536")
            secure = conn.execute("PRAGMA secure_delete").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise KeyManagementError(f"{p} is not a key store: {exc}") from exc
        if str(mode).lower() != "delete" or secure != 1:
            conn.close()
            raise KeyManagementError(
                f"key store {p} cannot be opened with journal_mode=DELETE and secure_delete=ON "
                f"(got journal_mode={mode}, secure_delete={secure}); deletion would not be final"
            )
        return conn

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise KeyManagementError(f"key store {self._path} is closed")
        return self._conn

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; BEGIN IMMEDIATE for writes so lookup+insert is atomic across processes."""
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise KeyManagementError(f"key store {self._path}: {exc}") from exc

    def _vacuum(self) -> None:
        try:
            self._db().execute("VACUUM")
        except sqlite3.Error as exc:
            raise KeyManagementError(
                f"key store {self._path}: the deletion is committed and its cells are zeroed, "
                f"but VACUUM failed: {exc}",
                hint="run KeyStore.vacuum() again when no other process holds the store",
            ) from exc

    def _now(self) -> str:
        return self._clock().astimezone(timezone.utc).isoformat(timespec="seconds")

    def _init_schema(self) -> None:
        with self._tx(write=True) as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise KeyManagementError(
                    f"key store {self._path} has schema version {version}; this Lakewarden reads "
                    f"up to {SCHEMA_VERSION}",
                    hint="upgrade Lakewarden",
                )
            converted = version in (2, 3, 4)
            if version == 0:  # a new store; a version-1 store keeps its tables and works as before
                layout.create_tables(c)
                c.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                version = SCHEMA_VERSION
            elif converted:  # rows into key blocks, blind indexes into one run (runs.py: from_schema_4)
                layout.from_schema_4(c, _sequence(c), version, self._kek.key_id)
                version = SCHEMA_VERSION
        if converted:
            self._vacuum()  # the old tables' pages back to the file system (secure_delete zeroed them)
        self._version = version

    def _in_runs(self) -> bool:
        """Schema 5: keys in blocks, blind indexes in runs (:mod:`governance.keys.runs`)."""
        return self._version >= 5

    def _check_kek(self) -> None:
        with self._tx(write=False) as c:
            ids = {r[0] for r in c.execute("SELECT DISTINCT kek_id FROM meta")}
            if self._in_runs():  # the first and the last block (a rotation rewraps all of them at once)
                ids.update(r[0] for r in c.execute("SELECT kek_id FROM (SELECT kek_id FROM keyblocks ORDER BY first_id LIMIT 1) "
                                                   "UNION SELECT kek_id FROM (SELECT kek_id FROM keyblocks ORDER BY first_id DESC LIMIT 1)"))
            else:
                row = c.execute("SELECT kek_id FROM subjects LIMIT 1").fetchone()
                if row:
                    ids.add(row[0])
        foreign = sorted(ids - {self._kek.key_id})
        if foreign:
            raise KeyManagementError(
                f"key store {self._path} is wrapped by KEK {', '.join(foreign)}, "
                f"but the loaded KEK is {self._kek.key_id}",
                hint="load the KEK this store was created or last rotated with",
                store_kek_ids=foreign,
                kek_id=self._kek.key_id,
            )

    def _foreign_kek_error(self, what: str, kek_id: str) -> KeyManagementError:
        return KeyManagementError(
            f"{what} is wrapped by KEK {kek_id}, but the key store was opened with KEK {self._kek.key_id}",
            hint="load the KEK this store was created or last rotated with",
            store_kek_ids=[kek_id],
            kek_id=self._kek.key_id,
        )

    def _unwrap_all(self, kek: KeyEncryptionKey, blobs: list[bytes], aads: list[bytes], names: list[str]) -> list[bytes]:
        """Unwrap with ``kek``; on failure name the first key that does not unwrap."""
        try:
            keys = kek.unwrap_many(blobs, aads)
        except DecryptionError:
            for blob, aad, name in zip(blobs, aads, names):
                try:
                    kek.unwrap(blob, aad)
                except DecryptionError:
                    raise DecryptionError(
                        f"{name} in key store {self._path} does not unwrap with KEK {kek.key_id} "
                        "(the row was altered or copied from elsewhere)"
                    ) from None
            raise
        for key, name in zip(keys, names):
            if len(key) != hazmat.KEY_SIZE:
                raise DecryptionError(f"{name} unwrapped to {len(key)} bytes, expected {hazmat.KEY_SIZE}")
        return keys

    def _unwrap_deks(self, rows: list[tuple[str, bytes, str]]) -> list[bytes]:
        """The data keys of ``(token, wrapped_dek, kek_id)`` rows; a row wrapped by another KEK is
        refused by name, as is one that does not unwrap."""
        for tok, _, kid in rows:
            if kid != self._kek.key_id:
                raise self._foreign_kek_error(f"data key of subject {tok}", kid)
        return self._unwrap_all(
            self._kek, [r[1] for r in rows], [_DEK_AAD + r[0].encode("utf-8") for r in rows],
            [f"data key of subject {r[0]}" for r in rows],
        )

    def _cache_put(self, token: str, dek: bytes) -> None:
        cache = self._deks
        while len(cache) >= self._cache_size:
            hazmat.forget(cache.popitem(last=False)[1])  # oldest first
        cache[token] = dek

    def _drop_cached(self, token: str) -> None:
        dek = self._deks.pop(token, None)
        if dek is not None:
            hazmat.forget(dek)

    def _clear_caches(self) -> None:
        for dek in self._deks.values():
            hazmat.forget(dek)
        for key in self._system.values():
            hazmat.forget(key)
        self._deks.clear()
        self._system.clear()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> Path:
        return self._path

    @property
    def kek_id(self) -> str:
        """Id of the KEK that wraps every key in the store."""
        return self._kek.key_id

    # ------------------------------------------------------------------ system keys

    def system_key(self, name: str, *, create: bool = True) -> bytes:
        """Return the 32-byte system key ``name`` (e.g. "blind-index", "audit-signing").

        Created on first use (random, stored wrapped) unless ``create`` is False.

        Raises:
            KeyManagementError: the key does not exist and ``create`` is False,
                or it is wrapped by another KEK.
            DecryptionError: the stored wrapped key was altered.
        """
        key = self._system_key(name, create=create)
        if key is None:
            raise KeyManagementError(f"system key {name!r} does not exist in key store {self._path}")
        return key

    def _system_key(self, name: str, *, create: bool) -> bytes | None:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"system key name must be a non-empty string without NUL, got {name!r}")
        key = self._system.get(name)
        if key is not None:
            return key
        with self._lock:
            aad = _META_AAD + name.encode("utf-8")
            with self._tx(write=False) as c:
                row = c.execute("SELECT wrapped, kek_id FROM meta WHERE name=?", (name,)).fetchone()
            if row is None and create:
                with self._tx(write=True) as c:
                    row = c.execute("SELECT wrapped, kek_id FROM meta WHERE name=?", (name,)).fetchone()
                    if row is None:  # a writer racing on a server store may insert it first: then theirs is read
                        key = hazmat.new_key()
                        c.execute(
                            "INSERT INTO meta(name, wrapped, kek_id, created_at) VALUES (?,?,?,?) "
                            "ON CONFLICT (name) DO NOTHING",
                            (name, self._kek.wrap(key, aad), self._kek.key_id, self._now()),
                        )
                        row = c.execute("SELECT wrapped, kek_id FROM meta WHERE name=?", (name,)).fetchone()
            if row is None:
                return None
            if row[1] != self._kek.key_id:
                raise self._foreign_kek_error(f"system key {name!r}", row[1])
            # from the row, always: after a race the stored key is the other writer's, not ours
            key = self._unwrap_all(self._kek, [bytes(row[0])], [aad], [f"system key {name!r}"])[0]
            self._system[name] = key
            return key

    def destroy_system_key(self, name: str) -> bool:
        """Delete the system key ``name`` for good (e.g. a request's throw-away key) and VACUUM.

        Everything sealed under it with :meth:`KeyRing.seal_system` becomes unreadable.
        Returns True if a key was destroyed, False if there was none.
        """
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"system key name must be a non-empty string without NUL, got {name!r}")
        if name in (BLIND_INDEX_KEY, TOKEN_KEY, "audit-signing"):
            raise ValueError(f"system key {name!r} is structural and cannot be destroyed")
        with self._lock:
            self._system.pop(name, None)
            with self._tx(write=True) as c:
                n = c.execute("DELETE FROM meta WHERE name=?", (name,)).rowcount
            if n:
                self._vacuum()
        return bool(n)

    # ------------------------------------------------------------------ subjects

    def _token_key(self) -> bytes | None:
        """The token permutation key (version 2 and later), None for a version-1 store."""
        return self._tkey

    def _by_tokens(self, c: sqlite3.Connection, columns: str, tokens: Sequence[str]) -> list[tuple[Any, ...]]:
        """Rows ``(token, <columns>)`` of the subjects among ``tokens`` that exist (by the token
        index in version 1; in version 5 by the row id each token decrypts to and that id's key
        block, ``columns`` naming ``id``, ``wrapped_dek``, ``kek_id`` or ``1``; a server store, by
        the row id and its stored token)."""
        out: list[tuple[Any, ...]] = []
        key = self._token_key()
        if self._in_runs():
            assert key is not None
            wanted = [col.strip() for col in columns.split(",")]
            return [(t, *({"id": i, "wrapped_dek": w, "kek_id": k, "1": 1}[col] for col in wanted))
                    for t, (i, w, k) in layout.by_tokens(c, key, tokens).items()]
        if key is None:
            template = f"SELECT token, {columns} FROM subjects WHERE token IN ({{}})"
            for chunk in _chunks(sorted(tokens)):  # sorted: in-order index probes
                out.extend(c.execute(_in_query(template, len(chunk)), chunk).fetchall())
            return out
        wanted = {i: t for t, i in zip(tokens, wire.token_ids(key, list(tokens))) if i is not None}
        template = f"SELECT id, token, {columns} FROM subjects WHERE id IN ({{}})"
        for chunk in _chunks(sorted(wanted)):
            out.extend(r[1:] for r in c.execute(_in_query(template, len(chunk)), chunk) if wanted[r[0]] == r[1])
        return out

    def token_for(self, subject_id: str, *, create: bool = True) -> str | None:
        """Return the subject's token, creating it (and its DEK) if new.

        The id is normalised with ``strip()``; only its blind index
        (HMAC-SHA256 under the "blind-index" system key) is stored. After a
        subject is shredded, the same id gets a new, unrelated token.

        Returns:
            ``"sub_" + 26 base32 characters``, or None when unknown and
            ``create`` is False.

        Raises:
            ValueError: the id is empty or whitespace only.
            TypeError: the id is not a str.
        """
        if not isinstance(subject_id, str):
            raise TypeError(f"subject id must be str, got {type(subject_id).__name__}")
        return self.tokens_for([subject_id], create=create)[0]

    def tokens_for(self, subject_ids: Sequence[str], *, create: bool = True) -> list[str | None]:
        """Batched :meth:`token_for`: one transaction, one pass over the ids.

        Duplicate ids in the batch get the same token. Result ``i`` is the
        token of ``subject_ids[i]`` (None when unknown and ``create`` is False).
        """
        if isinstance(subject_ids, (str, bytes)):
            raise TypeError("tokens_for takes a sequence of subject ids; use token_for for one id")
        ids = list(subject_ids)
        if not all(isinstance(s, str) for s in ids):
            i, bad = next((i, s) for i, s in enumerate(ids) if not isinstance(s, str))
            raise TypeError(f"subject id at position {i} must be str, got {type(bad).__name__}")
        if not ids:
            return []
        import pyarrow as pa  # imported here: a CLI that never touches subjects starts without it

        try:
            arr = pa.array(ids, pa.string())
        except (UnicodeEncodeError, pa.ArrowException) as exc:
            raise ValueError(f"subject id is not encodable as UTF-8: {exc}") from None
        return self.subject_keys(arr, create=create).tokens.to_pylist()

    def subject_keys(self, ids: pa.Array, *, create: bool = True, keys: bool = False) -> SubjectKeys:
        """The tokens (and, with ``keys``, the data keys) of a column of subject ids, aligned with it.

        The bulk path under :meth:`tokens_for`, for ingest. With the native core built (and
        sharing Python's SQLite library) and a local KEK, the whole lookup-and-create runs in Rust
        with no Python per id; otherwise in Python, with the same statements and result. Unknown
        ids (``create`` False) are null. New subjects' keys are not cached here.

        Raises:
            ValueError: an id is null, not UTF-8, or blank (names its position).
            KeyManagementError / DecryptionError: as :meth:`deks`.
        """
        import pyarrow as pa

        from governance.keys import native

        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        if len(ids) == 0:
            return SubjectKeys(pa.array([], pa.string()), b"" if keys else None)
        key = self._system_key(BLIND_INDEX_KEY, create=create)
        if key is None:
            return SubjectKeys(pa.nulls(len(ids), pa.string()), bytes(hazmat.KEY_SIZE * len(ids)) if keys else None)
        if self._native_bulk():
            # Not under self._lock: the native core serializes its own transactions and checks, inside
            # each, that the store's KEK is still the one it wraps with (a rotation is seen).
            kek = self._kek
            try:
                tokens, key_bytes, created = native.resolve_subjects(
                    str(self._path), key, kek._native_material(), kek.key_id, ids,  # type: ignore[attr-defined]
                    create=create, keys=keys, now=self._now(), token_key=self._token_key(),
                    fanout=FANOUT,
                )
            except RuntimeError as exc:
                raise self._native_error(str(exc)) from None
            return SubjectKeys(tokens, key_bytes, created)
        found = self._resolve(key, ids, create=create, keys=keys)
        tokens = pa.array([None if t is None else t[0] for t in found], pa.string())
        if not keys:
            return SubjectKeys(tokens, None)
        zero = bytes(hazmat.KEY_SIZE)
        return SubjectKeys(tokens, b"".join(zero if t is None else t[1] for t in found))

    def _native_bulk(self) -> bool:
        """Whether the native core can run the bulk path on this store (a local KEK, and the same
        SQLite library as Python's)."""
        from governance.keys import native

        return getattr(self._kek, "_native_material", None) is not None and native.sqlite_shared()

    def _native_error(self, msg: str) -> Exception:
        kind, _, rest = msg.partition("\t")
        if kind == "foreign-kek":
            tok, _, kid = rest.partition("\t")
            return self._foreign_kek_error(f"data key of subject {tok}", kid)
        if kind == "rotated-kek":
            return KeyManagementError(
                f"key store {self._path} is now wrapped by KEK {rest}, not by KEK {self._kek.key_id} that this "
                "process loaded (it was rotated meanwhile); nothing was created",
                hint="open the store again with the current KEK",
                store_kek_ids=[rest],
                kek_id=self._kek.key_id,
            )
        if kind == "unwrap":
            return DecryptionError(
                f"data key of subject {rest} in key store {self._path} does not unwrap with KEK {self._kek.key_id} "
                "(the row was altered or copied from elsewhere)"
            )
        return KeyManagementError(f"key store {self._path}: {rest or msg}")

    def _resolve(self, key: bytes, ids: pa.Array, *, create: bool, keys: bool) -> list[tuple[str, bytes] | None]:
        """Per id, ``(token, data key or b"")``, or None when unknown (the pure-Python path of
        :meth:`subject_keys`; ``native/src/keystore.rs`` is the same, in Rust).

        New subjects are inserted in blind-index order with their tokens sorted too, so both of
        the table's indexes are appended to in order (1.5x faster at 1M than random order). The
        pairing this makes between a token's rank and its blind index's rank within one batch
        says nothing about the ids without the blind-index key, and goes with the row on shred.
        """
        from governance.keys import native

        bis = native.fixed(native.blind_indexes(key, ids), 32)
        unique = sorted(set(bis))  # sorted: index probes and inserts walk the b-tree in order
        found: dict[bytes, tuple[str, bytes]] = {}
        with self._lock, self._tx(write=create) as c:
            if self._in_runs():  # schema 5 tells ids apart by their blind index's first 16 bytes
                bis = [b[: layout.KEY] for b in bis]
                unique = sorted(set(bis))
                self._resolve_in_runs(c, unique, found, create=create, keys=keys)
                return [found.get(b) for b in bis]
            columns = "token, wrapped_dek, kek_id" if keys else "token"
            rows: list[tuple[Any, ...]] = []
            template = f"SELECT blind_index, {columns} FROM subjects WHERE blind_index IN ({{}})"
            for chunk in _chunks(unique):
                rows.extend(c.execute(_in_query(template, len(chunk)), list(chunk)).fetchall())
            if keys:
                deks = self._unwrap_deks([r[1:] for r in rows])
                found.update((r[0], (r[1], d)) for r, d in zip(rows, deks))
            else:
                found.update((r[0], (r[1], b"")) for r in rows)
            if create and len(found) < len(unique):  # a version-1 store: random tokens
                missing = [b for b in unique if b not in found]
                tokens = native.new_tokens(len(missing), sorted_=True)
                deks = self._new_wrapped(tokens)
                c.executemany(
                    "INSERT INTO subjects(token, blind_index, wrapped_dek, kek_id, created_at) VALUES (?,?,?,?,?)",
                    zip(tokens, missing, (w for _, w in deks), repeat(self._kek.key_id), repeat(self._now())),
                )
                found.update(zip(missing, zip(tokens, (d for d, _ in deks))))
        return [found.get(b) for b in bis]

    def _new_wrapped(self, tokens: Sequence[str]) -> list[tuple[bytes, bytes]]:
        """A fresh data key for each of ``tokens``, with it wrapped under the KEK (AAD: the token)."""
        from governance.keys import native

        deks = native.fixed(os.urandom(hazmat.KEY_SIZE * len(tokens)), hazmat.KEY_SIZE)
        wrapped = self._kek.wrap_many(deks, [_DEK_AAD + t.encode("ascii") for t in tokens])
        if len(wrapped) != len(deks):
            raise KeyManagementError(f"KEK {self._kek.key_id} returned {len(wrapped)} wrapped keys for {len(deks)}")
        return list(zip(deks, wrapped))

    def _resolve_in_runs(self, c: sqlite3.Connection, unique: list[bytes], found: dict[bytes, tuple[str, bytes]], *,
                         create: bool, keys: bool) -> None:
        """Schema 5's lookup and create (``native/src/keystore.rs`` is the same in Rust): the blind
        indexes ``unique`` (sorted) looked up in the runs, their keys read from their blocks when
        asked for; with ``create`` the missing ones get the next row ids, in blind-index order,
        one key block per :data:`runs.BLOCK` of them and one run, then the levels are merged."""
        token_key = self._token_key()
        assert token_key is not None  # schema 5 derives every token from its row id
        self._runs.refresh(c)
        held = self._runs.lookup(c, unique)
        if held:
            ids = list(held.values())
            tokens = wire.derived_tokens(token_key, ids)
            if keys:
                entries = layout.key_entries(c, ids)
                lost = [i for i in ids if i not in entries]
                if lost:
                    raise KeyManagementError(f"key store {self._path}: row {lost[0]} has a blind index but no data key")
                deks = self._unwrap_deks([(t, *entries[i]) for t, i in zip(tokens, ids)])
            else:
                deks = [b""] * len(ids)
            found.update(zip(held, zip(tokens, deks)))
        if not create or len(found) == len(unique):
            return
        missing = [b for b in unique if b not in found]
        first = layout.last_id(c) + 1
        ids = list(range(first, first + len(missing)))
        tokens = wire.derived_tokens(token_key, ids)
        made = self._new_wrapped(tokens)
        layout.write_blocks(c, first, [w for _, w in made], self._kek.key_id, self._now())
        entries = layout.new_run_entries(missing, first)
        run = layout.next_run(c)
        layout.write_run(c, run, 0, entries)
        c.execute("INSERT OR REPLACE INTO lsm(name, value) VALUES ('last_id', ?)", (first + len(missing) - 1,))
        self._runs.add(run, entries)
        layout.merge_levels(c, FANOUT)
        found.update(zip(missing, zip(tokens, (d for d, _ in made))))

    def dek(self, token: str) -> bytes:
        """Return the subject's 32-byte data key (unwrapped on demand, cached in memory).

        Raises:
            SubjectShredded: the subject was shredded (``token``, ``shredded_at`` on the error).
            KeyManagementError: unknown token, or its key is wrapped by another KEK.
            DecryptionError: the stored wrapped key was altered.
        """
        dek = self._deks.get(token)
        if dek is not None:
            return dek
        return self.deks([token])[token]

    def deks(self, tokens: Iterable[str]) -> dict[str, bytes]:
        """Batched :meth:`dek`: ``{token: dek}`` for every distinct token (same errors)."""
        wanted = list(dict.fromkeys(tokens))
        for t in wanted:
            _check_token(t)
        out: dict[str, bytes] = {}
        todo = []
        for t in wanted:
            d = self._deks.get(t)
            if d is None:
                todo.append(t)
            else:
                out[t] = d
        if not todo:
            return out
        with self._lock:
            rows: dict[str, tuple[bytes, str]] = {}
            with self._tx(write=False) as c:
                for tok, blob, kid in self._by_tokens(c, "wrapped_dek, kek_id", todo):
                    rows[tok] = (blob, kid)
                missing = [t for t in todo if t not in rows]
                if missing:
                    self._raise_missing(c, missing)
            toks = list(rows)
            keys = self._unwrap_deks([(t, *rows[t]) for t in toks])
            for t, k in zip(toks, keys):
                self._cache_put(t, k)
                out[t] = k
        return out

    def _raise_missing(self, c: sqlite3.Connection, missing: list[str]) -> None:
        template = "SELECT token, shredded_at FROM shredded WHERE token IN ({})"
        tomb: dict[str, str] = {}
        for chunk in _chunks(missing):
            tomb.update(c.execute(_in_query(template, len(chunk)), chunk).fetchall())
        first = missing[0]
        if first in tomb:
            raise SubjectShredded(
                f"subject {first} was crypto-shredded: its data key was destroyed on {tomb[first]}; "
                "data sealed for it can no longer be decrypted",
                token=first,
                shredded_at=tomb[first],
            )
        raise KeyManagementError(f"unknown subject token {first!r}: not in key store {self._path}", token=first)

    def subject_state(self, token: str) -> Literal["active", "shredded", "unknown"]:
        """Say whether ``token`` has a live key, was shredded, or was never issued here."""
        _check_token(token)
        with self._tx(write=False) as c:
            if self._by_tokens(c, "1", [token]):
                return "active"
            if c.execute("SELECT 1 FROM shredded WHERE token=?", (token,)).fetchone():
                return "shredded"
        return "unknown"

    # ------------------------------------------------------------------ destructive verbs

    def shred(self, token: str) -> bool:
        """Destroy the subject's DEK and blind index for good (crypto-shredding).

        Deletes the row (``secure_delete`` zeroes its bytes), records a tombstone,
        drops the in-memory copy and commits.

        Returns:
            True if a key was destroyed, False if the token was unknown or
            already shredded.
        """
        return self.shred_many([token]) == 1

    def shred_many(self, tokens: Iterable[str]) -> int:
        """Shred several subjects in one transaction; return how many were destroyed."""
        todo = list(dict.fromkeys(_check_token(t) for t in tokens))
        if not todo:
            return 0
        with self._lock:
            deleted: list[str] = []
            try:
                with self._tx(write=True) as c:
                    if self._in_runs():  # the key zeroed in its block, the blind index out of its run
                        by_id = {i: t for t, i in self._by_tokens(c, "id", todo)}
                        deleted = [by_id[i] for i in layout.erase(c, list(by_id))]
                    else:  # a version-1 store: its rows hold both
                        for t, rowid in self._by_tokens(c, "rowid", todo):
                            if c.execute("DELETE FROM subjects WHERE rowid=?", (rowid,)).rowcount:
                                deleted.append(t)
                    now = self._now()
                    c.executemany(
                        "INSERT OR IGNORE INTO shredded(token, shredded_at) VALUES (?,?)",
                        zip(deleted, repeat(now)),
                    )
            finally:
                for t in todo:
                    self._drop_cached(t)
            if deleted and self._mostly_free():
                self._vacuum()
        return len(deleted)

    def _mostly_free(self) -> bool:
        db = self._db()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return pages > 0 and free > pages // 4

    def vacuum(self) -> None:
        """Rebuild the file so no free page keeps deleted bytes (shred and rotate do this)."""
        with self._lock:
            self._vacuum()

    def _rewrapped(self, old: KeyEncryptionKey, new_kek: KeyEncryptionKey, meta: list[tuple[str, bytes, str]],
                   subj: list[tuple[str, bytes, str]]) -> list[bytes]:
        """Every ``(name, wrapped, kek_id)`` system key, then every ``(token, wrapped, kek_id)``
        subject key, unwrapped with ``old`` and wrapped with ``new_kek`` (a rotation's core, for
        both stores). Refuses keys wrapped by another KEK (naming them) and a new KEK that cannot
        unwrap what it wrapped; nothing is written here."""
        foreign: dict[str, int] = {}
        for _, _, kid in (*meta, *subj):
            if kid != old.key_id:
                foreign[kid] = foreign.get(kid, 0) + 1
        if foreign:
            listed = ", ".join(f"{k} ({n} keys)" for k, n in sorted(foreign.items()))
            raise KeyManagementError(
                f"cannot rotate key store {self._path}: keys are wrapped by KEK {listed}, "
                f"not by the current KEK {old.key_id}",
                hint="open the store with the KEK that wrapped them",
                store_kek_ids=sorted(foreign),
                kek_id=old.key_id,
            )
        aads = [_META_AAD + n.encode("utf-8") for n, _, _ in meta]
        aads += [_DEK_AAD + t.encode("utf-8") for t, _, _ in subj]
        names = [f"system key {n!r}" for n, _, _ in meta] + [f"data key of subject {t}" for t, _, _ in subj]
        keys = self._unwrap_all(old, [r[1] for r in meta] + [r[1] for r in subj], aads, names)
        try:
            rewrapped = new_kek.wrap_many(keys, aads)
            if len(rewrapped) != len(keys):
                raise KeyManagementError(f"KEK {new_kek.key_id} returned {len(rewrapped)} wrapped keys for {len(keys)}")
            if keys:
                try:
                    ok = new_kek.unwrap(rewrapped[0], aads[0]) == keys[0]
                except DecryptionError:
                    ok = False
                if not ok:
                    raise KeyManagementError(
                        f"new KEK {new_kek.key_id} does not unwrap what it wrapped; rotation aborted, nothing changed"
                    )
        finally:
            for k in keys:
                hazmat.forget(k)
        return rewrapped

    def rotate_kek(self, new_kek: KeyEncryptionKey) -> int:
        """Rewrap every key with ``new_kek`` in one transaction; return how many were rewrapped.

        Data ciphertexts are untouched (DEKs do not change). Afterwards the
        store uses ``new_kek`` and a VACUUM removes the old wrapped blobs. Keep
        the old KEK until every backup of the key store made before the
        rotation has expired.

        Raises:
            KeyManagementError: some keys are wrapped by a KEK other than the
                current one (names the ids), ``new_kek`` is the current KEK, or
                ``new_kek`` cannot unwrap what it just wrapped. Nothing is changed.
        """
        if not isinstance(new_kek, KeyEncryptionKey):
            raise TypeError(f"new_kek must be a KeyEncryptionKey, got {type(new_kek).__name__}")
        old = self._kek
        if new_kek.key_id == old.key_id:
            raise KeyManagementError(f"KEK {old.key_id} is already the current KEK of key store {self._path}; nothing to rotate")
        with self._lock:
            with self._tx(write=True) as c:
                meta = c.execute("SELECT name, wrapped, kek_id FROM meta").fetchall()
                if self._in_runs():
                    blocks = list(layout.blocks(c))
                    live = list(layout.rows_of(blocks))
                    tokens = wire.derived_tokens(self._token_key() or b"", [i for i, _, _ in live])
                    subj = [(t, w, k) for t, (_, w, k) in zip(tokens, live)]
                else:
                    rows = c.execute("SELECT token, wrapped_dek, kek_id, rowid FROM subjects").fetchall()
                    subj = [r[:3] for r in rows]
                rewrapped = self._rewrapped(old, new_kek, meta, subj)
                nm = len(meta)
                c.executemany(
                    "UPDATE meta SET wrapped=?, kek_id=? WHERE name=?",
                    zip(rewrapped[:nm], repeat(new_kek.key_id), (r[0] for r in meta)),
                )
                if self._in_runs():
                    c.executemany("UPDATE keyblocks SET wrapped=?, kek_id=? WHERE first_id=?",
                                  layout.rewrapped_blocks(blocks, dict(zip((i for i, _, _ in live), rewrapped[nm:])),
                                                          new_kek.key_id))
                else:
                    c.executemany(
                        "UPDATE subjects SET wrapped_dek=?, kek_id=? WHERE rowid=?",
                        zip(rewrapped[nm:], repeat(new_kek.key_id), (r[3] for r in rows)),
                    )
            self._kek = new_kek
            self._clear_caches()
            self._vacuum()
        return len(rewrapped)

    # ------------------------------------------------------------------ housekeeping

    def stats(self) -> dict[str, Any]:
        """``{"subjects": live keys, "shredded": tombstones, "kek_id": current KEK}``."""
        with self._tx(write=False) as c:
            subjects = layout.count(c) if self._in_runs() else c.execute("SELECT count(*) FROM subjects").fetchone()[0]
            shredded = c.execute("SELECT count(*) FROM shredded").fetchone()[0]
        return {"subjects": subjects, "shredded": shredded, "kek_id": self._kek.key_id}

    def close(self) -> None:
        """Forget every unwrapped key and close the file (idempotent)."""
        with self._lock:
            self._clear_caches()
            self._tkey = None
            self._runs = layout.Runs()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                from governance.keys import native

                native.release_connections()  # the native core's kept connections (a no-op when none)

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"KeyStore(path={str(self._path)!r}, kek_id={self._kek.key_id!r}, {state})"
