"""The Redis online store: the one way to reach it, and the marker naming the workspace that uses it.

Reaching it. Every use of the Redis online store — Lakewarden's own client (:func:`redis_client`,
which the erasure handler uses) and Feast's store (:func:`feast_connection_string`, built by
``features/store.py``) — goes through :func:`target`, which, before any connection is made:

* parses ``features.online.connection_string`` as Feast parses it (``host:port,db=1,ssl=true,...``,
  each value JSON-decoded and handed to ``redis.Redis``), so every use talks to the database Feast
  writes to;
* with ``auth.enabled``, refuses a connection without verified TLS
  (:class:`governance.tls.PlaintextRefused`, exit 2): it needs ``ssl=true``, and
  ``ssl_cert_reqs=none`` or ``ssl_check_hostname=false`` count as plaintext (anyone on the path
  could then read the password and the features);
* resolves relative ``ssl_ca_certs``/``ssl_certfile``/``ssl_keyfile`` against the configuration's folder;
* adds the password from ``$LAKEWARDEN_REDIS_PASSWORD`` in memory only (the configuration refuses
  one, governance/config.py): it is in no file Lakewarden or Feast writes, and every error message
  about the server has it redacted.

TLS with a certificate of the local CA (governance/tls.py; redis-py checks the host name by
default, so the certificate must name the host connected to)::

    features:
      online: {type: redis, connection_string: "127.0.0.1:6380,db=1,ssl=true,ssl_ca_certs=etc/tls/ca.pem"}

A server that cannot be reached, whose certificate is not trusted or that refuses the password is
reported as :class:`OnlineStoreError` (one line, what to change), not as redis-py's traceback.

The owner marker. Two workspaces configured with the same Redis (same host, port and database)
would read and erase each other's online features. So the first time a workspace uses a Redis
database it claims it — only if the database is empty — by setting ``_lakewarden:workspace`` to
its workspace id (governance/identity.py); every later use checks the marker first. A database
claimed by another workspace, or holding keys without a marker, is refused with
:class:`governance.identity.ForeignServer` (exit 2) before Feast or the erasure handler touches it.
"""

from __future__ import annotations

import json
import os
import ssl
from dataclasses import dataclass, field
from typing import Any

from governance.errors import LakewardenError
from governance.identity import ForeignServer, workspace_id
from governance.tls import refuse_plaintext
from governance.workspace import Workspace

MARKER = "_lakewarden:workspace"
PASSWORD_ENV = "LAKEWARDEN_REDIS_PASSWORD"
SERVER = "the Redis online store"
# Parameters naming files: relative ones are resolved against the configuration's folder.
_FILE_PARAMS = ("ssl_ca_certs", "ssl_ca_path", "ssl_certfile", "ssl_keyfile")
_REDACTED = "***"


class OnlineStoreError(LakewardenError):
    """The Redis online store cannot be used: not reachable, its TLS certificate not trusted, the
    password refused, or a password Feast's connection string cannot carry. The message names the
    server (``host:port db N``), never the password."""


@dataclass(frozen=True)
class RedisTarget:
    """The configured Redis database and the keyword arguments ``redis.Redis`` gets (the password
    included: ``params`` is left out of the repr, never print it)."""

    host: str
    port: int
    params: dict[str, Any] = field(repr=False)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port} db {int(self.params.get('db', 0))}"


def _parse(connection_string: str) -> tuple[str, int, dict[str, Any]]:
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, params = RedisOnlineStore._parse_connection_string(connection_string)
    node = nodes[0] if nodes else {}
    return node.get("host") or "127.0.0.1", int(node.get("port") or 6379), params


def where(ws: Workspace) -> str:
    host, port, params = _parse(ws.config.features.online.connection_string)
    return f"{host}:{port} db {int(params.get('db', 0))}"


def _password() -> str | None:
    return os.environ.get(PASSWORD_ENV) or None


def redact(text: str) -> str:
    """``text`` with the Redis password (as given and as JSON-encoded) replaced by ``***``."""
    pw = _password()
    if pw:
        for form in (json.dumps(pw), pw):
            text = text.replace(form, _REDACTED)
    return text


def _refuse_weak_transport(ws: Workspace, host: str, port: int, params: dict[str, Any]) -> None:
    """With auth on, refuse plaintext and TLS that verifies nothing (governance.tls.refuse_plaintext)."""
    at = f"{host}:{port} db {int(params.get('db', 0))}"
    if params.get("ssl") is not True:
        refuse_plaintext(ws.config, SERVER, at, hint=(
            "add ssl=true and ssl_ca_certs=<the CA file that signed the server's certificate> to "
            "features.online.connection_string, and serve TLS (redis-server --tls-port)"))
    elif params.get("ssl_cert_reqs", "required") not in ("required", "optional"):
        refuse_plaintext(ws.config, SERVER, f"{at} (ssl_cert_reqs={params.get('ssl_cert_reqs')}: no certificate check)",
                         hint="remove ssl_cert_reqs from features.online.connection_string (redis-py verifies by "
                              "default) and trust the server's CA with ssl_ca_certs=<file>")
    elif params.get("ssl_check_hostname", True) is not True:
        refuse_plaintext(ws.config, SERVER, f"{at} (ssl_check_hostname=false: any certificate of the CA passes)",
                         hint="remove ssl_check_hostname from features.online.connection_string and give the server "
                              "a certificate naming the host connected to")


def target(ws: Workspace) -> RedisTarget:
    """The configured database, checked and completed; nothing is connected.

    Raises:
        PlaintextRefused: ``auth.enabled`` and the connection string has no ``ssl=true``, or turns
            certificate or host name checks off (exit 2).
        OnlineStoreError: a file it names (``ssl_ca_certs``, ...) does not exist, or
            ``$LAKEWARDEN_REDIS_PASSWORD`` holds a comma (Feast's connection string cannot carry it).
    """
    host, port, params = _parse(ws.config.features.online.connection_string)
    _refuse_weak_transport(ws, host, port, params)
    for name in _FILE_PARAMS:
        if isinstance(params.get(name), str):
            path = ws.config.path(params[name])
            if not path.exists():
                raise OnlineStoreError(f"{name} in features.online.connection_string names no file: {path}",
                                       hint="give the path of the file (relative to lakewarden.yaml's folder), e.g. "
                                            "the CA certificate that signed the Redis server's certificate")
            params[name] = str(path)
    pw = _password()
    if pw is not None:
        if "," in pw:
            raise OnlineStoreError(f"${PASSWORD_ENV} holds a comma, which Feast's connection string cannot carry",
                                   hint="give the Redis server a password without commas (e.g. openssl rand -hex 32)")
        params["password"] = pw
    return RedisTarget(host, port, params)


def feast_connection_string(ws: Workspace) -> str:
    """What Feast's ``RedisOnlineStoreConfig`` gets: the checked :func:`target`, password included,
    each value JSON-encoded so that Feast decodes exactly the same arguments. Keep it in memory.

    Raises:
        PlaintextRefused, OnlineStoreError: as :func:`target`; OnlineStoreError also when a value
            (a file path) holds a comma, which Feast would split.
    """
    from feast.infra.online_stores.redis import RedisOnlineStore

    t = target(ws)
    text = ",".join([f"{t.host}:{t.port}", *(f"{k}={json.dumps(v)}" for k, v in t.params.items())])
    nodes, params = RedisOnlineStore._parse_connection_string(text)
    if nodes != [{"host": t.host, "port": str(t.port)}] or params != t.params:
        bad = sorted(k for k, v in t.params.items() if "," in json.dumps(v) and k != "password")
        raise OnlineStoreError(f"features.online.connection_string for {t.where} cannot be passed to Feast: "
                               f"{', '.join(bad) or 'a value'} holds a comma",
                               hint="move the file to a path without commas")
    return text


def online_error(ws: Workspace, exc: BaseException) -> OnlineStoreError | None:
    """``exc`` as the error a user reads when it comes from reaching Redis (redis-py's errors, TLS),
    with the password redacted; None for any other exception (the caller re-raises it)."""
    import redis

    if not isinstance(exc, (redis.exceptions.RedisError, ssl.SSLError)):
        return None
    at = where(ws)
    detail = redact(str(exc).strip()) or type(exc).__name__
    if isinstance(exc, redis.exceptions.AuthenticationError) or any(
            s in detail for s in ("NOAUTH", "WRONGPASS", "invalid password", "no password is set")):
        return OnlineStoreError(f"Redis at {at} refused the login ({detail})",
                                hint=f"set {PASSWORD_ENV} in the environment to the server's password (requirepass "
                                     "or the ACL user's); never in lakewarden.yaml")
    if "CERTIFICATE_VERIFY_FAILED" in detail or isinstance(exc.__cause__ or exc.__context__, ssl.SSLCertVerificationError):
        if "mismatch" in detail:
            hint = ("connect by a host name or address the server's certificate names, or issue it one that names "
                    "this host (governance.tls.LocalCA.issue_server)")
        else:
            hint = "point ssl_ca_certs in features.online.connection_string at the CA file that signed the server's certificate"
        return OnlineStoreError(f"the TLS certificate of Redis at {at} is not trusted: refused ({detail})", hint=hint)
    if _parse(ws.config.features.online.connection_string)[2].get("ssl") is True:
        hint = "check that redis-server runs there and serves TLS on that port (--tls-port)"
    else:
        hint = ("check that redis-server runs there; a server that serves TLS only needs ssl=true and "
                "ssl_ca_certs=<file> in features.online.connection_string")
    return OnlineStoreError(f"cannot use Redis at {at}: {detail}", hint=hint)


def check_redis(ws: Workspace, client: Any) -> str:
    """Claim an empty database for this workspace, or check that it is this workspace's; return the id."""
    wid = workspace_id(ws.config)
    owner = client.get(MARKER)
    if owner is None:
        if client.dbsize() == 0 and client.set(MARKER, wid, nx=True):
            return wid
        owner = client.get(MARKER)  # another workspace may have claimed it first
        if owner is None:
            n = client.dbsize()
            raise ForeignServer(
                "Redis", where(ws), None, ours=wid,
                detail=f"the database holds {n} key(s) and no workspace marker ({MARKER})",
                hint=(f"point features.online.connection_string at an empty database (e.g. ',db=1'); if the keys are "
                      f"this workspace's online features, mark them: redis-cli SET {MARKER} {wid}"),
            )
    owner = owner.decode() if isinstance(owner, bytes) else str(owner)
    if owner != wid:
        raise ForeignServer("Redis", where(ws), owner, ours=wid,
                            hint="give this workspace its own Redis database in features.online.connection_string")
    return wid


def redis_client(ws: Workspace) -> Any:
    """A client for the configured database, reached as :func:`target` says and checked to be this
    workspace's.

    Raises:
        PlaintextRefused: auth is on and the connection would not be verified TLS (nothing connected).
        OnlineStoreError: the server cannot be reached, its certificate is not trusted, or it refuses
            the password.
        ForeignServer: the database belongs to another workspace, or holds keys and no marker.
    """
    import redis

    from redis.backoff import NoBackoff
    from redis.retry import Retry

    t = target(ws)
    client = redis.Redis(host=t.host, port=t.port, **t.params)
    retry = client.get_retry()
    client.set_retry(Retry(NoBackoff(), 0))  # the first contact fails fast: an untrusted certificate or a
    try:                                     # refused password does not get better in redis-py's retries
        check_redis(ws, client)
    except Exception as exc:
        client.close()
        err = online_error(ws, exc)
        if err is None:
            raise
        raise err from None
    if retry is not None:
        client.set_retry(retry)  # later commands (the erasure handler's) retry as redis-py does
    return client


__all__ = ["MARKER", "PASSWORD_ENV", "OnlineStoreError", "RedisTarget", "check_redis", "feast_connection_string",
           "online_error", "redact", "redis_client", "target", "where"]
