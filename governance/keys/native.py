"""The per-value key work on whole Arrow columns: the native core when it is built, else Python.

The native core is the Rust extension ``lakewarden_native`` (``native/`` in the repository,
built by ``make install`` with maturin). It takes Arrow buffers in and gives Arrow buffers out,
releases the GIL and spreads large columns over the cores. Without it (a machine with no Rust
toolchain, or ``LAKEWARDEN_NATIVE=0``) the same functions run on the pure-Python reference
(``cryptography``, ``hmac``): the same bytes, more slowly. The formats are
:mod:`governance.keys.wire`'s; ``tests/test_native_core.py`` checks both backends against the
known answers in ``tests/fixtures/crypto_vectors.json``, and that each opens what the other sealed.

Functions here are primitives for the key store and key ring; they know nothing about subjects'
lifecycles. Use :class:`~governance.keys.KeyRing` for data. One more batch primitive lives here
because it shares the plumbing: :func:`json_records`, the stream decoder's native fast path
(native only; the Python decoder in :mod:`lakehouse.stream` is its reference).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import logging
import os
import platform
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from governance.errors import DecryptionError
from governance.keys import hazmat, wire

# What ``native/.cargo/config.toml`` builds the core for on x86-64 (the x86-64-v3 level, with AES-NI
# and PCLMULQDQ), as Linux names the flags in /proc/cpuinfo. A module built so would stop the
# process with an illegal instruction on a CPU without them, so it is not loaded there.
X86_FLAGS = ("sse4_1", "sse4_2", "ssse3", "popcnt", "avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm",
             "aes", "pclmulqdq")


def missing_cpu_flags(cpuinfo: str | None = None, machine: str | None = None) -> list[str]:
    """The flags of :data:`X86_FLAGS` this x86-64 Linux CPU lacks (``cpuinfo``: the text of
    /proc/cpuinfo, read when None). Empty elsewhere, and where the flags cannot be read."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return []
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = next((line for line in f if line.startswith("flags")), "")
        except OSError:
            return []
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), None)
    if line is None:
        return []
    have = set(line.partition(":")[2].split())
    return [f for f in X86_FLAGS if f not in have]


_BUILT_FOR = re.compile(rb"lakewarden-native-built-for:([a-z0-9+-]{1,64});")


def built_for(module: str = "lakewarden_native") -> str | None:
    """What the installed native module was built for, read from its file without loading it
    (``"x86-64-v3+aes+pclmulqdq"``, or ``"portable"`` for a ``RUSTFLAGS=`` build); None when it
    is not installed or says nothing."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        return None
    origin = Path(spec.origin)
    files = [origin] if origin.suffix in (".so", ".pyd") else sorted(origin.parent.glob(f"{module}*.so"))
    for f in files:
        m = _BUILT_FOR.search(f.read_bytes())
        if m:
            return m.group(1).decode("ascii")
    return None


class _CpuLacks(ImportError):
    """The CPU lacks flags the installed native module was built to use."""


_OFF = os.environ.get("LAKEWARDEN_NATIVE", "1").strip().lower() in ("0", "off", "false", "no")
#: Why the native core is not loaded (None when it is).
WHY_PYTHON: str | None = None
try:
    if _OFF:
        raise ImportError("disabled by LAKEWARDEN_NATIVE")
    if (_missing := missing_cpu_flags()) and built_for() != "portable":
        raise _CpuLacks(f"this CPU lacks {', '.join(_missing)}, which the native core is built for "
                        "(rebuild it portable with RUSTFLAGS= make install)")
    import lakewarden_native as _native  # type: ignore[import-not-found]
except ImportError as exc:
    _native = None
    WHY_PYTHON = str(exc)
    if isinstance(exc, _CpuLacks):
        logging.getLogger(__name__).warning("the native core is not loaded: %s; the pure-Python path is used", exc)

KEY = 32
NONCE = 12
TOKEN_LEN = 30
WRAPPED = NONCE + KEY + 16


def backend() -> str:
    """``"native"`` (the Rust core is loaded) or ``"python"`` (the pure-Python reference)."""
    return "native" if _native is not None else "python"


def _use_native(force: str | None) -> bool:
    if force == "python":
        return False
    if force == "native":
        if _native is None:
            raise RuntimeError("the native core (lakewarden_native) is not built or is disabled")
        return True
    return _native is not None


# ---------------------------------------------------------------------- Arrow plumbing


def one_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``arr`` as one array: a column of one chunk is that chunk (``combine_chunks`` would copy it)."""
    if isinstance(arr, pa.ChunkedArray):
        return arr.chunk(0) if arr.num_chunks == 1 else arr.combine_chunks()
    return arr


def _binary(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``arr`` as a binary array with 32-bit offsets (strings are viewed, not copied)."""
    arr = one_array(arr)
    t = arr.type
    if pa.types.is_string(t):
        return arr.view(pa.binary())
    if pa.types.is_binary(t):
        return arr
    if pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return pc.cast(arr, pa.binary())
    if pa.types.is_null(t):
        return pa.nulls(len(arr), pa.binary())
    raise TypeError(f"expected a string or binary column, got {t}")


def _mv(buf: Any) -> memoryview | None:
    return None if buf is None else memoryview(buf).cast("B")


def _col(arr: pa.Array) -> tuple:
    validity, offsets, data = arr.buffers()
    return (_mv(offsets), _mv(data), _mv(validity) if arr.null_count else None, arr.offset, len(arr))


def _from_parts(typ: pa.DataType, n: int, parts: tuple) -> pa.Array:
    offsets, data, validity, nulls = parts
    bufs = [pa.py_buffer(validity) if validity is not None else None, pa.py_buffer(offsets), pa.py_buffer(data)]
    return pa.Array.from_buffers(typ, n, bufs, null_count=nulls)


def fixed(blob: bytes, width: int) -> list[bytes]:
    """``blob`` cut into ``width``-byte pieces."""
    return [blob[i : i + width] for i in range(0, len(blob), width)]


# ---------------------------------------------------------------------- blind indexes and tokens


def blind_indexes(key: bytes, ids: pa.Array, *, force: str | None = None) -> bytes:
    """The blind indexes of subject ids (stripped as ``str.strip()`` does), ``32 * len(ids)`` bytes.

    Raises:
        ValueError: an id is null, not UTF-8, or empty once stripped (names its position).
    """
    arr = _binary(ids)
    if _use_native(force):
        return _native.blind_indexes(_mv(key), _col(arr))
    stripped = []
    for i, raw in enumerate(arr.to_pylist()):
        if raw is None:
            raise ValueError(f"subject id at position {i} is null")
        try:
            s = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"subject id at position {i} is not valid UTF-8") from None
        if not s:
            raise ValueError(f"subject id at position {i} is empty or whitespace only")
        stripped.append(s)
    return b"".join(wire.blind_indexes(key, stripped))


HASH_HEX = 32  # the `hash` mask: HMAC-SHA256 truncated to 128 bits (RFC 2104 allows half), in hex


def keyed_hashes(key: bytes, values: pa.Array, *, force: str | None = None) -> pa.Array:
    """The ``hash`` mask's values: lowercase hex of HMAC-SHA256 under ``key``, truncated to 128 bits
    (32 characters, as wide as a token), of each value's UTF-8 bytes (as given, not stripped); a
    string array with the input's nulls."""
    arr = _binary(values)
    n = len(arr)
    if _use_native(force):
        flat = _native.keyed_hashes(_mv(key), _col(arr))
    else:
        flat = b"".join(
            b"0" * HASH_HEX if v is None else hmac.new(key, v, hashlib.sha256).hexdigest()[:HASH_HEX].encode("ascii")
            for v in arr.to_pylist()
        )
    offsets = pa.array(np.arange(0, HASH_HEX * (n + 1), HASH_HEX, dtype=np.int32))
    validity = arr.buffers()[0] if arr.null_count else None
    if validity is not None and arr.offset:  # the input is a slice: rebuild its validity from 0
        validity = pc.is_valid(arr).buffers()[1]
    return pa.Array.from_buffers(pa.string(), n, [validity, offsets.buffers()[1], pa.py_buffer(flat)],
                                 null_count=arr.null_count)


def new_tokens(n: int, *, sorted_: bool = False, force: str | None = None) -> list[str]:
    """``n`` new random tokens ("sub_" + 26 base32 characters of 16 random bytes)."""
    if n <= 0:
        return []
    if _use_native(force):
        flat = _native.new_tokens(n, sorted_).decode("ascii")
    else:
        raw = os.urandom(16 * n)
        buf = bytearray(20 * n)  # each 16 bytes padded to 20: one b32encode call for the batch
        for k in range(16):
            buf[k::20] = raw[k::16]
        enc = base64.b32encode(bytes(buf)).decode("ascii").lower()
        toks = [wire.TOKEN_PREFIX + enc[i : i + 26] for i in range(0, 32 * n, 32)]
        return sorted(toks) if sorted_ else toks
    return [flat[i : i + TOKEN_LEN] for i in range(0, TOKEN_LEN * n, TOKEN_LEN)]


# ---------------------------------------------------------------------- the key store's bulk path

_SHARED_SQLITE: bool | None = None


def sqlite_shared() -> bool:
    """Whether the native core calls the very SQLite library instance Python's ``sqlite3`` uses.

    Two copies of SQLite in one process do not see each other's POSIX locks (closing one
    copy's file descriptor drops the other's locks), so the native key-store path runs only when
    ``sqlite3_libversion`` resolves to the same address from both (a Python built with SQLite
    linked in statically gets the Python path).
    """
    global _SHARED_SQLITE
    if _SHARED_SQLITE is None:
        _SHARED_SQLITE = False
        if _native is not None:
            try:
                import ctypes
                import sqlite3

                import _sqlite3

                addr, version = _native.sqlite_library()
                ours = ctypes.cast(ctypes.CDLL(_sqlite3.__file__).sqlite3_libversion, ctypes.c_void_p).value
                _SHARED_SQLITE = ours == addr and version == sqlite3.sqlite_version
            except (OSError, AttributeError, ImportError):
                _SHARED_SQLITE = False
    return _SHARED_SQLITE


def resolve_subjects(db: str, bi_key: bytes, kek: bytes, kek_id: str, ids: pa.Array, *, create: bool,
                     keys: bool, now: str, fanout: int,
                     token_key: bytes | None = None,
                     before_turn: Callable[[], object] | None = None) -> tuple[pa.Array, bytes | None, int]:
    """The native key store's bulk lookup-and-create (see ``native/src/keystore.rs``):
    ``(tokens, keys or None, subjects created)``. Only when :func:`sqlite_shared`. ``token_key``
    (schema 5): new subjects' tokens are the keyed permutation of their row ids. ``fanout``: how
    many runs of blind indexes of one level are merged into one of the next (the key store's
    ``FANOUT``, the one place the figure lives). ``before_turn`` (tests): called after the blind
    indexes are made and before the writer's turn, where another writer may merge or shred.

    Raises:
        ValueError: a null or blank id (names its position).
        RuntimeError: ``"sqlite\t…"``, ``"foreign-kek\t<token>\t<kek id>"``, ``"unwrap\t<token>"``
            or ``"rotated-kek\t<kek id>"``; the key store turns them into its own errors.
    """
    arr = _binary(ids)
    parts, key_bytes, created = _native.resolve_subjects(db, _mv(bi_key), _mv(kek), kek_id, _col(arr), create, keys, now,
                                                         token_key=_mv(token_key), fanout=fanout,
                                                         **({"before_turn": before_turn} if before_turn else {}))
    return _from_parts(pa.string(), len(arr), parts), key_bytes, created


def release_connections() -> None:
    """Close the native key store's kept connection (kept across calls for SQLite's page cache;
    see ``native/src/keystore.rs: Kept``) and forget its runs' filters. A key store's ``close``
    calls it; the next bulk call opens the file again."""
    if _native is not None and hasattr(_native, "release_connections"):
        _native.release_connections()


def run_filter_counts() -> tuple[int, int]:
    """The native key store's filters of blind-index runs made in this process by reading a run,
    and the ids the runs' filters spared a read (see ``native/src/keystore.rs: Sbbf``). ``(0, 0)``
    without the native core."""
    if _native is None or not hasattr(_native, "run_filter_counts"):
        return (0, 0)
    made, spared = _native.run_filter_counts()
    return (made, spared)


def layout() -> tuple[int, int, int] | None:
    """The native core's schema-5 sizes ``(BLOCK, PART, ENTRY)`` (held equal to
    :mod:`governance.keys.runs`' by a test); None without the native core."""
    if _native is None or not hasattr(_native, "layout"):
        return None
    block, part, entry = _native.layout()
    return (block, part, entry)


# ---------------------------------------------------------------------- key wrapping


def wrap_keys(kek: bytes, keys: Sequence[bytes], aads: Sequence[bytes], *, force: str | None = None,
              nonces: bytes | None = None) -> list[bytes]:
    """Wrap 32-byte keys under ``kek`` (``nonce || ct || tag``, associated data ``aads[i]``)."""
    if len(keys) != len(aads):
        raise ValueError(f"{len(keys)} keys but {len(aads)} associated data")
    if not keys:
        return []
    if _use_native(force):
        flat = _native.wrap_keys(_mv(kek), b"".join(keys), b"", _col(pa.array(aads, pa.binary())), nonces)
        return fixed(flat, WRAPPED)
    if nonces is None:
        return hazmat.aesgcm_seal_many(kek, keys, aads)
    return [hazmat.aesgcm_seal(kek, k, a, nonces[i * NONCE : (i + 1) * NONCE]) for i, (k, a) in enumerate(zip(keys, aads))]


def unwrap_keys(kek: bytes, blobs: Sequence[bytes], aads: Sequence[bytes], *, force: str | None = None) -> list[bytes]:
    """Unwrap what :func:`wrap_keys` wrapped. Raises DecryptionError naming the first failure."""
    if len(blobs) != len(aads):
        raise ValueError(f"{len(blobs)} wrapped keys but {len(aads)} associated data")
    if not blobs:
        return []
    if _use_native(force):
        try:
            flat = _native.unwrap_keys(_mv(kek), _col(pa.array(blobs, pa.binary())), b"", _col(pa.array(aads, pa.binary())))
        except ValueError as exc:
            raise DecryptionError(f"key unwrap failed: {exc}") from None
        return fixed(flat, KEY)
    return hazmat.aesgcm_open_many(kek, blobs, aads)


# ---------------------------------------------------------------------- sealing whole columns


def _index(key_index: pa.Array) -> memoryview:
    idx = key_index.fill_null(-1) if key_index.null_count else key_index
    idx = idx.cast(pa.int32())
    return memoryview(np.ascontiguousarray(idx.to_numpy(zero_copy_only=False), dtype="<i4")).cast("B")


def seal_column(keys: bytes, key_index: pa.Array, tokens: pa.Array, aad_prefix: bytes, values: pa.Array, *,
                force: str | None = None, nonces: bytes | None = None) -> pa.Array:
    """Seal ``values[i]`` under key ``key_index[i]`` (``keys`` holds 32 bytes per token), with
    associated data ``aad_prefix || tokens[key_index[i]]``: ``0x01 || nonce || ct || tag``.
    Null values stay null; a value whose index is null has no key (ValueError)."""
    vals = _binary(values)
    toks = _binary(tokens)
    n = len(vals)
    if len(key_index) != n:
        raise ValueError(f"{n} values but {len(key_index)} key indexes")
    if _use_native(force):
        parts = _native.seal_column(_mv(keys), _index(key_index), _col(toks), aad_prefix, _col(vals), nonces)
        return _from_parts(pa.binary(), n, parts)
    nonces = nonces if nonces is not None else os.urandom(NONCE * n)

    def seal(c: AESGCM, v: bytes, token: bytes, i: int) -> bytes:
        nonce = nonces[i * NONCE : (i + 1) * NONCE]
        return wire.VERSION_BYTE + nonce + c.encrypt(nonce, v, aad_prefix + token)

    return _by_row(keys, key_index, toks, vals, seal)


def seal_columns(keys: bytes, key_index: pa.Array, tokens: pa.Array, columns: dict[str, tuple[bytes, pa.Array]], *,
                 force: str | None = None, nonces: dict[str, bytes] | None = None) -> dict[str, pa.Array]:
    """:func:`seal_column` of several columns of the same rows, ``{name: (aad_prefix, values)}``:
    the same bytes, but the native core builds each subject's cipher once for all the columns and
    writes each column into one buffer of its final size. ``nonces`` (per column, ``n * 12``
    bytes) is for known-answer tests only."""
    if not _use_native(force) or not columns:
        return {name: seal_column(keys, key_index, tokens, prefix, values, force=force,
                                  nonces=None if nonces is None else nonces[name])
                for name, (prefix, values) in columns.items()}
    toks = _binary(tokens)
    vals = {name: _binary(values) for name, (_, values) in columns.items()}
    n = len(key_index)
    for name, v in vals.items():
        if len(v) != n:
            raise ValueError(f"column {name!r} has {len(v)} values but there are {n} key indexes")
    names = list(columns)
    parts = _native.seal_columns(
        _mv(keys), _index(key_index), _col(toks), [columns[c][0] for c in names], [_col(vals[c]) for c in names],
        None if nonces is None else [nonces[c] for c in names],
    )
    return {name: _from_parts(pa.binary(), n, p) for name, p in zip(names, parts)}


def open_column(keys: bytes, key_index: pa.Array, tokens: pa.Array, aad_prefix: bytes, blobs: pa.Array, *,
                force: str | None = None) -> pa.Array:
    """Open a column :func:`seal_column` sealed (binary out). Raises DecryptionError at the first
    value that does not open for its key, dataset, column and token."""
    arr = _binary(blobs)
    toks = _binary(tokens)
    n = len(arr)
    if len(key_index) != n:
        raise ValueError(f"{n} values but {len(key_index)} key indexes")
    if _use_native(force):
        try:
            parts = _native.open_column(_mv(keys), _index(key_index), _col(toks), aad_prefix, _col(arr))
        except ValueError as exc:
            if "no subject key" in str(exc):
                raise
            raise DecryptionError(str(exc)) from None
        return _from_parts(pa.binary(), n, parts)

    def open_(c: AESGCM, b: bytes, token: bytes, i: int) -> bytes:
        if len(b) < 1 + NONCE + 16 or b[0] != wire.FORMAT_VERSION:
            raise DecryptionError(f"ciphertext at position {i} is invalid (too short or unknown format version)")
        try:
            return c.decrypt(b[1 : 1 + NONCE], b[1 + NONCE :], aad_prefix + token)
        except InvalidTag:
            raise DecryptionError(f"ciphertext at position {i} failed authentication") from None

    return _by_row(keys, key_index, toks, arr, open_)


def _by_row(keys: bytes, key_index: pa.Array, tokens: pa.Array, values: pa.Array,
            op: Callable[[AESGCM, bytes, bytes, int], bytes]) -> pa.Array:
    """The pure-Python row loop of :func:`seal_column` and :func:`open_column`: ``op(cipher,
    value, token, row)`` for each non-null value, under its subject's key. Null stays null."""
    tok_list = tokens.to_pylist()
    idx = key_index.to_pylist()
    ciphers: dict[int, AESGCM] = {}
    out: list[bytes | None] = []
    for i, v in enumerate(values.to_pylist()):
        if v is None:
            out.append(None)
            continue
        j = idx[i]
        if j is None or j < 0 or j >= len(tok_list):
            raise ValueError(f"value at position {i} has no subject key")
        c = ciphers.get(j)
        if c is None:
            if len(ciphers) > 4096:
                ciphers.clear()
            c = ciphers[j] = AESGCM(keys[j * KEY : (j + 1) * KEY])
        out.append(op(c, v, tok_list[j], i))
    return pa.array(out, pa.binary())


# ---------------------------------------------------------------------- stream messages

#: kinds :func:`json_records` gives each message
RECORD, ENVELOPE, PYTHON = 0, 1, 2


def json_records(messages: pa.Array, lookup: dict[str, int], ncols: int, *, drop_unknown: bool,
                 envelope: str | None = None, max_bytes: int | None = None
                 ) -> tuple[np.ndarray, list[pa.Array], pa.Array, pa.Array] | None:
    """Decode a column of JSON messages (binary; null = a tombstone) natively, or None without the core.

    ``lookup`` maps each field name, lower-cased, to its column (of ``ncols``). Returns each
    message's kind (:data:`RECORD`, :data:`ENVELOPE`, or :data:`PYTHON`: the Python decoder must
    decide it, with its reason), the ``ncols`` text columns (set for records; a value is the text
    ``str()`` gives what ``json.loads`` returns), and the envelopes' subject tokens (string) and
    base64-decoded blobs (binary), set for envelopes. Unknown fields are dropped with
    ``drop_unknown``, else the message is Python's; with ``envelope`` (the format tag) an object
    with a top-level ``lakewarden`` key is an envelope; a message over ``max_bytes`` is Python's.
    """
    if _native is None:
        return None
    arr = _binary(messages)
    n = len(arr)
    kinds, cols, toks, blobs = _native.json_records(_col(arr), lookup, ncols, drop_unknown, envelope,
                                                     (1 << 62) if max_bytes is None else max_bytes)
    return (np.frombuffer(kinds, dtype=np.uint8), [_from_parts(pa.string(), n, c) for c in cols],
            _from_parts(pa.string(), n, toks), _from_parts(pa.binary(), n, blobs))


# ---------------------------------------------------------------------- content hashing


class Hasher:
    """SHA-256 of a batch's content; ``update_binary`` feeds a binary column's lengths, bytes and
    null positions (the bytes ``lakehouse.ingest`` has always hashed, so batch ids do not change)."""

    def __init__(self, prefix: bytes = b"", *, force: str | None = None) -> None:
        self._n = _native.Hasher() if _use_native(force) else None
        self._h = None if self._n is not None else hashlib.sha256()
        if prefix:
            self.update(prefix)

    def update(self, data: bytes | memoryview) -> None:
        if self._n is not None:
            self._n.update(_mv(data))
        else:
            self._h.update(data)  # type: ignore[union-attr]

    def update_binary(self, arr: pa.Array) -> None:
        arr = _binary(arr)
        if not len(arr):
            return
        if self._n is not None:
            self._n.update_binary(_col(arr), arr.null_count)
            return
        n = len(arr)
        bufs = arr.buffers()
        offsets = np.frombuffer(bufs[1], dtype=np.int32, count=arr.offset + n + 1)[arr.offset :]
        h = self._h
        h.update(np.diff(offsets).tobytes())  # type: ignore[union-attr]
        if bufs[2] is not None:
            h.update(memoryview(bufs[2])[offsets[0] : offsets[-1]])  # type: ignore[union-attr]
        if arr.null_count:
            h.update(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False)).astype(np.int64).tobytes())  # type: ignore[union-attr]

    def hexdigest(self) -> str:
        return self._n.hexdigest() if self._n is not None else self._h.hexdigest()  # type: ignore[union-attr]


# ---------------------------------------------------------------------- per-ingest lookups


def _keyable(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """A column's values as bytes to hash: strings and binaries as they are; other types as their
    text (one spelling per value; -0.0 is folded into 0.0, which compares equal to it)."""
    arr = one_array(arr)
    t = arr.type
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) \
            or pa.types.is_large_binary(t) or pa.types.is_null(t):
        return _binary(arr)
    if pa.types.is_floating(t):
        arr = pc.add(arr, pa.scalar(0.0, t))
    return _binary(pc.cast(arr, pa.string()))


def _flags(mask: pa.Array | pa.ChunkedArray | None) -> memoryview | None:
    """A boolean column as one byte per value (null counts as false)."""
    if mask is None:
        return None
    if isinstance(mask, pa.ChunkedArray):
        mask = mask.combine_chunks()
    return memoryview(np.ascontiguousarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=np.uint8))


class UniqueSet:
    """The hashes of one unique column's values accepted so far in an ingest (native core only;
    :func:`unique_set` says None without it, and :class:`lakehouse.validate.Validator` then keeps
    its hashes in DuckDB). A batch costs one pass over the batch, whatever was seen before."""

    WITHIN, BEFORE = 1, 2

    def __init__(self) -> None:
        self._s = _native.UniqueSet()  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self._s)

    def check(self, values: pa.Array | pa.ChunkedArray, rows: pa.Array | pa.ChunkedArray,
              candidate: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Per row: 0, :attr:`WITHIN` (its value is on an earlier row of the batch, by ``rows``) or
        :attr:`BEFORE` (its value was added before). Rows not ``candidate``, or null, are 0. The
        values new to the set are added now; :meth:`commit` keeps or takes them back."""
        vals = _keyable(values)
        if isinstance(rows, pa.ChunkedArray):
            rows = rows.combine_chunks()
        nums = np.ascontiguousarray(rows.to_numpy(zero_copy_only=False), dtype="<i8")
        if len(nums) != len(vals):
            raise ValueError("rows and values differ in length")
        return np.frombuffer(self._s.check(_col(vals), memoryview(nums).cast("B"), _flags(candidate)), dtype=np.uint8)

    def commit(self, keep: pa.Array | pa.ChunkedArray) -> None:
        """After :meth:`check`: keep the values it added on rows whose ``keep`` is true (the rows
        accepted in the end), take back the others."""
        self._s.commit(_flags(keep))

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        """Add values (nulls skipped): those already in a table."""
        self._s.add(_col(_keyable(values)))


class TokenCache:
    """Subject id to token for the subjects an ingest has resolved (native core only: see
    :func:`token_cache`). Thread-safe: lookups from several batches run at once."""

    def __init__(self) -> None:
        self._c = _native.TokenCache()  # type: ignore[union-attr]

    def __len__(self) -> int:
        return len(self._c)

    def clear(self) -> None:
        self._c.clear()

    def lookup(self, ids: pa.Array) -> pa.Array:
        """Each id's token (string), null where the id is null or not cached."""
        ids = _binary(ids)
        return _from_parts(pa.string(), len(ids), self._c.lookup(_col(ids)))

    def insert(self, ids: pa.Array, tokens: pa.Array) -> None:
        self._c.insert(_col(_binary(ids)), _col(_binary(tokens)))


def _fixed(typ: pa.DataType, n: int, parts: tuple) -> pa.Array:
    data, validity, nulls = parts
    bits = pa.py_buffer(validity) if validity is not None else None
    if pa.types.is_boolean(typ):  # one byte per value from the core; Arrow packs bits
        packed = pa.array(np.frombuffer(data, dtype=np.uint8).astype(bool)).buffers()[1]
        return pa.Array.from_buffers(typ, n, [bits, packed], null_count=nulls)
    return pa.Array.from_buffers(typ, n, [bits, pa.py_buffer(data)], null_count=nulls)


def check_text(columns: Sequence[pa.Array | pa.ChunkedArray], specs: Sequence[tuple],
               types: Sequence[tuple[pa.DataType, pa.DataType | None]]) -> tuple[np.ndarray, list[tuple]]:
    """The contract's per-value rules on text columns (native core only; the spec tuples are
    :mod:`lakehouse.validate`'s). Returns the undecided rows (uint8 per row) and, per column,
    ``(rule codes, typed array, generalized array or None)``, the arrays of ``types``."""
    arrs = [_binary(c) for c in columns]
    n = len(arrs[0]) if arrs else 0
    undecided, outs = _native.check_text([_col(a) for a in arrs], list(specs))  # type: ignore[union-attr]
    result = []
    for (codes, typed, general), (t_type, g_type) in zip(outs, types):
        def arr(parts: tuple, typ: pa.DataType) -> pa.Array:
            return _from_parts(typ, n, parts) if len(parts) == 4 else _fixed(typ, n, parts)
        result.append((np.frombuffer(codes, dtype=np.uint8), arr(typed, t_type),
                       None if general is None else arr(general, g_type)))  # type: ignore[arg-type]
    return np.frombuffer(undecided, dtype=np.uint8), result


def trim_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """``NULLIF(trim(v), '')`` of a text column, as DuckDB trims (native core only)."""
    arr = _binary(values)
    return _from_parts(pa.string(), len(arr), _native.trim_text(_col(arr)))  # type: ignore[union-attr]


def unique_set() -> UniqueSet | None:
    """A :class:`UniqueSet`, or None when the native core is not loaded."""
    return UniqueSet() if _native is not None else None


def token_cache() -> TokenCache | None:
    """A :class:`TokenCache`, or None when the native core is not loaded."""
    return TokenCache() if _native is not None else None


__all__ = ["Hasher", "TokenCache", "UniqueSet", "backend", "blind_indexes", "check_text", "json_records", "new_tokens", "open_column", "seal_column", "seal_columns", "token_cache", "trim_text", "unique_set", "unwrap_keys", "wrap_keys"]
