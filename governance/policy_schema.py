"""The JSON Schema of policy files, for editors: ``lakewarden policy schema``.

One schema covers both kinds of file (``kind: roles`` and ``kind: dataset``), generated
from the pydantic models of :mod:`governance.policy`, so it cannot drift from what
:func:`~governance.policy.load_policies` accepts. Every field carries a description (the
model's own, else one from :data:`DESCRIPTIONS`), so an editor can complete and explain
keys; the shorthand forms the models accept are described as such (durations like
``7d``, masks like ``bucket:10000``, generalizations like ``prefix:3``).

The schema checks shape (names, types, enums, patterns, ranges). What needs the whole
file or the whole set — the subject key is a column, a mask names a real column, a role
exists in the catalog — only ``lakewarden policy check`` checks.

A YAML file opts in with a modeline the yaml-language-server (VS Code's YAML extension,
and editors using it) reads::

    # yaml-language-server: $schema=../docs/policy.schema.json
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter
from pydantic.json_schema import GenerateJsonSchema

from governance import policy as P

__all__ = ["DESCRIPTIONS", "DURATION_PATTERN", "models", "policy_json_schema", "render"]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
DURATION_PATTERN = r"^\s*[0-9]+\s*[hdwy]\s*$"
MASK_PATTERN = r"^\s*(null|redact|hash|year|(partial|prefix|bucket)\s*:\s*[0-9]+(\.[0-9]+)?)\s*$"

#: Descriptions of fields whose model declares none: model name -> field (YAML key) -> text.
DESCRIPTIONS: dict[str, dict[str, str]] = {
    "RoleCatalog": {
        "kind": "'roles': this file is the role catalog (one per project)",
        "roles": "role name -> what it is for and which pipeline stages it may run",
        "principals": "user name -> the roles the user holds",
    },
    "RoleSpec": {
        "description": "what the role is for",
        "stages": "pipeline stages and actions the role may run (the gate denies the rest)",
    },
    "DatasetPolicy": {
        "kind": "'dataset': this file governs one dataset",
        "dataset": "the dataset's name (lower_snake_case): its tables are bronze.<dataset>, silver.<dataset>, ...",
        "description": "what one row of the dataset is",
        "owner": "the role that owns the dataset",
        "subject_key": "the column identifying the person a row is about: tokenized at ingest, what erasure finds",
        "columns": "column name (lower_snake_case) -> class, protection and data contract; "
                   "a file column no policy names is refused (contract.unknown_columns)",
        "purposes": "purpose name -> why the data may be used; roles and feature uses name purposes",
        "access": "role -> the layers, columns, masks, row filter and purposes the role gets on this dataset",
        "retention": "how long each layer keeps rows (durations like 12h, 30d, 6w, 7y)",
        "erasure": "what an erasure does beyond deleting the subject's rows",
        "privacy": "the differential-privacy budget of models trained on this dataset",
        "fairness": "fairness thresholds a model must meet before it may be deployed",
        "deployment": "who must approve a model trained on this dataset before it is deployed",
        "landing": "after ingest, remove the landing file or keep it (kept files are reached by erasure)",
        "contract": "what to do when a file's columns differ from the policy's",
        "layout": "physical layout of the tables: partition columns, subject buckets, file size",
        "preprocess": "silver-stage preprocessing: imputation, standardization, derived columns",
        "features": "feature view name -> a Feast feature view over the silver table",
        "labels": "column -> its favourable value: the labels a model may be trained on",
        "anonymity": "k-anonymity (k_min) and l-diversity (l_min) of silver over the quasi-identifiers, and what "
                     "a build does when they do not hold (stop, or generalize by each column's hierarchy)",
        "query": "how the roles' SQL is answered: exact (default) or private (differentially private aggregates "
                 "only); a role's access.<role>.query overrides it",
        "private_queries": "differentially private SQL: the ε a query spends, the ε one analyst may spend, "
                           "the rows one subject may contribute",
        "stream": "streaming ingest (lakewarden stream): whether records must be sealed per subject, "
                  "the largest message, and the longest retention a topic may have",
    },
    "ColumnPolicy": {
        "class": "subject_key | direct_identifier | quasi_identifier | sensitive | public; it decides the "
                 "protections allowed",
        "type": "the type cells are read as: string, int, double, bool, date (ISO), timestamp (ISO); "
                "a cell that does not parse sends its row to quarantine",
        "protection": "how the value is protected: subject_key -> tokenize; direct_identifier -> vault | encrypt; "
                      "quasi_identifier -> generalize | encrypt | vault; sensitive -> encrypt | restricted; "
                      "public -> none (default: the first of each)",
        "description": "what the column holds",
        "allowed": "the only values a cell may take (text columns); other rows go to quarantine",
        "max_length": "longest text accepted, in characters (default 1000)",
        "unique": "no two rows may share a value (checked across the file and the table)",
    },
    "Purpose": {"description": "what the purpose is"},
    "RoleAccess": {
        "layers": "the table layers the role may read (default: silver)",
        "columns": "the columns the role may read: a list, or '*' for all",
        "masks": "column -> mask applied for this role: null, redact, hash, partial:N, year, prefix:N, bucket:W",
        "row_filter": "an SQL boolean expression: the role sees only rows where it holds",
        "purposes": "the dataset's purposes the role may use it for",
    },
    "Mask": {
        "kind": "null | redact | hash | partial | year | prefix | bucket",
        "n": "the size: characters kept (partial, prefix) or bucket width (bucket)",
    },
    "Retention": {
        "landing": "how long landing files are kept (with landing: keep)",
        "bronze": "how long bronze rows are kept",
        "silver": "how long silver rows are kept",
        "quarantine": "how long quarantined rows are kept",
        "history": "Delta time travel kept before VACUUM (default 7d)",
    },
    "ErasurePolicy": {
        "models": "flag: models trained on an erased subject are flagged for review; retrain: also queued "
                  "for retraining without them",
    },
    "PrivacyBudget": {
        "epsilon_per_run": "the most ε one training run may spend",
        "epsilon_total": "the most ε all runs on this dataset may spend together",
        "delta": "δ of every run (below 1e-2; typically below 1 / rows)",
    },
    "Fairness": {
        "sensitive_attributes": "sensitive columns fairness is measured across",
        "disparate_impact_min": "lowest ratio of favourable-outcome rates between groups (0-1)",
        "equal_opportunity_max_diff": "largest gap in true-positive rates between groups",
        "predictive_parity_max_diff": "largest gap in precision between groups",
        "min_group_size": "fewest holdout rows a group needs to count in a metric (for equal opportunity: actual "
                          "positives; for predictive parity: predicted positives); smaller groups are listed as "
                          "not measured. 1 (default): every group counts",
    },
    "Label": {
        "favourable": "the label value that is good for the person (e.g. false for 'defaulted')",
        "unfavourable": "the other value; implied for a bool label",
        "description": "what the label means",
    },
    "Deployment": {
        "approvers": "roles whose approval a model needs before deployment",
        "min_approvals": "how many approvals are needed",
        "max_epsilon": "refuse to deploy a model whose ε exceeds this",
    },
    "Layout": {
        "partition_by": "public columns to partition tables by (their values appear in file paths)",
        "subject_buckets": "hash buckets of the subject key: erasure rewrites one bucket's files",
        "target_file_rows": "rows per data file, about",
    },
    "FeatureViewSpec": {
        "columns": "silver columns served as features (not the subject key, not vaulted columns)",
        "ttl": "how far back a feature value is valid (a duration like 10y)",
        "timestamp": "the event-time column of the view",
        "description": "what the view is for",
    },
}


def models() -> list[type[BaseModel]]:
    """Every model a policy file is made of, found from the two roots."""
    seen: list[type[BaseModel]] = []

    def visit(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.append(tp)
            for f in tp.model_fields.values():
                visit(f.annotation)
            return
        for arg in getattr(tp, "__args__", ()) or ():
            visit(arg)
        origin = getattr(tp, "__origin__", None)
        if origin is not None and origin is not tp:
            visit(origin)

    visit(P.RoleCatalog)
    visit(P.DatasetPolicy)
    return seen


def _duration(td: timedelta) -> str:
    secs = int(td.total_seconds())
    if secs % 86400:
        return f"{secs // 3600}h"
    days = secs // 86400
    return f"{days // 365}y" if days % 365 == 0 else f"{days}d"


def _plain(v: Any) -> Any:
    """A default as it would be written in YAML (durations as 7d, models as mappings)."""
    if isinstance(v, timedelta):
        return _duration(v)
    if isinstance(v, BaseModel):
        return _plain(v.model_dump(by_alias=True, mode="python"))
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if hasattr(v, "value") and not isinstance(v, (str, int, float, bool)):
        return v.value
    return v


class _Generator(GenerateJsonSchema):
    def timedelta_schema(self, schema: Any) -> dict[str, Any]:
        return {"type": "string", "pattern": DURATION_PATTERN, "examples": ["12h", "30d", "6w", "7y"]}

    def encode_default(self, dft: Any) -> Any:
        return super().encode_default(_plain(dft))


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema (2020-12) of one policy file: a role catalog or a dataset policy."""
    file = Annotated[Union[P.RoleCatalog, P.DatasetPolicy], Field(discriminator="kind")]  # noqa: UP007
    schema = TypeAdapter(file).json_schema(schema_generator=_Generator, mode="validation")
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    for model in models():
        d = defs.get(model.__name__)
        if d is None:
            continue
        extra = DESCRIPTIONS.get(model.__name__, {})
        for name, f in model.model_fields.items():
            key = f.alias or name
            prop = d.get("properties", {}).get(key)
            if prop is not None and not prop.get("description") and extra.get(key):
                prop["description"] = extra[key]
    _refine(defs)
    return {
        "$schema": JSON_SCHEMA_DIALECT,
        "title": "Lakewarden policy file",
        "description": "A role catalog (kind: roles) or one dataset's policy (kind: dataset). "
                       "Checked in full by `lakewarden policy check`; see docs/configuration.md.",
        **schema,
    }


def _refine(defs: dict[str, Any]) -> None:
    """The shorthands the models accept, and the names they require, in schema terms."""
    ident = {"type": "string", "pattern": P.IDENT}
    if "Mask" in defs:
        obj = defs["Mask"]
        desc = obj.pop("description", "") or "a mask"
        defs["Mask"] = {
            "description": desc,
            "anyOf": [
                {"type": "string", "pattern": MASK_PATTERN,
                 "description": "null, redact, hash, year, partial:N, prefix:N or bucket:W",
                 "examples": ["redact", "hash", "partial:4", "year", "prefix:3", "bucket:10000"]},
                obj,
            ],
        }
    ds = defs.get("DatasetPolicy", {}).get("properties", {})
    for key in ("columns", "features", "labels"):
        if key in ds:
            ds[key]["propertyNames"] = ident
    col = defs.get("ColumnPolicy", {}).get("properties", {})
    if "generalize" in col:
        col["generalize"]["anyOf"] = [{"type": "string", "pattern": P._GENERALIZE.pattern}, {"type": "null"}]
        col["generalize"]["examples"] = ["year", "month", "prefix:3", "bucket:10"]
    if "pattern" in col:
        col["pattern"]["examples"] = ["email", "phone", "zip5", "^T-[0-9]{12}$"]
    for bound in ("min", "max"):
        if bound in col:
            col[bound]["examples"] = [0, "1900-01-01", "today"]
    roles = defs.get("RoleCatalog", {}).get("properties", {})
    if "roles" in roles:
        roles["roles"]["propertyNames"] = ident


def render(schema: dict[str, Any] | None = None) -> str:
    """The schema as published: stable key order, two-space indent, a final newline."""
    return json.dumps(schema if schema is not None else policy_json_schema(), indent=2, ensure_ascii=False) + "\n"
