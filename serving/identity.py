"""Whose predictor answers on a port: ``GET /lakewarden/identity`` on the local predictor.

The predictor (serving/model.py ``serve``) answers ``{"workspace_id", "model", "pid"}``: the
workspace it serves for (governance/identity.py), the model version and its process id.
``deploy --target local`` reads it before reporting a server deployed (serving/deploy.py):
a server of another workspace — or something that is not a Lakewarden predictor — on the
port is refused, never adopted.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any

from governance.identity import workspace_id
from governance.workspace import Workspace

IDENTITY_PATH = "/lakewarden/identity"


def install_identity_route(ws: Workspace, model: str) -> dict[str, Any]:
    """Add the identity route to KServe's app (before the server starts); return what it answers."""
    from kserve.model_server import app

    ident = {"workspace_id": workspace_id(ws.config), "model": model, "pid": os.getpid()}

    async def identity() -> dict[str, Any]:
        return ident

    app.add_api_route(IDENTITY_PATH, identity, methods=["GET"])
    return ident


def read_identity(port: int, host: str = "127.0.0.1", *, timeout: float = 10,
                  tls: "ssl.SSLContext | None" = None) -> dict[str, Any] | None:
    """What answers on the port: None if nothing listens, ``{}`` if it is not a Lakewarden predictor.

    With ``tls`` (the client context that says whom to trust) the route is read over https.

    Raises:
        ssl.SSLCertVerificationError: over https, the server's certificate does not verify.
    """
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return None
    scheme = "http" if tls is None else "https"
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{port}{IDENTITY_PATH}", timeout=timeout, context=tls) as r:
            out = json.loads(r.read())
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise exc.reason from None
        return {}
    except ssl.SSLCertVerificationError:
        raise
    except (OSError, ValueError):
        return {}
    return out if isinstance(out, dict) and isinstance(out.get("workspace_id"), str) else {}


__all__ = ["IDENTITY_PATH", "install_identity_route", "read_identity"]
