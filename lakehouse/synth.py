"""Deterministic synthetic landing data: loan applicants and their card transactions.

Two datasets, written as landing files for the governed ingest to pick up:

* ``customers`` -- one row per person, the columns of ``policies/customers.yaml``:
  ``customer_id`` ("C-" + 9 digits), ``name``, ``email`` (only at the reserved
  ``example.org``/``example.com``/``example.net`` domains), ``phone`` (only in the
  fictional ``555-0100``..``555-0199`` range), ``birth_date`` (ages 18-90 on
  1 January of ``year``), ``zip_code``, ``sex``, ``ethnicity``, ``income`` (log-normal,
  region dependent), ``region`` (about 2% ``"restricted"``) and the label ``defaulted``.
* ``transactions`` -- many rows per person: ``transaction_id`` ("T-" + 12 digits,
  unique), ``customer_id``, ``ts`` (UTC, microseconds, inside ``year``), ``amount``
  (heavy tailed, > 0), ``merchant_category`` and ``channel``.

Contract:

* **Deterministic.** The same arguments give byte-identical files (with the same
  numpy, pyarrow and Faker versions). Every draw comes from
  ``numpy.random.Generator(PCG64(...))`` seeded by ``SeedSequence(seed, spawn_key=...)``
  per block of 8,192 people and per purpose, so the *data* does not depend on
  ``chunk_rows`` (only Parquet row-group boundaries do), the customers do not depend on
  ``transactions_per_person``, and the good rows do not depend on ``bad_rows``. Faker,
  seeded, is used once to build pools of first and last names; rows are composed with
  numpy/pyarrow, never with Faker per row.
* **Bounded memory.** Data is generated block by block and written in batches of
  ``chunk_rows``; no dataset is ever held whole.
* **Bias knob.** ``defaulted`` depends on income (lower income, more defaults) and, with
  weight ``bias`` in [0, 1], directly on the sensitive attributes (``group_e``,
  ``group_f`` and sex ``"F"`` default more) plus a small income penalty for the same
  groups (a proxy a model without sensitive inputs can still pick up). With ``bias=0``
  the groups differ only by sampling noise.
* **Bad rows.** ``bad_rows`` (a fraction of ``people``) adds extra customer rows, each
  with exactly one defect of a kind in :data:`BAD_ROW_KINDS`, at random positions.
  The ``people`` good rows are unchanged, and every transaction refers to a good row.

Example:

>>> import tempfile
>>> from lakehouse.synth import generate, read_landing
>>> with tempfile.TemporaryDirectory() as d:
...     result = generate(d, people=200, transactions_per_person=3, seed=7, bad_rows=0.05)
...     customers = read_landing(result.files["customers"])
...     (result.rows["customers"] == 200 + sum(result.bad_rows.values()),
...      customers.num_rows == result.rows["customers"])
(True, True)
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "BAD_ROW_KINDS",
    "CHANNELS",
    "CUSTOMERS_SCHEMA",
    "DATASETS",
    "EMAIL_DOMAINS",
    "ETHNICITIES",
    "MAX_NAME_LENGTH",
    "MERCHANT_CATEGORIES",
    "REGIONS",
    "SEXES",
    "TRANSACTIONS_SCHEMA",
    "SynthOptions",
    "SynthResult",
    "generate",
    "iter_customers",
    "iter_transactions",
    "read_landing",
]

Format = Literal["csv", "parquet", "jsonl"]
Progress = Callable[[str, int, int], None]

CUSTOMERS_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("name", pa.string()),
        ("email", pa.string()),
        ("phone", pa.string()),
        ("birth_date", pa.date32()),
        ("zip_code", pa.string()),
        ("sex", pa.string()),
        ("ethnicity", pa.string()),
        ("income", pa.float64()),
        ("region", pa.string()),
        ("defaulted", pa.bool_()),
    ]
)
TRANSACTIONS_SCHEMA = pa.schema(
    [
        ("transaction_id", pa.string()),
        ("customer_id", pa.string()),
        ("ts", pa.timestamp("us", tz="UTC")),
        ("amount", pa.float64()),
        ("merchant_category", pa.string()),
        ("channel", pa.string()),
    ]
)
_SCHEMAS = {"customers": CUSTOMERS_SCHEMA, "transactions": TRANSACTIONS_SCHEMA}
#: The datasets :func:`generate` writes (one file each): what a pipeline source ``synthetic`` can feed.
DATASETS = tuple(_SCHEMAS)
_SUFFIX = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}

SEXES = ("F", "M", "X")
_SEX_P = (0.505, 0.485, 0.010)
ETHNICITIES = ("group_a", "group_b", "group_c", "group_d", "group_e", "group_f")
_ETHNICITY_P = (0.38, 0.24, 0.15, 0.11, 0.08, 0.04)
REGIONS = ("north", "south", "east", "west", "restricted")
_REGION_P = (0.25, 0.31, 0.22, 0.20, 0.02)
_REGION_MEDIAN_INCOME = (58_000.0, 47_000.0, 62_000.0, 55_000.0, 51_000.0)
_REGION_ZIP_FIRST_DIGITS = ((5, 6), (3, 7), (0, 1, 2), (8, 9), (4,))
EMAIL_DOMAINS = ("example.org", "example.com", "example.net")  # RFC 2606 reserved
_EMAIL_DOMAIN_P = (0.5, 0.3, 0.2)
_EMAIL_SEPARATORS = (".", "_", "")

#: category, share of transactions, median amount, log-sd, P(card, online, transfer)
_CATEGORIES = (
    ("grocery", 0.22, 45.0, 0.7, (0.90, 0.08, 0.02)),
    ("restaurants", 0.14, 30.0, 0.7, (0.85, 0.15, 0.00)),
    ("fuel", 0.07, 50.0, 0.4, (0.97, 0.03, 0.00)),
    ("transport", 0.08, 15.0, 0.8, (0.70, 0.30, 0.00)),
    ("retail", 0.13, 60.0, 1.0, (0.60, 0.40, 0.00)),
    ("electronics", 0.04, 180.0, 1.0, (0.30, 0.70, 0.00)),
    ("travel", 0.03, 400.0, 1.0, (0.30, 0.60, 0.10)),
    ("entertainment", 0.08, 25.0, 0.8, (0.50, 0.50, 0.00)),
    ("health", 0.06, 80.0, 0.9, (0.70, 0.20, 0.10)),
    ("utilities", 0.07, 110.0, 0.5, (0.10, 0.30, 0.60)),
    ("rent", 0.03, 1_300.0, 0.4, (0.00, 0.10, 0.90)),
    ("cash_withdrawal", 0.05, 100.0, 0.7, (1.00, 0.00, 0.00)),
)
MERCHANT_CATEGORIES = tuple(c[0] for c in _CATEGORIES)
CHANNELS = ("card", "online", "transfer")

BAD_ROW_KINDS = (
    "invalid_email",
    "negative_income",
    "empty_customer_id",
    "duplicate_customer_id",
    "future_birth_date",
    "unknown_region",
    "overlong_name",
)
#: Good names are far shorter; every ``overlong_name`` bad row is longer than this.
MAX_NAME_LENGTH = 255
_UNKNOWN_REGIONS = ("central", "unknown", "nort", "N/A")

# The label model (logit scale). Income is centred on a constant, not on the data, so
# each block is generated independently.
_LOG_INCOME_CENTER = math.log(53_000.0)
_LOG_INCOME_SD = 0.55
_DEFAULT_INTERCEPT = -2.2
_DEFAULT_PER_INCOME_SD = -1.0
_DEFAULT_PER_YEAR_OF_AGE = -0.02
_BIAS_LOGIT_ETHNICITY = np.array([0.0, 0.0, 0.0, 0.0, 1.2, 1.6])
_BIAS_LOGIT_SEX = np.array([0.5, 0.0, 0.0])
_BIAS_LOG_INCOME_ETHNICITY = np.array([0.0, 0.0, 0.0, 0.0, 0.15, 0.25])
_BIAS_LOG_INCOME_SEX = np.array([0.08, 0.0, 0.0])

_BLOCK_PEOPLE = 8_192  # the unit of generation (and of RNG streams)
_TX_SUBBLOCK_ROWS = 262_144  # transactions generated at once, at most (one person may exceed it)
_CUSTOMER_ID_DIGITS = 9
_TRANSACTION_ID_DIGITS = 12
_MAX_PEOPLE = 100_000_000
_MAX_EXPECTED_TRANSACTIONS = 10**11
_NAME_POOL_SIZES = (3_000, 3_000, 4_000)  # female first, male first, last

# RNG purposes (first element of every spawn key).
_S_PEOPLE, _S_TX_COUNTS, _S_TX_ROWS, _S_BAD, _S_IDS = range(5)


@dataclass(frozen=True, kw_only=True)
class SynthOptions:
    """What to generate. Validated on construction; every field changes the data except
    ``fmt`` and ``chunk_rows`` (which change only the file encoding / batching).

    Raises:
        ValueError: an option is out of range; the message names it and the valid range.
    """

    people: int
    transactions_per_person: float = 10.0
    seed: int = 0
    bias: float = 0.3
    fmt: Format = "csv"
    chunk_rows: int = 250_000
    bad_rows: float = 0.0
    year: int = 2024

    def __post_init__(self) -> None:
        _check_int("people", self.people, 1, _MAX_PEOPLE)
        _check_int("seed", self.seed, 0, None)
        _check_int("chunk_rows", self.chunk_rows, 1, None)
        _check_int("year", self.year, 2000, 2099)
        _check_number("transactions_per_person", self.transactions_per_person, 0.0, None)
        _check_number("bias", self.bias, 0.0, 1.0)
        _check_number("bad_rows", self.bad_rows, 0.0, 0.5)
        if self.fmt not in _SUFFIX:
            raise ValueError(f"fmt must be one of {', '.join(map(repr, _SUFFIX))}; got {self.fmt!r}")
        if self.people * self.transactions_per_person > _MAX_EXPECTED_TRANSACTIONS:
            raise ValueError(
                f"people * transactions_per_person must be at most {_MAX_EXPECTED_TRANSACTIONS:,} "
                f"(transaction ids have 12 digits); got {self.people * self.transactions_per_person:,.0f}"
            )


@dataclass(frozen=True)
class SynthResult:
    """What :func:`generate` wrote.

    Attributes:
        options: the validated options used.
        files: dataset name (``"customers"``, ``"transactions"``) to the file written.
        rows: dataset name to the number of rows written (customers include bad rows).
        bad_rows: bad-row kind to the number injected into customers; empty when
            ``bad_rows == 0``, otherwise every kind of :data:`BAD_ROW_KINDS` is a key.
    """

    options: SynthOptions
    files: dict[str, Path]
    rows: dict[str, int]
    bad_rows: dict[str, int] = field(default_factory=dict)


def generate(
    out_dir: str | os.PathLike[str],
    *,
    people: int,
    transactions_per_person: float = 10.0,
    seed: int = 0,
    bias: float = 0.3,
    fmt: Format = "csv",
    chunk_rows: int = 250_000,
    bad_rows: float = 0.0,
    year: int = 2024,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SynthResult:
    """Write ``customers.<fmt>`` and ``transactions.<fmt>`` into ``out_dir``.

    Args:
        out_dir: folder for the two files; created if missing.
        people: number of (good) customers, at least 1.
        transactions_per_person: mean transactions per customer (per-person activity
            varies, so the total is random around ``people * transactions_per_person``).
        seed: non-negative seed; same arguments give byte-identical files.
        bias: in [0, 1], how strongly ``defaulted`` depends on sex and ethnicity.
        fmt: ``"csv"`` (default), ``"parquet"`` or ``"jsonl"``. CSV and JSON Lines write
            ``ts`` as ``2024-03-01T12:34:56.123456Z`` and dates as ``YYYY-MM-DD``.
        chunk_rows: rows per written batch (and per Parquet row group); bounds memory.
        bad_rows: in [0, 0.5], bad customer rows to add, as a fraction of ``people``.
        year: calendar year of the transactions, 2000-2099; ages are taken on 1 January of it.
        overwrite: replace existing files. Without it an existing file is an error.
        progress: called as ``progress(dataset, people_done, people)`` after each block
            of people has been written to ``dataset``.

    Returns:
        A :class:`SynthResult` with the files, row counts and injected bad rows by kind.

    Raises:
        ValueError: an option is out of range (the message says which and why).
        FileExistsError: a target file exists and ``overwrite`` is false.
    """
    opts = SynthOptions(
        people=people,
        transactions_per_person=transactions_per_person,
        seed=seed,
        bias=bias,
        fmt=fmt,
        chunk_rows=chunk_rows,
        bad_rows=bad_rows,
        year=year,
    )
    out = Path(out_dir)
    targets = {name: out / f"{name}{_SUFFIX[opts.fmt]}" for name in _SCHEMAS}
    if not overwrite:
        for path in targets.values():
            if path.exists():
                raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    partial = {name: path.with_name(path.name + ".partial") for name, path in targets.items()}
    writers = {name: _open_writer(opts.fmt, partial[name], _SCHEMAS[name], opts.chunk_rows) for name in _SCHEMAS}
    bad_counts = np.zeros(len(BAD_ROW_KINDS), dtype=np.int64)
    try:
        for block in _blocks(opts, with_transactions=True):
            writers["customers"].write(block.customers)
            bad_counts += block.bad_counts
            if progress is not None:
                progress("customers", block.people_done, opts.people)
            writers["transactions"].write(block.transactions)
            if progress is not None:
                progress("transactions", block.people_done, opts.people)
        rows = {name: w.close() for name, w in writers.items()}
    except BaseException:
        for name, w in writers.items():
            w.abort()
            partial[name].unlink(missing_ok=True)
        raise
    for name in _SCHEMAS:
        os.replace(partial[name], targets[name])
    bad = {kind: int(n) for kind, n in zip(BAD_ROW_KINDS, bad_counts, strict=True)} if opts.bad_rows > 0 else {}
    return SynthResult(options=opts, files=targets, rows=rows, bad_rows=bad)


def iter_customers(
    *,
    people: int,
    seed: int = 0,
    bias: float = 0.3,
    bad_rows: float = 0.0,
    chunk_rows: int = 250_000,
    year: int = 2024,
) -> Iterator[pa.RecordBatch]:
    """Stream the customers :func:`generate` would write, as batches of ``chunk_rows``
    rows (the last may be shorter) with :data:`CUSTOMERS_SCHEMA`. No files are touched.

    Raises:
        ValueError: an option is out of range.
    """
    opts = SynthOptions(people=people, seed=seed, bias=bias, bad_rows=bad_rows, chunk_rows=chunk_rows, year=year)
    return _rebatch((b.customers for b in _blocks(opts, with_transactions=False)), CUSTOMERS_SCHEMA, chunk_rows)


def iter_transactions(
    *,
    people: int,
    transactions_per_person: float = 10.0,
    seed: int = 0,
    bias: float = 0.3,
    chunk_rows: int = 250_000,
    year: int = 2024,
) -> Iterator[pa.RecordBatch]:
    """Stream the transactions :func:`generate` would write, as batches of ``chunk_rows``
    rows (the last may be shorter) with :data:`TRANSACTIONS_SCHEMA`.

    Raises:
        ValueError: an option is out of range.
    """
    opts = SynthOptions(
        people=people,
        transactions_per_person=transactions_per_person,
        seed=seed,
        bias=bias,
        chunk_rows=chunk_rows,
        year=year,
    )
    return _rebatch((b.transactions for b in _blocks(opts, with_transactions=True)), TRANSACTIONS_SCHEMA, chunk_rows)


def read_landing(path: str | os.PathLike[str]) -> pa.Table:
    """Read a file written by :func:`generate` back with its exact schema.

    The dataset comes from the file name (``customers.*`` or ``transactions.*``), the
    format from the suffix (``.csv``, ``.parquet``, ``.jsonl``).

    Raises:
        ValueError: the name or suffix is not one :func:`generate` writes.
    """
    p = Path(path)
    schema = _SCHEMAS.get(p.name.split(".")[0])
    fmt = {v: k for k, v in _SUFFIX.items()}.get(p.suffix)
    if schema is None or fmt is None:
        raise ValueError(f"{p.name}: expected customers.<ext> or transactions.<ext> with ext in csv, parquet, jsonl")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p, schema=schema)
    if fmt == "csv":
        import pyarrow.csv as pacsv

        return pacsv.read_csv(p, convert_options=pacsv.ConvertOptions(column_types=schema, strings_can_be_null=False))
    import pyarrow.json as pajson

    if p.stat().st_size == 0:  # Arrow refuses an empty JSON file
        return schema.empty_table()
    # JSON has no date/timestamp type: read the text, then cast.
    as_text = pa.schema([pa.field(f.name, pa.string() if _is_temporal(f.type) else f.type) for f in schema])
    table = pajson.read_json(p, parse_options=pajson.ParseOptions(explicit_schema=as_text))
    return table.cast(schema)


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"between {_n(low)} and {_n(high)}" if high is not None else f"at least {_n(low)}"
        raise ValueError(f"{name} must be {bound}; got {value!r}")


def _n(value: int) -> str:
    return f"{value:,}" if abs(value) >= 10_000 else str(value)


def _check_number(name: str, value: object, low: float, high: float | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value) or value < low or (high is not None and value > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f"a finite number >= {low:g}"
        raise ValueError(f"{name} must be {bound}; got {value!r}")


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Block:
    customers: pa.Table
    transactions: pa.Table | None
    bad_counts: np.ndarray
    people_done: int


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


class _IdPermutation:
    """A seeded bijection of [0, 10**digits), so ids look random yet never collide.

    A four-round Feistel network on the split (high, low) decimal halves with a
    splitmix64 round function; every round is invertible, so the whole map is."""

    _ROUNDS = 4

    def __init__(self, rng: np.random.Generator, digits: int) -> None:
        self.high_space = 10 ** (digits // 2)
        self.low_space = 10 ** (digits - digits // 2)
        self.keys = rng.integers(0, 2**64, size=self._ROUNDS, dtype=np.uint64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.uint64)
        left, right = x // np.uint64(self.low_space), x % np.uint64(self.low_space)
        for r, key in enumerate(self.keys):  # (left, right) alternate between the two sizes
            m = np.uint64(self.high_space if r % 2 == 0 else self.low_space)
            left, right = right, (left + _splitmix64(right + key) % m) % m
        return (left * np.uint64(self.low_space) + right).astype(np.int64)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@dataclass(frozen=True)
class _NamePools:
    first: pa.Array  # female names, then male names
    first_local: pa.Array  # lower-case ASCII letters, for e-mail local parts
    n_female: int
    last: pa.Array
    last_local: pa.Array


@lru_cache(maxsize=8)
def _name_pools(seed: int) -> _NamePools:
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(seed)
    n_female, n_male, n_last = _NAME_POOL_SIZES
    # Draws keep repeats, so uniform picks from a pool follow Faker's name frequencies.
    first = [fake.first_name_female() for _ in range(n_female)] + [fake.first_name_male() for _ in range(n_male)]
    last = [fake.last_name() for _ in range(n_last)]

    def local(names: list[str]) -> pa.Array:
        arr = pc.replace_substring_regex(pc.utf8_lower(pa.array(names)), "[^a-z]", "")
        return pc.if_else(pc.equal(pc.utf8_length(arr), 0), "user", arr)

    return _NamePools(pa.array(first), local(first), n_female, pa.array(last), local(last))


def _fixed_width(n: int, *parts: str | tuple[np.ndarray, int]) -> pa.Array:
    """Strings of one width, built from literal text and zero-padded numbers, vectorised."""
    width = sum(len(p) if isinstance(p, str) else p[1] for p in parts)
    buf = np.empty((n, width), dtype=np.uint8)
    col = 0
    for part in parts:
        if isinstance(part, str):
            buf[:, col : col + len(part)] = np.frombuffer(part.encode("ascii"), dtype=np.uint8)
            col += len(part)
        else:
            values, digits = part
            v = values.astype(np.int64)
            for k in range(digits - 1, -1, -1):
                buf[:, col + k] = v % 10 + 48
                v = v // 10
            col += digits
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(buf)).cast(pa.string())


def _take(values: tuple[str, ...], idx: np.ndarray) -> pa.Array:
    return pa.array(values, pa.string()).take(pa.array(idx, pa.int32()))


def _epoch_days(d: date) -> int:
    return (d - date(1970, 1, 1)).days


def _people(
    rng: np.random.Generator, index: np.ndarray, opts: SynthOptions, ids: _IdPermutation
) -> tuple[pa.Table, np.ndarray]:
    """Customers for the given global person indexes, and their incomes (for transactions).

    Every draw has a size that depends only on ``len(index)``, never on ``bias``, so the
    same seed gives the same people at any bias; only income and the label move."""
    n = len(index)
    pools = _name_pools(opts.seed)
    sex = rng.choice(len(SEXES), size=n, p=_SEX_P)
    eth = rng.choice(len(ETHNICITIES), size=n, p=_ETHNICITY_P)
    region = rng.choice(len(REGIONS), size=n, p=_REGION_P)

    # Age 18..90 on 1 January of `year` (6575 days is 18 years, 33237 is 91).
    ref = _epoch_days(date(opts.year, 1, 1))
    age_days = 6_575 + np.floor(rng.beta(2.2, 3.0, size=n) * (33_237 - 6_575)).astype(np.int64)
    birth = ref - age_days
    age = age_days / 365.25

    zip_first_u = rng.random(n)
    zip_rest = rng.integers(1, 10_000, size=n)
    n_digits = np.array([len(d) for d in _REGION_ZIP_FIRST_DIGITS])
    digit_table = np.array([d + (d[0],) * (3 - len(d)) for d in _REGION_ZIP_FIRST_DIGITS])
    zip_first = digit_table[region, (zip_first_u * n_digits[region]).astype(np.int64)]

    first_u, last_u = rng.random(n), rng.random(n)
    n_female, n_first = pools.n_female, len(pools.first)
    first_idx = np.where(
        sex == 0,
        (first_u * n_female).astype(np.int64),
        np.where(
            sex == 1,
            n_female + (first_u * (n_first - n_female)).astype(np.int64),
            (first_u * n_first).astype(np.int64),
        ),
    )
    last_idx = (last_u * len(pools.last)).astype(np.int64)
    use_initial = rng.random(n) < 0.25
    separator = rng.choice(len(_EMAIL_SEPARATORS), size=n, p=(0.6, 0.2, 0.2))
    email_number = rng.integers(1, 10_000, size=n)
    domain = rng.choice(len(EMAIL_DOMAINS), size=n, p=_EMAIL_DOMAIN_P)

    area = rng.integers(201, 990, size=n)
    area = np.where(area % 100 == 11, area + 1, area)  # no N11 service codes
    line = rng.integers(0, 100, size=n)  # 555-0100..555-0199: reserved for fiction

    income_z = rng.standard_normal(n)
    default_u = rng.random(n)

    log_income = (
        np.log(np.array(_REGION_MEDIAN_INCOME))[region]
        + _LOG_INCOME_SD * income_z
        - 0.00035 * (age - 50.0) ** 2
        - opts.bias * (_BIAS_LOG_INCOME_ETHNICITY[eth] + _BIAS_LOG_INCOME_SEX[sex])
    )
    income = np.maximum(np.round(np.exp(log_income), 2), 1_000.0)
    logit = (
        _DEFAULT_INTERCEPT
        + _DEFAULT_PER_INCOME_SD * (np.log(income) - _LOG_INCOME_CENTER) / _LOG_INCOME_SD
        + _DEFAULT_PER_YEAR_OF_AGE * (age - 40.0)
        + opts.bias * (_BIAS_LOGIT_ETHNICITY[eth] + _BIAS_LOGIT_SEX[sex])
    )
    defaulted = default_u < 1.0 / (1.0 + np.exp(-logit))

    first = pools.first.take(pa.array(first_idx))
    last = pools.last.take(pa.array(last_idx))
    first_local = pools.first_local.take(pa.array(first_idx))
    local_first = pc.if_else(pa.array(use_initial), pc.utf8_slice_codeunits(first_local, 0, 1), first_local)
    email = pc.binary_join_element_wise(
        local_first,
        _take(_EMAIL_SEPARATORS, separator),
        pools.last_local.take(pa.array(last_idx)),
        pc.cast(pa.array(email_number), pa.string()),
        pa.scalar("@"),
        _take(EMAIL_DOMAINS, domain),
        "",
    )
    table = pa.table(
        [
            _fixed_width(n, "C-", (ids(index), 9)),
            pc.binary_join_element_wise(first, last, " "),
            email,
            _fixed_width(n, "+1 ", (area, 3), "-555-01", (line, 2)),
            pa.array(birth.astype(np.int32), pa.int32()).cast(pa.date32()),
            _fixed_width(n, (zip_first * 10_000 + zip_rest, 5)),
            _take(SEXES, sex),
            _take(ETHNICITIES, eth),
            pa.array(income, pa.float64()),
            _take(REGIONS, region),
            pa.array(defaulted, pa.bool_()),
        ],
        schema=CUSTOMERS_SCHEMA,
    )
    return table, income


def _transactions(
    rng: np.random.Generator,
    customer_ids: pa.Array,
    income: np.ndarray,
    counts: np.ndarray,
    first_tx: int,
    opts: SynthOptions,
    tx_ids: _IdPermutation,
) -> pa.Table:
    """Transactions of one group of people, grouped by person, in time order."""
    m = int(counts.sum())
    person = np.repeat(np.arange(len(counts)), counts)
    start = int(datetime(opts.year, 1, 1, tzinfo=timezone.utc).timestamp()) * 1_000_000
    end = int(datetime(opts.year + 1, 1, 1, tzinfo=timezone.utc).timestamp()) * 1_000_000
    ts = rng.integers(start, end, size=m)
    share = np.array([c[1] for c in _CATEGORIES])
    category = rng.choice(len(_CATEGORIES), size=m, p=share / share.sum())
    amount_z = rng.standard_normal(m)
    tail = rng.random(m) < 0.01
    tail_factor = 1.0 + rng.pareto(1.5, size=m)
    channel_u = rng.random(m)

    order = np.lexsort((ts, person))
    person, ts, category = person[order], ts[order], category[order]
    amount_z, tail, tail_factor, channel_u = amount_z[order], tail[order], tail_factor[order], channel_u[order]

    median = np.array([c[2] for c in _CATEGORIES])
    sigma = np.array([c[3] for c in _CATEGORIES])
    amount = median[category] * np.exp(sigma[category] * amount_z) * (income[person] / 53_000.0) ** 0.3
    amount = np.maximum(np.round(np.where(tail, amount * tail_factor, amount), 2), 0.01)
    cum = np.cumsum(np.array([c[4] for c in _CATEGORIES]), axis=1)
    channel = (channel_u >= cum[category, 0]).astype(np.int64) + (channel_u >= cum[category, 1])

    if first_tx + m > 10**_TRANSACTION_ID_DIGITS:  # pragma: no cover - prevented by validation
        raise ValueError("more than 10**12 transactions; transaction ids would collide")
    return pa.table(
        [
            _fixed_width(m, "T-", (tx_ids(first_tx + np.arange(m, dtype=np.int64)), 12)),
            customer_ids.take(pa.array(person)),
            pa.array(ts, pa.timestamp("us", tz="UTC")),
            pa.array(amount, pa.float64()),
            _take(MERCHANT_CATEGORIES, category),
            _take(CHANNELS, channel),
        ],
        schema=TRANSACTIONS_SCHEMA,
    )


def _inject_bad_rows(
    rng: np.random.Generator,
    good: pa.Table,
    first_bad_index: int,
    opts: SynthOptions,
    ids: _IdPermutation,
) -> tuple[pa.Table, np.ndarray]:
    """Insert ~bad_rows*n bad rows, each with exactly one defect, at random positions."""
    n = good.num_rows
    k = int(rng.binomial(n, opts.bad_rows))
    counts = np.zeros(len(BAD_ROW_KINDS), dtype=np.int64)
    if k == 0:
        return good, counts
    kind = rng.integers(0, len(BAD_ROW_KINDS), size=k)
    position = np.sort(rng.integers(0, n + 1, size=k))  # inserted after `position` good rows
    original_u = rng.random(k)
    variant = rng.integers(0, 4, size=k)
    extra = rng.integers(0, 10, size=k)
    fresh, _ = _people(rng, first_bad_index + np.arange(k, dtype=np.int64), opts, ids)
    counts += np.bincount(kind, minlength=len(BAD_ROW_KINDS))

    rows = fresh.to_pylist()
    dup = BAD_ROW_KINDS.index("duplicate_customer_id")
    position = np.where(kind == dup, np.maximum(position, 1), position)
    source = np.arange(n, n + k)  # index into concat(good, fresh)
    for j in range(k):
        row, what, v = rows[j], BAD_ROW_KINDS[kind[j]], int(variant[j])
        if what == "invalid_email":
            local, domain = row["email"].split("@")
            row["email"] = (
                f"{local}.{domain}",
                f"{local}@@{domain}",
                f"{local[:1]} {local[1:]}@{domain}",
                f"@{domain}",
            )[v]
        elif what == "negative_income":
            row["income"] = -row["income"]
        elif what == "empty_customer_id":
            row["customer_id"] = ""
        elif what == "duplicate_customer_id":
            # A re-delivered copy of an earlier good row of this block.
            source[j] = int(original_u[j] * position[j])
        elif what == "future_birth_date":
            # A century typo, 19xx -> 21xx: after 2100-01-01 for any allowed `year`.
            d: date = row["birth_date"]
            row["birth_date"] = date(d.year + 200, d.month, 28 if (d.month, d.day) == (2, 29) else d.day)
        elif what == "unknown_region":
            row["region"] = _UNKNOWN_REGIONS[v]
        elif what == "overlong_name":
            reps = MAX_NAME_LENGTH // (len(row["name"]) + 1) + 2 + int(extra[j])  # > MAX_NAME_LENGTH
            row["name"] = " ".join([row["name"]] * reps)
    combined = pa.concat_tables([good, pa.Table.from_pylist(rows, schema=CUSTOMERS_SCHEMA)])
    # Final order: good rows in order, bad row j placed after `position[j]` good rows.
    keys = np.concatenate([np.arange(n, dtype=np.float64), position - 0.5])
    order = np.concatenate([np.arange(n), source])[np.argsort(keys, kind="stable")]
    return combined.take(pa.array(order)), counts


def _blocks(opts: SynthOptions, *, with_transactions: bool) -> Iterator[_Block]:
    """Customers (and their transactions) block by block.

    Every block is generated whole (``_BLOCK_PEOPLE`` people) and then cut to ``people``,
    so a smaller dataset is a prefix of a larger one with the same seed (without bad
    rows); the cut people are never written."""
    ids = _IdPermutation(_rng(opts.seed, _S_IDS, 0), _CUSTOMER_ID_DIGITS)
    tx_ids = _IdPermutation(_rng(opts.seed, _S_IDS, 1), _TRANSACTION_ID_DIGITS)
    next_bad_index = opts.people + _BLOCK_PEOPLE  # bad rows: ids no written person has
    next_tx = 0
    for b, start in enumerate(range(0, opts.people, _BLOCK_PEOPLE)):
        n = min(_BLOCK_PEOPLE, opts.people - start)
        index = np.arange(start, start + _BLOCK_PEOPLE, dtype=np.int64)
        block, income = _people(_rng(opts.seed, _S_PEOPLE, b), index, opts, ids)
        good = block.slice(0, n)
        customers, bad_counts = good, np.zeros(len(BAD_ROW_KINDS), dtype=np.int64)
        if opts.bad_rows > 0:
            customers, bad_counts = _inject_bad_rows(_rng(opts.seed, _S_BAD, b), good, next_bad_index, opts, ids)
            next_bad_index += customers.num_rows - good.num_rows
        transactions = None
        if with_transactions:
            activity = _rng(opts.seed, _S_TX_COUNTS, b)
            counts = activity.poisson(opts.transactions_per_person * activity.gamma(2.0, 0.5, size=_BLOCK_PEOPLE))
            block_ids = block.column("customer_id").combine_chunks()
            parts = []
            for sub, (lo, hi) in enumerate(_subblocks(counts)):
                if lo >= n:
                    break
                part = _transactions(
                    _rng(opts.seed, _S_TX_ROWS, b, sub),
                    block_ids.slice(lo, hi - lo),
                    income[lo:hi],
                    counts[lo:hi],
                    next_tx,
                    opts,
                    tx_ids,
                )
                if hi > n:  # rows are grouped by person: the kept people are a prefix
                    part = part.slice(0, int(counts[lo:n].sum()))
                next_tx += part.num_rows
                parts.append(part)
            transactions = pa.concat_tables(parts)
        yield _Block(customers, transactions, bad_counts, start + n)


def _subblocks(counts: np.ndarray) -> Iterator[tuple[int, int]]:
    """Split people into runs of at most ``_TX_SUBBLOCK_ROWS`` transactions (at least one person)."""
    cum = np.cumsum(counts)
    lo = 0
    while lo < len(counts):
        before = int(cum[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, before + _TX_SUBBLOCK_ROWS, side="right")))
        yield lo, hi
        lo = hi


def _rebatch(tables: Iterator[pa.Table], schema: pa.Schema, size: int) -> Iterator[pa.RecordBatch]:
    pending: list[pa.Table] = []
    held = 0
    for t in tables:
        pending.append(t)
        held += t.num_rows
        if held >= size:
            merged = pa.concat_tables(pending).combine_chunks()
            offset = 0
            while held - offset >= size:
                yield from merged.slice(offset, size).to_batches(max_chunksize=size)
                offset += size
            pending, held = [merged.slice(offset)], held - offset
    if held:
        yield from pa.concat_tables(pending).combine_chunks().to_batches(max_chunksize=size)


# ----------------------------------------------------------------------------- writers


def _is_temporal(t: pa.DataType) -> bool:
    return pa.types.is_timestamp(t) or pa.types.is_date(t)


def _as_text_columns(batch: pa.RecordBatch, *, dates: bool) -> pa.RecordBatch:
    """Timestamps as 2024-03-01T12:34:56.123456Z (ISO 8601; Arrow's CSV writer would put a
    space before the time) and, if ``dates``, dates as YYYY-MM-DD text."""
    columns = []
    for f, col in zip(batch.schema, batch.columns, strict=True):
        if pa.types.is_timestamp(f.type):
            col = pc.strftime(col, "%Y-%m-%dT%H:%M:%SZ", "C")
        elif dates and pa.types.is_date(f.type):
            col = pc.cast(col, pa.string())
        columns.append(col)
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names)


class _Writer:
    """Buffers to ``chunk_rows`` and writes batches of exactly that size."""

    def __init__(self, path: Path, schema: pa.Schema, chunk_rows: int) -> None:
        self.path, self.schema, self.chunk_rows = path, schema, chunk_rows
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._held = 0

    def write(self, table: pa.Table | None) -> None:
        if table is None or table.num_rows == 0:
            return
        self._pending.append(table)
        self._held += table.num_rows
        if self._held >= self.chunk_rows:
            self._drain(final=False)

    def close(self) -> int:
        self._drain(final=True)
        self._close()
        return self.rows

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # already failing; the partial file is removed
            self._close()

    def _drain(self, *, final: bool) -> None:
        if not self._pending:
            return
        merged = pa.concat_tables(self._pending).combine_chunks()
        offset = 0
        while merged.num_rows - offset >= self.chunk_rows or (final and offset < merged.num_rows):
            piece = merged.slice(offset, self.chunk_rows)
            for batch in piece.to_batches(max_chunksize=self.chunk_rows):
                self._write_batch(batch)
            self.rows += piece.num_rows
            offset += piece.num_rows
        rest = merged.slice(offset)
        self._pending, self._held = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def _write_batch(self, batch: pa.RecordBatch) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _close(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class _CsvWriter(_Writer):
    def __init__(self, path: Path, schema: pa.Schema, chunk_rows: int) -> None:
        import pyarrow.csv as pacsv

        super().__init__(path, schema, chunk_rows)
        text = pa.schema([pa.field(f.name, pa.string() if pa.types.is_timestamp(f.type) else f.type) for f in schema])
        self._w = pacsv.CSVWriter(str(path), text)

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        self._w.write_batch(_as_text_columns(batch, dates=False))

    def _close(self) -> None:
        self._w.close()


class _ParquetWriter(_Writer):
    def __init__(self, path: Path, schema: pa.Schema, chunk_rows: int) -> None:
        import pyarrow.parquet as pq

        super().__init__(path, schema, chunk_rows)
        self._w = pq.ParquetWriter(str(path), schema, compression="zstd")

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        self._w.write_batch(batch, row_group_size=self.chunk_rows)

    def _close(self) -> None:
        self._w.close()


class _JsonlWriter(_Writer):
    """JSON Lines built column-wise with Arrow kernels (no per-row Python)."""

    def __init__(self, path: Path, schema: pa.Schema, chunk_rows: int) -> None:
        super().__init__(path, schema, chunk_rows)
        self._f: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in _close

    def _write_batch(self, batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, 500_000):  # keeps each text buffer < 2 GiB
            self._write_lines(batch.slice(start, 500_000))

    def _write_lines(self, batch: pa.RecordBatch) -> None:
        pieces: list[pa.Array | pa.Scalar] = []
        for i, (f, col) in enumerate(zip(batch.schema, _as_text_columns(batch, dates=True).columns, strict=True)):
            pieces.append(pa.scalar(("{" if i == 0 else ",") + f'"{f.name}":'))
            if pa.types.is_string(col.type):
                pieces += [pa.scalar('"'), _json_escape(col), pa.scalar('"')]
            else:  # bool and finite doubles print as valid JSON
                pieces.append(pc.cast(col, pa.string()))
        pieces.append(pa.scalar("}\n"))
        lines = pc.binary_join_element_wise(*pieces, "")
        offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)[lines.offset : lines.offset + len(lines) + 1]
        self._f.write(memoryview(lines.buffers()[2])[offsets[0] : offsets[-1]])

    def _close(self) -> None:
        self._f.close()


def _json_escape(col: pa.Array) -> pa.Array:
    if pc.any(pc.match_substring_regex(col, "[\\x00-\\x1f]")).as_py():  # rare: let json do it
        import json

        return pa.array([json.dumps(v, ensure_ascii=False)[1:-1] for v in col.to_pylist()], pa.string())
    return pc.replace_substring(pc.replace_substring(col, "\\", "\\\\"), '"', '\\"')


def _open_writer(fmt: Format, path: Path, schema: pa.Schema, chunk_rows: int) -> _Writer:
    return {"csv": _CsvWriter, "parquet": _ParquetWriter, "jsonl": _JsonlWriter}[fmt](path, schema, chunk_rows)
