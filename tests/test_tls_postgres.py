"""TLS in transit for the key store's database (issue #19).

One PostgreSQL server per module (Debian's package, loopback) that speaks TLS only, with a
certificate from a fresh :class:`~governance.tls.LocalCA`: the key store works over
``sslmode=verify-full`` and its session is really encrypted; a client that does not trust the CA,
or names a host the certificate does not carry, and a connection without TLS are refused with a
message that names the server and the cause; with ``auth.enabled`` a DSN that does not verify the
server is refused before anything connects; no key or password shows in the server's arguments
or its log.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import quote

import pytest

from governance.errors import KeyManagementError
from governance.keys import LocalKek, generate_kek_b64
from governance.tls import LocalCA, PlaintextRefused

KEK_VAR = "LAKEWARDEN_TLS_TEST_KEK"


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory: pytest.TempPathFactory):
    """A TLS-only server (certificate for 127.0.0.1 only, from a CA of its own). Skipped when
    PostgreSQL is not installed, unless LAKEWARDEN_REQUIRE_POSTGRES=1 (as conftest's ``postgres``)."""
    from governance.keys.pgserver import LocalPostgres, PostgresError

    ca = LocalCA.create("Lakewarden TLS test CA")
    try:
        pg = LocalPostgres(tmp_path_factory.mktemp("pgtls"), tls=ca.issue_server(["127.0.0.1"])).start()
    except PostgresError as exc:
        if os.environ.get("LAKEWARDEN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL did not start: {exc}")
        pytest.skip(f"PostgreSQL did not start: {exc}")
    yield pg
    pg.remove()


@pytest.fixture(autouse=True)
def _pgpassword(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """PGPASSWORD of the module's server, for the tests that reach it."""
    if "tls_pg" in request.fixturenames:
        for k, v in request.getfixturevalue("tls_pg").env().items():
            monkeypatch.setenv(k, v)


@pytest.fixture
def db(tls_pg) -> str:
    """A new, empty database on the module's server (each test's key store its own); its name."""
    import uuid

    import psycopg

    name = "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(tls_pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


def _kek(tag: str) -> LocalKek:
    return LocalKek(os.urandom(32), source=tag)


def _plain(pg, query: str = "", host: str = "127.0.0.1", port: int | None = None, db: str | None = None) -> str:
    """The server's DSN with ``query`` instead of its TLS parameters."""
    return f"postgresql://{pg.USER}@{host}:{port or pg.port}/{db or pg.DB}" + (f"?{query}" if query else "")


def _project(folder: Path, store: str, *, auth: bool) -> Path:
    """A lakewarden.yaml whose key store is ``store`` (auth on: a loopback issuer never reached)."""
    folder.mkdir(parents=True, exist_ok=True)
    text = ("version: 1\nname: tlstest\nstorage: {root: .lakewarden/tables}\n"
            f"keys: {{store: '{store}', kek: {{provider: env, var: {KEK_VAR}}}}}\n")
    if auth:
        text += "auth: {enabled: true, issuer: 'http://127.0.0.1:9/realms/lakewarden', audience: lakewarden-predictor}\n"
    (folder / "lakewarden.yaml").write_text(text)
    return folder / "lakewarden.yaml"


def test_the_key_store_round_trips_over_verified_tls_and_the_session_is_encrypted(tls_pg, db: str):
    from governance.keys.pgstore import PgKeyStore, verifies_server

    dsn = tls_pg.dsn_for(db)
    assert verifies_server(dsn) and "sslmode=verify-full" in dsn
    kek = _kek("tls")
    with PgKeyStore(dsn, kek) as st:
        ssl, version = st._db().execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
        assert ssl is True and version.startswith("TLS")  # the store's own session, not a new one
        alice, bob = st.tokens_for(["alice@example.org", "bob@example.org"])
        dek = st.dek(alice)
        assert st.shred(bob) and st.subject_state(bob) == "shredded"
    with PgKeyStore(dsn, kek) as st:
        assert st.tokens_for(["alice@example.org"], create=False) == [alice] and st.dek(alice) == dek


def test_a_client_that_does_not_trust_the_ca_is_refused_with_a_clear_error(tls_pg, tmp_path: Path):
    from governance.keys.pgstore import PgKeyStore

    other = LocalCA.create("someone else's CA").write_cert(tmp_path / "other-ca.pem")
    dsn = _plain(tls_pg, f"sslmode=verify-full&sslrootcert={quote(str(other), safe='/')}")
    with pytest.raises(KeyManagementError) as exc:
        PgKeyStore(dsn, _kek("x"))
    msg = str(exc.value)
    assert f"127.0.0.1:{tls_pg.port}" in msg and "not signed by a CA this client trusts" in msg
    assert "sslrootcert" in msg and exc.value.__cause__ is None and "Traceback" not in msg
    # the right CA, but a host name the certificate does not carry (it names 127.0.0.1 only)
    ca = quote(str(tls_pg.ca_file), safe="/")
    with pytest.raises(KeyManagementError, match=r"certificate does not name this host .*localhost"):
        PgKeyStore(_plain(tls_pg, f"sslmode=verify-full&sslrootcert={ca}", host="localhost"), _kek("x"))
    with pytest.raises(KeyManagementError, match="CA certificate to verify the server by cannot be read"):
        PgKeyStore(_plain(tls_pg, f"sslmode=verify-full&sslrootcert={tmp_path}/missing.pem"), _kek("x"))


def test_a_connection_without_tls_is_refused_by_the_server(tls_pg):
    import psycopg

    from governance.keys.pgstore import PgKeyStore

    with pytest.raises(psycopg.OperationalError, match="pg_hba.conf rejects connection .* no encryption"):
        psycopg.connect(_plain(tls_pg, "sslmode=disable"), connect_timeout=10)
    with pytest.raises(KeyManagementError) as exc:
        PgKeyStore(_plain(tls_pg, "sslmode=disable"), _kek("x"))
    assert f"127.0.0.1:{tls_pg.port}" in str(exc.value) and "accepts only TLS connections" in str(exc.value)
    assert "sslmode=verify-full" in str(exc.value)  # the hint says what to write


def test_with_auth_on_a_dsn_that_does_not_verify_the_server_is_refused_before_connecting(
        tls_pg, db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import psycopg

    from governance.config import load_config
    from governance.keys.pgserver import _free_port
    from governance.keys.pgstore import PgKeyStore
    from governance.workspace import Workspace

    monkeypatch.delenv(KEK_VAR, raising=False)  # refused before the KEK is read: no KEK needed to be told
    dead = _free_port()  # nothing listens there: a connection attempt would be a connection error
    for query in ("", "sslmode=require", "sslmode=prefer", "sslmode=disable",
                  "sslmode=verify-full&sslmode=require"):
        for port in (tls_pg.port, dead):
            cfg = load_config(_project(tmp_path / f"p{port}{len(query)}", _plain(tls_pg, query, port=port), auth=True))
            with pytest.raises(PlaintextRefused) as exc:
                Workspace(cfg).keyring
            assert exc.value.exit_code == 2
            assert "auth is on" in str(exc.value) and f"127.0.0.1:{port}" in str(exc.value)
            assert "sslmode=verify-full" in str(exc.value)  # the hint
    # the store itself refuses too, given the config, without calling the driver
    with monkeypatch.context() as m:
        m.setattr(psycopg, "connect", lambda *a, **k: pytest.fail("connected despite auth being on"))
        with pytest.raises(PlaintextRefused):
            PgKeyStore(_plain(tls_pg, "sslmode=require"), _kek("x"), config=cfg)

    # auth off (laptop mode): the same DSN is accepted. libpq's default (prefer) still negotiates
    # TLS with this server, which is what its pg_hba.conf demands
    monkeypatch.setenv(KEK_VAR, generate_kek_b64())
    with Workspace.open(_project(tmp_path / "laptop", _plain(tls_pg, db=db), auth=False)) as ws:
        assert ws.keyring.token_for("carol@example.org")
    with pytest.raises(KeyManagementError, match="cannot open key store") as exc:
        Workspace.open(_project(tmp_path / "laptop-dead", _plain(tls_pg, port=dead), auth=False)).keyring
    assert not isinstance(exc.value, PlaintextRefused)  # it tried to connect: nothing listens there
    # auth on with verify-full: accepted, and the workspace's store works
    with Workspace.open(_project(tmp_path / "secure", tls_pg.dsn_for(db), auth=True)) as ws:
        assert ws.config.auth.enabled and ws.keyring.token_for("dave@example.org")


def test_no_key_or_password_in_the_servers_arguments_or_log(tls_pg, db: str):
    import psycopg

    from governance.keys.pgstore import PgKeyStore

    with PgKeyStore(tls_pg.dsn_for(db), _kek("log")):  # a login over TLS, so the log has something in it
        pass
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_plain(tls_pg, "sslmode=disable"), connect_timeout=10)  # a rejected one too
    key_file = tls_pg.base / "server.key"
    key_pem = key_file.read_text()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    if os.geteuid() == 0:
        import pwd

        assert pwd.getpwuid(key_file.stat().st_uid).pw_name == "postgres"
    body = "".join(line for line in key_pem.splitlines() if not line.startswith("-----"))
    secrets = {"password": tls_pg.password, "key": body, "key body (a line of it)": key_pem.splitlines()[1],
               "key header": "PRIVATE KEY"}
    main = int((tls_pg.data / "postmaster.pid").read_text().split()[0])
    pids = [main]
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == main:
                    pids.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    assert len(pids) > 1  # the postmaster and its workers
    for pid in pids:
        try:
            argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\x00", b" ").decode()
        except OSError:
            continue  # a worker that ended meanwhile
        for what, s in secrets.items():
            assert s not in argv, f"the {what} is in the arguments of process {pid}"
        if pid == main:
            assert "ssl=on" in argv and f"ssl_key_file={key_file}" in argv  # the file's name only
    log = (tls_pg.base / "server.log").read_text()
    assert log.strip()
    for what, s in secrets.items():
        assert s not in log, f"the {what} is in the server's log"


def test_the_config_accepts_tls_parameters_and_refuses_a_client_key_passphrase():
    from governance.config import dsn_problem

    assert dsn_problem("postgresql://u@db.example:5432/keys?sslmode=verify-full&sslrootcert=/etc/lw/ca.pem") is None
    assert dsn_problem("postgresql://u@db.example/keys?sslmode=verify-ca&sslrootcert=/etc/lw/ca.pem") is None
    assert "password" in dsn_problem("postgresql://u@db.example/keys?sslmode=verify-full&sslpassword=hunter2")
    assert "verify-full" in dsn_problem("postgresql://u@db.example/keys?sslmode=verify_full")
