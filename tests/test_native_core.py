"""The native core (``native/``, Rust) and the pure-Python reference make the same bytes.

Each primitive runs on both backends against the known answers in
tests/fixtures/crypto_vectors.json, and each backend opens what the other sealed, on columns with
nulls, empty and non-ASCII values, slices and chunks. The key store's bulk path gives the same
subjects either way. Without the native module built, the native half is skipped — unless
LAKEWARDEN_REQUIRE_NATIVE=1 (``make test`` sets it), where its absence fails.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from governance.errors import DecryptionError, KeyManagementError
from governance.keys import KeyStore, LocalKek, native, wire
from tests.keystore_helpers import check_layout

V = json.loads((Path(__file__).parent / "fixtures" / "crypto_vectors.json").read_text(encoding="utf-8"))
h = bytes.fromhex
NATIVE = native._native is not None
BACKENDS = ["python", pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="native core not built"))]


def test_the_native_core_is_built_where_required():
    if os.environ.get("LAKEWARDEN_REQUIRE_NATIVE") == "1":
        assert native.backend() == "native", "make install builds native/ (needs cargo); LAKEWARDEN_NATIVE=0 disables it"
        assert native.sqlite_shared(), "the native core must call the SQLite library Python's sqlite3 uses"


ALL_FLAGS = "flags\t\t: fpu vme " + " ".join(native.X86_FLAGS) + " sha_ni\n"


def test_the_cpu_flags_the_build_needs_are_read_from_cpuinfo():
    assert native.missing_cpu_flags("processor\t: 0\n" + ALL_FLAGS, machine="x86_64") == []
    old = ALL_FLAGS.replace(" avx2 ", " ").replace(" aes ", " ")
    assert native.missing_cpu_flags(old, machine="x86_64") == ["avx2", "aes"]
    assert native.missing_cpu_flags("processor\t: 0\n", machine="x86_64") == []  # unreadable: not refused
    assert native.missing_cpu_flags("flags: fpu\n", machine="aarch64") == []


def test_the_flags_checked_are_those_the_build_enables():
    """``native/.cargo/config.toml`` builds for x86-64-v3 with AES-NI and PCLMULQDQ: the loader
    checks each of those levels' flags (as /proc/cpuinfo names them), and only those."""
    config = (Path(__file__).parents[1] / "native" / ".cargo" / "config.toml").read_text(encoding="utf-8")
    assert '"target-cpu=x86-64-v3"' in config and '"target-feature=+aes,+pclmulqdq"' in config
    v2 = {"sse4_1", "sse4_2", "ssse3", "popcnt"}
    v3 = {"avx", "avx2", "bmi1", "bmi2", "fma", "f16c", "movbe", "abm"}  # abm: LZCNT
    assert set(native.X86_FLAGS) == v2 | v3 | {"aes", "pclmulqdq"}


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_build_says_in_its_file_what_it_was_built_for():
    """The loader reads it from the file without loading the module; the module says the same."""
    assert native.built_for() == native._native.BUILT_FOR
    if platform.machine().lower() in ("x86_64", "amd64") and os.environ.get("RUSTFLAGS") is None:
        assert native.built_for() == "x86-64-v3+aes+pclmulqdq"


def test_what_a_module_was_built_for_is_read_from_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pkg = tmp_path / "lw_fake_native"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('never imported by the check')\n")
    (pkg / "lw_fake_native.abi3.so").write_bytes(os.urandom(5000) + b"lakewarden-native-built-for:portable;" + os.urandom(99))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert native.built_for("lw_fake_native") == "portable"
    (pkg / "lw_fake_native.abi3.so").write_bytes(b"\x7fELF nothing said")
    assert native.built_for("lw_fake_native") is None
    assert native.built_for("lw_no_such_module") is None


def test_a_cpu_without_the_flags_gets_the_python_path_and_says_why(tmp_path: Path):
    """The module is not even loaded there (it would stop the process with an illegal instruction)."""
    code = (
        "import builtins, io, json, logging\n"
        "logging.basicConfig()\n"
        "real = builtins.open\n"
        "builtins.open = lambda p, *a, **k: io.StringIO('flags\\t: fpu sse4_1 aes\\n') if p == '/proc/cpuinfo' "
        "else real(p, *a, **k)\n"
        "import sys\n"
        "from governance.keys import native\n"
        "print(json.dumps([native.backend(), native.WHY_PYTHON, 'lakewarden_native' in sys.modules]))\n"
    )
    if not Path("/proc/cpuinfo").exists() or platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the flags are read from Linux's /proc/cpuinfo on x86-64")
    env = {k: v for k, v in os.environ.items() if k != "LAKEWARDEN_NATIVE"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=Path(__file__).parents[1], timeout=60)
    backend, why, loaded = json.loads(p.stdout.strip().splitlines()[-1])
    assert (backend, loaded) == ("python", False)
    assert "this CPU lacks sse4_2, ssse3, popcnt, avx, " in why and "RUSTFLAGS= make install" in why
    assert "the native core is not loaded: this CPU lacks" in p.stderr


@pytest.mark.parametrize("force", BACKENDS)
def test_seal_vectors_are_reproduced_and_open(force: str):
    for v in V["seal"]:
        prefix = wire.value_aad_prefix(v["dataset"], v["column"])
        sealed = native.seal_column(h(v["dek"]), pa.array([0], pa.int32()), pa.array([v["token"]]), prefix,
                                    pa.array([h(v["plaintext"])]), force=force, nonces=h(v["nonce"]))
        assert sealed.to_pylist() == [h(v["sealed"])]
        opened = native.open_column(h(v["dek"]), pa.array([0], pa.int32()), pa.array([v["token"]]), prefix, sealed, force=force)
        assert opened.to_pylist() == [h(v["plaintext"])]


@pytest.mark.parametrize("force", BACKENDS)
def test_key_wrap_and_blind_index_vectors(force: str):
    for v in V["wrap_dek"]:
        aad = wire.dek_aad(v["token"])
        assert native.wrap_keys(h(v["kek"]), [h(v["dek"])], [aad], force=force, nonces=h(v["nonce"])) == [h(v["wrapped"])]
        assert native.unwrap_keys(h(v["kek"]), [h(v["wrapped"])], [aad], force=force) == [h(v["dek"])]
    for v in V["wrap_system_key"]:
        aad = wire.meta_aad(v["name"])
        assert native.wrap_keys(h(v["kek"]), [h(v["key"])], [aad], force=force, nonces=h(v["nonce"])) == [h(v["wrapped"])]
    for v in V["blind_index"]:
        assert native.blind_indexes(h(v["key"]), pa.array([v["subject_id"]]), force=force) == h(v["index"])


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_native_tokens_are_spelled_as_the_wire_format_says():
    for v in V["token"]:
        assert native._native.token_from_bytes(h(v["random"])) == v["token"] == wire.token_from_bytes(h(v["random"]))
    toks = native.new_tokens(2000, sorted_=True, force="native")
    assert toks == sorted(toks) and len(set(toks)) == 2000
    assert all(len(t) == 30 and t.startswith("sub_") and set(t[4:]) <= set("abcdefghijklmnopqrstuvwxyz234567") for t in toks)


def _column() -> tuple[pa.Array, pa.Array, bytes, pa.Array]:
    """Values with nulls, empty, non-ASCII and a 70 KB value; keys shared by some rows."""
    vals = ["alice@example.com", None, "", "Zürich ☃ 東京", "x" * 70_000, "bob", None, "🦀", "same", "same"]
    tokens = pa.array(native.new_tokens(4, force="python"))
    keys = os.urandom(32 * 4)
    index = pa.array([0, 1, 2, 3, 0, 1, None, 2, 3, 3], pa.int32())
    return pa.array(vals), index, keys, tokens


@pytest.mark.skipif(not NATIVE, reason="native core not built")
@pytest.mark.parametrize("sealer,opener", [("native", "python"), ("python", "native")])
def test_each_backend_opens_what_the_other_sealed(sealer: str, opener: str):
    vals, index, keys, tokens = _column()
    prefix = wire.value_aad_prefix("customers", "email")
    sealed = native.seal_column(keys, index, tokens, prefix, vals, force=sealer)
    assert sealed.null_count == 2 and sealed.type == pa.binary()
    assert all(len(b) == len(v.encode()) + 29 for b, v in zip(sealed.to_pylist(), vals.to_pylist()) if v is not None)
    opened = native.open_column(keys, index, tokens, prefix, sealed, force=opener)
    assert opened.cast(pa.string()).to_pylist() == vals.to_pylist()
    # a slice and a chunked column read the same as the whole
    part = native.open_column(keys, index.slice(3, 5), tokens, prefix, sealed.slice(3, 5), force=opener)
    assert part.cast(pa.string()).to_pylist() == vals.to_pylist()[3:8]
    chunked = pa.chunked_array([sealed.slice(0, 4), sealed.slice(4)])
    assert native.open_column(keys, index, tokens, prefix, chunked, force=opener).cast(pa.string()).equals(vals)
    # each value opens only for its own column and subject
    with pytest.raises(DecryptionError):
        native.open_column(keys, index, tokens, wire.value_aad_prefix("customers", "phone"), sealed, force=opener)
    swapped = pa.array([1, 0, 2, 3, 0, 1, None, 2, 3, 3], pa.int32())
    with pytest.raises(DecryptionError):
        native.open_column(keys, swapped, tokens, prefix, sealed, force=opener)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_sealing_several_columns_at_once_makes_the_same_bytes_as_one_at_a_time():
    """seal_columns builds one cipher per subject for every column and writes each column in place:
    with the same nonces it is byte for byte what seal_column makes (native and Python), across
    parallel chunks (20,000 rows), runs of one subject, nulls in some columns only, and slices."""
    n = 20_000
    tokens = pa.array(native.new_tokens(7_000, force="python"))
    keys = os.urandom(32 * len(tokens))
    index = pa.array([(i // 3) % len(tokens) for i in range(n)], pa.int32())  # runs of three rows per subject
    cols = {
        "email": (wire.value_aad_prefix("people", "email"), pa.array([f"p{i}@example.org" for i in range(n)])),
        "note": (wire.value_aad_prefix("people", "note"), pa.array([None if i % 5 else "Zürich ☃" * (i % 7) for i in range(n)])),
        "blob": (wire.value_aad_prefix("people", "blob"), pa.array([bytes([i % 256]) * (i % 40) for i in range(n)], pa.binary())),
    }
    nonces = {c: os.urandom(12 * n) for c in cols}
    together = native.seal_columns(keys, index, tokens, cols, force="native", nonces=nonces)
    for name, (prefix, vals) in cols.items():
        for force in ("native", "python"):
            alone = native.seal_column(keys, index, tokens, prefix, vals, force=force, nonces=nonces[name])
            assert together[name].equals(alone), (name, force)
        opened = native.open_column(keys, index, tokens, prefix, together[name], force="python")
        assert opened.to_pylist() == vals.cast(pa.binary()).to_pylist()
        assert together[name].null_count == vals.null_count
    # random nonces: every value opens, and no two sealed values repeat
    fresh = native.seal_columns(keys, index.slice(5, 9_000), tokens,
                                {c: (p, v.slice(5, 9_000)) for c, (p, v) in cols.items()})
    for name, (prefix, vals) in cols.items():
        opened = native.open_column(keys, index.slice(5, 9_000), tokens, prefix, fresh[name], force="native")
        assert opened.to_pylist() == vals.slice(5, 9_000).cast(pa.binary()).to_pylist()
    assert len(set(fresh["email"].to_pylist())) == 9_000
    # the nonces (bytes 1-12 of a sealed value), drawn in bulk for each chunk of rows (a ChaCha20
    # stream under a key from the OS for each draw): no two alike across chunks, columns and calls
    again = native.seal_columns(keys, index.slice(5, 9_000), tokens, {c: (p, v.slice(5, 9_000)) for c, (p, v) in cols.items()})
    drawn = [b[1:13] for t in (fresh, again) for col in t.values() for b in col.to_pylist() if b is not None]
    assert len(drawn) == 2 * (9_000 + 9_000 + len([x for x in cols["note"][1].slice(5, 9_000).to_pylist() if x is not None]))
    assert len(set(drawn)) == len(drawn) and bytes(12) not in drawn
    with pytest.raises(ValueError, match="has 3 values but there are 2 key indexes"):
        native.seal_columns(keys, index.slice(0, 2), tokens, {"a": (b"p", pa.array(["x", "y", "z"]))})


@pytest.mark.parametrize("force", BACKENDS)
def test_a_value_without_a_subject_is_refused(force: str):
    with pytest.raises(ValueError, match="position 1 has no subject key"):
        native.seal_column(os.urandom(32), pa.array([0, None], pa.int32()), pa.array(["sub_" + "a" * 26]), b"p",
                           pa.array(["a", "b"]), force=force)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_blind_indexes_strip_exactly_what_python_strips():
    spaces = [chr(c) for c in range(0x110000) if chr(c).isspace()]
    ids = [f"{s}id{i}{s}" for i, s in enumerate(spaces)] + ["a\u200bb", "\u200b", "ü", " mixed\tcase "]
    key = os.urandom(32)
    assert native.blind_indexes(key, pa.array(ids), force="native") == native.blind_indexes(key, pa.array(ids), force="python")
    for bad, msg in ((["ok", None], "position 1 is null"), (["ok", " \u3000\t"], "position 1 is empty")):
        for force in ("native", "python"):
            with pytest.raises(ValueError, match=msg):
                native.blind_indexes(key, pa.array(bad), force=force)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_batch_hash_is_the_same_bytes_on_both_backends():
    arr = pa.array(["a", None, "", "ü", None, "long" * 100])
    for piece in (arr, arr.slice(1, 4), pa.array([], pa.string()), pa.array([b"\x00\xff", None], pa.binary())):
        digests = set()
        for force in ("native", "python"):
            hs = native.Hasher(b"prefix", force=force)
            hs.update(b"|col|")
            hs.update_binary(piece)
            digests.add(hs.hexdigest())
        assert len(digests) == 1


# ---------------------------------------------------------------------- the key store's bulk path


@pytest.fixture()
def store(tmp_path: Path):
    s = KeyStore(tmp_path / "keystore.db", LocalKek(os.urandom(32), source="test"))
    yield s
    s.close()


def _python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "_native", None)
    monkeypatch.setattr(native, "_SHARED_SQLITE", False)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
@pytest.mark.parametrize("creator", ["native", "python"])
def test_subjects_made_by_one_path_are_found_by_the_other(store: KeyStore, creator: str, monkeypatch: pytest.MonkeyPatch):
    ids = pa.array(["alice", "bob", " alice ", "carol", "bob"])
    if creator == "python":
        with monkeypatch.context() as m:
            _python_path(m)
            made = store.subject_keys(ids, keys=True)
        found = store.subject_keys(ids, keys=True, create=False)
    else:
        made = store.subject_keys(ids, keys=True)
        with monkeypatch.context() as m:
            _python_path(m)
            found = store.subject_keys(ids, keys=True, create=False)
    toks = made.tokens.to_pylist()
    assert toks[0] == toks[2] and toks[1] == toks[4] and len(set(toks)) == 3
    assert found.tokens.to_pylist() == toks and found.keys == made.keys
    assert [made.keys[i * 32 : (i + 1) * 32] for i in range(5)] == [store.dek(t) for t in toks]
    assert store.stats()["subjects"] == 3
    unknown = store.subject_keys(pa.array(["dave", "alice"]), create=False, keys=True)
    assert unknown.tokens.to_pylist() == [None, toks[0]] and unknown.keys[:32] == bytes(32)
    assert store.stats()["subjects"] == 3


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_a_batch_of_mostly_new_people_keeps_the_few_it_already_knows(store: KeyStore, monkeypatch: pytest.MonkeyPatch):
    # 3,000 ids of which 60 (2%) exist: the native path reads a part of the run only for the ids
    # the run's filter may hold; the known 60 keep their tokens and keys.
    known = [f"k-{i:04d}" for i in range(60)]
    before = store.subject_keys(pa.array(known), keys=True)
    ids = known + [f"n-{i:05d}" for i in range(2940)] + known[:5]  # and a repeat within the batch
    random.Random(7).shuffle(ids)
    got = store.subject_keys(pa.array(ids), keys=True)
    tok = dict(zip(ids, got.tokens.to_pylist()))
    key = {i: got.keys[j * 32 : (j + 1) * 32] for j, i in enumerate(ids)}
    assert [tok[i] for i in known] == before.tokens.to_pylist()
    assert b"".join(key[i] for i in known) == before.keys
    assert len(set(tok.values())) == 3000 and store.stats()["subjects"] == 3000
    assert all(store.dek(tok[i]) == key[i] for i in ids[:50])
    with monkeypatch.context() as m:  # the Python path finds the same tokens and keys
        _python_path(m)
        again = store.subject_keys(pa.array(ids), keys=True, create=False)
    assert again.tokens.equals(got.tokens) and again.keys == got.keys
    # tokens alone (from the run's entry and the row id, no key block read) agree, and nothing new is made
    assert store.subject_keys(pa.array(ids)).tokens.equals(got.tokens)
    assert store.stats()["subjects"] == 3000


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_native_path_writes_what_the_python_path_writes(store: KeyStore):
    from governance.keys import runs

    tok = store.subject_keys(pa.array(["erin", "finn"])).tokens[0].as_py()
    con = sqlite3.connect(store.path)
    first, n, kid, created, wrapped = con.execute("SELECT first_id, n, kek_id, created_at, wrapped FROM keyblocks").fetchone()
    (entries,) = con.execute("SELECT entries FROM bi_parts").fetchone()
    (fences,) = con.execute("SELECT fences FROM bi_runs").fetchone()
    con.close()
    assert native.layout() == (runs.BLOCK, runs.PART, runs.ENTRY)  # the same sizes as the Python twin's
    (i,) = wire.token_ids(store._tkey, [tok])
    bi = wire.blind_index(store.system_key("blind-index"), "erin")
    assert (first, n, kid) == (1, 2, store.kek_id) and created.endswith("+00:00") and len(wrapped) == 120
    assert bi[:16] + i.to_bytes(8, "big") in (entries[:24], entries[24:]) and fences == entries[:8]  # the blind index's key
    assert store._kek.unwrap(wrapped[(i - 1) * 60 : i * 60], wire.dek_aad(tok)) == store.dek(tok)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_kept_connection_follows_the_file_and_sees_other_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The native core keeps its connection between calls (for SQLite's page cache). A store
    deleted and made again at the same path, without a close in between, is another file: its
    subjects go there, not into the deleted one. A subject that another connection (the Python
    path) shred or created between two native calls is seen by the next one."""
    path = tmp_path / "keystore.db"
    first = KeyStore(path, LocalKek(os.urandom(32), source="test"))
    assert first.subject_keys(pa.array(["ann", "ben"])).created == 2
    for f in tmp_path.iterdir():  # gone, with the store still open and the native connection kept
        f.unlink()
    second = KeyStore(path, LocalKek(os.urandom(32), source="test"))
    made = second.subject_keys(pa.array(["ann", "cal"]), keys=True)
    assert made.created == 2 and second.stats()["subjects"] == 2
    assert check_layout(path) == (2, {0: 1})
    ann = made.tokens[0].as_py()
    second.shred(ann)  # the Python connection writes between two native calls
    with monkeypatch.context() as m:
        _python_path(m)
        dan = second.subject_keys(pa.array(["dan"])).tokens[0].as_py()
    again = second.subject_keys(pa.array(["ann", "dan", "cal"]), keys=True)
    assert again.created == 1 and again.tokens[0].as_py() != ann  # shredded: a new subject, new token
    assert again.tokens[1].as_py() == dan and again.tokens[2].as_py() == made.tokens[1].as_py()
    assert again.keys[64:] == made.keys[32:]
    second.close()
    first.close()

    def open_here() -> list[str]:  # this process's open descriptors of the store file
        fds = Path("/proc/self/fd")
        return [str(f) for f in fds.iterdir() if os.path.realpath(f) == os.path.realpath(path)] if fds.is_dir() else []

    assert open_here() == []  # close released the native core's kept connections too
    # closed: a store opened again finds what the kept connection wrote
    with KeyStore(path, second._kek) as third:
        assert third.subject_keys(pa.array(["cal"]), create=False).tokens.to_pylist() == [made.tokens[1].as_py()]


@pytest.mark.skipif(not NATIVE, reason="native core not built")
@pytest.mark.parametrize("between", ["create", "shred"])
def test_another_writers_turn_between_the_blind_indexes_and_the_write_still_gives_one_key_per_subject(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, between: str):
    """Another writer's turn may come between a batch's blind indexes and its write transaction.
    "create": it creates the same people (and merges, at fan-out 2), so the write finds them in a
    run this process has never seen instead of making a second key each. "shred": it shreds a known
    subject, so the write makes that one again, with a new token."""
    from governance.keys import store as store_mod

    monkeypatch.setattr(store_mod, "FANOUT", 2)
    path = tmp_path / "keystore.db"
    kek = LocalKek(os.urandom(32), source="test")
    known = [f"known-{i:03d}" for i in range(40)]
    batch = [f"new-{i:05d}" for i in range(1_960)] + known
    with KeyStore(path, kek) as mine, KeyStore(path, kek) as other:
        before = mine.subject_keys(pa.array(known), keys=True)
        theirs: list = []

        def other_writer() -> None:
            with monkeypatch.context() as m:
                _python_path(m)
                if between == "create":
                    theirs.append(other.subject_keys(pa.array(batch), keys=True))
                else:
                    assert other.shred(before.tokens[0].as_py())

        resolve = native.resolve_subjects
        monkeypatch.setattr(native, "resolve_subjects", lambda *a, **k: resolve(*a, before_turn=other_writer, **k))
        got = mine.subject_keys(pa.array(batch), keys=True)
        monkeypatch.setattr(native, "resolve_subjects", resolve)
        live, levels = check_layout(path)
        assert live == len(batch) and len(set(got.tokens.to_pylist())) == len(batch)
        if between == "create":
            assert got.created == 0 and levels == {1: 1}  # their run and ours merged, by them
            assert got.tokens.equals(theirs[0].tokens) and got.keys == theirs[0].keys
        else:
            assert got.created == len(batch) - 39 and levels == {1: 1}
            old, new = before.tokens[0].as_py(), got.tokens[len(batch) - 40].as_py()
            assert new != old and mine.subject_state(old) == "shredded"
            assert got.tokens[-39:].equals(before.tokens[1:]) and got.keys[-39 * 32 :] == before.keys[32:]
        toks = got.tokens.to_pylist()
        assert all(mine.dek(toks[j]) == got.keys[j * 32 : (j + 1) * 32] for j in range(len(batch) - 45, len(batch)))


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_runs_filters_spare_reads_and_follow_other_writers_runs_shreds_and_merges(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The native core keeps a filter of each run in memory: made from what it wrote for its own
    runs, and by reading a run once a batch would read enough of it. Another writer (the Python
    path, as another process) adds runs, shreds and merges; after each step the next native batch
    finds every known subject (no second key), makes the new ones, and the layout holds."""
    from governance.keys import store as store_mod

    monkeypatch.setattr(store_mod, "FANOUT", 3)
    path = tmp_path / "keystore.db"

    def new(prefix: str, n: int) -> list[str]:
        return [f"{prefix}-{i:05d}" for i in range(n)]

    with KeyStore(path, LocalKek(os.urandom(32), source="test")) as st, KeyStore(path, st._kek) as other:
        made0, spared0 = native.run_filter_counts()
        first = st.subject_keys(pa.array(new("a", 3_000)))
        # its own run: a filter from what it wrote, no read; 1,100 new people spare their reads
        got = st.subject_keys(pa.array(new("b", 1_100) + new("a", 30)))
        made1, spared1 = native.run_filter_counts()
        assert made1 == made0 and spared1 - spared0 > 1_000
        assert got.created == 1_100 and got.tokens[-30:].equals(first.tokens[:30])
        assert check_layout(path) == (4_100, {0: 2})
        # the other writer adds a run, which completes level 0: merged into one run this process never saw
        with monkeypatch.context() as m:
            _python_path(m)
            theirs = other.subject_keys(pa.array(new("c", 2_000)))
        assert check_layout(path) == (6_100, {1: 1})
        batch = new("d", 1_100) + new("c", 40) + new("b", 5)
        got = st.subject_keys(pa.array(batch))
        assert got.created == 1_100 and got.tokens[-45:-5].equals(theirs.tokens[:40])
        assert native.run_filter_counts()[0] == made1 + 1  # the merged run read once, for its filter
        # a shred by the other writer: the filter still names the subject; it is made again, once
        with monkeypatch.context() as m:
            _python_path(m)
            assert other.shred(first.tokens[7].as_py())
        again = st.subject_keys(pa.array(new("a", 10)))
        assert again.created == 1 and again.tokens[7].as_py() != first.tokens[7].as_py()
        assert again.tokens[:7].equals(first.tokens[:7])
        assert check_layout(path) == (7_200, {0: 2, 1: 1})
        everyone = new("a", 3_000) + new("b", 1_100) + new("c", 2_000) + new("d", 1_100)
        assert st.subject_keys(pa.array(everyone), create=False).tokens.null_count == 0
        with monkeypatch.context() as m:
            _python_path(m)
            assert other.subject_keys(pa.array(everyone), create=False).tokens.equals(
                st.subject_keys(pa.array(everyone), create=False).tokens)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_a_run_shredded_whole_keeps_no_byte_of_it_and_its_people_come_back_new(tmp_path: Path):
    """Every subject of a run shredded: its parts are empty, its fences point past every key (no
    byte of their blind indexes left), and the same people ingested again are new subjects, once each."""
    path = tmp_path / "keystore.db"
    with KeyStore(path, LocalKek(os.urandom(32), source="test")) as ks:
        ids = pa.array([f"gone-{i:05d}" for i in range(1_100)])
        made = ks.subject_keys(ids)
        assert ks.shred_many(made.tokens.to_pylist()) == 1_100
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT part, length(entries) FROM bi_parts").fetchall() == [(0, 0), (1, 0)]
            assert db.execute("SELECT fences FROM bi_runs").fetchall() == [(b"\xff" * 16,)]
        assert check_layout(path) == (0, {0: 1})
        again = ks.subject_keys(ids)
        assert again.created == 1_100 and set(again.tokens.to_pylist()).isdisjoint(made.tokens.to_pylist())
        assert ks.subject_keys(ids, create=False).tokens.equals(again.tokens)
        assert check_layout(path) == (1_100, {0: 2})


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_a_merge_streams_runs_of_many_parts_into_one_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A merge reads its runs a part at a time: 150,000 subjects in two runs (98 and 49 parts of
    1,024) become one run of 147 parts in blind-index order, and every one is found with its token."""
    from governance.keys import store as store_mod

    monkeypatch.setattr(store_mod, "FANOUT", 2)
    path = tmp_path / "keystore.db"
    with KeyStore(path, LocalKek(os.urandom(32), source="test")) as ks:
        ids = pa.array([f"p-{i:06d}" for i in range(150_000)])
        first = ks.subject_keys(ids.slice(0, 100_000))
        assert check_layout(path) == (100_000, {0: 1})
        second = ks.subject_keys(ids.slice(100_000))
        assert first.created == 100_000 and second.created == 50_000
        assert check_layout(path) == (150_000, {1: 1})
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT count(*) FROM bi_parts").fetchone() == (147,)
        back = ks.subject_keys(ids, create=False)
        assert back.tokens.equals(pa.concat_arrays([first.tokens, second.tokens]))


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_batches_from_many_threads_get_one_key_per_subject_and_a_rotation_elsewhere_is_seen(store: KeyStore):
    """The native path holds no Python lock: its transactions serialize among themselves (threads
    here) and with SQLite's lock (other processes). Overlapping batches from 6 threads yield one
    token and key per subject. A KEK rotation committed through another handle (as another process
    would) is seen inside the next write transaction: nothing is wrapped under the old KEK."""
    from concurrent.futures import ThreadPoolExecutor

    ids = [f"p-{i:05d}" for i in range(6_000)]
    batches = [ids[i * 1_000 : i * 1_000 + 3_000] for i in range(4)] + [ids[::2], ids[::3]]  # overlapping
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda b: store.subject_keys(pa.array(b), keys=True), batches))
    seen: dict[str, tuple[str, bytes]] = {}
    for batch, got in zip(batches, results):
        for j, i in enumerate(batch):
            pair = (got.tokens[j].as_py(), got.keys[j * 32 : (j + 1) * 32])
            assert seen.setdefault(i, pair) == pair, i
    assert len(seen) == 6_000 and store.stats()["subjects"] == 6_000
    assert sum(r.created for r in results) == 6_000

    other = KeyStore(store.path, store._kek)  # another process's handle on the same file
    try:
        other.rotate_kek(LocalKek(os.urandom(32), source="rotated"))
    finally:
        other.close()
    with pytest.raises(KeyManagementError, match="rotated meanwhile"):
        store.subject_keys(pa.array(["someone-new"]), keys=True)
    con = sqlite3.connect(store.path)
    assert con.execute("SELECT count(DISTINCT kek_id) FROM keyblocks").fetchone() == (1,)
    con.close()
    assert check_layout(store.path)[0] == 6_000


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_native_path_names_a_tampered_key_and_a_foreign_kek(store: KeyStore, tmp_path: Path):
    tok = store.tokens_for(["frank"])[0]
    con = sqlite3.connect(store.path)
    con.execute("UPDATE keyblocks SET wrapped = ?", (os.urandom(60),))
    con.commit()
    with pytest.raises(DecryptionError, match=f"data key of subject {tok}"):
        store.subject_keys(pa.array(["frank"]), keys=True)
    con.execute("UPDATE keyblocks SET kek_id = 'kek-other'")
    con.commit()
    con.close()
    with pytest.raises(KeyManagementError, match="kek-other"):
        store.subject_keys(pa.array(["frank"]), keys=True)
    # Tokens alone do not involve the KEK (as on the Python path): they come from the run's entry
    # and the row id, without reading the key block.
    assert store.subject_keys(pa.array(["frank"])).tokens.to_pylist() == [tok]
    with pytest.raises(ValueError, match="position 1 is empty"):
        store.subject_keys(pa.array(["gina", "  "]))


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_a_shredded_subject_comes_back_with_a_new_token_on_both_paths(store: KeyStore, monkeypatch: pytest.MonkeyPatch):
    first = store.tokens_for(["hana"])[0]
    store.shred(first)
    second = store.subject_keys(pa.array(["hana"])).tokens[0].as_py()
    assert second != first and store.subject_state(first) == "shredded"
    store.shred(second)
    _python_path(monkeypatch)
    third = store.tokens_for(["hana"])[0]
    assert third not in (first, second) and store.subject_state(third) == "active"


# ---------------------------------------------------------------------- per-ingest sets (native only)


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_unique_set_marks_repeats_by_row_order_and_takes_back_rows_not_kept():
    s = native.UniqueSet()
    s.add(pa.array(["old", None]))
    vals = pa.array(["a", "b", "a", "c", "a", None, "old", "old", "d"])
    rows = pa.array([5, 1, 2, 3, 0, 4, 8, 7, 6], pa.int64())  # not in order: the lowest row is the first
    cand = pa.array([True, True, True, True, True, True, True, True, False])
    kinds = s.check(vals, rows, cand).tolist()
    # a: rows 5, 2, 0 -> row 0 (index 4) is first; old: was added before, row 7 first, row 8 a repeat;
    # null and not-a-candidate rows are never marked.
    assert kinds == [1, 0, 1, 0, 0, 0, 1, 2, 0]
    assert len(s) == 1 + 3  # "old", then a, b, c added by the check
    s.commit(pa.array([False, True, False, False, True, True, False, False, True]))  # c is not kept
    assert len(s) == 3
    again = s.check(pa.array(["c", "b", "a", "d"]), pa.array([10, 11, 12, 13], pa.int64()), pa.array([True] * 4))
    assert again.tolist() == [0, 2, 2, 0]  # c was taken back; d was never a candidate


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_unique_set_finds_values_across_its_merges_and_undoes_only_the_last_check():
    """Enough values that every shard folds its recent hashes into its sorted array many times
    (4,096 shards, a fold at 64 recent hashes or a sixteenth): what was added before or kept by a
    commit is found whichever side of a fold it is on; what a commit takes back is gone."""
    s = native.UniqueSet()
    s.add(pa.array([f"old-{i}" for i in range(300_000)]))  # about 73 a shard: one fold each
    assert len(s) == 300_000
    kept = 0
    for b in range(8):  # 8 batches of 120,000 new values, with one repeat of an old value each
        vals = pa.array([f"b{b}-{i}" for i in range(120_000)] + [f"old-{b}"])
        rows = pa.array(range(b * 200_000, b * 200_000 + len(vals)), pa.int64())
        kinds = s.check(vals, rows, pa.array([True] * len(vals)))
        assert kinds[-1] == native.UniqueSet.BEFORE and not kinds[:-1].any()
        keep = np.ones(len(vals), dtype=bool)
        keep[::7] = False  # quarantined for another reason: taken back
        keep[-1] = False
        s.commit(pa.array(keep))
        kept += int(keep.sum())
    assert len(s) == 300_000 + kept
    probe = pa.array(["old-299999", "b0-1", "b7-119999", "b0-0", "b3-7", "b5-14", "never"])
    kinds = s.check(probe, pa.array(range(len(probe)), pa.int64()), pa.array([True] * len(probe)))
    # b0-0, b3-7 and b5-14 were taken back (every 7th row), so they are new again
    assert kinds.tolist() == [2, 2, 2, 0, 0, 0, 0]


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_a_commit_takes_back_a_checked_value_even_after_an_add_folded_it():
    s = native.UniqueSet()
    kinds = s.check(pa.array(["x", "y"]), pa.array([0, 1], pa.int64()), pa.array([True, True]))
    assert kinds.tolist() == [0, 0]
    s.add(pa.array([f"v{i}" for i in range(600_000)]))  # every shard folds, "x" and "y" with it
    s.commit(pa.array([True, False]))  # y's row was quarantined for another reason
    assert len(s) == 600_001
    again = s.check(pa.array(["x", "y"]), pa.array([2, 3], pa.int64()), pa.array([True, True]))
    assert again.tolist() == [2, 0]


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_unique_set_compares_other_types_by_value():
    s = native.UniqueSet()
    s.add(pa.array([0.0, 2.5]))
    k = s.check(pa.array([-0.0, 2.5, 3.0, 3.0]), pa.array([1, 2, 3, 4], pa.int64()), pa.array([True] * 4))
    assert k.tolist() == [2, 2, 0, 1]
    d = native.UniqueSet()
    d.add(pa.array([20240101], pa.int64()))
    assert d.check(pa.array([20240101, 7], pa.int64()), pa.array([0, 1], pa.int64()), pa.array([True, True])).tolist() == [2, 0]


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_token_cache_answers_only_for_what_it_holds():
    c = native.TokenCache()
    c.insert(pa.array(["alice", "bob", None, "carol"]), pa.array(["sub_a", "sub_b", "sub_x", None]))
    assert len(c) == 2  # pairs with a null side are not cached
    c.insert(pa.array(["alice"]), pa.array(["sub_other"]))  # an id already cached keeps its token
    got = c.lookup(pa.array(["bob", None, "alice", "dave", "carol", "ålice"]).slice(0, 6))
    assert got.type == pa.string()
    assert got.to_pylist() == ["sub_b", None, "sub_a", None, None, None]
    assert c.lookup(pa.array(["x", "alice", "bob"]).slice(1)).to_pylist() == ["sub_a", "sub_b"]
    c.clear()
    assert len(c) == 0 and c.lookup(pa.array(["alice"])).to_pylist() == [None]


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_unique_columns_get_the_same_reasons_from_the_native_set_as_from_duckdb(monkeypatch: pytest.MonkeyPatch):
    """The validator's uniqueness on the native set and on DuckDB's hashes: the same rows, the
    same reasons, over batches with repeats within a batch, across batches and of a preloaded
    table, nulls, rows rejected by other rules, and a row that repeats one unique column but not
    another (its other value must not be remembered)."""
    import yaml

    from governance.policy import DatasetPolicy
    from lakehouse.validate import Validator

    doc = yaml.safe_load((Path(__file__).parents[1] / "policies" / "transactions.yaml").read_text(encoding="utf-8"))
    doc["columns"]["merchant_category"]["unique"] = True  # a second unique text column, often null
    doc["columns"]["seq"] = {"class": "public", "type": "int", "unique": True}  # and a numeric one
    pol = DatasetPolicy.model_validate(doc)
    rng = random.Random(11)

    def batch(n: int) -> pa.Table:
        rows = {k: [] for k in ["transaction_id", "customer_id", "ts", "amount", "merchant_category", "channel", "seq"]}
        for _ in range(n):
            rows["transaction_id"].append(f"T-{rng.randrange(900):012d}")
            rows["customer_id"].append(f"C{rng.randrange(50)}")
            rows["ts"].append("2024-03-01T10:00:00Z")
            rows["amount"].append(rng.choice(["12.5", "3", "-1", "oops"]) if rng.random() < 0.1 else "7.25")
            rows["merchant_category"].append(None if rng.random() < 0.3 else f"m{rng.randrange(1500)}")
            rows["channel"].append("card")
            rows["seq"].append(str(rng.randrange(2000)) if rng.random() < 0.9 else " ")
        return pa.table({k: pa.array(v, pa.string()) for k, v in rows.items()})

    batches = [batch(400) for _ in range(5)]
    preload = pa.chunked_array([pa.array([f"T-{i:012d}" for i in range(0, 900, 37)]), pa.array([None], pa.string())])

    def reasons(use_native: bool) -> list[tuple[int, str | None]]:
        if not use_native:
            monkeypatch.setattr(native, "unique_set", lambda: None)
        v = Validator(pol)
        assert (v._sets is not None) is use_native
        v.preload_unique("transaction_id", preload)
        got = []
        for i, b in enumerate(batches):
            out = v.validate(b, i * 400, None)
            got += zip(out["_row"].to_pylist(), out["_reason"].to_pylist())
        v.close()
        monkeypatch.undo()
        return sorted(got, key=lambda r: r[0])

    fast, reference = reasons(True), reasons(False)
    assert fast == reference
    said = {r for _, r in fast if r}
    for expected in ("transaction_id: duplicate value within the file", "transaction_id: duplicate of a value already ingested",
                     "merchant_category: duplicate value within the file", "merchant_category: duplicate of a value already ingested",
                     "seq: duplicate of a value already ingested", "amount: below the minimum 0"):
        assert expected in said


# ---------------------------------------------------------------------- contract rules (native only)

_NOISE = ["", " ", "  x ", "\t1", "1\n", "\u00a0 5 \u3000", "=1+1", "+1", "-x", "+ ", "-(", "@a", "é", "😀", "x" * 70,
          "é" * 7, "e\u0301" * 4, "\u2003", "\r", "-", "+é", None]
_BY_TYPE = {
    "int": ["0", "-5", "+7", "007", "1000", "1001", "-6", "1.5", "1.4", "1e3", "0x10", "1_000", "9223372036854775807",
            "99999999999999999999", "١٢", " 12 ", "-0", "123456789012345678"],
    "double": ["0", "-0.0", ".5", "1.", "1e3", "inf", "nan", "-1", "1000000.0000001", "999999.99999999999999",
               "123456789012345678901234567890", "1,5", "+.5", "-.5", "00.10", "1000000", "0.1", "2.5e-3", "."],
    "bool": ["true", "T", "YES", "y", "1", "0", "no", "maybe", "TRUE ", "ｔrue", "İ", "False", "N", "f"],
    "date": ["2024-02-29", "2023-02-29", "1899-12-31", "1900-01-01", "2024-1-5", "2024/01/05", "2999-01-01",
             "0001-01-01", "2024-01-05T00:00:00", "20240105", "2024-13-01", "2024-04-31", "1970-01-01", "0999-03-01",
             "2024-06-29", "2024-06-30"],  # "today" (the test's clock) and the day after
    "timestamp": ["2024-06-29T20:11:43.373338Z", "2024-06-29 20:11:43", "2024-06-29T20:11:43+02:00",
                  "2024-06-29T20:11:43-05:30", "2024-06-29", "2024-06-29T24:00:00Z", "2024-06-29T20:11:43.1234567Z",
                  "1999-12-31T23:59:59Z", "2000-01-01T00:30:00+01:00", "2000-01-01T00:00:00Z", "2999-01-01T00:00:00",
                  "2024-06-29T20:11:43+0200", "2024-06-29T20:11Z", "2024-06-29T20:11:60Z", "2024-06-29t20:11:43z",
                  "1969-12-31T23:59:59.5Z", "2024-02-29T12:00:00.1Z", "0999-03-01T00:00:00"],
    "string": ["AB-12", "AB-1234", "ab-12", "AB-", "a", "b", "é", "c", "A", "+49 30", "-1", "=SUM(A1)", "@x",
               "\tx", "x\t", "1234567", "12", "∂ab"],
}


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_native_contract_rules_give_duckdbs_answer_on_every_value():
    """The core decides the values it can decide exactly as the DuckDB query does, and leaves the
    rest to it: on ordinary, odd and hostile values of every type, rule and generalization, the two
    paths give the same reasons, typed values, generalized values and raw values of rejected rows."""
    import math

    import yaml

    from governance.policy import DatasetPolicy
    from lakehouse.validate import Validator

    doc = yaml.safe_load((Path(__file__).parents[1] / "policies" / "transactions.yaml").read_text(encoding="utf-8"))
    doc["subject_key"] = "sid"
    doc["columns"] = {
        "sid": {"class": "subject_key", "type": "string", "required": True, "max_length": 6},
        "code": {"class": "public", "type": "string", "max_length": 6, "pattern": "^[A-Z]{2}-[0-9]+$"},
        "kind": {"class": "public", "type": "string", "allowed": ["a", "b", "é"]},
        "n": {"class": "public", "type": "int", "min": -5, "max": 1000, "required": True},
        "x": {"class": "public", "type": "double", "min": 0, "max": 1000000},
        "flag": {"class": "public", "type": "bool"},
        "born": {"class": "quasi_identifier", "type": "date", "generalize": "year", "min": "1900-01-01", "max": "today"},
        "seen": {"class": "public", "type": "timestamp", "min": "2000-01-01", "max": "today"},
        "zip": {"class": "quasi_identifier", "type": "string", "generalize": "prefix:3"},
        "when": {"class": "quasi_identifier", "type": "timestamp", "generalize": "month"},
        "day": {"class": "quasi_identifier", "type": "date", "generalize": "month"},
        "income": {"class": "quasi_identifier", "type": "double", "generalize": "bucket:1000"},
        "age": {"class": "quasi_identifier", "type": "int", "generalize": "bucket:10"},
    }
    doc.pop("preprocess", None)
    doc["access"]["analyst"].pop("masks")
    pol = DatasetPolicy.model_validate(doc)
    rng = random.Random(2026)
    spaces = ["", "", "", " ", "  ", "\u00a0", "\u3000", "\t"]

    def value(typ: str) -> str | None:
        pool = _BY_TYPE[typ] if rng.random() < 0.75 else _NOISE
        v = rng.choice(pool)
        if v is not None and rng.random() < 0.2:
            v = rng.choice(spaces) + v + rng.choice(spaces)
        return v

    n = 3000
    cols = {name: pa.array([value(c["type"]) for _ in range(n)], pa.string()) for name, c in doc["columns"].items()}
    cols["sid"] = pa.array([rng.choice(["C1", " C2 ", "", None, "C-12345", "=C", "ÉÉÉÉÉÉ", "ÉÉÉÉÉÉÉ"])
                            if rng.random() < 0.2 else "C9" for _ in range(n)])
    # Later columns' rules are reached only on rows the earlier columns pass: make those common.
    for name in ("code", "kind"):
        cols[name] = pa.array([value(doc["columns"][name]["type"]) if rng.random() < 0.3 else None for _ in range(n)])
    batch = pa.table(cols)
    pre = pa.array([("sid: not valid UTF-8 text" if i % 97 == 0 else None) for i in range(n)], pa.string())
    from datetime import datetime, timezone

    # The clock stands on values of the pools: "today" is 2024-06-29, and the instant is the
    # second of "2024-06-29 20:11:43" (equal: not above), 0.37 s before "…43.373338Z" (above).
    now = datetime(2024, 6, 29, 20, 11, 43, tzinfo=timezone.utc)
    v = Validator(pol, clock=lambda: now)
    rows = pa.array(range(100, 100 + n), pa.int64())
    specs = v._native_specs(batch.schema, now)
    assert specs is not None
    seen_undecided = []
    check_text = native.check_text

    def recording(*a: object) -> tuple:
        res = check_text(*a)  # type: ignore[arg-type]
        seen_undecided.append(int(res[0].sum()))
        return res

    native.check_text = recording  # type: ignore[assignment]
    try:
        fast = v._check_native(batch, rows, pre, specs, now)
    finally:
        native.check_text = check_text  # type: ignore[assignment]
    assert 0 < seen_undecided[0] < n  # both paths are exercised
    reference = v._check_sql(batch, rows, pre, now)
    v.close()
    assert fast.schema == reference.schema

    def rows_of(t: pa.Table) -> list[dict]:
        def norm(x: object) -> object:
            return "NaN" if isinstance(x, float) and math.isnan(x) else x
        return sorted(({k: norm(x) for k, x in r.items()} for r in t.to_pylist()), key=lambda r: r["_row"])

    got, want = rows_of(fast), rows_of(reference)
    for g, w in zip(got, want):
        assert g == w, (g, w)
    assert len(got) == len(want) == n
    said = {r["_reason"] for r in want if r["_reason"]}
    for rule in ("sid: missing (required)", "sid: longer than 6 characters", "code: does not match the declared pattern",
                 "kind: not one of the allowed values", "n: not a valid int", "n: below the minimum -5",
                 "x: above the maximum 1e+06", "flag: not a valid bool", "born: below the minimum 1900-01-01",
                 "born: above the maximum today", "seen: below the minimum 2000-01-01", "seen: not a valid timestamp",
                 "sid: starts like a spreadsheet formula (CSV injection)", "sid: not valid UTF-8 text"):
        assert rule in said, rule


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_output_columns_are_handed_to_arrow_without_a_copy_and_outlive_the_call():
    """The core's output buffers reach Arrow through the buffer protocol, read-only, and the array
    made of them keeps them alive after every other reference is gone."""
    import gc

    values = [f"  value {i} " if i % 7 else None for i in range(5000)]
    parts = native._native.trim_text(native._col(pa.array(values)))
    offsets, data, validity, nulls = parts
    assert type(data).__name__ == "OwnedBuf" and nulls == sum(v is None for v in values)
    view = memoryview(data)
    assert view.readonly and len(view) == len(data)
    import ctypes

    with pytest.raises((BufferError, TypeError), match="not writable|read-only"):
        (ctypes.c_char * len(data)).from_buffer(data)  # asks for a writable view
    view.release()
    buf = pa.py_buffer(data)
    assert buf.address == pa.py_buffer(data).address  # the same memory, not a copy
    arr = native._from_parts(pa.string(), len(values), parts)
    del parts, offsets, data, validity, buf
    gc.collect()
    junk = [bytes(1000) for _ in range(2000)]  # reuse freed memory, if any were freed
    assert arr.to_pylist() == [None if v is None else v.strip() for v in values]
    del junk


def _pattern_values(rng: random.Random, n: int) -> list[str | None]:
    """Near misses of e-mail addresses, phone numbers and postcodes: valid ones with pieces
    swapped, doubled, dropped or replaced by hostile characters."""
    good = ["ann.lee+x@mail.example.org", "a@b.co", "A_1%b@x-y.io", "bob@host.c", "c@d.e1", "x@y", "@a.bc", "a@.bc",
            "a@b..cc", "a@b.cc.", "a@@b.cc", "a@b-.cc", "a.b@c.d.ef", "a@b.cdé", "é@b.cc", "a@b.cc\n", "a b@c.dd",
            "+1 474-555-0133", "+1 (474) 555.0133", "12345678", "1234567", "++12345678", "+12345678", "(12)345678",
            "12345678 ", "1" * 26, "1" * 27, "+" + "1" * 26, "+" + "1" * 27, "1" + " " * 25 + "1", "1-------1", "1..(())..1", "١٢٣٤٥٦٧٨",
            "12345", "54321", "1234", "123456", "0000", "00000", "1234a", "١٢٣٤٥", "12 345", "+1234"]
    bits = ["a", "Z", "0", "9", ".", "@", "+", "-", "_", "%", " ", "(", ")", "é", "\n", "\t", "..", "com", "x", "1", "\u00a0"]
    out: list[str | None] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            out.append(None)
        elif r < 0.5:
            out.append(rng.choice(good))
        elif r < 0.8:
            v = list(rng.choice(good))
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(v) + 1)
                op = rng.random()
                if op < 0.4 and v:
                    v[min(i, len(v) - 1)] = rng.choice(bits)
                elif op < 0.7:
                    v.insert(i, rng.choice(bits))
                elif v:
                    del v[min(i, len(v) - 1)]
            out.append("".join(v))
        else:
            out.append("".join(rng.choice(bits) for _ in range(rng.randint(1, 14))))
    return out


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_named_patterns_match_as_duckdbs_regular_expressions_do():
    """The core matches the named patterns (email, phone, zip5) itself: on valid values, near
    misses and hostile characters it rejects exactly the rows DuckDB's ``regexp_full_match`` of
    the patterns' text rejects, with the same reason, in every column that carries one."""
    from datetime import datetime, timezone

    import yaml

    from governance.policy import NAMED_PATTERNS, DatasetPolicy
    from lakehouse.validate import Validator

    doc = yaml.safe_load((Path(__file__).parents[1] / "policies" / "transactions.yaml").read_text(encoding="utf-8"))
    doc["subject_key"] = "sid"
    doc["columns"] = {
        "sid": {"class": "subject_key", "type": "string", "required": True},
        "mail": {"class": "public", "type": "string", "pattern": "email", "max_length": 24},
        "tel": {"class": "public", "type": "string", "pattern": "phone"},
        "post": {"class": "public", "type": "string", "pattern": "zip5", "allowed": ["12345", "00000", "1234"]},
        "own": {"class": "public", "type": "string", "pattern": NAMED_PATTERNS["zip5"]},  # the same text, not by name
    }
    doc.pop("preprocess", None)
    doc["access"]["analyst"].pop("masks")
    pol = DatasetPolicy.model_validate(doc)
    rng = random.Random(7)
    n = 6000
    # A column's rule is reached only on rows the columns before it pass: most rows pass the others.
    cols = {"sid": pa.array(["C1"] * n)}
    for name in ("mail", "tel", "post", "own"):
        cols[name] = pa.array([v if rng.random() < 0.25 else None for v in _pattern_values(rng, n)], pa.string())
    batch = pa.table(cols)
    now = datetime(2026, 12, 6, tzinfo=timezone.utc)
    v = Validator(pol, clock=lambda: now)
    specs = v._native_specs(batch.schema, now)
    assert specs is not None
    assert [s.pattern for s in specs] == [0, 1, 2, 3, 0]  # "own" goes to DuckDB's expressions
    rows = pa.array(range(n), pa.int64())
    fast = v._check_native(batch, rows, None, specs, now)
    reference = v._check_sql(batch, rows, None, now)
    v.close()
    got = sorted(zip(fast["_row"].to_pylist(), fast["_reason"].to_pylist()))
    want = sorted(zip(reference["_row"].to_pylist(), reference["_reason"].to_pylist()))
    assert got == want
    said = Counter(r for _, r in want if r)
    for rule in ("mail: does not match the email pattern", "tel: does not match the phone pattern",
                 "mail: longer than 24 characters", "post: does not match the zip5 pattern",
                 "post: not one of the allowed values", "own: does not match the declared pattern"):
        assert said[rule] >= 5, (rule, said)
    assert sum(1 for _, r in want if r is None) >= 200  # and many rows pass every pattern


@pytest.mark.skipif(not NATIVE, reason="native core not built")
def test_the_per_ingest_sets_serve_many_threads_at_once():
    """Lookups and inserts from several threads, as an ingest's check threads make them: every
    thread finishes (the sets take their locks without the GIL) and every answer is right."""
    import threading

    cache, seen = native.TokenCache(), native.UniqueSet()
    ids = [f"id{i}" for i in range(20_000)]
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            rng = random.Random(k)
            for _ in range(30):
                pick = pa.array(rng.sample(ids, 2_000))
                got = cache.lookup(pick).to_pylist()
                assert all(t is None or t == "t_" + i for t, i in zip(got, pick.to_pylist()))
                cache.insert(pick, pa.array(["t_" + i for i in pick.to_pylist()]))
                seen.add(pick)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and not errors
    assert cache.lookup(pa.array(ids)).null_count == 20_000 - len(cache)
    assert len(seen) == len(cache)
