"""`lakewarden init` in a project without policies writes a roles file and a dataset policy to start from."""

from __future__ import annotations

import shutil
from pathlib import Path

from cli_helpers import lw_in
from governance.config import load_config
from governance.policy import load_policies
from governance.setup import write_policy_templates

REPO = Path(__file__).resolve().parents[1]


def test_init_writes_a_policy_that_passes_the_check_and_names_policy_suggest(tmp_path: Path):
    p = lw_in(tmp_path, "init", ".", user="alex")
    assert p.returncode == 0, p.stderr
    roles, example = tmp_path / "policies" / "roles.yaml", tmp_path / "policies" / "example.yaml"
    assert f"created {roles}" in p.stdout and f"created {example}" in p.stdout
    assert "lakewarden policy suggest FILE" in p.stdout and "lakewarden policy check" in p.stdout
    assert "alex: [data_engineer, data_scientist, ml_engineer]" in roles.read_text()
    assert example.read_text().count("#") > 10  # commented, field by field
    check = lw_in(tmp_path, "policy", "check")
    assert check.returncode == 0 and "2 policy files are valid" in check.stdout, check.stderr
    ps = load_policies(load_config(tmp_path / "lakewarden.yaml").policy_files())
    ds = ps.datasets["example"]
    assert ds.subject_key == "person_id" and "approved" in ds.labels and ds.privacy is not None
    assert ps.roles_of("alex") == ("data_engineer", "data_scientist", "ml_engineer")
    # the user's edits survive a second init: nothing is rewritten, and no template is offered
    example.write_text(example.read_text().replace("A template. Replace it with your data.", "Loan applicants."))
    again = lw_in(tmp_path, "init", ".", user="alex")
    assert again.returncode == 0 and "created" not in again.stdout and "policy suggest" not in again.stdout
    assert "Loan applicants." in example.read_text()


def test_a_project_with_policies_gets_no_template(tmp_path: Path):
    shutil.copytree(REPO / "policies", tmp_path / "policies")
    p = lw_in(tmp_path, "init", ".")
    assert p.returncode == 0, p.stderr
    assert not (tmp_path / "policies" / "example.yaml").exists() and "policy suggest" not in p.stdout


def test_templates_follow_the_configured_folder_and_never_name_a_non_login(tmp_path: Path):
    (tmp_path / "lakewarden.yaml").write_text(
        "version: 1\nname: t\nkeys: {store: k.db, kek: {provider: env, var: X}}\npolicies: [governance_files/*.yaml]\n")
    cfg = load_config(tmp_path / "lakewarden.yaml")
    written = write_policy_templates(cfg, user="alex@example.com")
    assert written == [tmp_path / "governance_files" / "roles.yaml", tmp_path / "governance_files" / "example.yaml"]
    assert "alex@example.com" not in written[0].read_text() and "your_name: [" in written[0].read_text()
    assert write_policy_templates(cfg, user="alex") == []  # the project has policies now
    (tmp_path / "lakewarden.yaml").write_text(
        "version: 1\nname: t\nkeys: {store: k.db, kek: {provider: env, var: X}}\npolicies: [p/*.yml]\n")
    assert write_policy_templates(load_config(tmp_path / "lakewarden.yaml"), user="alex") == []  # would not be read
