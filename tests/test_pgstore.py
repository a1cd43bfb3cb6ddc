"""The key store on PostgreSQL (issue #17): the same interface as the SQLite store, many writers
at once, and a shred that stays final on a server that keeps deleted bytes (heap, WAL) — because
the KEK generation that wraps the residual copies is retired.

The server is Debian's PostgreSQL, started once per session on loopback (conftest ``postgres``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from governance.errors import DecryptionError, KeyManagementError, SubjectShredded
from governance.keys import LocalKek
from governance.keys.store import TOKEN_RE, _DEK_AAD

REPO = Path(__file__).resolve().parents[1]


def _kek(tag: str) -> LocalKek:
    return LocalKek(os.urandom(32), source=tag)


def test_the_postgresql_store_keeps_the_key_store_contract(postgres_db: str):
    from governance.keys.pgstore import PgKeyStore

    kek = _kek("a")
    with PgKeyStore(postgres_db, kek) as st:
        a, b, a2 = st.tokens_for(["alice", "bob", " alice "])
        assert a == a2 != b and TOKEN_RE.match(a) and TOKEN_RE.match(b)  # ids are stripped, as on SQLite
        assert st.tokens_for(["alice", "carol"], create=False) == [a, None]
        got = st.subject_keys(pa.array(["bob", "alice", "dave"]), keys=True)
        assert got.tokens.to_pylist()[:2] == [b, a] and TOKEN_RE.match(got.tokens[2].as_py())
        assert got.keys[:32] == st.dek(b) and got.keys[32:64] == st.dek(a)
        assert st.system_key("audit-signing") == st.system_key("audit-signing")
        assert st.subject_state(a) == "active" and st.shred(a) and not st.shred(a)
        assert st.subject_state(a) == "shredded"
        with pytest.raises(SubjectShredded):
            st.dek(a)
        assert st.tokens_for(["alice"])[0] != a  # the same id after a shred: a new, unrelated token
        assert st.stats()["subjects"] == 3 and st.stats()["shredded"] == 1  # bob, dave, the new alice
    with pytest.raises(KeyManagementError, match="wrapped by KEK"):
        PgKeyStore(postgres_db, _kek("other"))  # another KEK is refused by name
    with PgKeyStore(postgres_db, kek) as st:  # and the right one opens what was stored
        assert st.tokens_for(["bob"], create=False) == [b]


def test_a_dsn_with_a_password_is_refused(tmp_path: Path):
    from governance.config import load_config
    from governance.errors import ConfigError
    from governance.keys.pgstore import PgKeyStore

    with pytest.raises(KeyManagementError, match="PGPASSWORD"):
        PgKeyStore("postgresql://u:hunter2hunter2@127.0.0.1:5432/db", _kek("a"))
    (tmp_path / "lakewarden.yaml").write_text(
        "version: 1\nkeys: {store: 'postgresql://u:hunter2hunter2@127.0.0.1/db', kek: {provider: env, var: K}}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "lakewarden.yaml")
    assert "PGPASSWORD" in str(exc.value) and "hunter2" not in str(exc.value)


def _create(dsn: str, kek_raw: bytes, password: str, rounds: int, out) -> None:
    os.environ["PGPASSWORD"] = password
    from governance.keys import LocalKek
    from governance.keys.pgstore import PgKeyStore

    with PgKeyStore(dsn, LocalKek(kek_raw, source="race")) as st:
        res = []
        for r in range(rounds):
            ids = pa.array([f"P{r}-{i:05d}" for i in range(3000)])
            got = st.subject_keys(ids, keys=True)
            res.append((got.tokens.to_pylist(), got.keys))
    out.put(res)


def test_many_writers_creating_the_same_subjects_at_once_make_one_key_each(postgres_db: str, postgres):
    from governance.keys.pgstore import PgKeyStore

    raw = os.urandom(32)
    with PgKeyStore(postgres_db, LocalKek(raw, source="race")):
        pass  # the schema and system keys first, as a deployment would
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_create, args=(postgres_db, raw, postgres.password, 3, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    for r in range(3):
        tokens = {tuple(res[r][0]) for res in results}
        keys = {res[r][1] for res in results}
        assert len(tokens) == 1 and len(keys) == 1  # every writer got the same token and key per subject
        assert len(set(next(iter(tokens)))) == 3000 and None not in next(iter(tokens))
    with PgKeyStore(postgres_db, LocalKek(raw, source="race")) as st:
        assert st.stats()["subjects"] == 9000  # no duplicates, none lost


def _files_holding(root: Path, needle: bytes) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    out.append(p)
            except OSError:
                continue
    return out


def test_a_shred_is_final_once_its_kek_generation_is_retired(postgres_db: str, postgres):
    """The deleted row's wrapped key stays in the server's own files (heap, WAL): before the
    generation is retired it opens with the old KEK; after :meth:`rotate_kek`, no copy left in
    those files opens with the KEK that remains, and the live keys are unchanged."""
    import psycopg

    from governance.keys.pgstore import PgKeyStore

    old, new = _kek("gen1"), _kek("gen2")
    with PgKeyStore(postgres_db, old) as st:
        victim, keeper = st.tokens_for(["victim@example.org", "keeper@example.org"])
        dek_victim, dek_keeper = st.dek(victim), st.dek(keeper)
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            blob = bytes(conn.execute("SELECT wrapped_dek FROM lakewarden.subjects WHERE token = %s",
                                      (victim,)).fetchone()[0])
        assert st.shred(victim)
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
        residual = _files_holding(postgres.data, blob)
        assert residual, "expected the deleted row's bytes in the server's files (WAL at least)"
        assert old.unwrap(blob, _DEK_AAD + victim.encode()) == dek_victim  # the threat is real before retiring
        assert st.rotate_kek(new) >= 1
        with psycopg.connect(postgres_db, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
            live = {r[0] for r in conn.execute("SELECT DISTINCT kek_id FROM lakewarden.subjects UNION "
                                               "SELECT DISTINCT kek_id FROM lakewarden.meta")}
        assert live == {new.key_id}  # nothing live needs the retired generation: it can be destroyed
        for f in _files_holding(postgres.data, blob):  # whatever copies remain, the KEK left cannot open them
            with pytest.raises(DecryptionError):
                new.unwrap(blob, _DEK_AAD + victim.encode())
            assert f.exists()
        assert st.dek(keeper) == dek_keeper
    with pytest.raises(KeyManagementError, match="wrapped by KEK"):
        PgKeyStore(postgres_db, old)  # the retired generation opens nothing


def test_a_workspace_on_the_shared_key_store_ingests_and_erases(postgres_db: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    import csv

    from governance.erasure import file_request, request_status, run_request
    from governance.keys import generate_kek_b64
    from governance.workspace import Workspace
    from lakehouse.ingest import ingest
    from lakehouse.synth import generate

    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    proj = tmp_path / "proj"
    shutil.copytree(REPO / "policies", proj / "policies")
    (proj / "lakewarden.yaml").write_text(
        "version: 1\nname: pg\nstorage: {root: .lakewarden/tables}\n"
        f"keys: {{store: '{postgres_db}', kek: {{provider: env, var: LAKEWARDEN_KEK}}}}\n"
        "policies: [policies/*.yaml]\n"
    )
    res = generate(tmp_path / "landing", people=80, transactions_per_person=2, seed=21)
    with open(res.files["customers"], newline="") as fh:
        sid = next(r["customer_id"] for r in csv.DictReader(fh) if r["customer_id"])
    assert not (proj / ".lakewarden" / "keys").exists()
    with Workspace.open(proj / "lakewarden.yaml") as ws:
        for ds in ("customers", "transactions"):
            assert ingest(ws, ws.actor("dana"), ds, [res.files[ds]]).rows_accepted > 0
        tok = ws.keyring.token_for(sid, create=False)
        carla = ws.actor("carla")
        st = run_request(ws, carla, file_request(ws, carla, "erase", [sid]).request_id, purge_now=True)
        assert st.state == "done", st.detail.get("findings")
        assert ws.keyring.store.subject_state(tok) == "shredded"
        # the verb retires the generation and says what destroying the old KEK makes final
        from governance.key_ops import rotate_kek

        monkeypatch.setenv("LAKEWARDEN_NEW_KEK", generate_kek_b64())
        r = rotate_kek(ws, carla, new_kek_env="LAKEWARDEN_NEW_KEK")
        assert r.rewrapped > 0 and r.residual and r.old_kek in r.residual and "final" in r.residual
        excluded = request_status(ws, carla, st.request_id).detail["verification"]["excluded"]
        assert any("PostgreSQL" in e and "KEK generation" in e for e in excluded)  # the certificate says what it left out
    assert not (proj / ".lakewarden" / "keys").exists()  # no SQLite file was made beside it
