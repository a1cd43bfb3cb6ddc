"""Gated, audited operations on the key store (what ``lakewarden keys`` runs).

The key store is a kernel resource: both verbs ask the gate for stage ``keys`` on
``system:keys`` first, so a notebook or a scheduler that calls them directly is held to the
same roles as the command line. A rotation leaves a ``keys.rotate`` event naming both KEKs and
the number of keys rewrapped (never a key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from governance.errors import UsageError
from governance.gate import Actor, Resource
from governance.keys import kek_from_env, kek_from_file
from governance.keys.pgstore import is_dsn
from governance.policy import Stage
from governance.workspace import Workspace


@dataclass(frozen=True)
class Rotation:
    """What a KEK rotation did: every data and system key rewrapped from ``old_kek`` to ``new_kek``."""

    rewrapped: int
    old_kek: str
    new_kek: str
    config_hint: str  # what keys.kek in lakewarden.yaml must now say
    residual: str | None = None  # a server key store: what destroying the old KEK makes final


def key_status(ws: Workspace, actor: Actor) -> dict[str, object]:
    """Key store statistics: subjects, shredded subjects, the KEK in use (no key material)."""
    ws.gate.enforce(Stage.KEYS, actor, Resource.system("keys"))
    return dict(ws.keyring.store.stats())


def rotate_kek(ws: Workspace, actor: Actor, *, new_kek_file: str | os.PathLike[str] | None = None,
               new_kek_env: str | None = None) -> Rotation:
    """Rewrap every key with the KEK in ``new_kek_file`` or the variable ``new_kek_env`` (data is not touched).

    The gate decides before the new KEK is even read; the rotation is audited.
    """
    if (new_kek_file is None) == (new_kek_env is None):
        raise UsageError("give exactly one of a new KEK file or a new KEK environment variable")
    ws.gate.enforce(Stage.KEYS, actor, Resource.system("keys"))
    new = kek_from_file(new_kek_file) if new_kek_file is not None else kek_from_env(new_kek_env)  # type: ignore[arg-type]
    old_id = ws.keyring.store.kek_id
    n = ws.keyring.rotate_kek(new)
    ws.audit.record("keys.rotate", actor=actor.name, outcome="ok", resource="system:keys",
                    details={"rewrapped": n, "from": old_id, "to": new.key_id,
                             "retired_generation": old_id if is_dsn(ws.config.keys.store) else None})
    ws.audit.flush()
    where = f"provider: file, path: {Path(new_kek_file)}" if new_kek_file is not None else f"provider: env, var: {new_kek_env}"
    residual = None
    if is_dsn(ws.config.keys.store):
        residual = (f"the key store's database keeps shredded keys (heap, WAL, backups) wrapped under {old_id}: "
                    "those shreds are final once it is destroyed")
    return Rotation(n, old_id, new.key_id, "{" + where + "}", residual)
