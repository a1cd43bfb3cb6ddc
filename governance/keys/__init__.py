"""Envelope encryption with per-subject data keys, and crypto-shredding.

Recipes first: :class:`KeyRing` seals and opens values with AES-256-GCM under
the subject's own data key (DEK), bound by associated data to the dataset,
column and subject token. DEKs are wrapped by a key-encryption key (KEK) and
kept in a :class:`KeyStore` that is never versioned. Shredding a subject
destroys its DEK, so every copy of its ciphertexts (Delta history, DVC cache,
backups) becomes unreadable at once. Raw primitives live in
:mod:`governance.keys.hazmat`; do not use them for data.

Example::

    from governance.keys import KeyRing, KeyStore, load_kek

    kek = load_kek("env", var="LAKEWARDEN_KEK")
    with KeyRing(KeyStore(".lakewarden/keystore.db", kek)) as ring:
        token = ring.token_for("alice@example.com")
        blob = ring.seal("alice@example.com", token=token, dataset="vault", column="email")
        assert ring.open(blob, token=token, dataset="vault", column="email") == b"alice@example.com"
        ring.shred(token)   # ring.open(...) now raises SubjectShredded

Ciphertext format (version 1)::

    0x01 || nonce (12) || ciphertext || tag (16)
    AAD = b"lakewarden:v1\\x00" + dataset + b"\\x00" + column + b"\\x00" + token

Errors (all :class:`~governance.errors.KeyManagementError`):
``DecryptionError`` — invalid, tampered, or bound to another dataset, column or
subject (deliberately opaque); ``SubjectShredded`` — the subject's key was
destroyed; ``KekUnavailable`` — the KEK cannot be loaded. Caller mistakes
(wrong types, empty names) are ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag

from governance.errors import DecryptionError
from governance.keys import hazmat, wire
from governance.keys.kek import (
    KeyEncryptionKey,
    LocalKek,
    generate_kek_b64,
    generate_kek_file,
    kek_from_env,
    kek_from_file,
    kek_from_plugin,
    load_kek,
)
from governance.keys.store import TOKEN_RE, KeyStore, SubjectKeys

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "TOKEN_RE",
    "KeyEncryptionKey",
    "KeyRing",
    "KeyStore",
    "SubjectKeys",
    "LocalKek",
    "generate_kek_b64",
    "generate_kek_file",
    "kek_from_env",
    "kek_from_file",
    "kek_from_plugin",
    "load_kek",
]

FORMAT_VERSION = wire.FORMAT_VERSION
_VERSION_BYTE = wire.VERSION_BYTE
_NONCE = hazmat.NONCE_SIZE
_MIN_LEN = 1 + hazmat.NONCE_SIZE + hazmat.TAG_SIZE
_BATCH = 65536  # values per nonce draw in seal_many


_aad_prefix = wire.value_aad_prefix  # the one definition of the wire format (governance/keys/wire.py)


def _plain(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"value to seal must be bytes or str, got {type(value).__name__}")


def _token(token: object) -> str:
    if not isinstance(token, str):
        raise TypeError(f"subject token must be str, got {type(token).__name__}")
    return token


class KeyRing:
    """Seal and open values under per-subject keys; shred subjects; rotate the KEK.

    Args:
        store: the :class:`KeyStore` holding the wrapped keys. The ring holds no
            keys of its own, so a shred through the store takes effect here too.
    """

    def __init__(self, store: KeyStore) -> None:
        if not isinstance(store, KeyStore):
            raise TypeError(f"store must be a KeyStore, got {type(store).__name__}")
        self._store = store

    @property
    def store(self) -> KeyStore:
        return self._store

    # ------------------------------------------------------------------ tokens

    def token_for(self, subject_id: str, *, create: bool = True) -> str | None:
        """The subject's pseudonymous token (see :meth:`KeyStore.token_for`)."""
        return self._store.token_for(subject_id, create=create)

    def tokens_for(self, subject_ids: Sequence[str], *, create: bool = True) -> list[str | None]:
        """Batched :meth:`token_for` (see :meth:`KeyStore.tokens_for`)."""
        return self._store.tokens_for(subject_ids, create=create)

    def system_key(self, name: str) -> bytes:
        """A 32-byte system key (e.g. "audit-signing"), created on first use."""
        return self._store.system_key(name)

    # ------------------------------------------------------------------ seal / open

    def seal(self, plaintext: bytes | str, *, token: str, dataset: str, column: str) -> bytes:
        """Encrypt ``plaintext`` for the subject ``token``, bound to ``dataset``/``column``.

        Raises:
            SubjectShredded: the subject was shredded.
            KeyManagementError: unknown token.
        """
        data = _plain(plaintext)
        aad = _aad_prefix(dataset, column) + _token(token).encode("utf-8")
        return _VERSION_BYTE + hazmat.aesgcm_seal(self._store.dek(token), data, aad)

    def open(self, blob: bytes, *, token: str, dataset: str, column: str) -> bytes:
        """Decrypt a value from :meth:`seal`; the same token, dataset and column are required.

        Raises:
            SubjectShredded: the subject was shredded.
            DecryptionError: invalid, tampered, or sealed for another
                dataset, column or subject.
            KeyManagementError: unknown token.
        """
        aad = _aad_prefix(dataset, column) + _token(token).encode("utf-8")
        dek = self._store.dek(token)
        return _open_one(hazmat.cipher(dek), blob, aad)

    def seal_many(
        self,
        values: Sequence[bytes | str | None],
        tokens: Sequence[str | None],
        *,
        dataset: str,
        column: str,
    ) -> list[bytes | None]:
        """Seal ``values[i]`` for ``tokens[i]``; None values stay None.

        Raises:
            ValueError: lengths differ, or a non-None value has no token.
            SubjectShredded / KeyManagementError: as :meth:`seal`.
        """
        if len(values) != len(tokens):
            raise ValueError(f"seal_many: {len(values)} values but {len(tokens)} tokens")
        return self.seal_columns({column: values}, tokens, dataset=dataset)[column]

    def seal_columns(
        self,
        columns: dict[str, Sequence[bytes | str | None]],
        tokens: Sequence[str | None],
        *,
        dataset: str,
    ) -> dict[str, list[bytes | None]]:
        """Seal several columns of the same rows at once: each subject's key is fetched and its
        cipher built once for all columns (what ingest does for a batch). None stays None.

        Raises:
            ValueError: a column's length differs from the tokens', or a value has no token.
            SubjectShredded / KeyManagementError: as :meth:`seal`.
        """
        n = len(tokens)
        for name, vals in columns.items():
            if len(vals) != n:
                raise ValueError(f"seal_columns: column {name!r} has {len(vals)} values but there are {n} tokens")
        prefixes = {name: _aad_prefix(dataset, name) for name in columns}
        needed: dict[str, None] = {}
        for i, t in enumerate(tokens):
            if any(vals[i] is not None for vals in columns.values()):
                if t is None:
                    raise ValueError(f"value at position {i} has no subject token")
                needed[t] = None
        deks = self._store.deks(needed)
        # Many distinct subjects (an ingest of new people): build ciphers without caching them.
        keep = len(deks) <= 4096
        ciphers = {t: (hazmat.cipher(d, cache=keep), _token(t).encode("utf-8")) for t, d in deks.items()}
        out: dict[str, list[bytes | None]] = {name: [] for name in columns}
        ver = _VERSION_BYTE
        cols = [(prefixes[name], columns[name], out[name].append) for name in columns]
        for start in range(0, n, _BATCH):
            stop = min(start + _BATCH, n)
            nonces = os.urandom(_NONCE * (stop - start) * len(cols))
            j = 0
            for i in range(start, stop):
                t = tokens[i]
                ct = ciphers.get(t) if t is not None else None
                for prefix, vals, append in cols:
                    v = vals[i]
                    if v is None:
                        append(None)
                        continue
                    if type(v) is str:
                        v = v.encode("utf-8")
                    elif type(v) is not bytes:
                        v = _plain(v)
                    nonce = nonces[j : j + _NONCE]
                    j += _NONCE
                    append(ver + nonce + ct[0].encrypt(nonce, v, prefix + ct[1]))  # type: ignore[index]
        return out

    def seal_arrow(
        self,
        columns: Mapping[str, pa.Array],
        subjects: SubjectKeys,
        key_index: pa.Array,
        *,
        dataset: str,
    ) -> dict[str, pa.Array]:
        """Seal whole Arrow columns (string or binary): row ``i`` for subject ``key_index[i]`` of
        ``subjects`` (from :meth:`KeyStore.subject_keys` with ``keys=True``). Null stays null.

        The same bytes as :meth:`seal_columns`, made by the native core when it is built (no
        Python per value, both cores), else by the pure-Python reference.

        Raises:
            ValueError: a non-null value has no subject, or lengths differ.
        """
        from governance.keys import native  # Arrow and the native core load on first use, not at import

        if subjects.keys is None:
            raise ValueError("seal_arrow needs the subjects' data keys: KeyStore.subject_keys(..., keys=True)")
        return native.seal_columns(
            subjects.keys, key_index, subjects.tokens,
            {name: (_aad_prefix(dataset, name), values) for name, values in columns.items()},
        )

    def open_arrow(self, blobs: pa.Array, tokens: pa.Array, *, dataset: str, column: str) -> pa.Array:
        """Open a whole column of sealed values (binary out); ``tokens[i]`` is row ``i``'s subject.

        Raises:
            SubjectShredded / KeyManagementError: as :meth:`open`, for the first such subject.
            DecryptionError: a value does not open for its dataset, column and subject.
        """
        return self._open_columns({column: blobs}, tokens, dataset=dataset, single=True)[column]

    def open_arrow_columns(self, columns: "Mapping[str, pa.Array]", tokens: pa.Array, *,
                           dataset: str) -> "dict[str, pa.Array]":
        """:meth:`open_arrow` of several sealed columns of the same rows: each subject's data key is
        looked up and unwrapped once for all of them, not once per column (same errors)."""
        return self._open_columns(columns, tokens, dataset=dataset, single=False)

    def _open_columns(self, columns: "Mapping[str, pa.Array]", tokens: pa.Array, *, dataset: str,
                      single: bool) -> "dict[str, pa.Array]":
        import pyarrow.compute as pc

        from governance.keys import native

        tokens = native.one_array(tokens)
        cols = {c: native.one_array(b) for c, b in columns.items()}
        if not cols:
            return {}
        valid = None
        for c, b in cols.items():
            if len(b) != len(tokens):
                raise ValueError(f"open_arrow: {len(b)} blobs but {len(tokens)} tokens" if single else
                                 f"open_arrow_columns: column {c} has {len(b)} blobs but there are {len(tokens)} tokens")
            orphan = pc.and_(pc.is_valid(b), pc.is_null(tokens))
            if pc.any(orphan).as_py():
                where = "" if single else f" of {c}"
                raise ValueError(f"value at position {pc.index(orphan, True).as_py()}{where} has no subject token")
            valid = pc.is_valid(b) if valid is None else pc.or_(valid, pc.is_valid(b))
        needed = pc.unique(tokens.filter(valid).drop_null())
        uniq = needed.to_pylist()
        deks = self._store.deks(uniq)
        keys = b"".join(deks[t] for t in uniq)
        idx = pc.index_in(tokens, value_set=needed)
        return {c: native.open_column(keys, idx, needed, _aad_prefix(dataset, c), b) for c, b in cols.items()}

    def open_many(
        self,
        blobs: Sequence[bytes | None],
        tokens: Sequence[str | None],
        *,
        dataset: str,
        column: str,
    ) -> list[bytes | None]:
        """Open ``blobs[i]`` for ``tokens[i]``; None blobs stay None.

        Raises:
            ValueError: lengths differ, or a non-None blob has no token.
            SubjectShredded / DecryptionError / KeyManagementError: as :meth:`open`;
            the first failure aborts the batch.
        """
        if len(blobs) != len(tokens):
            raise ValueError(f"open_many: {len(blobs)} blobs but {len(tokens)} tokens")
        if len(blobs) >= _ARROW_MIN and _native_backend() == "native":
            arrays = _as_arrays(blobs, tokens)
            if arrays is not None:
                return self.open_arrow(*arrays, dataset=dataset, column=column).to_pylist()
        prefix = _aad_prefix(dataset, column)
        ciphers = self._ciphers(blobs, tokens, prefix)
        out: list[bytes | None] = []
        append = out.append
        for b, t in zip(blobs, tokens):
            if b is None:
                append(None)
            else:
                c, aad = ciphers[t]
                append(_open_one(c, b, aad))
        return out

    def _ciphers(
        self, values: Sequence[Any], tokens: Sequence[str | None], prefix: bytes
    ) -> dict[str, tuple[Any, bytes]]:
        """``{token: (AESGCM, aad)}`` for each distinct token with a non-None value; keys fetched in bulk."""
        needed = dict.fromkeys(t for v, t in zip(values, tokens) if v is not None)
        if None in needed:
            i = next(i for i, (v, t) in enumerate(zip(values, tokens)) if v is not None and t is None)
            raise ValueError(f"value at position {i} has no subject token")
        deks = self._store.deks(needed)
        return {t: (hazmat.cipher(d), prefix + t.encode("utf-8")) for t, d in deks.items()}

    # ------------------------------------------------------------------ system-key sealing

    def seal_system(self, name: str, plaintext: bytes | str, *, dataset: str, column: str) -> bytes:
        """Seal data that belongs to no known subject (e.g. a quarantined row without a valid key)
        under the system key ``name``; destroying that key (``shred_system``) destroys it all."""
        aad = wire.system_value_aad(dataset, column, name)
        return _VERSION_BYTE + hazmat.aesgcm_seal(self._store.system_key(name), _plain(plaintext), aad)

    def open_system(self, name: str, blob: bytes, *, dataset: str, column: str) -> bytes:
        """Open a value from :meth:`seal_system`; raises DecryptionError if the key or binding differ."""
        aad = wire.system_value_aad(dataset, column, name)
        return _open_one(hazmat.cipher(self._store.system_key(name, create=False)), blob, aad)

    # ------------------------------------------------------------------ destructive verbs

    def destroy_system_key(self, name: str) -> bool:
        """Destroy a system key (see :meth:`KeyStore.destroy_system_key`)."""
        return self._store.destroy_system_key(name)

    def shred(self, token: str) -> bool:
        """Destroy the subject's key for good (see :meth:`KeyStore.shred`)."""
        return self._store.shred(token)

    def shred_many(self, tokens: Iterable[str]) -> int:
        """Destroy several subjects' keys in one transaction; return how many."""
        return self._store.shred_many(tokens)

    def rotate_kek(self, new_kek: KeyEncryptionKey) -> int:
        """Rewrap every key with ``new_kek``; data ciphertexts are untouched."""
        return self._store.rotate_kek(new_kek)

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> KeyRing:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"KeyRing({self._store!r})"


_ARROW_MIN = 256  # open_many of at least this many values goes through the native core's whole-column path


def _native_backend() -> str:
    from governance.keys import native

    return native.backend()


def _as_arrays(blobs: Sequence[Any], tokens: Sequence[Any]) -> tuple[pa.Array, pa.Array] | None:
    """Blobs and tokens as Arrow columns; None when a value is of another type (the per-value path
    then raises the precise TypeError)."""
    import pyarrow as pa

    try:
        return pa.array(blobs, pa.binary()), pa.array(tokens, pa.string())
    except (pa.ArrowException, TypeError):
        return None


def _open_one(cipher: Any, blob: object, aad: bytes) -> bytes:
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"ciphertext must be bytes, got {type(blob).__name__}")
    if len(blob) < _MIN_LEN or blob[0] != FORMAT_VERSION:
        raise DecryptionError("ciphertext is invalid (too short or unknown format version)")
    view = memoryview(blob)
    try:
        return cipher.decrypt(view[1 : 1 + _NONCE], view[1 + _NONCE :], aad)
    except InvalidTag:
        raise DecryptionError("ciphertext failed authentication") from None
