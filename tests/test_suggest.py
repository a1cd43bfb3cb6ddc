"""`policy suggest` (a draft policy from a sample of a file) and `policy schema` (the JSON Schema).

The three files are the benchmark's (benchmarks/bench_suggest.py), smaller: the demo's customers
CSV, a typed Parquet file with British conventions and a JSON Lines file with US/Czech ones. Their
truth (which column is an identifier) is the benchmark's. Nothing here depends on the date, the
time zone or the machine's speed: every date in the files is years in the past, and the library
calls pass ``today`` explicitly.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from governance.errors import LakewardenError
from governance.policy import ColumnClass, load_policies
from lakehouse.errors import SuggestError
from lakehouse.suggest import _range, suggest_policy, write_draft
from tests.cli_helpers import lw_in

REPO = Path(__file__).resolve().parents[1]
TODAY = date(2026, 1, 1)
ROWS = 400


def _bench():
    spec = importlib.util.spec_from_file_location("bench_suggest", REPO / "benchmarks" / "bench_suggest.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_suggest", mod)
    spec.loader.exec_module(mod)
    return mod


B = _bench()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, str]]]:
    d = tmp_path_factory.mktemp("suggest")
    return {
        "csv": (B.make_customers(d / "demo", ROWS), B.CUSTOMERS_TRUTH),
        "parquet": (B.make_clients_parquet(d / "clients.parquet", ROWS), B.CLIENTS_TRUTH),
        "jsonl": (B.make_members_jsonl(d / "members.jsonl", ROWS), B.MEMBERS_TRUTH),
    }


def _policy_dir(tmp_path: Path, name: str, text: str) -> list[Path]:
    pol = tmp_path / "policies"
    pol.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "policies" / "roles.yaml", pol / "roles.yaml")
    (pol / f"{name}.yaml").write_text(text)
    return sorted(pol.glob("*.yaml"))


def _values(path: Path) -> dict[str, list]:
    """Every value of every column of a file, as read by Arrow (for the byte scan)."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pydict()
    if path.suffix == ".csv":
        import pyarrow.csv as pacsv

        t = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={c: pa.string() for c in B.CUSTOMERS_TRUTH}))
        return t.to_pydict()
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {k: [r.get(k) for r in rows] for k in rows[0]}


# ============================================================================ the three file kinds


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_each_file_kind_gets_its_identifiers_and_subject_key(files, kind: str):
    path, truth = files[kind]
    s = suggest_policy(path, today=TODAY)
    assert s.format == kind and s.rows_sampled >= ROWS  # small files: every row (customers: plus bad rows)
    got = {c.name: c.class_.value for c in s.columns}
    assert set(got) == set(truth)
    want_ids = {c for c, k in truth.items() if k in B.IDENTIFIER_CLASSES}
    assert set(s.identifiers()) == want_ids
    for c, k in truth.items():
        if k in B.IDENTIFIER_CLASSES:
            assert got[c] == k, (c, got[c], k)
    assert truth[s.subject_key.column] == "subject_key" and s.subject_key.confidence == "high"
    # sensitive attributes are found by name and encrypted
    for c, k in truth.items():
        if k == "sensitive":
            assert got[c] == "sensitive" and s.column(c).protection.value == "encrypt"


def test_protections_and_types_follow_the_formats(files):
    cl = suggest_policy(files["parquet"][0], today=TODAY)
    dob = cl.column("dob")  # dd/mm/yyyy text: ingest cannot type it as a date, so it is encrypted, not generalized
    assert (dob.class_, dob.protection.value, dob.type) == (ColumnClass.QUASI_IDENTIFIER, "encrypt", "string")
    assert dob.spec["pattern"] == "^[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}$"
    pc = cl.column("postcode")
    assert pc.protection.value == "generalize" and pc.spec["generalize"] == "prefix:2"
    assert cl.column("nin").kind == "national_id" and cl.column("notes").kind == "free_text"
    assert cl.column("mobile").spec["pattern"] == "phone"
    # typed Parquet columns keep their types; a digit code with leading zeros stays text and is no postcode
    assert (cl.column("tenure_months").type, cl.column("opened").type, cl.column("marketing_consent").type) == (
        "int", "date", "bool")
    assert cl.column("branch_code").class_ is ColumnClass.PUBLIC and cl.column("branch_code").type == "string"
    assert cl.column("opened").spec["max"] == "today"
    cu = suggest_policy(files["csv"][0], today=TODAY)
    bd = cu.column("birth_date")
    assert bd.type == "date" and bd.spec["generalize"] == "year" and bd.spec["max"] == "today"
    assert cu.column("zip_code").spec == {"class": "quasi_identifier", "protection": "generalize",
                                          "generalize": "prefix:3", "type": "string", "pattern": "zip5"}
    assert cu.column("email").spec["pattern"] == "email"
    assert cu.column("region").spec["allowed"] == ["east", "north", "restricted", "south", "west"]
    assert cu.column("sex").spec["allowed"] == ["F", "M", "X"]
    inc = cu.column("income")
    assert inc.type == "double" and inc.spec["min"] == 0 and inc.spec["max"] >= 100_000
    me = suggest_policy(files["jsonl"][0], today=TODAY)
    assert me.column("contact").kind == "email"  # content alone: the name does not say e-mail
    assert me.column("zip").spec["pattern"] == "^[0-9]{5}(-[0-9]{4})?$"
    assert me.column("ssn").spec["pattern"] == "^[0-9]{3}-[0-9]{2}-[0-9]{4}$"
    assert me.column("ip_address").kind == "ip" and me.column("newsletter").type == "bool"
    assert me.column("signup_ts").type == "timestamp" and me.column("visits").type == "int"
    assert me.column("club").class_ is ColumnClass.PUBLIC and "allowed" in me.column("club").spec


def test_the_draft_passes_the_policy_loader_unchanged(files, tmp_path: Path):
    for kind, (path, truth) in files.items():
        s = suggest_policy(path, today=TODAY)
        ps = load_policies(_policy_dir(tmp_path / kind, s.dataset, s.to_yaml()))
        ds = ps.dataset(s.dataset)
        assert ds.subject_key == s.subject_key.column
        assert {n: c.class_.value for n, c in ds.columns.items()} == {c.name: c.class_.value for c in s.columns}
        assert s.policy() == ds


def test_every_column_carries_its_evidence_as_a_comment(files):
    text = suggest_policy(files["parquet"][0], today=TODAY).to_yaml()
    lines = text.splitlines()
    start = lines.index("columns:")
    end = lines.index("purposes:")
    entries = [i for i in range(start + 1, end) if re.match(r"^  [a-z][a-z0-9_]*: \{", lines[i])]
    assert len(entries) == len(B.CLIENTS_TRUTH)
    for i in entries:
        name = lines[i].split(":")[0].strip()
        j = i - 1
        comment = []
        while lines[j].startswith("  #"):
            comment.insert(0, lines[j].strip("# ").strip())
            j -= 1
        said = " ".join(comment)
        assert said.startswith(f"{name}: "), (name, said)
        assert "—" in said and ("%" in said or "typed" in said or "distinct" in said), said
    flat = " ".join(ln.strip("# ").strip() for ln in lines if ln.lstrip().startswith("#"))
    flat = re.sub(r"\s+", " ", flat)
    assert "100 % of 400 sampled values match an e-mail pattern" in flat
    assert "name 'dob'; 100 % of 400 sampled values parse as dates (dd/mm/yyyy), all before today" in flat
    assert "subject key (high confidence): name 'client_ref' names a person and an id" in flat
    assert "match the UK National Insurance number format" in flat


def test_no_sampled_identifier_value_is_written(files, tmp_path: Path):
    for kind, (path, truth) in files.items():
        s = suggest_policy(path, today=TODAY)
        out = write_draft(s, tmp_path / f"{kind}.yaml")
        data = out.read_bytes()
        values = _values(path)
        scanned = 0
        for col, cls in truth.items():
            if cls not in B.IDENTIFIER_CLASSES:
                continue
            for v in values[col]:
                if v is None:
                    continue
                v = v.isoformat() if isinstance(v, date) else str(v)
                needles = {v}
                if col in ("name", "full_name", "given_name", "family_name"):
                    needles |= {t for t in v.split() if len(t) >= 5}
                for needle in needles:
                    if len(needle) < 4 or (needle.isdigit() and len(needle) < 6):
                        continue  # short numbers occur in any text ("1,000", "2y")
                    scanned += 1
                    assert needle.encode() not in data, f"{kind}: a value of {col} is in the draft"
        assert scanned > 1000
        # and the draft says nothing a PII detector recognises
        from governance.pii import find_pii

        assert [k for k, _ in find_pii(data.decode())] == []


def test_allowed_lists_only_for_non_identifier_columns(files):
    for path, _ in files.values():
        for c in suggest_policy(path, today=TODAY).columns:
            if c.identifier:  # only constants: never a bound or a list taken from the values
                assert "allowed" not in c.spec, c.name
                assert c.spec.get("min") in (None, "1900-01-01", 0), c.name
                assert c.spec.get("max") in (None, "today", 130), c.name


# ============================================================================ writing and errors


def test_refuses_to_overwrite_unless_forced(files, tmp_path: Path):
    s = suggest_policy(files["jsonl"][0], today=TODAY)
    target = tmp_path / "policies" / "members.yaml"
    write_draft(s, target)
    target.write_text("# edited by hand\n")
    with pytest.raises(SuggestError) as ei:
        write_draft(s, target)
    assert str(target) in str(ei.value) and "--force" in str(ei.value) and ei.value.exit_code == 2
    assert target.read_text() == "# edited by hand\n"
    write_draft(s, target, force=True)
    assert target.read_text() == s.to_yaml()
    assert [p.name for p in target.parent.iterdir()] == ["members.yaml"]  # no temporary file left behind


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.csv").write_bytes(b"")
    (tmp_path / "header.csv").write_text("customer_id,email\n")
    (tmp_path / "sheet.xlsx").write_bytes(b"PK\x03\x04 not a sheet we read")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    return {
        "missing": tmp_path / "nope.csv",
        "empty": tmp_path / "empty.csv",
        "header only": tmp_path / "header.csv",
        "unknown format": tmp_path / "sheet.xlsx",
        "not parquet": tmp_path / "broken.parquet",
        "no JSON objects": tmp_path / "blank.jsonl",
        "a folder": tmp_path,
    }


def test_bad_input_is_a_one_line_error_naming_the_file(tmp_path: Path):
    for why, path in _bad_inputs(tmp_path).items():
        with pytest.raises(SuggestError) as ei:
            suggest_policy(path, today=TODAY)
        msg = str(ei.value)
        assert isinstance(ei.value, LakewardenError) and ei.value.exit_code == 2, why
        assert str(path) in msg and "\n" not in msg, (why, msg)
    with pytest.raises(SuggestError, match="lower_snake_case"):
        suggest_policy(tmp_path / "header.csv", dataset="Bad Name")
    with pytest.raises(SuggestError, match="--sample"):
        suggest_policy(tmp_path / "header.csv", sample=0)


def test_names_the_file_would_need_renamed_and_protects_on_the_name_alone(tmp_path: Path):
    rows = 60
    t = pa.table({
        "Client ID": [f"K{i:06d}" for i in range(rows)],
        "E-Mail": [f"hashed{i:04d}x" for i in range(rows)],  # the name says e-mail, the content does not
        "score": [i / rows for i in range(rows)],
        "Temperature": [20 + (i % 7) for i in range(rows)],
    })
    path = tmp_path / "Odd File.parquet"
    pq.write_table(t, path)
    s = suggest_policy(path, today=TODAY)
    assert s.dataset == "odd_file"
    assert [c.name for c in s.columns] == ["client_id", "e_mail", "score", "temperature"]
    assert any("'Client ID'" in w and "client_id" in w for w in s.warnings)
    assert not any("Temperature" in w for w in s.warnings)  # case alone is fine: ingest ignores it
    mail = s.column("e_mail")
    assert mail.class_ is ColumnClass.DIRECT_IDENTIFIER and mail.confidence == "low"
    assert "protected on the name alone" in " ".join(mail.evidence)
    assert s.subject_key.column == "client_id"
    sc = s.column("score")
    assert (sc.type, sc.spec["min"], sc.spec["max"]) == ("double", 0, 1)
    s.policy()


def test_names_of_places_are_not_people(tmp_path: Path):
    towns = ["Jackson", "Madison", "Austin", "Charlotte", "Florence", "Chester", "Clifton", "Douglas", "Lincoln",
             "Marion", "Milton", "Troy", "Warren", "Clinton", "Franklin", "Hamilton", "Vernon", "Shelby", "Lafayette",
             "Eugene", "Orlando", "Tyler", "Beverly", "Adrian", "Aurora", "Homer", "Sidney", "Elgin", "Salem", "Irving"]
    rows = 90
    path = tmp_path / "stores.csv"
    path.write_text("store_id,city,opened\n" + "".join(
        f"S{i:04d},{towns[i % len(towns)]} {['Falls', 'Heights', 'Springs'][i % 3]},{2001 + i % 20}-0{1 + i % 9}-15\n"
        for i in range(rows)))
    s = suggest_policy(path, today=TODAY)
    assert s.column("city").class_ is ColumnClass.PUBLIC  # Title Case words from name lists, but named a city
    assert s.column("opened").type == "date" and s.column("opened").class_ is ColumnClass.PUBLIC
    assert s.subject_key.column == "store_id" and s.subject_key.confidence != "high"


def test_a_person_id_that_repeats_beats_a_unique_event_id(tmp_path: Path):
    from lakehouse.synth import generate

    res = generate(tmp_path, people=80, transactions_per_person=5, seed=3)
    s = suggest_policy(res.files["transactions"], today=TODAY)
    assert s.subject_key.column == "customer_id"
    assert "transaction_id" in s.subject_key.alternatives
    tx = s.column("transaction_id")
    assert tx.class_ is ColumnClass.PUBLIC and tx.spec.get("unique") is True
    assert s.column("customer_id").spec.get("unique") is None  # several rows per customer
    assert s.column("ts").type == "timestamp" and s.column("channel").spec["allowed"] == ["card", "online", "transfer"]


def test_ranges_are_rounded_outward():
    assert _range([18, 90, 45], True)[:2] == (0, 100)
    assert _range([19.0, 29.5, 49.99], False)[:2] == (10, 50)
    assert _range([0.02, 0.5, 0.98], False)[:2] == (0, 1)
    assert _range([1950, 1980, 2010], True)[:2] == (1940, 2020)
    lo, hi, notes = _range([-5.0] + [1000.0 + i for i in range(200)] + [25_000.0], False)  # one negative in 202
    assert lo == 0 and hi == 100_000 and any("negative" in n for n in notes) and any("heavy tail" in n for n in notes)
    lo, hi, _ = _range([-250.0, 10.0, 20.0, 30.0, 40.0], False)
    assert lo <= -250 and hi >= 40


# ============================================================================ through the CLI, once


def test_cli_suggest_writes_a_draft_that_policy_check_accepts(project: Path, files):
    src = files["jsonl"][0]
    p = lw_in(project, "policy", "suggest", str(src), "--sample", "200")
    assert p.returncode == 0, p.stderr
    assert "member_number" in p.stdout and "direct_identifier" in p.stdout and "high" in p.stdout
    assert "wrote policies/members.yaml" in " ".join(p.stdout.split())
    chk = lw_in(project, "policy", "check")
    assert chk.returncode == 0, chk.stderr
    assert "members" in chk.stdout and "member_number" in chk.stdout
    again = lw_in(project, "policy", "suggest", str(src))
    assert again.returncode == 2 and "policies/members.yaml: already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) <= 2  # the error and its hint
    bad = lw_in(project, "policy", "suggest", str(project / "nothing.parquet"))
    assert bad.returncode == 2 and f"{project / 'nothing.parquet'}: no such file" in " ".join(bad.stderr.split())


# ============================================================================ the JSON Schema


def _schema() -> dict:
    from governance.policy_schema import policy_json_schema

    return policy_json_schema()


def _model_props(schema: dict, name: str) -> dict:
    d = schema["$defs"][name]
    if "properties" not in d:  # a shorthand string or the object (Mask)
        d = next(x for x in d["anyOf"] if "properties" in x)
    return d["properties"]


def test_schema_covers_every_field_with_a_description():
    from governance.policy_schema import models

    s = _schema()
    assert s["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    names = [m.__name__ for m in models()]
    assert {"DatasetPolicy", "RoleCatalog", "ColumnPolicy", "RoleAccess", "Retention", "Mask"} <= set(names)
    for m in models():
        props = _model_props(s, m.__name__)
        for fname, f in m.model_fields.items():
            key = f.alias or fname
            assert key in props, f"{m.__name__}.{key} is missing from the schema"
            assert props[key].get("description"), (
                f"{m.__name__}.{key} has no description: add one with Field(description=...) in "
                "governance/policy.py or in governance/policy_schema.DESCRIPTIONS"
            )
    col = _model_props(s, "ColumnPolicy")
    assert "class" in col and "class_" not in col
    assert _model_props(s, "Retention")["history"]["default"] == "7d"


def test_published_schema_is_current():
    from governance.policy_schema import render

    published = (REPO / "docs" / "policy.schema.json").read_text(encoding="utf-8")
    assert published == render(), "docs/policy.schema.json is stale: run `lakewarden policy schema --out docs/policy.schema.json`"


# A small JSON Schema validator for the keywords the policy schema uses, for when the
# `jsonschema` package is not installed. The test below asserts the schema uses no other
# validation keyword, so this subset is faithful for it.
_SUPPORTED = {"$ref", "anyOf", "oneOf", "allOf", "type", "enum", "const", "properties", "required",
              "additionalProperties", "propertyNames", "items", "minItems", "maxItems", "minLength", "maxLength",
              "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minProperties"}
_ANNOTATIONS = {"$schema", "$defs", "title", "description", "default", "examples", "discriminator"}


def _keywords(node, out: set[str]) -> set[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            out.add(k)
            if k in ("properties", "$defs"):
                for sub in v.values():
                    _keywords(sub, out)
            elif k not in ("default", "examples", "enum", "const", "discriminator", "required"):
                _keywords(v, out)
    elif isinstance(node, list):
        for x in node:
            _keywords(x, out)
    return out


def _errors(schema: dict, value, root: dict, path: str = "") -> list[str]:  # noqa: C901 - a validator
    errs: list[str] = []
    if "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/$defs/")
        errs += _errors(root["$defs"][ref.split("/")[-1]], value, root, path)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            ok = [not _errors(s, value, root, path) for s in schema[key]]
            if (key == "anyOf" and not any(ok)) or (key == "oneOf" and sum(ok) != 1):
                errs.append(f"{path}: {key} failed")
    for s in schema.get("allOf", []):
        errs += _errors(s, value, root, path)
    t = schema.get("type")
    if t is not None:
        checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
                  "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
                  "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                  "null": lambda v: v is None, "object": lambda v: isinstance(v, dict),
                  "array": lambda v: isinstance(v, list)}
        types = t if isinstance(t, list) else [t]
        if not any(checks[x](value) for x in types):
            return errs + [f"{path}: not {t}"]
    if "enum" in schema and value not in schema["enum"]:
        errs.append(f"{path}: not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errs.append(f"{path}: not {schema['const']!r}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errs.append(f"{path}: does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 60):
            errs.append(f"{path}: length")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errs.append(f"{path}: below minimum")
        if "maximum" in schema and value > schema["maximum"]:
            errs.append(f"{path}: above maximum")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            errs.append(f"{path}: not above exclusiveMinimum")
        if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
            errs.append(f"{path}: not below exclusiveMaximum")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 60):
            errs.append(f"{path}: number of items")
        if "items" in schema:
            for i, x in enumerate(value):
                errs += _errors(schema["items"], x, root, f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for r in schema.get("required", []):
            if r not in value:
                errs.append(f"{path}.{r}: required")
        if len(value) < schema.get("minProperties", 0):
            errs.append(f"{path}: too few properties")
        for k, v in value.items():
            if "propertyNames" in schema:
                errs += _errors(schema["propertyNames"], k, root, f"{path}.<{k}>")
            if k in props:
                errs += _errors(props[k], v, root, f"{path}.{k}")
            elif schema.get("additionalProperties") is False:
                errs.append(f"{path}.{k}: unknown field")
            elif isinstance(schema.get("additionalProperties"), dict):
                errs += _errors(schema["additionalProperties"], v, root, f"{path}.{k}")
    return errs


def _validate(schema: dict, doc) -> list[str]:
    try:
        import jsonschema
    except ImportError:
        return _errors(schema, doc, schema)
    v = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def test_schema_is_a_valid_json_schema():
    s = _schema()
    try:
        import jsonschema
    except ImportError:
        unknown = _keywords(s, set()) - _SUPPORTED - _ANNOTATIONS
        assert not unknown, f"the schema uses keywords the fallback validator does not check: {unknown}"
        for name, d in s["$defs"].items():
            assert isinstance(d, dict) and (d.get("type") or d.get("anyOf") or d.get("enum")), name
        json.dumps(s)  # plain JSON
        return
    jsonschema.Draft202012Validator.check_schema(s)


def test_repository_policies_and_a_draft_validate_against_the_schema(files):
    s = _schema()
    docs = {p.name: yaml.safe_load(p.read_text(encoding="utf-8")) for p in sorted((REPO / "policies").glob("*.yaml"))}
    assert {"roles.yaml", "customers.yaml", "transactions.yaml"} <= set(docs)
    docs["draft"] = yaml.safe_load(suggest_policy(files["parquet"][0], today=TODAY).to_yaml())
    for name, doc in docs.items():
        assert _validate(s, doc) == [], name


def test_schema_rejects_what_the_loader_rejects_field_by_field():
    s = _schema()
    good = yaml.safe_load((REPO / "policies" / "customers.yaml").read_text(encoding="utf-8"))

    def broken(edit) -> dict:
        doc = json.loads(json.dumps(good))
        edit(doc)
        return doc

    cases = {
        "misspelled field": lambda d: d.update(subjectkey="x"),
        "unknown class": lambda d: d["columns"]["email"].update({"class": "secret"}),
        "bad duration": lambda d: d["retention"].update(bronze="2 years"),
        "bad mask": lambda d: d["access"]["analyst"]["masks"].update(income="bucket"),
        "bad column name": lambda d: d["columns"].update({"Full Name": {"class": "public"}}),
        "bad layer": lambda d: d["access"]["analyst"].update(layers=["gold", "attic"]),
        "bad generalize": lambda d: d["columns"]["zip_code"].update(generalize="prefix:x"),
        "unknown kind": lambda d: d.update(kind="datasets"),
    }
    for why, edit in cases.items():
        assert _validate(s, broken(edit)), f"the schema accepted a {why}"
