"""Raw AES-256-GCM primitives. DANGER: easy to misuse.

Nothing here binds a ciphertext to a table, column or subject, stops you from
reusing a nonce, or keeps keys off disk. Use the recipes in
:mod:`governance.keys` (``KeyRing.seal`` / ``KeyRing.open``) unless you are
building another recipe.

Wire format of :func:`aesgcm_seal`: ``nonce (12) || ciphertext || tag (16)``.
Every integrity failure is one opaque :class:`~governance.errors.DecryptionError`;
caller mistakes (wrong key or nonce length, wrong types) are ``ValueError`` /
``TypeError``.

Building an ``AESGCM`` object costs about as much as sealing one small value,
so objects are cached per key (bounded). :func:`forget` drops a key's entry;
the key store calls it when a key is shredded so no cipher object keeps a
destroyed key alive.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from governance.errors import DecryptionError

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "aesgcm_open",
    "aesgcm_open_many",
    "aesgcm_seal",
    "aesgcm_seal_many",
    "cipher",
    "clear_cache",
    "forget",
    "new_key",
]

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16

_CACHE_MAX = 262_144  # ~60 MB worst case; matches the key store's DEK cache
_cache: OrderedDict[bytes, AESGCM] = OrderedDict()
_cache_lock = threading.Lock()


def new_key() -> bytes:
    """Return 32 random bytes from the OS CSPRNG (an AES-256 key)."""
    return os.urandom(KEY_SIZE)


def cipher(key: bytes, *, cache: bool = True) -> AESGCM:
    """Return the cached ``AESGCM`` object for ``key`` (built on first use).

    ``cache=False`` builds one without keeping it: for one-off bulk work over many
    distinct keys (ingesting a million new subjects), where caching only costs memory.

    Raises:
        ValueError: ``key`` is not 32 bytes.
    """
    c = _cache.get(key)
    if c is not None:
        return c
    key = bytes(key)
    if len(key) != KEY_SIZE:
        raise ValueError(f"AES-256-GCM key must be {KEY_SIZE} bytes, got {len(key)}")
    c = AESGCM(key)
    if not cache:
        return c
    with _cache_lock:
        while len(_cache) >= _CACHE_MAX:
            _cache.popitem(last=False)  # oldest first
        _cache[key] = c
    return c


def forget(key: bytes) -> None:
    """Drop the cached cipher object for ``key`` (no error when absent)."""
    with _cache_lock:
        _cache.pop(bytes(key), None)


def clear_cache() -> None:
    """Drop every cached cipher object."""
    with _cache_lock:
        _cache.clear()


def aesgcm_seal(key: bytes, plaintext: bytes, aad: bytes, nonce: bytes | None = None) -> bytes:
    """Encrypt and authenticate; return ``nonce || ciphertext || tag``.

    Args:
        key: 32-byte key.
        plaintext: bytes to encrypt.
        aad: associated data, authenticated but not encrypted; the same bytes
            must be given to :func:`aesgcm_open`.
        nonce: 12 bytes. Leave it ``None`` (a fresh random nonce) outside of
            known-answer tests: a repeated nonce under one key breaks GCM.

    Raises:
        ValueError: wrong key or nonce length.
    """
    if nonce is None:
        nonce = os.urandom(NONCE_SIZE)
    elif len(nonce) != NONCE_SIZE:
        raise ValueError(f"AES-GCM nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")
    return bytes(nonce) + cipher(key).encrypt(nonce, plaintext, aad)


def aesgcm_open(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Verify and decrypt a blob made by :func:`aesgcm_seal`.

    Raises:
        DecryptionError: the blob is too short, was tampered with, or was
            sealed under another key or other associated data.
        ValueError: wrong key length.
    """
    if len(blob) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError("ciphertext is invalid (too short)")
    view = memoryview(blob)
    try:
        return cipher(key).decrypt(view[:NONCE_SIZE], view[NONCE_SIZE:], aad)
    except InvalidTag:
        raise DecryptionError("ciphertext failed authentication") from None


def aesgcm_seal_many(key: bytes, plaintexts: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
    """:func:`aesgcm_seal` for many values under one key (fresh random nonces, one RNG call)."""
    if len(plaintexts) != len(aads):
        raise ValueError(f"aesgcm_seal_many: {len(plaintexts)} plaintexts but {len(aads)} aads")
    c = cipher(key)
    n = NONCE_SIZE
    nonces = os.urandom(n * len(plaintexts))
    out = []
    for i, (pt, aad) in enumerate(zip(plaintexts, aads)):
        nonce = nonces[i * n : i * n + n]
        out.append(nonce + c.encrypt(nonce, pt, aad))
    return out


def aesgcm_open_many(key: bytes, blobs: Sequence[bytes], aads: Sequence[bytes]) -> list[bytes]:
    """:func:`aesgcm_open` for many blobs under one key; the first failure raises."""
    if len(blobs) != len(aads):
        raise ValueError(f"aesgcm_open_many: {len(blobs)} blobs but {len(aads)} aads")
    c = cipher(key)
    n = NONCE_SIZE
    out = []
    try:
        for blob, aad in zip(blobs, aads):
            if len(blob) < n + TAG_SIZE:
                raise DecryptionError("ciphertext is invalid (too short)")
            out.append(c.decrypt(blob[:n], blob[n:], aad))
    except InvalidTag:
        raise DecryptionError("ciphertext failed authentication") from None
    return out
