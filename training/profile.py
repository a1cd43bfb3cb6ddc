"""Drift profiles: what a model's training data looked like, as summaries only.

A profile keeps, per feature, quantile bin edges and the share of training values in each
bin (numeric) or each category's share (categorical) — never raw values, so storing it
beside a differentially private model does not weaken what the model's ε describes. The
Population Stability Index against live traffic is computed from these shares exactly as
from the raw sample. Built at training time, stored with the model (``reference.json``, its historical file name),
read by serving's drift monitor through :meth:`training.registry.Registry.load`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from governance.keys import TOKEN_RE

if TYPE_CHECKING:
    import pyarrow as pa



EPSILON = 1e-4
"""Share given to an empty bin, so that PSI stays finite."""
PROFILE_FORMAT = "lakewarden.drift-reference/1"  # the stored format's name: kept, so older models still load


# -- PSI ----------------------------------------------------------------------------------
def _numeric_values(values: Iterable[Any]) -> np.ndarray:
    """Floats of ``values`` with None and NaN dropped. Raises TypeError for anything not a number."""
    out = []
    for v in values:
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"numeric PSI needs numbers, got {type(v).__name__}")
        out.append(float(v))
    arr = np.asarray(out, dtype=np.float64)
    return arr[~np.isnan(arr)]


def _category(v: Any) -> str:
    """One spelling per category on both sides: booleans as true/false, everything else str()."""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    return v if isinstance(v, str) else str(v)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _psi(ref: np.ndarray, cur: np.ndarray, epsilon: float) -> float:
    r = np.maximum(ref, epsilon)
    c = np.maximum(cur, epsilon)
    return float(np.sum((c - r) * np.log(c / r)))


@dataclass(frozen=True, slots=True)
class NumericProfile:
    """Quantile bins of a numeric baseline sample: interior ``edges`` and each bin's share.

    Bin ``i`` holds ``edges[i-1] <= x < edges[i]``; the first and last bins are open-ended.
    """

    edges: tuple[float, ...]
    shares: tuple[float, ...]
    count: int
    kind: Literal["numeric"] = "numeric"

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.edges) + 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) + 1} shares, got {len(self.shares)}")
        if list(self.edges) != sorted(set(self.edges)):
            raise ValueError("edges must be strictly increasing")
        if self.count < 1:
            raise ValueError("a profile needs at least one value")

    @classmethod
    def from_sample(cls, sample: Iterable[Any], *, bins: int = 10) -> "NumericProfile":
        if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        ref = _numeric_values(sample)
        if ref.size == 0:
            raise ValueError("the profile sample has no values (after dropping None/NaN)")
        cuts = np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1])
        edges = np.unique(cuts)  # ties in the data give equal quantiles: merge those bins
        if edges[-1] == ref.max():
            # Tied values at the top: the last bin [max, inf) would hide a shift upwards. Close
            # it at max, so values above anything seen in training get a bin of their own.
            edges = np.append(edges, np.nextafter(edges[-1], np.inf))
        counts = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1)
        return cls(tuple(float(e) for e in edges), tuple(float(s) for s in counts / ref.size), int(ref.size))

    def counts(self, current: Iterable[Any]) -> np.ndarray:
        cur = _numeric_values(current)
        return np.bincount(np.searchsorted(np.asarray(self.edges), cur, side="right"), minlength=len(self.shares))

    def psi(self, current: Iterable[Any], *, epsilon: float = EPSILON) -> float:
        counts = self.counts(current)
        n = int(counts.sum())
        if n == 0:
            raise ValueError("the current sample has no values (after dropping None/NaN)")
        return _psi(np.asarray(self.shares), counts / n, epsilon)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "numeric", "edges": list(self.edges), "shares": list(self.shares), "count": self.count}


@dataclass(frozen=True, slots=True)
class CategoricalProfile:
    """Each category's share of a categorical baseline sample."""

    shares: Mapping[str, float]
    count: int
    kind: Literal["categorical"] = "categorical"

    def __post_init__(self) -> None:
        if self.count < 1 or not self.shares:
            raise ValueError("a profile needs at least one value")
        object.__setattr__(self, "shares", MappingProxyType(dict(self.shares)))

    @classmethod
    def from_sample(cls, sample: Iterable[Any]) -> "CategoricalProfile":
        counts: dict[str, int] = {}
        for v in sample:
            if not _is_missing(v):
                k = _category(v)
                counts[k] = counts.get(k, 0) + 1
        n = sum(counts.values())
        if n == 0:
            raise ValueError("the profile sample has no values (after dropping None)")
        return cls({k: c / n for k, c in sorted(counts.items())}, n)

    def psi(self, current: Iterable[Any], *, epsilon: float = EPSILON) -> float:
        counts: dict[str, int] = {}
        for v in current:
            if not _is_missing(v):
                k = _category(v)
                counts[k] = counts.get(k, 0) + 1
        n = sum(counts.values())
        if n == 0:
            raise ValueError("the current sample has no values (after dropping None)")
        cats = sorted(set(self.shares) | set(counts))
        ref = np.asarray([self.shares.get(c, 0.0) for c in cats])
        cur = np.asarray([counts.get(c, 0) / n for c in cats])
        return _psi(ref, cur, epsilon)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "categorical", "shares": dict(self.shares), "count": self.count}


def psi(baseline: Iterable[Any], current: Iterable[Any], *, bins: int = 10, epsilon: float = EPSILON) -> float:
    """Population Stability Index of a numeric feature, binned at the baseline's quantiles.

    Args:
        baseline: the training sample (numbers; None and NaN are dropped).
        current: the live sample.
        bins: quantile bins wanted; ties in the baseline merge bins, so there may be fewer.
        epsilon: share used for an empty bin.

    Returns:
        PSI >= 0; 0 for identical samples.

    Raises:
        ValueError: a sample is empty after dropping None/NaN, or ``bins`` < 2.
        TypeError: a value is not a number.

    Example::

        >>> round(psi([1, 2, 3, 4], [1, 2, 3, 4], bins=2), 6)
        0.0
    """
    return NumericProfile.from_sample(baseline, bins=bins).psi(current, epsilon=epsilon)


def psi_categorical(baseline: Iterable[Any], current: Iterable[Any], *, epsilon: float = EPSILON) -> float:
    """Population Stability Index of a categorical feature: one bin per category of either sample.

    A category absent from one side counts with share ``epsilon`` there, so a new category
    raises PSI sharply. None is dropped; booleans read as ``true``/``false``, other values as
    ``str()``.

    Raises:
        ValueError: a sample is empty after dropping None.
    """
    return CategoricalProfile.from_sample(baseline).psi(current, epsilon=epsilon)


# -- profile ------------------------------------------------------------------------------
FeatureProfile = NumericProfile | CategoricalProfile


@dataclass(frozen=True, slots=True)
class Profile:
    """The training data's distribution per feature and of the score, as PSI needs it.

    Build it from samples with :meth:`from_samples` or :meth:`from_table`, store
    :meth:`to_json` with the model, load it back with :meth:`from_json`. Only summaries are
    kept (quantile edges and shares, category shares), never the rows.
    """

    features: Mapping[str, FeatureProfile]
    score: NumericProfile
    bins: int = 10

    def __post_init__(self) -> None:
        for name in self.features:
            if not isinstance(name, str) or not name:
                raise ValueError(f"feature names must be non-empty strings, got {name!r}")
        object.__setattr__(self, "features", MappingProxyType(dict(self.features)))

    @classmethod
    def from_samples(
        cls,
        features: Mapping[str, Sequence[Any]],
        score: Sequence[Any],
        *,
        bins: int = 10,
        max_categories: int = 100,
    ) -> "Profile":
        """Summarize training samples: numbers become quantile bins, strings and booleans categories.

        Raises:
            ValueError: a sample is empty, holds subject tokens, or has more than
                ``max_categories`` categories (an identifier, not a feature).
        """
        out: dict[str, FeatureProfile] = {}
        for name, values in features.items():
            values = list(values)
            present = [v for v in values if not _is_missing(v)]
            if not present:
                raise ValueError(f"feature {name!r}: the profile sample has no values")
            numeric = all(
                isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) for v in present
            )
            out[name] = (
                NumericProfile.from_sample(present, bins=bins)
                if numeric
                else _categorical(name, present, max_categories)
            )
        return cls(out, NumericProfile.from_sample(score, bins=bins), bins)

    @classmethod
    def from_table(
        cls,
        table: "pa.Table",
        *,
        score: "Sequence[Any] | str",
        columns: Sequence[str] | None = None,
        bins: int = 10,
        max_categories: int = 100,
    ) -> "Profile":
        """Summarize a training table (numeric columns as numbers, string/bool/dictionary as categories).

        Args:
            table: the rows the model was trained on (or a sample of them).
            score: the model's scores for those rows, or the name of a column holding them.
            columns: the features; default every column except the score column, columns
                whose name starts with ``_``, and columns of subject tokens.

        Raises:
            ValueError: a named column is missing or holds subject tokens; lengths differ.
            TypeError: a column's type is neither numeric nor categorical.
        """
        import pyarrow as pa

        score_col = score if isinstance(score, str) else None
        if score_col is not None:
            if score_col not in table.column_names:
                raise ValueError(f"score column {score_col!r} is not in the table")
            scores: list[Any] = table.column(score_col).to_pylist()
        else:
            scores = list(score)
            if len(scores) != table.num_rows:
                raise ValueError(f"{len(scores)} scores for {table.num_rows} rows")
        explicit = columns is not None
        names = list(columns) if columns is not None else [c for c in table.column_names if c != score_col and not c.startswith("_")]
        samples: dict[str, list[Any]] = {}
        for name in names:
            if name not in table.column_names:
                raise ValueError(f"column {name!r} is not in the table (has: {', '.join(table.column_names)})")
            col = table.column(name)
            t = col.type
            if pa.types.is_dictionary(t):
                t = t.value_type
            if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)
                    or pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)):
                raise TypeError(f"column {name!r} has type {col.type}: only numeric, string and boolean columns can be monitored")
            values = col.to_pylist()
            if pa.types.is_decimal(t):
                values = [None if v is None else float(v) for v in values]
            if (pa.types.is_string(t) or pa.types.is_large_string(t)) and any(
                isinstance(v, str) and TOKEN_RE.match(v) for v in values
            ):
                if explicit:
                    raise ValueError(f"column {name!r} holds subject tokens: tokens are never a monitored feature")
                continue
            samples[name] = values
        return cls.from_samples(samples, scores, bins=bins, max_categories=max_categories)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "bins": self.bins,
            "features": {n: f.to_dict() for n, f in sorted(self.features.items())},
            "score": self.score.to_dict(),
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): the same profile always gives the same bytes."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Profile":
        """Load :meth:`to_json` output. Raises ValueError for another format or a malformed document."""
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"not a drift profile: {e}") from None
        if not isinstance(d, dict) or d.get("format") != PROFILE_FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"not a drift profile of format {PROFILE_FORMAT!r} (got {got!r})")
        try:
            feats = {n: _feature_from_dict(f) for n, f in d["features"].items()}
            score = _feature_from_dict(d["score"])
            if not isinstance(score, NumericProfile):
                raise ValueError("the score profile must be numeric")
            return cls(feats, score, int(d["bins"]))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed drift profile: {e!r}") from None


def _categorical(name: str, values: list[Any], max_categories: int) -> CategoricalProfile:
    if any(isinstance(v, str) and TOKEN_RE.match(v) for v in values):
        raise ValueError(f"feature {name!r} holds subject tokens: tokens are never a monitored feature")
    ref = CategoricalProfile.from_sample(values)
    if len(ref.shares) > max_categories:
        raise ValueError(
            f"feature {name!r} has {len(ref.shares)} categories (max_categories={max_categories}): "
            "an identifier-like column is not a feature to monitor"
        )
    return ref


def _feature_from_dict(d: Mapping[str, Any]) -> FeatureProfile:
    if d["kind"] == "numeric":
        return NumericProfile(tuple(float(e) for e in d["edges"]), tuple(float(s) for s in d["shares"]), int(d["count"]))
    if d["kind"] == "categorical":
        return CategoricalProfile({str(k): float(v) for k, v in d["shares"].items()}, int(d["count"]))
    raise ValueError(f"unknown feature kind {d['kind']!r}")


# -- request log --------------------------------------------------------------------------
