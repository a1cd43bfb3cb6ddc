"""Trino for analysts: a real Trino server over the governed Delta tables, access control compiled
from the same policies the gate enforces.

* :func:`install` runs ``infra/trino/install.sh`` (a pinned Trino from Maven Central, only
  the plugins we use, into a cache folder outside git).
* :class:`TrinoServer` renders the configuration into ``<workspace>/trino/etc`` — a single
  node whose coordinator also runs tasks, a small heap, a ``delta_lake`` catalog with a file
  metastore on the native local file system, file-based system access control and a file
  group provider — starts and stops the server, waits until it answers queries, and
  ``sync`` registers every governed table (``register_table``) and re-renders the rules.
* :func:`compile_rules` turns policy into Trino's file-based rules by asking the gate, for
  every role and table, what a query may see: the visible columns, their masks (compiled to
  Trino SQL by :mod:`lakehouse.masks`, the same vocabulary the embedded engine uses) and the
  row filter. First match wins and nothing matched is denied, like the gate. The audit log
  is a table only compliance officers may read. Trino stays read-only: no role, not even
  Lakewarden's own admin user, holds INSERT, UPDATE or DELETE; writes go through the
  lakehouse layer.
* :func:`run_query` sends an analyst's SQL through the ``trino`` client as the acting user
  (or ``user@role`` to act in one role only); a denial comes back as one line.
* Ownership: the local server runs with ``node.environment=lakewarden_<workspace id>``
  (governance/identity.py). Whatever finds a server running on the port — ``start``,
  ``status``, ``sync``, ``stop``, :func:`run_query`, the feature store's Trino offline store —
  reads the environment back from ``/v1/info`` first (:meth:`TrinoServer.check_owner`); another
  workspace's server is a ``ForeignServer`` error (exit 2), never used.

* :func:`render_cluster` renders a coordinator and workers over an object store (HTTPS only,
  passwords, internal traffic authenticated by a shared secret, the metastore in the bucket):
  the ``cluster`` profile of :func:`render_profile` with the production values, and the local
  cluster of :mod:`lakehouse.trino_cluster` with local ports and folders. :func:`sync_tables` is
  the one sync of the local server and of a cluster's coordinator.

Identity: without authentication a Trino user name is only a claim. The ``production`` and
``cluster`` profiles of :func:`render_profile` render the HTTPS + password (or OAuth 2.0) set-up
with plain HTTP closed; with ``auth.enabled`` the cluster's coordinator also accepts the identity
provider's access tokens (:class:`JwtAuth`, ``PASSWORD,JWT``). The compiled rules let a token's
principal act in one of its own roles (``user@role``, an impersonation in Trino) and as nobody
else; see docs/trino.md.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa

from governance.config import AuthConfig
from governance.gate import Actor, Gate, Resource
from governance.identity import ForeignServer, workspace_id
from governance.idp import TRINO_AUDIENCE
from governance.objectstore import is_remote
from governance.pii import redact
from governance.policy import Stage
from governance.workspace import Workspace
from lakehouse.catalog import Catalog, TableRef
from lakehouse.errors import LakehouseError, SqlError
from lakehouse.masks import compile_mask, hash_column, quote_ident
from lakehouse.sql import LAYER_COLUMNS

TRINO_VERSION = "476"
ADMIN_USER = "lakewarden"
FEATURES_USER = "lakewarden_features"  # the feature store's Trino offline store (features/store.py)
CATALOG = "delta_lake"
REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / "infra" / "trino" / "install.sh"
# System tables Trino serves besides the governed layers: (schema, table, path under the storage root).
SYSTEM_TABLES = (("audit", "events"), ("audit", "checkpoints"))
# The local server's node.environment is this prefix + the workspace id (governance/identity.py).
ENV_PREFIX = "lakewarden_"
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class TrinoError(LakehouseError):
    """Trino is not installed, not running, or failed to start."""


class TrinoDenied(LakehouseError):
    """Trino's access control refused the query (exit 3, like a policy deny)."""

    exit_code = 3


def default_home() -> Path:
    env = os.environ.get("LAKEWARDEN_TRINO_HOME")
    if env:
        return Path(env)
    cache = Path(os.environ.get("LAKEWARDEN_CACHE", Path.home() / ".cache" / "lakewarden"))
    return cache / "trino" / f"trino-server-{TRINO_VERSION}"


def install() -> Path:
    """Install Trino (idempotent) and return its home folder."""
    if not INSTALL_SCRIPT.exists():
        raise TrinoError(f"install script missing: {INSTALL_SCRIPT}")
    p = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True)
    if p.returncode:
        raise TrinoError(f"installing Trino failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return Path(p.stdout.strip().splitlines()[-1])


def launcher_command(home: Path, environ: Mapping[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """The launcher of the Trino at ``home`` and the environment it runs in (``environ`` or this
    process's, with the JDK the install script chose as ``JAVA_HOME``)."""
    launcher = home / "bin" / "launcher"
    if not launcher.exists():
        raise TrinoError(f"Trino is not installed at {home}", hint="run infra/trino/install.sh (make test does)")
    env = dict(os.environ if environ is None else environ)
    jh = home / ".java-home"
    if jh.exists():
        env["JAVA_HOME"] = jh.read_text().strip()
        env["PATH"] = f"{env['JAVA_HOME']}/bin:{env.get('PATH', '')}"
    return launcher, env


# -- policy → Trino rules ---------------------------------------------------------------------
def _table_schema(cat: Catalog, ref: TableRef) -> pa.Schema:
    return cat.open(ref).to_pyarrow_dataset().schema


def compile_rules(ws: Workspace, tables: dict[tuple[str, str], pa.Schema]) -> dict[str, Any]:
    """File-based access-control rules for ``tables`` ((schema, table) → Arrow schema)."""
    gate = Gate(ws.policies)  # no audit: these are what-if decisions, one per role and table
    roles = sorted(ws.policies.roles.roles)
    table_rules: list[dict[str, Any]] = [
        # Lakewarden's own user registers tables; it may read and own, never write rows.
        {"user": ADMIN_USER, "catalog": CATALOG, "privileges": ["SELECT", "OWNERSHIP"]},
        # ... and sees which nodes are active and where a query's tasks ran (a cluster's readiness),
        # never the texts of others' queries (system.runtime.queries).
        {"user": ADMIN_USER, "catalog": "system", "schema": "runtime", "table": "nodes|tasks", "privileges": ["SELECT"]},
        # The feature store's service user reads silver (the gate decided the purpose before
        # Feast runs) and writes only its scratch tables in the memory catalog.
        {"user": FEATURES_USER, "catalog": CATALOG, "schema": "silver", "privileges": ["SELECT"]},
        {"user": FEATURES_USER, "catalog": "memory", "privileges": ["SELECT", "INSERT", "DELETE", "UPDATE", "OWNERSHIP"]},
    ]
    for (schema, table), arrow_schema in sorted(tables.items()):
        if schema == "audit":
            table_rules.append(
                {"group": "compliance_officer", "catalog": CATALOG, "schema": schema, "table": table, "privileges": ["SELECT"]}
            )
            continue
        for role in roles:
            policy = ws.policies.datasets.get(table)
            if policy is not None and policy.query_mode(role) == "private":
                continue  # differentially private aggregates only (lakehouse.private_sql): no rows through Trino
            d = gate.decide(Stage.QUERY, Actor(f"role:{role}", (role,)), Resource.table(table, schema), {"layer": schema})
            if not d.allowed:
                continue
            ob = d.obligations
            visible = set(ob.get("columns") or ()) | set(LAYER_COLUMNS.get(schema, ()))
            masks = dict(ob.get("masks") or {})
            columns = []
            for f in arrow_schema:
                if f.name not in visible:
                    columns.append({"name": f.name, "allow": False})
                elif f.name in masks:
                    hc = hash_column(f.name)
                    hashed = quote_ident(hc, "trino") if hc in arrow_schema.names else None
                    cm = compile_mask(masks[f.name], quote_ident(f.name, "trino"), f.type, dialect="trino", hashed=hashed)
                    col: dict[str, Any] = {"name": f.name, "mask": cm.sql}
                    if hashed is not None and cm.sql == hashed:
                        # the precomputed hash column is hidden from the role itself: the mask reads it
                        # as Lakewarden's own user, which may read every column
                        col["mask_environment"] = {"user": ADMIN_USER}
                    columns.append(col)
            rule: dict[str, Any] = {
                "group": role, "catalog": CATALOG, "schema": schema, "table": table, "privileges": ["SELECT"],
            }
            if columns:
                rule["columns"] = columns
            if ob.get("row_filter"):
                rule["filter"] = ob["row_filter"]
            table_rules.append(rule)
    readers = "|".join(roles)
    # A token names its principal (``ana``); acting in one role (``ana@analyst``, see render_groups)
    # is then an impersonation, allowed for a principal's own roles only. With passwords each
    # ``user@role`` is a principal of its own, and the local server has none: no check applies.
    impersonation = [
        {"original_user": re.escape(user),
         "new_user": re.escape(user) + "@(" + "|".join(re.escape(r) for r in user_roles) + ")", "allow": True}
        for user, user_roles in sorted(ws.policies.roles.principals.items()) if user_roles
    ]
    return {
        "catalogs": [
            {"user": ADMIN_USER, "catalog": f"{CATALOG}|system", "allow": "all"},
            {"user": FEATURES_USER, "catalog": CATALOG, "allow": "read-only"},
            {"user": FEATURES_USER, "catalog": "memory", "allow": "all"},
            {"group": readers, "catalog": CATALOG, "allow": "read-only"},
            {"group": readers, "catalog": "system", "allow": "read-only"},
        ],
        "schemas": [
            {"user": ADMIN_USER, "schema": ".*", "owner": True},
            {"user": FEATURES_USER, "catalog": "memory", "schema": ".*", "owner": True},
        ],
        "tables": table_rules,
        "procedures": [
            {"user": ADMIN_USER, "catalog": CATALOG, "schema": "system",
             "procedure": "register_table|unregister_table|flush_metadata_cache", "privileges": ["EXECUTE"]},
        ],
        "impersonation": impersonation,
    }


def render_groups(ws: Workspace) -> str:
    """``role:user1,user2`` lines: each principal, and ``user@role`` to act in one role only."""
    members: dict[str, list[str]] = {r: [] for r in sorted(ws.policies.roles.roles)}
    for user, roles in sorted(ws.policies.roles.principals.items()):
        for r in roles:
            members[r] += [user, f"{user}@{r}"]
    return "".join(f"{r}:{','.join(us)}\n" for r, us in members.items() if us)


# -- configuration --------------------------------------------------------------------------
JVM_CONFIG = """\
-server
-Xmx{heap}
-XX:InitialRAMPercentage=5
-XX:+UseG1GC
-XX:G1HeapRegionSize=32M
-XX:+ExplicitGCInvokesConcurrent
-XX:+ExitOnOutOfMemoryError
-XX:-OmitStackTraceInFastThrow
-XX:ReservedCodeCacheSize=256M
-XX:PerMethodRecompilationCutoff=10000
-XX:PerBytecodeRecompilationCutoff=10000
-Djdk.attach.allowAttachSelf=true
-Djdk.nio.maxCachedBufferSize=2000000
-Dfile.encoding=UTF-8
-XX:+EnableDynamicAgentLoading
"""


def _storage_root(ws: Workspace) -> str:
    """The storage root: a local folder, or ``s3://bucket/prefix`` on an object store."""
    root = ws.config.table_uri("x")[:-2]
    return root[len("file://"):] if root.startswith("file://") else root


def _table_location(ws: Workspace, rel: str) -> str:
    root = _storage_root(ws)
    return f"{root.rstrip('/')}/{rel}" if is_remote(root) else f"local:///{rel}"


def delta_catalog(root: str, *, environ: Mapping[str, str] | None = None) -> str:
    """The Delta Lake catalog over a storage root. On a local folder, Trino's native local file
    system; on ``s3://``, its native S3 file system, with the endpoint and credentials taken from
    the server's environment (``${ENV:...}``: the same ``AWS_*`` variables as Lakewarden's, never
    written into the file), and the metastore in the bucket beside the tables."""
    head = "connector.name=delta_lake\nhive.metastore=file\n"
    tail = "delta.register-table-procedure.enabled=true\ndelta.metadata.cache-ttl=0s\n"
    if not is_remote(root):
        return head + f"hive.metastore.catalog.dir=local:///_trino/metastore\nfs.native-local.enabled=true\nlocal.location={root}\n" + tail
    env = os.environ if environ is None else environ
    lines = [f"hive.metastore.catalog.dir={root.rstrip('/')}/_trino/metastore", "fs.native-s3.enabled=true",
             "s3.region=${ENV:AWS_REGION}" if env.get("AWS_REGION") else "s3.region=us-east-1"]
    if env.get("AWS_ENDPOINT_URL"):
        lines += ["s3.endpoint=${ENV:AWS_ENDPOINT_URL}", "s3.path-style-access=true"]
    if env.get("AWS_ACCESS_KEY_ID"):
        lines += ["s3.aws-access-key=${ENV:AWS_ACCESS_KEY_ID}", "s3.aws-secret-key=${ENV:AWS_SECRET_ACCESS_KEY}"]
    return head + "\n".join(lines) + "\n" + tail


def render_local(ws: Workspace, *, heap: str = "1G") -> dict[str, str]:
    """The single-node configuration: relative path under etc/ → file content."""
    tc = ws.config.trino
    root = _storage_root(ws)
    etc = ws.config.workspace_dir / "trino" / "etc"
    data = ws.config.workspace_dir / "trino" / "data"
    wid = workspace_id(ws.config)  # the server says whose it is: see TrinoServer.check_owner
    return {
        "node.properties": f"node.environment={ENV_PREFIX}{wid}\nnode.id=lakewarden-{wid}\nnode.data-dir={data}\n",
        "jvm.config": JVM_CONFIG.format(heap=heap),
        "config.properties": (
            "coordinator=true\nnode-scheduler.include-coordinator=true\n"
            f"http-server.http.port={tc.port}\ndiscovery.uri=http://127.0.0.1:{tc.port}\n"
            "query.max-memory=512MB\nquery.max-memory-per-node=400MB\n"
        ),
        "log.properties": "io.trino=INFO\n",
        f"catalog/{CATALOG}.properties": delta_catalog(root),
        "catalog/memory.properties": "connector.name=memory\nmemory.max-data-per-node=128MB\n",
        "access-control.properties": (
            f"access-control.name=file\nsecurity.config-file={etc / 'rules.json'}\nsecurity.refresh-period=1s\n"
        ),
        "group-provider.properties": (
            f"group-provider.name=file\nfile.group-file={etc / 'group.txt'}\nfile.refresh-period=1s\n"
        ),
        "group.txt": render_groups(ws),
    }


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@dataclass
class SyncReport:
    registered: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    rules: int = 0
    seconds: float = 0.0


class TrinoServer:
    """A local single-node Trino for one workspace."""

    def __init__(self, ws: Workspace, *, home: Path | None = None) -> None:
        self.ws = ws
        self.home = home or default_home()
        self.etc = ws.config.workspace_dir / "trino" / "etc"
        self.data = ws.config.workspace_dir / "trino" / "data"
        tc = ws.config.trino
        self.url = f"{tc.http_scheme}://{tc.host}:{tc.port}"
        self.where = f"{tc.host}:{tc.port}"
        self.workspace_id = workspace_id(ws.config)

    # -- process --------------------------------------------------------------------------
    def _launcher(self, *args: str) -> subprocess.CompletedProcess:
        launcher, env = launcher_command(self.home)
        return subprocess.run(
            [str(launcher), *args, f"--etc-dir={self.etc}", f"--data-dir={self.data}"],
            capture_output=True, text=True, env=env, timeout=120,
        )

    def render(self) -> None:
        for rel, text in render_local(self.ws).items():
            _write_atomic(self.etc / rel, text)
        if not (self.etc / "rules.json").exists():
            _write_atomic(self.etc / "rules.json", json.dumps(compile_rules(self.ws, {}), indent=2))

    def info(self) -> dict[str, Any] | None:
        import ssl

        verify = self.ws.config.trino.verify
        ctx = None
        if self.url.startswith("https:"):  # trust what the client trusts: trino.verify (a CA file, or on/off)
            ctx = ssl.create_default_context(cafile=verify if isinstance(verify, str) else None)
            if verify is False:
                ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            with urllib.request.urlopen(self.url + "/v1/info", timeout=2, context=ctx) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def running(self) -> bool:
        """Does a Trino answer on the configured port (whoever's it is; see :meth:`check_owner`)."""
        return self.info() is not None

    # -- ownership ------------------------------------------------------------------------
    def check_owner(self, info: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """The server's /v1/info if it is this workspace's, None if none answers; raise ForeignServer otherwise.

        The local server renders ``node.environment=lakewarden_<workspace id>``; Trino reports
        its environment in /v1/info, so the server itself says whose it is. Another
        workspace's server is refused wherever it runs; a server without a workspace id (an
        older Lakewarden's, or not Lakewarden's) is refused on loopback, where the local
        profile runs. A remote coordinator rendered by ``trino render`` (environment
        ``lakewarden``) is the operator's deployment and is used as configured.
        """
        info = self.info() if info is None else info
        if info is None:
            return None
        env = str(info.get("environment") or "")
        if env == ENV_PREFIX + self.workspace_id:
            return info
        tc = self.ws.config.trino
        if env.startswith(ENV_PREFIX):
            raise ForeignServer("Trino", self.where, env[len(ENV_PREFIX):], ours=self.workspace_id,
                                hint="set trino.port in lakewarden.yaml to a port of this workspace's own")
        if tc.host not in LOOPBACK:
            return info
        hint = "set trino.port in lakewarden.yaml to a port of this workspace's own"
        if env == "lakewarden":
            detail = "its node.environment is 'lakewarden', without a workspace id (started by an older Lakewarden)"
            hint = "if it is this workspace's, `lakewarden trino down` stops it and `trino up` restarts it; otherwise " + hint
        else:
            detail = f"its node.environment is {env!r}, not a Lakewarden workspace's"
        raise ForeignServer("Trino", self.where, None, ours=self.workspace_id, detail=detail, hint=hint)

    def _port_taken(self) -> bool:
        import socket

        tc = self.ws.config.trino
        try:
            socket.create_connection((tc.host, tc.port), timeout=1).close()
            return True
        except OSError:
            return False

    def start(self, *, timeout: float = 240) -> float:
        """Render the configuration, start the server, wait until it runs queries; return seconds taken.

        A server already on the port is used only if it is this workspace's (:meth:`check_owner`).

        Raises:
            PlaintextRefused: ``auth.enabled``: this single-node profile is plain HTTP on loopback and
                trusts the user name it is sent, so it does not start; the cluster profile (HTTPS,
                passwords and the identity provider's tokens) serves authenticated mode.
        """
        from governance.tls import refuse_plaintext

        refuse_plaintext(self.ws.config, "the local single-node Trino", self.url,
                         hint="it is unauthenticated plain HTTP; run the cluster profile instead "
                              "(`lakewarden trino render --profile cluster`, HTTPS with passwords and JWT) and point "
                              "trino.host/port/http_scheme: https/verify at its coordinator")
        t0 = time.perf_counter()
        info = self.info()
        if info is None and self._port_taken():  # a server starting up, or something that is not Trino
            deadline = time.monotonic() + 3
            while info is None and time.monotonic() < deadline:
                time.sleep(0.5)
                info = self.info()
            if info is None:
                raise ForeignServer("Trino", self.where, None, ours=self.workspace_id,
                                    detail="something that does not answer as Trino listens there",
                                    hint="set trino.port in lakewarden.yaml to a free port")
        if info is not None:
            self.check_owner(info)
        else:
            self.render()
            p = self._launcher("start")
            if p.returncode:
                raise TrinoError(f"Trino did not start: {(p.stderr or p.stdout).strip().splitlines()[-1:]}")
        self.wait_ready(timeout=timeout)
        return time.perf_counter() - t0

    def wait_ready(self, *, timeout: float = 240) -> None:
        """Wait until this workspace's server runs queries (another workspace's answering is refused at once)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            info = self.check_owner()
            if info and not info.get("starting", True):
                try:
                    self._admin("SELECT 1")
                    return
                except Exception as exc:  # NO_NODES_AVAILABLE for a few seconds after start
                    last = str(exc).splitlines()[0][:200]
            time.sleep(0.5)
        log = self.data / "var" / "log" / "server.log"
        raise TrinoError(f"Trino did not become ready within {timeout:.0f}s ({last or 'no answer'}); see {log}")

    def stop(self) -> None:
        """Stop this workspace's server; another workspace's on the port is left running (ForeignServer)."""
        if (self.data / "var" / "run" / "launcher.pid").exists():
            self._launcher("stop")  # the process this workspace launched (its own data dir): ours by construction
        deadline = time.monotonic() + 60
        while self.check_owner() is not None and time.monotonic() < deadline:
            time.sleep(0.5)

    def status(self) -> dict[str, Any]:
        info = self.check_owner()
        return {
            "url": self.url,
            "workspace": self.workspace_id,
            "running": info is not None,
            "version": (info or {}).get("nodeVersion", {}).get("version"),
            "uptime": (info or {}).get("uptime"),
            "home": str(self.home),
            "etc": str(self.etc),
        }

    # -- admin ----------------------------------------------------------------------------
    def _admin(self, sql: str) -> list[list[Any]]:
        return fetch_all(connect(self.ws.config.trino, ADMIN_USER, catalog=CATALOG), sql)

    def sync(self, actor: Actor) -> SyncReport:
        """Register every governed table, render the rules from policy, flush Trino's caches."""
        return sync_tables(self.ws, actor, self._admin, self.etc, check=self.check_owner)


def sync_tables(ws: Workspace, actor: Actor, admin: Callable[[str], list[list[Any]]], etc: Path, *,
                check: Callable[[], object] = lambda: None, reload_wait: float = 2.5) -> SyncReport:
    """Register every governed table on a running Trino and write the rules and groups it reads.

    The one sync of the local server (:class:`TrinoServer`) and of a cluster's coordinator
    (``lakehouse.trino_cluster``): stage ``maintain`` on ``system:trino`` decides first, then
    ``check`` (the caller's ownership check: never register this workspace's tables in another
    workspace's server); ``admin`` runs SQL as Lakewarden's own user; ``rules.json`` and
    ``group.txt`` are rewritten in ``etc``, which the server reloads every ``security.refresh-period``
    (``reload_wait`` covers it). Audited as ``trino.sync``.
    """
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("trino"))
    check()
    t0 = time.perf_counter()
    rep = SyncReport()
    cat = Catalog(ws.config)
    wanted: dict[tuple[str, str], tuple[str, pa.Schema]] = {}
    for ref in cat.list():
        wanted[(ref.layer, ref.dataset)] = (f"{ref.layer}/{ref.dataset}", _table_schema(cat, ref))
    for schema, table in SYSTEM_TABLES:
        rel = ws.config.audit.table if table == "events" else ws.config.audit.checkpoints_table
        uri = ws.config.table_uri(rel)
        from deltalake import DeltaTable

        if DeltaTable.is_deltatable(uri):
            wanted[(schema, table)] = (rel, DeltaTable(uri).to_pyarrow_dataset().schema)
    existing = {
        (s, t) for s, t in admin(
            f"SELECT table_schema, table_name FROM {CATALOG}.information_schema.tables "
            "WHERE table_schema <> 'information_schema'"
        )
    }
    for schema in sorted({s for s, _ in wanted}):
        admin(f"CREATE SCHEMA IF NOT EXISTS {CATALOG}.{quote_ident(schema, 'trino')}")
    for (schema, table), (rel, _) in sorted(wanted.items()):
        name = f"{schema}.{table}"
        if (schema, table) in existing:
            rep.present.append(name)
            continue
        admin(
            f"CALL {CATALOG}.system.register_table(schema_name => '{schema}', table_name => '{table}', "
            f"table_location => '{_table_location(ws, rel)}')"
        )
        rep.registered.append(name)
    rules = compile_rules(ws, {k: v[1] for k, v in wanted.items()})
    rep.rules = len(rules["tables"])
    _write_atomic(etc / "rules.json", json.dumps(rules, indent=2))
    _write_atomic(etc / "group.txt", render_groups(ws))
    admin(f"CALL {CATALOG}.system.flush_metadata_cache()")
    time.sleep(reload_wait)  # the rules and groups are reloaded every second
    rep.seconds = time.perf_counter() - t0
    ws.audit.record("trino.sync", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value,
                    resource="system:trino", details={"registered": rep.registered, "rules": rep.rules})
    return rep


# -- rendered profiles (production, cluster) --------------------------------------------------
def policy_schema(ws: Workspace, dataset: str, layer: str) -> pa.Schema:
    """The schema a governed table will have, from policy alone (to render rules before any data)."""
    from lakehouse.validate import output_type
    from governance.policy import Protection

    pol = ws.policies.dataset(dataset)
    fields = []
    for name, col in pol.columns.items():
        if layer in ("bronze", "silver") and col.protection in (Protection.VAULT, Protection.RESTRICTED):
            continue
        if layer in ("vault", "restricted") and name != pol.subject_key and col.protection is not (
            Protection.VAULT if layer == "vault" else Protection.RESTRICTED
        ):
            continue
        fields.append(pa.field(name, output_type(col)))
    if layer == "silver":
        from lakehouse.silver import hashed_columns

        fields += [pa.field(n, pa.float64()) for n in pol.derived_columns()]
        fields += [pa.field(hash_column(n), pa.string()) for n in hashed_columns(ws.policies, dataset)
                   if pol.columns.get(n) is not None and pa.types.is_string(output_type(pol.columns[n]))]
    fields += [pa.field("_subject_bucket", pa.int32()), pa.field("_ingested_at", pa.timestamp("us", tz="UTC"))]
    return pa.schema(fields)


_PROD_README = """# Trino for production (rendered by `lakewarden trino render --profile production`)

A single coordinator that analysts reach only over HTTPS with a password; plain HTTP is
closed. The access rules and groups are compiled from `policies/` exactly as for the local
server; re-render after a policy change (the server reloads rules.json every minute).

Before use:
1. TLS: put a PEM with the server certificate and key at `/etc/trino/tls/trino.pem`
   (`http-server.https.keystore.path`).
2. Passwords: create `/etc/trino/password.db` with bcrypt entries
   (`htpasswd -B -C 10 password.db <user>`), one per principal in `policies/roles.yaml`.
   Or use OAuth 2.0: replace `http-server.authentication.type=PASSWORD` with `OAUTH2` and
   fill in `oauth2.properties.example` (issuer, client id and secret from your IdP);
   map IdP groups to policy roles with the LDAP/OAuth group provider instead of group.txt.
3. `TRINO_SHARED_SECRET`: a long random value in the environment of every node
   (`internal-communication.shared-secret`), so nodes authenticate each other.

Without authentication a Trino user name is only a claim: never expose the local profile
beyond 127.0.0.1.
"""

_CLUSTER_README = """# Trino cluster over object storage (rendered by `lakewarden trino render --profile cluster`)

`coordinator/etc` and `worker/etc` are the two node roles; run one coordinator and as many
workers as the data needs, every worker with the same files (Trino gives each a node id at
start; add `node.id=` to a worker's node.properties to keep one across restarts). The
coordinator schedules no tasks (`node-scheduler.include-coordinator=false`) and alone holds the
access rules, groups and password file, compiled from `policies/`; workers need only the catalog.

Tables live in object storage (S3 or compatible). The `delta_lake` catalog keeps its metastore
in the bucket beside them (`hive.metastore=file`, `<storage root>/_trino/metastore`), which
every node reads, so no other service has to run. It holds only the table registrations (the
Delta logs are the truth; `sync` registers them again), but Trino's maintainers call the file
metastore one for testing, not for lasting production state: a Hive metastore service
(`hive.metastore=thrift` with `hive.metastore.uri=thrift://...`) or AWS Glue
(`hive.metastore=glue`) replaces it in `catalog/delta_lake.properties`; register the tables
again there.

The same renderer (`lakehouse.trino.render_cluster`) renders the local cluster that
`tests/test_trino_cluster.py` starts (`lakehouse.trino_cluster.TrinoCluster`: a coordinator and
workers as local processes over a bucket, HTTPS, passwords, the analysts' masks and row filters).

Before use:
1. TLS: a PEM with the coordinator's private key and certificate chain at
   `/etc/trino/tls/trino.pem` (`http-server.https.keystore.path`; what clients verify). Plain
   HTTP is closed on every node. Node-to-node traffic is HTTPS with certificates Trino derives
   from the shared secret (`internal-communication.https.required=true`); Trino's documentation
   asks for the coordinator's IP address in `discovery.uri` for those.
2. Passwords: `/etc/trino/password.db` on the coordinator (mode 0600), one `user:hash` line per
   principal of `policies/roles.yaml` and one for `lakewarden` (which registers the tables):
   bcrypt with cost 8 or more (`htpasswd -B -C 10 password.db <user>`), or PBKDF2 as
   `lakehouse.trino.password_file` writes it.
3. Environment of every node: `TRINO_SHARED_SECRET` (a long random value, the same on all
   nodes), `AWS_REGION`, `AWS_ENDPOINT_URL` (a store other than AWS S3), `AWS_ACCESS_KEY_ID` and
   `AWS_SECRET_ACCESS_KEY`. On AWS with an instance role, delete the endpoint and key lines of
   `catalog/delta_lake.properties`. No secret is written into these files.
4. `hive.metastore.catalog.dir` names the bucket, here `{root}`: render with
   `storage.root` set to yours, or edit it.
5. Tokens (optional): with `auth.enabled` in lakewarden.yaml the coordinator renders
   `http-server.authentication.type=PASSWORD,JWT` and accepts the identity provider's access
   tokens: signed by a key of the issuer's JWKS (`auth.jwks_url`, or the discovery document's
   `jwks_uri`), `iss` = `auth.issuer`, `aud` holding `lakewarden-trino`, the user named by
   `auth.username_claim`. Trino takes no groups from a token: `group.txt` (from policy
   principals) still maps each user to its roles. The password file then only needs `lakewarden`.
"""

CLUSTER_ROOT_PLACEHOLDER = "s3://lakewarden/lake"  # the rendered production catalog's root when storage.root is local
PBKDF2_ITERATIONS = 1_300_000  # OWASP's figure for PBKDF2-HMAC-SHA1; Trino verifies once per user and caches


@dataclass(frozen=True, kw_only=True)
class ClusterNode:
    """One node of a rendered cluster: its files go to ``<name>/etc/``; it serves HTTPS on ``port``
    and keeps its state in ``data_dir``. ``node_id`` unset: Trino makes one at each start."""

    name: str
    port: int = 8443
    data_dir: str = "/var/trino/data"
    node_id: str | None = None


@dataclass(frozen=True, kw_only=True)
class ClusterSpec:
    """Where a Trino cluster's nodes, files and secrets are: all :func:`render_cluster` needs besides
    policy. The production values are :func:`production_cluster`'s; :class:`TrinoCluster
    <lakehouse.trino_cluster.TrinoCluster>` fills in local ports and folders.

    ``s3_variables`` names the ``AWS_*`` variables the nodes' environment holds (the catalog refers
    to them as ``${ENV:...}``, never to their values). Secrets never appear here: the shared secret
    is ``${ENV:TRINO_SHARED_SECRET}``, the keys and password hashes are files the operator makes.

    Clients authenticate with a password (``password_file``), a bearer token of an OIDC issuer
    (``jwt``, see :class:`JwtAuth`), or either (both set); at least one is required.
    """

    discovery_uri: str
    coordinator: ClusterNode
    workers: tuple[ClusterNode, ...]
    storage_root: str
    environment: str = "lakewarden"
    tls_pem: str = "/etc/trino/tls/trino.pem"
    password_file: str | None = "/etc/trino/password.db"
    jwt: "JwtAuth | None" = None
    rules_file: str = "/etc/trino/rules.json"
    groups_file: str = "/etc/trino/group.txt"
    heap: str = "16G"
    refresh_period: str = "60s"
    query_max_memory: str | None = None
    query_max_memory_per_node: str | None = None
    s3_variables: frozenset[str] = frozenset({"AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID"})

    def __post_init__(self) -> None:
        if not self.discovery_uri.startswith("https://"):
            raise ValueError(f"discovery_uri must be https:// (internal traffic is HTTPS): {self.discovery_uri}")
        if not is_remote(self.storage_root):
            raise ValueError(f"a cluster's storage root must be an object store every node reaches: {self.storage_root}")
        names = [self.coordinator.name, *(w.name for w in self.workers)]
        if not self.workers or len(set(names)) != len(names):
            raise ValueError(f"a cluster needs at least one worker and distinct node names: {names}")
        if self.password_file is None and self.jwt is None:
            raise ValueError("a cluster needs an authentication: a password file, JWT, or both")


def _https_or_loopback(url: str) -> bool:
    from urllib.parse import urlparse

    u = urlparse(url)
    return u.scheme == "https" or (u.scheme == "http" and u.hostname in ("127.0.0.1", "localhost", "::1"))


@dataclass(frozen=True, kw_only=True)
class JwtAuth:
    """Bearer-token authentication on a coordinator (Trino's ``JWT`` authenticator): a token is
    accepted when its signature verifies with a key of ``key_file`` (the issuer's JWKS URL, or a
    PEM public key file on the coordinator), its ``iss`` is ``issuer``, its ``aud`` holds
    ``audience`` and it has not expired (Trino allows no clock skew). The Trino user is the
    ``principal_field`` claim. Trino takes no groups from the token: the file group provider
    (:func:`render_groups`, from policy principals) still maps each user to its roles.

    Raises:
        ValueError: an issuer or JWKS URL that is neither https nor http on loopback, a relative key
            file, or a value with a space or line break (it would break the properties file).
    """

    issuer: str
    key_file: str
    audience: str = TRINO_AUDIENCE
    principal_field: str = "preferred_username"

    def __post_init__(self) -> None:
        for name in ("issuer", "key_file", "audience", "principal_field"):
            value = getattr(self, name)
            if not value or any(ch.isspace() for ch in value):
                raise ValueError(f"{name} must be non-empty, without spaces or line breaks: {value!r}")
        if not _https_or_loopback(self.issuer):
            raise ValueError(f"the issuer must be https (plain http only on loopback): {self.issuer}")
        if "://" in self.key_file and not _https_or_loopback(self.key_file):
            raise ValueError(f"the JWKS URL must be https (plain http only on loopback): {self.key_file}")
        if "://" not in self.key_file and not self.key_file.startswith("/"):
            raise ValueError(f"key_file must be a JWKS URL or an absolute path on the coordinator: {self.key_file}")

    def properties(self) -> str:
        """The coordinator's ``http-server.authentication.jwt.*`` lines."""
        prefix = "http-server.authentication.jwt."
        return "".join(f"{prefix}{k}={v}\n" for k, v in (
            ("key-file", self.key_file), ("required-issuer", self.issuer),
            ("required-audience", self.audience), ("principal-field", self.principal_field)))


def _get_json(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - https or loopback, checked by the caller
        return json.loads(r.read())


def jwt_auth(auth: AuthConfig, *, audience: str = TRINO_AUDIENCE, fetch: Callable[[str], Any] | None = None) -> JwtAuth:
    """The :class:`JwtAuth` of ``auth:`` in lakewarden.yaml (:class:`governance.config.AuthConfig`):
    its issuer, its ``jwks_url`` or else the ``jwks_uri`` of the issuer's discovery document
    (fetched once, here), ``audience`` (Trino's own, not the predictor's ``auth.audience``) and
    ``auth.username_claim`` as the principal field.

    Raises:
        TrinoError: auth is off, or the discovery document cannot be read or names another issuer.
    """
    if not auth.enabled or not auth.issuer:
        raise TrinoError("auth is not enabled", hint="set auth.enabled and auth.issuer in lakewarden.yaml")
    key_file = auth.jwks_url
    if key_file is None:
        url = auth.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            doc = (fetch or _get_json)(url)
        except (OSError, ValueError) as exc:
            raise TrinoError(f"cannot read the issuer's discovery document {url}: {exc}",
                             hint="set auth.jwks_url in lakewarden.yaml") from None
        if doc.get("issuer") != auth.issuer or not doc.get("jwks_uri"):
            raise TrinoError(f"the discovery document at {url} names issuer {doc.get('issuer')!r} "
                             f"(configured: {auth.issuer!r}) or no jwks_uri", hint="check auth.issuer")
        key_file = doc["jwks_uri"]
    return JwtAuth(issuer=auth.issuer, key_file=key_file, audience=audience, principal_field=auth.username_claim)


def production_cluster(ws: Workspace) -> ClusterSpec:
    """The ``cluster`` profile's nodes: one coordinator and one worker template, on port 8443, with the
    workspace's bucket (or :data:`CLUSTER_ROOT_PLACEHOLDER` when its storage root is local).

    With ``auth.enabled`` the coordinator also accepts the issuer's tokens (:func:`jwt_auth`, which
    reads the discovery document unless ``auth.jwks_url`` is set); the password file stays for
    Lakewarden's own user, which registers the tables."""
    root = _storage_root(ws)
    return ClusterSpec(
        discovery_uri="https://trino-coordinator:8443",
        coordinator=ClusterNode(name="coordinator"),
        workers=(ClusterNode(name="worker"),),
        storage_root=root if is_remote(root) else CLUSTER_ROOT_PLACEHOLDER,
        jwt=jwt_auth(ws.config.auth) if ws.config.auth.enabled else None,
    )


def _profile_rules(ws: Workspace) -> str:
    """The rules for every table policy declares (before any data exists)."""
    names: dict[tuple[str, str], pa.Schema] = {}
    for ds in sorted(ws.policies.datasets):
        for layer in ("bronze", "silver", "quarantine", "vault"):
            if layer == "quarantine":
                from lakehouse.ingest import QUARANTINE_SCHEMA

                names[(layer, ds)] = QUARANTINE_SCHEMA
            else:
                names[(layer, ds)] = policy_schema(ws, ds, layer)
    from governance.audit import EVENT_SCHEMA

    names[("audit", "events")] = EVENT_SCHEMA
    return json.dumps(compile_rules(ws, names), indent=2) + "\n"


def render_cluster(ws: Workspace, spec: ClusterSpec) -> dict[str, str]:
    """A Trino cluster's configuration: ``<node name>/etc/<file>`` → content, for the coordinator and
    every worker of ``spec``.

    Every node: HTTPS only (``http-server.http.enabled=false``), internal traffic over HTTPS
    authenticated by ``${ENV:TRINO_SHARED_SECRET}``, the same ``node.environment``, the
    ``delta_lake`` catalog of :func:`delta_catalog` (metastore in the bucket, which all nodes
    share). The coordinator alone: the client-facing certificate (``spec.tls_pem``), password
    authentication from ``spec.password_file`` and/or bearer tokens of ``spec.jwt``
    (``http-server.authentication.type=PASSWORD,JWT``: Trino tries each in turn), the access rules
    and groups compiled from policy, and no tasks of its own (``node-scheduler.include-coordinator=false``).

    Raises:
        ValueError: through :class:`ClusterSpec`, a spec that cannot make a cluster.
    """
    catalog = delta_catalog(spec.storage_root, environ=dict.fromkeys(spec.s3_variables, "set"))
    jvm = JVM_CONFIG.format(heap=spec.heap)
    memory = "".join(f"{k}={v}\n" for k, v in (("query.max-memory", spec.query_max_memory),
                                                ("query.max-memory-per-node", spec.query_max_memory_per_node)) if v)
    internal = (
        "http-server.http.enabled=false\nhttp-server.https.enabled=true\n"
        "internal-communication.shared-secret=${ENV:TRINO_SHARED_SECRET}\n"
        "internal-communication.https.required=true\n"
    )

    kinds = [k for k, on in (("PASSWORD", spec.password_file is not None), ("JWT", spec.jwt is not None)) if on]
    authentication = f"http-server.authentication.type={','.join(kinds)}\n" + (spec.jwt.properties() if spec.jwt else "")

    def node_properties(n: ClusterNode) -> str:
        node_id = f"node.id={n.node_id}\n" if n.node_id else ""
        return f"node.environment={spec.environment}\n{node_id}node.data-dir={n.data_dir}\n"

    c = spec.coordinator
    files = {
        f"{c.name}/etc/config.properties": (
            "coordinator=true\nnode-scheduler.include-coordinator=false\n"
            f"discovery.uri={spec.discovery_uri}\n{memory}{internal}http-server.https.port={c.port}\n"
            f"http-server.https.keystore.path={spec.tls_pem}\n{authentication}"
        ),
        f"{c.name}/etc/node.properties": node_properties(c),
        f"{c.name}/etc/jvm.config": jvm,
        f"{c.name}/etc/catalog/{CATALOG}.properties": catalog,
        f"{c.name}/etc/access-control.properties": (
            f"access-control.name=file\nsecurity.config-file={spec.rules_file}\n"
            f"security.refresh-period={spec.refresh_period}\n"
        ),
        f"{c.name}/etc/group-provider.properties": (
            f"group-provider.name=file\nfile.group-file={spec.groups_file}\nfile.refresh-period={spec.refresh_period}\n"
        ),
        f"{c.name}/etc/rules.json": _profile_rules(ws),
        f"{c.name}/etc/group.txt": render_groups(ws),
    }
    if spec.password_file is not None:
        files[f"{c.name}/etc/password-authenticator.properties"] = (
            f"password-authenticator.name=file\nfile.password-file={spec.password_file}\n"
        )
    for w in spec.workers:
        files |= {
            f"{w.name}/etc/config.properties": (
                f"coordinator=false\ndiscovery.uri={spec.discovery_uri}\n{memory}{internal}"
                f"http-server.https.port={w.port}\n"
            ),
            f"{w.name}/etc/node.properties": node_properties(w),
            f"{w.name}/etc/jvm.config": jvm,
            f"{w.name}/etc/catalog/{CATALOG}.properties": catalog,
        }
    return files


def password_hash(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """A hash Trino's file password authenticator accepts: PBKDF2 with HMAC-SHA1 (the function Trino
    verifies with), written ``iterations:salt:hash`` in lower-case hex.

    Raises:
        ValueError: fewer than the 1000 iterations Trino requires, or an empty password.
    """
    import hashlib
    import secrets as _secrets

    if iterations < 1000:
        raise ValueError("Trino refuses PBKDF2 hashes of fewer than 1000 iterations")
    if not password:
        raise ValueError("an empty password")
    salt = _secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha1", password.encode("utf-8"), salt, iterations, 32)
    return f"{iterations}:{salt.hex()}:{digest.hex()}"


def password_file(ws: Workspace, passwords: Mapping[str, str], *, iterations: int = PBKDF2_ITERATIONS) -> str:
    """``user:hash`` lines for Trino's ``file.password-file``: each user of ``passwords``, and for a
    principal of policy also ``user@role`` (to act in one role only, see :func:`render_groups`)
    with the same password. Hashing runs in parallel (each takes ~0.5 s at the default cost)."""
    from concurrent.futures import ThreadPoolExecutor

    users = sorted(passwords)
    with ThreadPoolExecutor(max_workers=min(8, len(users) or 1)) as pool:  # hashlib releases the GIL
        hashes = dict(zip(users, pool.map(lambda u: password_hash(passwords[u], iterations=iterations), users)))
    lines = []
    for user in users:
        if ":" in user or "\n" in user:
            raise ValueError(f"a Trino user name cannot hold ':' or a newline: {user!r}")
        lines.append(f"{user}:{hashes[user]}")
        lines += [f"{user}@{r}:{hashes[user]}" for r in ws.policies.roles.principals.get(user, ())]
    return "".join(line + "\n" for line in lines)


def render_profile(ws: Workspace, profile: str) -> dict[str, str]:
    """Configuration files for ``production`` (HTTPS + password, one node) or ``cluster``
    (:func:`render_cluster` with :func:`production_cluster`'s nodes)."""
    if profile == "cluster":
        spec = production_cluster(ws)
        return {"README.md": _CLUSTER_README.replace("{root}", spec.storage_root), **render_cluster(ws, spec)}
    rules = _profile_rules(ws)
    groups = render_groups(ws)
    secure = (
        "http-server.http.enabled=false\n"
        "http-server.https.enabled=true\n"
        "http-server.https.port=8443\n"
        "http-server.https.keystore.path=/etc/trino/tls/trino.pem\n"
        "http-server.authentication.type=PASSWORD\n"
        "internal-communication.shared-secret=${ENV:TRINO_SHARED_SECRET}\n"
        "internal-communication.https.required=true\n"
    )
    access = (
        "access-control.name=file\nsecurity.config-file=/etc/trino/rules.json\nsecurity.refresh-period=60s\n"
    )
    group_provider = "group-provider.name=file\nfile.group-file=/etc/trino/group.txt\nfile.refresh-period=60s\n"
    password = "password-authenticator.name=file\nfile.password-file=/etc/trino/password.db\n"
    oauth = (
        "# Use instead of PASSWORD: http-server.authentication.type=OAUTH2, then:\n"
        "http-server.authentication.oauth2.issuer=https://idp.example.internal/\n"
        "http-server.authentication.oauth2.client-id=${ENV:TRINO_OAUTH_CLIENT_ID}\n"
        "http-server.authentication.oauth2.client-secret=${ENV:TRINO_OAUTH_CLIENT_SECRET}\n"
        "http-server.authentication.oauth2.principal-field=preferred_username\n"
    )
    jvm = JVM_CONFIG.format(heap="16G")
    if profile == "production":
        return {
            "README.md": _PROD_README,
            "etc/config.properties": (
                "coordinator=true\nnode-scheduler.include-coordinator=true\n"
                "discovery.uri=https://trino.example.internal:8443\n" + secure
            ),
            "etc/node.properties": "node.environment=lakewarden\nnode.data-dir=/var/trino/data\n",
            "etc/jvm.config": jvm,
            f"etc/catalog/{CATALOG}.properties": (
                "connector.name=delta_lake\nhive.metastore=file\nhive.metastore.catalog.dir=local:///_trino/metastore\n"
                "fs.native-local.enabled=true\nlocal.location=/srv/lakewarden/tables\n"
                "delta.register-table-procedure.enabled=true\n"
            ),
            "etc/access-control.properties": access,
            "etc/group-provider.properties": group_provider,
            "etc/password-authenticator.properties": password,
            "etc/oauth2.properties.example": oauth,
            "etc/rules.json": rules,
            "etc/group.txt": groups,
        }
    raise TrinoError(f"unknown profile {profile!r}: use production or cluster")


# -- queries ----------------------------------------------------------------------------------
# -- verbs: the Trino admin a command (or a scheduler) runs, each gated and audited -------------
@dataclass(frozen=True)
class TrinoStarted:
    """``trino_up``'s result: where the server answers, how long it took, what the sync registered."""

    url: str
    seconds: float
    installed: bool
    sync: SyncReport


def trino_up(ws: Workspace, actor: Actor, *, on_step: Callable[[str], None] | None = None) -> TrinoStarted:
    """Install Trino if needed, render its configuration, start it, wait until ready, register the tables.

    Stage ``maintain`` on ``system:trino`` decides first; the start is audited (``trino.start``)
    and so is the sync (``trino.sync``). ``on_step`` hears each long step as it begins.
    """
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("trino"))
    step = on_step or (lambda _msg: None)
    home, installed = default_home(), False
    if not (home / "bin" / "launcher").exists():
        step("installing Trino from Maven Central")
        home, installed = install(), True
    srv = TrinoServer(ws, home=home)
    step(f"starting Trino at {srv.url}")
    secs = srv.start()
    ws.audit.record("trino.start", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value, resource="system:trino",
                    details={"url": srv.url, "installed": installed})
    return TrinoStarted(srv.url, secs, installed, srv.sync(actor))


def trino_down(ws: Workspace, actor: Actor) -> None:
    """Stop this workspace's Trino server (stage ``maintain``; audited as ``trino.stop``)."""
    ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("trino"))
    srv = TrinoServer(ws)
    srv.stop()
    ws.audit.record("trino.stop", actor=actor.name, outcome="ok", stage=Stage.MAINTAIN.value, resource="system:trino",
                    details={"url": srv.url})
    ws.audit.flush()


def trino_sync(ws: Workspace, actor: Actor) -> SyncReport:
    """Register new tables and re-render the access rules from policy on the running server (gated, audited)."""
    srv = TrinoServer(ws)
    if not srv.running():
        ws.gate.enforce(Stage.MAINTAIN, actor, Resource.system("trino"))  # decide before saying anything
        raise TrinoError(f"Trino is not running at {srv.url}", hint="start it with `lakewarden trino up`")
    return srv.sync(actor)


def trino_status(ws: Workspace) -> dict[str, Any]:
    """Is this workspace's server up, which version, where (no governed values: not gated)."""
    return TrinoServer(ws).status()


def http_session(verify: bool | str) -> Any:
    """A requests session for the ``trino`` client that verifies with ``verify`` and nothing else.

    requests lets ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE`` replace a session's ``verify`` (the
    variables win over ``session.verify`` when a request passes none), so a configured CA file
    would silently give way to whatever bundle the environment names. ``trust_env`` off keeps the
    configured trust (and ignores proxy variables and ``.netrc``: Trino is reached directly).
    """
    import requests

    session = requests.Session()
    session.trust_env = False
    session.verify = verify
    return session


def connect(tc: Any, user: str, *, bearer: str | None = None, **kwargs: Any) -> Any:
    """A ``trino`` DB-API connection to the configured server (``trino:`` of lakewarden.yaml) as ``user``;
    with ``bearer``, authenticated by that access token (Trino's JWT authenticator: the coordinator
    checks its signature, issuer, audience and expiry, and takes the user from it)."""
    import trino

    if bearer is not None:
        from trino.auth import JWTAuthentication

        kwargs["auth"] = JWTAuthentication(bearer)
    return trino.dbapi.connect(host=tc.host, port=tc.port, user=user, http_scheme=tc.http_scheme,
                               http_session=http_session(tc.verify), **kwargs)


def _bearer(ws: Workspace, actor: Actor) -> str | None:
    """The token a query presents to Trino: none in laptop mode; with ``auth.enabled`` the actor's own
    verified access token, over HTTPS only (plain HTTP would hand the token to anyone on the path)."""
    if not ws.config.auth.enabled:
        return None
    from governance.authn import AuthenticationError, VerifiedActor
    from governance.tls import refuse_plaintext

    tc = ws.config.trino
    if tc.http_scheme != "https":
        refuse_plaintext(ws.config, "Trino", f"{tc.host}:{tc.port}",
                         hint="set trino.http_scheme: https and trino.verify to the coordinator's CA file")
    if not isinstance(actor, VerifiedActor) or not actor.bearer:
        raise AuthenticationError("missing", f"auth is on: a Trino query needs {actor.name}'s verified access token "
                                             "(run `lakewarden login`), not a name")
    return actor.bearer


def fetch_all(conn: Any, sql: str) -> list[list[Any]]:
    """Every row of ``sql`` on a ``trino`` connection, which is closed afterwards."""
    try:
        cur = conn.cursor()
        cur.execute(sql)
        return cur.fetchall()
    finally:
        conn.close()


def run_query(ws: Workspace, actor: Actor, sql: str, *, role: str | None = None, max_rows: int | None = None) -> pa.Table:
    """Run ``sql`` on Trino as the actor (or ``user@role``); Trino applies the compiled rules.

    With ``auth.enabled`` the actor must be a :class:`~governance.authn.VerifiedActor`: its token goes
    to Trino (JWT, HTTPS only), so Trino, not this process, decides who is asking.

    Raises:
        PlaintextRefused: auth is on and ``trino.http_scheme`` is http.
        AuthenticationError: auth is on and the actor holds no verified token.
    """
    import trino
    from trino.exceptions import TrinoUserError

    tc = ws.config.trino
    user = actor.name if role is None else f"{actor.name}@{role}"
    bearer = _bearer(ws, actor)
    check_server(ws)
    conn = connect(tc, user, bearer=bearer, catalog=CATALOG, schema="silver")
    outcome, rows_n = "error", 0
    rule_ids: tuple[str, ...] = ()
    refused: list[str] = []
    try:
        cur = conn.cursor()
        try:
            cur.execute(sql)
            rows = cur.fetchmany(max_rows) if max_rows else cur.fetchall()
        except TrinoUserError as exc:
            msg = (exc.message or str(exc)).splitlines()[0]
            if exc.error_name == "PERMISSION_DENIED":
                outcome = "deny"
                raise TrinoDenied(f"Trino denied the query for {user}: {msg}") from None
            raise SqlError(f"Trino: {msg} ({exc.error_name})") from None
        except (OSError, trino.exceptions.HttpError, trino.exceptions.TrinoConnectionError) as exc:
            raise TrinoError(f"Trino is not reachable at {tc.host}:{tc.port} ({str(exc).splitlines()[0][:120]})",
                             hint="start it with `lakewarden trino up`") from None
        table = _arrow(cur, rows)
        anonymous = [d for d in _datasets_named(ws, sql) if ws.policies.datasets[d].anonymity is not None]
        if anonymous:  # k_min holds for results on this engine too (issue #20)
            from lakehouse.anonymity import ResultRefused, check_result

            def sizes(q: str) -> pa.Table:  # the rows behind each group, under the same user and rules
                c = conn.cursor()
                try:
                    c.execute(q)
                    return _arrow(c, c.fetchall())
                except TrinoUserError as exc:
                    raise SqlError(f"Trino: {(exc.message or str(exc)).splitlines()[0]}") from None

            try:
                check_result(ws, actor, sql, anonymous, table, sizes=sizes, dialect="trino")
            except ResultRefused as exc:
                outcome, rule_ids, refused = "deny", tuple(exc.decision.rule_ids), list(exc.decision.reasons)
                raise
        outcome, rows_n = "ok", table.num_rows
        return table
    finally:
        conn.close()
        details: dict[str, Any] = {"engine": "trino", "trino_user": user, "rows": rows_n, "sql": redact(sql)[0][:500]}
        if refused:
            details["reasons"] = refused
        ws.audit.record("sql.query", actor=actor.name, outcome=outcome, resource="sql", rule_ids=rule_ids,
                        details=details)


def _arrow(cur: Any, rows: list[Any]) -> pa.Table:
    names = [d[0] for d in cur.description or []]
    cols = list(zip(*rows)) if rows else [() for _ in names]
    return pa.table({n: pa.array(list(c)) for n, c in zip(_unique(names), cols)})


def _datasets_named(ws: Workspace, sql: str) -> list[str]:
    """The governed datasets a Trino query names (``t``, ``layer.t``, ``lakewarden.layer.t``); unparsable
    SQL names every dataset whose name it mentions (the check is then the stricter one)."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(sql, read="trino")
        names = [t.name.lower() for t in tree.find_all(exp.Table)]
    except sqlglot.errors.ParseError:
        names = [d for d in ws.policies.datasets if re.search(rf"\b{re.escape(d)}\b", sql, re.IGNORECASE)]
    return [d for d in dict.fromkeys(names) if d in ws.policies.datasets]


def check_server(ws: Workspace) -> None:
    """Raise ForeignServer if the Trino on the configured port is not this workspace's (none answering is fine)."""
    TrinoServer(ws).check_owner()


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        out.append(n if k == 0 else f"{n}_{k}")
        seen[n] = k + 1
    return out


__all__ = ["TrinoServer", "TrinoError", "TrinoDenied", "ForeignServer", "check_server", "compile_rules", "render_groups", "render_local", "install",
           "run_query", "default_home", "TRINO_VERSION", "ClusterNode", "ClusterSpec", "render_cluster", "production_cluster",
           "render_profile", "JwtAuth", "jwt_auth", "password_hash", "password_file", "sync_tables", "launcher_command"]
