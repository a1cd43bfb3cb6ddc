"""The sealed probe: what a request must keep across crashes, and never in the clear.

The subjects' tokens and the plaintext identifiers the verification looks for are sealed
under a throw-away system key ``request:<id>`` in ``<workspace>/requests/probes/``; the key
and the file are destroyed when the request is done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from governance.erasure.errors import RequestError
from governance.erasure.handlers import ErasureContext
from governance.errors import LakewardenError

if TYPE_CHECKING:
    from governance.workspace import Workspace


def probe_path(ws: "Workspace", request_id: str) -> Path:
    return ws.config.workspace_dir / "requests" / "probes" / f"{request_id}.sealed"


def _probe_key(request_id: str) -> str:
    return f"request:{request_id}"


def save_probe(ws: "Workspace", request_id: str, ctx: ErasureContext, extra: Mapping[str, Any]) -> None:
    body = json.dumps({"tokens": ctx.tokens, "identifiers": ctx.identifiers, "labels": ctx.labels, **extra})
    blob = ws.keyring.seal_system(_probe_key(request_id), body, dataset="requests", column="probe")
    p = probe_path(ws, request_id)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, p)


def load_probe(ws: "Workspace", request_id: str) -> tuple[ErasureContext, dict[str, Any]]:
    p = probe_path(ws, request_id)
    try:
        body = json.loads(ws.keyring.open_system(_probe_key(request_id), p.read_bytes(), dataset="requests",
                                                 column="probe"))
    except (OSError, LakewardenError):
        raise RequestError(
            f"request {request_id}: its sealed subject list is gone; it cannot be resumed",
            hint="file a new request for the same subjects",
        ) from None
    ids = {t: [(a, b) for a, b in v] for t, v in body.pop("identifiers").items()}
    ctx = ErasureContext(request_id, body.pop("tokens"), ids, body.pop("labels"))
    return ctx, body


def destroy_probe(ws: "Workspace", request_id: str) -> None:
    p = probe_path(ws, request_id)
    if p.exists():
        p.unlink()
    ws.keyring.destroy_system_key(_probe_key(request_id))
