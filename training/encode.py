"""Turn a training set's feature columns into a numeric matrix, the same way at training and serving.

Numeric columns are standardized with the training rows' mean and standard deviation
(missing values become the mean); string columns are one-hot encoded over the categories
seen in training (an unseen or missing category encodes as all zeros). The fitted encoder
is a plain dict stored with the model (model card ``preprocessing``), so serving rebuilds
exactly the same matrix. The matrix's column order is canonical (numeric columns by name,
then one-hot columns by name): it cannot depend on the order of keys in a stored dict, which
JSON writers (``sort_keys``) and readers are free to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass
class Encoder:
    numeric: dict[str, tuple[float, float]] = field(default_factory=dict)  # column -> (mean, std)
    categorical: dict[str, list[str]] = field(default_factory=dict)  # column -> categories

    @classmethod
    def fit(cls, table: pa.Table, columns: list[str]) -> "Encoder":
        enc = cls()
        for c in sorted(columns):
            col = table[c]
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                cats = sorted(v for v in pc.unique(col.drop_null()).to_pylist())
                enc.categorical[c] = cats
            elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type) or pa.types.is_boolean(col.type):
                arr = col.cast(pa.float64()).to_numpy(zero_copy_only=False)
                arr = arr[~np.isnan(arr)]
                mean = float(arr.mean()) if len(arr) else 0.0
                std = float(arr.std()) if len(arr) else 1.0
                enc.numeric[c] = (mean, std if std > 0 else 1.0)
            else:
                raise ValueError(f"feature '{c}' has type {col.type}, which the model cannot use (encrypted or binary?)")
        return enc

    @property
    def columns(self) -> list[str]:
        out = sorted(self.numeric)
        for c in sorted(self.categorical):
            out += [f"{c}={v}" for v in self.categorical[c]]
        return out

    def transform(self, table: pa.Table) -> np.ndarray:
        parts = []
        for c in sorted(self.numeric):
            mean, std = self.numeric[c]
            arr = table[c].cast(pa.float64()).to_numpy(zero_copy_only=False)
            arr = np.where(np.isnan(arr), mean, arr)
            parts.append(((arr - mean) / std)[:, None])
        for c in sorted(self.categorical):
            cats = self.categorical[c]
            vals = table[c].to_pylist()
            idx = {v: i for i, v in enumerate(cats)}
            m = np.zeros((len(vals), len(cats)), np.float32)
            for r, v in enumerate(vals):
                j = idx.get(v)
                if j is not None:
                    m[r, j] = 1.0
            parts.append(m)
        if not parts:
            raise ValueError("no features to encode")
        return np.hstack(parts).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": {k: list(v) for k, v in self.numeric.items()}, "categorical": self.categorical}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Encoder":
        return cls({k: (float(v[0]), float(v[1])) for k, v in d["numeric"].items()}, dict(d["categorical"]))


__all__ = ["Encoder"]
