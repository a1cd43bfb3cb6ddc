"""Readable errors for lakewarden.yaml and policies/*.yaml.

A user's mistake must produce one error that names the file, the field, the line
and what is wrong. Files are built in tmp_path from the shipped example policies
with small text edits (or a YAML round-trip), and every expected line number is
computed from the text written, never typed in by hand.
"""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
import yaml
from cli_helpers import lw_in

from governance.config import CONFIG_ENV, ProjectConfig, find_config, load_config
from governance.errors import ConfigError, PolicyError
from governance.policy import Mask, MaskKind, PolicySet, load_policies

REPO = Path(__file__).resolve().parents[1]
# A frozen copy of the first example policies: these tests edit them textually, so the live
# examples in policies/ can evolve without moving the expected lines.
EXAMPLES = REPO / "tests" / "fixtures" / "policies_v1"
ROLES = (EXAMPLES / "roles.yaml").read_text(encoding="utf-8")
CUSTOMERS = (EXAMPLES / "customers.yaml").read_text(encoding="utf-8")
UNKNOWN_FIELD = "unknown field"


# -- helpers ------------------------------------------------------------------------------
def edit(text: str, old: str, new: str) -> str:
    """Replace ``old`` (which must occur exactly once) by ``new``."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def line_of(text: str, start: str) -> int:
    """1-based number of the one line of ``text`` that starts with ``start``."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start)]
    assert len(hits) == 1, f"{start!r} starts lines {hits}"
    return hits[0]


def write_policies(tmp_path: Path, *, roles: str | None = ROLES, customers: str | None = CUSTOMERS,
                   extra: dict[str, str] | None = None) -> dict[str, Path]:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    out: dict[str, Path] = {}
    for name, text in {"roles.yaml": roles, "customers.yaml": customers, **(extra or {})}.items():
        if text is not None:
            (d / name).write_text(text, encoding="utf-8")
            out[name] = d / name
    return out


def load(tmp_path: Path, **kw) -> PolicySet:
    files = write_policies(tmp_path, **kw)
    return load_policies(list(files.values()))


def policy_error(tmp_path: Path, **kw) -> PolicyError:
    with pytest.raises(PolicyError) as ei:
        load(tmp_path, **kw)
    return ei.value


def check(err: ConfigError, *, path: Path, field: str | None, line: int | None, words: list[str]) -> None:
    """The error names exactly this file, field and line, and its problem says ``words``."""
    assert err.path == str(path)
    assert err.field == field
    assert err.line == line
    for w in words:
        assert w in err.problem, f"{w!r} not in {err.problem!r}"
    where = f"{path}:{line}" if line is not None else str(path)
    assert str(err).startswith(f"{where}: " + (f"{field}: " if field else ""))
    assert "Traceback" not in str(err)


def write_cfg(tmp_path: Path, text: str, name: str = "lakewarden.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert not isinstance(ei.value, PolicyError)
    return ei.value


@pytest.fixture
def no_config_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CONFIG_ENV, raising=False)


# == lakewarden.yaml ======================================================================
def test_minimal_config_loads_with_defaults_and_resolves_paths_against_its_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    cfg_path = write_cfg(proj, "version: 1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must not depend on the working directory

    cfg = load_config(cfg_path)
    base = proj.resolve()
    assert cfg.base_dir == base
    assert cfg.version == 1 and cfg.name == "lakewarden"
    assert cfg.storage.root == ".lakewarden/tables" and cfg.storage.compression == "zstd"
    assert cfg.keys.kek.provider == "file" and cfg.keys.kek.path == ".lakewarden/secrets/kek.key"
    assert cfg.trino.port == 8080 and cfg.trino.schema_ == "lakewarden"
    assert cfg.audit.checkpoint_every == 1000
    assert cfg.policies == ["policies/*.yaml"]
    assert cfg.workspace_dir == base / ".lakewarden"
    assert cfg.path(cfg.keys.store) == base / ".lakewarden" / "keys" / "keystore.db"
    assert cfg.table_uri("silver/customers") == str(base / ".lakewarden" / "tables" / "silver" / "customers")
    # absolute paths are kept as they are
    assert cfg.path(str(tmp_path / "abs.db")) == tmp_path / "abs.db"


def test_relative_config_path_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "sub").mkdir()
    write_cfg(tmp_path / "sub", "version: 1\nworkspace: ws\nstorage: {root: data}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("sub/lakewarden.yaml")
    assert cfg.base_dir.is_absolute() and cfg.base_dir == (tmp_path / "sub").resolve()
    assert cfg.workspace_dir == (tmp_path / "sub" / "ws").resolve()
    assert cfg.table_uri("gold/x") == str((tmp_path / "sub" / "data" / "gold" / "x").resolve())


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("s3://bucket/x", "s3://bucket/x/silver/customers"),
        ("s3://bucket/x/", "s3://bucket/x/silver/customers"),
        ("s3a://b", "s3a://b/silver/customers"),
    ],
)
def test_object_store_root_gives_uri_joined_with_slash(tmp_path: Path, root: str, expected: str) -> None:
    cfg = load_config(write_cfg(tmp_path, f"version: 1\nstorage:\n  root: {root}\n"))
    assert cfg.table_uri("silver/customers") == expected


@pytest.mark.parametrize("root", ["gs://b", "abfss://c@acct.dfs.core.windows.net/lake", "hdfs://nn/lake"])
def test_an_object_store_lakewarden_cannot_scan_is_refused_by_name(tmp_path: Path, root: str) -> None:
    """The erasure scanner, the catalog and the log readers speak S3; a root they could not read
    would leave an erasure certificate covering nothing there."""
    with pytest.raises(ConfigError) as exc:
        load_config(write_cfg(tmp_path, f"version: 1\nstorage:\n  root: '{root}'\n"))
    msg = str(exc.value)
    assert "storage.root" in msg and root in msg and "s3://" in msg


def test_credentials_in_storage_options_are_refused_without_echoing_them(tmp_path: Path) -> None:
    secret = "x" + "9" * 30
    with pytest.raises(ConfigError) as exc:
        load_config(write_cfg(tmp_path, f"version: 1\nstorage:\n  root: s3://b/p\n  options: {{aws_secret_access_key: {secret}}}\n"))
    msg = str(exc.value)
    assert "aws_secret_access_key" in msg and "AWS_SECRET_ACCESS_KEY" in msg and secret not in msg
    cfg = load_config(write_cfg(tmp_path, "version: 1\nstorage:\n  root: s3://b/p\n  options: {aws_region: eu-west-1}\n"))
    assert cfg.storage.options == {"aws_region": "eu-west-1"}


def test_file_uri_root_is_a_local_path(tmp_path: Path) -> None:
    cfg = load_config(write_cfg(tmp_path, f"version: 1\nstorage:\n  root: file://{tmp_path}/t\n"))
    assert cfg.table_uri("a/b") == str(tmp_path / "t" / "a" / "b")


def test_unknown_top_level_field(tmp_path: Path) -> None:
    text = "version: 1\nname: demo\nstorge:\n  root: x\n"
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field="storge", line=line_of(text, "storge:"),
          words=[UNKNOWN_FIELD, "spelling"])


def test_misspelled_nested_field(tmp_path: Path) -> None:
    text = "version: 1\nkeys:\n  store: ks.db\n  kek:\n    provder: file\n    path: k.key\n"
    p = write_cfg(tmp_path, text)
    err = config_error(p)
    # The required 'provider' is missing (reported at the 'kek' line) and 'provder' is unknown (its own line).
    check(err, path=p, field="keys.kek.provider", line=line_of(text, "  kek:"), words=["required field is missing"])
    assert "1 more problem(s)" in err.problem
    assert f"line {line_of(text, '    provder:')}: keys.kek.provder: {UNKNOWN_FIELD}" in err.problem


def test_kek_provider_not_allowed_lists_allowed_values(tmp_path: Path) -> None:
    text = "version: 1\nkeys:\n  kek:\n    provider: vault\n    path: k\n"
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field="keys.kek.provider", line=line_of(text, "    provider:"),
          words=["'env'", "'file'", "'plugin'", "(got 'vault')"])


def test_provider_env_needs_var(tmp_path: Path) -> None:
    text = "version: 1\nkeys:\n  kek:\n    provider: env\n"
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field="keys.kek", line=line_of(text, "  kek:"),
          words=["provider 'env' needs the field 'var'"])


def test_provider_env_with_var_loads(tmp_path: Path) -> None:
    cfg = load_config(write_cfg(tmp_path, "version: 1\nkeys:\n  kek: {provider: env, var: LW_KEK}\n"))
    assert cfg.keys.kek.provider == "env" and cfg.keys.kek.var == "LW_KEK"


@pytest.mark.parametrize("factory", ["mymod.make", "mymod:", ":make", "my-mod:make", "a.b:c.d"])
def test_plugin_factory_must_be_module_colon_callable(tmp_path: Path, factory: str) -> None:
    text = f"version: 1\nkeys:\n  kek:\n    provider: plugin\n    factory: '{factory}'\n"
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field="keys.kek", line=line_of(text, "  kek:"),
          words=["'package.module:callable'", repr(factory)])


def test_plugin_factory_well_formed_loads(tmp_path: Path) -> None:
    cfg = load_config(write_cfg(tmp_path, "version: 1\nkeys:\n  kek: {provider: plugin, factory: 'acme.kms:make_kek'}\n"))
    assert cfg.keys.kek.factory == "acme.kms:make_kek"


@pytest.mark.parametrize(("port", "bound"), [(70000, "less than or equal to 65535"), (0, "greater than or equal to 1")])
def test_trino_port_out_of_range(tmp_path: Path, port: int, bound: str) -> None:
    text = f"version: 1\ntrino:\n  host: h\n  port: {port}\n"
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field="trino.port", line=line_of(text, "  port:"), words=[bound, f"(got {port})"])


def test_version_2_is_rejected(tmp_path: Path) -> None:
    text = "# project\nname: demo\nversion: 2\n"
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field="version", line=line_of(text, "version:"), words=["should be 1", "(got 2)"])


@pytest.mark.parametrize(
    ("text", "bad_line_start", "words"),
    [
        ("version: 1\nstorage:\n  root: [a, b\nname: x\n", "name: x", ["expected ',' or ']'"]),
        ("version: 1\nname: demo\n  bad: indent\n", "  bad: indent", ["mapping values are not allowed"]),
    ],
)
def test_yaml_syntax_error_names_the_line(tmp_path: Path, text: str, bad_line_start: str, words: list[str]) -> None:
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field=None, line=line_of(text, bad_line_start), words=["invalid YAML", *words])


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field=None, line=None, words=["file is empty"])


@pytest.mark.parametrize(("text", "kind"), [("- version: 1\n- name: x\n", "list"), ("just a string\n", "str")])
def test_top_level_not_a_mapping(tmp_path: Path, text: str, kind: str) -> None:
    p = write_cfg(tmp_path, text)
    check(config_error(p), path=p, field=None, line=1, words=[f"top level must be a mapping, not {kind}"])


def test_file_not_found(tmp_path: Path) -> None:
    p = tmp_path / "nope" / "lakewarden.yaml"
    check(config_error(p), path=p, field=None, line=None, words=["file not found"])


def test_not_utf8(tmp_path: Path) -> None:
    bad = b"\xe9"  # latin-1 é
    raw = b"version: 1\nname: caf" + bad + b"\n"
    p = tmp_path / "lakewarden.yaml"
    p.write_bytes(raw)
    check(config_error(p), path=p, field=None, line=None, words=[f"not UTF-8 text (byte {raw.index(bad)})"])


def test_several_problems_are_all_listed(tmp_path: Path) -> None:
    text = "version: 2\nname: Demo\ntrino:\n  port: 0\nextra: 1\n"
    p = write_cfg(tmp_path, text)
    err = config_error(p)
    check(err, path=p, field="version", line=line_of(text, "version:"), words=["(got 2)"])
    assert "3 more problem(s):" in err.problem
    assert f"line {line_of(text, 'name:')}: name: " in err.problem and "(got 'Demo')" in err.problem
    assert f"line {line_of(text, '  port:')}: trino.port: input should be greater than or equal to 1 (got 0)" in err.problem
    assert f"line {line_of(text, 'extra:')}: extra: {UNKNOWN_FIELD}" in err.problem
    # one problem per line after the headline
    assert len(err.problem.splitlines()) == 1 + 1 + 3


def test_no_config_anywhere_hints_at_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: None) -> None:
    if any((d / "lakewarden.yaml").is_file() for d in (tmp_path.resolve(), *tmp_path.resolve().parents)):
        pytest.skip("a lakewarden.yaml exists above tmp_path")
    monkeypatch.chdir(tmp_path)
    assert find_config() is None
    with pytest.raises(ConfigError) as ei:
        load_config(None)
    err = ei.value
    assert "no lakewarden.yaml found" in err.problem
    assert err.hint is not None and "run `lakewarden init`" in err.hint and CONFIG_ENV in err.hint
    assert "run `lakewarden init`" in str(err)
    assert err.exit_code == 2


def test_config_found_in_a_parent_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_config_env: None) -> None:
    cfg_path = write_cfg(tmp_path, "version: 1\nname: parent\n")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    assert find_config() == cfg_path.resolve()
    cfg = load_config()
    assert cfg.name == "parent" and cfg.base_dir == tmp_path.resolve()


def test_lakewarden_config_env_var_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A lakewarden.yaml in the working directory loses to $LAKEWARDEN_CONFIG.
    write_cfg(tmp_path, "version: 1\nname: local\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    env_cfg = write_cfg(other, "version: 1\nname: from_env\n", name="custom.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(CONFIG_ENV, str(env_cfg))
    cfg = load_config()
    assert cfg.name == "from_env" and cfg.base_dir == other.resolve()

    missing = other / "missing.yaml"
    monkeypatch.setenv(CONFIG_ENV, str(missing))
    check(config_error(None), path=missing, field=None, line=None, words=["file not found"])  # type: ignore[arg-type]


def test_policy_file_named_but_missing(tmp_path: Path) -> None:
    cfg = load_config(write_cfg(tmp_path, "version: 1\npolicies: [policies/missing.yaml]\n"))
    with pytest.raises(ConfigError) as ei:
        cfg.policy_files()
    assert ei.value.field == "policies"
    assert "policy file not found: policies/missing.yaml" in ei.value.problem


def test_policy_file_missing_names_the_loaded_config_file(tmp_path: Path) -> None:
    p = write_cfg(tmp_path, "version: 1\npolicies: [policies/missing.yaml]\n", name="prod.yaml")
    cfg = load_config(p)
    with pytest.raises(ConfigError) as ei:
        cfg.policy_files()
    assert ei.value.path == str(p)


def test_config_model_is_frozen(tmp_path: Path) -> None:
    cfg = load_config(write_cfg(tmp_path, "version: 1\n"))
    assert isinstance(cfg, ProjectConfig)
    with pytest.raises(Exception):
        cfg.name = "other"  # type: ignore[misc]


# == policies =============================================================================
def test_shipped_example_policies_load() -> None:
    files = sorted(EXAMPLES.glob("*.yaml"))
    a = load_policies(files)
    b = load_policies(files)
    assert set(a.datasets) == {"customers"}
    assert a.digest == b.digest and len(a.digest) == 64
    ds = a.dataset("customers")
    assert ds.subject_key == "customer_id"
    assert a.roles_of("carla") == ("compliance_officer",)
    assert ds.retention.bronze == timedelta(days=730) and ds.retention.landing == timedelta(days=7)
    assert str(ds.access["analyst"].masks["income"]) == "bucket:10000"
    with pytest.raises(PolicyError) as ei:
        a.dataset("orders")
    assert "no policy for dataset 'orders' (known: customers)" in ei.value.problem


def test_digest_changes_when_a_file_changes(tmp_path: Path) -> None:
    before = load(tmp_path)
    assert before.digest == load_policies(sorted(EXAMPLES.glob("*.yaml"))).digest  # same bytes, same names
    after = load(tmp_path, customers=edit(CUSTOMERS, "epsilon_per_run: 8.0", "epsilon_per_run: 4.0"))
    assert after.digest != before.digest
    assert load(tmp_path, customers=CUSTOMERS).digest == before.digest


# -- single-field mistakes: field and line come from pydantic ------------------------------
SINGLE_FIELD_CASES = {
    "class_typo": (
        ("email:       {class: direct_identifier", "email:       {class: direct_identifer"),
        "columns.email.class", "  email:",
        ["'subject_key'", "'direct_identifier'", "'quasi_identifier'", "'sensitive'", "'public'", "(got 'direct_identifer')"],
    ),
    "protection_not_allowed": (
        ("phone:       {class: direct_identifier, type: string}",
         "phone:       {class: direct_identifier, type: string, protection: none}"),
        "columns.phone", "  phone:",
        ["protection 'none' is not allowed for class 'direct_identifier'", "(allowed: encrypt, vault)"],
    ),
    "sensitive_protection_not_allowed": (
        ("sex:         {class: sensitive, type: string, protection: encrypt}",
         "sex:         {class: sensitive, type: string, protection: tokenize}"),
        "columns.sex", "  sex:",
        ["protection 'tokenize' is not allowed for class 'sensitive'", "(allowed: encrypt, restricted)"],
    ),
    "generalize_missing": (
        ("{class: quasi_identifier, type: date, generalize: year}", "{class: quasi_identifier, type: date}"),
        "columns.birth_date", "  birth_date:",
        ["protection 'generalize' needs 'generalize: year | month | prefix:N | bucket:W'"],
    ),
    "generalize_malformed": (
        ('generalize: "prefix:3"', 'generalize: "prefix:x"'),
        "columns.zip_code", "  zip_code:",
        ["generalize must be year, month, prefix:N or bucket:W", "(got 'prefix:x')"],
    ),
    "generalize_unknown": (
        ("generalize: year}", "generalize: decade}"),
        "columns.birth_date", "  birth_date:",
        ["generalize must be year, month, prefix:N or bucket:W", "(got 'decade')"],
    ),
    "mask_partial_without_size": (
        ('zip_code: "prefix:3"', "zip_code: partial"),
        "access.analyst.masks.zip_code", "    masks:",
        ["mask 'partial' needs a positive size", "'partial:4'"],
    ),
    "mask_partial_zero": (
        ('zip_code: "prefix:3"', 'zip_code: "partial:0"'),
        "access.analyst.masks.zip_code", "    masks:",
        ["mask 'partial' needs a positive size"],
    ),
    "mask_redact_with_size": (
        ('zip_code: "prefix:3"', 'zip_code: "redact:3"'),
        "access.analyst.masks.zip_code", "    masks:",
        ["mask 'redact' takes no size"],
    ),
    "epsilon_per_run_over_total": (
        ("epsilon_per_run: 8.0", "epsilon_per_run: 25.0"),
        "privacy", "privacy:",
        ["epsilon_per_run (25) exceeds epsilon_total (20)"],
    ),
    "delta_too_large": (
        ("delta: 1.0e-5", "delta: 0.5"),
        "privacy.delta", "  delta:",
        ["less than 0.01", "(got 0.5)"],
    ),
    "delta_zero": (
        ("delta: 1.0e-5", "delta: 0"),
        "privacy.delta", "  delta:",
        ["greater than 0", "(got 0)"],
    ),
    "duration_in_words": (
        ("quarantine: 90d", "quarantine: 30 days"),
        "retention.quarantine", "  quarantine:",
        ["'12h', '30d', '6w' or '7y'", "(got '30 days')"],
    ),
    "duration_unknown_unit": (
        ("history: 7d", "history: 7m"),
        "retention.history", "  history:",
        ["'12h', '30d', '6w' or '7y'", "(got '7m')"],
    ),
    "row_filter_semicolon": (
        ("row_filter: \"region <> 'restricted'\"", "row_filter: \"region <> 'x'; DROP TABLE customers\""),
        "access.analyst.row_filter", "    row_filter:",
        ["single SQL boolean expression", "no ';' or comments"],
    ),
    "row_filter_comment": (
        ("row_filter: \"region <> 'restricted'\"", "row_filter: \"region <> 'x' -- or 1=1\""),
        "access.analyst.row_filter", "    row_filter:",
        ["single SQL boolean expression", "no ';' or comments"],
    ),
    "upper_case_column": (
        ("  region:      {class: public", "  Region:      {class: public"),
        "columns", "columns:",
        ["column name 'Region' must be lower_snake_case"],
    ),
    "kind_something_else": (
        ("kind: dataset", "kind: something_else"),
        "kind", "kind:",
        ["'roles' or 'dataset'", "(got 'something_else')"],
    ),
    "unknown_layer": (
        ("layers: [bronze, silver, quarantine]\n    purposes: [analytics]\n  analyst",
         "layers: [bronze, silver, platinum]\n    purposes: [analytics]\n  analyst"),
        "access.data_engineer.layers[2]", "    layers: [bronze, silver, platinum]",
        ["'landing'", "'vault'", "(got 'platinum')"],
    ),
}


@pytest.mark.parametrize("case", list(SINGLE_FIELD_CASES))
def test_dataset_mistake_names_field_and_line(tmp_path: Path, case: str) -> None:
    (old, new), field, line_start, words = SINGLE_FIELD_CASES[case]
    text = edit(CUSTOMERS, old, new)
    err = policy_error(tmp_path, customers=text)
    check(err, path=tmp_path / "policies" / "customers.yaml", field=field, line=line_of(text, line_start), words=words)
    assert err.exit_code == 2


@pytest.mark.parametrize(
    ("row_filter", "ok"),
    [
        ("region <> 'x'; DROP TABLE customers", False),
        ("region <> 'x' -- comment", False),
        ("region <> 'x' /* c */", False),
        ("   ", False),
        ("region = 'north' AND income > 0", True),
    ],
)
def test_row_filter_after_yaml_round_trip(tmp_path: Path, row_filter: str, ok: bool) -> None:
    data = yaml.safe_load(CUSTOMERS)
    data["access"]["analyst"]["row_filter"] = row_filter
    text = yaml.safe_dump(data, sort_keys=False, width=1000)
    if ok:
        assert load(tmp_path, customers=text).dataset("customers").access["analyst"].row_filter == row_filter
        return
    err = policy_error(tmp_path, customers=text)
    words = ["must not be empty"] if not row_filter.strip() else ["single SQL boolean expression"]
    check(err, path=tmp_path / "policies" / "customers.yaml", field="access.analyst.row_filter",
          line=line_of(text, "    row_filter:"), words=words)


def test_mask_shorthand_partial_4_parses(tmp_path: Path) -> None:
    text = edit(CUSTOMERS, 'zip_code: "prefix:3"', 'zip_code: "partial:4"')
    mask = load(tmp_path, customers=text).dataset("customers").access["analyst"].masks["zip_code"]
    assert mask == Mask(kind=MaskKind.PARTIAL, n=4)
    assert str(mask) == "partial:4"
    assert Mask.model_validate("hash") == Mask(kind=MaskKind.HASH)


def test_accepted_durations(tmp_path: Path) -> None:
    text = edit(CUSTOMERS, "landing: 7d\n", "landing: 12h\n")
    text = edit(text, "bronze: 2y", "bronze: 1y")
    text = edit(text, "quarantine: 90d", "quarantine: 2w")
    ret = load(tmp_path, customers=text).dataset("customers").retention
    assert ret.landing == timedelta(hours=12)
    assert ret.bronze == timedelta(days=365)
    assert ret.quarantine == timedelta(days=14)
    assert ret.silver == timedelta(days=730)


# -- mistakes caught by whole-file checks (model validators) -------------------------------
# Each case: (file, (old, new) edits, words in the problem, {acceptable field: start of its line}).
CROSS_FIELD_CASES = {
    "subject_key_missing_column": (
        "customers.yaml", [("subject_key: customer_id", "subject_key: client_id")],
        ["subject_key 'client_id' is not one of the columns"],
        {"subject_key": "subject_key:"},
    ),
    "subject_key_wrong_class": (
        "customers.yaml", [("customer_id: {class: subject_key, type: string}", "customer_id: {class: public, type: string}")],
        ["subject_key column 'customer_id' must have class 'subject_key'"],
        {"subject_key": "subject_key:", "columns.customer_id": "  customer_id:", "columns.customer_id.class": "  customer_id:"},
    ),
    "second_subject_key_column": (
        "customers.yaml", [("region:      {class: public", "region:      {class: subject_key")],
        ["only the subject_key column may have class 'subject_key'", "(also: region)"],
        {"columns.region": "  region:", "columns.region.class": "  region:"},
    ),
    "mask_unknown_column": (
        "customers.yaml", [("{customer_id: hash,", "{account_id: hash,")],
        ["access.analyst.masks names unknown column 'account_id'"],
        {"access.analyst.masks": "    masks:", "access.analyst.masks.account_id": "    masks:"},
    ),
    "columns_unknown_column": (
        "customers.yaml", [("columns: [customer_id, birth_date", "columns: [account_id, birth_date")],
        ["access.analyst.columns names unknown column 'account_id'"],
        {"access.analyst.columns": "    columns: [", "access.analyst.columns[0]": "    columns: ["},
    ),
    "purpose_unknown": (
        "customers.yaml", [("purposes: [credit_scoring]\n", "purposes: [marketing]\n")],
        ["access.ml_engineer.purposes names purpose 'marketing'", "not in this dataset's purposes"],
        {"access.ml_engineer.purposes": "    purposes: [marketing]", "access.ml_engineer.purposes[0]": "    purposes: [marketing]"},
    ),
    "fairness_attribute_not_sensitive": (
        "customers.yaml", [("sensitive_attributes: [sex, ethnicity]", "sensitive_attributes: [sex, region]")],
        ["fairness attribute 'region' must be a column of class 'sensitive'"],
        {"fairness.sensitive_attributes": "  sensitive_attributes:", "fairness.sensitive_attributes[1]": "  sensitive_attributes:"},
    ),
    "fairness_attribute_unknown": (
        "customers.yaml", [("sensitive_attributes: [sex, ethnicity]", "sensitive_attributes: [sex, religion]")],
        ["fairness.sensitive_attributes names unknown column 'religion'"],
        {"fairness.sensitive_attributes": "  sensitive_attributes:", "fairness.sensitive_attributes[1]": "  sensitive_attributes:"},
    ),
    "catalog_missing_compliance_officer": (
        "roles.yaml",
        [("  compliance_officer:\n    description: Audits, approves deployments, runs access and erasure requests.\n"
          "    stages: [query, audit, approve, request, keys, lineage, policy, maintain]\n", ""),
         ("  carla: [compliance_officer]\n", "")],
        ["the role catalog must define compliance_officer"],
        {"roles": "roles:"},
    ),
    "principal_unknown_role": (
        "roles.yaml", [("  ana: [analyst]", "  ana: [analyst, auditor]")],
        ["principals.ana names unknown role 'auditor'"],
        {"principals.ana": "  ana:", "principals.ana[1]": "  ana:"},
    ),
}


def _cross_field(tmp_path: Path, case: str) -> tuple[PolicyError, Path, str, list[str], dict[str, str]]:
    name, edits, words, fields = CROSS_FIELD_CASES[case]
    text = ROLES if name == "roles.yaml" else CUSTOMERS
    for old, new in edits:
        text = edit(text, old, new)
    err = policy_error(tmp_path, **{name.removesuffix(".yaml"): text})
    return err, tmp_path / "policies" / name, text, words, fields


@pytest.mark.parametrize("case", list(CROSS_FIELD_CASES))
def test_whole_file_check_message_names_file_and_problem(tmp_path: Path, case: str) -> None:
    err, path, _, words, _ = _cross_field(tmp_path, case)
    assert err.path == str(path)
    assert str(err).startswith(f"{path}:")
    for w in words:
        assert w in err.problem


@pytest.mark.parametrize("case", list(CROSS_FIELD_CASES))
def test_whole_file_check_names_field_and_line(tmp_path: Path, case: str) -> None:
    err, _, text, _, fields = _cross_field(tmp_path, case)
    assert err.field in fields, f"field {err.field!r}, wanted one of {sorted(fields)}"
    assert err.line == line_of(text, fields[err.field])


def test_catalog_missing_roles_are_all_listed(tmp_path: Path) -> None:
    text = edit(ROLES, "  analyst:\n    description: Queries silver tables through SQL, with masks and row filters.\n"
                "    stages: [query, lineage]\n", "")
    text = edit(text, "  compliance_officer:\n    description: Audits, approves deployments, runs access and erasure "
                "requests.\n    stages: [query, audit, approve, request, keys, lineage, policy, maintain]\n", "")
    text = edit(edit(text, "  ana: [analyst]\n", ""), "  carla: [compliance_officer]\n", "")
    err = policy_error(tmp_path, roles=text)
    assert err.path == str(tmp_path / "policies" / "roles.yaml")
    assert "the role catalog must define analyst, compliance_officer" in err.problem


def test_role_catalog_bad_stage(tmp_path: Path) -> None:
    text = edit(ROLES, "stages: [query, lineage]", "stages: [query, lineage, sing]")
    err = policy_error(tmp_path, roles=text)
    check(err, path=tmp_path / "policies" / "roles.yaml", field="roles.analyst.stages[2]",
          line=line_of(text, "    stages: [query, lineage, sing]"), words=["'ingest'", "(got 'sing')"])


# -- cross-file checks -------------------------------------------------------------------
def test_access_role_not_in_catalog(tmp_path: Path) -> None:
    text = edit(CUSTOMERS, "  ml_engineer:\n", "  ml_engineers:\n")
    err = policy_error(tmp_path, customers=text)
    check(err, path=tmp_path / "policies" / "customers.yaml", field="access.ml_engineers",
          line=line_of(text, "  ml_engineers:"),
          words=["unknown role 'ml_engineers'",
                 "(defined roles: analyst, compliance_officer, data_engineer, data_scientist, ml_engineer)"])


def test_approver_role_not_in_catalog(tmp_path: Path) -> None:
    text = edit(CUSTOMERS, "approvers: [compliance_officer]", "approvers: [compliance_officer, dpo]")
    err = policy_error(tmp_path, customers=text)
    check(err, path=tmp_path / "policies" / "customers.yaml", field="deployment.approvers",
          line=line_of(text, "  approvers:"), words=["unknown role 'dpo'", "approvers"])


def test_two_role_catalogs(tmp_path: Path) -> None:
    err = policy_error(tmp_path, extra={"roles_extra.yaml": ROLES})
    d = tmp_path / "policies"
    assert err.path == str(d / "roles_extra.yaml")
    assert err.field == "kind"
    assert f"a second role catalog (the first is {d / 'roles.yaml'})" in err.problem


def test_two_role_catalogs_names_the_kind_line(tmp_path: Path) -> None:
    err = policy_error(tmp_path, extra={"roles_extra.yaml": ROLES})
    assert err.line == line_of(ROLES, "kind:")


def test_same_dataset_in_two_files(tmp_path: Path) -> None:
    err = policy_error(tmp_path, extra={"customers_copy.yaml": CUSTOMERS})
    d = tmp_path / "policies"
    assert err.path == str(d / "customers_copy.yaml")
    assert err.field == "dataset"
    assert f"dataset 'customers' is also defined in {d / 'customers.yaml'}" in err.problem


def test_same_dataset_in_two_files_names_the_line(tmp_path: Path) -> None:
    err = policy_error(tmp_path, extra={"customers_copy.yaml": CUSTOMERS})
    assert err.line == line_of(CUSTOMERS, "dataset:")


def test_no_role_catalog(tmp_path: Path) -> None:
    err = policy_error(tmp_path, roles=None)
    assert "no role catalog" in err.problem and "kind: roles" in err.problem
    assert err.hint and "roles.yaml" in err.hint


def test_no_policy_files() -> None:
    with pytest.raises(PolicyError) as ei:
        load_policies([])
    assert "no policy files found" in ei.value.problem
    assert ei.value.hint and "policies/roles.yaml" in ei.value.hint


def test_policy_yaml_syntax_error(tmp_path: Path) -> None:
    text = edit(CUSTOMERS, "  sex:         {class: sensitive, type: string, protection: encrypt}",
                "  sex:         {class: sensitive, type: string, protection: encrypt")
    err = policy_error(tmp_path, customers=text)
    assert err.path == str(tmp_path / "policies" / "customers.yaml")
    assert err.field is None and "invalid YAML" in err.problem
    # the parser notices the unclosed flow mapping on the following line
    assert err.line == line_of(text, "  ethnicity:")


def test_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    files = write_policies(tmp_path)
    missing = tmp_path / "policies" / "orders.yaml"
    with pytest.raises(PolicyError) as ei:
        load_policies([*files.values(), missing])
    assert ei.value.path == str(missing) and "file not found" in ei.value.problem


# == CLI ==================================================================================
def _cli(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    cfg = write_cfg(tmp_path, "version: 1\nname: demo\npolicies: [policies/*.yaml]\n")
    return lw_in(tmp_path, "-c", str(cfg), "policy", "check")


def test_cli_policy_check_broken_policy(tmp_path: Path) -> None:
    text = edit(CUSTOMERS, "  ml_engineer:\n", "  ml_engineers:\n")
    write_policies(tmp_path, customers=text)
    res = _cli(tmp_path)
    assert res.returncode == 2, res.stderr
    path = tmp_path.resolve() / "policies" / "customers.yaml"
    assert f"error: {path}:{line_of(text, '  ml_engineers:')}: access.ml_engineers: unknown role 'ml_engineers'" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_cli_policy_check_valid_examples(tmp_path: Path) -> None:
    write_policies(tmp_path)
    res = _cli(tmp_path)
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())
    assert "2 policy files are valid" in out and "customers" in out
    assert "Traceback" not in res.stderr + res.stdout
