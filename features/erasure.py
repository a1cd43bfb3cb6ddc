"""The feature store's erasure handler: Feast online rows (SQLite or Redis), batched.

Feast 0.67 has no per-entity delete, so the handler removes the entities' rows from the
online store itself: SQLite with ``secure_delete`` and a VACUUM (no free page keeps the
bytes), Redis by deleting the entity's hash. The offline store reads the silver Delta
tables, which the lakehouse handler erases; a later materialization cannot bring rows back.

Access reads the same rows (Redis fields, murmur3 hashes of ``view:feature``, mapped back to
feature names) and opens sensitive features — silver's ciphertexts, stored by Feast unchanged
— with the subject's key.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from governance.erasure import AccessItem, ErasureContext, ErasureHandler, open_sealed
from governance.workspace import Workspace

__all__ = ["online_rows", "HANDLER"]


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


def _delete_online(ws: Workspace, tokens: Sequence[str]) -> dict[str, int]:
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


def _redis_fields(ws: Workspace, key: str) -> dict[bytes, tuple[str, str]]:
    """Feast's Redis hash field of each feature of the views keyed by ``key``: ``{field: (view, feature)}``.

    Feast names a feature's field by the murmur3 hash of ``"<view>:<feature>"``; the hash keeps
    one entity's features of every view.
    """
    from feast.infra.online_stores.helpers import _mmh3

    return {_mmh3(f"{view}:{c}"): (view, c)
            for pol in ws.policies.datasets.values() if pol.subject_key == key
            for view, spec in pol.features.items() for c in spec.columns}


def online_rows(ws: Workspace, tokens: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(view, token, {feature: value})`` held online for the tokens, values as Feast stored them
    (sensitive features are the silver ciphertexts; :func:`_access` opens them).

    In Redis a field no declared feature hashes to (a view since removed from the policy) is
    listed under ``redis:<join key>`` as ``field:<hex>``.
    """
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    def parse(v: bytes) -> Any:
        val = Value()
        val.ParseFromString(v)
        return feast_value_type_to_python_type(val)

    out: list[tuple[str, str, dict[str, Any]]] = []
    project = ws.config.features.project
    if ws.config.features.online.type == "redis":
        r = _redis(ws)
        for key in sorted({k for k, _v in _views(ws)}):
            fields = _redis_fields(ws, key)
            for rk, tok in _redis_keys(ws, key, tokens).items():
                by_view: dict[str, dict[str, Any]] = {}
                for f, v in sorted(r.hgetall(rk).items()):
                    if f.startswith(b"_ts"):
                        continue
                    view, name = fields.get(f, (f"redis:{key}", f"field:{f.hex()}"))
                    try:
                        value = parse(v)
                    except Exception:  # noqa: BLE001 - not a Feast value: the bytes as stored
                        value = bytes(v)
                    by_view.setdefault(view, {})[name] = value
                out.extend((view, tok, feats) for view, feats in by_view.items())
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
                    out.append((view, tok, {name: parse(v) for name, v in rows}))
    return out


def _erase(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    return _delete_online(ws, ctx.tokens)


def _residual(ws: Workspace, ctx: ErasureContext) -> dict[str, int]:
    out: dict[str, int] = {}
    for view, _tok, _f in online_rows(ws, ctx.tokens):
        out[f"online:{view}"] = out.get(f"online:{view}", 0) + 1
    return out or {"online": 0}


def _access(ws: Workspace, ctx: ErasureContext) -> list[AccessItem]:
    """Every online row of the subjects, sensitive features opened with the subject's key.

    A feature view reads ``silver.<dataset>``, whose encrypted columns hold the ciphertexts ingest
    sealed under ``(<dataset>, <column>)`` and the subject's token; Feast stores them unchanged.
    """
    from lakehouse.catalog import TableRef
    from lakehouse.erasure import sealed_columns

    owner = {view: pol for pol in ws.policies.datasets.values() for view in pol.features}
    items = []
    for view, tok, feats in online_rows(ws, ctx.tokens):
        pol = owner.get(view)
        sealed = sealed_columns(ws, TableRef("silver", pol.dataset)) if pol is not None else {}
        plain = {}
        for name, v in feats.items():
            if isinstance(v, (bytes, bytearray)) and name in sealed:
                ds, col = sealed[name]
                v = open_sealed(ws, v, token=tok, dataset=ds, column=col)
            plain[name] = v
        items.append(AccessItem("feast-online", f"online:{view}", ctx.labels.get(tok, "subject"), plain))
    return items


HANDLER = ErasureHandler(name="features", order=30, erase=_erase, residual=_residual, access=_access)
"""Entry point ``features`` of ``lakewarden.erasure_handlers``: the Feast online store."""
