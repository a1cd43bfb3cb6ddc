"""The reference pipeline's parameters: params.yaml, validated with the line of every mistake."""

from __future__ import annotations

import re

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationInfo, field_validator, model_validator

from governance._files import FieldError, validate_file
from governance.errors import ConfigError, LakewardenError
from governance.workspace import Workspace


PARAMS = Path("params.yaml")
OUT = Path("pipeline")
REPORTS = Path("reports")
SYNTHETIC = "synthetic"


class PipelineError(LakewardenError):
    exit_code = 2


# -- params.yaml ---------------------------------------------------------------------------

class _P(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyntheticParams(_P):
    """The generator's knobs, for datasets whose source is ``synthetic`` (fictional people)."""

    people: int = Field(20_000, ge=10)
    transactions_per_person: float = Field(5.0, ge=0)
    bad_rows: float = Field(0.01, ge=0, le=0.5)
    bias: float = Field(0.2, ge=0, le=1)
    seed: int = Field(7, ge=0)
    landing: str = ".lakewarden/landing"


class TrainParams(_P):
    model: str = "credit"
    purpose: str = "credit_scoring"
    features: list[str] = Field(min_length=1)
    label: str = "defaulted"
    epsilon: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(512, ge=1)
    learning_rate: float = Field(0.002, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    hidden: list[int] = Field(default_factory=lambda: [64, 64])
    holdout: float = Field(0.2, gt=0, lt=1)
    mitigation: Literal["none", "reweighing"] = "reweighing"
    seed: int = 0


class DeployParams(_P):
    smoke_requests: int = Field(20, ge=1, le=10_000)
    manifests: str = "pipeline/deploy"


GLOB_CHARS = set("*?[")
KAFKA = re.compile(r"^kafka:(?://(?P<bootstrap>[^/\s]+)/)?(?P<topic>[A-Za-z0-9._-]{1,249})$")
"""A stream source: ``kafka:TOPIC`` (brokers from lakewarden.yaml) or ``kafka://HOST:PORT/TOPIC``."""


def kafka_source(spec: object) -> tuple[str | None, str] | None:
    """``(bootstrap or None, topic)`` when ``spec`` names a Kafka topic, else None."""
    m = KAFKA.match(spec) if isinstance(spec, str) else None
    return (m.group("bootstrap"), m.group("topic")) if m else None


def _check_pattern(pattern: str) -> None:
    """A file or glob: not empty, and a file type ingest reads when its name says one."""
    if not pattern.strip():
        raise ValueError("a source is a file or glob such as 'data/applicants*.csv', not an empty string")
    name, suffix = Path(pattern).name, Path(pattern).suffix
    if GLOB_CHARS & set(suffix) or (not suffix and GLOB_CHARS & set(name)):
        return  # e.g. 'data/*': each matched file's type is checked by the sources stage
    from lakehouse.readers import detect_format

    detect_format(Path(pattern))  # IngestError naming the type and the readable ones


class Params(_P):
    """params.yaml: each dataset's source, the generator, training and deployment.

    ``sources`` maps each governed dataset to ``synthetic`` (the fictional generator, for the
    datasets it writes) or to a file or glob of CSV, Parquet or JSON Lines files (or a list of
    them), relative to the params file's folder. Validated with the workspace's policies as
    context (:func:`load_params`): every dataset has a policy, the training features read one of
    them, and the label is a column of it.
    """

    sources: dict[str, str | list[str]] = Field(min_length=1)
    synthetic: SyntheticParams = SyntheticParams()
    engine: Literal["local", "ray"] = "local"  # ingest and silver: ray runs their work on $RAY_ADDRESS (docs/scale-out.md)
    train: TrainParams
    deploy: DeployParams = DeployParams()
    _path: Path = PrivateAttr(default=PARAMS)

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "data" in data:
            raise FieldError(("data",), "'data:' is now 'synthetic:' (the generator's knobs), and 'sources:' names "
                                        "each dataset's source (e.g. sources: {my_dataset: 'data/my_dataset*.csv'}); "
                                        "see docs/your-own-data.md")
        return data

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: dict[str, str | list[str]], info: ValidationInfo) -> dict[str, str | list[str]]:
        from lakehouse.errors import IngestError
        from lakehouse.synth import DATASETS as GENERATED

        known = (info.context or {}).get("datasets")
        for ds, spec in v.items():
            if known is not None and ds not in known:
                raise FieldError((ds,), f"no policy governs dataset '{ds}': write one (kind: dataset, dataset: {ds}) "
                                        f"under policies/ — `lakewarden policy suggest FILE` drafts it from a sample "
                                        f"(policies govern: {', '.join(sorted(known)) or 'none'})")
            items = [spec] if isinstance(spec, str) else spec
            if not items:
                raise FieldError((ds,), "an empty list: name a file, a glob or 'synthetic'")
            if any(isinstance(i, str) and i.startswith("kafka:") for i in items):
                if len(items) > 1 or kafka_source(items[0]) is None:
                    raise FieldError((ds,), "a stream source is one 'kafka:TOPIC' or 'kafka://HOST:PORT/TOPIC', "
                                            "not one in a list")
                continue
            if SYNTHETIC in items:
                if len(items) > 1:
                    raise FieldError((ds,), "'synthetic' is a source on its own, not one in a list of files")
                if ds not in GENERATED:
                    raise FieldError((ds,), f"the generator writes {', '.join(GENERATED)}, not '{ds}': "
                                            "name its files or a glob instead of 'synthetic'")
                continue
            for i, pattern in enumerate(items):
                try:
                    _check_pattern(pattern)
                except (ValueError, IngestError) as exc:
                    raise FieldError((ds,) if isinstance(spec, str) else (ds, i), str(exc)) from None
        return v

    @model_validator(mode="after")
    def _model_dataset(self, info: ValidationInfo) -> "Params":
        policies = (info.context or {}).get("policies")
        if policies is None:
            return self
        try:
            ds = model_dataset(policies, self.train.features)
        except ValueError as exc:
            raise FieldError(("train", "features"), str(exc)) from None
        if ds not in self.sources:
            raise FieldError(("train", "features"), f"the features read dataset '{ds}', which sources does not name: "
                                                     f"add it (sources: {{{ds}: <file or glob>}})")
        if self.train.label not in policies.dataset(ds).columns:
            raise FieldError(("train", "label"), f"'{self.train.label}' is not a column of dataset '{ds}' "
                                                  "(the dataset the features read)")
        return self

    @property
    def datasets(self) -> list[str]:
        """The pipeline's datasets, in the order params.yaml names them (ingest reads them so)."""
        return list(self.sources)

    @property
    def root(self) -> Path:
        """The folder sources are relative to (params.yaml's, where dvc.yaml is)."""
        return self._path.resolve().parent

    def patterns(self, ds: str) -> list[str]:
        spec = self.sources[ds]
        return [spec] if isinstance(spec, str) else list(spec)

    def synthetic_datasets(self) -> list[str]:
        return [ds for ds in self.sources if self.sources[ds] == SYNTHETIC]


def model_dataset(policies: Any, features: list[str]) -> str:
    """The dataset whose feature views the training features name (one dataset per model)."""
    owners = {view: pol.dataset for pol in policies.datasets.values() for view in pol.features}
    found = set()
    for ref in features:
        view, sep, feat = ref.partition(":")
        if not sep or not feat:
            raise ValueError(f"feature reference {ref!r} must look like view:feature")
        if view not in owners:
            raise ValueError(f"no policy defines feature view '{view}' (views: {', '.join(sorted(owners)) or 'none'})")
        found.add(owners[view])
    if len(found) > 1:
        raise ValueError(f"a model reads one dataset's features (got {', '.join(sorted(found))})")
    return found.pop()


def load_params(path: Path = PARAMS, ws: Workspace | None = None) -> Params:
    """Read and validate the params file; with a workspace, also against its policies."""
    if not path.exists():
        raise PipelineError(f"{path} not found: run from the repository root (where dvc.yaml is)")
    context = None
    if ws is not None:
        pols = ws.policies
        context = {"datasets": set(pols.datasets), "policies": pols}
    params = validate_file(Params, path, error=ConfigError, context=context)
    params._path = path
    return params


def params_error(params: Params, loc: tuple[Any, ...], message: str, **kw: Any) -> ConfigError:
    """A ConfigError about one place in the params file, naming its line."""
    from governance._files import locate, read_yaml

    _, node = read_yaml(params._path)
    field = ".".join(str(p) for p in loc)
    return ConfigError(message, path=str(params._path), field=field, line=locate(node, loc), **kw)


# -- manifests -----------------------------------------------------------------------------
