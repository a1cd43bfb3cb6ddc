"""The ``cluster`` profile, run: a Trino coordinator and workers as local processes over the bucket.

:class:`TrinoCluster` renders :func:`lakehouse.trino.render_cluster` — the renderer of the
committed ``infra/trino/cluster/`` files — with local ports and folders under
``<workspace>/trino-cluster/``, makes what the production profile leaves to the operator, starts
every node at once and waits until ``system.runtime.nodes`` shows each of them active:

* TLS: a CA of its own and a certificate for ``localhost``/``127.0.0.1`` (:mod:`governance.tls`);
  clients trust :attr:`TrinoCluster.ca_file`. Plain HTTP is closed on every node; nodes talk HTTPS
  to each other with certificates Trino derives from the shared secret.
* Passwords: one random password per user (Lakewarden's admin user and, by default, every
  principal of policy), hashed into the coordinator's password file (PBKDF2, 0600).
* Tokens (``auth=``): the coordinator also accepts the identity provider's access tokens
  (``PASSWORD,JWT``; :class:`lakehouse.trino.JwtAuth`), fetching the issuer's JWKS from its URL
  (plain http only on loopback, as the local Keycloak serves it). Then, by default, only the
  admin user gets a password; analysts connect with ``connect(user, token=...)``.
* Layout: ``tls/`` (``ca.pem`` public, ``coordinator.pem`` key + chain, 0600), and per node
  ``<node>/etc`` (rendered), ``<node>/data`` (``node.data-dir``) and ``<node>/data/server.log``.

Secrets: the CA key stays in memory and is dropped once the certificate is issued. The passwords
and the shared secret live in this object only; the nodes get the secret through their
environment (``TRINO_SHARED_SECRET``, which the rendered files name as ``${ENV:...}``), never
through an argument, a rendered file or a log line (Trino prints it as ``[REDACTED]``). The
object store's credentials reach the nodes the same way (the ``AWS_*`` variables).

    with TrinoCluster(ws, workers=2) as cluster:     # start() on enter, stop() on exit
        cluster.sync(ws.actor("dana"))                # register the tables, compile the rules
        conn = cluster.connect("ana")                 # HTTPS, ana's password, the CA trusted
        conn.cursor().execute("SELECT count(*) FROM customers")

:meth:`TrinoCluster.stop` ends exactly the processes it started (each in a session of its own:
SIGTERM to its process group, SIGKILL after ``timeout``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from governance.config import AuthConfig
from governance.gate import Actor
from governance.identity import ForeignServer, workspace_id
from governance.objectstore import free_port
from governance.tls import LocalCA, write_private
from governance.workspace import Workspace
from lakehouse.trino import (
    ADMIN_USER, CATALOG, ENV_PREFIX, PBKDF2_ITERATIONS, ClusterNode, ClusterSpec, JwtAuth, SyncReport, TrinoError,
    _storage_root, _write_atomic, default_home, fetch_all, http_session, jwt_auth, launcher_command, password_file,
    render_cluster, sync_tables,
)

S3_VARIABLES = ("AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")
SECRET_ENV = "TRINO_SHARED_SECRET"


class TrinoCluster:
    """A coordinator and ``workers`` Trino workers on this machine, for one workspace whose storage
    root is an object store (every node reads the same bucket, as on separate machines).

    Args:
        ws: the workspace; its ``storage.root`` must be ``s3://...``.
        workers: how many workers (at least one; the coordinator runs no tasks).
        home: the Trino install (default :func:`lakehouse.trino.default_home`).
        folder: where the nodes' files go (default ``<workspace>/trino-cluster``).
        heap: each node's ``-Xmx``.
        users: who gets a password besides Lakewarden's admin user (default: every principal).
        iterations: PBKDF2 iterations of the password hashes.
        environ: the nodes' environment (default this process's; it must carry the ``AWS_*``
            variables that reach the bucket).
        auth: bearer tokens as well as passwords: a :class:`~lakehouse.trino.JwtAuth`, or ``auth:``
            of lakewarden.yaml (:class:`governance.config.AuthConfig`, resolved by
            :func:`lakehouse.trino.jwt_auth` at :meth:`render`: the issuer must answer then).
            With it, ``users`` defaults to none (the admin user keeps its password).

    Raises:
        ValueError: no worker, or a storage root that is not an object store.
    """

    def __init__(self, ws: Workspace, *, workers: int = 1, home: Path | None = None, folder: Path | None = None,
                 heap: str = "1G", users: Iterable[str] | None = None, iterations: int = PBKDF2_ITERATIONS,
                 environ: Mapping[str, str] | None = None, auth: JwtAuth | AuthConfig | None = None) -> None:
        if workers < 1:
            raise ValueError("a cluster needs at least one worker (the coordinator runs no tasks)")
        self.ws = ws
        self.home = home or default_home()
        self.folder = Path(folder or ws.config.workspace_dir / "trino-cluster").absolute()
        self.environment = ENV_PREFIX + workspace_id(ws.config)
        self.iterations = iterations
        self._environ = dict(os.environ if environ is None else environ)
        if isinstance(auth, AuthConfig) and not auth.enabled:
            raise ValueError("auth= names an AuthConfig that is not enabled")
        self._auth = auth
        default_users = () if auth is not None else sorted(ws.policies.roles.principals)
        names = default_users if users is None else list(users)
        self._passwords = {u: secrets.token_urlsafe(24) for u in dict.fromkeys([ADMIN_USER, *names])}
        self._secret = secrets.token_urlsafe(64)
        ports: list[int] = []
        while len(ports) < workers + 1:  # distinct ports, free now (Trino refuses to start on a taken one)
            if (p := free_port()) not in ports:
                ports.append(p)
        port = ports[0]
        etc = self.folder / "coordinator" / "etc"

        def node(name: str, port: int) -> ClusterNode:
            return ClusterNode(name=name, port=port, data_dir=str(self.folder / name / "data"), node_id=name)

        self.spec = ClusterSpec(
            discovery_uri=f"https://127.0.0.1:{port}",
            coordinator=node("coordinator", port),
            workers=tuple(node(f"worker-{i}", ports[i]) for i in range(1, workers + 1)),
            storage_root=_storage_root(ws),
            environment=self.environment,
            tls_pem=str(self.folder / "tls" / "coordinator.pem"),
            password_file=str(etc / "password.db"),
            rules_file=str(etc / "rules.json"),
            groups_file=str(etc / "group.txt"),
            heap=heap,
            refresh_period="1s",
            query_max_memory="512MB",
            query_max_memory_per_node="400MB",
            s3_variables=frozenset(k for k in S3_VARIABLES if self._environ.get(k)),
            jwt=auth if isinstance(auth, JwtAuth) else None,
        )
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []

    # -- where ----------------------------------------------------------------------------
    @property
    def nodes(self) -> tuple[ClusterNode, ...]:
        return (self.spec.coordinator, *self.spec.workers)

    @property
    def host(self) -> str:
        """The name clients connect to (the coordinator's certificate names ``localhost``,
        ``127.0.0.1`` and ``::1``)."""
        return "localhost"

    @property
    def port(self) -> int:
        return self.spec.coordinator.port

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        """The CA certificate a client trusts (``verify=`` of the ``trino`` client and of requests)."""
        return self.folder / "tls" / "ca.pem"

    @property
    def etc(self) -> Path:
        """The coordinator's configuration folder (rules, groups, password file)."""
        return self.folder / "coordinator" / "etc"

    def log(self, node: str) -> Path:
        return self.folder / node / "data" / "server.log"

    def password(self, user: str) -> str:
        """The password of ``user`` (made at construction, known to this object only)."""
        try:
            return self._passwords[user]
        except KeyError:
            raise TrinoError(f"{user!r} has no password on this cluster",
                             hint=f"pass users=[...{user!r}] to TrinoCluster") from None

    # -- files ----------------------------------------------------------------------------
    def render(self) -> None:
        """Write every node's configuration, the certificate, and the password file.

        Raises:
            TrinoError: ``auth`` is an :class:`AuthConfig` whose issuer's discovery document cannot be read.
        """
        if isinstance(self._auth, AuthConfig):
            self.spec = replace(self.spec, jwt=jwt_auth(self._auth))
        for rel, text in render_cluster(self.ws, self.spec).items():
            _write_atomic(self.folder / rel, text)
        ca = LocalCA.create(f"Lakewarden cluster CA ({self.environment})")
        ca.write_cert(self.ca_file)
        ca.issue_server(["localhost", "127.0.0.1", "::1"], common_name="localhost").write_pem(Path(self.spec.tls_pem))
        del ca  # the CA key is not kept: a new start makes a new CA
        write_private(self.etc / "password.db",
                      password_file(self.ws, self._passwords, iterations=self.iterations).encode())

    # -- process --------------------------------------------------------------------------
    def start(self, *, timeout: float = 240) -> float:
        """Render, start every node at once, wait until all are active; return the seconds taken.

        Raises:
            TrinoError: Trino is not installed, a node exited, or the cluster was not up in time
                (every node started is stopped again).
        """
        t0 = time.perf_counter()
        if self.procs:
            raise TrinoError("this cluster is already started")
        launcher, env = launcher_command(self.home, self._environ)
        env[SECRET_ENV] = self._secret
        self.render()
        try:
            for n in self.nodes:
                Path(n.data_dir).mkdir(parents=True, exist_ok=True)
                log = open(self.log(n.name), "ab")
                self._logs.append(log)
                self.procs[n.name] = subprocess.Popen(
                    [str(launcher), "run", f"--etc-dir={self.folder / n.name / 'etc'}", f"--data-dir={n.data_dir}"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
                )
            self.wait_active(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return time.perf_counter() - t0

    def _ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def info(self) -> dict[str, Any] | None:
        """The coordinator's ``/v1/info`` (public in Trino), None while nothing answers."""
        try:
            with urllib.request.urlopen(self.url + "/v1/info", timeout=2, context=self._ssl_context()) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def check_owner(self) -> dict[str, Any] | None:
        """The coordinator's info if it is this cluster's (its environment), None if none answers."""
        info = self.info()
        if info is not None and info.get("environment") != self.environment:
            raise ForeignServer("Trino", f"{self.host}:{self.port}", None, ours=self.environment[len(ENV_PREFIX):],
                                detail=f"its node.environment is {info.get('environment')!r}")
        return info

    def active_nodes(self) -> dict[str, bool]:
        """``system.runtime.nodes`` as the admin user: node id → is the coordinator, for the active nodes."""
        rows = self.query(ADMIN_USER, "SELECT node_id, coordinator FROM system.runtime.nodes WHERE state = 'active'")
        return {node_id: bool(coord) for node_id, coord in rows}

    def wait_active(self, *, timeout: float = 240) -> None:
        """Wait until the coordinator answers queries and every node is active.

        Raises:
            TrinoError: a node exited (its log's tail is in the message), or time ran out.
        """
        want = {n.node_id for n in self.nodes}
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    tail = self.log(name).read_text(errors="replace")[-1500:]
                    raise TrinoError(f"Trino node {name} exited with code {p.returncode}: {tail}")
            info = self.check_owner()
            if info and not info.get("starting", True):
                try:
                    active = set(self.active_nodes())
                    if active >= want:
                        return
                    last = f"active: {sorted(active)}"
                except Exception as exc:  # the coordinator answers before it runs queries
                    if getattr(exc, "error_name", None) == "PERMISSION_DENIED":
                        raise TrinoError(f"the admin user may not read system.runtime.nodes: {exc}") from None
                    last = str(exc).splitlines()[0][:200]
            time.sleep(0.5)
        raise TrinoError(f"the Trino cluster was not up within {timeout:.0f}s ({last}); see {self.folder}/*/data/server.log")

    def stop(self, *, timeout: float = 30) -> None:
        """Stop every node this object started: SIGTERM to each process group, SIGKILL after ``timeout``."""
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "TrinoCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients --------------------------------------------------------------------------
    @property
    def jwt(self) -> JwtAuth | None:
        """The token settings the coordinator runs with (resolved at :meth:`render`), None without ``auth``."""
        return self.spec.jwt

    def connect(self, user: str, *, password: str | None = None, token: str | None = None, schema: str = "silver",
                **kwargs: Any):
        """A ``trino`` DB-API connection to the coordinator as ``user`` (``user@role`` to act in one
        role), over HTTPS with the CA trusted and the user's password (or ``password``), or with the
        bearer ``token`` (then ``user`` is the token's principal, or ``principal@role`` for one of
        its roles: the compiled impersonation rules allow nothing else).

        The HTTP session ignores ``REQUESTS_CA_BUNDLE`` and proxy variables: requests lets those
        override a session's ``verify``, which would trust another CA bundle than this cluster's.
        """
        import trino
        from trino.auth import BasicAuthentication, JWTAuthentication

        if token is not None:
            auth: Any = JWTAuthentication(token)
        else:
            auth = BasicAuthentication(user, password if password is not None else self.password(user.split("@", 1)[0]))
        session = http_session(str(self.ca_file))
        return trino.dbapi.connect(
            host=self.host, port=self.port, user=user, catalog=CATALOG, schema=schema, http_scheme="https",
            auth=auth, http_session=session, **kwargs,
        )

    def query(self, user: str, sql: str) -> list[list[Any]]:
        return fetch_all(self.connect(user), sql)

    def _admin(self, sql: str) -> list[list[Any]]:
        return self.query(ADMIN_USER, sql)

    def sync(self, actor: Actor) -> SyncReport:
        """Register every governed table on the coordinator and write the rules it reads (gated, audited:
        the same :func:`lakehouse.trino.sync_tables` as the local server's)."""
        return sync_tables(self.ws, actor, self._admin, self.etc, check=self.check_owner)


__all__ = ["TrinoCluster"]
