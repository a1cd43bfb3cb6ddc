"""The key hierarchy's wire formats against known answers (tests/fixtures/crypto_vectors.json).

The vectors are made from the format (governance/keys/wire.py's docstring) with `cryptography`
and `hmac` directly, by tests/fixtures/make_crypto_vectors.py. Any implementation of the formats
— this pure-Python one, a native core — must reproduce each vector and open each sealed value;
and what the real key ring and key store write must be what the wire functions say.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from governance.errors import DecryptionError
from governance.keys import KeyRing, KeyStore, hazmat, kek_from_env, wire

FIXTURES = Path(__file__).parent / "fixtures"
V = json.loads((FIXTURES / "crypto_vectors.json").read_text(encoding="utf-8"))
h = bytes.fromhex


def test_the_vectors_are_what_the_generator_makes_from_the_format():
    spec = importlib.util.spec_from_file_location("make_crypto_vectors", FIXTURES / "make_crypto_vectors.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    assert mod.build() == V
    assert V["format_version"] == wire.FORMAT_VERSION
    assert all(len(V[k]) >= 2 for k in ("seal", "system_seal", "wrap_dek", "wrap_system_key", "blind_index", "token"))


@pytest.mark.parametrize("v", V["seal"], ids=lambda v: f"{v['dataset']}.{v['column']}:{len(v['plaintext']) // 2}B")
def test_a_sealed_value_is_reproduced_and_opens(v: dict):
    dek, blob = h(v["dek"]), h(v["sealed"])
    names = {"dataset": v["dataset"], "column": v["column"], "token": v["token"]}
    assert wire.seal_value(dek, h(v["plaintext"]), nonce=h(v["nonce"]), **names) == blob
    assert wire.open_value(dek, blob, **names) == h(v["plaintext"])
    assert len(blob) == 1 + 12 + len(v["plaintext"]) // 2 + 16


@pytest.mark.parametrize("change", ["dataset", "column", "token", "bit", "version"])
def test_a_sealed_value_opens_only_for_its_names_and_bytes(change: str):
    v = V["seal"][1]
    names = {"dataset": v["dataset"], "column": v["column"], "token": v["token"]}
    blob = bytearray(h(v["sealed"]))
    if change == "bit":
        blob[-1] ^= 1
    elif change == "version":
        blob[0] = 2
    else:
        names[change] = names[change] + "x" if change != "token" else V["seal"][0]["token"]
    with pytest.raises(DecryptionError):
        wire.open_value(h(v["dek"]), bytes(blob), **names)


@pytest.mark.parametrize("v", V["system_seal"], ids=lambda v: v["name"])
def test_a_system_sealed_value_is_reproduced(v: dict):
    aad = wire.system_value_aad(v["dataset"], v["column"], v["name"])
    blob = wire.VERSION_BYTE + hazmat.aesgcm_seal(h(v["key"]), h(v["plaintext"]), aad, h(v["nonce"]))
    assert blob == h(v["sealed"])


@pytest.mark.parametrize("v", V["wrap_dek"], ids=lambda v: v["token"][:10])
def test_a_wrapped_subject_key_is_reproduced_and_unwraps(v: dict):
    kek, wrapped = h(v["kek"]), h(v["wrapped"])
    assert hazmat.aesgcm_seal(kek, h(v["dek"]), wire.dek_aad(v["token"]), h(v["nonce"])) == wrapped
    assert hazmat.aesgcm_open(kek, wrapped, wire.dek_aad(v["token"])) == h(v["dek"])


@pytest.mark.parametrize("v", V["wrap_system_key"], ids=lambda v: v["name"])
def test_a_wrapped_system_key_is_reproduced(v: dict):
    assert hazmat.aesgcm_seal(h(v["kek"]), h(v["key"]), wire.meta_aad(v["name"]), h(v["nonce"])) == h(v["wrapped"])


@pytest.mark.parametrize("v", V["blind_index"], ids=lambda v: repr(v["subject_id"]))
def test_a_blind_index_is_reproduced(v: dict):
    assert wire.blind_index(h(v["key"]), v["subject_id"]).hex() == v["index"]


@pytest.mark.parametrize("v", V["token"], ids=lambda v: v["token"][:10])
def test_a_token_is_spelled_as_the_format_says(v: dict):
    from governance.keys.store import TOKEN_RE

    assert wire.token_from_bytes(h(v["random"])) == v["token"] and TOKEN_RE.match(v["token"])


def test_what_the_key_store_and_ring_write_is_the_wire_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The real store and ring, end to end: blind index and wrapped key read back from the store's
    own file, values sealed by the ring opened by the wire functions and the other way round."""
    kek_bytes = h(V["wrap_dek"][0]["kek"])
    monkeypatch.setenv("LW_VECTOR_KEK", base64.b64encode(kek_bytes).decode())
    path = tmp_path / "keys.db"
    with KeyRing(KeyStore(path, kek_from_env("LW_VECTOR_KEK"))) as ring:
        ids = ["subject-0001", "  subject-0002 "]
        tokens = ring.tokens_for(ids)
        assert ring.tokens_for(["subject-0001"]) == tokens[:1]
        bi_key = ring.system_key("blind-index")
        tkey = ring.system_key("subject-token")
        with sqlite3.connect(path) as db:  # schema 5: a run's entries (blind index, row id) and a key block
            (entries,) = db.execute("SELECT entries FROM bi_parts").fetchone()
            (block,) = db.execute("SELECT wrapped FROM keyblocks").fetchone()
        for sid, tok in zip(ids, tokens):
            (row_id,) = wire.token_ids(tkey, [tok])
            assert wire.derived_tokens(tkey, [row_id]) == [tok]
            assert wire.blind_index(bi_key, sid)[:16] + row_id.to_bytes(8, "big") in (entries[:24], entries[24:])
            dek = ring.store.dek(tok)
            blob = block[(row_id - 1) * 60 : row_id * 60]
            assert AESGCM(kek_bytes).decrypt(blob[:12], blob[12:], wire.dek_aad(tok)) == dek
            sealed = ring.seal("value-1", token=tok, dataset="orders", column="note")
            assert wire.open_value(dek, sealed, dataset="orders", column="note", token=tok) == b"value-1"
            mine = wire.seal_value(dek, b"value-2", dataset="orders", column="note", token=tok)
            assert ring.open(mine, token=tok, dataset="orders", column="note") == b"value-2"
            many = ring.seal_columns({"note": ["a", None]}, [tok, tok], dataset="orders")["note"]
            assert wire.open_value(dek, many[0], dataset="orders", column="note", token=tok) == b"a" and many[1] is None
        sys_blob = ring.seal_system("quarantine", b"row", dataset="quarantine", column="raw")
        key = ring.system_key("quarantine")
        assert hazmat.aesgcm_open(key, sys_blob[1:], wire.system_value_aad("quarantine", "raw", "quarantine")) == b"row"
