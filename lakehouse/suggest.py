"""A policy to start from: draft a dataset policy from a sample of a landing file.

:func:`suggest_policy` reads the first ``sample`` rows of a CSV, Parquet or JSON Lines
file (the same readers ingest uses) and classifies every column from its **name** and
its **content**:

* e-mail addresses, phone numbers, person names, national ids (US SSN, UK National
  Insurance number, Canadian SIN, Swedish personnummer, Spanish DNI, Italian codice
  fiscale, French NIR, Dutch BSN), payment cards, IBANs, IP addresses, street
  addresses and free text become **direct identifiers** (protection ``vault``);
* dates of birth (``generalize: year``; ``encrypt`` when the dates are not ISO, which
  ingest cannot type as dates), postcodes (``generalize: prefix:N``) and ages
  (``generalize: bucket:10``) become **quasi-identifiers**;
* sex, gender, ethnicity, religion, health and the like become **sensitive**;
* one id-like column is proposed as the **subject key**, with how sure the guess is;
* everything else is **public**: its type inferred, numbers with ``min``/``max``
  rounded outward, dates with ``max: today`` when every sampled date is in the past,
  low-cardinality text with ``allowed:``.

Every suggestion carries its evidence ("97 % of 1,000 sampled values match an e-mail
pattern", "name 'dob' and 100 % parse as dates (dd/mm/yyyy), all before today"), which
:meth:`PolicySuggestion.to_yaml` writes as YAML comments above the column.

No personal data is written. Evidence is made of counts, percentages, format names and
the file's column names, never of values. Values of non-identifier columns appear only
as ``allowed:`` lists (low-cardinality public or sensitive categories) and ranges
rounded outward; identifier columns get only constants (``1900-01-01``, ``today``, 0 and
130 for ages) and format patterns.

The draft always validates as a :class:`~governance.policy.DatasetPolicy` (checked here
before it is returned), so ``lakewarden policy check`` accepts it unchanged next to the
project's role catalog.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tempfile
import textwrap
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import yaml

from governance.pii import find_pii, iban_ok, luhn_ok
from governance.policy import IDENT, NAMED_PATTERNS, ColumnClass, DatasetPolicy, Protection
from lakehouse.errors import IngestError, SuggestError
from lakehouse.readers import Format, detect_format, read_batches, to_text

__all__ = ["ColumnSuggestion", "PolicySuggestion", "SubjectKeyGuess", "suggest_policy", "write_draft"]

Confidence = Literal["high", "medium", "low"]
ColumnType = Literal["string", "int", "double", "bool", "date", "timestamp"]

DEFAULT_SAMPLE = 1000
TYPE_SHARE = 0.95  # a type (or pattern) is suggested when at least this share of values fits it
STRONG_SHARE = 0.8  # a distinctive format identifies a column from content alone at this share
HINTED_SHARE = 0.5  # ... and with a name that says so, at this share


# ============================================================================ result types


@dataclass(frozen=True)
class ColumnSuggestion:
    """What the draft says about one column, and why.

    ``source`` is the column's name in the file, ``name`` its name in the policy (the
    same, lower-cased; sanitized to lower_snake_case when it was not). ``kind`` is what
    the column looks like (``email``, ``phone``, ``person_name``, ``date_of_birth``,
    ``national_id``, ``postcode``, ``free_text``, ``subject_key``, ``category``,
    ``number``, ...). ``spec`` is the column's policy entry, in the order it is written.
    """

    source: str
    name: str
    kind: str
    class_: ColumnClass
    protection: Protection
    type: ColumnType
    confidence: Confidence
    evidence: tuple[str, ...]
    spec: dict[str, Any]

    @property
    def identifier(self) -> bool:
        """Subject key, direct or quasi-identifier: the columns whose values never appear in a draft."""
        return self.class_ in (ColumnClass.SUBJECT_KEY, ColumnClass.DIRECT_IDENTIFIER, ColumnClass.QUASI_IDENTIFIER)


@dataclass(frozen=True)
class SubjectKeyGuess:
    column: str
    confidence: Confidence
    evidence: tuple[str, ...]
    alternatives: tuple[str, ...] = ()


@dataclass(frozen=True)
class PolicySuggestion:
    """A draft dataset policy: the columns with their evidence, the subject key, warnings."""

    dataset: str
    source: str  # the file's name (not its folder)
    format: Format
    rows_sampled: int
    columns: tuple[ColumnSuggestion, ...]
    subject_key: SubjectKeyGuess
    warnings: tuple[str, ...] = ()

    def column(self, name: str) -> ColumnSuggestion:
        for c in self.columns:
            if c.name == name or c.source == name:
                return c
        raise KeyError(name)

    def identifiers(self) -> list[str]:
        """Policy names of the subject key, direct and quasi-identifier columns."""
        return [c.name for c in self.columns if c.identifier]

    def to_yaml(self) -> str:
        return _render(self)

    def policy(self) -> DatasetPolicy:
        """The draft as the project's model (it always validates)."""
        return DatasetPolicy.model_validate(yaml.safe_load(self.to_yaml()))


# ============================================================================ entry points


def suggest_policy(
    path: str | os.PathLike[str],
    *,
    dataset: str | None = None,
    sample: int = DEFAULT_SAMPLE,
    today: date | None = None,
) -> PolicySuggestion:
    """Read the first ``sample`` rows of ``path`` and draft a dataset policy for it.

    ``dataset`` defaults to the file's stem, made lower_snake_case. ``today`` (default: the
    local date) decides whether dates are "before today".

    Raises:
        SuggestError: the file is missing, empty, of an unknown type, unreadable or has no
            rows; ``dataset`` is not a valid name; ``sample`` is below 1. One line, naming
            the file.
    """
    p = Path(path)
    if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
        raise SuggestError(f"--sample must be a whole number of rows, at least 1 (got {sample!r})")
    if not p.exists():
        raise SuggestError(f"{p}: no such file")
    if not p.is_file():
        raise SuggestError(f"{p}: not a file")
    try:
        fmt = detect_format(p)
    except IngestError:
        raise SuggestError(
            f"{p}: unsupported file type '{p.suffix or '(none)'}' (policy suggest reads .csv, .parquet and .jsonl)"
        ) from None
    if p.stat().st_size == 0:
        raise SuggestError(f"{p}: the file is empty (0 bytes): nothing to suggest a policy from")
    name = dataset if dataset is not None else _snake(p.name.split(".")[0]) or "dataset"
    if not re.match(IDENT, name):
        raise SuggestError(
            f"dataset name {name!r} must be lower_snake_case (a-z, 0-9, _; starting with a letter)",
            hint="pass --dataset NAME",
        )
    table, malformed = _read_sample(p, sample)
    if table.num_rows == 0:
        raise SuggestError(f"{p}: no rows to sample (only a header{', and malformed rows' if malformed else ''})")
    today = today or date.today()
    warnings: list[str] = []
    if malformed:
        warnings.append(f"{malformed:,} malformed row(s) in the sample were skipped (ingest would quarantine them)")
    if table.num_rows < sample:
        warnings.append(f"the file has only {table.num_rows:,} row{'s' if table.num_rows != 1 else ''}: "
                        "every row was sampled")
    profiles = [_profile(table.column_names[i], table.column(i), today) for i in range(table.num_columns)]
    names = _policy_names([pr.source for pr in profiles], warnings)
    drafts = [_classify(pr, nm) for pr, nm in zip(profiles, names, strict=True)]
    key = _choose_subject_key(profiles, drafts)
    columns = []
    for pr, d in zip(profiles, drafts, strict=True):
        if d.name == key.column:
            d = _subject_key_column(pr, d, key)
        columns.append(_finish(pr, d))
    s = PolicySuggestion(
        dataset=name,
        source=p.name,
        format=fmt,
        rows_sampled=table.num_rows,
        columns=tuple(columns),
        subject_key=key,
        warnings=tuple(warnings),
    )
    s.policy()  # the draft must validate: a failure here is a bug in this module, not the user's
    return s


def write_draft(suggestion: PolicySuggestion, out: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write the draft to ``out``; refuse to replace an existing file unless ``force``.

    Raises:
        SuggestError: ``out`` exists (and ``force`` is false), or cannot be written.
    """
    target = Path(out)
    text = suggestion.to_yaml()
    if target.is_dir():
        raise SuggestError(f"{target}: is a folder; --out names the policy file to write")
    if target.exists() and not force:
        raise SuggestError(f"{target}: already exists; not overwritten", hint="pass --force to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            if force:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # fails if someone created the file meanwhile: never clobbers
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except FileExistsError:
        raise SuggestError(f"{target}: already exists; not overwritten", hint="pass --force to replace it") from None
    except OSError as exc:
        raise SuggestError(f"{target}: cannot write the draft ({exc.strerror or exc})") from None
    return target


# ============================================================================ reading


def _read_sample(path: Path, sample: int) -> tuple[pa.Table, int]:
    try:
        batch = next(read_batches(path, batch_rows=sample), None)
    except IngestError as exc:
        msg = exc.message
        if not msg.startswith(str(path)) and msg.startswith(path.name):
            msg = str(path) + msg[len(path.name) :]
        raise SuggestError(msg, hint=exc.hint) from None
    if batch is None:
        return pa.table({}), 0
    table, _ = to_text(batch.table)
    return table, len(batch.malformed)


# ============================================================================ profiling

_TRUE = {"true", "t", "yes", "y"}
_FALSE = {"false", "f", "no", "n"}
_INT = re.compile(r"^[+-]?(0|[1-9]\d{0,17})$")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_ID_LIKE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:#-]{0,63}$")
_TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}(:?\d{2})?)?$")
_DATE_FORMATS = (  # (strptime format, shape, label, pattern written for non-ISO text)
    ("%Y-%m-%d", re.compile(r"^\d{4}-\d{2}-\d{2}$"), "yyyy-mm-dd", r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"),
    ("%d/%m/%Y", re.compile(r"^\d{1,2}/\d{1,2}/\d{4}$"), "dd/mm/yyyy", r"^[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}$"),
    ("%m/%d/%Y", re.compile(r"^\d{1,2}/\d{1,2}/\d{4}$"), "mm/dd/yyyy", r"^[0-9]{1,2}/[0-9]{1,2}/[0-9]{4}$"),
    ("%d.%m.%Y", re.compile(r"^\d{1,2}\.\d{1,2}\.\d{4}$"), "dd.mm.yyyy", r"^[0-9]{1,2}\.[0-9]{1,2}\.[0-9]{4}$"),
    ("%d-%m-%Y", re.compile(r"^\d{1,2}-\d{1,2}-\d{4}$"), "dd-mm-yyyy", r"^[0-9]{1,2}-[0-9]{1,2}-[0-9]{4}$"),
    ("%Y/%m/%d", re.compile(r"^\d{4}/\d{1,2}/\d{1,2}$"), "yyyy/mm/dd", r"^[0-9]{4}/[0-9]{1,2}/[0-9]{1,2}$"),
)


@dataclass
class _Profile:
    """What the sample says about one column (values are kept in memory only, never written)."""

    source: str
    rows: int
    values: list[str]  # non-empty, trimmed, as text
    native: ColumnType | None  # the Parquet type, when the file is typed
    numbers: list[float] = field(default_factory=list)
    distinct: int = 0
    max_len: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # value kind -> count (each value counted once)
    formats: dict[str, str] = field(default_factory=dict)  # kind -> format label of its majority
    date_format: tuple[str, str, str] | None = None  # (strptime, label, pattern) of the best date format
    dates: list[date] = field(default_factory=list)
    ambiguous_dates: bool = False
    dictionary_names: int = 0  # values with a token found in common first/last name lists
    pii_in_text: int = 0  # values with an e-mail, phone, id or card inside (free text)
    id_like: int = 0
    today: date = field(default_factory=date.today)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def empty(self) -> int:
        return self.rows - self.n

    def share(self, kind: str) -> float:
        return self.kinds[kind] / self.n if self.n else 0.0


def _profile(source: str, col: pa.ChunkedArray, today: date) -> _Profile:
    t = col.type
    native: ColumnType | None = None
    if pa.types.is_boolean(t):
        native = "bool"
    elif pa.types.is_integer(t):
        native = "int"
    elif pa.types.is_floating(t) or pa.types.is_decimal(t):
        native = "double"
    elif pa.types.is_date(t):
        native = "date"
    elif pa.types.is_timestamp(t):
        native = "timestamp"
    raw = col.to_pylist()
    values: list[str] = []
    numbers: list[float] = []
    for v in raw:
        if v is None:
            continue
        if isinstance(v, bool):
            s = "true" if v else "false"
        elif isinstance(v, datetime):
            s = v.isoformat()
        elif isinstance(v, date):
            s = v.isoformat()
        elif isinstance(v, (int, float, Decimal)):
            if isinstance(v, float) and math.isnan(v):
                continue
            numbers.append(float(v))
            s = str(v)
        elif isinstance(v, bytes):
            s = v.decode("utf-8", "replace")
        elif isinstance(v, (list, dict)):
            s = json.dumps(v, default=str)
        else:
            s = str(v)
        s = s.strip()
        if s:
            values.append(s)
    pr = _Profile(source=source, rows=len(raw), values=values, native=native, numbers=numbers, today=today)
    pr.distinct = len(set(values))
    pr.max_len = max((len(v) for v in values), default=0)
    _detect(pr)
    return pr


# ---------------------------------------------------------------------------- value detectors

_EMAIL = re.compile(NAMED_PATTERNS["email"])
_PHONE_SHAPE = re.compile(r"^\+?\(?\d[\d ().-]{5,22}\d$")
_PLAIN_NUMBER = re.compile(r"^[+-]?\d+([.,]\d+)?$")
_IPV4 = re.compile(r"^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$")
_SSN = re.compile(r"^\d{3}-\d{2}-\d{4}$")
_NINO = re.compile(r"^[A-Z]{2} ?\d{2} ?\d{2} ?\d{2} ?[A-D]$")
_SIN = re.compile(r"^\d{3}[ -]\d{3}[ -]\d{3}$")
_PERSONNUMMER = re.compile(r"^(19|20)?\d{6}[-+]\d{4}$")
_DNI = re.compile(r"^\d{8}-?[A-Z]$")
_CODICE_FISCALE = re.compile(r"^[A-Z]{6}\d{2}[A-EHLMPRST]\d{2}[A-Z]\d{3}[A-Z]$")
_NIR = re.compile(r"^[12] ?\d{2} ?\d{2} ?(\d{2}|2[AB]) ?\d{3} ?\d{3}( ?\d{2})?$")
_NINE_DIGITS = re.compile(r"^\d{9}$")
_CARD = re.compile(r"^\d(?:[ -]?\d){12,18}$")
_IBAN = re.compile(r"^[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?$")
_UK_POSTCODE = re.compile(r"^[A-Z]{1,2}\d[A-Z\d]? ?\d[A-Z]{2}$")
_CA_POSTCODE = re.compile(r"^[A-Z]\d[A-Z] ?\d[A-Z]\d$")
_NL_POSTCODE = re.compile(r"^\d{4} ?[A-Z]{2}$")
_ZIP9 = re.compile(r"^\d{5}-\d{4}$")
_ZIP5 = re.compile(r"^\d{5}$")
_ZIP4 = re.compile(r"^\d{4}$")
_STREET_WORDS = {
    "street", "st", "road", "rd", "avenue", "ave", "lane", "ln", "drive", "dr", "way", "boulevard", "blvd",
    "court", "ct", "place", "pl", "close", "crescent", "terrace", "square", "sq", "parkway", "highway", "hwy",
    "strasse", "straße", "str", "weg", "gasse", "platz", "allee", "rue", "chemin", "calle", "avenida", "via",
    "viale", "piazza", "laan", "straat", "plein", "gata", "gatan", "vej", "vägen",
}
_PARTICLES = {"van", "von", "de", "der", "den", "del", "della", "di", "da", "du", "la", "le", "bin", "al", "ter",
              "ten", "y", "dos", "das", "do", "e", "st."}
_NAME_PUNCT = "'’-."

#: value kind -> (format label, checker); the first kind that matches claims the value.
_NATIONAL_IDS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("US social security number", lambda v: bool(_SSN.match(v))),
    ("UK National Insurance number", lambda v: bool(_NINO.match(v.upper()))),
    ("Canadian social insurance number", lambda v: bool(_SIN.match(v)) and luhn_ok(re.sub(r"\D", "", v))),
    ("Swedish personnummer", lambda v: bool(_PERSONNUMMER.match(v))),
    ("Spanish DNI", lambda v: bool(_DNI.match(v.upper())) and _dni_ok(v.upper())),
    ("Italian codice fiscale", lambda v: bool(_CODICE_FISCALE.match(v.upper()))),
    ("French NIR", lambda v: bool(_NIR.match(v)) and " " in v),
)
_POSTCODES_STRONG: tuple[tuple[str, re.Pattern[str], str, str], ...] = (  # label, shape, generalize, pattern
    ("UK postcode", _UK_POSTCODE, "prefix:2", r"^[A-Za-z]{1,2}[0-9][A-Za-z0-9]? ?[0-9][A-Za-z]{2}$"),
    ("Canadian postal code", _CA_POSTCODE, "prefix:3", r"^[A-Za-z][0-9][A-Za-z] ?[0-9][A-Za-z][0-9]$"),
    ("Dutch postcode", _NL_POSTCODE, "prefix:2", r"^[0-9]{4} ?[A-Za-z]{2}$"),
    ("US ZIP+4 code", _ZIP9, "prefix:3", r"^[0-9]{5}(-[0-9]{4})?$"),
)


def _dni_ok(v: str) -> bool:
    digits = re.sub(r"\D", "", v)
    return "TRWAGMYFPDXBNJZSQVHLCKE"[int(digits) % 23] == v[-1]


def _bsn_ok(v: str) -> bool:
    """The Dutch "elfproef": 9·d1 + 8·d2 + ... + 2·d8 − d9 is a multiple of 11."""
    d = [int(c) for c in v]
    return (sum((9 - i) * d[i] for i in range(8)) - d[8]) % 11 == 0


def _is_ip(v: str) -> bool:
    m = _IPV4.match(v)
    if m:
        return all(int(g) <= 255 for g in m.groups())
    if ":" in v and 2 <= v.count(":") <= 7:
        try:
            ipaddress.IPv6Address(v)
            return True
        except ValueError:
            return False
    return False


def _is_phone(v: str) -> bool:
    if not _PHONE_SHAPE.match(v):
        return False
    digits = sum(ch.isdigit() for ch in v)
    if v.startswith("+"):  # international: +<country code><number>, with or without separators
        return 8 <= digits <= 15
    if _PLAIN_NUMBER.match(v) or not 7 <= digits <= 15:
        return False
    return any(ch in v for ch in " ().-")


def _name_shape(v: str) -> bool:
    if len(v) > 80:
        return False
    toks = v.split()
    if not 1 <= len(toks) <= 5:
        return False
    capitalised = 0
    for t in toks:
        core = t.strip(",")
        if core.lower() in _PARTICLES:
            continue
        if not core or not all(ch.isalpha() or ch in _NAME_PUNCT for ch in core):
            return False
        if not core[0].isupper() or not any(ch.isalpha() for ch in core):
            return False
        capitalised += 1
    return capitalised >= 1


def _is_address(v: str) -> bool:
    if len(v) > 120 or not any(ch.isdigit() for ch in v):
        return False
    toks = [t.strip(".,").lower() for t in v.split()]
    if not 2 <= len(toks) <= 12:
        return False
    return any(t in _STREET_WORDS for t in toks[1:] + toks[:1]) and any(t.isdigit() or t[:-1].isdigit() for t in toks)


def _is_free_text(v: str) -> bool:
    words = v.split()
    return len(words) >= 5 or (len(v) >= 40 and len(words) >= 3)


@lru_cache(maxsize=1)
def _common_names() -> frozenset[str]:
    """First and last names of Faker's person lists for a dozen locales (lower case)."""
    import importlib

    out: set[str] = set()
    for loc in ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "pl_PL", "sv_SE"):
        try:
            prov = importlib.import_module(f"faker.providers.person.{loc}").Provider
        except Exception:  # noqa: BLE001 - a missing locale only weakens the evidence
            continue
        for attr in ("first_names", "first_names_female", "first_names_male", "last_names"):
            vals = getattr(prov, attr, None) or ()
            out.update(str(x).lower() for x in vals)
    return frozenset(out)


def _value_kind(v: str) -> tuple[str, str] | None:
    """``(kind, format label)`` of one value, the first detector in priority order that claims it."""
    if "@" in v and _EMAIL.match(v):
        return "email", "e-mail address"
    if _TIMESTAMP.match(v):
        return "timestamp", "ISO timestamp"
    for _, shape, label, _ in _DATE_FORMATS:
        if shape.match(v):
            return "date", label
    if _is_ip(v):
        return "ip", "IP address"
    u = v.upper()
    for label, check in _NATIONAL_IDS:
        if check(v):
            return "national_id", label
    digits = v.replace(" ", "").replace("-", "")
    if _CARD.match(v) and luhn_ok(digits) and len(digits) >= 13:
        return "card", "payment card number (Luhn check)"
    if u[:2].isalpha() and _IBAN.match(u) and iban_ok(u):
        return "iban", "IBAN (mod-97 check)"
    for label, shape, _, _ in _POSTCODES_STRONG:
        if shape.match(u):
            return "postcode", label
    if _is_phone(v):
        return "phone", "phone number"
    if _ZIP5.match(v):
        return "zip5", "5-digit code"
    if _ZIP4.match(v):
        return "zip4", "4-digit code"
    if _NINE_DIGITS.match(v) and _bsn_ok(v):
        return "bsn", "9-digit number passing the Dutch BSN check"
    if _is_address(v):
        return "address", "street address"
    if _name_shape(v):
        return "person_name", "capitalised name"
    if _is_free_text(v):
        return "free_text", "free text"
    return None


def _detect(pr: _Profile) -> None:
    names = _common_names()
    labels: dict[str, Counter[str]] = {}
    for v in pr.values:
        if _ID_LIKE.match(v) and any(ch.isdigit() for ch in v):
            pr.id_like += 1
        got = _value_kind(v)
        if got is None:
            continue
        kind, label = got
        pr.kinds[kind] += 1
        labels.setdefault(kind, Counter())[label] += 1
        if kind == "person_name" and any(t.strip(_NAME_PUNCT + ",").lower() in names for t in v.split()):
            pr.dictionary_names += 1
        if kind == "free_text" and next(find_pii(v), None) is not None:
            pr.pii_in_text += 1
    for kind, c in labels.items():
        pr.formats[kind] = c.most_common(1)[0][0]
    if pr.kinds["date"] or pr.native == "date":
        _parse_dates(pr)
    if pr.native == "date":
        pr.kinds["date"] = pr.n


def _parse_dates(pr: _Profile) -> None:
    best: tuple[int, int, tuple[str, str, str], list[date]] | None = None
    ok_by_format: dict[str, int] = {}
    for rank, (fmt, shape, label, pattern) in enumerate(_DATE_FORMATS):
        parsed: list[date] = []
        for v in pr.values:
            s = v[:10] if pr.native == "date" else v
            if shape.match(s):
                try:
                    parsed.append(datetime.strptime(s, fmt).date())
                except ValueError:
                    pass
        ok_by_format[label] = len(parsed)
        if parsed and (best is None or len(parsed) > best[0]):
            best = (len(parsed), rank, (fmt, label, pattern), parsed)
    if best is None:
        return
    pr.date_format = best[2]
    pr.dates = best[3]
    if best[2][1] == "dd/mm/yyyy" and ok_by_format.get("mm/dd/yyyy") == best[0]:
        pr.ambiguous_dates = True
    pr.kinds["date"] = len(pr.dates)


# ============================================================================ names


def _tokens(name: str) -> list[str]:
    s = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)
    return [t for t in re.split(r"[^a-z0-9]+", s.lower()) if t]


def _snake(name: str) -> str:
    s = "_".join(_tokens(name))
    if s and not s[0].isalpha():
        s = "c_" + s
    return s[:63]


def _policy_names(sources: Sequence[str], warnings: list[str]) -> list[str]:
    """Policy column names: the file's name lower-cased when that is lower_snake_case (ingest matches
    names case-insensitively); otherwise a sanitized name, with a warning to rename the file's column."""
    out: list[str] = []
    for i, src in enumerate(sources):
        low = src.strip().lower()
        name = low if re.match(IDENT, low) else (_snake(src) or f"column_{i + 1}")
        base, k = name, 2
        while name in out:
            name = f"{base[:60]}_{k}"
            k += 1
        if name != low:
            warnings.append(
                f"column {src!r} is not lower_snake_case: the draft calls it '{name}'; rename it in the file "
                "(ingest matches names case-insensitively) or the file will be refused"
            )
        out.append(name)
    return out


_HINTS: dict[str, tuple[set[str], tuple[str, ...]]] = {
    # kind: (whole tokens, substrings of the joined name)
    "email": ({"email", "mail", "e_mail", "mailaddress"}, ("email",)),
    "phone": ({"phone", "tel", "telephone", "mobile", "cell", "cellphone", "fax", "msisdn", "handy", "telefon",
               "telefono", "landline"}, ("phone", "mobile", "telefon")),
    "person_name": ({"name", "fullname", "firstname", "lastname", "surname", "forename", "givenname", "fname",
                     "lname", "nom", "prenom", "nombre", "apellido", "vorname", "nachname", "username", "alias",
                     "maiden", "middlename"},
                    ("fullname", "firstname", "lastname", "surname", "forename", "givenname", "familyname",
                     "middlename")),
    "date_of_birth": ({"dob", "birth", "birthday", "birthdate", "born", "geburtsdatum", "nacimiento", "naissance"},
                      ("birth",)),
    "national_id": ({"ssn", "nin", "nino", "sin", "bsn", "nir", "insee", "passport", "tin", "taxid", "personnummer",
                     "cpr", "pesel", "nif", "nie", "dni", "aadhaar", "cnp", "ssnumber", "socialsecurity"},
                    ("nationalid", "nationalinsurance", "socialsecurity", "passport", "taxid", "taxnumber",
                     "personnummer", "idnumber", "idcard")),
    "postcode": ({"zip", "zipcode", "postcode", "postal", "postalcode", "plz", "eircode"},
                 ("postcode", "zipcode", "postalcode")),
    "address": ({"address", "street", "addr", "address1", "address2", "line1", "line2", "residence"},
                ("address", "street")),
    "free_text": ({"note", "notes", "comment", "comments", "remark", "remarks", "memo", "message", "feedback",
                   "bio", "text", "freetext", "narrative", "description", "details", "observations"},
                  ("comment", "remark", "freetext")),
    "ip": ({"ip", "ipaddress", "ipv4", "ipv6"}, ("ipaddress",)),
    "card": ({"card", "pan", "cardnumber", "ccnumber", "creditcard"}, ("cardnumber", "creditcard")),
    "iban": ({"iban", "bic"}, ("iban",)),
    "age": ({"age"}, ()),
    "sensitive": ({"sex", "gender", "ethnicity", "ethnic", "race", "religion", "religious", "belief", "health",
                   "diagnosis", "disability", "orientation", "sexuality", "political", "politics", "unionised",
                   "biometric", "genetic", "pregnancy", "pregnant", "medical", "illness", "disease",
                   "faith", "caste", "tribe"}, ("ethnic", "diagnos", "sexualorient", "religio")),
}
#: Words that make "name" something other than a person's name.
_NOT_PERSON = {"product", "merchant", "company", "file", "filename", "brand", "store", "shop", "item", "category",
               "city", "country", "street", "org", "organisation", "organization", "business", "team", "dataset",
               "table", "column", "host", "hostname", "domain", "project", "model", "bank", "branch", "plan", "event",
               "campaign", "app", "device", "region", "state", "town", "venue", "course", "school", "employer",
               "vendor", "supplier", "partner", "field", "tag", "label", "group", "role", "location", "place",
               "county", "district", "hotel", "restaurant", "club", "airport", "station", "street", "site"}
_PERSON_WORDS = {"customer", "client", "user", "person", "patient", "member", "subject", "employee", "applicant",
                 "citizen", "student", "participant", "holder", "cust", "usr", "buyer", "consumer", "resident",
                 "beneficiary", "insured", "policyholder", "contact", "individual", "people", "borrower", "guest",
                 "passenger", "traveller", "traveler", "donor", "voter", "pupil", "worker", "staff", "candidate"}
_ID_WORDS = {"id", "ref", "reference", "key", "uuid", "guid", "number", "no", "num", "nr", "code", "identifier",
             "uid", "pk"}


def _hints(name: str) -> set[str]:
    toks = _tokens(name)
    joined = "".join(toks)
    out = set()
    for kind, (words, subs) in _HINTS.items():
        if any(t in words for t in toks) or joined in words or any(s in joined for s in subs):
            out.add(kind)
    if "person_name" in out and (set(toks) & _NOT_PERSON):
        out.discard("person_name")
    if "email" in out:
        out.discard("address")  # e-mail address
        out.discard("ip")
    if "ip" in out:
        out.discard("address")
    if "date_of_birth" in out and set(toks) & {"place", "country", "city", "town", "name"}:
        out.discard("date_of_birth")  # place of birth, birth name: not a date
    if "card" in out and "iban" in out:
        out.discard("card")
    return out


def _said(name: str) -> str:
    return f"name '{name}'"


def _pct(k: int, n: int) -> str:
    if n == 0:
        return "0 %"
    if k == n:
        return "100 %"
    p = 100.0 * k / n
    shown = math.floor(p * 10) / 10  # never rounds up to 100
    return f"{shown:.1f}".rstrip("0").rstrip(".") + " %"


def _of(pr: _Profile) -> str:
    s = f"{pr.n:,} sampled value{'s' if pr.n != 1 else ''}"
    if pr.empty:
        s += f" ({pr.empty:,} empty)"
    return s


# ============================================================================ classification


@dataclass
class _Draft:
    name: str
    kind: str
    class_: ColumnClass
    protection: Protection
    confidence: Confidence
    evidence: list[str]
    spec: dict[str, Any]
    type: ColumnType = "string"


_DIRECT = {
    # kind: (what it is, format pattern written when the content fits it)
    "email": "an e-mail pattern",
    "phone": "a phone-number pattern",
    "person_name": "a person's name",
    "national_id": "a national id format",
    "card": "a payment card number (Luhn check)",
    "iban": "an IBAN (mod-97 check)",
    "ip": "an IP address",
    "address": "a street address",
    "free_text": "free text",
}
#: detector kinds that name a column from content alone (at STRONG_SHARE); the others need the name too
_STRONG = {"email", "national_id", "card", "iban", "ip", "postcode", "phone", "address"}


def _classify(pr: _Profile, name: str) -> _Draft:
    hints = _hints(pr.source)
    n = pr.n
    ev: list[str] = []

    def share(kind: str) -> float:
        return pr.share(kind)

    def direct(kind: str, confidence: Confidence, evidence: list[str]) -> _Draft:
        return _Draft(name, kind, ColumnClass.DIRECT_IDENTIFIER, Protection.VAULT, confidence, evidence, {})

    if n == 0:  # nothing but the name to go on
        named = sorted(hints & (set(_DIRECT) | {"date_of_birth", "postcode"}))
        if named:
            ev = [f"{_said(pr.source)} suggests {named[0].replace('_', ' ')}; every sampled value is empty"]
            if named[0] in ("date_of_birth", "postcode"):
                return _Draft(name, named[0], ColumnClass.QUASI_IDENTIFIER, Protection.ENCRYPT, "low", ev, {})
            return direct(named[0], "low", ev)
        return _Draft(name, "empty", ColumnClass.PUBLIC, Protection.NONE, "low",
                      [f"every one of the {pr.rows:,} sampled values is empty: nothing to go on"], {})

    # -- direct identifiers: a distinctive format, or a name that says so and content that agrees
    candidates: list[tuple[float, str]] = []
    for kind in ("email", "national_id", "card", "iban", "ip", "phone", "address"):
        s = share(kind)
        if (kind in _STRONG and s >= STRONG_SHARE) or (kind in hints and s >= HINTED_SHARE):
            candidates.append((s + (0.25 if kind in hints else 0.0), kind))
    # weak formats: need the name
    if "national_id" in hints and share("bsn") >= HINTED_SHARE:
        pr.kinds["national_id"] += pr.kinds["bsn"]
        pr.formats["national_id"] = pr.formats["bsn"]
        candidates.append((share("national_id") + 0.25, "national_id"))
    names_share = share("person_name")
    dict_share = pr.dictionary_names / n
    distinct_ratio = pr.distinct / n
    places = bool(set(_tokens(pr.source)) & _NOT_PERSON)  # city, product, merchant, ...: names of things
    if ("person_name" in hints and names_share >= HINTED_SHARE) or (
        names_share >= STRONG_SHARE and dict_share >= 0.5 and distinct_ratio >= 0.2 and not places
    ):
        candidates.append((names_share + (0.25 if "person_name" in hints else 0.0), "person_name"))
    text_share = share("free_text")
    if text_share >= HINTED_SHARE and distinct_ratio >= 0.3 and (text_share >= 0.6 or "free_text" in hints):
        candidates.append((text_share + (0.25 if "free_text" in hints else 0.0), "free_text"))
    if candidates:
        _, kind = max(candidates)
        return _direct_from_content(pr, name, kind, hints)

    # -- dates: of birth (quasi) or events (public)
    date_share = share("date") + share("timestamp")
    if "date_of_birth" in hints and date_share >= HINTED_SHARE:
        return _date_of_birth(pr, name, named=True)
    if share("date") >= STRONG_SHARE and _looks_like_births(pr):
        return _date_of_birth(pr, name, named=False)

    # -- postcodes: distinctive formats alone; 4/5-digit codes only with the name
    post = share("postcode") + (share("zip5") if pr.formats.get("postcode") == "US ZIP+4 code" else 0.0)
    weak = max(share("zip5"), share("zip4"))
    if post >= STRONG_SHARE or ("postcode" in hints and max(post, weak) >= HINTED_SHARE):
        return _postcode(pr, name, hints)

    # -- ages: whole numbers named age
    numeric, whole = _numeric_share(pr)
    if "age" in hints and numeric >= TYPE_SHARE and whole:
        nums = pr.numbers or [float(v) for v in pr.values if _FLOAT.match(v)]
        if nums and min(nums) >= 0 and max(nums) <= 130:
            return _Draft(name, "age", ColumnClass.QUASI_IDENTIFIER, Protection.GENERALIZE, "high",
                          [f"{_said(pr.source)} and {_pct(len(nums), n)} of {_of(pr)} are whole numbers from 0 to 130",
                           "generalized to 10-year buckets"],
                          {"generalize": "bucket:10", "min": 0, "max": 130}, type="int")

    # -- a name that says identifier but content that does not agree: protect it anyway, say so
    # (only text that varies like identifiers do: flags, numbers, dates and categories are not)
    named = sorted(hints & (set(_DIRECT) | {"postcode"}))
    texty = pr.native is None and numeric < TYPE_SHARE and date_share < HINTED_SHARE and _infer_type(pr)[0] == "string"
    if named and texty and distinct_ratio >= 0.2:
        kind = named[0]
        what = kind.replace("_", " ")
        matched = share(kind) if kind != "postcode" else max(post, weak)
        evidence = [f"{_said(pr.source)} suggests {what}, but only {_pct(round(matched * n), n)} of {_of(pr)} "
                    f"look like one: protected on the name alone — check it"]
        if kind == "postcode":
            return _Draft(name, "postcode", ColumnClass.QUASI_IDENTIFIER, Protection.ENCRYPT, "low", evidence, {})
        return direct(kind, "low", evidence)

    if "sensitive" in hints:
        words = sorted(set(_tokens(pr.source)) & _HINTS["sensitive"][0]) or [pr.source]
        return _Draft(name, "sensitive", ColumnClass.SENSITIVE, Protection.ENCRYPT, "medium",
                      [f"{_said(pr.source)}: '{words[0]}' is a special category of personal data "
                       "(GDPR art. 9) or a protected attribute: encrypted, usable only for sensitive purposes"], {})
    return _Draft(name, "public", ColumnClass.PUBLIC, Protection.NONE, "medium", [], {})


def _direct_from_content(pr: _Profile, name: str, kind: str, hints: set[str]) -> _Draft:
    n = pr.n
    k = pr.kinds[kind]
    by_name = kind in hints
    fmt = pr.formats.get(kind, "")
    if kind == "person_name":
        what = "capitalised names of one to five words"
        ev = [f"{_pct(k, n)} of {_of(pr)} are {what}"]
        if pr.dictionary_names:
            ev.append(f"{_pct(pr.dictionary_names, n)} contain a common first or last name")
        ev.append(f"{pr.distinct:,} distinct")
    elif kind == "free_text":
        words = sum(len(v.split()) for v in pr.values) / n
        ev = [f"{_pct(k, n)} of {_of(pr)} are free text (on average {words:.0f} words)"]
        ev.append(
            f"{_pct(pr.pii_in_text, n)} contain an e-mail, phone, id or card number"
            if pr.pii_in_text else "free text can carry anything personal"
        )
    elif kind == "national_id":
        ev = [f"{_pct(k, n)} of {_of(pr)} match the {fmt} format"]
    else:
        ev = [f"{_pct(k, n)} of {_of(pr)} match {_DIRECT[kind]}"]
    if by_name:
        ev.insert(0, _said(pr.source))
    share = k / n
    confidence: Confidence = "high" if (share >= 0.95 or (by_name and share >= STRONG_SHARE)) else (
        "medium" if share >= STRONG_SHARE or by_name else "low")
    if kind == "free_text" and not by_name and not pr.pii_in_text:
        confidence = "low"
    spec: dict[str, Any] = {}
    if kind == "email":
        spec["max_length"] = 254
    if share >= TYPE_SHARE:
        pattern = _direct_pattern(pr, kind)
        if pattern:
            spec["pattern"] = pattern
    d = _Draft(name, kind, ColumnClass.DIRECT_IDENTIFIER, Protection.VAULT, confidence, ev, spec)
    return d


def _direct_pattern(pr: _Profile, kind: str) -> str | None:
    """A pattern the column's values fit (named patterns preferred); none when fewer than TYPE_SHARE fit."""
    n = pr.n
    named = {"email": "email", "phone": "phone"}.get(kind)
    if named and sum(1 for v in pr.values if re.match(NAMED_PATTERNS[named], v)) >= TYPE_SHARE * n:
        return named
    if kind == "national_id":
        fmt = pr.formats.get(kind)
        regex = {
            "US social security number": r"^[0-9]{3}-[0-9]{2}-[0-9]{4}$",
            "UK National Insurance number": r"^[A-Za-z]{2} ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-Da-d]$",
            "Canadian social insurance number": r"^[0-9]{3}[ -][0-9]{3}[ -][0-9]{3}$",
            "Swedish personnummer": r"^([0-9]{2})?[0-9]{6}[-+][0-9]{4}$",
            "Spanish DNI": r"^[0-9]{8}-?[A-Za-z]$",
            "Italian codice fiscale": r"^[A-Za-z]{6}[0-9]{2}[A-Za-z][0-9]{2}[A-Za-z][0-9]{3}[A-Za-z]$",
            "9-digit number passing the Dutch BSN check": r"^[0-9]{9}$",
        }.get(fmt or "")
        if regex and sum(1 for v in pr.values if re.match(regex, v)) >= TYPE_SHARE * n:
            return regex
    return None


def _looks_like_births(pr: _Profile) -> bool:
    """Dates with no name to go on look like dates of birth when (nearly) every one is in the past,
    the newest of those at least 12 years ago, and they spread over at least 30 years."""
    past = [d for d in pr.dates if d <= pr.today]
    if not past or len(past) < TYPE_SHARE * len(pr.dates):
        return False
    lo, hi = min(past), max(past)
    return hi <= pr.today - timedelta(days=365 * 12) and (hi - lo).days >= 365 * 30


def _date_of_birth(pr: _Profile, name: str, *, named: bool) -> _Draft:
    n = pr.n
    fmt = pr.date_format
    label = fmt[1] if fmt else "dates"
    dates = pr.dates
    past = sum(1 for d in dates if d <= pr.today)
    ev = []
    if named:
        ev.append(_said(pr.source))
    timestamps = pr.kinds["timestamp"]
    parsed = len(dates) + timestamps
    desc = f"{_pct(parsed, n)} of {_of(pr)} parse as dates ({label})"
    if dates:
        desc += ", all before today" if past == len(dates) else f", {_pct(past, len(dates))} before today"
    ev.append(desc)
    if not named:
        ev.append("no name to go on: every date is at least 12 years old and they span over 30 years, "
                  "as dates of birth do")
    confidence: Confidence = "high" if named and parsed >= TYPE_SHARE * n else ("medium" if named else "low")
    if pr.ambiguous_dates:
        ev.append("day and month are ambiguous in every sampled value: read as dd/mm")
    iso = pr.native == "date" or (fmt is not None and fmt[1] == "yyyy-mm-dd" and len(dates) >= TYPE_SHARE * n)
    if iso:
        spec: dict[str, Any] = {"generalize": "year", "min": "1900-01-01"}
        if past >= TYPE_SHARE * max(len(dates), 1):
            spec["max"] = "today"
        ev.append("kept as the year of birth")
        return _Draft(name, "date_of_birth", ColumnClass.QUASI_IDENTIFIER, Protection.GENERALIZE, confidence, ev,
                      spec, type="date")
    spec = {}
    if fmt is not None and len(dates) >= TYPE_SHARE * n:
        spec["pattern"] = fmt[2]
    ev.append(f"{label} is not an ISO date, which ingest types as a date: kept as text, encrypted "
              "(convert the file to yyyy-mm-dd to keep just the year)")
    return _Draft(name, "date_of_birth", ColumnClass.QUASI_IDENTIFIER, Protection.ENCRYPT, confidence, ev, spec)


def _postcode(pr: _Profile, name: str, hints: set[str]) -> _Draft:
    n = pr.n
    ev = [_said(pr.source)] if "postcode" in hints else []
    strong = pr.kinds["postcode"]
    if strong >= max(pr.kinds["zip5"], pr.kinds["zip4"]) or (
        pr.formats.get("postcode") == "US ZIP+4 code" and strong + pr.kinds["zip5"] >= HINTED_SHARE * n
    ):
        label = pr.formats.get("postcode", "postcode")
        k = strong
        entry = next(e for e in _POSTCODES_STRONG if e[0] == label)
        generalize, pattern = entry[2], entry[3]
        if label == "US ZIP+4 code":  # ZIP and ZIP+4 mixed
            label, k = "US ZIP or ZIP+4", strong + pr.kinds["zip5"]
    elif pr.kinds["zip5"] >= pr.kinds["zip4"]:
        label, k, generalize, pattern = "5-digit postcode (US ZIP / DE / FR style)", pr.kinds["zip5"], "prefix:3", "zip5"
    else:
        label, k, generalize, pattern = "4-digit postcode", pr.kinds["zip4"], "prefix:2", r"^[0-9]{4}$"
    ev.append(f"{_pct(k, n)} of {_of(pr)} match the {label} format")
    n_keep = generalize.split(":")[1]
    ev.append(f"generalized to its first {n_keep} characters (the area, not the street)")
    spec: dict[str, Any] = {"generalize": generalize}
    if k >= TYPE_SHARE * n:
        spec["pattern"] = pattern
    confidence: Confidence = "high" if k >= TYPE_SHARE * n and ("postcode" in hints or strong) else "medium"
    return _Draft(name, "postcode", ColumnClass.QUASI_IDENTIFIER, Protection.GENERALIZE, confidence, ev, spec)


# ============================================================================ subject key


def _id_words(name: str) -> tuple[bool, bool]:
    toks = set(_tokens(name))
    joined = "".join(_tokens(name))
    person = bool(toks & _PERSON_WORDS) or any(w in joined for w in ("customer", "client", "patient", "member",
                                                                      "employee", "applicant"))
    ident = bool(toks & _ID_WORDS) or joined.endswith("id")
    return person, ident


def _choose_subject_key(profiles: list[_Profile], drafts: list[_Draft]) -> SubjectKeyGuess:
    scored: list[tuple[float, int, list[str]]] = []
    for i, (pr, d) in enumerate(zip(profiles, drafts, strict=True)):
        if pr.n == 0:
            continue
        ids = pr.id_like
        is_int = pr.native == "int" or (pr.native is None and sum(1 for v in pr.values if _INT.match(v)) == pr.n)
        id_share = 1.0 if is_int else ids / pr.n
        if d.class_ is not ColumnClass.PUBLIC or id_share < TYPE_SHARE or pr.native in ("double", "date",
                                                                                         "timestamp", "bool"):
            continue
        if pr.kinds["date"] or pr.kinds["timestamp"]:
            continue
        person, ident = _id_words(pr.source)
        unique = pr.distinct / pr.n
        score = 0.0
        ev: list[str] = []
        if person and ident:
            score += 4
            ev.append(f"{_said(pr.source)} names a person and an id")
        elif ident:
            score += 1.5
            ev.append(f"{_said(pr.source)} names an id")
        elif person:
            score += 1
            ev.append(f"{_said(pr.source)} names a person")
        if unique >= 0.99:
            score += 1.5
            ev.append(f"{pr.distinct:,} of {pr.n:,} sampled values distinct")
        elif person and ident:
            ev.append(f"{pr.distinct:,} distinct in {pr.n:,} sampled values: several rows per subject")
        else:
            ev.append(f"only {pr.distinct:,} distinct in {pr.n:,} sampled values")
        ev.append(f"{_pct(pr.id_like if not is_int else pr.n, pr.n)} look like ids (no spaces, a digit, "
                  "at most 64 characters)")
        if pr.empty > 0.01 * pr.rows:
            score -= 1
            ev.append(f"{_pct(pr.empty, pr.rows)} empty")
        if score < 1.5 or not (unique >= 0.99 or person):  # unique and id-like, or named for a person
            continue
        scored.append((score, -i, ev))
    scored.sort(reverse=True)
    if scored:
        score, neg_i, ev = scored[0]
        confidence: Confidence = "high" if score >= 5 else ("medium" if score >= 3 else "low")
        if len(scored) > 1 and scored[1][0] >= score - 0.5:
            confidence = "low" if confidence == "medium" else "medium" if confidence == "high" else confidence
        alts = tuple(drafts[-j].name for _, j, _ in scored[1:4])
        if alts:
            ev.append("other candidates: " + ", ".join(alts))
        return SubjectKeyGuess(drafts[-neg_i].name, confidence, tuple(ev), alts)
    # No id-like column: the most distinct direct identifier (an e-mail, say), else the most distinct column.
    def distinct(i: int) -> float:
        return profiles[i].distinct / max(profiles[i].n, 1)

    pool = [i for i, d in enumerate(drafts) if d.class_ is ColumnClass.DIRECT_IDENTIFIER and d.kind != "free_text"]
    pool = pool or list(range(len(drafts)))
    best = max(pool, key=lambda i: (distinct(i), -i))
    pr = profiles[best]
    ev = [f"no unique id-like column was found: '{pr.source}' is the most distinct candidate "
          f"({pr.distinct:,} of {pr.n:,} sampled values distinct)",
          "add a stable id for each person if the file has none: a tokenized subject key is what erasure finds"]
    return SubjectKeyGuess(drafts[best].name, "low", tuple(ev))


def _subject_key_column(pr: _Profile, d: _Draft, key: SubjectKeyGuess) -> _Draft:
    spec: dict[str, Any] = {"required": True}
    if pr.n and pr.distinct / pr.n >= 0.99:
        spec["unique"] = True
    spec["max_length"] = 64 if pr.max_len <= 64 else _length_cap(pr.max_len)
    ev = list(key.evidence)
    if d.class_ is not ColumnClass.PUBLIC:
        ev.append(f"it also looks like {d.kind.replace('_', ' ')}: tokenized, the value itself never lands")
    return _Draft(d.name, "subject_key", ColumnClass.SUBJECT_KEY, Protection.TOKENIZE, key.confidence, ev, spec)


# ============================================================================ types, ranges, allowed


def _numeric_share(pr: _Profile) -> tuple[float, bool]:
    """Share of values that are numbers, and whether all those are whole numbers."""
    if pr.native in ("int", "double"):
        return 1.0, pr.native == "int"
    if not pr.n:
        return 0.0, False
    ints = sum(1 for v in pr.values if _INT.match(v))
    floats = sum(1 for v in pr.values if _FLOAT.match(v))
    return floats / pr.n, ints == floats


def _infer_type(pr: _Profile) -> tuple[ColumnType, list[str]]:
    n = pr.n
    if pr.native is not None:
        return pr.native, [f"typed {pr.native} in the file"]
    if not n:
        return "string", []
    lowered = [v.lower() for v in pr.values]
    if all(v in _TRUE or v in _FALSE for v in lowered) and {v for v in lowered} & (_TRUE | _FALSE):
        return "bool", [f"{_pct(n, n)} of {_of(pr)} are true/false words"]
    share, whole = _numeric_share(pr)
    if share >= TYPE_SHARE:
        leading_zero = sum(1 for v in pr.values if len(v) > 1 and v[0] == "0" and v[1].isdigit())
        if leading_zero:
            return "string", [f"{_pct(leading_zero, n)} of {_of(pr)} are digits with leading zeros: "
                              "a code, kept as text"]
        t: ColumnType = "int" if whole else "double"
        word = "whole numbers" if whole else "numbers"
        return t, [f"{_pct(round(share * n), n)} of {_of(pr)} are {word}"]
    if pr.kinds["timestamp"] >= TYPE_SHARE * n:
        return "timestamp", [f"{_pct(pr.kinds['timestamp'], n)} of {_of(pr)} are ISO timestamps"]
    if pr.date_format and pr.date_format[1] == "yyyy-mm-dd" and len(pr.dates) >= TYPE_SHARE * n:
        return "date", [f"{_pct(len(pr.dates), n)} of {_of(pr)} are ISO dates"]
    return "string", []


def _nice_step(span: float) -> float:
    """The smallest round step (1, 2 or 5 × 10^k) that covers ``span`` in at most five steps."""
    if span <= 0:
        return 1.0
    k = math.floor(math.log10(span))
    for mult in (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0):
        step = mult * 10.0**k
        if span / step <= 5:
            return step
    return 10.0 ** (k + 1)


def _clean(x: float, whole: bool) -> int | float:
    if whole or float(x).is_integer():
        return int(round(x))
    return float(Decimal(repr(x)).normalize())


def _range(nums: list[float], whole: bool) -> tuple[int | float, int | float, list[str]]:
    lo, hi = min(nums), max(nums)
    notes: list[str] = []
    negatives = sum(1 for x in nums if x < 0)
    if lo < 0 and negatives <= 0.01 * len(nums):
        notes.append(f"{negatives:,} negative value(s) ({_pct(negatives, len(nums))}) left out of the range: "
                     "rows like them would be quarantined")
        lo = min(x for x in nums if x >= 0)
    step = _nice_step(hi - lo if hi != lo else max(abs(hi), 1.0))
    if whole:
        step = max(step, 1.0)
    low = math.floor(lo / step) * step
    high = math.ceil(hi / step) * step
    if lo >= 0 > low:
        low = 0.0
    digits = max(0, -int(math.floor(math.log10(step)))) if step < 1 else 0
    low, high = round(low, digits), round(high, digits)
    # A heavy tail (incomes, amounts, balances): a sample's extreme understates the file's, so
    # that side goes out to the next power of ten.
    mags = sorted(abs(x) for x in nums)
    typical = mags[len(mags) // 2]
    if typical > 0 and hi > 0 and hi / typical > 4:
        high = max(high, 10.0 ** math.ceil(math.log10(hi)))
        notes.append(f"heavy tail (largest {hi / typical:.0f} × the median size): max out to a power of ten")
    if typical > 0 and low < 0 and -lo / typical > 4:
        low = min(low, -(10.0 ** math.ceil(math.log10(-lo))))
        notes.append("heavy tail below zero: min out to a power of ten")
    return _clean(low, whole), _clean(high, whole), notes


_MIN_LENGTH = {"person_name": 200, "address": 256, "free_text": 1000, "ip": 45, "phone": 32, "email": 254}


def _length_cap(m: int) -> int:
    for cap in (32, 64, 128, 256, 1000, 4000, 16000, 64000, 250000, 1000000):
        if cap >= 2 * m:
            return cap
    return 1_000_000


def _finish(pr: _Profile, d: _Draft) -> ColumnSuggestion:
    """Add the type, the contract (ranges, allowed values, lengths) and the evidence for it."""
    spec: dict[str, Any] = {"class": d.class_.value}
    if d.class_ not in (ColumnClass.SUBJECT_KEY, ColumnClass.PUBLIC):  # the only protection of each
        spec["protection"] = d.protection.value
    if "generalize" in d.spec:
        spec["generalize"] = d.spec["generalize"]
    ev = list(d.evidence)
    ctype: ColumnType = d.type
    if d.class_ in (ColumnClass.PUBLIC, ColumnClass.SENSITIVE):
        ctype, type_ev = _infer_type(pr)
        if d.kind == "public":
            d.kind = {"int": "number", "double": "number", "bool": "flag", "date": "date",
                      "timestamp": "timestamp"}.get(ctype, "text")
        ev.extend(type_ev)
    spec["type"] = ctype
    for k in ("required", "unique", "pattern", "min", "max"):
        if k in d.spec:
            spec[k] = d.spec[k]
    if d.class_ in (ColumnClass.PUBLIC, ColumnClass.SENSITIVE):
        _contract(pr, d, ctype, spec, ev)
    constrained = "allowed" in spec or "pattern" in spec
    if "max_length" in d.spec:
        spec["max_length"] = d.spec["max_length"]
    elif ctype == "string" and not constrained and d.class_ is not ColumnClass.SUBJECT_KEY and pr.n:
        # twice the longest sampled value, rounded up; at least what such values can need
        cap = max(_length_cap(pr.max_len), _MIN_LENGTH.get(d.kind, 0))
        if cap != 1000:
            spec["max_length"] = cap
    if not ev:
        ev.append("no identifier pattern or name found")
    return ColumnSuggestion(
        source=pr.source, name=d.name, kind=d.kind, class_=d.class_, protection=d.protection, type=ctype,
        confidence=d.confidence, evidence=tuple(ev), spec=spec,
    )


def _contract(pr: _Profile, d: _Draft, ctype: ColumnType, spec: dict[str, Any], ev: list[str]) -> None:
    """Ranges, allowed values and uniqueness of a public or sensitive column (their values may be written)."""
    n = pr.n
    if not n:
        return
    if ctype in ("int", "double"):
        nums = pr.numbers if pr.native in ("int", "double") else [float(v) for v in pr.values if _FLOAT.match(v)]
        if nums:
            lo, hi, notes = _range(nums, ctype == "int")
            spec["min"], spec["max"] = lo, hi
            ev.append(f"range rounded outward from the sample: {_num(lo, grouped=True)} to {_num(hi, grouped=True)}")
            ev.extend(notes)
    elif ctype in ("date", "timestamp"):
        days: list[date] = pr.dates or [d for d in map(_to_date, pr.values) if d is not None]
        if days:
            first, last = min(days), max(days)
            spec["min"] = f"{(first.year // 10) * 10:04d}-01-01"
            past = sum(1 for x in days if x <= pr.today)
            if past >= TYPE_SHARE * len(days):
                spec["max"] = "today"
                ev.append(f"{_pct(past, len(days))} of the dates are before today: max today; "
                          f"min the start of the decade of the earliest")
            else:
                spec["max"] = f"{last.year + 1:04d}-12-31"
                ev.append("some dates are in the future: max the end of the year after the latest")
    elif ctype == "string":
        counts = Counter(pr.values)
        rare = [v for v, c in counts.items() if c == 1] if n >= 200 else []
        kept = sorted(v for v in counts if v not in set(rare))
        if 1 <= len(kept) <= 20 and len(counts) * 3 <= n and pr.max_len <= 64 and not _looks_personal(kept):
            spec["allowed"] = kept
            d.kind = "category" if d.class_ is ColumnClass.PUBLIC else d.kind
            ev.append(f"{len(kept)} distinct values in {_of(pr)}: a category, listed as allowed")
            if rare:
                ev.append(f"{len(rare)} value(s) seen only once left out (rows with them would be quarantined: "
                          "add them if they are valid)")
        elif pr.distinct == n and n >= 2:
            person, ident = _id_words(pr.source)
            if ident and pr.id_like >= TYPE_SHARE * n:
                spec["unique"] = True
                d.kind = "id"
                ev.append(f"all {n:,} sampled values distinct and id-like: unique")
            if n >= 20 and d.class_ is ColumnClass.PUBLIC and not ident and d.confidence != "low":
                d.confidence = "medium"
        if d.class_ is ColumnClass.PUBLIC and pr.distinct * 2 > n and not spec.get("allowed") and not spec.get("unique"):
            ev.append(f"{pr.distinct:,} distinct in {_of(pr)}; no identifier pattern or name found")
        if pr.date_format is not None and len(pr.dates) >= TYPE_SHARE * n and pr.date_format[1] != "yyyy-mm-dd":
            spec["pattern"] = pr.date_format[2]
            ev.append(f"dates as {pr.date_format[1]}: kept as text with a pattern (ingest types only ISO dates)")


def _looks_personal(values: list[str]) -> bool:
    return any(_EMAIL.match(v) or next(find_pii(v), None) is not None for v in values)


def _to_date(v: str) -> date | None:
    try:
        return datetime.fromisoformat(v.replace("Z", "+00:00")).date()
    except ValueError:
        return None


# ============================================================================ rendering

_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_YAML_WORDS = {"y", "n", "yes", "no", "true", "false", "on", "off", "null", "~"}


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return _num(v)
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    s = str(v)
    if _PLAIN.match(s) and s.lower() not in _YAML_WORDS:
        return s
    return json.dumps(s)  # a JSON string is a YAML double-quoted scalar


def _num(v: float | int, *, grouped: bool = False) -> str:
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}" if grouped else str(int(v))
    return format(Decimal(repr(float(v))).normalize(), ",f" if grouped else "f")


def _comment(text: str, indent: str, width: int = 110) -> list[str]:
    text = " ".join(text.split())  # one line: no newline from a column name can end the comment
    lines = textwrap.wrap(text, width=width - len(indent) - 2, break_long_words=True, break_on_hyphens=False)
    return [f"{indent}# {lines[0]}"] + [f"{indent}#   {ln}" for ln in lines[1:]]


def _render(s: PolicySuggestion) -> str:
    what = {"csv": "CSV", "parquet": "Parquet", "jsonl": "JSON Lines"}[s.format]
    out = _comment(
        f"Draft policy for dataset '{s.dataset}', suggested by `lakewarden policy suggest` from {s.source} "
        f"({what}, {s.rows_sampled:,} row{'s' if s.rows_sampled != 1 else ''} sampled from its start). Every class, protection, range and allowed "
        "list below is a guess from that sample: review each column, fill in the TODOs, then run "
        "`lakewarden policy check`.", "")
    out += _comment(
        "No value of an identifier column is written here: evidence is counts and formats; allowed lists "
        "and ranges come only from public and sensitive columns.", "")
    for w in s.warnings:
        out += _comment(f"warning: {w}", "")
    out += [
        "kind: dataset",
        f"dataset: {s.dataset}",
        'description: "TODO: what one row of this dataset is"',
        "owner: data_engineer",
    ]
    out += _comment(f"subject key ({s.subject_key.confidence} confidence): " + "; ".join(s.subject_key.evidence), "")
    out.append(f"subject_key: {s.subject_key.column}")
    out.append("columns:")
    for c in s.columns:
        label = c.class_.value.replace("_", " ")
        if c.kind not in (c.class_.value, "sensitive"):
            label += ", " + c.kind.replace("_", " ")
        head = f"{c.name}: {label} ({c.confidence})"
        if c.source.strip().lower() != c.name:
            head += f"; the file calls it {c.source!r}"
        out += _comment(head + " — " + "; ".join(c.evidence), "  ")
        body = ", ".join(f"{k}: {_scalar(v)}" for k, v in c.spec.items())
        out.append(f"  {c.name}: {{{body}}}")
    out += [
        "purposes:",
        '  analytics: {description: "TODO: aggregate reporting, say; add one purpose per use of the data"}',
        "access:",
        "  # who may read which layer; direct identifiers show as redacted, sensitive columns as NULL unless",
        "  # a role's masks say otherwise. Add roles (analyst, data_scientist, ...) as they need the data.",
        "  data_engineer:",
        "    layers: [bronze, silver, quarantine]",
        "    purposes: [analytics]",
        "  compliance_officer:",
        "    layers: [bronze, silver, quarantine, vault]",
        "    purposes: [analytics]",
        "retention:",
        "  landing: 7d",
        "  bronze: 2y",
        "  silver: 2y",
        "  quarantine: 90d",
        "  history: 7d",
        "landing: remove",
        "contract:",
        "  unknown_columns: reject      # a column no policy classifies never lands",
        '  missing_columns: "null"',
        "  schema_evolution: merge",
    ]
    return "\n".join(out) + "\n"
