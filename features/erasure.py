"""The feature store's erasure handler: Feast online rows (SQLite or Redis), batched.

Feast 0.67 has no per-entity delete, so the handler removes the entities' rows from the
online store itself: SQLite with ``secure_delete`` and a VACUUM (no free page keeps the
bytes), Redis by deleting the entity's hash. The offline store reads the silver Delta
tables, which the lakehouse handler erases; a later materialization cannot bring rows back.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from governance.requests import AccessItem, ErasureContext, ErasureHandler, register_handler
from governance.workspace import Workspace

__all__ = ["delete_online", "online_rows", "HANDLER"]


def _entity_keys(ws: Workspace, key: str, tokens: Sequence[str]) -> dict[bytes, str]:
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    return {
        serialize_entity_key(EntityKey(join_keys=[key], entity_values=[Value(string_val=t)]),
                             entity_key_serialization_version=3): t
        for t in tokens
    }


def _redis(ws: Workspace) -> Any:
    from features.online import redis_client

    return redis_client(ws)  # the database Feast writes to, checked to be this workspace's


def _redis_keys(ws: Workspace, key: str, tokens: Sequence[str]) -> dict[bytes, str]:
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    project = ws.config.features.project
    return {
        _redis_key(project, EntityKey(join_keys=[key], entity_values=[Value(string_val=t)]),
                   entity_key_serialization_version=3): t
        for t in tokens
    }


@contextmanager
def _sqlite(ws: Workspace) -> Iterator[sqlite3.Connection | None]:
    path = ws.config.path(ws.config.features.online.path)
    if not path.exists():
        yield None
        return
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA secure_delete=ON")
        yield conn
    finally:
        conn.close()


def _views(ws: Workspace) -> list[tuple[str, str]]:
    return [(pol.subject_key, view) for pol in ws.policies.datasets.values() for view in pol.features]


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def delete_online(ws: Workspace, tokens: Sequence[str]) -> dict[str, int]:
    """Delete the tokens' rows from every feature view's online table; one VACUUM at the end.

    Returns rows removed per view (``online:<view>``). Redis keeps one hash per entity with every
    view's fields, so the first view of an entity counts its deleted hashes and later ones 0.
    """
    out: dict[str, int] = {f"online:{view}": 0 for _key, view in _views(ws)}
    project = ws.config.features.project
    if ws.config.features.online.type == "redis":
        r = _redis(ws)
        for key, view in _views(ws):
            keys = list(_redis_keys(ws, key, tokens))
            out[f"online:{view}"] = int(r.delete(*keys)) if keys else 0
        return out
    with _sqlite(ws) as conn:
        if conn is None:
            return out
        for key, view in _views(ws):
            table = f"{project}_{view}"
            if not _exists(conn, table):
                continue
            blobs = list(_entity_keys(ws, key, tokens))
            n = 0
            for i in range(0, len(blobs), 500):
                part = blobs[i : i + 500]
                n += conn.execute(f'DELETE FROM "{table}" WHERE entity_key IN ({",".join("?" * len(part))})',
                                  part).rowcount
            out[f"online:{view}"] = max(n, 0)
        conn.commit()
        conn.execute("VACUUM")
    return out


def online_rows(ws: Workspace, tokens: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(view, token, {feature: value})`` held online for the tokens."""
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    out: list[tuple[str, str, dict[str, Any]]] = []
    project = ws.config.features.project
    if ws.config.features.online.type == "redis":
        r = _redis(ws)
        for key in sorted({k for k, _v in _views(ws)}):
            for rk, tok in _redis_keys(ws, key, tokens).items():
                h = r.hgetall(rk)
                feats: dict[str, Any] = {}
                for f, v in h.items():
                    name = f.decode(errors="replace")
                    if name.startswith("_ts"):
                        continue
                    val = Value()
                    try:
                        val.ParseFromString(v)
                        feats[name] = feast_value_type_to_python_type(val)
                    except Exception:  # noqa: BLE001 - a hashed field name: show raw
                        feats[name] = None
                if feats:
                    out.append((f"redis:{key}", tok, feats))
        return out
    with _sqlite(ws) as conn:
        if conn is None:
            return out
        for key, view in _views(ws):
            table = f"{project}_{view}"
            if not _exists(conn, table):
                continue
            for blob, tok in _entity_keys(ws, key, tokens).items():
                rows = conn.execute(f'SELECT feature_name, value FROM "{table}" WHERE entity_key = ?', (blob,)).fetchall()
                if rows:
                    feats = {}
                    for name, v in rows:
                        val = Value()
                        val.ParseFromString(v)
                        feats[name] = feast_value_type_to_python_type(val)
                    out.append((view, tok, feats))
    return out


def _erase(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    return delete_online(ws, ctx.tokens)


def _residual(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    out: dict[str, int] = {}
    for view, _tok, _f in online_rows(ws, ctx.tokens):
        out[f"online:{view}"] = out.get(f"online:{view}", 0) + 1
    return out or {"online": 0}


def _access(ws: Workspace, ctx: ErasureContext) -> list[AccessItem]:
    return [AccessItem("feast-online", f"online:{view}", ctx.labels.get(tok, "subject"), feats)
            for view, tok, feats in online_rows(ws, ctx.tokens)]


HANDLER = ErasureHandler(name="features", order=30, erase=_erase, residual=_residual, access=_access)
register_handler(HANDLER)
