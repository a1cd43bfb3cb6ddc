"""The key hierarchy's wire formats, one definition each: what any implementation must reproduce.

The key ring and the key store build their bytes from these constants, and
``tests/fixtures/crypto_vectors.json`` pins them with known answers. An implementation (the
pure-Python one here, a native core) is compatible when it reproduces every vector and opens
every sealed one.

* **Sealed value** (``KeyRing.seal``): ``0x01 || nonce (12) || AES-256-GCM ciphertext || tag (16)``
  under the subject's DEK, with associated data
  ``"lakewarden:v1\\0" || dataset || "\\0" || column || "\\0" || token`` (UTF-8), so a value opens
  only for the dataset, column and subject it was sealed for.
* **System-sealed value** (``KeyRing.seal_system``): the same layout under a system key, with
  ``"system:" || name`` where the token would be.
* **Wrapped DEK** (key store, ``subjects.wrapped_dek``): ``nonce (12) || ciphertext || tag (16)``
  of the 32-byte DEK under the KEK, associated data ``"lakewarden:dek\\0" || token``.
* **Wrapped system key** (``meta.wrapped``): the same under the KEK, associated data
  ``"lakewarden:meta\\0" || name``.
* **Blind index** of a subject id: HMAC-SHA256 under the system key ``blind-index`` of the id,
  stripped of surrounding whitespace, as UTF-8.
* **Token**: ``"sub_"`` + the first 26 characters of the lowercase base32 of 16 random bytes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from governance.keys import hazmat

FORMAT_VERSION = 1
VERSION_BYTE = bytes([FORMAT_VERSION])
VALUE_AAD_PREFIX = b"lakewarden:v1\x00"
DEK_AAD_PREFIX = b"lakewarden:dek\x00"
META_AAD_PREFIX = b"lakewarden:meta\x00"
TOKEN_PREFIX = "sub_"


def _name(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, got {type(value).__name__}")
    if not value or "\x00" in value:
        raise ValueError(f"{what} must be a non-empty string without NUL, got {value!r}")
    return value.encode("utf-8")


def value_aad_prefix(dataset: str, column: str) -> bytes:
    """The associated data of a sealed value, less the token (shared by a column's values)."""
    return VALUE_AAD_PREFIX + _name(dataset, "dataset") + b"\x00" + _name(column, "column") + b"\x00"


def value_aad(dataset: str, column: str, token: str) -> bytes:
    """The associated data a value of ``dataset.column`` for subject ``token`` is sealed with."""
    if not isinstance(token, str):
        raise TypeError(f"subject token must be str, got {type(token).__name__}")
    return value_aad_prefix(dataset, column) + token.encode("utf-8")


def system_value_aad(dataset: str, column: str, name: str) -> bytes:
    """The associated data of a value sealed under the system key ``name`` (no subject: e.g. a
    quarantined row without a valid subject key)."""
    return value_aad_prefix(dataset, column) + b"system:" + _name(name, "system key")


def seal_value(dek: bytes, plaintext: bytes, *, dataset: str, column: str, token: str,
               nonce: bytes | None = None) -> bytes:
    """A sealed value. Leave ``nonce`` None (fresh and random) outside known-answer tests."""
    return VERSION_BYTE + hazmat.aesgcm_seal(dek, plaintext, value_aad(dataset, column, token), nonce)


def open_value(dek: bytes, blob: bytes, *, dataset: str, column: str, token: str) -> bytes:
    """The plaintext of a sealed value (DecryptionError when it does not open for these names)."""
    from governance.errors import DecryptionError

    if len(blob) < 1 + hazmat.NONCE_SIZE + hazmat.TAG_SIZE or blob[0] != FORMAT_VERSION:
        raise DecryptionError("ciphertext is invalid (too short or unknown format version)")
    return hazmat.aesgcm_open(dek, bytes(blob[1:]), value_aad(dataset, column, token))


def dek_aad(token: str) -> bytes:
    """The associated data a subject's DEK is wrapped with under the KEK."""
    return DEK_AAD_PREFIX + token.encode("utf-8")


def meta_aad(name: str) -> bytes:
    """The associated data a system key is wrapped with under the KEK."""
    return META_AAD_PREFIX + name.encode("utf-8")


def blind_index(key: bytes, subject_id: str) -> bytes:
    """The blind index of a subject id (what the key store looks tokens up by)."""
    return blind_indexes(key, [subject_id.strip()])[0]


def blind_indexes(key: bytes, stripped_ids: list[str]) -> list[bytes]:
    """The blind indexes of ids already stripped of surrounding whitespace (the key store's bulk path).

    Raises:
        ValueError: an id is not encodable as UTF-8.
    """
    base = hmac.new(key, digestmod=hashlib.sha256)  # copying a keyed HMAC beats re-keying per id
    out = []
    append = out.append
    try:
        for s in stripped_ids:
            h = base.copy()
            h.update(s.encode("utf-8"))
            append(h.digest())
    except UnicodeEncodeError as exc:
        raise ValueError(f"subject id is not encodable as UTF-8: {exc.reason}") from None
    return out


def token_from_bytes(raw: bytes) -> str:
    """The token spelled from 16 random bytes."""
    if len(raw) != 16:
        raise ValueError(f"a token is spelled from 16 bytes, got {len(raw)}")
    return TOKEN_PREFIX + base64.b32encode(raw).decode("ascii")[:26].lower()


# Key store v2: a subject's token is a keyed permutation of its row id, so the store needs no
# index on tokens (one B-tree fewer to rewrite per batch of new subjects). Block: the magic, then
# the id as 8 bytes big-endian; AES-256 (one block, a pseudorandom permutation) under the store's
# "subject-token" system key; spelled as any token. Without the key a token says nothing of the
# id; with it, the id (creation order) — which the key store's created_at says anyway.
TOKEN_MAGIC = b"lw-subj\x02"


def derived_tokens(key: bytes, ids: list[int]) -> list[str]:
    """The tokens of row ids ``ids`` under the token key."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not ids:
        return []
    import numpy as np

    n = len(ids)
    blocks = np.empty((n, 16), np.uint8)
    blocks[:, :8] = np.frombuffer(TOKEN_MAGIC, np.uint8)
    blocks[:, 8:] = np.asarray(ids, dtype=">u8").view(np.uint8).reshape(n, 8)
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    raw = enc.update(blocks.tobytes()) + enc.finalize()
    # Base32 of every block at once (what token_from_bytes spells one by one): the 128 bits and
    # two zero bits make 26 groups of 5, each a letter of the lowercase RFC 4648 alphabet.
    bits = np.zeros((n, 130), np.uint8)
    bits[:, :128] = np.unpackbits(np.frombuffer(raw, np.uint8).reshape(n, 16), axis=1)
    groups = bits.reshape(n, 26, 5) @ np.array([16, 8, 4, 2, 1], np.uint8)
    spelled = np.frombuffer(_B32.lower(), np.uint8)[groups].tobytes().decode("ascii")
    return [TOKEN_PREFIX + spelled[j : j + 26] for j in range(0, 26 * n, 26)]


def token_ids(key: bytes, tokens: list[str]) -> list[int | None]:
    """The row id behind each token, or None for a token this key did not make (a v1 random
    token, another store's). The caller still compares the stored token with the given one."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if len(tokens) >= 64:
        return _token_ids_bulk(key, tokens)
    out: list[int | None] = [None] * len(tokens)
    blocks, where = [], []
    for i, t in enumerate(tokens):
        if not isinstance(t, str) or len(t) != 30 or not t.startswith(TOKEN_PREFIX):
            continue
        try:
            blocks.append(base64.b32decode(t[4:].upper() + "======"))
        except ValueError:
            continue
        where.append(i)
    if not blocks:
        return out
    dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    raw = dec.update(b"".join(blocks)) + dec.finalize()
    for j, i in enumerate(where):
        block = raw[16 * j : 16 * (j + 1)]
        if block[:8] == TOKEN_MAGIC:
            out[i] = int.from_bytes(block[8:], "big")
    return out


_B32 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"


def _token_ids_bulk(key: bytes, tokens: list[str]) -> list[int | None]:
    """:func:`token_ids` with no Python per token past the first checks: base32 with numpy, one
    AES-ECB pass. Same result, token for token (tests compare the two)."""
    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    out: list[int | None] = [None] * len(tokens)
    where = [i for i, t in enumerate(tokens)
             if isinstance(t, str) and len(t) == 30 and t.startswith(TOKEN_PREFIX) and t.isascii()]
    if not where:
        return out
    body = "".join(tokens[i][4:] for i in where).upper().encode("ascii")
    lut = np.full(256, 255, dtype=np.uint8)
    lut[np.frombuffer(_B32, dtype=np.uint8)] = np.arange(32, dtype=np.uint8)
    vals = lut[np.frombuffer(body, dtype=np.uint8).reshape(len(where), 26)]
    good = (vals != 255).all(axis=1)
    # 26 characters of 5 bits: 130 bits, of which the first 128 are the block (as b32decode reads them)
    bits = np.unpackbits(vals[good][:, :, None], axis=2)[:, :, 3:].reshape(-1, 130)[:, :128]
    blocks = np.packbits(bits, axis=1)
    if not len(blocks):
        return out
    dec = Cipher(algorithms.AES(key), modes.ECB()).decryptor()
    raw = np.frombuffer(dec.update(blocks.tobytes()) + dec.finalize(), dtype=np.uint8).reshape(-1, 16)
    magic = (raw[:, :8] == np.frombuffer(TOKEN_MAGIC, dtype=np.uint8)).all(axis=1)
    ids = raw[:, 8:].copy().view(">u8").ravel()
    for i, m, v in zip(np.asarray(where)[good].tolist(), magic.tolist(), ids.tolist()):
        if m:
            out[i] = v
    return out
