"""The label a model learns: declared in the dataset policy, checked, encoded — never guessed.

A dataset policy declares each column a model may be trained to predict and which of its two
values is the favourable outcome (``labels:`` in ``policies/<dataset>.yaml``)::

    labels:
      defaulted: {favourable: false}                   # bool: the other value is implied
      risk: {favourable: good, unfavourable: bad}      # text or int: both values

Encoding: ``y = 1`` for the unfavourable value, ``0`` for the favourable one — the model's score
is the probability of the unfavourable outcome (for ``defaulted`` that is the risk of default, as
it always was), and fairness measures the favourable one (``pos_label = 0``).

Refusals (:class:`LabelError`, exit 2), all before a privacy budget is reserved:

* a label that is not a public column of the dataset — before any data is read;
* a label the policy does not declare — once the training set is read (a gated read that spends
  no ε), so that the refusal names the values found; the hint is the YAML to add;
* a label column holding a value outside the declared pair, or no value (NULL): the message
  names the column, each value found with its row count (at most :data:`SHOWN` values, each
  passed through the PII redactor and cut short: label values are policy vocabulary, not
  personal data, and a mistake is not let through either) and the declaration. Rows with a
  missing label are refused, not dropped: a training set is the policy's, and quietly training
  on a subset would change what the model and its fairness evaluation stand for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from governance.errors import LakewardenError
from governance.pii import redact
from governance.policy import ColumnClass, DatasetPolicy

#: Encoded value of the favourable outcome (``pos_label`` of the fairness metrics).
FAVOURABLE = 0
#: At most this many distinct values are named in a refusal.
SHOWN = 8
_LONGEST = 32


class LabelError(LakewardenError):
    """The label is undeclared, or holds values its declaration does not name."""

    exit_code = 2


def _yaml(v: Any) -> str:
    """A label value as the YAML that declares it (strings that YAML would read otherwise are quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).removesuffix("\n").removesuffix("\n...")


def _shown(v: Any) -> str:
    if v is None:
        return "null"
    text = redact(str(v))[0] if isinstance(v, str) else repr(v)
    if len(text) > _LONGEST:
        text = text[: _LONGEST - 1] + "…"
    return repr(text) if isinstance(v, str) else text


@dataclass(frozen=True)
class LabelEncoding:
    """A declared label: the column, its favourable and unfavourable values, and the 0/1 encoding."""

    dataset: str
    column: str
    favourable: bool | int | str
    unfavourable: bool | int | str
    source: str = ""  # the policy file that declares it

    @property
    def declaration(self) -> str:
        """The declaration as YAML: ``labels: {risk: {favourable: good, unfavourable: bad}}``."""
        return (f"labels: {{{self.column}: {{favourable: {_yaml(self.favourable)}, "
                f"unfavourable: {_yaml(self.unfavourable)}}}}}")

    def describe(self) -> dict[str, Any]:
        """For model cards and reports: which column, which value is favourable, what the score means."""
        return {"column": self.column, "favourable": self.favourable, "unfavourable": self.unfavourable,
                "positive": self.unfavourable}

    def encode(self, values: pa.Array | pa.ChunkedArray | list[Any], *, where: str = "") -> np.ndarray:
        """``values`` as float32 0/1 (1 = unfavourable); refuse NULLs and values outside the pair."""
        arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
        known = {(type(self.favourable), self.favourable), (type(self.unfavourable), self.unfavourable)}
        bad = [(v, n) for v, n in _counts(arr) if (type(v), v) not in known]
        if bad:
            rows = sum(n for _, n in bad)
            hint = (f"{self.source or 'the policy'} declares {self.declaration}; a label has exactly these two "
                    "values: correct or remove the other rows in the data")
            if any(v is None for v, _ in bad):
                hint += " (rows without a label are refused, not dropped)"
            raise LabelError(
                f"label '{self.column}' of dataset '{self.dataset}'{where} has {rows} row(s) outside its declared "
                f"values: {_listing(bad)}",
                hint=hint,
            )
        if pa.types.is_boolean(arr.type) or pa.types.is_integer(arr.type) or pa.types.is_string(arr.type) \
                or pa.types.is_large_string(arr.type):
            scalar = pa.scalar(self.favourable, type=arr.type)
            fav = pc.equal(arr, scalar)
            if isinstance(fav, pa.ChunkedArray):
                fav = fav.combine_chunks()
            y = ~fav.to_numpy(zero_copy_only=False).astype(bool)
        else:  # the declared types are bool, int and string; anything else has failed above
            y = np.array([v != self.favourable for v in arr.to_pylist()], dtype=bool)
        return y.astype(np.float32)


def _counts(values: pa.Array | pa.ChunkedArray | list[Any]) -> list[tuple[Any, int]]:
    """Distinct values with their row counts (NULL included), most frequent first."""
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values)
    pairs = [(c["values"], int(c["counts"])) for c in pc.value_counts(arr).to_pylist()]
    return sorted(pairs, key=lambda vn: (-vn[1], str(vn[0])))


def _listing(pairs: list[tuple[Any, int]]) -> str:
    listed = ", ".join(f"{_shown(v)} ({n} row{'s' if n != 1 else ''})" for v, n in pairs[:SHOWN])
    return listed + (f" and {len(pairs) - SHOWN} more value(s)" if len(pairs) > SHOWN else "")


def check_label_column(policies: Any, pol: DatasetPolicy, column: str) -> None:
    """Refuse, before any data is read, a label that is no public column of the dataset."""
    col = pol.columns.get(column)
    if col is not None and col.class_ is ColumnClass.PUBLIC:
        return
    where = policies.source(pol.dataset)
    what = "not a column" if col is None else f"a {col.class_.value} column"
    raise LabelError(
        f"'{column}' cannot be a label of dataset '{pol.dataset}': it is {what} of {where} "
        f"(declared labels: {', '.join(sorted(pol.labels)) or 'none'})",
        hint="a label is a public bool, string or int column, declared under 'labels:' with its favourable value",
    )


def declared_label(
    policies: Any, pol: DatasetPolicy, column: str, values: pa.Array | pa.ChunkedArray | list[Any] | None = None,
) -> LabelEncoding:
    """The policy's declaration of ``column`` as a label of ``pol``'s dataset.

    ``policies`` is the workspace's :class:`~governance.policy.PolicySet` (it names the file to
    edit). Without a declaration: :class:`LabelError`, naming the values found in ``values``
    (the label column of the training set, when it has been read) and the YAML to add.
    """
    check_label_column(policies, pol, column)
    lab = pol.labels.get(column)
    if lab is not None:
        assert lab.unfavourable is not None  # the policy model fills it in for bool labels
        return LabelEncoding(pol.dataset, column, lab.favourable, lab.unfavourable, policies.source(pol.dataset))
    where = policies.source(pol.dataset)
    col = pol.columns[column]
    pairs = _counts(values) if values is not None else []
    seen = [v for v, _ in pairs if v is not None]
    if col.type == "bool":
        hint = f"add to {where}: labels: {{{column}: {{favourable: false}}}} (or true: whichever is the favourable outcome)"
    else:
        choices = seen if len(seen) == 2 else (col.allowed if col.allowed and len(col.allowed) == 2 else None)
        hint = (f"add to {where}: labels: {{{column}: {{favourable: F, unfavourable: U}}}} with F the favourable "
                "outcome and U the other")
        if choices:
            hint += f", here {' and '.join(_yaml(v) for v in sorted(choices, key=str))} in the order you decide"
        elif len(seen) > 2:
            hint += "; a label has exactly two values, so map the others in the data first"
    found = f"; its values: {_listing(pairs)}" if pairs else ""
    raise LabelError(
        f"label '{column}' is not declared in {where} (declared labels: "
        f"{', '.join(sorted(pol.labels)) or 'none'}){found}. Which value is the favourable outcome is the "
        "policy's to say, never guessed",
        hint=hint,
    )


__all__ = ["FAVOURABLE", "LabelEncoding", "LabelError", "check_label_column", "declared_label"]
