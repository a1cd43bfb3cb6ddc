"""The workspace id that servers carry (governance/identity.py): stable for a workspace, another
for a copy in another folder, nothing personal in it; the error for a foreign server names both."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from governance.config import load_config
from governance.identity import SALT_FILE, ForeignServer, known_path, workspace_id


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAKEWARDEN_CACHE", str(tmp_path / "cache"))  # the machine-local index of workspace folders


def test_the_id_is_stable_and_a_copy_elsewhere_gets_another(project: Path, tmp_path: Path):
    cfg = load_config(project / "lakewarden.yaml")
    wid = workspace_id(cfg)
    assert re.fullmatch(r"ws[0-9a-f]{16}", wid)
    assert workspace_id(load_config(project / "lakewarden.yaml")) == wid  # reopened: the same
    assert (cfg.workspace_dir / SALT_FILE).exists()
    # a second configuration sharing the workspace folder is the same workspace
    (project / "other.yaml").write_text((project / "lakewarden.yaml").read_text().replace("name: test", "name: other"))
    assert workspace_id(load_config(project / "other.yaml")) == wid
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    assert workspace_id(load_config(copy / "lakewarden.yaml")) != wid  # same salt, other folder
    assert known_path(wid) == str(cfg.workspace_dir.resolve())
    assert known_path("ws0000000000000000") is None and known_path("../etc") is None


def test_the_id_holds_nothing_of_the_path(project: Path):
    cfg = load_config(project / "lakewarden.yaml")
    wid = workspace_id(cfg)
    for part in cfg.workspace_dir.resolve().parts[1:]:
        assert part.lower() not in wid
    (cfg.workspace_dir / SALT_FILE).unlink()
    assert workspace_id(cfg) != wid  # the random salt, not the path alone, decides it


def test_init_records_the_workspace_id(tmp_path: Path):
    from governance.setup import init_workspace

    shutil.copytree(Path(__file__).resolve().parents[1] / "policies", tmp_path / "p" / "policies")
    res = init_workspace(tmp_path / "p", actor="dana")
    assert res.workspace_id == workspace_id(load_config(tmp_path / "p" / "lakewarden.yaml"))


def test_the_local_trino_configuration_carries_the_id(workspace):
    from lakehouse.trino import render_local

    props = dict(line.split("=", 1) for line in render_local(workspace)["node.properties"].splitlines())
    wid = workspace_id(workspace.config)
    assert props["node.environment"] == f"lakewarden_{wid}" and props["node.id"] == f"lakewarden-{wid}"


def test_the_error_names_the_port_and_both_workspaces(project: Path, tmp_path: Path):
    other = tmp_path / "other"
    shutil.copytree(project, other)
    theirs = workspace_id(load_config(other / "lakewarden.yaml"))
    ours = workspace_id(load_config(project / "lakewarden.yaml"))
    e = ForeignServer("Trino", "127.0.0.1:8080", theirs, ours=ours)
    assert e.exit_code == 2 and "\n" not in str(e)
    assert str(e).startswith(f"Trino on 127.0.0.1:8080 belongs to another workspace {theirs} at {other.resolve()}")
    assert f"not to this workspace ({ours})" in str(e) and e.owner_path == str((other / ".lakewarden").resolve())
    unknown = ForeignServer("Redis", "127.0.0.1:6379 db 0", "ws1111111111111111", ours=ours)
    assert "its folder is not known on this machine" in str(unknown)
