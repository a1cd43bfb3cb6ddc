"""Shared fixtures: a project folder with the example policies and an env-var KEK."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROJECT_CONFIG = """\
version: 1
name: test
storage: {root: .lakewarden/tables}
keys:
  store: .lakewarden/keys/keystore.db
  kek: {provider: env, var: LAKEWARDEN_KEK}
audit: {checkpoint_every: 5}
policies: [policies/*.yaml]
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder: lakewarden.yaml (KEK from $LAKEWARDEN_KEK) and a copy of policies/."""
    from governance.keys import generate_kek_b64

    shutil.copytree(REPO / "policies", tmp_path / "policies")
    (tmp_path / "lakewarden.yaml").write_text(PROJECT_CONFIG)
    monkeypatch.setenv("LAKEWARDEN_KEK", generate_kek_b64())
    monkeypatch.delenv("LAKEWARDEN_CONFIG", raising=False)
    monkeypatch.delenv("LAKEWARDEN_USER", raising=False)
    return tmp_path


@pytest.fixture
def workspace(project: Path):
    from governance.workspace import Workspace

    ws = Workspace.open(project / "lakewarden.yaml")
    yield ws
    ws.close()
