"""Create a workspace: configuration, key-encryption key, key store, audit log.

``init_workspace`` is what ``lakewarden init`` calls. It is idempotent: what
exists is kept, what is missing is created, and the result says which. A project
whose policies match no file gets a roles file and a commented dataset policy to
start from (``write_policy_templates``); existing files are never replaced.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from governance.config import CONFIG_FILENAME, load_config
from governance.identity import workspace_id
from governance.keys import generate_kek_file
from governance.workspace import Workspace

if TYPE_CHECKING:
    from governance.config import ProjectConfig

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


ROLES_TEMPLATE = """\
# Who may do what. Written by `lakewarden init` because the project had no policy yet.
# Roles name the stages they may run; `principals` gives users their roles (`--as USER` or
# LAKEWARDEN_USER picks the user). Which role each command needs: docs/roles.md.
kind: roles
roles:
  data_engineer:
    description: Ingests data, builds silver, maintains tables.
    stages: [ingest, query, maintain, lineage, policy]
  analyst:
    description: Queries silver tables through SQL, with masks and row filters.
    stages: [query, lineage]
  data_scientist:
    description: Builds training sets and trains private models.
    stages: [query, features, train, evaluate, register, lineage]
  ml_engineer:
    description: Deploys approved models, serves and monitors them.
    stages: [features, register, deploy, serve, lineage]
  compliance_officer:
    description: Audits, approves deployments, runs access and erasure requests.
    stages: [query, audit, approve, request, keys, lineage, policy, maintain]
principals:
  {user}: [data_engineer, data_scientist, ml_engineer]
  # A model is deployed only after a compliance officer approves it, and nobody's approval
  # counts for their own deployment: give the role to someone else, e.g.
  # another_user: [compliance_officer]
"""

DATASET_TEMPLATE = """\
# A dataset policy to start from, written by `lakewarden init` because the project had none.
# Rename the dataset and describe your own columns, or draft a policy from a sample of your
# file instead:   lakewarden policy suggest FILE     (then delete this file)
# Check it with:  lakewarden policy check            (every error names file, line and field)
kind: dataset
dataset: example                  # lower_snake_case; tables are <layer>.example, SQL says `example`
description: A template. Replace it with your data.
owner: data_engineer
subject_key: person_id            # the column naming the person a row is about
columns:
  # class: subject_key (becomes a random token at ingest), direct_identifier (encrypted in the
  # vault, never a feature), quasi_identifier (generalize it), sensitive (encrypted; fairness
  # only), public. type: string, int, double, bool, date, timestamp.
  person_id:  {{class: subject_key, type: string, required: true, unique: true, max_length: 64}}
  email:      {{class: direct_identifier, type: string, pattern: email, max_length: 254}}
  birth_date: {{class: quasi_identifier, type: date, generalize: year}}
  gender:     {{class: sensitive, type: string, protection: encrypt}}
  income:     {{class: public, type: double, min: 0}}
  approved:   {{class: public, type: bool}}
purposes:                         # every use of the data states one; the gate checks it
  analytics: {{description: Aggregate reporting.}}
  modelling: {{description: Inputs of a model. Sensitive attributes never.}}
  fairness_evaluation: {{description: Measuring model fairness across groups., sensitive: true}}
access:                           # per role: layers, columns (default all), masks, row filter, purposes
  data_engineer: {{layers: [bronze, silver, quarantine], purposes: [analytics]}}
  analyst:
    layers: [silver]
    columns: [person_id, birth_date, income, approved]   # the others are hidden from analysts
    masks: {{person_id: hash, income: "bucket:10000"}}
    purposes: [analytics]
  data_scientist: {{layers: [silver], purposes: [modelling, fairness_evaluation]}}
  ml_engineer: {{layers: [silver], purposes: [modelling]}}
  compliance_officer: {{layers: [bronze, silver, quarantine, vault], purposes: [analytics, fairness_evaluation]}}
retention: {{landing: 7d, bronze: 2y, silver: 2y, quarantine: 90d, history: 7d}}
privacy: {{epsilon_per_run: 8.0, epsilon_total: 20.0, delta: 1.0e-5}}   # differential privacy budget for training
fairness: {{sensitive_attributes: [gender]}}  # the deploy gate's thresholds (defaults: 0.8 and 0.1)
labels:                           # what a model may be trained to predict, and which value is favourable
  approved: {{favourable: true}}
features:                         # Feast feature views over silver
  example_profile: {{columns: [income, birth_date]}}
"""


@dataclass
class InitResult:
    config: Path
    created: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    key_id: str = ""
    audit_key_id: str = ""
    workspace_id: str = ""  # what servers started for this workspace report (governance/identity.py)
    policy_templates: list[str] = field(default_factory=list)  # written because the project had no policy


_USER = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


def write_policy_templates(cfg: "ProjectConfig", *, user: str) -> list[Path]:
    """A roles file and a commented dataset policy, when the configured policies match no file.

    They go into the folder of the first ``policies:`` pattern (``policies/*.yaml`` by default),
    and only where that pattern would find them; an existing file is never replaced. ``user``
    (the one running init) becomes the first principal — a login name, or ``your_name`` when it
    does not look like one. Returns the files written (none when the project has a policy).
    """
    if cfg.policy_files():
        return []
    folder = _template_folder(cfg)
    if folder is None:
        return []
    name = user if _USER.match(user or "") else "your_name"
    written = []
    for fn, text in (("roles.yaml", ROLES_TEMPLATE.format(user=name)), ("example.yaml", DATASET_TEMPLATE.format())):
        path = folder / fn
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with open(path, "x", encoding="utf-8") as fh:  # never overwrite
                fh.write(text)
        except FileExistsError:
            continue
        written.append(path)
    return written


def _template_folder(cfg: "ProjectConfig") -> Path | None:
    """The folder of the first policy pattern whose own name part would match ``roles.yaml``."""
    for pattern in cfg.policies:
        p = Path(pattern)
        if any(c in str(p.parent) for c in "*?["):
            continue
        if fnmatch.fnmatch("roles.yaml", p.name) and fnmatch.fnmatch("example.yaml", p.name):
            return p.parent if p.is_absolute() else cfg.base_dir / p.parent
    return None


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
    res.policy_templates = [str(p) for p in write_policy_templates(cfg, user=actor)]
    res.created.extend(res.policy_templates)
    from governance.keys.pgstore import is_dsn, redacted

    if is_dsn(cfg.keys.store):
        res.kept.append(redacted(cfg.keys.store))  # a database server: created by its operator
    else:
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
                     "workspace_id": res.workspace_id, "policy_templates": len(res.policy_templates)},
        )
    return res


__all__ = ["InitResult", "init_workspace", "write_policy_templates", "DEFAULT_CONFIG", "ROLES_TEMPLATE", "DATASET_TEMPLATE"]
