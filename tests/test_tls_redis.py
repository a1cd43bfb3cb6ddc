"""The Redis online store over TLS (issue #19): a real redis-server serving TLS only, with a
certificate of the local CA (governance/tls.py) and a password (requirepass).

Features are materialized and read through the normal Features API over TLS and match SQLite;
a client that does not trust the CA, one whose certificate does not name the host, and a plain
client are refused with one clear error; with auth on, plaintext (or TLS that verifies nothing) is
refused before any connection; the password comes only from $LAKEWARDEN_REDIS_PASSWORD and
lands in no file, log, audit event, error message or process argument.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_helpers import server_env
from conftest import make_project
from test_features import PROFILE, _erase, fill, tok

from governance.errors import ConfigError
from governance.tls import LocalCA, PlaintextRefused
from governance.workspace import Workspace
from features.online import PASSWORD_ENV, OnlineStoreError, feast_connection_string, redis_client
from features.store import Features
from lakehouse.catalog import Catalog, TableRef

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
ISSUER = "https://idp.example/realms/lakewarden"  # auth.enabled needs one; nothing here talks to it


@dataclass(frozen=True)
class TlsRedis:
    port: int
    ca_file: Path    # the CA clients trust
    password: str    # requirepass: handed over on stdin, never in argv or a file
    pid: int
    folder: Path     # the server's certificates, key and log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """Debian's redis-server serving TLS only (``port 0``) on 127.0.0.1 and 127.0.0.2, its certificate
    from a local CA for 127.0.0.1/::1/localhost, and a random password. The configuration, password
    included, is read from stdin (``redis-server -``): it is in no file and not in the arguments."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("LAKEWARDEN_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
        pytest.skip("redis-server is not installed")
    d = tmp_path_factory.mktemp("tlsredis")
    ca = LocalCA.create("redis test CA")
    cert = ca.issue_server()
    key_file = cert.write_pem(d / "server.pem")          # key + chain, 0600
    chain_file = d / "chain.pem"
    chain_file.write_bytes(cert.cert_pem)
    ca_file = ca.write_cert(d / "ca.pem")
    password = secrets.token_hex(24)
    port = _free_port()
    conf = (f"port 0\nbind 127.0.0.1 127.0.0.2\ntls-port {port}\ntls-cert-file {chain_file}\n"
            f"tls-key-file {key_file}\ntls-ca-cert-file {ca_file}\ntls-auth-clients no\n"
            f"requirepass {password}\nsave \"\"\nappendonly no\ndir {d}\nlogfile {d / 'redis.log'}\n")
    p = subprocess.Popen([exe, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=server_env())
    assert p.stdin is not None
    p.stdin.write(conf.encode())
    p.stdin.close()
    deadline = time.time() + 20
    while time.time() < deadline and p.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        log = (d / "redis.log").read_text(errors="replace") if (d / "redis.log").exists() else ""
        p.kill()
        pytest.fail(f"redis-server with TLS did not start: {log[-2000:]}")
    yield TlsRedis(port, ca_file, password, p.pid, d)
    p.terminate()
    p.wait(10)


@pytest.fixture
def redis_password(tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(PASSWORD_ENV, tls_redis.password)
    return tls_redis.password


@pytest.fixture(scope="module")
def tls_lake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """One lake (SQLite online store) for the test that compares it with Redis over TLS."""
    root = tmp_path_factory.mktemp("tlslake")
    with pytest.MonkeyPatch.context() as mp:
        ws = Workspace.open(make_project(root / "proj", mp) / "lakewarden.yaml")
        yield fill(ws, root / "landing")
        ws.close()


def redis_config(project: Path, connection_string: str, *, name: str, auth: bool = False) -> Path:
    """``lakewarden-<name>.yaml`` beside the project's configuration (the same tables, keys and audit)
    with the Redis online store at ``connection_string`` and a Feast registry of its own."""
    text = (project / "lakewarden.yaml").read_text()
    text += (f"features:\n  registry: .lakewarden/feast/registry-{name}.db\n"
             f"  online: {{type: redis, connection_string: '{connection_string}'}}\n")
    if auth:
        text += f"auth: {{enabled: true, issuer: '{ISSUER}'}}\n"
    path = project / f"lakewarden-{name}.yaml"
    path.write_text(text)
    return path


def tls_string(r: TlsRedis, *, db: int, host: str = "127.0.0.1", ca: Path | None = None, extra: str = "") -> str:
    return f"{host}:{r.port},db={db},ssl=true,ssl_ca_certs={ca or r.ca_file},ssl_cert_reqs=required{extra}"


def _files_holding(folder: Path, secret: str) -> list[Path]:
    return [f for f in folder.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]


# -- features over TLS ---------------------------------------------------------------------------
def test_features_over_tls_with_auth_on_match_sqlite_and_the_password_stays_secret(
        tls_lake: Workspace, tls_redis: TlsRedis, redis_password: str, caplog: pytest.LogCaptureFixture,
        capfd: pytest.CaptureFixture[str]):
    import ssl

    caplog.set_level(logging.DEBUG)
    project = tls_lake.config.base_dir
    tokens = Catalog(tls_lake.config).open(TableRef("silver", "customers")).to_pyarrow_table(
        columns=["customer_id"])["customer_id"].to_pylist()
    want = Features(tls_lake).online(tls_lake.actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=tokens)
    ws = Workspace.open(redis_config(project, tls_string(tls_redis, db=1), name="tls", auth=True))
    try:
        assert ws.config.auth.enabled
        fs = Features(ws)
        fs.apply(ws.service_actor("pipeline"))
        fs.materialize(ws.service_actor("pipeline"))
        got = fs.online(ws.service_actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=tokens)
        assert got.to_pylist() == want.to_pylist()
        # Feast's own client: TLS, the CA verified, the host name checked (redis-py's defaults, kept).
        feast_client = fs.store._get_provider().online_store._client
        for client in (feast_client, redis_client(ws)):
            pool = client.connection_pool
            assert pool.connection_class.__name__ == "SSLConnection"
            conn = pool.make_connection()
            assert (conn.cert_reqs, conn.check_hostname, conn.ca_certs) == (ssl.CERT_REQUIRED, True, str(tls_redis.ca_file))
        # The erasure handler reaches the same database through features/online.py.
        assert _erase(ws, tokens[0], layers=("features",))["online:customer_profile"] == 1
        again = fs.online(ws.service_actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=[tokens[0]])
        assert again["income"][0].as_py() is None
        # A failure inside Feast (here: its client made to distrust the server) is one clear error too.
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        other_ca = LocalCA.create("another CA").write_cert(tls_redis.folder / "other-ca.pem")
        fs.store._get_provider().online_store._client = type(feast_client)(
            host="127.0.0.1", port=tls_redis.port, db=1, ssl=True, ssl_ca_certs=str(other_ca), password=redis_password,
            retry=Retry(NoBackoff(), 0))
        with pytest.raises(OnlineStoreError, match=f"TLS certificate of Redis at 127.0.0.1:{tls_redis.port} db 1 is not "
                                                   "trusted") as e:
            fs.online(ws.service_actor("mel"), purpose="credit_scoring", features=PROFILE, tokens=tokens[:1])
        assert e.value.__suppress_context__ and redis_password not in str(e.value)
        ws.audit.flush()
        events = str(ws.audit.query().to_pylist()) + str(ws.lineage.events())
    finally:
        ws.close()
    # The password: in no file (configuration, Feast's registry and repo folder, tables, the server's
    # folder), no audit or lineage event, no log line or output, not in the server's arguments.
    assert (project / ".lakewarden" / "feast").is_dir()
    assert _files_holding(project, redis_password) == [] and _files_holding(tls_redis.folder, redis_password) == []
    assert redis_password not in events
    out = capfd.readouterr()
    assert redis_password not in caplog.text + out.out + out.err
    assert redis_password.encode() not in Path(f"/proc/{tls_redis.pid}/cmdline").read_bytes()


def test_the_server_certificate_must_name_the_host_connected_to(project: Path, tls_redis: TlsRedis,
                                                                 redis_password: str):
    """127.0.0.2 reaches the same server, but its certificate names 127.0.0.1, ::1 and localhost only."""
    ws = Workspace.open(redis_config(project, tls_string(tls_redis, db=2, host="127.0.0.2"), name="mismatch"))
    with pytest.raises(OnlineStoreError) as e:
        redis_client(ws)
    msg = str(e.value)
    assert f"TLS certificate of Redis at 127.0.0.2:{tls_redis.port} db 2 is not trusted" in msg, msg
    assert "127.0.0.2" in msg and redis_password not in msg
    ws.close()


def test_a_client_that_does_not_trust_the_ca_is_refused_with_one_clear_error(project: Path, tls_redis: TlsRedis,
                                                                             redis_password: str):
    other_ca = LocalCA.create("another CA").write_cert(project / "other-ca.pem")
    ws = Workspace.open(redis_config(project, tls_string(tls_redis, db=3, ca=other_ca), name="untrusted"))
    for call in (lambda: redis_client(ws), lambda: Features(ws).apply(ws.service_actor("pipeline"))):
        with pytest.raises(OnlineStoreError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"the TLS certificate of Redis at 127.0.0.1:{tls_redis.port} db 3 is not trusted: refused")
        assert "CERTIFICATE_VERIFY_FAILED" in msg and "ssl_ca_certs" in e.value.hint, msg
        assert e.value.__suppress_context__ and e.value.__cause__ is None  # no redis traceback behind it
        assert redis_password not in msg
    ws.close()
    missing = Workspace.open(redis_config(project, tls_string(tls_redis, db=3, ca=project / "no-ca.pem"), name="noca"))
    with pytest.raises(OnlineStoreError, match=r"ssl_ca_certs in features.online.connection_string names no file: .*no-ca.pem"):
        redis_client(missing)
    missing.close()


def test_a_plain_connection_to_the_tls_port_fails(project: Path, tls_redis: TlsRedis, redis_password: str):
    import redis

    from redis.backoff import NoBackoff
    from redis.retry import Retry

    plain = redis.Redis(host="127.0.0.1", port=tls_redis.port, password=redis_password, socket_timeout=5,
                        retry=Retry(NoBackoff(), 0))
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.ping()
    plain.close()
    ws = Workspace.open(redis_config(project, f"127.0.0.1:{tls_redis.port},db=4,socket_timeout=5", name="plain"))
    with pytest.raises(OnlineStoreError) as e:
        redis_client(ws)
    assert str(e.value).startswith(f"cannot use Redis at 127.0.0.1:{tls_redis.port} db 4: ")
    assert "ssl=true" in e.value.hint and redis_password not in str(e.value)
    ws.close()


# -- plaintext refused with auth on --------------------------------------------------------------
@pytest.mark.parametrize("extra, refused_for", [
    ("", "would be reached without TLS"),                                     # no ssl=true
    (",ssl=True", "would be reached without TLS"),                            # not JSON true: not trusted to mean TLS
    (",ssl=true,ssl_cert_reqs=none", "ssl_cert_reqs=none: no certificate check"),
    (",ssl=true,ssl_cert_reqs=null", "ssl_cert_reqs=None: no certificate check"),
    (",ssl=true,ssl_check_hostname=false", "ssl_check_hostname=false"),
])
def test_auth_on_refuses_plaintext_before_any_connection(project: Path, extra: str, refused_for: str):
    listener = socket.create_server(("127.0.0.1", 0))  # would see any connection attempt
    listener.setblocking(False)
    port = listener.getsockname()[1]
    ws = Workspace.open(redis_config(project, f"127.0.0.1:{port},db=1{extra}", name="auth", auth=True))
    try:
        for call in (lambda: redis_client(ws), lambda: Features(ws).apply(ws.service_actor("pipeline")),
                     lambda: Features(ws).repo_config(), lambda: _erase(ws, tok(0), layers=("features",))):
            with pytest.raises(PlaintextRefused) as e:
                call()
            assert e.value.exit_code == 2
            assert f"the Redis online store at 127.0.0.1:{port} db 1" in str(e.value) and refused_for in str(e.value)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing tried to connect
    finally:
        listener.close()
        ws.close()


def test_auth_off_accepts_a_plain_redis(project: Path, redis_port: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    ws = Workspace.open(redis_config(project, f"127.0.0.1:{redis_port}", name="laptop"))
    assert not ws.config.auth.enabled
    redis_client(ws).close()
    Features(ws).apply(ws.service_actor("pipeline"))
    ws.close()


# -- the password: never in the configuration ----------------------------------------------------
@pytest.mark.parametrize("connection_string", [
    "127.0.0.1:6380,ssl=true,password=hunter2-secret",
    "127.0.0.1:6380,ssl=true,username=app,Password=hunter2-secret",
    "127.0.0.1:6380,ssl=true,ssl_password=hunter2-secret",
])
def test_a_password_in_the_connection_string_is_refused_at_load(project: Path, connection_string: str):
    path = redis_config(project, connection_string, name="secret")
    with pytest.raises(ConfigError) as e:
        Workspace.open(path)
    msg = str(e.value)
    assert "features.online.connection_string" in msg and "LAKEWARDEN_REDIS_PASSWORD" in msg, msg
    assert "hunter2" not in msg and e.value.exit_code == 2


def test_the_password_comes_from_the_environment_and_is_redacted_from_errors(
        project: Path, tls_redis: TlsRedis, monkeypatch: pytest.MonkeyPatch):
    ws = Workspace.open(redis_config(project, tls_string(tls_redis, db=5, extra=",username=default"), name="pw"))
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with pytest.raises(OnlineStoreError, match=rf"Redis at 127.0.0.1:{tls_redis.port} db 5 refused the login") as e:
        redis_client(ws)
    assert PASSWORD_ENV in e.value.hint
    wrong = "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv(PASSWORD_ENV, wrong)
    with pytest.raises(OnlineStoreError, match="refused the login") as e:
        redis_client(ws)
    assert wrong not in str(e.value)
    assert wrong in feast_connection_string(ws)  # added in memory, for Feast only
    monkeypatch.setenv(PASSWORD_ENV, "a,b")
    with pytest.raises(OnlineStoreError, match="holds a comma") as e:
        redis_client(ws)
    assert "a,b" not in str(e.value)
    monkeypatch.setenv(PASSWORD_ENV, tls_redis.password)
    client = redis_client(ws)
    assert client.ping()
    client.close()
    assert tls_redis.password not in (ws.config.source or Path()).read_text()
    ws.close()


def test_the_error_reaches_the_cli_as_one_line(project: Path, tls_redis: TlsRedis, redis_password: str):
    """What a user sees: one line naming the server and what to change, exit 1, no traceback."""
    from cli_helpers import lw_in

    other_ca = LocalCA.create("another CA").write_cert(project / "other-ca.pem")
    cfg = redis_config(project, tls_string(tls_redis, db=6, ca=other_ca), name="cli")
    env = {"LAKEWARDEN_KEK": os.environ["LAKEWARDEN_KEK"], "LAKEWARDEN_CONFIG": str(cfg), PASSWORD_ENV: redis_password}
    p = lw_in(project, "features", "apply", user="pipeline", env=env)
    assert p.returncode == 1, p.stderr
    assert p.stderr.startswith(f"error: the TLS certificate of Redis at 127.0.0.1:{tls_redis.port} db 6 is not trusted")
    assert "\nhint: point ssl_ca_certs" in p.stderr and redis_password not in p.stderr + p.stdout


def test_feasts_trino_offline_store_is_refused_with_auth_on(project: Path):
    """Feast's Trino store would connect as one fixed user with no token: with auth on it is refused
    before Feast is configured (the embedded Delta reader serves instead)."""
    from features.store import FeatureError

    path = project / "lakewarden-trino-offline.yaml"
    path.write_text((project / "lakewarden.yaml").read_text() + "features: {offline: trino}\n"
                    f"auth: {{enabled: true, issuer: '{ISSUER}'}}\n")
    ws = Workspace.open(path)
    try:
        with pytest.raises(FeatureError, match="fixed user without a token") as e:
            Features(ws).repo_config()
        assert e.value.exit_code == 2 and "features.offline: delta" in str(e.value)
    finally:
        ws.close()
