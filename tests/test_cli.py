"""The CLI end to end, as a user runs it: exit codes, one-line errors, no tracebacks.

In this process (``lw_in``: ``lakewarden.cli.main``), but for one denial that goes through the
installed entry point in its own process (``lw``), status and all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.compute as pc
import pytest

from cli_helpers import lw, lw_in
from deltalake import DeltaTable, write_deltalake

from governance.audit import EVENT_SCHEMA

REPO = Path(__file__).resolve().parents[1]




@pytest.fixture
def proj(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    p = lw_in(tmp_path, "init", ".")
    assert p.returncode == 0, p.stderr
    return tmp_path


def test_init_creates_then_keeps(proj: Path):
    assert (proj / "lakewarden.yaml").exists()
    kek = proj / ".lakewarden/secrets/kek.key"
    assert kek.stat().st_mode & 0o777 == 0o600
    again = lw_in(proj, "init", ".")
    assert again.returncode == 0
    assert "created" not in again.stdout and again.stdout.count("kept") == 3


def test_deny_exits_3_and_names_the_rule(proj: Path):
    # A subprocess on purpose: the denial's status 3 and its one line through the installed entry
    # point (``python -m lakewarden`` -> lakewarden.cli.run -> process exit), not just main's SystemExit.
    p = lw(proj, "--as", "sam", "gate", "check", "features", "--dataset", "customers",
           "--purpose", "credit_scoring", "--columns", "income,sex")
    assert p.returncode == 3
    assert p.stderr.strip().startswith("error: denied by policy rule customers/purposes/credit_scoring/sensitive:")
    ok = lw_in(proj, "--as", "sam", "gate", "check", "features", "--dataset", "customers",
               "--purpose", "credit_scoring", "--columns", "income,region")
    assert ok.returncode == 0 and "ALLOW" in ok.stdout


def test_audit_verify_ok_then_tampered_exits_4_naming_the_event(proj: Path):
    for _ in range(3):
        lw_in(proj, "--as", "ana", "gate", "check", "query", "--dataset", "customers", "--layer", "silver")
    ok = lw_in(proj, "--as", "carla", "audit", "verify")
    assert ok.returncode == 0 and "audit OK" in ok.stdout
    uri = str(proj / ".lakewarden/tables/_audit/events")
    t = DeltaTable(uri).to_pyarrow_table()
    shutil.rmtree(uri)
    write_deltalake(uri, t.filter(pc.not_equal(t["seq"], 2)).cast(EVENT_SCHEMA), configuration={"delta.appendOnly": "true"})
    bad = lw_in(proj, "--as", "carla", "audit", "verify")
    assert bad.returncode == 4
    assert "event seq=2 is missing: deleted from the log" in bad.stderr


def test_audit_is_for_compliance_only_and_query_filters(proj: Path):
    lw_in(proj, "--as", "ana", "gate", "check", "query", "--dataset", "customers", "--layer", "bronze")
    denied = lw_in(proj, "--as", "ana", "audit", "query")
    assert denied.returncode == 3 and "roles/stages/audit" in denied.stderr
    q = lw_in(proj, "--as", "carla", "audit", "query", "--outcome", "deny", "--format", "csv")
    assert q.returncode == 0
    lines = q.stdout.strip().splitlines()
    assert lines[0].startswith("seq,ts,actor,action")
    assert any("customers/access/analyst/layers" in ln for ln in lines[1:])
    assert all(",deny," in ln for ln in lines[1:])
    badtime = lw_in(proj, "--as", "carla", "audit", "query", "--since", "yesterday")
    assert badtime.returncode == 2 and "not an ISO date" in badtime.stderr


def test_missing_config_and_missing_kek_are_one_line_errors(tmp_path: Path, proj: Path):
    p = lw_in(tmp_path / "..", "policy", "check", env={"LAKEWARDEN_CONFIG": str(tmp_path / "nope.yaml")})
    assert p.returncode == 2 and "nope.yaml: file not found" in p.stderr
    cfg = (proj / "lakewarden.yaml").read_text().replace(
        "provider: file\n    path: .lakewarden/secrets/kek.key", "provider: env\n    var: MY_KEK"
    )
    (proj / "lakewarden.yaml").write_text(cfg)
    p = lw_in(proj, "--as", "carla", "audit", "verify")
    assert p.returncode == 2 and "MY_KEK" in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2


def test_kek_rotation_through_the_cli(proj: Path):
    new = proj / "new.key"
    assert lw_in(proj, "keys", "new-kek", "--out", str(new)).returncode == 0
    denied = lw_in(proj, "--as", "ana", "keys", "rotate", "--new-kek-file", str(new))
    assert denied.returncode == 3
    r = lw_in(proj, "--as", "carla", "keys", "rotate", "--new-kek-file", str(new))
    assert r.returncode == 0 and "rotated" in r.stdout
    # the old KEK no longer opens the store; the new one does, and the audit chain still verifies
    old = lw_in(proj, "--as", "carla", "keys", "status")
    assert old.returncode != 0 and "Traceback" not in old.stderr
    cfg = (proj / "lakewarden.yaml").read_text().replace(".lakewarden/secrets/kek.key", str(new))
    (proj / "lakewarden.yaml").write_text(cfg)
    st = lw_in(proj, "--as", "carla", "keys", "status")
    assert st.returncode == 0, st.stderr
    v = lw_in(proj, "--as", "carla", "audit", "verify")
    assert v.returncode == 0, v.stderr


def test_usage_errors_and_help(proj: Path):
    assert lw_in(proj, "--help").returncode == 0
    p = lw_in(proj, "gate", "check", "teleport", "--dataset", "customers")
    assert p.returncode == 2 and "teleport" in p.stderr
    p = lw_in(proj, "--as", "dana", "gate", "check", "ingest")
    assert p.returncode == 2 and "--dataset" in p.stderr


def test_lineage_show_unknown_name(proj: Path):
    p = lw_in(proj, "--as", "dana", "lineage", "show", "silver.nothing")
    assert p.returncode == 0 and "no lineage recorded for silver.nothing" in p.stdout


def test_policy_check_writes_a_json_summary(proj: Path):
    p = lw_in(proj, "policy", "check", "--json-out", "reports/g.json")
    assert p.returncode == 0
    import json

    s = json.loads((proj / "reports/g.json").read_text())
    assert s["datasets"]["customers"]["direct_identifier"] == 3 and len(s["digest"]) == 64


def test_in_process_runs_match_the_installed_command(proj: Path):
    """``lw_in``, which these tests use, prints and exits as ``python -m lakewarden`` does, and leaves this
    process's environment, folder and excepthook as it found them."""
    import os
    import sys

    env, cwd, hook = dict(os.environ), os.getcwd(), sys.excepthook
    for args, user in ((("gate", "check", "features", "--dataset", "customers", "--purpose", "credit_scoring",
                         "--columns", "income,region"), "sam"),     # allowed: 0 and a table on stdout
                       (("audit", "query", "--format", "csv"), "ana"),  # denied: 3 and one line
                       (("gate", "check", "teleport"), None)):       # a usage error: click's 2 and its panel
        sub, ins = lw(proj, *args, user=user), lw_in(proj, *args, user=user)
        assert (ins.returncode, ins.stdout, ins.stderr) == (sub.returncode, sub.stdout, sub.stderr), args
    assert dict(os.environ) == env and os.getcwd() == cwd and sys.excepthook is hook
