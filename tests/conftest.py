"""Shared fixtures: a project folder with the example policies and an env-var KEK; a throw-away Redis;
the session's servers; and the secrets scan of issue #19 (see tests/secrets_scan.py): every secret
the session sees is registered, process arguments are scanned before each server stops and at the
end, and pytest's basetemp at the end; a finding fails the session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import secrets_scan
from cli_helpers import server_env

REPO = Path(__file__).resolve().parents[1]

PROJECT_CONFIG = """\
version: 1
name: test
storage: {root: .lakewarden/tables}
keys:
  store: .lakewarden/keys/keystore.db
  kek: {provider: env, var: LAKEWARDEN_KEK}
audit: {checkpoint_every: 5}
policies: [policies/*.yaml]
"""


# -- secrets scan (issue #19) -------------------------------------------------------------------
# What the session-end scan needs: basetemp, findings made while servers still ran, the report.
_SECRETS: dict[str, Any] = {"findings": [], "reports": []}


@pytest.fixture(scope="session", autouse=True)
def _secrets_watch(tmp_path_factory: pytest.TempPathFactory):
    """Registers every secret the session's library calls make or see (tokens, passwords, KEKs,
    shared secrets; secrets_scan.watch_sources wraps those points and puts them back after), and
    keeps basetemp for the session-end scan (pytest_sessionfinish)."""
    _SECRETS["basetemp"] = tmp_path_factory.getbasetemp()
    restore = secrets_scan.watch_sources()
    try:
        yield secrets_scan.REGISTRY
    finally:
        restore()


def _check_processes(when: str) -> None:
    """Scan every process's arguments for the session's secrets now (a server's, before it stops)."""
    for f in secrets_scan.scan_processes():
        _SECRETS["findings"].append(replace(f, where=f"{f.where}, {when}"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """The secrets scan: process arguments, then every file under basetemp (allowed places left out,
    see secrets_scan.ALLOWED); the report goes to basetemp/secrets-scan.txt and the terminal, and a
    finding fails the session. LAKEWARDEN_SECRETS_SCAN=0 turns it off (reported as such)."""
    base = _SECRETS.get("basetemp")
    if base is None:  # no test ran (collection only, or a session that stopped before any)
        return
    if os.environ.get("LAKEWARDEN_SECRETS_SCAN") == "0":
        _SECRETS["text"] = "secrets scan: OFF (LAKEWARDEN_SECRETS_SCAN=0)"
        return
    t0 = time.monotonic()
    secrets_scan.harvest(base)
    _check_processes("at session end")
    report = secrets_scan.scan_files(base)
    for early in _SECRETS["reports"]:
        report.merge(early)
    report.findings[:0] = _SECRETS["findings"]
    report.seconds = time.monotonic() - t0
    _SECRETS["report"] = report
    _SECRETS["text"] = report.format()
    try:
        (Path(base) / "secrets-scan.txt").write_text(_SECRETS["text"] + "\n")
    except OSError:
        pass
    if report.findings and session.exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    text = _SECRETS.get("text")
    if not text:
        return
    report = _SECRETS.get("report")
    terminalreporter.section("secrets scan (issue #19)", red=bool(report and report.findings), bold=True)
    for line in text.splitlines():
        terminalreporter.line(line)
    if report and report.findings:
        terminalreporter.line(f"FAILED: {len(report.findings)} secret(s) where they must not be "
                              f"(report: {Path(_SECRETS['basetemp']) / 'secrets-scan.txt'})", red=True)


@pytest.fixture(autouse=True)
def _fresh_query_caches():
    """Each test starts with the embedded engine's per-process caches empty (a test that patches the
    checks must not leave a remembered result behind)."""
    yield
    import sys

    sql = sys.modules.get("lakehouse.sql")
    if sql is not None:
        sql.clear_caches()


def make_project(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``project`` in ``folder``, its environment set through ``monkeypatch`` (a module-scoped fixture
    passes a ``pytest.MonkeyPatch.context()``, so that the variables are restored after the module)."""
    from governance.keys import generate_kek_b64

    shutil.copytree(REPO / "policies", folder / "policies")
    (folder / "lakewarden.yaml").write_text(PROJECT_CONFIG)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    monkeypatch.delenv("LAKEWARDEN_CONFIG", raising=False)
    monkeypatch.delenv("LAKEWARDEN_USER", raising=False)
    return folder


def open_copy(src: Path, kek: str, dst: Path, monkeypatch: pytest.MonkeyPatch):
    """A copy of the closed project folder ``src`` at ``dst``, opened with its KEK: a lake of its own for
    a test that writes to it, without building it again. Feast's registry holds absolute table paths,
    so copy a project before its feature views are applied, and apply them in the copy."""
    from governance.workspace import Workspace

    shutil.copytree(src, dst)
    monkeypatch.setenv("LAKEWARDEN_KEK", kek)
    monkeypatch.delenv("LAKEWARDEN_CONFIG", raising=False)
    monkeypatch.delenv("LAKEWARDEN_USER", raising=False)
    return Workspace.open(dst / "lakewarden.yaml")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder: lakewarden.yaml (KEK from $LAKEWARDEN_KEK) and a copy of policies/."""
    return make_project(tmp_path, monkeypatch)


@pytest.fixture
def workspace(project: Path):
    from governance.workspace import Workspace

    ws = Workspace.open(project / "lakewarden.yaml")
    yield ws
    ws.close()


@pytest.fixture
def redis_port():
    """A throw-away redis-server on a free loopback port (skipped when none is installed)."""
    exe = shutil.which("redis-server")
    if exe is None:
        if os.environ.get("LAKEWARDEN_REQUIRE_REDIS") == "1":
            pytest.fail("redis-server is not installed (make test installs Debian's redis-server)")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=server_env())
    deadline = time.time() + 20
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        p.terminate()
        pytest.fail("redis-server did not accept connections in 20 s")
    yield port
    p.terminate()
    p.wait(10)


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory):
    """One local Kafka broker (KRaft, loopback) for the whole session; tests make their own topics.

    Installed by infra/kafka/install.sh (make test runs it); skipped when Java or the install is
    missing, unless LAKEWARDEN_REQUIRE_KAFKA=1."""
    from lakehouse.broker import BrokerError, LocalBroker, free_port

    if shutil.which("java") is None:
        if os.environ.get("LAKEWARDEN_REQUIRE_KAFKA") == "1":
            pytest.fail("java is not installed (the local Kafka broker needs it)")
        pytest.skip("java is not installed")
    broker = LocalBroker(tmp_path_factory.mktemp("kafka"), port=free_port(pair=True))
    try:
        broker.start()
    except BrokerError as exc:
        if os.environ.get("LAKEWARDEN_REQUIRE_KAFKA") == "1":
            pytest.fail(f"the Kafka broker did not start: {exc}")
        pytest.skip(f"the Kafka broker did not start: {exc}")
    yield broker  # no credentials: a plaintext loopback listener, nothing to register
    _check_processes("before Kafka stops")
    broker.stop()


@pytest.fixture(scope="session")
def objectstore(tmp_path_factory: pytest.TempPathFactory):
    """One local S3-compatible server (versitygw, loopback) for the whole session, with a bucket
    ``lakewarden``; tests write under prefixes of their own and set ``objectstore.env()``.

    Installed by infra/objectstore/install.sh (make test runs it); skipped when Go or the install is
    missing, unless LAKEWARDEN_REQUIRE_OBJECTSTORE=1."""
    from governance.objectstore import LocalObjectStore, ObjectStoreError

    store = LocalObjectStore(tmp_path_factory.mktemp("s3"))
    try:
        store.start()
        store.create_bucket("lakewarden")
    except ObjectStoreError as exc:
        store.stop()
        if os.environ.get("LAKEWARDEN_REQUIRE_OBJECTSTORE") == "1":
            pytest.fail(f"the object store did not start: {exc}")
        pytest.skip(f"the object store did not start: {exc}")
    secrets_scan.register(store.secret_key, "S3 secret key of the local object store")
    yield store
    _check_processes("before the object store stops")
    store.stop()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """One throw-away PostgreSQL server (Debian's package, loopback, password auth) for the whole
    session; tests make databases of their own with ``postgres_db``. Skipped when PostgreSQL is
    not installed, unless LAKEWARDEN_REQUIRE_POSTGRES=1."""
    from governance.keys.pgserver import LocalPostgres, PostgresError

    try:
        pg = LocalPostgres(tmp_path_factory.mktemp("pg")).start()
    except PostgresError as exc:
        if os.environ.get("LAKEWARDEN_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL did not start: {exc}")
        pytest.skip(f"PostgreSQL did not start: {exc}")
    secrets_scan.register(pg.password, "PostgreSQL password")
    yield pg
    _check_processes("before PostgreSQL stops")
    pg.stop()
    # its folder is deleted now (and may lie outside basetemp when run as root): scan it first,
    # the data folder left out (secrets_scan.ALLOWED), the server's log included
    early = secrets_scan.scan_files(pg.base)
    early.findings = [replace(f, where=f"{pg.base}/{f.where}") for f in early.findings]
    _SECRETS["reports"].append(early)
    pg.remove()


@pytest.fixture
def postgres_db(postgres, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new, empty database on the session's server; returns its DSN (PGPASSWORD set)."""
    import uuid

    import psycopg

    for k, v in postgres.env().items():
        monkeypatch.setenv(k, v)
    name = "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.dsn.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    """One local Ray cluster per test module (its daemons take CPU while idle, so it does not
    outlive the module that uses it): a head and a second node of 1 CPU each (``ray
    start``, token authentication on). The nodes carry the object store's credentials when the
    session has one, as a real cluster's machines would. Skipped when ray is not installed, unless
    LAKEWARDEN_REQUIRE_RAY=1 (make test installs it with the ``scale`` extra)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:  # not imported here: ray reads its auth settings on import
        if os.environ.get("LAKEWARDEN_REQUIRE_RAY") == "1":
            pytest.fail("ray is not installed (pip install -e '.[scale]')")
        pytest.skip("ray is not installed")
    from governance.cluster import ClusterError, LocalRayCluster

    env = dict(os.environ)
    try:
        env.update(request.getfixturevalue("objectstore").env())
    except pytest.skip.Exception:
        pass
    cluster = LocalRayCluster(tmp_path_factory.mktemp("ray"), nodes=2, cpus_per_node=1, env=env)
    try:
        cluster.start()
    except ClusterError as exc:
        if os.environ.get("LAKEWARDEN_REQUIRE_RAY") == "1":
            pytest.fail(f"the Ray cluster did not start: {exc}")
        pytest.skip(f"the Ray cluster did not start: {exc}")
    secrets_scan.register(cluster.token, "Ray cluster auth token")
    yield cluster
    _check_processes("before the Ray cluster stops")
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster.stop()


@pytest.fixture(scope="session")
def keycloak(tmp_path_factory: pytest.TempPathFactory):
    """One local Keycloak (loopback, file database) for the whole session, with the realm
    ``lakewarden`` provisioned from policies/roles.yaml (test clients with the password grant
    included) and a second realm ``other`` (the same users: tokens of another issuer). Yields
    ``(keycloak, realm, other)``; the users' passwords live only in the realms' memory.

    Installed by infra/keycloak/install.sh (make test runs it); skipped when it is not installed,
    unless LAKEWARDEN_REQUIRE_KEYCLOAK=1."""
    from governance.idp import IdentityProviderError, LocalKeycloak, installed, provision
    from governance.policy import load_policies

    required = os.environ.get("LAKEWARDEN_REQUIRE_KEYCLOAK") == "1"
    if installed() is None:
        if required:
            pytest.fail("Keycloak is not installed (make keycloak)")
        pytest.skip("Keycloak is not installed (make keycloak)")
    kc = LocalKeycloak(tmp_path_factory.mktemp("keycloak"))
    try:
        kc.start()
        policies = load_policies(sorted((REPO / "policies").glob("*.yaml")))
        realm = provision(kc, policies, test_client=True)
        other = provision(kc, policies, realm="other", test_client=True)
    except IdentityProviderError as exc:
        kc.stop()
        if required:
            pytest.fail(f"Keycloak did not start: {exc}")
        pytest.skip(f"Keycloak did not start: {exc}")
    secrets_scan.register(kc._admin_password, "Keycloak bootstrap admin password")
    for r in (realm, other):
        for user, pw in r.passwords.items():
            secrets_scan.register(pw, f"Keycloak password of {user} (realm {r.name})")
    yield kc, realm, other
    _check_processes("before Keycloak stops")
    kc.stop()
