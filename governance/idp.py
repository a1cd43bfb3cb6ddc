"""A local identity provider: Keycloak on loopback, and the realm Lakewarden's policies describe.

:class:`LocalKeycloak` runs the Keycloak of ``infra/keycloak/install.sh`` (pinned, from Maven
Central, pre-built for a file database, cached outside git) on 127.0.0.1 with its database in
``data_dir``: the tests' identity provider, and a laptop's stand-in for the organisation's. The
bootstrap administrator's password is made at start and passed through the server's environment
(never its arguments); it stays in this object.

:func:`provision` creates a realm from the role catalog (policies/roles.yaml):

* one group per policy role, and one user per ``principals:`` entry, in the groups of its roles;
  each user's password is generated here and returned in memory only (never written, logged or
  passed as an argument);
* the client ``lakewarden-cli`` (public, OAuth 2.0 device authorization grant: what ``lakewarden
  login`` will use) and the audiences ``lakewarden-predictor`` and ``lakewarden-trino`` (clients
  with no flow of their own: tokens are issued *for* them, never *to* them);
* on every client that gets tokens, a ``groups`` claim (group names, not paths) and the two
  audiences in ``aud``;
* with ``test_client=True`` only, ``lakewarden-test``: public, direct password grant (tests fetch
  tokens without a browser), and ``lakewarden-test-short``: the same with 5-second tokens (long
  enough that a renewed one still verifies on a loaded machine, short enough to wait out in a test).

    kc = LocalKeycloak(Path(".lakewarden/idp")).start()      # returns when the realm endpoint answers
    realm = provision(kc, ws.policies)                        # realm.issuer, realm.passwords (in memory)
    token = realm.password_token("mel")                       # test client only
    kc.stop()
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.policy import PolicySet

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "infra" / "keycloak" / "install.sh"
CLI_CLIENT = "lakewarden-cli"
PREDICTOR_AUDIENCE = "lakewarden-predictor"
TRINO_AUDIENCE = "lakewarden-trino"
TEST_CLIENT = "lakewarden-test"
SHORT_TEST_CLIENT = "lakewarden-test-short"


class IdentityProviderError(LakewardenError):
    """Keycloak could not be installed, started, reached or provisioned."""


def install() -> Path:
    """Install (once per machine) and return the Keycloak home."""
    cached = os.environ.get("LAKEWARDEN_KEYCLOAK_HOME")
    if cached and (Path(cached) / "bin" / "kc.sh").is_file():
        return Path(cached)
    try:
        out = subprocess.run(["bash", str(INSTALL)], check=True, capture_output=True, text=True, timeout=1800)
    except subprocess.CalledProcessError as exc:
        raise IdentityProviderError(f"installing Keycloak failed: {exc.stderr.strip()[-500:]}") from None
    return Path(out.stdout.strip().splitlines()[-1])


def installed() -> Path | None:
    """The Keycloak home if infra/keycloak/install.sh has run (never installs)."""
    cached = os.environ.get("LAKEWARDEN_KEYCLOAK_HOME")
    if cached and (Path(cached) / "bin" / "kc.sh").is_file():
        return Path(cached)
    cache = Path(os.environ.get("LAKEWARDEN_CACHE", Path.home() / ".cache" / "lakewarden"))
    for home in sorted(cache.glob("keycloak-*"), reverse=True):
        if (home / ".lakewarden-installed").is_file():
            return home
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _request(method: str, url: str, *, token: str | None = None, body: Any = None, form: dict[str, str] | None = None,
             timeout: float = 30.0) -> tuple[int, Any, dict[str, str]]:
    headers = {"accept": "application/json"}
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        headers["content-type"] = "application/x-www-form-urlencoded"
    elif body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None), dict(r.headers)
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            out = json.loads(raw) if raw else None
        except ValueError:
            out = raw.decode(errors="replace")[:300]
        return e.code, out, dict(e.headers)


class LocalKeycloak:
    """Keycloak on 127.0.0.1:``port`` (a free one by default), its file database in ``data_dir``."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port or free_port()
        self.admin_user = "lw-admin"
        self._admin_password = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def issuer(self, realm: str) -> str:
        return f"{self.url}/realms/{realm}"

    def start(self, *, timeout: float = 240.0) -> "LocalKeycloak":
        """Start and wait until the master realm's discovery document answers; raise
        :class:`IdentityProviderError` (with the log's tail) when it does not in ``timeout`` seconds."""
        if _port_open(self.port):
            raise IdentityProviderError(f"port {self.port} is already in use")
        home = install()
        java_file = home / ".java-home"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LD_PRELOAD", "FAKETIME", "KC_"))}
        if java_file.is_file():
            env["JAVA_HOME"] = java_file.read_text().strip()
        env["KC_BOOTSTRAP_ADMIN_USERNAME"] = self.admin_user
        env["KC_BOOTSTRAP_ADMIN_PASSWORD"] = self._admin_password
        # Runtime options as environment variables too: nothing about this server in `ps`.
        env["KC_DB_URL"] = f"jdbc:h2:file:{self.data_dir / 'h2' / 'keycloakdb'};NON_KEYWORDS=VALUE"
        env["KC_HTTP_HOST"] = "127.0.0.1"
        env["KC_HTTP_PORT"] = str(self.port)
        env["KC_HTTP_ENABLED"] = "true"
        env["KC_HOSTNAME_STRICT"] = "false"
        env["JAVA_OPTS_APPEND"] = f"-Dquarkus.transaction-manager.object-store.directory={self.data_dir / 'tx'}"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.data_dir / "keycloak.log", "ab")  # noqa: SIM115 - the server holds it
        t0 = time.monotonic()
        self.proc = subprocess.Popen([str(home / "bin" / "kc.sh"), "start", "--optimized"], env=env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, cwd=self.data_dir)
        log.close()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise IdentityProviderError(f"Keycloak exited with {self.proc.returncode}: {self._log_tail()}")
            try:
                code, _, _ = _request("GET", f"{self.issuer('master')}/.well-known/openid-configuration", timeout=2)
                if code == 200:
                    self.start_seconds = time.monotonic() - t0
                    return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise IdentityProviderError(f"Keycloak did not answer within {timeout:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return (self.data_dir / "keycloak.log").read_text(errors="replace")[-1500:]
        except OSError:
            return "(no log)"

    def stop(self, *, grace: float = 20.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``grace`` seconds."""
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(10)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "LocalKeycloak":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin REST API -------------------------------------------------------------------
    def admin_token(self) -> str:
        code, out, _ = _request("POST", f"{self.issuer('master')}/protocol/openid-connect/token",
                                form={"grant_type": "password", "client_id": "admin-cli",
                                      "username": self.admin_user, "password": self._admin_password})
        if code != 200:
            raise IdentityProviderError(f"Keycloak refused the bootstrap administrator ({code})")
        return out["access_token"]

    def admin(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> tuple[int, Any, dict]:
        code, out, headers = _request(method, f"{self.url}/admin/realms{path}", token=token or self.admin_token(),
                                      body=body)
        if code >= 400:
            raise IdentityProviderError(f"Keycloak admin {method} {path}: HTTP {code} {out}")
        return code, out, headers


@dataclass
class Realm:
    """A provisioned realm: its issuer, and the users' generated passwords (in memory only)."""

    keycloak: LocalKeycloak
    name: str
    passwords: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def issuer(self) -> str:
        return self.keycloak.issuer(self.name)

    def password_token(self, user: str, *, client_id: str = TEST_CLIENT) -> str:
        """An access token for ``user`` by the direct password grant (test clients only)."""
        code, out, _ = _request("POST", f"{self.issuer}/protocol/openid-connect/token",
                                form={"grant_type": "password", "client_id": client_id, "scope": "openid",
                                      "username": user, "password": self.passwords[user]})
        if code != 200:
            raise IdentityProviderError(f"no token for {user} from {self.name}: HTTP {code} {out}")
        return out["access_token"]


def _mappers() -> list[dict[str, Any]]:
    def audience(name: str) -> dict[str, Any]:
        return {"name": f"audience {name}", "protocol": "openid-connect", "protocolMapper": "oidc-audience-mapper",
                "config": {"included.client.audience": name, "access.token.claim": "true",
                           "id.token.claim": "false", "introspection.token.claim": "true"}}

    groups = {"name": "groups", "protocol": "openid-connect", "protocolMapper": "oidc-group-membership-mapper",
              "config": {"claim.name": "groups", "full.path": "false", "access.token.claim": "true",
                         "id.token.claim": "true", "userinfo.token.claim": "true",
                         "introspection.token.claim": "true"}}
    return [groups, audience(PREDICTOR_AUDIENCE), audience(TRINO_AUDIENCE)]


def provision(kc: LocalKeycloak, policies: "PolicySet", *, realm: str = "lakewarden", test_client: bool = False,
              access_token_lifespan: int = 300, users: dict[str, list[str]] | None = None) -> Realm:
    """Create ``realm`` from the role catalog: groups, users with generated passwords, clients.

    ``users`` (name → roles) defaults to the catalog's ``principals:``. Returns the :class:`Realm`,
    whose ``passwords`` are the only copy of the users' passwords.
    """
    tok = kc.admin_token()
    kc.admin("POST", "", {"realm": realm, "enabled": True, "accessTokenLifespan": access_token_lifespan,
                          "registrationAllowed": False, "loginWithEmailAllowed": False,
                          "bruteForceProtected": True}, token=tok)
    base = f"/{realm}"
    no_flows = {"standardFlowEnabled": False, "implicitFlowEnabled": False, "directAccessGrantsEnabled": False,
                "serviceAccountsEnabled": False}
    for aud in (PREDICTOR_AUDIENCE, TRINO_AUDIENCE):  # audiences: tokens are issued for them, not to them
        kc.admin("POST", f"{base}/clients", {"clientId": aud, "publicClient": False, "bearerOnly": False, **no_flows,
                                              "attributes": {"oauth2.device.authorization.grant.enabled": "false"}},
                 token=tok)
    clients = [{"clientId": CLI_CLIENT, "publicClient": True, **no_flows,
                "attributes": {"oauth2.device.authorization.grant.enabled": "true"},
                "protocolMappers": _mappers()}]
    if test_client:
        clients.append({"clientId": TEST_CLIENT, "publicClient": True, **no_flows, "directAccessGrantsEnabled": True,
                        "protocolMappers": _mappers()})
        clients.append({"clientId": SHORT_TEST_CLIENT, "publicClient": True, **no_flows,
                        "directAccessGrantsEnabled": True, "attributes": {"access.token.lifespan": "5"},
                        "protocolMappers": _mappers()})
    for c in clients:
        kc.admin("POST", f"{base}/clients", c, token=tok)
    group_ids: dict[str, str] = {}
    for role in policies.roles.roles:
        _, _, headers = kc.admin("POST", f"{base}/groups", {"name": role}, token=tok)
        group_ids[role] = {k.lower(): v for k, v in headers.items()}["location"].rsplit("/", 1)[-1]
    passwords: dict[str, str] = {}
    for user, roles in (users if users is not None else dict(policies.roles.principals)).items():
        pw = secrets.token_urlsafe(18)
        _, _, headers = kc.admin("POST", f"{base}/users", {
            "username": user, "enabled": True, "email": f"{user}@lakewarden.invalid", "emailVerified": True,
            "firstName": user, "lastName": "lakewarden", "requiredActions": [],
            "credentials": [{"type": "password", "value": pw, "temporary": False}]}, token=tok)
        uid = {k.lower(): v for k, v in headers.items()}["location"].rsplit("/", 1)[-1]
        for r in roles:
            kc.admin("PUT", f"{base}/users/{uid}/groups/{group_ids[r]}", token=tok)
        passwords[user] = pw
    return Realm(kc, realm, passwords)


__all__ = ["CLI_CLIENT", "PREDICTOR_AUDIENCE", "TRINO_AUDIENCE", "TEST_CLIENT", "SHORT_TEST_CLIENT",
           "IdentityProviderError", "LocalKeycloak", "Realm", "install", "installed", "provision"]
