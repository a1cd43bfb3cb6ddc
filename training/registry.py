"""The model registry: versioned models with model cards, behind the gate.

A model is registered as a numbered version of a name (``credit@1``, ``credit@2``, ...). Each
version is a folder of artifact files plus its model card::

    <workspace>/models/<name>/<version>/
        <artifact files>      the bytes the trainer handed over (weights, preprocessing, ...)
        card.json             the card, canonical JSON (sorted keys); its sha256 is in the registry table
        card.md               the same card rendered for people (headline, privacy guarantee and cost, metrics)

With ``storage.root: s3://bucket/prefix`` the versions live in the bucket instead, so that every
machine of a cluster sees, verifies and serves the same models (:class:`_BucketVersions`)::

    s3://bucket/prefix/models/<name>/<version>/
        .claim                the version number's claim: the first object written, by a conditional put
        <artifact files>      written after the claim, before the card
        cards/<sha256>.json   each revision of the card (registered, approved, deployed), named by its sha256
        cards/<sha256>.md     ... and its rendering for people

A version number is claimed with ``If-None-Match: *`` on its ``.claim`` object (a store answers
412 to every machine but one; the loser tries the next number); on a local folder a file lock
serializes registrations instead. A card revision is never overwritten in the bucket: approving
or deploying writes a new ``cards/<sha256>.*`` and commits its row on the snapshot the card was
read from, with the version's Delta application transaction, so two machines changing one version
at once cannot both commit (the second re-reads and retries). Reading a version from the bucket
downloads its artifacts into ``<workspace>/cache/models/<name>/<version>/`` and checks each
against the card's sha256 before anything is loaded.

Every event (register, approve, deploy) appends one row to the append-only Delta table
``_models/registry`` (``name, version, dataset, status, actor, at, card_sha256``) and one
audit event; registering also emits lineage from the training data (the Delta versions in the
card) to ``model:<name>`` at its version. The registry table is the commit point and the
integrity anchor: a ``card.json`` whose sha256 is not the latest row's (an approval added by
hand, an ε edited) is refused on every read, and :meth:`Registry.verify` rehashes the
artifacts, so tampered weights are found before deployment. A version is visible only once its
row is committed, so a reader never sees a version whose files are still being written; a
registration that dies before its row leaves its number unused (a gap) and its files unlisted.

Who may do what is the gate's: ``register`` (``Stage.REGISTER`` with the dataset), ``approve``
(``Stage.APPROVE``: a role among the dataset policy's ``deployment.approvers``). The deploy
decision belongs to the caller: :meth:`Registry.deploy_context` gives exactly the context
``Stage.DEPLOY`` reads (dataset, ε, per-attribute fairness metrics, approving actors — their
roles are looked up in the policy, never taken from the card), and
:meth:`Registry.mark_deployed` records the outcome.

Example::

    reg = Registry(ws)
    ref = reg.register(ws.actor("sam"), name="credit", dataset="customers",
                       files={"model.pt": weights, "preprocess.json": stats},
                       card_fields={"purpose": "credit_scoring",
                                    "features": ["customer_profile:income"], "label": "defaulted",
                                    "data_versions": {"silver.customers": 7},
                                    "privacy": {"epsilon": 2.97, "delta": 1e-5, "accountant": "prv"},
                                    "utility": {"accuracy": 0.81, "auc": 0.86},
                                    "fairness": {"sex": {...}, "ethnicity": {...}}})
    reg.approve(ws.actor("carla"), ref)              # gate: approve; the fairness verdict must pass
    ctx = reg.deploy_context(ref)                    # verifies the artifacts first
    d = ws.gate.enforce("deploy", ws.actor("mel"), Resource.model(ref.name, ref.version), ctx)
    reg.mark_deployed(ws.actor("mel"), ref, target="kserve/credit", decision=d)

Errors::

    LakewardenError
    └── RegistryError          a registry operation cannot be done (exit 2)
        ├── ModelNotFound      unknown model name or version
        ├── ApprovalRefused    the card's fairness verdict failed and no override_reason was given (exit 3)
        └── ArtifactTampered   an artifact, card.json or card.md differs from what was registered (exit 4)

Caller mistakes (bad names, file names with paths, malformed or personal card fields) raise
``ValueError``/``TypeError``; a denied gate decision raises
:class:`governance.errors.AccessDenied`.

Limits: whoever can write the registry table directly (deltalake, with the storage
credentials) can append a row for a card they edited; the audit log, which records every
approval, is the second witness.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError, DeltaError
from pydantic import (
    AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError, field_validator,
    model_serializer, model_validator,
)

from governance.locks import file_lock
from governance.errors import LakewardenError
from governance.fairness import METRICS as FAIRNESS_METRICS
from governance.gate import Actor, Decision, Resource
from governance.pii import find_pii_in
from governance.policy import IDENT, DatasetPolicy, Stage
from governance.workspace import Workspace

if TYPE_CHECKING:
    import pyarrow as pa

    from training.profile import Profile

    from training.encode import Encoder

__all__ = [
    "REGISTRY_TABLE",
    "SCHEMA",
    "STATUSES",
    "Approval",
    "ApprovalRefused",
    "ArtifactTampered",
    "Deployment",
    "FairnessReport",
    "GateRecord",
    "LedgerRunCost",
    "LoadedModel",
    "ModelCard",
    "ModelNotFound",
    "ModelRef",
    "model_name",
    "PrivacyCost",
    "PrivacyGuarantee",
    "Profile",
    "Registry",
    "RegistryError",
]

# The drift profile stored with each model is serving's vocabulary too; serving reads it through this
# module. Re-exported lazily: training.profile imports numpy, which `models list` must not pay for.
_PROFILE_NAMES = frozenset({"EPSILON", "PROFILE_FORMAT", "CategoricalProfile", "FeatureProfile", "NumericProfile",
                            "Profile", "psi", "psi_categorical"})


REGISTRY_TABLE = "_models/registry"
"""The registry table, under the storage root (``ws.config.table_uri(REGISTRY_TABLE)``)."""

STATUSES: tuple[str, ...] = ("registered", "approved", "deployed")
"""A version's statuses, in lifecycle order."""

def _schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field("name", pa.string(), nullable=False),
            pa.field("version", pa.int64(), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            pa.field("actor", pa.string(), nullable=False),
            pa.field("at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("card_sha256", pa.string(), nullable=False),
        ]
    )


# SCHEMA: the Arrow schema of the registry table, one row per event, never updated.
def __getattr__(name: str) -> Any:  # built on first use: reading the registry needs neither pyarrow nor numpy
    if name == "SCHEMA":
        return _schema()
    if name in _PROFILE_NAMES:
        import training.profile

        return getattr(training.profile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CARD_JSON = "card.json"
CARD_MD = "card.md"
MODEL_FILE = "model.pt"  # the weights (a torch state dict)
PROFILE_FILE = "reference.json"  # the drift profile (its historical name; registered cards list it)
_RESERVED_FILES = frozenset({CARD_JSON, CARD_MD})
CLAIM = ".claim"  # in a bucket: the object whose conditional put claims a version number
CARDS = "cards"  # in a bucket: the card's revisions, cards/<sha256>.json and .md
_REVISION = re.compile(r"^cards/[0-9a-f]{64}\.(json|md)$")
_CLAIM_ATTEMPTS = 1000  # version numbers tried, one after another, before a registration gives up
_REVISE_ATTEMPTS = 8  # in a bucket: card revisions retried after another machine changed the version
_NAME = re.compile(IDENT)
_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_FEATURE = re.compile(r"^[a-z][a-z0-9_]*:[a-z][a-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Card fields the registry sets itself; a caller cannot supply them.
_OWNED = frozenset(
    {"name", "version", "dataset", "created_at", "created_by", "artifact_sha256", "approvals", "deployments", "status"}
)
# Fields validated structurally (UUIDs): scanning them for personal data only yields false alarms.
_NOT_SCANNED = frozenset({"lineage_run_ids"})
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- errors


class RegistryError(LakewardenError):
    """A registry operation cannot be done (unknown model, refused approval, failed verification)."""

    exit_code = 2


class ModelNotFound(RegistryError):
    """No model of that name, or no such version of it."""


class ApprovalRefused(RegistryError):
    """The model's fairness evaluation failed (``failures``) and no ``override_reason`` was given."""

    exit_code = 3

    def __init__(self, message: str, *, failures: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.failures = failures


class ArtifactTampered(RegistryError):
    """Stored files differ from what was registered; ``ref`` and ``problems`` say which."""

    exit_code = 4

    def __init__(self, message: str, *, ref: str, problems: list[str]) -> None:
        super().__init__(message, hint="the model must not be deployed; re-register it from a trusted build")
        self.ref = ref
        self.problems = problems


# --------------------------------------------------------------------------- references


def _read_rows(dt: DeltaTable) -> list[dict[str, Any]]:
    """Every row of the registry table's current version, as dicts (``at`` an aware UTC datetime).

    Read through deltalake's own query engine, which answers with arro3 arrays: pyarrow (and the
    pandas that its conversion of zoned timestamps imports) cost ``models list`` about half a
    second of a start that should stay under one.
    """
    from deltalake import QueryBuilder

    cols = [f.name for f in dt.schema().fields]
    sel = ", ".join(f'CAST("{c}" AS BIGINT) AS "{c}"' if c == "at" else f'"{c}"' for c in cols)
    tbl = QueryBuilder().register("registry", dt).execute(f"SELECT {sel} FROM registry").read_all()
    values = {c: tbl.column(c).to_pylist() for c in cols}
    rows = [dict(zip(cols, r)) for r in zip(*(values[c] for c in cols))]
    epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
    for r in rows:
        if r.get("at") is not None:
            r["at"] = epoch + timedelta(microseconds=int(r["at"]))
    return rows


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} must be lower_snake_case (a-z, 0-9, _, starting with a letter, "
            "at most 63 characters) — a name, never a path"
        )
    return value


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One registered version of a model: ``ModelRef("credit", 2)``, printed ``credit@2``."""

    name: str
    version: int

    def __post_init__(self) -> None:
        _check_name(self.name, "model name")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"model version must be an int >= 1, got {self.version!r}")

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        """``"credit@2"`` -> ``ModelRef("credit", 2)``."""
        name, sep, version = str(text).partition("@")
        if not sep or not version.isdigit():
            raise ValueError(f"a model reference looks like name@version, got {text!r}")
        return cls(name, int(version))


def model_name(ref: ModelRef | str) -> str:
    """The model's name in ``name``, ``name@version`` or a :class:`ModelRef` (nothing looked up): what
    a verb names in the gate's resource before it may read the registry."""
    return ref.name if isinstance(ref, ModelRef) else str(ref).partition("@")[0]


# --------------------------------------------------------------------------- the card


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class LedgerRunCost(_Frozen):
    """One private run of a model build, as the privacy ledger recorded it."""

    run: str = Field(pattern=r"^[0-9a-f]{32}$")
    epsilon: float = Field(gt=0)
    delta: float = Field(ge=0, lt=1)
    state: Literal["spent", "reserved"] = "spent"


class PrivacyCost(_Frozen):
    """What producing the model cost of its dataset's privacy budget: every private run of its build
    (the released one, and e.g. a first run that failed fairness before a mitigation retrain),
    composed as the ledger composes them (ε and δ add up). Filled from the ledger at registration."""

    build: str = Field(pattern=r"^[0-9a-f]{32}$")
    epsilon: float = Field(gt=0)
    delta: float = Field(ge=0, lt=1)
    runs: list[LedgerRunCost] = Field(min_length=1)
    released_run: str = Field(pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _consistent(self) -> "PrivacyCost":
        if self.released_run not in {r.run for r in self.runs}:
            raise ValueError("the released run must be one of the build's runs")
        if abs(self.epsilon - sum(r.epsilon for r in self.runs)) > 1e-9 * max(1.0, self.epsilon):
            raise ValueError("the cost's ε must be the sum of its runs' ε (basic composition)")
        return self

    def sentence(self, dataset: str) -> str:
        n = len(self.runs)
        return (f"Producing it cost ε={self.epsilon:g}, δ={self.delta:g} of the privacy budget of {dataset}: "
                f"{n} private run{'s' if n != 1 else ''} of build `{self.build}`, composed (privacy ledger)")


class PrivacyGuarantee(_Frozen):
    """What the accountant reports for the training run (ε, δ) and the DP-SGD settings behind it.

    ``epsilon``/``delta`` are the released model's own guarantee; ``cost`` is what producing it
    spent of the dataset's budget (its build's runs, from the privacy ledger). ``cost`` is None on
    cards registered before builds were recorded: unknown (at least ``epsilon``), never 0, and
    left out of the card's JSON so those cards keep their bytes and digests.
    """

    epsilon: float = Field(gt=0)
    delta: float = Field(ge=0, lt=1)
    accountant: str = Field(min_length=1)
    target_epsilon: float | None = Field(default=None, gt=0)
    noise_multiplier: float | None = Field(default=None, ge=0)
    max_grad_norm: float | None = Field(default=None, gt=0)
    epochs: int | None = Field(default=None, ge=0)
    sample_rate: float | None = Field(default=None, gt=0, le=1)
    cost: PrivacyCost | None = None

    @model_serializer(mode="wrap")
    def _unknown_cost_left_out(self, handler: Any) -> Any:
        out = handler(self)
        if isinstance(out, dict) and out.get("cost") is None:
            out.pop("cost", None)
        return out

    @model_validator(mode="after")
    def _released_within_cost(self) -> "PrivacyGuarantee":
        c = self.cost
        if c is not None:
            released = next(r for r in c.runs if r.run == c.released_run)
            if abs(released.epsilon - self.epsilon) > 1e-9 * max(1.0, self.epsilon):
                raise ValueError(f"ε={self.epsilon:g} is not what the ledger recorded for the released run "
                                 f"({released.epsilon:g})")
        return self

    def cost_sentence(self, dataset: str) -> str:
        """What producing the model cost, in one line; "unknown" on a card that predates build costs."""
        if self.cost is None:
            return (f"What producing it cost of the privacy budget of {dataset}: unknown (registered before model "
                    "builds were linked to the privacy ledger; at least the ε above)")
        return self.cost.sentence(dataset)

    def sentence(self, dataset: str) -> str:
        """The guarantee in one line, as the card states it."""
        return (
            f"(ε={self.epsilon:g}, δ={self.delta:g})-differentially private with respect to one subject's rows "
            f"in {dataset} (accountant {self.accountant})"
        )


class FairnessReport(_Frozen):
    """Fairness per sensitive attribute and the verdict.

    ``attributes`` is exactly what the deploy gate reads: ``{attr: {"disparate_impact",
    "equal_opportunity_diff", "predictive_parity_diff", ...}}``. ``thresholds`` are the
    policy's (filled in at registration when absent). ``passed`` ``None`` means not judged
    yet; the registry judges it from the thresholds at registration.

    A flat input ``{"sex": {...}, "ethnicity": {...}, "passed": True, "failures": []}`` is
    accepted too: every key other than ``passed``/``failures``/``thresholds`` is an attribute.

    An attribute evaluated with the policy's ``min_group_size`` above 1 also holds
    ``min_group_size`` and ``group_sizes`` (``{metric: {group: n}}``): the judge reads them to
    name the groups too small to measure, and the metrics that could not be measured at all.
    """

    attributes: dict[str, dict[str, float | dict[str, float] | dict[str, dict[str, float]]]]
    passed: bool | None = None
    failures: list[str] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict)
    # training.fairness.fairness_uncertainty: bootstrap intervals and the verdict's pass rate
    uncertainty: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _lift_flat(cls, value: Any) -> Any:
        if isinstance(value, Mapping) and "attributes" not in value:
            meta = {k: value[k] for k in ("passed", "failures", "thresholds", "uncertainty") if k in value}
            return {**meta, "attributes": {k: v for k, v in value.items() if k not in meta}}
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "FairnessReport":
        if not self.attributes:
            raise ValueError("fairness must hold metrics for at least one attribute")
        if self.passed is True and self.failures:
            raise ValueError("fairness says passed but lists failures")
        if self.passed is False and not self.failures:
            raise ValueError("a failed fairness verdict must list its failures")
        return self


class GateRecord(_Frozen):
    """A gate decision the model's history went through (a :class:`Decision` is accepted as input)."""

    stage: str
    rule_ids: list[str]
    allowed: bool

    @model_validator(mode="before")
    @classmethod
    def _from_decision(cls, value: Any) -> Any:
        if isinstance(value, Decision):
            return {"stage": value.stage.value, "rule_ids": list(value.rule_ids), "allowed": value.allowed}
        return value


class Approval(_Frozen):
    """An approval: who, in which approving role, when, and the reason if it overrode a failed verdict."""

    actor: str
    role: str
    at: AwareDatetime
    override_reason: str | None = None


class Deployment(_Frozen):
    """A recorded deployment of the version to ``target``."""

    actor: str
    target: str
    at: AwareDatetime


class FavourableLabel(_Frozen):
    """The label the model predicts, as the dataset policy declares it (``labels:``): which value
    is the favourable outcome (fairness measures it) and which the model scores (``positive``,
    encoded 1: the score is the probability of that value)."""

    column: str = Field(pattern=IDENT)
    favourable: StrictBool | StrictInt | StrictStr
    unfavourable: StrictBool | StrictInt | StrictStr
    positive: StrictBool | StrictInt | StrictStr

    @model_validator(mode="after")
    def _pair(self) -> "FavourableLabel":
        if self.favourable == self.unfavourable or self.positive not in (self.favourable, self.unfavourable):
            raise ValueError("favourable_label needs two distinct values, and positive must be one of them")
        return self

    def sentence(self) -> str:
        def v(x: bool | int | str) -> str:
            return ("true" if x else "false") if isinstance(x, bool) else repr(x)

        return f"{self.column} (favourable: {v(self.favourable)}; the score is the probability of {v(self.positive)})"


class ModelCard(_Frozen):
    """Everything a reviewer needs to judge one model version, and what the deploy gate reads.

    The registry sets ``name``, ``version``, ``dataset``, ``created_at``, ``created_by``,
    ``artifact_sha256``, ``approvals``, ``deployments`` and ``status``; the trainer supplies
    the rest (``card_fields`` of :meth:`Registry.register`).
    """

    name: str = Field(pattern=IDENT)
    version: int = Field(ge=1)
    dataset: str = Field(pattern=IDENT)
    purpose: str = Field(pattern=IDENT)
    created_at: AwareDatetime
    created_by: str = Field(min_length=1)
    features: list[str] = Field(default_factory=list)
    label: str | None = None
    favourable_label: FavourableLabel | None = None  # the policy's declaration of the label (None on older cards)
    data_versions: dict[str, int] = Field(default_factory=dict)
    privacy: PrivacyGuarantee
    utility: dict[str, float] = Field(default_factory=dict)
    fairness: FairnessReport | None = None
    mitigation: dict[str, Any] | None = None
    lineage_run_ids: list[str] = Field(default_factory=list)
    gate_decisions: list[GateRecord] = Field(default_factory=list)
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    artifact_sha256: dict[str, str] = Field(default_factory=dict)
    approvals: list[Approval] = Field(default_factory=list)
    deployments: list[Deployment] = Field(default_factory=list)
    status: Literal["registered", "approved", "deployed"] = "registered"

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if not _FEATURE.match(f)]
        if bad:
            raise ValueError(f"features are 'view:feature' (lower_snake_case), got {', '.join(map(repr, bad))}")
        return v

    @model_validator(mode="after")
    def _label_declared(self) -> "ModelCard":
        if self.favourable_label is not None and self.favourable_label.column != self.label:
            raise ValueError(f"favourable_label describes '{self.favourable_label.column}', not the label {self.label!r}")
        return self

    @model_serializer(mode="wrap")
    def _undeclared_label_left_out(self, handler: Any) -> Any:
        """A card without ``favourable_label`` (registered before labels were declared) keeps its JSON bytes."""
        out = handler(self)
        if isinstance(out, dict) and out.get("favourable_label") is None:
            out.pop("favourable_label", None)
        return out

    @field_validator("data_versions")
    @classmethod
    def _data_versions(cls, v: dict[str, int]) -> dict[str, int]:
        for table, version in v.items():
            if not table or version < 0:
                raise ValueError(f"data_versions maps a table to its Delta version (>= 0), got {table!r}: {version}")
        return v

    @field_validator("lineage_run_ids")
    @classmethod
    def _run_ids(cls, v: list[str]) -> list[str]:
        for rid in v:
            try:
                uuid.UUID(rid)
            except ValueError:
                raise ValueError(f"lineage run ids are UUIDs, got {rid!r}") from None
        return v

    @field_validator("artifact_sha256")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        for fn, digest in v.items():
            if not _SHA256.match(digest):
                raise ValueError(f"artifact_sha256[{fn!r}] is not a lowercase hex sha256")
        return v

    # -- views -------------------------------------------------------------------------
    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version)

    def deploy_context(self) -> dict[str, Any]:
        """The context ``Stage.DEPLOY`` reads: dataset, ε, per-attribute fairness, approving actors."""
        return {
            "dataset": self.dataset,
            "epsilon": self.privacy.epsilon,
            "fairness": copy.deepcopy(self.fairness.attributes) if self.fairness else {},
            "approvals": [{"actor": a.actor} for a in self.approvals],
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, two-space indent, UTF-8, trailing newline; no NaN."""
        return (
            json.dumps(self.model_dump(mode="json"), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
            + "\n"
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "ModelCard":
        return cls.model_validate_json(text)

    def to_markdown(self, *, legacy: bool = False) -> str:
        """The card for people: headline, privacy guarantee and cost, metric tables with pass/fail, provenance.

        ``legacy``: as cards were rendered before the privacy cost was stated (for a card without
        one, :meth:`Registry.verify` accepts that rendering too).
        """
        out: list[str] = [f"# Model card: {self.ref} — {self.status}", ""]
        out += _table(
            ("", ""),
            [
                ("Dataset", self.dataset),
                ("Purpose", self.purpose),
                ("Created", f"{_ts(self.created_at)} by {self.created_by}"),
                ("Label", self.favourable_label.sentence() if self.favourable_label else self.label or "—"),
                ("Features", ", ".join(self.features) or "—"),
            ],
        )
        p = self.privacy
        out += ["", "## Privacy", "", f"This model is {p.sentence(self.dataset)}.", ""]
        if not legacy:
            out += [f"{p.cost_sentence(self.dataset)}.", ""]
            if p.cost is not None:
                out += _table(("ledger run", "ε", "δ", "weights"), [
                    (f"`{r.run}`", _num(r.epsilon), _num(r.delta),
                     ("released" if r.run == p.cost.released_run else "not released")
                     + ("" if r.state == "spent" else " (still reserved)"))
                    for r in p.cost.runs
                ]) + [""]
        params = [
            ("target ε", p.target_epsilon),
            ("noise multiplier", p.noise_multiplier),
            ("max grad norm", p.max_grad_norm),
            ("epochs", p.epochs),
            ("sample rate", p.sample_rate),
        ]
        out += _table(("parameter", "value"), [(k, _num(v)) for k, v in params if v is not None] or [("—", "—")])

        out += ["", "## Utility", ""]
        out += _table(("metric", "value"), [(k, _num(v)) for k, v in sorted(self.utility.items())] or [("—", "—")])

        out += ["", "## Fairness", ""]
        f = self.fairness
        if f is None:
            out.append("No fairness evaluation.")
        else:
            verdict = {True: "passed", False: "FAILED", None: "not judged"}[f.passed]
            out += [f"Verdict: **{verdict}**", ""]
            rows = []
            from governance.fairness import judge as judge_fairness

            judged = judge_fairness(f.thresholds, f.attributes)
            for attr in sorted(f.attributes):
                m = f.attributes[attr]
                cells = [attr]
                ok_all = True
                for r in FAIRNESS_METRICS:
                    value = m.get(r.metric)
                    check = judged.check(attr, r.metric)
                    ok = None if check is None else check.ok
                    ok_all = ok_all and ok is not False
                    shown = _num(value) if isinstance(value, (int, float)) else "—"
                    if check is not None and not check.measured:
                        cells.append(f"{shown} (not measured)")
                        continue
                    cells.append(shown if ok is None else f"{shown} ({'pass' if ok else 'FAIL'})")
                cells.append("pass" if ok_all else "FAIL")
                rows.append(tuple(cells))
            out += _table(("attribute", "disparate impact", "equal opportunity diff", "predictive parity diff", "result"), rows)
            t = f.thresholds
            if t:
                out += [
                    "",
                    "Thresholds: disparate impact ≥ {}, |equal opportunity diff| ≤ {}, |predictive parity diff| ≤ {}.".format(
                        _num(t.get("disparate_impact_min")),
                        _num(t.get("equal_opportunity_max_diff")),
                        _num(t.get("predictive_parity_max_diff")),
                    ),
                ]
            if f.failures:
                out += ["", "Failures:", ""] + [f"- {_line(x)}" for x in f.failures]
            if judged.notes:  # what the verdict does not cover: groups below the policy's min_group_size
                out += ["", "Not measured (the verdict covers only what was measured):", ""]
                out += [f"- {_line(x)}" for x in judged.notes]
            u = f.uncertainty
            if u:
                pct = round(100 * float(u.get("level", 0.95)))
                out += ["", f"Bootstrap over the holdout ({u.get('resamples')} resamples): the verdict passes in "
                            f"{100 * float(u.get('pass_rate', 0.0)):.0f} % of them. {pct} % intervals:", ""]
                rows = []
                for attr in sorted(u.get("intervals") or {}):
                    iv = u["intervals"][attr]
                    rows.append((attr, *(f"{_num(iv[r.metric][0])} – {_num(iv[r.metric][1])}" if iv.get(r.metric) else "—"
                                         for r in FAIRNESS_METRICS)))
                out += _table(("attribute", "disparate impact", "equal opportunity diff", "predictive parity diff"), rows)
        if self.mitigation:
            out += ["", "## Bias mitigation", "", "```json", _pretty(self.mitigation), "```"]
        if self.preprocessing:
            out += ["", "## Preprocessing", "", "```json", _pretty(self.preprocessing), "```"]

        out += ["", "## Data versions", ""]
        out += _table(("table", "Delta version"), [(t, str(v)) for t, v in sorted(self.data_versions.items())] or [("—", "—")])
        out += ["", "## Lineage", ""]
        out += [f"- run `{r}`" for r in self.lineage_run_ids] or ["No lineage runs recorded."]
        out += ["", "## Gate decisions", ""]
        out += _table(
            ("stage", "allowed", "rules"),
            [(g.stage, "yes" if g.allowed else "no", ", ".join(g.rule_ids)) for g in self.gate_decisions] or [("—", "—", "—")],
        )
        out += ["", "## Artifacts", ""]
        out += _table(("file", "sha256"), [(fn, f"`{d}`") for fn, d in sorted(self.artifact_sha256.items())] or [("—", "—")])
        out += ["", "## Approvals", ""]
        if self.approvals:
            out += _table(
                ("actor", "role", "at", "override reason"),
                [(a.actor, a.role, _ts(a.at), a.override_reason or "—") for a in self.approvals],
            )
        else:
            out.append("None yet.")
        if self.deployments:
            out += ["", "## Deployments", ""]
            out += _table(("actor", "target", "at"), [(d.actor, d.target, _ts(d.at)) for d in self.deployments])
        return "\n".join(out) + "\n"


# -- markdown helpers -------------------------------------------------------------------


def _line(text: Any) -> str:
    return _CONTROL.sub(" ", str(text))


def _cell(text: Any) -> str:
    return _line(text).replace("\\", "\\\\").replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _num(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _ts(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def _pretty(value: Any) -> str:
    return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False).replace("```", "`\u200b``")


# --------------------------------------------------------------------------- input checks


def _check_files(files: Mapping[str, Any]) -> dict[str, bytes | Path]:
    if not isinstance(files, Mapping) or not files:
        raise ValueError("files must be a non-empty mapping of file name -> bytes (or a path to copy)")
    out: dict[str, bytes | Path] = {}
    for fn, data in files.items():
        if not isinstance(fn, str) or "/" in fn or "\\" in fn or ".." in fn or not _FILE.match(fn):
            raise ValueError(
                f"artifact file name {fn!r} must be a plain file name (letters, digits, '.', '_', '-'; "
                "no path separators, no '..', not hidden)"
            )
        if fn.lower() in _RESERVED_FILES:
            raise ValueError(f"artifact file name {fn!r} is reserved for the model card")
        if isinstance(data, (bytes, bytearray, memoryview)):
            out[fn] = bytes(data)
        elif isinstance(data, os.PathLike):
            p = Path(data)
            if not p.is_file():
                raise ValueError(f"artifact {fn!r}: {p} is not a file")
            out[fn] = p
        else:
            raise TypeError(f"artifact {fn!r} must be bytes or a path, got {type(data).__name__}")
    return out


def _refuse_personal(value: Any, what: str, path: str = "") -> None:
    """Raise ``ValueError`` naming the first field (``what 'path'``) that looks like personal data."""
    hit = next(find_pii_in(value, path), None)
    if hit:
        where = f"{what} '{hit[0]}'" if hit[0] else what
        # The value itself is never echoed: error messages end up in logs.
        raise ValueError(f"{where} looks like personal data ({hit[1]}): model cards must hold none — remove it")


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "card"
        parts.append(f"{loc}: {err['msg']}")
    return "invalid model card: " + "; ".join(parts)


# --------------------------------------------------------------------------- files


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_new(path: Path, src: bytes | Path) -> str:
    """Write ``src`` to a new file, fsync it, and return its sha256."""
    h = hashlib.sha256()
    with open(path, "xb") as out:
        if isinstance(src, bytes):
            h.update(src)
            out.write(src)
        else:
            with open(src, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (temp file in the same folder, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _md_problems(card: ModelCard, text: str | None) -> list[str]:
    """Whether the stored card.md (``None``: missing or not a regular file) is the card's rendering."""
    rendered = {card.to_markdown()} | ({card.to_markdown(legacy=True)} if card.privacy.cost is None else set())
    return [] if text is not None and text in rendered else [f"{CARD_MD} differs from {CARD_JSON}"]


def _tampered(ref: ModelRef, problems: list[str]) -> ArtifactTampered:
    return ArtifactTampered(f"{ref} failed verification: {'; '.join(problems)}", ref=str(ref), problems=problems)


# --------------------------------------------------------------------------- where versions are kept

# ``make(version, artifact digests)`` -> the version's card, its card.json bytes and its card.md bytes
_MakeCard = Callable[[int, dict[str, str]], tuple["ModelCard", bytes, bytes]]


class _Moved(Exception):
    """Another machine committed an event of the same version since its card was read (internal:
    the registry re-reads and retries)."""


class _Versions(ABC):
    """Where a registry keeps its versions' files: a local folder (:class:`_LocalVersions`) or a
    prefix in a bucket (:class:`_BucketVersions`). The registry table is the commit point and the
    integrity anchor for both; these keep the bytes, number new versions, and read them back."""

    shared: bool  # machines share it: card revisions commit on the snapshot they were read from
    attempts: int  # how often a card revision is tried (another machine may have moved the version)
    reserved: frozenset[str] = frozenset()  # artifact names this layout cannot hold

    @property
    @abstractmethod
    def root(self) -> Path | str:
        """The folder, or the ``s3://`` prefix, that holds ``<name>/<version>/``."""

    @abstractmethod
    def exists(self) -> bool:
        """Whether anything was ever stored (a cheap check before reading the registry table)."""

    @abstractmethod
    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Serializes this machine's writers (registration numbering, card rewrites)."""

    @abstractmethod
    def uri(self, ref: ModelRef) -> str:
        """The version's folder, as a path or an ``s3://`` URI."""

    @abstractmethod
    def folder(self, ref: ModelRef) -> Path:
        """The version's local folder (a bucket has none: RegistryError)."""

    @abstractmethod
    def create(self, name: str, known: list[int], blobs: Mapping[str, bytes | Path], make: _MakeCard,
               at: datetime) -> tuple[ModelCard, bytes]:
        """Number the next version of ``name`` (above ``known``, the versions in the registry table),
        store the artifacts and then the card; return the card and its JSON bytes. Nothing is
        visible to readers until the caller commits the registry row."""

    @abstractmethod
    def uncommitted(self, ref: ModelRef) -> None:
        """The version's registry row failed to commit (or its outcome is unknown): tidy up."""

    @abstractmethod
    def card_json(self, ref: ModelRef, sha256: str) -> bytes:
        """The stored card.json of the revision with that sha256 (``FileNotFoundError``: none)."""

    @abstractmethod
    def problems(self, card: ModelCard, sha256: str) -> list[str]:
        """Why the stored files are not the registered version (empty: they are)."""

    @abstractmethod
    def holds(self, card: ModelCard, fn: str) -> bool:
        """Whether the version has the artifact ``fn`` (a file older versions may lack)."""

    @abstractmethod
    def read(self, card: ModelCard, fn: str) -> bytes:
        """An artifact's bytes."""

    @abstractmethod
    def rewrite(self, ref: ModelRef, data: bytes, md: bytes, commit: Callable[[], None]) -> None:
        """Store a new revision of the card (card.json ``data``, card.md ``md``), then ``commit()``
        its registry row; a failed commit leaves readers on the previous revision."""


class _LocalVersions(_Versions):
    """``<workspace>/models/<name>/<version>/``: written in a temporary folder then renamed, numbered
    under a file lock, card files replaced atomically and restored if their row fails."""

    shared = False
    attempts = 1

    def __init__(self, root: Path) -> None:
        self._root = root

    @property
    def root(self) -> Path:
        return self._root

    def exists(self) -> bool:
        return self._root.exists()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self._root / ".lock")

    def folder(self, ref: ModelRef) -> Path:
        return self._root / ref.name / str(ref.version)

    def uri(self, ref: ModelRef) -> str:
        return str(self.folder(ref))

    def create(self, name: str, known: list[int], blobs: Mapping[str, bytes | Path], make: _MakeCard,
               at: datetime) -> tuple[ModelCard, bytes]:
        versions = list(known)
        parent = self._root / name
        if parent.is_dir():
            versions += [int(p.name) for p in parent.iterdir() if p.name.isdigit()]
        version = max(versions, default=0) + 1
        final = parent / str(version)
        tmp = parent / f".tmp-{uuid.uuid4().hex}"
        tmp.mkdir(parents=True)
        try:
            digests = {fn: _write_new(tmp / fn, src) for fn, src in blobs.items()}
            card, card_bytes, md = make(version, digests)
            _write_new(tmp / CARD_JSON, card_bytes)
            _write_new(tmp / CARD_MD, md)
            _fsync_dir(tmp)
            os.rename(tmp, final)  # fails if the version folder exists: never overwrites
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(final.parent)
        return card, card_bytes

    def uncommitted(self, ref: ModelRef) -> None:
        shutil.rmtree(self.folder(ref), ignore_errors=True)

    def card_json(self, ref: ModelRef, sha256: str) -> bytes:
        return (self.folder(ref) / CARD_JSON).read_bytes()

    def problems(self, card: ModelCard, sha256: str) -> list[str]:
        folder = self.folder(card.ref)
        problems: list[str] = []
        present = {p.name: p for p in folder.iterdir()}
        for fn, digest in sorted(card.artifact_sha256.items()):
            p = present.get(fn)
            if p is None:
                problems.append(f"{fn} is missing")
            elif p.is_symlink() or not p.is_file():
                problems.append(f"{fn} is not a regular file")
            elif _sha256_file(p) != digest:
                problems.append(f"{fn} changed (sha256 differs from the card)")
        for fn in sorted(set(present) - set(card.artifact_sha256) - _RESERVED_FILES):
            problems.append(f"{fn} is not part of the registered model")
        md = present.get(CARD_MD)
        text = None if md is None or md.is_symlink() else md.read_text(encoding="utf-8")
        return problems + _md_problems(card, text)

    def holds(self, card: ModelCard, fn: str) -> bool:
        return (self.folder(card.ref) / fn).exists()

    def read(self, card: ModelCard, fn: str) -> bytes:
        return (self.folder(card.ref) / fn).read_bytes()

    def rewrite(self, ref: ModelRef, data: bytes, md: bytes, commit: Callable[[], None]) -> None:
        folder = self.folder(ref)
        old_json, old_md = (folder / CARD_JSON).read_bytes(), (folder / CARD_MD).read_bytes()
        try:
            _replace(folder / CARD_MD, md)
            _replace(folder / CARD_JSON, data)
            commit()
        except BaseException:
            _replace(folder / CARD_JSON, old_json)
            _replace(folder / CARD_MD, old_md)
            raise


class _BucketVersions(_Versions):
    """``s3://bucket/prefix/models/<name>/<version>/`` (see the module docstring): numbered by a
    conditional put of ``.claim``, artifacts before the card, card revisions never overwritten,
    artifacts read through a verified cache in ``cache`` (a folder of this machine)."""

    shared = True
    attempts = _REVISE_ATTEMPTS
    reserved = frozenset({CARDS})

    def __init__(self, uri: str, cache: Path) -> None:
        from governance.objectstore import ObjectPrefix

        self.store = ObjectPrefix(uri)
        self.cache = cache

    @property
    def root(self) -> str:
        return self.store.uri

    def exists(self) -> bool:
        return self.store.exists()

    def locked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()  # machines do not share a lock: claims and snapshots order them

    def folder(self, ref: ModelRef) -> Path:
        raise RegistryError(f"{ref} is kept in the bucket ({self.uri(ref)}), not in a local folder",
                            hint="use Registry.uri(ref) for its location, Registry.load(ref) to read it")

    def uri(self, ref: ModelRef) -> str:
        return self.store.uri_of(f"{ref.name}/{ref.version}")

    def _cached(self, ref: ModelRef, fn: str) -> Path:
        return self.cache / ref.name / str(ref.version) / fn

    def create(self, name: str, known: list[int], blobs: Mapping[str, bytes | Path], make: _MakeCard,
               at: datetime) -> tuple[ModelCard, bytes]:
        claimed = [int(v) for v in self.store.folders(name) if v.isdigit()]
        version = max([*known, *claimed], default=0) + 1
        claim = json.dumps({"claim": uuid.uuid4().hex, "claimed_at": _ts(at)}, sort_keys=True).encode()
        for _ in range(_CLAIM_ATTEMPTS):
            if self.store.put(f"{name}/{version}/{CLAIM}", claim, if_absent=True):
                break
            version += 1  # another machine holds this number: the next one
        else:
            raise RegistryError(f"no free version number for '{name}' after {_CLAIM_ATTEMPTS} claims in {self.root}")
        ref = ModelRef(name, version)
        base = f"{name}/{version}"
        try:
            digests = {}
            for fn, src in blobs.items():  # the artifacts first: a card never names a file not yet there
                if isinstance(src, bytes):
                    self.store.put(f"{base}/{fn}", src)
                    digests[fn] = _sha256_bytes(src)
                else:
                    digests[fn] = self.store.upload(f"{base}/{fn}", src)
            card, card_bytes, md = make(version, digests)
            sha = _sha256_bytes(card_bytes)
            self.store.put(f"{base}/{CARDS}/{sha}.md", md)
            self.store.put(f"{base}/{CARDS}/{sha}.json", card_bytes)
        except BaseException:
            self._discard_quietly(ref)
            raise
        return card, card_bytes

    def _discard_quietly(self, ref: ModelRef) -> None:
        """Before any commit was tried: delete the version's objects, its claim too (the number was
        never used, another registration may take it)."""
        try:
            self.store.delete(f"{ref.name}/{ref.version}")
        except Exception:  # noqa: BLE001 - the original error matters; an unlisted orphan does not
            pass

    def uncommitted(self, ref: ModelRef) -> None:
        # Kept: a commit whose answer was lost may have landed, and its row must find its files.
        # Without a row the objects are never listed and the claim keeps the number from reuse.
        pass

    def card_json(self, ref: ModelRef, sha256: str) -> bytes:
        return self.store.get(f"{ref.name}/{ref.version}/{CARDS}/{sha256}.json")

    def problems(self, card: ModelCard, sha256: str) -> list[str]:
        ref = card.ref
        base = f"{ref.name}/{ref.version}"
        listing = self.store.list(base)
        problems: list[str] = []
        for fn, digest in sorted(card.artifact_sha256.items()):
            if fn not in listing:
                problems.append(f"{fn} is missing")
                continue
            cached = self._cached(ref, fn)  # verified here, so load() finds it ready
            try:
                got = self.store.download(f"{base}/{fn}", cached)
            except FileNotFoundError:  # deleted since the listing
                problems.append(f"{fn} is missing")
                continue
            if got != digest:
                cached.unlink(missing_ok=True)
                problems.append(f"{fn} changed (sha256 differs from the card)")
        for key in sorted(set(listing) - set(card.artifact_sha256) - {CLAIM}):
            if not _REVISION.match(key):
                problems.append(f"{key} is not part of the registered model")
        try:
            text: str | None = self.store.get(f"{base}/{CARDS}/{sha256}.md").decode("utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            text = None
        return problems + _md_problems(card, text)

    def holds(self, card: ModelCard, fn: str) -> bool:
        return fn in card.artifact_sha256

    def read(self, card: ModelCard, fn: str) -> bytes:
        """The artifact from this machine's cache when it matches the card's sha256, else downloaded
        (into the cache) and checked: the bytes returned are always the registered ones."""
        ref = card.ref
        digest = card.artifact_sha256.get(fn)
        if digest is None:
            raise _tampered(ref, [f"{fn} is not part of the registered model"])
        cached = self._cached(ref, fn)
        if cached.is_file() and not cached.is_symlink():
            data = cached.read_bytes()
            if _sha256_bytes(data) == digest:
                return data
        try:
            self.store.download(f"{ref.name}/{ref.version}/{fn}", cached)
        except FileNotFoundError:
            raise _tampered(ref, [f"{fn} is missing"]) from None
        data = cached.read_bytes()
        if _sha256_bytes(data) != digest:
            cached.unlink(missing_ok=True)
            raise _tampered(ref, [f"{fn} changed (sha256 differs from the card)"])
        return data

    def rewrite(self, ref: ModelRef, data: bytes, md: bytes, commit: Callable[[], None]) -> None:
        # A new revision beside the old ones, never over them: a machine whose commit loses leaves
        # an unreferenced revision (no reader opens it), never a card that differs from its row.
        base = f"{ref.name}/{ref.version}/{CARDS}/{_sha256_bytes(data)}"
        self.store.put(f"{base}.md", md)
        self.store.put(f"{base}.json", data)
        commit()


def _versions(ws: Workspace) -> _Versions:
    """Where ``ws`` keeps model versions: in the bucket when its storage root is an object store."""
    uri = ws.config.table_uri("models")
    if "://" in uri and not uri.startswith("file://"):  # objectstore (and pyarrow) only for a remote root
        from governance.objectstore import is_remote

        if is_remote(uri):
            return _BucketVersions(uri, ws.config.workspace_dir / "cache" / "models")
    return _LocalVersions(ws.config.workspace_dir / "models")


def _fairness_problems(card: ModelCard, pol: DatasetPolicy) -> list[str]:
    """Why the card's fairness does not allow an approval (empty: it does)."""
    f = card.fairness
    if f is None:
        if pol.fairness is not None:
            return [f"the card has no fairness evaluation, which the policy of '{card.dataset}' requires"]
        return []
    if f.passed is True:
        return []
    return list(f.failures) or ["the fairness evaluation has no verdict"]


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadedModel:
    """A registered version ready to score (see :meth:`Registry.load`)."""

    card: ModelCard
    encoder: "Encoder"  # the feature encoder fit at training (training.encode.Encoder)
    model: Any  # the torch module, in eval mode
    threshold: float  # the score above which the model predicts the positive (unfavourable) label
    profile: Profile | None  # the drift profile; None for a model trained before profiles were stored

    @property
    def ref(self) -> ModelRef:
        return self.card.ref

    def predict_proba(self, X: Any) -> Any:
        """Scores (probability of the positive label) of encoded rows ``X`` (a float32 matrix)."""
        import numpy as np
        import torch

        with torch.no_grad():  # as training.trainer.predict_proba scores
            return torch.sigmoid(self.model(torch.from_numpy(np.asarray(X, np.float32))).squeeze(-1)).numpy()


# --------------------------------------------------------------------------- the registry


class Registry:
    """Versioned models of one workspace: register, read, verify, approve, record deployments.

    Args:
        ws: the workspace (gate, audit, lineage, paths).
        clock: returns the current time as an aware ``datetime`` (inject in tests).
    """

    def __init__(self, ws: Workspace, *, clock: Callable[[], datetime] | None = None) -> None:
        self.ws = ws
        self._files = _versions(ws)
        self.root: Path | str = self._files.root
        """Where the versions' files are: ``<workspace>/models``, or ``<storage root>/models`` in the bucket."""
        self.table_uri = ws.config.table_uri(REGISTRY_TABLE)
        self._clock = clock or (lambda: datetime.now(timezone.utc))
        self._storage_options = dict(ws.config.storage.options) or None

    def __repr__(self) -> str:
        return f"Registry({self.root})"

    # -- writing ---------------------------------------------------------------------------
    def register(
        self,
        actor: Actor,
        *,
        name: str,
        dataset: str,
        files: Mapping[str, bytes | os.PathLike[str]],
        card_fields: Mapping[str, Any],
    ) -> ModelRef:
        """Register the next version of ``name``: artifacts, card, registry row, lineage, audit.

        Args:
            actor: who registers; the gate's ``register`` stage decides (with ``dataset``).
            name: the model name (lower_snake_case).
            dataset: the dataset the model was trained on (its policy governs approval and deployment).
            files: artifact file name -> bytes, or -> a path whose file is copied.
            card_fields: the trainer's part of the :class:`ModelCard` (purpose, features, label,
                data_versions, privacy, utility, fairness, mitigation, lineage_run_ids,
                gate_decisions, preprocessing). Without a fairness verdict (``passed``) the
                registry judges the metrics by the dataset policy's thresholds. ``privacy.cost``
                names the build and its released run (``{"build": id, "released_run": run_id}``);
                the registry fills in its runs, ε and δ from the privacy ledger.

        Returns:
            The new version's :class:`ModelRef` (version = highest so far + 1; in a bucket, the
            first number above it that no machine has claimed).

        Raises:
            AccessDenied: the gate denied ``register``.
            ValueError / TypeError: bad names or file names, invalid or personal card fields,
                a purpose the dataset does not declare, a "passed" verdict that the policy's
                thresholds contradict, a build the ledger does not know (or of another dataset),
                an ε that is not the ledger's for the released run.
        """
        _check_name(name, "model name")
        _check_name(dataset, "dataset name")
        decision = self.ws.gate.enforce(Stage.REGISTER, actor, Resource.model(name), {"dataset": dataset})
        blobs = _check_files(files)
        for fn in blobs:
            _refuse_personal(fn, "an artifact file name")
            if fn.lower() in self._files.reserved:
                raise ValueError(f"artifact file name {fn!r} is reserved for the card's revisions in {self.root}")
        if not isinstance(card_fields, Mapping):
            raise TypeError(f"card_fields must be a mapping, got {type(card_fields).__name__}")
        owned = sorted(_OWNED & set(card_fields))
        if owned:
            raise ValueError(f"card field(s) {', '.join(owned)} are set by the registry, not by the caller")
        pol = self.ws.policies.dataset(dataset)
        fields = self._with_privacy_cost(dict(card_fields), dataset)
        purpose = fields.get("purpose")
        if isinstance(purpose, str) and purpose not in pol.purposes:
            raise ValueError(
                f"purpose {purpose!r} is not declared by dataset '{dataset}' (declared: {', '.join(sorted(pol.purposes))})"
            )

        from openlineage.client.uuid import generate_new_uuid  # as the lineage store does: UUIDv7

        at = self._now()
        run_id = str(generate_new_uuid(at))
        try:
            draft = ModelCard.model_validate(
                {
                    **fields,
                    "name": name,
                    "version": 1,
                    "dataset": dataset,
                    "created_at": at,
                    "created_by": actor.name,
                    "lineage_run_ids": [*fields.get("lineage_run_ids", ()), run_id],
                    "gate_decisions": [*fields.get("gate_decisions", ()), decision],
                }
            )
        except ValidationError as exc:
            raise ValueError(_validation_message(exc)) from None
        dumped = draft.model_dump(mode="json")
        _refuse_personal({k: dumped[k] for k in fields if k not in _NOT_SCANNED and k in dumped}, "card field")
        draft = self._judge_fairness(draft, pol)

        def make(version: int, digests: dict[str, str]) -> tuple[ModelCard, bytes, bytes]:
            card = draft.model_copy(update={"version": version, "artifact_sha256": digests})
            return card, card.to_json().encode(), card.to_markdown().encode()

        with self._locked():
            known = [v for (n, v) in self._latest() if n == name]
            card, card_bytes = self._files.create(name, known, blobs, make, at)
            version, ref, digests = card.version, card.ref, card.artifact_sha256
            try:
                self._append(card, actor.name, at, card_bytes)
            except BaseException:
                self._files.uncommitted(ref)  # the row is the commit point
                raise

        from governance.lineage import DatasetRef  # openlineage costs ~0.3 s to import: only where it is used

        self.ws.lineage.emit(
            f"register.{name}",
            inputs=[DatasetRef(t, version=v) for t, v in sorted(card.data_versions.items())],
            outputs=[DatasetRef(f"model:{name}", version=version, kind="model")],
            run_id=run_id,
            facets={"dataset": dataset, "card_sha256": _sha256_bytes(card_bytes)},
        )
        self.ws.audit.record(
            "registry.register",
            actor=actor.name,
            outcome="ok",
            stage=Stage.REGISTER.value,
            resource=str(Resource.model(name, version)),
            rule_ids=decision.rule_ids,
            details={
                "dataset": dataset,
                "card_sha256": _sha256_bytes(card_bytes),
                "files": sorted(digests),
                "epsilon": card.privacy.epsilon,
                "fairness_passed": card.fairness.passed if card.fairness else None,
            },
        )
        return ref

    def approve(self, actor: Actor, ref: ModelRef | str, *, override_reason: str | None = None) -> ModelCard:
        """Record ``actor``'s approval of a version, in the card and the registry table.

        The gate's ``approve`` stage decides who (a role among the dataset policy's
        ``deployment.approvers``). A version whose fairness verdict failed — or that has no
        fairness evaluation while the policy requires one — is refused unless
        ``override_reason`` says why; the reason is recorded in the approval and the audit log.

        Returns:
            The updated card.

        Raises:
            AccessDenied: the gate denied ``approve``.
            ApprovalRefused: failed fairness and no ``override_reason``.
            RegistryError: ``actor`` already approved this version.
            ModelNotFound / ArtifactTampered: as :meth:`card`.
            ValueError: an empty or personal ``override_reason``.
        """
        self.ws.gate.require_stage(Stage.APPROVE, actor, Resource.model(model_name(ref)))
        if override_reason is not None:
            if not isinstance(override_reason, str) or not override_reason.strip():
                raise ValueError("override_reason must be a sentence saying why the fairness failure is accepted")
            override_reason = _line(override_reason.strip())
            _refuse_personal(override_reason, "override_reason")
        with self._locked():
            for _ in self._attempts(f"approving {ref}"):
                snap = self._table()  # the card is read from this snapshot, and its revision committed on it
                card = self._card(ref, snap)
                ref = card.ref
                resource = Resource.model(ref.name, ref.version)
                decision = self.ws.gate.enforce(Stage.APPROVE, actor, resource, {"dataset": card.dataset})
                pol = self.ws.policies.dataset(card.dataset)
                # The gate allowed, so one of the actor's roles is an approver of the dataset.
                role = next((r for r in decision.actor.roles if r in pol.deployment.approvers), "")
                if any(a.actor == actor.name for a in card.approvals):
                    raise RegistryError(f"{actor.name} has already approved {ref}")
                failures = _fairness_problems(card, pol)
                if failures and override_reason is None:
                    self.ws.audit.record(
                        "registry.approve", actor=actor.name, outcome="refused", stage=Stage.APPROVE.value,
                        resource=str(resource), details={"dataset": card.dataset, "failures": failures},
                    )
                    self.ws.audit.flush()
                    raise ApprovalRefused(
                        f"{ref} failed its fairness evaluation: {'; '.join(failures)}",
                        failures=failures,
                        hint="fix the model, or approve with override_reason='...' (recorded in the card and the audit log)",
                    )
                at = self._now(ref, snap)
                new = card.model_copy(
                    update={
                        "approvals": [*card.approvals, Approval(actor=actor.name, role=role, at=at, override_reason=override_reason)],
                        "gate_decisions": [*card.gate_decisions, GateRecord.model_validate(decision)],
                        "status": "deployed" if card.status == "deployed" else "approved",
                    }
                )
                try:
                    card_bytes = self._rewrite(new, actor.name, at, snap)
                except _Moved:
                    continue  # another machine changed this version meanwhile: read it again
                break
        self.ws.audit.record(
            "registry.approve", actor=actor.name, outcome="ok", stage=Stage.APPROVE.value,
            resource=str(resource), rule_ids=decision.rule_ids,
            details={
                "dataset": card.dataset, "role": role, "card_sha256": _sha256_bytes(card_bytes),
                **({"override_reason": override_reason, "failures": failures} if override_reason else {}),
            },
        )
        return new

    def mark_deployed(
        self, actor: Actor, ref: ModelRef | str, target: str, *, decision: Decision | None = None
    ) -> ModelCard:
        """Record that ``actor`` deployed the version to ``target`` (status ``deployed``).

        The deploy decision is the caller's (``ws.gate.enforce("deploy", ..., deploy_context(ref))``);
        pass it as ``decision`` to keep it in the card's ``gate_decisions``.

        Raises:
            ValueError: empty/personal ``target``; a ``decision`` that is not an allowed
                deploy decision on this version.
            ModelNotFound / ArtifactTampered: as :meth:`card`.
        """
        if not isinstance(target, str) or not target.strip() or len(target) > 512 or _CONTROL.search(target):
            raise ValueError("target must name where the model runs (one line, at most 512 characters)")
        _refuse_personal(target, "target")
        with self._locked():
            for _ in self._attempts(f"recording the deployment of {ref}"):
                snap = self._table()
                card = self._card(ref, snap)
                ref = card.ref
                if decision is not None:
                    res = decision.resource
                    if not (
                        decision.allowed
                        and decision.stage is Stage.DEPLOY
                        and res.kind == "model"
                        and res.name == ref.name
                        and res.version in (None, ref.version)
                    ):
                        raise ValueError(f"decision must be an allowed deploy decision on {ref}, got {decision.stage.value} "
                                         f"on {res} (allowed={decision.allowed})")
                at = self._now(ref, snap)
                gates = [*card.gate_decisions] + ([GateRecord.model_validate(decision)] if decision is not None else [])
                new = card.model_copy(
                    update={
                        "deployments": [*card.deployments, Deployment(actor=actor.name, target=target, at=at)],
                        "gate_decisions": gates,
                        "status": "deployed",
                    }
                )
                try:
                    card_bytes = self._rewrite(new, actor.name, at, snap)
                except _Moved:
                    continue
                break
        self.ws.audit.record(
            "registry.deploy", actor=actor.name, outcome="ok", stage=Stage.DEPLOY.value,
            resource=str(Resource.model(card.ref.name, card.ref.version)),
            rule_ids=decision.rule_ids if decision is not None else (),
            details={"dataset": card.dataset, "target": target, "card_sha256": _sha256_bytes(card_bytes)},
        )
        return new

    # -- reading ---------------------------------------------------------------------------
    def list(self, name: str | None = None) -> list[ModelCard]:  # noqa: A003  (the registry's verb)
        """Every version's card (its latest status), ordered by name and version; one model's with ``name``.

        Raises:
            ArtifactTampered: a card.json differs from its registry row.
        """
        if name is not None:
            _check_name(name, "model name")
        latest = self._latest()
        keys = sorted(k for k in latest if name is None or k[0] == name)
        return [self._load(ModelRef(*k), latest[k]) for k in keys]

    def card(self, ref_or_name: ModelRef | str, version: int | None = None) -> ModelCard:
        """The card of a version: a :class:`ModelRef`, ``"name@version"``, or a name (latest version
        unless ``version`` is given). ``card.json`` is checked against the registry table.

        Raises:
            ModelNotFound: unknown name or version.
            ArtifactTampered: card.json is missing or differs from the latest registry row.
        """
        ref, row = self._resolve(ref_or_name, version)
        return self._load(ref, row)

    def path(self, ref: ModelRef | str) -> Path:
        """The folder of a registered version (``<workspace>/models/<name>/<version>``).

        Raises:
            RegistryError: the registry keeps its versions in a bucket (see :meth:`uri`).
        """
        resolved, _ = self._resolve(ref, None)
        return self._files.folder(resolved)

    def uri(self, ref: ModelRef | str) -> str:
        """Where a registered version's files are: its local folder, or its ``s3://`` prefix in the
        bucket (what a KServe ``storageUri`` names)."""
        resolved, _ = self._resolve(ref, None)
        return self._files.uri(resolved)

    @property
    def in_bucket(self) -> bool:
        """Whether the versions are kept in the storage root's bucket (every machine reads them)."""
        return self._files.shared

    def has_models(self) -> bool:
        """Whether any version's files were ever stored here (cheap: no registry table read)."""
        return self._files.exists()

    def verify(self, ref: ModelRef | str) -> ModelCard:
        """Recompute every artifact's sha256 and check card.json and card.md; return the card.

        Raises:
            ArtifactTampered: a file changed, went missing, or appeared; card.json differs from
                the registry table; card.md differs from the card.
            ModelNotFound: unknown name or version.
        """
        resolved, row = self._resolve(ref, None)
        card = self._load(resolved, row)
        problems = self._files.problems(card, row["card_sha256"])
        if problems:
            raise _tampered(card.ref, problems)
        return card

    def artifact(self, ref: ModelRef | str, fn: str) -> bytes:
        """The bytes of one artifact of a version, checked against the card's sha256 (from a bucket,
        through this machine's cache).

        Raises:
            ValueError: ``fn`` is not one of the version's artifacts.
            ArtifactTampered: the stored bytes differ from what was registered.
            ModelNotFound: unknown name or version.
        """
        card = self.card(ref)
        if fn not in card.artifact_sha256:
            raise ValueError(f"{fn!r} is not an artifact of {card.ref} (artifacts: {', '.join(sorted(card.artifact_sha256))})")
        try:
            data = self._files.read(card, fn)
        except FileNotFoundError:
            raise _tampered(card.ref, [f"{fn} is missing"]) from None
        if _sha256_bytes(data) != card.artifact_sha256[fn]:
            raise _tampered(card.ref, [f"{fn} changed (sha256 differs from the card)"])
        return data

    def load(self, ref: ModelRef | str, *, verify: bool = True) -> "LoadedModel":
        """A registered version ready to score: card, feature encoder, torch model, threshold, drift profile.

        Serving loads models only through this (and :meth:`profile`), never from the training
        modules or the files directly. The artifacts are verified first unless ``verify=False``
        (for a caller that has just verified them). From a bucket, the artifacts are read through
        this machine's cache and checked against the card's sha256 either way.

        Raises:
            ArtifactTampered: a file differs from what was registered (with ``verify``).
            ModelNotFound: unknown name or version.
            RegistryError: the card has no preprocessing to score with (encoder, features, layers).

        Example::

            m = Registry(ws).load("credit@1")
            scores = m.predict_proba(m.encoder.transform(rows))
        """
        from training.encode import Encoder
        from training.trainer import load_model

        card = self.verify(ref) if verify else self.card(ref)
        pre = card.preprocessing or {}
        missing = [k for k in ("encoder", "n_features", "hidden") if k not in pre]
        if missing:
            raise RegistryError(f"{card.ref} cannot be scored: its card's preprocessing lacks {', '.join(missing)}",
                                hint="re-register it from a trained model (lakewarden train)")
        model = load_model(self._files.read(card, MODEL_FILE), pre["n_features"], tuple(pre["hidden"]))
        return LoadedModel(card=card, encoder=Encoder.from_dict(pre["encoder"]), model=model,
                           threshold=float(pre.get("threshold", 0.5)), profile=self._profile(card))

    def profile(self, ref: ModelRef | str) -> Profile | None:
        """The drift profile stored with a version (bin shares of its training data); ``None``
        for a model trained before profiles were stored. Needs no torch."""
        return self._profile(self.card(ref))

    def _profile(self, card: ModelCard) -> Profile | None:
        from training.profile import Profile

        if not self._files.holds(card, PROFILE_FILE):
            return None
        return Profile.from_json(self._files.read(card, PROFILE_FILE).decode())

    def deploy_context(self, ref: ModelRef | str, *, verify: bool = True) -> dict[str, Any]:
        """The exact context ``Stage.DEPLOY`` reads: ``{"dataset", "epsilon", "fairness", "approvals"}``.

        ``fairness`` is the per-attribute dict; ``approvals`` carry actors only (the gate looks
        their roles up in the policy). The artifacts are verified first unless ``verify=False``.
        """
        card = self.verify(ref) if verify else self.card(ref)
        return card.deploy_context()

    # -- internals -------------------------------------------------------------------------
    def _with_privacy_cost(self, fields: dict[str, Any], dataset: str) -> dict[str, Any]:
        """``fields`` with ``privacy.cost`` filled from the privacy ledger (build and released run given)."""
        from governance.ledger import PrivacyLedger

        priv = fields.get("privacy")
        if not isinstance(priv, Mapping) or priv.get("cost") is None:
            return fields
        given = priv["cost"]
        if isinstance(given, PrivacyCost):
            given = {"build": given.build, "released_run": given.released_run}
        if not isinstance(given, Mapping) or set(given) != {"build", "released_run"}:
            raise ValueError("privacy.cost names the build and its released run ({'build': ..., 'released_run': ...}); "
                             "its runs, ε and δ come from the privacy ledger")
        build, released = given["build"], given["released_run"]
        if not isinstance(build, str) or not re.match(r"^[0-9a-f]{32}$", build):
            raise ValueError(f"privacy.cost.build must be a build id (32 hex digits), got {build!r}")
        spent = PrivacyLedger(self.ws).build_cost(build)
        if not spent.runs:
            raise ValueError(f"privacy.cost.build {build} has no runs in the privacy ledger")
        if spent.dataset != dataset:
            raise ValueError(f"privacy.cost.build {build} spent the budget of '{spent.dataset}', not of '{dataset}'")
        if released not in {r.run_id for r in spent.runs}:
            raise ValueError(f"privacy.cost.released_run {released!r} is not a run of build {build} in the privacy ledger")
        cost = {
            "build": build, "released_run": released, "epsilon": spent.epsilon, "delta": spent.delta,
            "runs": [{"run": r.run_id, "epsilon": r.epsilon, "delta": r.delta, "state": r.state} for r in spent.runs],
        }
        return {**fields, "privacy": {**priv, "cost": cost}}

    def _locked(self) -> contextlib.AbstractContextManager[None]:
        return self._files.locked()

    def _attempts(self, what: str) -> Iterator[int]:
        """Tries of a card revision: one on a local folder; in a bucket, again (after a short random
        wait) each time another machine committed an event of the version first."""
        n = self._files.attempts
        for attempt in range(n):
            if attempt:
                time.sleep(min(0.5, 0.02 * 2 ** attempt) * (0.5 + int.from_bytes(os.urandom(1), "big") / 255))
            yield attempt
        raise RegistryError(f"{what}: other machines changed that version {n} times in a row", hint="try again")

    def _table(self) -> DeltaTable | None:
        """The registry table's current snapshot (``None``: no model was ever registered)."""
        try:
            if not DeltaTable.is_deltatable(self.table_uri, storage_options=self._storage_options):
                return None
            return DeltaTable(self.table_uri, storage_options=self._storage_options)
        except DeltaError as exc:
            raise RegistryError(f"cannot read the model registry table {self.table_uri}: {exc}") from exc

    def _rows(self, snap: DeltaTable | None = None) -> list[dict[str, Any]]:
        """The rows of ``snap``, or of the table's current snapshot."""
        try:
            if snap is None:
                snap = self._table()
            return [] if snap is None else _read_rows(snap)
        except DeltaError as exc:
            raise RegistryError(f"cannot read the model registry table {self.table_uri}: {exc}") from exc

    def _latest(self, snap: DeltaTable | None = None) -> dict[tuple[str, int], dict[str, Any]]:
        """The latest row of every (name, version); ``at`` increases strictly per version."""
        latest: dict[tuple[str, int], dict[str, Any]] = {}
        for r in sorted(self._rows(snap), key=lambda r: r["at"]):
            latest[(r["name"], r["version"])] = r
        return latest

    def _card(self, ref: ModelRef | str, snap: DeltaTable | None) -> ModelCard:
        """:meth:`card` as of the snapshot ``snap``."""
        resolved, row = self._resolve(ref, None, snap)
        return self._load(resolved, row)

    def _append(self, card: ModelCard, actor: str, at: datetime, card_bytes: bytes,
                on: DeltaTable | None = None) -> None:
        """Commit the event's row; ``on``: on that snapshot, with the version's application
        transaction, so that a commit of another event of the same version since then wins and
        this one raises :class:`_Moved` (used where machines share the registry)."""
        row = {
            "name": card.name,
            "version": card.version,
            "dataset": card.dataset,
            "status": card.status,
            "actor": actor,
            "at": at,
            "card_sha256": _sha256_bytes(card_bytes),
        }
        import pyarrow as pa

        props: dict[str, Any] = {}
        if on is not None:
            micros = (at - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(microseconds=1)
            props["app_transactions"] = [Transaction(app_id=f"lakewarden.registry.{card.ref}", version=micros)]
        try:
            write_deltalake(
                self.table_uri if on is None else on,
                pa.Table.from_pylist([row], schema=_schema()),
                mode="append",
                name="lakewarden_model_registry",
                description="Model registry events (no personal data)",
                configuration={"delta.appendOnly": "true"},
                storage_options=self._storage_options,
                commit_properties=CommitProperties(
                    custom_metadata={"lakewarden.operation": f"registry.{card.status}", "lakewarden.model": str(card.ref)},
                    **props,
                ),
            )
        except CommitFailedError:
            if on is None:
                raise
            raise _Moved(str(card.ref)) from None
        except DeltaError as exc:
            raise RegistryError(f"cannot append to the model registry table {self.table_uri}: {exc}") from exc

    def _now(self, ref: ModelRef | None = None, snap: DeltaTable | None = None) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the registry clock must return an aware datetime")
        now = now.astimezone(timezone.utc)
        if ref is not None:  # events of one version get strictly increasing times: the last row is the latest
            row = self._latest(snap).get((ref.name, ref.version))
            if row is not None and now <= row["at"]:
                now = row["at"] + timedelta(microseconds=1)
        return now

    def _resolve(self, ref_or_name: ModelRef | str, version: int | None,
                 snap: DeltaTable | None = None) -> tuple[ModelRef, dict[str, Any]]:
        if isinstance(ref_or_name, ModelRef):
            if version is not None and version != ref_or_name.version:
                raise ValueError(f"{ref_or_name} names version {ref_or_name.version}, not {version}")
            name, version = ref_or_name.name, ref_or_name.version
        elif isinstance(ref_or_name, str) and "@" in ref_or_name:
            parsed = ModelRef.parse(ref_or_name)
            name, version = parsed.name, parsed.version if version is None else version
        else:
            name = _check_name(ref_or_name, "model name")
        latest = self._latest(snap)
        versions = sorted(v for (n, v) in latest if n == name)
        if not versions:
            known = sorted({n for n, _ in latest})
            raise ModelNotFound(
                f"no model named '{name}' in the registry (known: {', '.join(known) or 'none'})",
                hint="register it first",
            )
        if version is None:
            version = versions[-1]
        elif version not in versions:
            raise ModelNotFound(
                f"model '{name}' has no version {version} (versions: {', '.join(map(str, versions))})"
            )
        return ModelRef(name, version), latest[(name, version)]

    def _load(self, ref: ModelRef, row: Mapping[str, Any]) -> ModelCard:
        try:
            data = self._files.card_json(ref, row["card_sha256"])
        except FileNotFoundError:
            raise ArtifactTampered(f"{ref}: {CARD_JSON} is missing", ref=str(ref), problems=[f"{CARD_JSON} is missing"]) from None
        if _sha256_bytes(data) != row["card_sha256"]:
            problem = f"{CARD_JSON} differs from the registry table (changed outside the registry)"
            raise ArtifactTampered(f"{ref}: {problem}", ref=str(ref), problems=[problem])
        card = ModelCard.from_json(data)
        if card.ref != ref or card.status != row["status"]:
            problem = f"{CARD_JSON} describes {card.ref} ({card.status}), the registry {ref} ({row['status']})"
            raise ArtifactTampered(f"{ref}: {problem}", ref=str(ref), problems=[problem])
        return card

    def _rewrite(self, new: ModelCard, actor: str, at: datetime, snap: DeltaTable | None = None) -> bytes:
        """Store the card's new revision, then commit its row: locally card.md and card.json are
        replaced (each atomically) and restored if the row fails; in a bucket the revision is a new
        object and the row commits on ``snap`` (:class:`_Moved` when another machine was first)."""
        data = new.to_json().encode()
        on = snap if self._files.shared else None
        self._files.rewrite(new.ref, data, new.to_markdown().encode(),
                            lambda: self._append(new, actor, at, data, on=on))
        return data

    def _judge_fairness(self, card: ModelCard, pol: DatasetPolicy) -> ModelCard:
        """Fill the policy's thresholds and, when the card has no verdict, judge by them.

        A card that says "passed" while its metrics break the policy's thresholds is refused.
        """
        f = card.fairness
        if f is None or pol.fairness is None:
            return card
        from governance.fairness import judge as judge_fairness
        from governance.fairness import thresholds as fairness_thresholds

        thresholds = f.thresholds or fairness_thresholds(pol)
        computed = judge_fairness(thresholds, f.attributes, pol.fairness.sensitive_attributes,
                                  dataset=card.dataset).failures
        if f.passed is True and computed:
            raise ValueError(
                f"fairness says passed, but by the thresholds of '{card.dataset}': {'; '.join(computed)}"
            )
        update: dict[str, Any] = {"thresholds": thresholds}
        if f.passed is None:
            update |= {"passed": not computed, "failures": computed}
        return card.model_copy(update={"fairness": f.model_copy(update=update)})
