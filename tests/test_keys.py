"""Tests for governance.keys: envelope encryption, crypto-shredding, KEK loading."""

from __future__ import annotations

import base64
import hmac
import os
import random
import re
import sqlite3
import stat
import warnings
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from governance.errors import DecryptionError, KekUnavailable, KeyManagementError, SubjectShredded
from governance.keys import (
    KeyEncryptionKey,
    KeyRing,
    KeyStore,
    LocalKek,
    generate_kek_b64,
    generate_kek_file,
    kek_from_env,
    kek_from_file,
    kek_from_plugin,
    load_kek,
)
from governance.keys import hazmat
from governance.keys.kek import InsecureKeyFileWarning
from tests.keystore_helpers import check_layout, old_store, raw_rows, wrapped_of

KEK_A = bytes(range(32))
KEK_B = bytes(range(100, 132))
FIXED_NOW = datetime(2025, 3, 14, 15, 9, 26, tzinfo=timezone.utc)
TOKEN_RE = re.compile(r"^sub_[a-z2-7]{26}$")


def clock() -> datetime:
    return FIXED_NOW


@pytest.fixture
def kek() -> LocalKek:
    return LocalKek(KEK_A, source="test:a")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keystore.db"


@pytest.fixture
def ring(store_path: Path, kek: LocalKek):
    with KeyRing(KeyStore(store_path, kek, clock=clock)) as r:
        yield r


def raw_exec(path: Path, sql: str, args: tuple = ()) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(sql, args)
        conn.commit()
    finally:
        conn.close()


# --------------------------------------------------------------------------- hazmat


# AES-256-GCM test case 16 of McGrew & Viega, "The Galois/Counter Mode of
# Operation" (the NIST submission); the expected value was also checked once
# with cryptography's AESGCM directly.
KAT_KEY = bytes.fromhex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
KAT_NONCE = bytes.fromhex("cafebabefacedbaddecaf888")
KAT_PT = bytes.fromhex(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"
)
KAT_AAD = bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
KAT_CT_TAG = bytes.fromhex(
    "522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa"
    "8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662"
    "76fc6ece0f4e1768cddf8853bb2d551b"
)


def test_hazmat_known_answer():
    blob = hazmat.aesgcm_seal(KAT_KEY, KAT_PT, KAT_AAD, nonce=KAT_NONCE)
    assert blob == KAT_NONCE + KAT_CT_TAG
    assert hazmat.aesgcm_open(KAT_KEY, blob, KAT_AAD) == KAT_PT


def test_hazmat_failures():
    blob = hazmat.aesgcm_seal(KAT_KEY, b"x", b"aad")
    with pytest.raises(DecryptionError):
        hazmat.aesgcm_open(KAT_KEY, blob, b"other aad")
    with pytest.raises(DecryptionError, match="too short"):
        hazmat.aesgcm_open(KAT_KEY, blob[:27], b"aad")
    with pytest.raises(ValueError, match="32 bytes"):
        hazmat.aesgcm_seal(b"short", b"x", b"")
    with pytest.raises(ValueError, match="nonce"):
        hazmat.aesgcm_seal(KAT_KEY, b"x", b"", nonce=b"123")
    assert len(hazmat.new_key()) == 32
    assert hazmat.new_key() != hazmat.new_key()


# --------------------------------------------------------------------------- seal / open


def test_seal_open_round_trip(ring: KeyRing):
    token = ring.token_for("alice@example.com")
    blob = ring.seal("alice@example.com", token=token, dataset="vault", column="email")
    assert blob[0] == 1 and len(blob) == 1 + 12 + len(b"alice@example.com") + 16
    assert ring.open(blob, token=token, dataset="vault", column="email") == b"alice@example.com"
    assert ring.open(ring.seal(b"\x00\xff", token=token, dataset="v", column="c"), token=token, dataset="v", column="c") == b"\x00\xff"
    # a fresh nonce each time
    assert blob != ring.seal("alice@example.com", token=token, dataset="vault", column="email")


def test_ciphertext_format_is_as_documented(ring: KeyRing):
    token = ring.token_for("carol")
    dek = ring.store.dek(token)
    nonce = bytes(12)
    aad = b"lakewarden:v1\x00silver.events\x00email\x00" + token.encode()
    blob = b"\x01" + nonce + AESGCM(dek).encrypt(nonce, b"carol@example.com", aad)
    assert ring.open(blob, token=token, dataset="silver.events", column="email") == b"carol@example.com"


def test_aad_binds_dataset_column_and_subject(ring: KeyRing):
    alice, bob = ring.tokens_for(["alice", "bob"])
    blob = ring.seal("secret", token=alice, dataset="vault", column="email")
    with pytest.raises(DecryptionError):
        ring.open(blob, token=alice, dataset="other", column="email")
    with pytest.raises(DecryptionError):
        ring.open(blob, token=alice, dataset="vault", column="phone")
    with pytest.raises(DecryptionError):
        ring.open(blob, token=bob, dataset="vault", column="email")
    # the NUL separators make the boundaries unambiguous
    with pytest.raises(ValueError):
        ring.seal("x", token=alice, dataset="va\x00ult", column="email")
    with pytest.raises(ValueError):
        ring.seal("x", token=alice, dataset="vault", column="")


def test_tampered_ciphertext_fails(ring: KeyRing):
    token = ring.token_for("alice")
    blob = ring.seal("hello", token=token, dataset="d", column="c")
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(DecryptionError):
            ring.open(bytes(bad), token=token, dataset="d", column="c")
    with pytest.raises(DecryptionError):
        ring.open(blob[:-1], token=token, dataset="d", column="c")
    with pytest.raises(DecryptionError):
        ring.open(b"\x01" + bytes(27), token=token, dataset="d", column="c")


def test_seal_many_open_many(ring: KeyRing):
    ids = [f"user{i}" for i in range(50)]
    tokens = ring.tokens_for(ids)
    values: list = [f"value-{i}" if i % 7 else None for i in range(50)]
    values[3] = b"raw bytes"
    blobs = ring.seal_many(values, tokens, dataset="d", column="c")
    assert [b is None for b in blobs] == [v is None for v in values]
    opened = ring.open_many(blobs, tokens, dataset="d", column="c")
    expected = [v.encode() if isinstance(v, str) else v for v in values]
    assert opened == expected
    # single open reads what seal_many wrote, and vice versa
    assert ring.open(blobs[1], token=tokens[1], dataset="d", column="c") == b"value-1"
    one = ring.seal("solo", token=tokens[2], dataset="d", column="c")
    assert ring.open_many([one], [tokens[2]], dataset="d", column="c") == [b"solo"]
    with pytest.raises(DecryptionError):
        ring.open_many(blobs[1:3], tokens[2:4], dataset="d", column="c")
    with pytest.raises(ValueError, match="2 values but 1 tokens"):
        ring.seal_many(["a", "b"], tokens[:1], dataset="d", column="c")
    with pytest.raises(ValueError, match="position 0 has no subject token"):
        ring.seal_many(["a"], [None], dataset="d", column="c")
    assert ring.seal_many([None], [None], dataset="d", column="c") == [None]


def test_open_arrow_columns_opens_several_columns_with_one_key_lookup(ring: KeyRing, monkeypatch):
    import pyarrow as pa

    ids = [f"user{i}" for i in range(40)]
    tokens = ring.tokens_for(ids)
    a = ring.seal_many([f"a{i}" if i % 5 else None for i in range(40)], tokens, dataset="d", column="a")
    b = ring.seal_many([f"b{i}" if i % 3 else None for i in range(40)], tokens, dataset="d", column="b")
    toks = pa.array(tokens)
    calls = []
    real = ring._store.deks
    monkeypatch.setattr(ring._store, "deks", lambda ts: calls.append(len(ts)) or real(ts))
    got = ring.open_arrow_columns({"a": pa.array(a, pa.binary()), "b": pa.array(b, pa.binary())}, toks, dataset="d")
    assert calls == [37]  # one lookup for both columns: the subjects with a value in either (not i % 15 == 0)
    assert got["a"].to_pylist() == ring.open_many(a, tokens, dataset="d", column="a")
    assert got["b"].to_pylist() == ring.open_many(b, tokens, dataset="d", column="b")
    with pytest.raises(DecryptionError):  # each column is opened under its own name
        ring.open_arrow_columns({"b": pa.array(a, pa.binary())}, toks, dataset="d")
    with pytest.raises(ValueError, match="column a has 2 blobs but there are 40 tokens"):
        ring.open_arrow_columns({"a": pa.array(a[:2], pa.binary())}, toks, dataset="d")


def test_unknown_token(ring: KeyRing):
    with pytest.raises(KeyManagementError, match="unknown subject token 'sub_nope'") as info:
        ring.open(b"\x01" + bytes(40), token="sub_nope", dataset="d", column="c")
    assert type(info.value) is KeyManagementError


# --------------------------------------------------------------------------- shredding


def test_shred_makes_subject_unreadable(ring: KeyRing):
    alice, bob = ring.tokens_for(["alice", "bob"])
    a = ring.seal("alice data", token=alice, dataset="d", column="c")
    b = ring.seal("bob data", token=bob, dataset="d", column="c")
    ring.store.dek(alice)  # cached before the shred
    assert ring.shred(alice) is True
    assert ring.shred(alice) is False
    assert ring.shred("sub_neverissued") is False
    with pytest.raises(SubjectShredded) as info:
        ring.open(a, token=alice, dataset="d", column="c")
    assert str(info.value) == (
        f"subject {alice} was crypto-shredded: its data key was destroyed on 2025-03-14T15:09:26+00:00; "
        "data sealed for it can no longer be decrypted"
    )
    assert info.value.context == {"token": alice, "shredded_at": "2025-03-14T15:09:26+00:00"}
    with pytest.raises(SubjectShredded):
        ring.store.dek(alice)
    with pytest.raises(SubjectShredded):
        ring.seal("more", token=alice, dataset="d", column="c")
    with pytest.raises(SubjectShredded):
        ring.open_many([b], [alice], dataset="d", column="c")
    assert ring.open(b, token=bob, dataset="d", column="c") == b"bob data"
    assert ring.store.subject_state(alice) == "shredded"
    assert ring.store.subject_state(bob) == "active"
    assert ring.store.subject_state("sub_x") == "unknown"
    assert ring.store.stats() == {"subjects": 1, "shredded": 1, "kek_id": ring.store.kek_id}
    # the same person coming back gets a new, unrelated token
    again = ring.token_for("alice")
    assert again != alice and TOKEN_RE.match(again)


def test_shred_across_store_instances(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as s1:
        token = s1.token_for("alice")
        with KeyStore(store_path, kek) as s2:
            assert s2.dek(token) == s1.dek(token)
            assert s2.shred(token)
        # s1 had the key cached; a fresh lookup after close/reopen sees the shred
    with KeyStore(store_path, kek) as s3:
        with pytest.raises(SubjectShredded):
            s3.dek(token)


def test_shred_removes_bytes_from_file(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        tokens = store.tokens_for([f"person-{i}" for i in range(200)])
        victim = tokens[17]
        blind_key = store.system_key("blind-index")
        dek = store.dek(victim)
        wrapped = wrapped_of(store_path, store._tkey, victim)
    blind = hmac.digest(blind_key, b"person-17", "sha256")
    before = store_path.read_bytes()
    assert wrapped in before and blind[:16] in before  # schema 5 keeps the blind index's first 16 bytes
    assert victim.encode() not in before  # schema 5 keeps no token: it is the row id's permutation

    with KeyStore(store_path, kek, clock=clock) as store:
        assert store.shred(victim)
    after = store_path.read_bytes()
    assert wrapped not in after
    assert blind[:8] not in after  # its run's entry (and a fence, were it a part's first)
    assert dek not in after
    assert check_layout(store_path) == (199, {0: 1})
    # only the tombstone keeps the (random) token
    assert raw_rows(store_path, "SELECT token, shredded_at FROM shredded") == [(victim, "2025-03-14T15:09:26+00:00")]
    assert not Path(str(store_path) + "-journal").exists()
    assert not Path(str(store_path) + "-wal").exists()


def test_shred_many(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        tokens = store.tokens_for([f"p{i}" for i in range(20)])
        wrapped = [wrapped_of(store_path, store._tkey, t) for t in tokens[:3]]
        assert store.shred_many(tokens[:3] + [tokens[0], "sub_unknown"]) == 3
        assert store.stats()["subjects"] == 17 and store.stats()["shredded"] == 3
    data = store_path.read_bytes()
    assert len(wrapped) == 3 and not any(w in data for w in wrapped)


def test_raw_keys_never_touch_the_store_file(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        tokens = store.tokens_for([f"id{i}" for i in range(100)])
        deks = list(store.deks(tokens).values())
        system = [store.system_key("blind-index"), store.system_key("audit-signing")]
    data = store_path.read_bytes()
    assert len(deks) == 100
    for key in deks + system + [KEK_A]:
        assert key not in data
    assert b"id17" not in data  # plaintext subject ids are never stored


def test_store_file_permissions(store_path: Path, kek: LocalKek):
    KeyStore(store_path, kek).close()
    assert stat.S_IMODE(store_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store_path.parent.stat().st_mode) == 0o700


def test_loose_store_permissions_warn(store_path: Path, kek: LocalKek):
    KeyStore(store_path, kek).close()
    store_path.chmod(0o644)
    with pytest.warns(InsecureKeyFileWarning, match=r"is readable or writable by group or others \(mode 0o644\)"):
        KeyStore(store_path, kek).close()


def test_swapped_wrapped_key_does_not_unwrap(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        a, b = store.tokens_for(["a", "b"])
        tkey = store._tkey
    wb = wrapped_of(store_path, tkey, b)
    ((block,),) = raw_rows(store_path, "SELECT wrapped FROM keyblocks")
    at = block.index(wrapped_of(store_path, tkey, a))
    raw_exec(store_path, "UPDATE keyblocks SET wrapped=?", (block[:at] + wb + block[at + 60 :],))
    with KeyStore(store_path, kek) as store:
        with pytest.raises(DecryptionError, match=f"data key of subject {a}"):
            store.dek(a)
        assert len(store.dek(b)) == 32


# --------------------------------------------------------------------------- KEK rotation


def test_rotate_kek(store_path: Path, kek: LocalKek):
    new = LocalKek(KEK_B, source="test:b")
    ring = KeyRing(KeyStore(store_path, kek))
    tokens = ring.tokens_for([f"p{i}" for i in range(30)])
    blobs = ring.seal_many([f"v{i}" for i in range(30)], tokens, dataset="d", column="c")
    ring.system_key("audit-signing")
    old_wrapped = [wrapped_of(store_path, ring.store._tkey, t) for t in tokens]
    tkey = ring.store._tkey
    old_id = ring.store.kek_id

    assert ring.rotate_kek(new) == 30 + 3  # 30 DEKs + blind-index + subject-token (schema 2) + audit-signing
    assert ring.store.kek_id == new.key_id != old_id
    assert ring.store.stats()["kek_id"] == new.key_id
    assert ring.open_many(blobs, tokens, dataset="d", column="c") == [f"v{i}".encode() for i in range(30)]
    ring.close()

    assert {r[0] for r in raw_rows(store_path, "SELECT kek_id FROM keyblocks UNION SELECT kek_id FROM meta")} == {new.key_id}
    data = store_path.read_bytes()
    assert not any(w in data for w in old_wrapped)

    with KeyRing(KeyStore(store_path, new)) as again:
        assert again.open(blobs[5], token=tokens[5], dataset="d", column="c") == b"v5"
        assert again.token_for("p5") == tokens[5]  # blind-index key survived the rotation

    with pytest.raises(KeyManagementError, match=f"wrapped by KEK {new.key_id}, but the loaded KEK is {old_id}"):
        KeyStore(store_path, kek)
    # and the old KEK cannot unwrap any stored blob
    with pytest.raises(DecryptionError):
        kek.unwrap(wrapped_of(store_path, tkey, tokens[0]), b"lakewarden:dek\x00" + tokens[0].encode())


def test_rotate_refuses_foreign_keys_and_same_kek(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        tokens = store.tokens_for(["a", "b"])
        with pytest.raises(KeyManagementError, match="already the current KEK"):
            store.rotate_kek(LocalKek(KEK_A, source="again"))
        more = store.subject_keys(pa.array([f"p{i}" for i in range(1_100)])).tokens.to_pylist()  # two blocks more
        from governance.keys import wire

        foreign = next(t for t, i in zip(more, wire.token_ids(store._tkey, more)) if 3 <= i < 1027)
    # a middle block: opening checks the system keys and the first and last blocks only
    assert raw_rows(store_path, "SELECT first_id, n FROM keyblocks") == [(1, 2), (3, 1024), (1027, 76)]
    raw_exec(store_path, "UPDATE keyblocks SET kek_id='kek-elsewhere' WHERE first_id=3")
    with KeyStore(store_path, kek) as store:
        before = raw_rows(store_path, "SELECT first_id, wrapped, kek_id FROM keyblocks ORDER BY first_id")
        with pytest.raises(KeyManagementError, match=rf"kek-elsewhere \(1024 keys\), not by the current KEK {kek.key_id}"):
            store.rotate_kek(LocalKek(KEK_B, source="b"))
        assert raw_rows(store_path, "SELECT first_id, wrapped, kek_id FROM keyblocks ORDER BY first_id") == before
        assert store.kek_id == kek.key_id
        with pytest.raises(KeyManagementError, match=f"wrapped by KEK kek-elsewhere, but the key store was opened with KEK {kek.key_id}"):
            store.dek(foreign)
        other = next(t for t in tokens if t != foreign)
        assert len(store.dek(other)) == 32


# --------------------------------------------------------------------------- tokens


def test_tokens_are_stable_and_distinct(ring: KeyRing):
    a = ring.token_for("alice@example.com")
    assert TOKEN_RE.match(a)
    raw = base64.b32decode(a[4:].upper() + "======")  # base32 of 16 random bytes
    assert len(raw) == 16 and base64.b32encode(raw).decode().lower()[:26] == a[4:]
    assert ring.token_for("alice@example.com") == a
    assert ring.token_for("  alice@example.com\n") == a  # normalised by strip()
    assert ring.token_for("Alice@example.com") != a
    assert ring.token_for("bob@example.com") != a
    assert ring.token_for("nobody", create=False) is None
    assert ring.tokens_for(["alice@example.com", "nobody"], create=False) == [a, None]
    assert ring.tokens_for([]) == []
    with pytest.raises(ValueError, match="empty or whitespace"):
        ring.token_for("   ")
    with pytest.raises(ValueError, match="position 1 is empty"):
        ring.tokens_for(["x", ""])
    with pytest.raises(TypeError):
        ring.token_for(b"alice")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ring.tokens_for("alice")


def test_tokens_for_batch_matches_token_for(store_path: Path, kek: LocalKek):
    ids = [f"customer-{i:05d}" for i in range(10_000)]
    with KeyStore(store_path, kek) as store:
        batch = store.tokens_for(ids + ids[:10])  # duplicates get the same token
        assert batch[-10:] == batch[:10]
        assert len(set(batch)) == 10_000
        for i in range(0, 10_000, 97):
            assert store.token_for(ids[i]) == batch[i]
        assert store.tokens_for(ids, create=False) == batch[:10_000]
        assert store.stats()["subjects"] == 10_000
    with KeyStore(store_path, kek) as store:  # stable across reopen
        assert store.tokens_for(ids[:100]) == batch[:100]


def test_fresh_store_does_not_create_keys_for_lookups(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        assert store.token_for("x", create=False) is None
        with pytest.raises(KeyManagementError, match="system key 'blind-index' does not exist"):
            store.system_key("blind-index", create=False)
        k = store.system_key("audit-signing")
        assert len(k) == 32 and store.system_key("audit-signing") == k


# --------------------------------------------------------------------------- KEK loading


def test_local_kek_hides_key_and_has_stable_id():
    k = LocalKek(KEK_A, source="env:X")
    text = repr(k) + str(k)
    assert KEK_A.hex() not in text and base64.b64encode(KEK_A).decode() not in text
    assert text.startswith("LocalKek(key_id='kek-")
    assert re.fullmatch(r"kek-[0-9a-f]{16}", k.key_id)
    assert k.key_id == LocalKek(KEK_A, source="other").key_id != LocalKek(KEK_B, source="b").key_id
    with pytest.raises(ValueError):
        LocalKek(b"short", source="x")
    blob = k.wrap(b"k" * 32, b"aad")
    assert k.unwrap(blob, b"aad") == b"k" * 32
    with pytest.raises(DecryptionError):
        LocalKek(KEK_B, source="b").unwrap(blob, b"aad")


def test_kek_from_env(monkeypatch):
    monkeypatch.setenv("LAKEWARDEN_KEK", base64.urlsafe_b64encode(KEK_B).decode())
    assert kek_from_env("LAKEWARDEN_KEK").key_id == LocalKek(KEK_B, source="x").key_id
    std = base64.b64encode(KEK_B).decode()
    assert "+" in std or "/" in std  # KEK_B exercises the alphabet difference
    monkeypatch.setenv("LAKEWARDEN_KEK", std.rstrip("="))
    assert kek_from_env("LAKEWARDEN_KEK").key_id == LocalKek(KEK_B, source="x").key_id


def test_kek_from_env_errors(monkeypatch):
    monkeypatch.delenv("LAKEWARDEN_KEK", raising=False)
    with pytest.raises(KekUnavailable) as info:
        kek_from_env("LAKEWARDEN_KEK")
    assert str(info.value).startswith(
        "environment variable LAKEWARDEN_KEK is not set; generate a key with `lakewarden keys new-kek`"
    )
    monkeypatch.setenv("LAKEWARDEN_KEK", "this is not base64!")
    with pytest.raises(KekUnavailable, match="environment variable LAKEWARDEN_KEK is not valid base64") as info:
        kek_from_env("LAKEWARDEN_KEK")
    assert "this is not" not in str(info.value)  # never echo the secret
    monkeypatch.setenv("LAKEWARDEN_KEK", base64.b64encode(b"x" * 16).decode())
    with pytest.raises(KekUnavailable, match="decodes to 16 bytes; a KEK must be exactly 32 bytes"):
        kek_from_env("LAKEWARDEN_KEK")
    monkeypatch.setenv("LAKEWARDEN_KEK", "  ")
    with pytest.raises(KekUnavailable, match="LAKEWARDEN_KEK is empty"):
        kek_from_env("LAKEWARDEN_KEK")


def test_kek_from_file(tmp_path: Path):
    p = tmp_path / "good.kek"
    p.write_text("\n  " + base64.b64encode(KEK_A).decode() + "  \n")
    p.chmod(0o600)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kek_from_file(p).key_id == LocalKek(KEK_A, source="x").key_id
    p.chmod(0o644)
    with pytest.warns(InsecureKeyFileWarning, match=rf"KEK file {re.escape(str(p))} is readable .* \(mode 0o644\)"):
        kek_from_file(p)


def test_kek_from_file_errors(tmp_path: Path):
    missing = tmp_path / "missing.kek"
    with pytest.raises(KekUnavailable, match=f"KEK file {re.escape(str(missing))} does not exist"):
        kek_from_file(missing)
    bad = tmp_path / "bad.kek"
    bad.write_text("not base64 at all!!")
    bad.chmod(0o600)
    with pytest.raises(KekUnavailable, match=f"KEK file {re.escape(str(bad))} is not valid base64"):
        kek_from_file(bad)
    short = tmp_path / "short.kek"
    short.write_text(base64.b64encode(b"x" * 31).decode())
    short.chmod(0o600)
    with pytest.raises(KekUnavailable, match=f"KEK file {re.escape(str(short))} decodes to 31 bytes"):
        kek_from_file(short)
    with pytest.raises(KekUnavailable, match="is not a regular file"):
        kek_from_file(tmp_path)


class _TestKek(KeyEncryptionKey):
    """A toy KMS: wraps with LocalKek under the hood."""

    def __init__(self, seed: int) -> None:
        self._inner = LocalKek(bytes([seed]) * 32, source="plugin")

    @property
    def key_id(self) -> str:
        return "test-kms/" + self._inner.key_id

    def wrap(self, dek: bytes, aad: bytes) -> bytes:
        return self._inner.wrap(dek, aad)

    def unwrap(self, blob: bytes, aad: bytes) -> bytes:
        return self._inner.unwrap(blob, aad)


def make_test_kek(seed: int = 7) -> KeyEncryptionKey:
    return _TestKek(seed)


def make_wrong_type(**_: object) -> object:
    return "not a kek"


def test_kek_from_plugin_works(store_path: Path):
    kek = kek_from_plugin(f"{__name__}:make_test_kek", {"seed": 9})
    assert isinstance(kek, _TestKek) and kek.key_id.startswith("test-kms/kek-")
    assert load_kek("plugin", factory=f"{__name__}:make_test_kek").key_id == _TestKek(7).key_id
    with KeyRing(KeyStore(store_path, kek)) as ring:
        t = ring.token_for("alice")
        blob = ring.seal("x", token=t, dataset="d", column="c")
        assert ring.open(blob, token=t, dataset="d", column="c") == b"x"
        assert ring.rotate_kek(LocalKek(KEK_A, source="a")) == 3  # the DEK, blind-index, subject-token


def test_kek_from_plugin_errors():
    with pytest.raises(KekUnavailable, match="KEK plugin module 'no_such_kms_pkg' \\(from 'no_such_kms_pkg:make'\\) cannot be imported"):
        kek_from_plugin("no_such_kms_pkg:make", {})
    with pytest.raises(KekUnavailable, match=f"module '{__name__}' has no attribute 'nope'"):
        kek_from_plugin(f"{__name__}:nope", {})
    with pytest.raises(KekUnavailable, match=rf"KEK plugin factory '{__name__}:make_wrong_type' returned str, not a KeyEncryptionKey"):
        kek_from_plugin(f"{__name__}:make_wrong_type", {})
    with pytest.raises(KekUnavailable, match=r"failed: TypeError: .*unexpected keyword argument 'colour'"):
        kek_from_plugin(f"{__name__}:make_test_kek", {"colour": "red"})
    with pytest.raises(KekUnavailable, match="is not of the form 'package.module:factory'"):
        kek_from_plugin("no_colon_here", {})


def test_load_kek_dispatch(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MY_KEK", generate_kek_b64())
    assert isinstance(load_kek("env", var="MY_KEK"), LocalKek)
    key_id = generate_kek_file(tmp_path / "secrets" / "lw.kek")
    assert load_kek("file", path="secrets/lw.kek", base_dir=tmp_path).key_id == key_id
    with pytest.raises(KekUnavailable, match="unknown KEK provider 'vault'; expected one of env, file, plugin"):
        load_kek("vault")
    with pytest.raises(KekUnavailable, match="provider 'file' needs a path"):
        load_kek("file")
    with pytest.raises(KekUnavailable, match="provider 'plugin' needs a factory"):
        load_kek("plugin")


def test_generate_kek_file(tmp_path: Path):
    path = tmp_path / "new" / "dir" / "lakewarden.kek"
    key_id = generate_kek_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o700
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kek_from_file(path).key_id == key_id
    content = path.read_bytes()
    with pytest.raises(KeyManagementError, match="already exists; refusing to overwrite"):
        generate_kek_file(path)
    assert path.read_bytes() == content
    assert len(base64.urlsafe_b64decode(generate_kek_b64())) == 32
    assert generate_kek_b64() != generate_kek_b64()


def test_wrong_kek_cannot_open_store(store_path: Path, kek: LocalKek):
    with KeyStore(store_path, kek) as store:
        store.token_for("alice")
    with pytest.raises(KeyManagementError, match=f"is wrapped by KEK {kek.key_id}, but the loaded KEK is"):
        KeyStore(store_path, LocalKek(KEK_B, source="b"))


def test_not_a_key_store(tmp_path: Path, kek: LocalKek):
    p = tmp_path / "junk.db"
    p.write_bytes(os.urandom(4096))
    p.chmod(0o600)
    with pytest.raises(KeyManagementError, match="is not a key store"):
        KeyStore(p, kek)


def test_closed_store(store_path: Path, kek: LocalKek):
    store = KeyStore(store_path, kek)
    store.close()
    store.close()
    with pytest.raises(KeyManagementError, match="is closed"):
        store.token_for("x")


def test_shred_without_vacuum_leaves_no_key_bytes_even_in_free_pages(store_path: Path, kek: LocalKek,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """secure_delete zeroes the freed pages too: shredding many subjects (pages freed, no VACUUM
    while free pages stay under a quarter) leaves none of their wrapped keys or blind indexes."""
    with KeyStore(store_path, kek) as store:
        tokens = store.tokens_for([f"person-{i}" for i in range(3000)])
        victims = tokens[:500]
        blind_key = store.system_key("blind-index")
        wrapped = [wrapped_of(store_path, store._tkey, t) for t in victims]
    blinds = [hmac.digest(blind_key, f"person-{i}".encode(), "sha256") for i in range(500)]
    def no_vacuum(self: KeyStore) -> None:
        raise AssertionError("a shred of a sixth of the store must not VACUUM")

    monkeypatch.setattr(KeyStore, "_vacuum", no_vacuum)
    with KeyStore(store_path, kek, clock=clock) as store:
        assert store.shred_many(victims) == 500
    after = store_path.read_bytes()
    assert not any(w in after for w in wrapped) and not any(b[:8] in after for b in blinds)
    assert check_layout(store_path) == (2_500, {0: 1})


# -- schema 2: tokens are a keyed permutation of row ids; schema-1 stores keep working -------------
V1_SCHEMA = """
CREATE TABLE meta(name TEXT PRIMARY KEY, wrapped BLOB NOT NULL, kek_id TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE subjects(token TEXT PRIMARY KEY, blind_index BLOB NOT NULL UNIQUE, wrapped_dek BLOB NOT NULL,
                      kek_id TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE shredded(token TEXT PRIMARY KEY, shredded_at TEXT NOT NULL);
PRAGMA user_version=1;
"""


def _backends():
    from governance.keys import native

    return ["python"] + (["native"] if native.backend() == "native" else [])


@pytest.fixture(params=_backends())
def backend(request, monkeypatch):
    """Run the test on the pure-Python key store path, and on the native one where it is built."""
    from governance.keys import native

    if request.param == "python":
        monkeypatch.setattr(native, "_native", None)
        monkeypatch.setattr(native, "_SHARED_SQLITE", False)
    return request.param


def test_schema_2_tokens_are_row_ids_under_the_token_key_and_never_come_back(store_path, kek, backend):
    from governance.keys import wire

    with KeyStore(store_path, kek, clock=clock) as ks:
        assert ks._version == 5  # schema 2's tokens; 5 keeps keys in blocks and blind indexes in runs (below)
        toks = ks.tokens_for(["alice", "bob", " alice", "carol"])
        assert toks[0] == toks[2] and len(set(toks)) == 3 and all(TOKEN_RE.match(t) for t in toks)
        ids = wire.token_ids(ks._tkey, toks)
        assert sorted(set(ids)) == [1, 2, 3]  # new subjects take the next ids, in blind-index order
        assert wire.derived_tokens(ks._tkey, ids) == toks  # the same on both paths
        # one key block and one run for the batch; no row, no index, no token stored
        assert raw_rows(store_path, "SELECT first_id, n, created_at FROM keyblocks") == [(1, 3, "2025-03-14T15:09:26+00:00")]
        assert check_layout(store_path) == (3, {0: 1})
        bob = toks[1]
        assert ks.shred(bob) and ks.subject_state(bob) == "shredded"
        assert check_layout(store_path) == (2, {0: 1})
        again = ks.token_for("bob")
        assert again != bob and wire.token_ids(ks._tkey, [again]) == [4]  # ids are never reused
        with pytest.raises(SubjectShredded):
            ks.dek(bob)
        assert len(ks.deks([toks[0], toks[3], again])) == 3
        assert check_layout(store_path) == (3, {0: 2})


def _base(n: int, b: int) -> dict[int, int]:
    """The levels' run counts after ``n`` batches merged by fan-out ``b``: ``n``'s digits in base ``b``."""
    out, level = {}, 0
    while n:
        if n % b:
            out[level] = n % b
        n //= b
        level += 1
    return out


def test_schema_5_merges_runs_by_level_and_every_verb_sees_every_run(store_path, kek, backend, monkeypatch):
    """Merges at a small scale (fan-out 3): each batch of new people is a run, and once 3 runs share
    a level they become one of the next, so the levels count the batches in base 3. After each batch
    every subject made before resolves to the same token and key on both paths and the layout's
    invariants hold (tests/keystore_helpers.py: check_layout); a shred takes a subject out of
    whichever run holds it, and its id comes back new; a rotation covers every block."""
    from governance.keys import native, store as store_mod

    monkeypatch.setattr(store_mod, "FANOUT", 3)
    ids = [f"person-{i:04d}" for i in range(1_050)]
    made: dict[str, tuple[str, bytes]] = {}
    with KeyStore(store_path, kek, clock=clock) as ks:
        starts = [*range(0, 1_000, 150), 1_000]
        for n, start in enumerate(starts, start=1):
            batch = ids[start : min(start + 150, 1_000 if start < 1_000 else 1_050)] + ids[: min(start, 40)]  # new and known
            got = ks.subject_keys(pa.array(batch), keys=True)
            for j, i in enumerate(batch):
                pair = (got.tokens[j].as_py(), got.keys[j * 32 : (j + 1) * 32])
                assert made.setdefault(i, pair) == pair, i
            assert check_layout(store_path) == (len(made), _base(n, 3))
        everyone = ks.subject_keys(pa.array(ids), keys=True, create=False)
        assert everyone.tokens.to_pylist() == [made[i][0] for i in ids]
        assert everyone.keys == b"".join(made[i][1] for i in ids)
        with monkeypatch.context() as m:  # the other path reads the same
            if backend == "native":
                m.setattr(native, "_native", None)
                m.setattr(native, "_SHARED_SQLITE", False)
            assert ks.subject_keys(pa.array(ids), create=False).tokens.equals(everyone.tokens)
        # shred one subject of a merged run (level 2) and one of the last batch's run (level 0)
        merged, last = ids[10], ids[1_020]
        assert ks.shred_many([made[merged][0], made[last][0]]) == 2
        assert check_layout(store_path) == (1_048, _base(8, 3))
        assert ks.subject_keys(pa.array([merged, last]), create=False).tokens.to_pylist() == [None, None]
        again = ks.tokens_for([merged, last])
        assert set(again).isdisjoint({made[merged][0], made[last][0]})
        made[merged], made[last] = (again[0], made[merged][1]), (again[1], made[last][1])
        assert check_layout(store_path) == (1_050, _base(9, 3))  # that batch was the ninth run: one of level 2
        # a large batch of mostly new people with known ones from the merged run
        known = ids[100:120] + ids[1_030:1_040]
        fresh = [f"new-{i:04d}" for i in range(2_000)]
        batch = fresh + known + fresh[:7]
        random.Random(3).shuffle(batch)
        got = ks.subject_keys(pa.array(batch), keys=True)
        tok = dict(zip(batch, got.tokens.to_pylist()))
        key = {i: got.keys[j * 32 : (j + 1) * 32] for j, i in enumerate(batch)}
        assert all((tok[i], key[i]) == made[i] for i in known)
        assert len(set(tok.values())) == 2_030 and got.created in (2_000, None)  # the Python path does not count
        assert check_layout(store_path) == (3_050, _base(10, 3))
        system = raw_rows(store_path, "SELECT count(*) FROM meta")[0][0]
        assert ks.rotate_kek(LocalKek(os.urandom(32), source="test:rotated")) == 3_050 + system
        assert ks.subject_keys(pa.array(ids[:5]), keys=True).keys == b"".join(made[i][1] for i in ids[:5])
        assert ks.subject_keys(pa.array(fresh[:5]), keys=True, create=False).keys == b"".join(key[i] for i in fresh[:5])
        assert check_layout(store_path) == (3_050, _base(10, 3))


@pytest.mark.parametrize("version", [2, 3, 4])
def test_an_older_store_is_converted_on_open_keeping_tokens_keys_and_the_id_sequence(store_path, kek, backend, version):
    """A store as schema 2 (blind indexes on the rows), 3 (a main and a recent index) or 4 (the
    recent index in runs) wrote it, its last subject shredded: opening it makes its rows key blocks
    and its blind indexes one run, drops the old tables, and keeps every token, key and the id
    sequence, so the shredded subject's id never comes back."""
    from governance.keys import wire

    ids = [f"p{i}" for i in range(1_100)]
    old = old_store(store_path, kek, ids, version=version, shredded=1, main=500)
    assert raw_rows(store_path, "PRAGMA user_version") == [(version,)]
    with KeyStore(store_path, kek, clock=clock) as ks:
        assert ks._version == 5 and raw_rows(store_path, "PRAGMA user_version") == [(5,)]
        tables = {r[0] for r in raw_rows(store_path, "SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables == {"meta", "keyblocks", "bi_runs", "bi_parts", "lsm", "shredded"}
        assert check_layout(store_path) == (1_099, {0: 1})
        assert raw_rows(store_path, "SELECT first_id, n FROM keyblocks") == [(1, 1024), (1025, 76)]
        back = ks.subject_keys(pa.array(ids[:-1]), keys=True, create=False)
        assert back.tokens.to_pylist() == [old[i][0] for i in ids[:-1]]
        assert back.keys == b"".join(old[i][1] for i in ids[:-1])
        new = ks.token_for(ids[-1])  # shredded before: a new subject, after the last id ever given
        assert wire.token_ids(ks._tkey, [new]) == [1_101]
        assert ks.dek(old["p7"][0]) == old["p7"][1]
        assert check_layout(store_path) == (1_100, {0: 2})


def test_an_older_store_opened_with_another_kek_is_refused_and_opens_with_its_own(store_path, kek):
    """Every subject of a schema-4 store shredded: its converted blocks take the KEK of its system
    keys, not of whoever opened it, so a wrong KEK is refused and the right one still opens it."""
    old_store(store_path, kek, ["a", "b"], version=4, shredded=2)
    with pytest.raises(KeyManagementError, match=f"wrapped by KEK {kek.key_id}"):
        KeyStore(store_path, LocalKek(KEK_B, source="test:b"))
    assert {r[0] for r in raw_rows(store_path, "SELECT kek_id FROM keyblocks")} == {kek.key_id}
    with KeyStore(store_path, kek) as ks:
        assert ks._version == 5 and ks.stats()["subjects"] == 0
        assert check_layout(store_path) == (0, {})


def test_schema_2_refuses_tokens_it_did_not_make(store_path, kek, tmp_path, backend):
    with KeyStore(store_path, kek, clock=clock) as ks, KeyStore(tmp_path / "other.db", kek, clock=clock) as other:
        mine = ks.token_for("alice")
        theirs = other.token_for("alice")  # another store's token key: another token
        assert mine != theirs
        assert ks.subject_state(theirs) == "unknown"
        with pytest.raises(KeyManagementError, match="unknown subject token"):
            ks.dek(theirs)
        # the same 16 bytes spelled with other padding bits decode to the same id: refused by the
        # comparison with the stored token
        last = mine[-1]
        b32 = "abcdefghijklmnopqrstuvwxyz234567"
        twin = mine[:-1] + b32[b32.index(last) ^ 1]
        assert twin != mine and ks.subject_state(twin) == "unknown"
        assert ks.shred(twin) is False and ks.subject_state(mine) == "active"


def test_a_schema_1_store_keeps_its_random_tokens_and_every_operation(store_path, kek, backend):
    store_path.parent.mkdir(parents=True, exist_ok=True)
    raw = sqlite3.connect(store_path)
    raw.executescript(V1_SCHEMA)
    raw.close()
    os.chmod(store_path, 0o600)
    with KeyRing(KeyStore(store_path, kek, clock=clock)) as ring:
        ks = ring.store
        assert ks._version == 1 and ks._tkey is None
        toks = ks.tokens_for(["alice", "bob", "carol"])
        assert all(TOKEN_RE.match(t) for t in toks)
        blob = ring.seal("x", token=toks[0], dataset="d", column="c")
        assert ring.open(blob, token=toks[0], dataset="d", column="c") == b"x"
        assert ks.shred(toks[1]) and ks.subject_state(toks[1]) == "shredded"
        assert ks.tokens_for(["alice"]) == [toks[0]]
        # the bulk path (ingest's): a known subject keeps its token, new ones get random tokens
        import pyarrow as pa

        bulk = ks.subject_keys(pa.array(["dave", "alice", "erin", "dave"]), keys=True)
        btoks = bulk.tokens.to_pylist()
        assert btoks[1] == toks[0] and btoks[0] == btoks[3] and len(set(btoks)) == 3
        assert all(TOKEN_RE.match(t) for t in btoks)
        assert [bulk.keys[i * 32 : (i + 1) * 32] for i in range(4)] == [ks.dek(t) for t in btoks]
        assert ks.subject_keys(pa.array(["erin"])).tokens.to_pylist() == [btoks[2]]
        assert ring.rotate_kek(LocalKek(KEK_B, source="b")) == 4 + 1  # 4 live DEKs + blind-index
    assert raw_rows(store_path, "PRAGMA user_version") == [(1,)]  # not migrated
    assert raw_rows(store_path, "SELECT count(*) FROM meta WHERE name='subject-token'") == [(0,)]


def test_derived_tokens_spell_each_block_as_token_from_bytes_does():
    """The numpy base32 of wire.derived_tokens against the one-block reference, ids up to 2**64-1."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from governance.keys import wire

    key = bytes(range(32))
    ids = [*range(0, 3000), 2**31, 2**32 + 1, 2**63 - 1, 2**63 + 5, 2**64 - 1]
    enc = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    raw = enc.update(b"".join(wire.TOKEN_MAGIC + i.to_bytes(8, "big") for i in ids)) + enc.finalize()
    assert wire.derived_tokens(key, ids) == [wire.token_from_bytes(raw[j:j + 16]) for j in range(0, len(raw), 16)]
    assert wire.derived_tokens(key, []) == [] and wire.token_ids(key, wire.derived_tokens(key, ids)) == ids


def test_token_ids_in_bulk_read_every_token_as_one_at_a_time_does():
    """The numpy path of wire.token_ids (64 tokens or more) against its per-token reference."""
    import random

    from governance.keys import wire

    key, other = bytes(range(32)), bytes(range(1, 33))
    toks = wire.derived_tokens(key, [*range(1, 500), 2**63 + 5, 2**64 - 1])
    odd = ["sub_" + "a" * 26, "sub_" + "1" * 26, "sub_" + "é" * 26, "sub_" + "ß" * 26, None, 5, "x" * 30,
           "sub_short", wire.derived_tokens(other, [7])[0], "sub_" + toks[0][4:].upper()]
    mixed = toks + odd
    random.Random(3).shuffle(mixed)
    one_by_one = [i for t in mixed for i in wire.token_ids(key, [t])]
    assert wire.token_ids(key, mixed) == one_by_one
    assert sorted(i for i in one_by_one if i is not None) == sorted([*range(1, 500), 2**63 + 5, 2**64 - 1, 1])
