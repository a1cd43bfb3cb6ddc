"""Which workspace a server belongs to: a stable workspace id, and the error for a foreign server.

Two workspaces on one machine can be configured with the same port (Trino, the local
predictor, Redis). A server found running on a port is only this workspace's if it says so
itself; otherwise its data and its access rules are another workspace's, and adopting it
leaks them. Each server therefore carries the workspace id:

* Trino: ``node.environment=lakewarden_<id>`` in the rendered node configuration, read back
  from the server's ``/v1/info`` (lakehouse/trino.py);
* the local predictor: ``GET /lakewarden/identity`` answers the id, the model and the
  process id (serving/identity.py, checked by serving/deploy.py);
* Redis: a marker key (``lakewarden:workspace``) in the configured database, set when a
  workspace first uses an empty database and checked afterwards (features/online.py).

The id is ``ws`` and the first 16 hex digits of SHA-256 over a random salt (created once, in
``<workspace>/workspace-salt``) and the workspace folder's resolved path. It is stable for a
workspace, differs for a copy in another folder (whose servers' configuration would point
at other files), and says nothing about the person or the path: the salt makes the path
unguessable from the id. Each id is also noted in a machine-local index
(``~/.cache/lakewarden/workspaces/<id>``, this user only) with the workspace's folder, so
that an error about a foreign server can say where the other workspace is.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

from governance.config import ProjectConfig
from governance.errors import LakewardenError

SALT_FILE = "workspace-salt"


class ForeignServer(LakewardenError):
    """A server on this workspace's configured port belongs to another workspace (or to no workspace).

    ``kind`` (Trino, predictor, Redis), ``where`` (host:port), ``owner`` (the other workspace's
    id, None when the server does not name one) and ``owner_path`` (its folder, if known).
    """

    exit_code = 2

    def __init__(self, kind: str, where: str, owner: str | None, *, ours: str, detail: str = "",
                 hint: str | None = None) -> None:
        if owner:
            path = known_path(owner)
            whose = f"workspace {owner}" + (f" at {path}" if path else " (its folder is not known on this machine)")
            msg = f"{kind} on {where} belongs to another {whose}, not to this workspace ({ours})"
        else:
            msg = f"{kind} on {where} does not belong to this workspace ({ours}): {detail or 'it names no workspace'}"
        super().__init__(msg, hint=hint or "give this workspace a port of its own in lakewarden.yaml")
        self.kind = kind
        self.where = where
        self.owner = owner
        self.owner_path = known_path(owner) if owner else None
        self.ours = ours


def _index_dir() -> Path:
    cache = Path(os.environ.get("LAKEWARDEN_CACHE", Path.home() / ".cache" / "lakewarden"))
    return cache / "workspaces"


def known_path(ws_id: str) -> str | None:
    """The folder of the workspace with this id, if it was used on this machine by this user."""
    if not ws_id or not ws_id.isalnum():
        return None
    try:
        return (_index_dir() / ws_id).read_text().strip() or None
    except OSError:
        return None


def _salt(workspace_dir: Path) -> str:
    path = workspace_dir / SALT_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    workspace_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{SALT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(secrets.token_hex(16) + "\n")
    try:
        os.link(tmp, path)  # atomic and exclusive: two processes creating it agree on one salt
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip()


def workspace_id(config: ProjectConfig) -> str:
    """This workspace's id (``ws`` + 16 hex digits); creates the salt on first use and notes the folder locally."""
    folder = config.workspace_dir.resolve()
    wid = "ws" + hashlib.sha256(f"{_salt(folder)}\0{folder}".encode()).hexdigest()[:16]
    entry = _index_dir() / wid
    try:
        if not entry.exists() or entry.read_text().strip() != str(folder):
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{wid}.{os.getpid()}.tmp")
            tmp.write_text(f"{folder}\n")
            os.replace(tmp, entry)
    except OSError:
        pass  # the index only helps error messages
    return wid


__all__ = ["ForeignServer", "workspace_id", "known_path", "SALT_FILE"]
