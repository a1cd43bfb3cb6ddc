"""Create a workspace: configuration, key-encryption key, key store, audit log.

``init_workspace`` is what ``lakewarden init`` calls. It is idempotent: what
exists is kept, what is missing is created, and the result says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from governance.config import CONFIG_FILENAME, load_config
from governance.identity import workspace_id
from governance.keys import generate_kek_file
from governance.workspace import Workspace

DEFAULT_CONFIG = """\
# Lakewarden project configuration. Relative paths are resolved against this file's folder.
version: 1
name: {name}
workspace: .lakewarden              # local state: audit head, caches (never in git)
storage:
  root: .lakewarden/tables          # local path now; s3://, gs://, abfss:// later
  compression: zstd
keys:
  store: .lakewarden/keys/keystore.db   # per-subject DEKs, never versioned (not git, not DVC)
  kek:
    # Laptop default: a key file next to the data. In production use
    # {{provider: env, var: LAKEWARDEN_KEK}} or a KMS plugin {{provider: plugin, factory: "pkg.mod:make_kek"}}.
    provider: file
    path: .lakewarden/secrets/kek.key
audit:
  table: _audit/events
  checkpoints_table: _audit/checkpoints
  checkpoint_every: 1000
lineage:
  table: _lineage/events
  namespace: lakewarden
trino:
  host: 127.0.0.1
  port: 8080
  catalog: delta_lake
  schema: lakewarden
policies:
  - policies/*.yaml
"""


@dataclass
class InitResult:
    config: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    key_id: str = ""
    audit_key_id: str = ""
    workspace_id: str = ""  # what servers started for this workspace report (governance/identity.py)


def init_workspace(directory: Path, *, actor: str) -> InitResult:
    """Create what is missing for a workspace in ``directory`` and audit the initialisation."""
    directory = directory.resolve()
    cfg_path = directory / CONFIG_FILENAME
    res = InitResult(config=cfg_path)
    if cfg_path.exists():
        res.kept.append(str(cfg_path))
    else:
        directory.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(DEFAULT_CONFIG.format(name=directory.name.lower().replace(" ", "-")[:60] or "lakewarden"))
        res.created.append(str(cfg_path))
    cfg = load_config(cfg_path)
    kek = cfg.keys.kek
    if kek.provider == "file" and kek.path:
        kek_path = cfg.path(kek.path)
        if kek_path.exists():
            res.kept.append(str(kek_path))
        else:
            generate_kek_file(kek_path)
            res.created.append(str(kek_path))
    store_path = cfg.path(cfg.keys.store)
    (res.kept if store_path.exists() else res.created).append(str(store_path))
    res.workspace_id = workspace_id(cfg)
    with Workspace(cfg) as ws:
        res.key_id = ws.keyring.store.kek_id
        res.audit_key_id = ws.audit_key_id
        ws.audit.record(
            "workspace.init",
            actor=actor,
            outcome="ok",
            details={"created": len(res.created), "kek_id": res.key_id, "audit_key_id": res.audit_key_id,
                     "workspace_id": res.workspace_id},
        )
    return res


__all__ = ["InitResult", "init_workspace", "DEFAULT_CONFIG"]
