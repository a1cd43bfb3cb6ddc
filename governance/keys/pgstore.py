"""The key store on PostgreSQL: one store a cluster's workers share (issue #17).

The same interface and the same wire formats as the SQLite store (:class:`KeyStore`): tokens are
the keyed permutation of row ids (schema version 2), every wrapped key is bound to its row by
the wrapping AAD, unwrapped keys live only in process memory. The SQLite file stays the laptop
default; ``keys.store: postgresql://user@host:port/db`` selects this one. The password never
sits in the DSN (refused): it comes from ``PGPASSWORD`` or a ``~/.pgpass`` file, as for ``psql``.
The tables live in their own schema (``lakewarden`` unless the DSN says ``?options=...``).

**In transit** (issue #19). The DSN says how the connection is protected, as for ``psql``:
``?sslmode=verify-full&sslrootcert=/path/ca.pem`` encrypts and checks that the server's
certificate is signed by that CA and names the DSN's host (``verify-ca``: the CA only). Any other
``sslmode`` (none, ``prefer``, even ``require``, which encrypts but does not check whom it talks
to) is plaintext as far as Lakewarden is concerned: with ``auth.enabled`` on, a store opened with
the workspace's ``config`` refuses it before connecting (:class:`~governance.tls.PlaintextRefused`,
exit 2); in laptop mode it stays allowed. A TLS failure (an untrusted CA, a host name the
certificate does not carry, a server that rejects connections without TLS) is a
:class:`KeyManagementError` that names the server and the cause.

**When a shred is final.** PostgreSQL does not destroy a deleted row: its bytes stay in the
table's heap until the page is reused, in the write-ahead log until the segment is recycled and
overwritten, and in every base backup, WAL archive and replica. So a shred here cannot rely on
the row's bytes being gone. It relies on the KEK generation instead:

1. every data key is stored wrapped under the KEK generation current when it was written (its
   ``kek_id`` is on the row);
2. a shred deletes the row (and its blind index): from then on no query returns the key;
3. :meth:`rotate_kek` (``lakewarden keys rotate``) retires a generation: it rewraps every *live*
   key under the new KEK in one transaction, then ``VACUUM FULL`` rewrites the tables so no live
   heap page holds an old-generation blob;
4. the operator then destroys the old KEK (deletes the key file, or schedules the KMS key
   version's destruction). Every residual copy of a shredded key — heap, WAL, backups — is
   wrapped under that generation and can no longer be opened.

The shred is final at step 4, so the rotation interval must be shorter than the erasure
deadline (a month under GDPR). ``tests/test_pgstore.py`` shows the residual copy in the
database's own files before the rotation (it opens with the old KEK), and that after it no copy
in those files opens with the KEK that remains.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from governance.errors import KeyManagementError
from governance.keys import hazmat, wire
from governance.keys.kek import KeyEncryptionKey
from governance.keys.store import _DEK_AAD, BLIND_INDEX_KEY, TOKEN_KEY, KeyStore

# This store's own schema version: its tables have not changed since the SQLite store's schema 3
# (tokens made from row ids; the SQLite store's schema 4 is a change of its own files only).
SCHEMA_VERSION = 3

if TYPE_CHECKING:
    import pyarrow as pa

    from governance.config import ProjectConfig

SCHEMES = ("postgresql", "postgres")
_SCHEMA_NAME = "lakewarden"

_DDL = f"""
CREATE SCHEMA IF NOT EXISTS {_SCHEMA_NAME};
CREATE TABLE IF NOT EXISTS {_SCHEMA_NAME}.store_info(
    version    integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {_SCHEMA_NAME}.meta(
    name       text PRIMARY KEY,
    wrapped    bytea NOT NULL,
    kek_id     text NOT NULL,
    created_at text NOT NULL
);
CREATE TABLE IF NOT EXISTS {_SCHEMA_NAME}.subjects(
    id          bigserial PRIMARY KEY,
    token       text NOT NULL,
    blind_index bytea NOT NULL UNIQUE,
    wrapped_dek bytea NOT NULL,
    kek_id      text NOT NULL,
    created_at  text NOT NULL
);
CREATE TABLE IF NOT EXISTS {_SCHEMA_NAME}.shredded(
    token       text PRIMARY KEY,
    shredded_at text NOT NULL
)
"""


def is_dsn(store: str) -> bool:
    """Whether ``keys.store`` names a PostgreSQL database rather than an SQLite file."""
    return urlparse(str(store)).scheme.lower() in SCHEMES


def check_dsn(dsn: str) -> str:
    """The DSN, or an error naming what is wrong (a password in it, no database name)."""
    from governance.config import dsn_problem

    problem = dsn_problem(dsn)
    if problem:
        raise KeyManagementError(problem)
    return dsn


def redacted(dsn: str) -> str:
    """The DSN without its query (and never a password): what messages and reports name."""
    u = urlparse(dsn)
    host = u.hostname or ""
    port = f":{u.port}" if u.port else ""
    user = f"{u.username}@" if u.username else ""
    return f"{u.scheme}://{user}{host}{port}{u.path}"


VERIFIED_SSLMODES = ("verify-full", "verify-ca")


def verifies_server(dsn: str) -> bool:
    """Whether the DSN asks for TLS that checks the server's certificate (``sslmode=verify-full`` or
    ``verify-ca``). No ``sslmode``, ``prefer`` or ``require`` (encrypted, but to anyone) count as
    plaintext; a DSN that names ``sslmode`` more than once must verify in every one."""
    modes = parse_qs(urlparse(dsn).query).get("sslmode", [])
    return bool(modes) and all(m in VERIFIED_SSLMODES for m in modes)


_TLS_HINT = ("add ?sslmode=verify-full&sslrootcert=/path/to/ca.pem to keys.store (the CA certificate that signed "
             "the server's; LocalPostgres writes it as ca.pem in its folder)")


def refuse_unverified(dsn: str, config: "ProjectConfig") -> None:
    """With ``auth.enabled`` on, refuse a DSN that does not verify the server (before any connection).

    Raises:
        PlaintextRefused: auth is on and ``sslmode`` is not ``verify-full`` or ``verify-ca``.
    """
    if not verifies_server(dsn):
        from governance.tls import refuse_plaintext

        refuse_plaintext(config, "the key store's PostgreSQL", redacted(dsn), hint=_TLS_HINT)


def _connect_failure(where: str, exc: Exception) -> KeyManagementError:
    """A connection error as a message naming the server and, for TLS, the cause and what to do."""
    text = str(exc).strip()
    low = text.lower()
    if "certificate verify failed" in low:
        return KeyManagementError(
            f"cannot open key store {where}: the server's TLS certificate is not signed by a CA this client trusts",
            hint="set sslrootcert in keys.store to the CA certificate that signed the server's")
    if "does not match host name" in low:
        return KeyManagementError(
            f"cannot open key store {where}: the server's TLS certificate does not name this host "
            f"({text.rsplit('failed:', 1)[-1].strip()})",
            hint="connect by a name or address the certificate carries, or have it reissued for this one")
    if "root certificate file" in low and ("does not exist" in low or "could not" in low):
        return KeyManagementError(
            f"cannot open key store {where}: the CA certificate to verify the server by cannot be read "
            f"({text.rsplit('failed:', 1)[-1].splitlines()[0].strip()})",
            hint="set sslrootcert in keys.store to the CA certificate file that signed the server's")
    if "no encryption" in low and "pg_hba.conf" in low:
        return KeyManagementError(
            f"cannot open key store {where}: the server accepts only TLS connections (pg_hba.conf rejects one without)",
            hint=_TLS_HINT)
    if "server does not support ssl" in low:
        return KeyManagementError(
            f"cannot open key store {where}: the server does not speak TLS, and the DSN requires it",
            hint="turn ssl on in the server's configuration")
    return KeyManagementError(f"cannot open key store {where}: {text}")


class _Conn:
    """The few calls the shared :class:`KeyStore` code makes on a connection (``execute`` with
    ``?`` placeholders, ``executemany``), on a psycopg cursor."""

    def __init__(self, cur: Any) -> None:
        self._cur = cur

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        self._cur.execute(sql.replace("?", "%s"), params)
        return self._cur

    def executemany(self, sql: str, rows: Any) -> Any:
        self._cur.executemany(sql.replace("?", "%s"), list(rows))
        return self._cur


class PgKeyStore(KeyStore):
    """Per-subject data keys and system keys, wrapped by a KEK, in a PostgreSQL database.

    Args:
        dsn: ``postgresql://user@host:port/db`` (no password: ``PGPASSWORD`` or ``~/.pgpass``);
            ``?sslmode=verify-full&sslrootcert=ca.pem`` for TLS that checks the server.
        kek, clock, cache_size: as for :class:`KeyStore`.
        config: the workspace's configuration. With ``auth.enabled`` on, a DSN that does not verify
            the server (:func:`verifies_server`) is refused before connecting. None (a library
            caller, a benchmark): no such check.

    Raises:
        PlaintextRefused: ``config.auth.enabled`` and a DSN without ``verify-full``/``verify-ca``.
        KeyManagementError: a password in the DSN; the server cannot be reached or TLS fails (the
            message names the server and the cause); the store's schema or KEK does not match.
    """

    def __init__(
        self,
        dsn: str,
        kek: KeyEncryptionKey,
        *,
        clock: Callable[[], datetime] | None = None,
        cache_size: int = 262_144,
        config: "ProjectConfig | None" = None,
    ) -> None:
        self._dsn = check_dsn(dsn)
        self._path = redacted(dsn)  # type: ignore[assignment]  # named in messages; holds no secret
        if config is not None:
            refuse_unverified(self._dsn, config)
        self._open(kek, clock, cache_size)

    # ------------------------------------------------------------------ plumbing

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:  # pragma: no cover - a dependency of the project
            raise KeyManagementError("a PostgreSQL key store needs psycopg (pip install 'psycopg[binary]')") from None
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise _connect_failure(self._path, exc) from None  # type: ignore[arg-type]
        return conn

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[_Conn]:  # type: ignore[override]
        """One transaction on the shared connection (one thread at a time). Writers that race on
        the same subject are resolved by the unique blind index (``ON CONFLICT``)."""
        import psycopg

        conn = self._db()
        with self._lock:
            try:
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(f"SET LOCAL search_path TO {_SCHEMA_NAME}")
                    yield _Conn(cur)
            except psycopg.Error as exc:
                raise KeyManagementError(f"key store {self._path}: {str(exc).strip()}") from exc

    def _vacuum(self) -> None:
        import psycopg

        try:
            with self._db().cursor() as cur:
                cur.execute(f"VACUUM FULL {_SCHEMA_NAME}.meta, {_SCHEMA_NAME}.subjects")
        except psycopg.Error as exc:
            raise KeyManagementError(
                f"key store {self._path}: the change is committed, but VACUUM FULL failed: {str(exc).strip()}",
                hint="run KeyStore.vacuum() again as the tables' owner",
            ) from exc

    def _init_schema(self) -> None:
        with self._tx(write=True) as c:
            c.execute("SELECT pg_advisory_xact_lock(hashtext('lakewarden.keystore.schema'))")
            for stmt in _DDL.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT version FROM store_info").fetchone()
            if row is None:
                c.execute("INSERT INTO store_info(version) VALUES (?)", (SCHEMA_VERSION,))
                version = SCHEMA_VERSION
            else:
                version = row[0]
        if version > SCHEMA_VERSION:
            raise KeyManagementError(
                f"key store {self._path} has schema version {version}; this Lakewarden reads up to {SCHEMA_VERSION}",
                hint="upgrade Lakewarden",
            )
        self._version = version

    def _unwrap_deks(self, rows: list[tuple[str, bytes, str]]) -> list[bytes]:
        return super()._unwrap_deks([(t, bytes(b), k) for t, b, k in rows])

    # ------------------------------------------------------------------ subjects

    def _in_runs(self) -> bool:
        return False  # this store keeps a row per subject (its own schema, SCHEMA_VERSION here)

    def _native_bulk(self) -> bool:
        return False  # the native core's bulk path speaks SQLite; this store's own _resolve is the bulk path

    def _resolve(self, key: bytes, ids: "pa.Array", *, create: bool, keys: bool) -> list[tuple[str, bytes] | None]:
        """Per id, ``(token, data key or b"")`` or None (as :meth:`KeyStore._resolve`).

        Each column goes to the server as one value (fixed-width values packed in one ``bytea``
        or ``text``, sliced there with ``generate_series``): binding a 100k-element array costs
        more in the driver than the statement does in the server. New subjects are inserted with
        ``ON CONFLICT (blind_index) DO NOTHING``: a subject a concurrent writer created first is
        read back instead, so every subject has one key whoever asks."""
        from governance.keys import native

        bis = native.fixed(native.blind_indexes(key, ids), 32)
        unique = sorted(set(bis))  # sorted: concurrent writers take the index's locks in one order
        cols = "s.blind_index, s.token, s.wrapped_dek, s.kek_id" if keys else "s.blind_index, s.token"
        found: dict[bytes, tuple[str, bytes]] = {}

        def read(c: _Conn, wanted: list[bytes]) -> None:
            rows = c.execute(
                f"SELECT {cols} FROM generate_series(0, %s - 1) AS g(i) "
                "JOIN subjects s ON s.blind_index = substring(%b::bytea FROM g.i * 32 + 1 FOR 32)",
                (len(wanted), b"".join(wanted)),
            ).fetchall()
            if keys:
                deks = self._unwrap_deks([(r[1], r[2], r[3]) for r in rows])
                found.update((bytes(r[0]), (r[1], d)) for r, d in zip(rows, deks))
            else:
                found.update((bytes(r[0]), (r[1], b"")) for r in rows)

        with self._lock, self._tx(write=create) as c:
            read(c, unique)
            if create and len(found) < len(unique):
                missing = [b for b in unique if b not in found]
                n = len(missing)
                row_ids = sorted(r[0] for r in c.execute(
                    "SELECT nextval('subjects_id_seq') FROM generate_series(1, %s::bigint)", (n,)
                ).fetchall())
                tokens = wire.derived_tokens(self._token_key(), row_ids)  # type: ignore[arg-type]
                deks = native.fixed(os.urandom(hazmat.KEY_SIZE * n), hazmat.KEY_SIZE)
                wrapped = self._kek.wrap_many(deks, [_DEK_AAD + t.encode("ascii") for t in tokens])
                if len(wrapped) != n:
                    raise KeyManagementError(f"KEK {self._kek.key_id} returned {len(wrapped)} wrapped keys for {n}")
                width = len(wrapped[0])
                if any(len(w) != width for w in wrapped):  # a KEK plugin with variable-length blobs
                    raise KeyManagementError(f"KEK {self._kek.key_id} wrapped keys to blobs of different lengths")
                inserted = {
                    bytes(r[0]) for r in c.execute(
                        "INSERT INTO subjects(id, token, blind_index, wrapped_dek, kek_id, created_at) "
                        "SELECT u.id, convert_from(substring(%b::bytea FROM (u.k::int - 1) * 30 + 1 FOR 30), 'UTF8'), "
                        "substring(%b::bytea FROM (u.k::int - 1) * 32 + 1 FOR 32), "
                        "substring(%b::bytea FROM (u.k::int - 1) * %s::int + 1 FOR %s::int), %s, %s "
                        "FROM unnest(CAST(string_to_array(%s, ',') AS bigint[])) WITH ORDINALITY AS u(id, k) "
                        "ORDER BY u.k ON CONFLICT (blind_index) DO NOTHING RETURNING blind_index",
                        ("".join(tokens).encode("ascii"), b"".join(missing), b"".join(wrapped), width, width,
                         self._kek.key_id, self._now(), ",".join(map(str, row_ids))),
                    ).fetchall()
                }
                found.update((b, (t, d)) for b, t, d in zip(missing, tokens, deks) if b in inserted)
                lost = [b for b in missing if b not in inserted]  # created meanwhile by another writer
                if lost:
                    read(c, lost)
        return [found.get(b) for b in bis]

    # ------------------------------------------------------------------ destructive verbs

    def destroy_system_key(self, name: str) -> bool:
        """Delete the system key ``name`` (e.g. a request's throw-away key). As for a shred, its
        residual copies become unreadable when the KEK generation is retired; no VACUUM FULL here
        (it would lock and rewrite the whole store for one row)."""
        if not isinstance(name, str) or not name or "\x00" in name:
            raise ValueError(f"system key name must be a non-empty string without NUL, got {name!r}")
        if name in (BLIND_INDEX_KEY, TOKEN_KEY, "audit-signing"):
            raise ValueError(f"system key {name!r} is structural and cannot be destroyed")
        with self._lock:
            self._system.pop(name, None)
            with self._tx(write=True) as c:
                n = c.execute("DELETE FROM meta WHERE name=?", (name,)).rowcount
        return bool(n)

    def shred_many(self, tokens: Any) -> int:
        """Shred several subjects in one transaction; return how many were destroyed. The row is
        deleted at once; its residual copies (heap, WAL, backups) become unreadable when its KEK
        generation is retired (:meth:`rotate_kek`, then destroying the old KEK)."""
        from governance.keys.store import _check_token

        todo = list(dict.fromkeys(_check_token(t) for t in tokens))
        if not todo:
            return 0
        with self._lock:
            deleted: list[str] = []
            try:
                with self._tx(write=True) as c:
                    ids = [r[1] for r in self._by_tokens(c, "id", todo)]
                    if ids:
                        deleted = [r[0] for r in c.execute(
                            "DELETE FROM subjects WHERE id = ANY(?) RETURNING token", (ids,)
                        ).fetchall()]
                    if deleted:
                        c.execute(
                            "INSERT INTO shredded(token, shredded_at) SELECT t, ? FROM unnest(?::text[]) AS t "
                            "ON CONFLICT (token) DO NOTHING",
                            (self._now(), deleted),
                        )
            finally:
                for t in todo:
                    self._drop_cached(t)
        return len(deleted)

    def _mostly_free(self) -> bool:
        return False  # PostgreSQL reuses the space itself; finality comes from retiring the KEK generation

    def rotate_kek(self, new_kek: KeyEncryptionKey) -> int:
        """Retire the current KEK generation: rewrap every live key under ``new_kek`` in one
        transaction, then ``VACUUM FULL``. Destroy the old KEK afterwards: that is what makes the
        residual copies of shredded keys (heap, WAL, backups) unreadable. Same errors as
        :meth:`KeyStore.rotate_kek`; nothing changes on error."""
        if not isinstance(new_kek, KeyEncryptionKey):
            raise TypeError(f"new_kek must be a KeyEncryptionKey, got {type(new_kek).__name__}")
        old = self._kek
        if new_kek.key_id == old.key_id:
            raise KeyManagementError(f"KEK {old.key_id} is already the current KEK of key store {self._path}; nothing to rotate")
        with self._lock:
            with self._tx(write=True) as c:
                c.execute("LOCK TABLE meta, subjects IN EXCLUSIVE MODE")
                meta = [(n, bytes(w), k) for n, w, k in c.execute("SELECT name, wrapped, kek_id FROM meta").fetchall()]
                rows = [(t, bytes(w), k, i) for t, w, k, i in
                        c.execute("SELECT token, wrapped_dek, kek_id, id FROM subjects").fetchall()]
                rewrapped = self._rewrapped(old, new_kek, meta, [r[:3] for r in rows])
                nm = len(meta)
                if meta:
                    c.execute(
                        "UPDATE meta SET wrapped = u.w, kek_id = ? FROM unnest(?::text[], ?::bytea[]) AS u(n, w) "
                        "WHERE meta.name = u.n",
                        (new_kek.key_id, [m[0] for m in meta], rewrapped[:nm]),
                    )
                if rows:
                    c.execute(
                        "UPDATE subjects SET wrapped_dek = u.w, kek_id = ? FROM unnest(?::bigint[], ?::bytea[]) AS u(i, w) "
                        "WHERE subjects.id = u.i",
                        (new_kek.key_id, [r[3] for r in rows], rewrapped[nm:]),
                    )
            self._kek = new_kek
            self._clear_caches()
            self._tkey = self._system_key(TOKEN_KEY, create=False)
            self._vacuum()
        return len(rewrapped)

    # ------------------------------------------------------------------ housekeeping

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"PgKeyStore(dsn={self._path!r}, kek_id={self._kek.key_id!r}, {state})"
