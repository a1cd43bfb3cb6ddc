"""The Redis online store's owner: a marker key naming the workspace that uses the database.

Two workspaces configured with the same Redis (same host, port and database) would read and
erase each other's online features. So the first time a workspace uses a Redis database it
claims it — only if the database is empty — by setting ``_lakewarden:workspace`` to its
workspace id (governance/identity.py); every later use checks the marker first. A database
claimed by another workspace, or holding keys without a marker, is refused with
:class:`governance.identity.ForeignServer` (exit 2) before Feast or the erasure handler
touches it.

The connection string is parsed as Feast parses it (``host:port,db=1,password=…``), so the
check and the erasure handler talk to the database Feast writes to.
"""

from __future__ import annotations

from typing import Any

from governance.identity import ForeignServer, workspace_id
from governance.workspace import Workspace

MARKER = "_lakewarden:workspace"


def _parse(connection_string: str) -> tuple[str, int, dict[str, Any]]:
    from feast.infra.online_stores.redis import RedisOnlineStore

    nodes, params = RedisOnlineStore._parse_connection_string(connection_string)
    node = nodes[0] if nodes else {}
    return node.get("host") or "127.0.0.1", int(node.get("port") or 6379), params


def where(ws: Workspace) -> str:
    host, port, params = _parse(ws.config.features.online.connection_string)
    return f"{host}:{port} db {int(params.get('db', 0))}"


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
    """A client for the configured database, checked to be this workspace's (ForeignServer otherwise)."""
    import redis

    host, port, params = _parse(ws.config.features.online.connection_string)
    client = redis.Redis(host=host, port=port, **params)
    check_redis(ws, client)
    return client


__all__ = ["MARKER", "check_redis", "redis_client", "where"]
