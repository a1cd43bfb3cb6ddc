"""The policy model: ``policies/*.yaml``, one source for every enforcer.

Two kinds of file:

``kind: roles`` — the role catalog: which roles exist, which pipeline stages
each may run, and which users hold which roles (``principals``).

``kind: dataset`` — one per dataset: the subject key column, each column's
class (subject_key, direct_identifier, quasi_identifier, sensitive, public) and
protection, allowed purposes, per-role access (layers, columns, masks, row
filter, purposes), retention, privacy budget, fairness thresholds and who must
approve a deployment, and the labels a model may be trained to predict (with
the favourable value of each).

:func:`load_policies` validates every file and then the set as a whole (roles
named by datasets must exist, masks must name real columns, ...). Errors name
file, field and line. The result, :class:`PolicySet`, is immutable and is what
the gate, the SQL engines and Trino's rules are compiled from.
"""

from __future__ import annotations

import hashlib
import re
from datetime import timedelta
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator, model_validator,
)

from governance._files import FieldError, locate, read_yaml, validate_file
from governance.errors import PolicyError

IDENT = r"^[a-z][a-z0-9_]{0,62}$"
REQUIRED_ROLES = ("data_engineer", "analyst", "data_scientist", "ml_engineer", "compliance_officer")
LAYERS = ("landing", "bronze", "silver", "gold", "quarantine", "vault")


from governance.stages import Stage  # noqa: E402 - the enum lives apart so the CLI can name stages cheaply


class ColumnClass(str, Enum):
    SUBJECT_KEY = "subject_key"
    DIRECT_IDENTIFIER = "direct_identifier"
    QUASI_IDENTIFIER = "quasi_identifier"
    SENSITIVE = "sensitive"
    PUBLIC = "public"


class Protection(str, Enum):
    TOKENIZE = "tokenize"  # replaced by a pseudonymous token
    VAULT = "vault"  # kept only in the subject vault, encrypted with the subject's DEK
    ENCRYPT = "encrypt"  # kept in the table, encrypted with the subject's DEK
    GENERALIZE = "generalize"  # coarsened (year, prefix, bucket)
    RESTRICTED = "restricted"  # moved to a restricted table (fairness evaluation only)
    NONE = "none"


_ALLOWED_PROTECTION = {
    ColumnClass.SUBJECT_KEY: {Protection.TOKENIZE},
    ColumnClass.DIRECT_IDENTIFIER: {Protection.VAULT, Protection.ENCRYPT},
    ColumnClass.QUASI_IDENTIFIER: {Protection.GENERALIZE, Protection.ENCRYPT, Protection.VAULT},
    ColumnClass.SENSITIVE: {Protection.ENCRYPT, Protection.RESTRICTED},
    ColumnClass.PUBLIC: {Protection.NONE},
}
_DEFAULT_PROTECTION = {
    ColumnClass.SUBJECT_KEY: Protection.TOKENIZE,
    ColumnClass.DIRECT_IDENTIFIER: Protection.VAULT,
    ColumnClass.QUASI_IDENTIFIER: Protection.GENERALIZE,
    ColumnClass.SENSITIVE: Protection.ENCRYPT,
    ColumnClass.PUBLIC: Protection.NONE,
}
_GENERALIZE = re.compile(r"^(year|month|prefix:[1-9]\d?|bucket:[1-9]\d{0,6}(\.\d+)?)$")


def _parse_duration(v: Any) -> Any:
    if isinstance(v, timedelta) or v is None:
        return v
    if isinstance(v, str):
        m = re.fullmatch(r"\s*(\d+)\s*([hdwy])\s*", v)
        if m:
            n, unit = int(m.group(1)), m.group(2)
            return timedelta(hours=n) if unit == "h" else timedelta(days=n * {"d": 1, "w": 7, "y": 365}[unit])
    raise ValueError(f"durations look like '12h', '30d', '6w' or '7y' (got {v!r})")


Duration = Annotated[timedelta, BeforeValidator(_parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, use_enum_values=False)


ColumnType = Literal["string", "int", "double", "bool", "date", "timestamp"]
NAMED_PATTERNS = {
    "email": r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$",
    "phone": r"^\+?[0-9][0-9 ().-]{6,24}[0-9]$",
    "zip5": r"^[0-9]{5}$",
}


class ColumnPolicy(_Strict):
    """One column: its class and protection, and its data contract (type, nulls, ranges, patterns)."""

    class_: ColumnClass = Field(alias="class")
    type: ColumnType = "string"
    protection: Protection | None = None
    generalize: str | None = Field(default=None, description="year | month | prefix:N | bucket:W")
    hierarchy: list[str] | None = Field(
        default=None, min_length=2,
        description="generalization levels for anonymity.on_violation: generalize, finest first; the first is "
                    "generalize, each next one coarser: year -> decade | bucket:W; month -> year -> decade; "
                    "prefix:N -> prefix:M (M < N); bucket:W -> bucket:V (V a multiple of W)",
    )
    description: str = ""
    # -- data contract ----------------------------------------------------------------
    required: bool = Field(default=False, description="the column must be in every file and never empty")
    min: float | str | None = Field(default=None, description="lower bound: a number, or a date, or 'today'")
    max: float | str | None = Field(default=None, description="upper bound: a number, or a date, or 'today'")
    pattern: str | None = Field(default=None, description="a regular expression, or email | phone | zip5")
    allowed: list[str] | None = Field(default=None, min_length=1)
    max_length: int = Field(default=1000, ge=1, le=1_000_000)
    unique: bool = False

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str | None) -> str | None:
        if v is None or v in NAMED_PATTERNS:
            return v
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"pattern is not a valid regular expression: {exc}") from None
        return v

    @property
    def regex(self) -> str | None:
        return NAMED_PATTERNS.get(self.pattern, self.pattern) if self.pattern else None

    @model_validator(mode="after")
    def _protection_fits_class(self) -> "ColumnPolicy":
        prot = self.protection or _DEFAULT_PROTECTION[self.class_]
        if prot not in _ALLOWED_PROTECTION[self.class_]:
            allowed = ", ".join(sorted(p.value for p in _ALLOWED_PROTECTION[self.class_]))
            raise ValueError(
                f"protection '{prot.value}' is not allowed for class '{self.class_.value}' (allowed: {allowed})"
            )
        if prot is Protection.GENERALIZE:
            if not self.generalize:
                raise ValueError("protection 'generalize' needs 'generalize: year | month | prefix:N | bucket:W'")
            if not _GENERALIZE.match(self.generalize):
                raise ValueError(f"generalize must be year, month, prefix:N or bucket:W (got {self.generalize!r})")
        if self.hierarchy is not None:
            if prot is not Protection.GENERALIZE:
                raise FieldError(("hierarchy",), f"hierarchy needs protection 'generalize' (this column's is '{prot.value}')")
            problem = hierarchy_problem(self.generalize or "", self.hierarchy)
            if problem:
                raise FieldError(("hierarchy",), problem)
        object.__setattr__(self, "protection", prot)
        for bound in ("min", "max"):
            b = getattr(self, bound)
            if b is None:
                continue
            if self.type in ("int", "double") and not isinstance(b, (int, float)):
                raise ValueError(f"{bound} of a {self.type} column must be a number (got {b!r})")
            if self.type in ("date", "timestamp") and not (b == "today" or _is_iso_date(b)):
                raise ValueError(f"{bound} of a {self.type} column must be an ISO date or 'today' (got {b!r})")
            if self.type in ("string", "bool"):
                raise ValueError(f"{bound} does not apply to a {self.type} column")
        if self.pattern and self.type != "string":
            raise ValueError(f"pattern applies to string columns, not {self.type}")
        return self


def level_width(base: str, level: str) -> float | None:
    """How coarse a generalization level is, in the base's unit (None: not a level of that base).

    The bases are the ingest's ``generalize`` forms: ``year`` (an integer year; levels ``decade`` and
    ``bucket:W`` of W years), ``month`` (``YYYY-MM``; levels ``year`` and ``decade``), ``prefix:N``
    (levels ``prefix:M``; the width is the characters dropped) and ``bucket:W`` (levels ``bucket:V``)."""
    kind, _, arg = base.partition(":")
    lk, _, la = level.partition(":")
    if kind == "year":
        if level == "year":
            return 1.0
        if level == "decade":
            return 10.0
        if lk == "bucket" and la.isdigit() and int(la) >= 1:
            return float(int(la))
        return None
    if kind == "month":
        return {"month": 1.0, "year": 12.0, "decade": 120.0}.get(level)
    if kind == "prefix":
        if lk == "prefix" and la.isdigit() and 1 <= int(la) <= int(arg):
            return float(int(arg) - int(la) + 1)
        return None
    if kind == "bucket":
        if lk == "bucket":
            try:
                v = float(la)
            except ValueError:
                return None
            return v if v > 0 else None
    return None


def hierarchy_problem(base: str, levels: list[str]) -> str | None:
    """Why ``levels`` is not a generalization hierarchy above ``base`` (None if it is): the first level
    is ``base`` itself, and each next level is coarser and nests (its classes are unions of the previous
    level's), so climbing a level only ever merges equivalence classes."""
    if levels[0] != base:
        return f"hierarchy must start with the column's generalize ({base!r}), not {levels[0]!r}"
    prev = 1.0 if base.partition(":")[0] != "bucket" else float(base.partition(":")[2])
    if base.startswith("prefix:"):
        prev = 1.0
    for lv in levels[1:]:
        w = level_width(base, lv)
        if w is None:
            kind = base.partition(":")[0]
            shapes = {"year": "decade or bucket:W (whole years)", "month": "year or decade",
                      "prefix": "prefix:M", "bucket": "bucket:V"}[kind]
            return f"hierarchy level {lv!r} does not apply to generalize {base!r} (levels of it: {shapes})"
        ratio = w / prev
        if w <= prev or abs(ratio - round(ratio)) > 1e-9 and not base.startswith("prefix:"):
            return (f"hierarchy level {lv!r} is not coarser than the level before it and nested in it "
                    "(each level must merge whole classes of the previous one)")
        prev = w
    return None


class Anonymity(_Strict):
    """k-anonymity and l-diversity of the silver table over the quasi-identifiers (and of query exports)."""

    k_min: int = Field(ge=2, le=1_000_000, description="every equivalence class over the quasi-identifiers holds "
                                                       "at least this many rows")
    l_min: int | None = Field(default=None, ge=2, le=1000,
                              description="every class holds at least this many distinct values of each "
                                          "encrypted sensitive column (distinct l-diversity)")
    on_violation: Literal["stop", "generalize"] = Field(
        default="stop",
        description="stop: the silver build fails naming the small classes' sizes (never values); generalize: "
                    "climb the quasi-identifiers' hierarchy levels until k_min (and l_min) hold, else stop",
    )


def _is_iso_date(v: Any) -> bool:
    from datetime import date

    try:
        date.fromisoformat(str(v))
        return True
    except ValueError:
        return False


class Contract(_Strict):
    """What to do when a file's shape differs from the policy."""

    unknown_columns: Literal["reject", "drop"] = Field(
        default="reject", description="a column the policy does not classify: reject the file, or drop the column"
    )
    missing_columns: Literal["reject", "null"] = Field(
        default="null", description="an optional column absent from a file: reject the file, or fill NULL"
    )
    schema_evolution: Literal["reject", "merge"] = Field(
        default="merge", description="the policy added columns since the table was created: reject, or add them"
    )


class StreamPolicy(_Strict):
    """Streaming ingest (``lakewarden stream``): what a topic's records must be, and how long the
    broker may keep raw ones. The broker's log is a copy of personal data that no Delta erasure
    rewrites: records sealed per subject (the producer helper) become unreadable when the subject
    is erased; raw records stay readable until the topic's retention removes them."""

    sealed: Literal["required", "optional"] = Field(
        default="required",
        description="required: a record not sealed for its subject goes to quarantine; optional: raw JSON "
                    "records are accepted too, and max_topic_retention must bound how long the broker keeps them",
    )
    max_message_bytes: int = Field(
        default=1_048_576, ge=1024, le=64 << 20, description="a larger message goes to quarantine (sealed), unparsed"
    )
    max_topic_retention: Duration | None = Field(
        default=None,
        description="the longest retention.ms a topic may have: a stream refuses a topic that keeps records longer "
                    "(with sealed: optional, erasure of raw records completes only when the broker drops them)",
    )

    @model_validator(mode="after")
    def _bounded(self) -> "StreamPolicy":
        if self.sealed == "optional" and self.max_topic_retention is None:
            raise FieldError(
                ("max_topic_retention",),
                "sealed: optional needs max_topic_retention (raw records stay in the broker's log until it drops "
                "them; erasure waits that long)",
            )
        return self


class Layout(_Strict):
    """Physical layout: partition columns plus a subject hash bucket so erasure rewrites few files."""

    partition_by: list[str] = Field(default_factory=list)
    subject_buckets: int = Field(default=16, ge=1, le=4096)
    target_file_rows: int = Field(default=1_000_000, ge=1000)


class Preprocess(_Strict):
    """Silver-stage preprocessing; statistics are fitted on bronze and stored with each silver version."""

    impute: dict[str, str | float] = Field(
        default_factory=dict, description="column -> mean | median | mode | a constant"
    )
    standardize: list[str] = Field(default_factory=list, description="adds <column>_z = (x - mean) / std")
    normalize: list[str] = Field(default_factory=list, description="adds <column>_01 = (x - min) / (max - min)")
    derive: dict[str, str] = Field(default_factory=dict, description="new column -> SQL expression over silver columns")

    @field_validator("derive")
    @classmethod
    def _derive(cls, v: dict[str, str]) -> dict[str, str]:
        for name, expr in v.items():
            if not re.match(IDENT, name):
                raise ValueError(f"derived column name {name!r} must be lower_snake_case")
            if ";" in expr or "--" in expr or "/*" in expr:
                raise ValueError(f"derive.{name} must be one SQL expression (no ';' or comments)")
        return v


class FeatureViewSpec(_Strict):
    """A Feast feature view over this dataset's silver table."""

    columns: list[str] = Field(min_length=1)
    ttl: Duration = timedelta(days=3650)
    timestamp: str = "_ingested_at"
    description: str = ""


class MaskKind(str, Enum):
    NULL = "null"  # NULL
    REDACT = "redact"  # a constant '****'
    HASH = "hash"  # keyed hash (stable, not reversible)
    PARTIAL = "partial"  # keep the last N characters
    YEAR = "year"  # date -> year
    PREFIX = "prefix"  # keep the first N characters
    BUCKET = "bucket"  # number -> lower bound of a bucket of width N


class Mask(_Strict):
    kind: MaskKind
    n: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            kind, _, arg = v.partition(":")
            return {"kind": kind.strip(), "n": arg.strip() or None}
        return v

    @model_validator(mode="after")
    def _arg(self) -> "Mask":
        needs = {MaskKind.PARTIAL, MaskKind.PREFIX, MaskKind.BUCKET}
        if self.kind in needs and (self.n is None or self.n <= 0):
            raise ValueError(f"mask '{self.kind.value}' needs a positive size, e.g. '{self.kind.value}:4'")
        if self.kind not in needs and self.n is not None:
            raise ValueError(f"mask '{self.kind.value}' takes no size")
        return self

    def __str__(self) -> str:
        return self.kind.value if self.n is None else f"{self.kind.value}:{self.n:.15g}"


class Purpose(_Strict):
    description: str = ""
    sensitive: bool = Field(default=False, description="may features derived from sensitive attributes be used?")


class RoleAccess(_Strict):
    layers: list[Literal["landing", "bronze", "silver", "gold", "quarantine", "vault"]] = Field(
        default_factory=lambda: ["silver"]
    )
    columns: list[str] | Literal["*"] = "*"
    masks: dict[str, Mask] = Field(default_factory=dict)
    row_filter: str | None = None
    purposes: list[str] = Field(default_factory=list)
    query: Literal["exact", "private"] | None = Field(
        default=None,
        description="exact: the role's SQL answers are exact; private: only aggregates (count, sum, mean, by "
                    "public group keys), answered with differential privacy and charged to the privacy budget; "
                    "default: the dataset's query",
    )

    @field_validator("row_filter")
    @classmethod
    def _filter(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError("row_filter must not be empty")
        if ";" in v or "--" in v or "/*" in v:
            raise ValueError("row_filter must be a single SQL boolean expression (no ';' or comments)")
        return v.strip()


class Retention(_Strict):
    landing: Duration | None = None
    bronze: Duration | None = None
    silver: Duration | None = None
    quarantine: Duration | None = None
    history: Duration = timedelta(days=7)  # Delta time travel kept before VACUUM


class ErasurePolicy(_Strict):
    """What an erasure does beyond deleting: models trained on the subject's data are flagged
    for review (``flag``) or, in addition, queued for retraining without them (``retrain``)."""

    models: Literal["flag", "retrain"] = "flag"


class PrivacyBudget(_Strict):
    epsilon_per_run: float = Field(gt=0, le=100)
    epsilon_total: float = Field(gt=0, le=1000)
    delta: float = Field(gt=0, lt=1e-2)

    @model_validator(mode="after")
    def _order(self) -> "PrivacyBudget":
        if self.epsilon_per_run > self.epsilon_total:
            raise ValueError(
                f"epsilon_per_run ({self.epsilon_per_run:g}) exceeds epsilon_total ({self.epsilon_total:g})"
            )
        return self


class PrivateQueries(_Strict):
    """Differentially private SQL (``lakehouse.private_sql``) for roles whose queries are ``private``.

    Each query spends ``epsilon`` (at most ``epsilon_per_query``) of the dataset's ``privacy.epsilon_total``,
    which training spends too (basic composition in the privacy ledger), and of the analyst's own
    ``epsilon_per_analyst``. Grouping by public keys (``allowed`` values, bools) is pure ε-DP (δ = 0).
    With ``delta_per_query`` set, a query may also group by keys found in the data: OpenDP releases a
    key only when its noisy count clears a threshold calibrated to δ, and the analyst's δ adds up
    (basic composition) under ``delta_per_analyst``.
    """

    epsilon_per_query: float = Field(default=1.0, gt=0, le=100,
                                      description="the ε a query spends unless it asks for less; the most it may ask")
    epsilon_per_analyst: float | None = Field(
        default=None, gt=0, le=1000,
        description="the most ε one analyst's queries on this dataset may spend together (default: epsilon_total)",
    )
    contributions: int = Field(
        default=1, ge=1, le=10_000,
        description="rows one subject may add to a query; a subject's rows beyond this are dropped before aggregating",
    )
    delta_per_query: float | None = Field(
        default=None, gt=0, lt=1e-3,
        description="the δ of a query grouped by a column without public keys: the keys found in the data are "
                    "released only where their noisy count clears OpenDP's threshold (unset: such queries are refused)",
    )
    delta_per_analyst: float | None = Field(
        default=None, gt=0, lt=1e-2,
        description="the most δ one analyst's thresholded queries on this dataset may spend together "
                    "(default: privacy.delta)",
    )


class Fairness(_Strict):
    sensitive_attributes: list[str] = Field(min_length=1)
    disparate_impact_min: float = Field(default=0.8, gt=0, le=1)
    equal_opportunity_max_diff: float = Field(default=0.1, ge=0, le=1)
    predictive_parity_max_diff: float = Field(default=0.1, ge=0, le=1)
    # Groups with fewer holdout rows than this (for equal opportunity: actual positives; for predictive
    # parity: predicted positives) are left out of that metric and listed as not measured. 1: every group counts.
    min_group_size: int = Field(default=1, ge=1)


def _label_value(v: Any) -> Any:
    if isinstance(v, (bool, int, str)):
        return v
    raise ValueError(f"a label value is true/false, a whole number or text (got {v!r})")


LabelValue = Annotated[StrictBool | StrictInt | StrictStr, BeforeValidator(_label_value)]
_YAML_BOOLS = "YAML reads unquoted yes/no/true/false/on/off as booleans: quote the value (e.g. 'no')"


class Label(_Strict):
    """A column a model may be trained to predict, and which of its two values is favourable.

    The model predicts the *unfavourable* value as 1 (its score is the probability of it);
    fairness measures the favourable one. A bool label names its favourable value only
    (``defaulted: {favourable: false}``); a text or int label names both
    (``risk: {favourable: good, unfavourable: bad}``). A value outside the pair is refused
    at training, never guessed.
    """

    favourable: LabelValue
    unfavourable: LabelValue | None = Field(default=None, description="the other value; implied for a bool label")
    description: str = ""

    @model_validator(mode="after")
    def _pair(self) -> "Label":
        fav, unf = self.favourable, self.unfavourable
        if isinstance(fav, bool) and unf is None:
            object.__setattr__(self, "unfavourable", not fav)
            return self
        if unf is None:
            raise ValueError(f"favourable {fav!r} needs its counterpart: add 'unfavourable: <the other value>'")
        if type(fav) is not type(unf):
            why = _YAML_BOOLS if isinstance(fav, bool) or isinstance(unf, bool) else "quote both values or neither"
            raise ValueError(f"favourable {fav!r} and unfavourable {unf!r} must be of one type ({why})")
        if fav == unf:
            raise ValueError(f"favourable and unfavourable are both {fav!r}: a label has two distinct values")
        return self


class Deployment(_Strict):
    approvers: list[str] = Field(default_factory=lambda: ["compliance_officer"], min_length=1)
    min_approvals: int = Field(default=1, ge=1, le=10)
    max_epsilon: float | None = Field(default=None, gt=0)


class DatasetPolicy(_Strict):
    kind: Literal["dataset"]
    dataset: str = Field(pattern=IDENT)
    description: str = ""
    owner: str = ""
    subject_key: str
    columns: dict[str, ColumnPolicy] = Field(min_length=1)
    purposes: dict[str, Purpose] = Field(default_factory=dict)
    access: dict[str, RoleAccess] = Field(default_factory=dict)
    retention: Retention = Retention()
    erasure: ErasurePolicy = ErasurePolicy()
    privacy: PrivacyBudget | None = None
    fairness: Fairness | None = None
    labels: dict[str, Label] = Field(
        default_factory=dict, description="column -> its favourable value: the labels a model may be trained on"
    )
    deployment: Deployment = Deployment()
    landing: Literal["remove", "keep"] = "remove"
    contract: Contract = Contract()
    stream: StreamPolicy = StreamPolicy()
    layout: Layout = Layout()
    preprocess: Preprocess = Preprocess()
    features: dict[str, FeatureViewSpec] = Field(default_factory=dict)
    anonymity: Anonymity | None = None
    query: Literal["exact", "private"] = Field(
        default="exact", description="how every role's SQL is answered unless its access says otherwise (query:)"
    )
    private_queries: PrivateQueries = PrivateQueries()

    @field_validator("columns")
    @classmethod
    def _column_names(cls, v: dict[str, ColumnPolicy]) -> dict[str, ColumnPolicy]:
        for name in v:
            if not re.match(IDENT, name):
                raise ValueError(f"column name {name!r} must be lower_snake_case (a-z, 0-9, _)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DatasetPolicy":
        cols = self.columns
        if self.subject_key not in cols:
            raise FieldError(("subject_key",), f"subject_key '{self.subject_key}' is not one of the columns")
        if cols[self.subject_key].class_ is not ColumnClass.SUBJECT_KEY:
            raise FieldError(
                ("columns", self.subject_key, "class"), f"subject_key column '{self.subject_key}' must have class 'subject_key'"
            )
        extra_keys = [n for n, c in cols.items() if c.class_ is ColumnClass.SUBJECT_KEY and n != self.subject_key]
        if extra_keys:
            raise FieldError(
                ("columns", extra_keys[0], "class"),
                f"only the subject_key column may have class 'subject_key' (also: {', '.join(extra_keys)})",
            )
        derived = set(self.derived_columns())
        clash = sorted(derived & set(cols))
        if clash:
            raise FieldError(("preprocess",), f"preprocess would create column(s) {', '.join(clash)}, which already exist")
        for role, acc in self.access.items():
            if acc.columns != "*":
                for c in acc.columns:
                    if c not in cols and c not in derived:
                        raise FieldError(("access", role, "columns"), f"access.{role}.columns names unknown column '{c}'")
            for c in acc.masks:
                if c not in cols and c not in derived:
                    raise FieldError(("access", role, "masks", c), f"access.{role}.masks names unknown column '{c}'")
            for p in acc.purposes:
                if p not in self.purposes:
                    raise FieldError(
                        ("access", role, "purposes"),
                        f"access.{role}.purposes names purpose '{p}', which is not in this dataset's purposes",
                    )
        for c in self.layout.partition_by:
            if c not in cols:
                raise FieldError(("layout", "partition_by"), f"layout.partition_by names unknown column '{c}'")
            if cols[c].class_ is not ColumnClass.PUBLIC:
                raise FieldError(
                    ("layout", "partition_by"),
                    f"partition column '{c}' must be public: partition values appear in file paths",
                )
        numeric = {n for n, c in cols.items() if c.type in ("int", "double") and c.class_ is ColumnClass.PUBLIC}
        for key in ("impute", "standardize", "normalize"):
            for c in getattr(self.preprocess, key):
                if c not in cols:
                    raise FieldError(("preprocess", key), f"preprocess.{key} names unknown column '{c}'")
                if key != "impute" and c not in numeric:
                    raise FieldError(("preprocess", key), f"preprocess.{key} needs a public numeric column, not '{c}'")
        for c, how in self.preprocess.impute.items():
            if isinstance(how, str) and how in ("mean", "median") and c not in numeric:
                raise FieldError(("preprocess", "impute", c), f"impute '{how}' needs a public numeric column, not '{c}'")
        silver = set(self.silver_columns())
        for view, spec in self.features.items():
            if not re.match(IDENT, view):
                raise FieldError(("features", view), f"feature view name {view!r} must be lower_snake_case")
            for c in spec.columns:
                col = cols.get(c)
                if c not in silver or (col is not None and col.protection in (Protection.VAULT, Protection.RESTRICTED)):
                    raise FieldError(
                        ("features", view, "columns"), f"features.{view} names '{c}', which is not a column of silver.{self.dataset}"
                    )
                if c == self.subject_key:
                    raise FieldError(("features", view, "columns"), f"features.{view}: the subject key is the entity, not a feature")
        if self.fairness:
            for a in self.fairness.sensitive_attributes:
                if a not in cols:
                    raise FieldError(
                        ("fairness", "sensitive_attributes"), f"fairness.sensitive_attributes names unknown column '{a}'"
                    )
                if cols[a].class_ is not ColumnClass.SENSITIVE:
                    raise FieldError(
                        ("fairness", "sensitive_attributes"), f"fairness attribute '{a}' must be a column of class 'sensitive'"
                    )
        for c, lab in self.labels.items():
            _check_label(c, lab, cols.get(c))
        if self.anonymity is not None:
            a = self.anonymity
            if not self.quasi_identifiers():
                raise FieldError(("anonymity", "k_min"),
                                 "anonymity needs at least one quasi_identifier column with protection 'generalize'")
            if a.l_min is not None and not self.l_columns():
                raise FieldError(("anonymity", "l_min"),
                                 "anonymity.l_min needs at least one sensitive column with protection 'encrypt'")
            if a.on_violation == "generalize" and not any(cols[c].hierarchy for c in self.quasi_identifiers()):
                raise FieldError(("anonymity", "on_violation"),
                                 "on_violation: generalize needs a hierarchy on at least one quasi-identifier, "
                                 "e.g. hierarchy: [year, decade]")
        self._check_private_queries()
        return self

    def _check_private_queries(self) -> None:
        private = [r for r in self.access if self.query_mode(r) == "private"]
        if not private and self.query != "private":
            return
        where = ("query",) if self.query == "private" else ("access", private[0], "query")
        if self.privacy is None:
            raise FieldError(where, "query: private needs a privacy budget (privacy.epsilon_total): private queries "
                                    "spend it, together with training")
        pq, total = self.private_queries, self.privacy.epsilon_total
        if pq.epsilon_per_query > total:
            raise FieldError(("private_queries", "epsilon_per_query"),
                             f"epsilon_per_query ({pq.epsilon_per_query:g}) exceeds privacy.epsilon_total ({total:g})")
        if pq.epsilon_per_analyst is not None and pq.epsilon_per_analyst > total:
            raise FieldError(("private_queries", "epsilon_per_analyst"),
                             f"epsilon_per_analyst ({pq.epsilon_per_analyst:g}) exceeds privacy.epsilon_total ({total:g})")
        d_limit = pq.delta_per_analyst if pq.delta_per_analyst is not None else self.privacy.delta
        if pq.delta_per_query is not None and pq.delta_per_query > d_limit:
            which = "delta_per_analyst" if pq.delta_per_analyst is not None else "privacy.delta"
            raise FieldError(("private_queries", "delta_per_query"),
                             f"delta_per_query ({pq.delta_per_query:g}) exceeds {which} ({d_limit:g})")
        if pq.epsilon_per_analyst is not None and pq.epsilon_per_query > pq.epsilon_per_analyst:
            raise FieldError(("private_queries", "epsilon_per_query"),
                             f"epsilon_per_query ({pq.epsilon_per_query:g}) exceeds epsilon_per_analyst "
                             f"({pq.epsilon_per_analyst:g})")

    def query_mode(self, role: str) -> Literal["exact", "private"]:
        """How ``role``'s SQL over this dataset is answered: its access's ``query``, else the dataset's."""
        acc = self.access.get(role)
        return (acc.query if acc is not None and acc.query else None) or self.query

    def quasi_identifiers(self) -> list[str]:
        """The quasi-identifiers k is measured over: those stored in plaintext, generalized (an encrypted or
        vaulted one is not readable in silver)."""
        return [n for n, c in self.columns.items()
                if c.class_ is ColumnClass.QUASI_IDENTIFIER and c.protection is Protection.GENERALIZE]

    def l_columns(self) -> list[str]:
        """The sensitive columns l is measured over: those kept, encrypted, in the table itself."""
        return [n for n, c in self.columns.items()
                if c.class_ is ColumnClass.SENSITIVE and c.protection is Protection.ENCRYPT]

    # -- queries the enforcers use -------------------------------------------------
    def derived_columns(self) -> list[str]:
        """Columns silver adds: <c>_z, <c>_01 and the derived features (all public)."""
        p = self.preprocess
        return [f"{c}_z" for c in p.standardize] + [f"{c}_01" for c in p.normalize] + list(p.derive)

    def silver_columns(self) -> list[str]:
        """Every column of the silver table, in order: the policy's, then the derived ones."""
        return [*self.columns, *self.derived_columns()]

    def columns_of(self, cls: ColumnClass) -> list[str]:
        return [n for n, c in self.columns.items() if c.class_ is cls]

    def default_mask(self, column: str) -> Mask | None:
        """The mask applied when a role's access names none: identifiers and sensitive data never show."""
        c = self.columns[column]
        if c.class_ is ColumnClass.DIRECT_IDENTIFIER:
            return Mask(kind=MaskKind.REDACT)
        if c.class_ is ColumnClass.SENSITIVE:
            return Mask(kind=MaskKind.NULL)
        return None


_LABEL_TYPES = {"bool": bool, "string": str, "int": int}


def _check_label(name: str, lab: Label, col: ColumnPolicy | None) -> None:
    """A label is a public bool, string or int column, and its declared values fit the column."""
    if col is None:
        raise FieldError(("labels", name), f"labels names unknown column '{name}'")
    if col.class_ is not ColumnClass.PUBLIC:
        raise FieldError(
            ("labels", name),
            f"label '{name}' is a {col.class_.value} column: a model's label must be a public column "
            "(identifiers and sensitive attributes are never predicted)",
        )
    want = _LABEL_TYPES.get(col.type)
    if want is None:
        raise FieldError(("labels", name), f"label '{name}' is a {col.type} column: a label must be bool, string or int")
    for side in ("favourable", "unfavourable"):
        v = getattr(lab, side)
        if type(v) is not want:
            shown = "true/false" if want is bool else ("text" if want is str else "a whole number")
            extra = f" ({_YAML_BOOLS})" if want is str and isinstance(v, bool) else ""
            raise FieldError(
                ("labels", name, side), f"labels.{name}.{side} is {v!r}, but '{name}' is a {col.type} column: use {shown}{extra}"
            )
        if want is str and col.allowed is not None and v not in col.allowed:
            raise FieldError(
                ("labels", name, side),
                f"labels.{name}.{side} is {v!r}, which columns.{name}.allowed does not list ({', '.join(col.allowed)})",
            )


class RoleSpec(_Strict):
    description: str = ""
    stages: list[Stage] = Field(default_factory=list)


class RoleCatalog(_Strict):
    kind: Literal["roles"]
    roles: dict[str, RoleSpec]
    principals: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "RoleCatalog":
        for r in self.roles:
            if not re.match(IDENT, r):
                raise FieldError(("roles", r), f"role name {r!r} must be lower_snake_case")
        missing = [r for r in REQUIRED_ROLES if r not in self.roles]
        if missing:
            raise FieldError(("roles",), f"the role catalog must define {', '.join(missing)}")
        for user, roles in self.principals.items():
            for r in roles:
                if r not in self.roles:
                    raise FieldError(("principals", user), f"principals.{user} names unknown role '{r}'")
        return self


class _AnyPolicy(_Strict):
    kind: Literal["roles", "dataset"]
    model_config = ConfigDict(extra="allow", frozen=True)


class PolicySet:
    """All policies, validated together. Immutable; ``digest`` identifies this exact version."""

    def __init__(self, roles: RoleCatalog, datasets: dict[str, DatasetPolicy], *, digest: str, files: list[str],
                 sources: dict[str, str] | None = None):
        self.roles = roles
        self.datasets = datasets
        self.digest = digest
        self.files = files
        self._sources = dict(sources or {})

    def source(self, dataset: str) -> str:
        """The file that defines ``dataset``'s policy (for messages that tell the user what to edit)."""
        return self._sources.get(dataset, f"policies/{dataset}.yaml")

    def dataset(self, name: str) -> DatasetPolicy:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise PolicyError(f"no policy for dataset '{name}' (known: {known})") from None

    def summary(self) -> dict[str, Any]:
        """Counts and the digest, for reports and DVC metrics (no file paths, no personal data)."""
        return {
            "digest": self.digest,
            "files": len(self.files),
            "roles": len(self.roles.roles),
            "datasets": {
                name: {
                    "columns": len(ds.columns),
                    **{cls.value: len(ds.columns_of(cls)) for cls in ColumnClass},
                    "roles_with_access": len(ds.access),
                    "purposes": len(ds.purposes),
                }
                for name, ds in sorted(self.datasets.items())
            },
        }

    def roles_of(self, user: str) -> tuple[str, ...]:
        return tuple(self.roles.principals.get(user, ()))

    def __repr__(self) -> str:
        return f"PolicySet(datasets={sorted(self.datasets)}, digest={self.digest[:12]})"


def load_policies(files: list[Path]) -> PolicySet:
    """Validate each policy file, then the set; raise PolicyError naming file, field and line."""
    if not files:
        raise PolicyError("no policy files found", hint="add policies/roles.yaml and one policies/<dataset>.yaml per dataset")
    roles: RoleCatalog | None = None
    roles_file: Path | None = None
    datasets: dict[str, tuple[DatasetPolicy, Path]] = {}
    h = hashlib.sha256()
    for f in sorted(files):
        head = validate_file(_AnyPolicy, f, error=PolicyError)
        h.update(f.name.encode() + b"\x00" + f.read_bytes() + b"\x00")
        _, node = read_yaml(f, error=PolicyError)
        if head.kind == "roles":
            if roles is not None:
                raise PolicyError(
                    f"a second role catalog (the first is {roles_file})", path=str(f), field="kind", line=locate(node, ("kind",))
                )
            roles, roles_file = validate_file(RoleCatalog, f, error=PolicyError), f
        else:
            ds = validate_file(DatasetPolicy, f, error=PolicyError)
            if ds.dataset in datasets:
                raise PolicyError(
                    f"dataset '{ds.dataset}' is also defined in {datasets[ds.dataset][1]}",
                    path=str(f), field="dataset", line=locate(node, ("dataset",)),
                )
            datasets[ds.dataset] = (ds, f)
    if roles is None:
        raise PolicyError("no role catalog (a file with 'kind: roles')", hint="see policies/roles.yaml in the docs")
    # Cross-file checks: every role a dataset names exists in the catalog.
    for name, (ds, f) in datasets.items():
        _, node = read_yaml(f, error=PolicyError)
        for role in ds.access:
            if role not in roles.roles:
                raise PolicyError(
                    f"unknown role '{role}' (defined roles: {', '.join(sorted(roles.roles))})",
                    path=str(f), field=f"access.{role}", line=locate(node, ("access", role)),
                )
        for role in ds.deployment.approvers:
            if role not in roles.roles:
                raise PolicyError(
                    f"unknown role '{role}' among approvers", path=str(f), field="deployment.approvers",
                    line=locate(node, ("deployment", "approvers")),
                )
    return PolicySet(
        roles, {k: v[0] for k, v in datasets.items()}, digest=h.hexdigest(), files=[str(f) for f in sorted(files)],
        sources={k: str(v[1]) for k, v in datasets.items()},
    )
