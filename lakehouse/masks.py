"""The mask vocabulary compiled to SQL, for the embedded engine (DuckDB) and for Trino.

One place turns a policy mask (``null``, ``redact``, ``hash``, ``partial:N``,
``prefix:N``, ``year``, ``bucket:W``) and a column's Arrow type into an SQL
expression of the *same type* as the column, in either dialect, so that the
embedded SQL engine and Trino's column masks return the same values.

===========  =======================================================================
type         masks that fit
===========  =======================================================================
string       null, redact ('****'), hash (lowercase hex of HMAC-SHA256 of the UTF-8 value under
             the workspace's mask key, truncated to 128 bits: 32 characters; computed once,
             when silver is built, into ``_hash_<column>``, so the mask is a column swap on
             both engines),
             partial:N ('****' + last N characters, or only '****' when the value has
             at most N characters — a mask must never show a whole value),
             prefix:N (first N characters)
number       null, bucket:W (lower bound of the bucket of width W: floor(x / W) * W;
             integers and decimals exactly, without going through floating point)
date, time   null, year (1 January of the value's year, same type; UTC for time zones)
binary       null (encrypted columns show no ciphertext)
boolean      null
===========  =======================================================================

NULL stays NULL under every mask. ``hash`` needs the precomputed column: a table without
it (another layer, or a silver table built before the mask was set) shows NULL, flagged.
A mask that does not fit the column's type
fails closed: the expression is NULL of the column's type, and the result says
so (:class:`CompiledMask` ``fits=False``; :func:`mask_sql` also warns with
:class:`MaskWarning`) so that the caller can audit it.

Example::

    >>> mask_sql("bucket:10000", quote_ident("income", "duckdb"), pa.float64(), dialect="duckdb")
    'CAST(floor("income" / 10000) * 10000 AS DOUBLE)'
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from governance.policy import Mask, MaskKind
from lakehouse.catalog import HASH_PREFIX

__all__ = [
    "HASH_PREFIX", "CompiledMask", "Dialect", "MaskWarning", "compile_mask", "hash_column", "mask_sql", "quote_ident",
    "sql_type",
]

Dialect = Literal["duckdb", "trino"]
_DIALECTS = ("duckdb", "trino")
REDACTED = "****"
_SIMPLE = re.compile(r'^(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*)(?:\.(?:"(?:[^"]|"")*"|[A-Za-z_][A-Za-z0-9_$]*))*$')


class MaskWarning(UserWarning):
    """A mask did not fit its column's type and was replaced by NULL (fail closed)."""


@dataclass(frozen=True, slots=True)
class CompiledMask:
    """An SQL expression for one masked column.

    ``fits`` is False when the mask did not fit the column's type and ``sql`` is
    NULL of that type instead; ``reason`` then says why (for the audit log).
    """

    sql: str
    fits: bool = True
    reason: str | None = None


def hash_column(name: str) -> str:
    """The silver column that holds the keyed hash of column ``name``."""
    return HASH_PREFIX + name


def quote_ident(name: str, dialect: Dialect = "duckdb") -> str:
    """Quote an identifier for ``dialect`` (both use double quotes, doubled inside)."""
    _check_dialect(dialect)
    if not name or "\x00" in name:
        raise ValueError(f"invalid identifier {name!r}")
    return '"' + name.replace('"', '""') + '"'


def sql_type(arrow_type: pa.DataType, dialect: Dialect) -> str | None:
    """The SQL type a column of ``arrow_type`` has in ``dialect`` (None if it has no plain name).

    For Trino, the types are those its Delta Lake connector reports: a Delta
    TIMESTAMP (Arrow timestamp with a zone) reads as ``timestamp(3) with time zone``,
    a TIMESTAMP_NTZ as ``timestamp(6)``.
    """
    _check_dialect(dialect)
    t = arrow_type
    if pa.types.is_dictionary(t):
        t = t.value_type
    duck = dialect == "duckdb"
    if pa.types.is_boolean(t):
        return "BOOLEAN" if duck else "boolean"
    if pa.types.is_integer(t):
        signed = {8: ("TINYINT", "tinyint"), 16: ("SMALLINT", "smallint"), 32: ("INTEGER", "integer"), 64: ("BIGINT", "bigint")}
        unsigned = {8: "UTINYINT", 16: "USMALLINT", 32: "UINTEGER", 64: "UBIGINT"}
        if pa.types.is_signed_integer(t):
            return signed[t.bit_width][0 if duck else 1]
        return unsigned[t.bit_width] if duck else None  # Trino (and Delta) have no unsigned integers
    if pa.types.is_float16(t) or pa.types.is_float32(t):
        return "FLOAT" if duck else "real"
    if pa.types.is_float64(t):
        return "DOUBLE" if duck else "double"
    if pa.types.is_decimal(t):
        if t.precision > 38:
            return None
        return f"DECIMAL({t.precision},{t.scale})" if duck else f"decimal({t.precision},{t.scale})"
    if _is_string(t):
        return "VARCHAR" if duck else "varchar"
    if _is_binary(t):
        return "BLOB" if duck else "varbinary"
    if pa.types.is_date(t):
        return "DATE" if duck else "date"
    if pa.types.is_timestamp(t):
        if t.tz is not None:
            return "TIMESTAMPTZ" if duck else "timestamp(3) with time zone"
        if duck:
            return {"s": "TIMESTAMP_S", "ms": "TIMESTAMP_MS", "us": "TIMESTAMP", "ns": "TIMESTAMP_NS"}[t.unit]
        return {"s": "timestamp(0)", "ms": "timestamp(3)", "us": "timestamp(6)", "ns": "timestamp(9)"}[t.unit]
    return None


def compile_mask(
    mask: str | Mask, column_sql: str, arrow_type: pa.DataType, *, dialect: Dialect, hashed: str | None = None
) -> CompiledMask:
    """Compile one mask for one column; see the module docstring for the vocabulary.

    Args:
        mask: a mask in policy shorthand (``"partial:4"``) or a :class:`Mask`.
        column_sql: the column as SQL, usually ``quote_ident(name, dialect)``.
        arrow_type: the column's Arrow type (from the table's schema).
        dialect: ``"duckdb"`` or ``"trino"``.
        hashed: for ``hash``, the precomputed keyed-hash column as SQL (usually
            ``quote_ident(hash_column(name), dialect)``); None when the table has none.

    Returns:
        A :class:`CompiledMask`; ``fits`` is False (and ``sql`` a typed NULL) when
        the mask does not fit the type.

    Raises:
        ValueError: ``mask`` is not in the vocabulary, or its size is malformed
            (a fractional character count), or ``dialect`` is unknown.
    """
    _check_dialect(dialect)
    m = _parse(mask)
    x = column_sql if _SIMPLE.match(column_sql.strip()) else f"({column_sql})"
    t = arrow_type.value_type if pa.types.is_dictionary(arrow_type) else arrow_type
    duck = dialect == "duckdb"
    kind, n = m.kind, m.n

    def misfit(why: str) -> CompiledMask:
        return CompiledMask(_typed_null(x, t, dialect), fits=False, reason=f"mask '{m}' {why}; NULL shown instead")

    if kind is MaskKind.NULL:
        return CompiledMask(_typed_null(x, t, dialect))

    if _is_string(t):
        if kind is MaskKind.REDACT:
            lit = f"'{REDACTED}'" if duck else f"CAST('{REDACTED}' AS varchar)"
            return CompiledMask(f"CASE WHEN {x} IS NULL THEN NULL ELSE {lit} END")
        if kind is MaskKind.HASH:
            if hashed is None:
                return misfit("needs the keyed hash silver computes when it is built, and this table has none "
                              "(rebuild silver, or query the silver layer)")
            return CompiledMask(hashed)
        if kind is MaskKind.PARTIAL:
            k = _count(m)
            tail = f"right({x}, {k})" if duck else f"substr({x}, length({x}) - {k - 1})"
            return CompiledMask(
                f"CASE WHEN {x} IS NULL THEN NULL WHEN length({x}) > {k} THEN '{REDACTED}' || {tail} "
                f"ELSE {'' if duck else 'CAST('}'{REDACTED}'{'' if duck else ' AS varchar)'} END"
            )
        if kind is MaskKind.PREFIX:
            k = _count(m)
            return CompiledMask(f"left({x}, {k})" if duck else f"substr({x}, 1, {k})")
        return misfit("does not apply to text columns (text: null, redact, hash, partial:N, prefix:N)")

    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        if kind is not MaskKind.BUCKET:
            return misfit("does not apply to numeric columns (numbers: null, bucket:W)")
        typ = sql_type(t, dialect)
        if typ is None:
            return misfit(f"cannot be expressed for type {t} in {dialect}")
        assert n is not None
        w = _number(n)
        if pa.types.is_floating(t):
            return CompiledMask(f"CAST(floor({x} / {w}) * {w} AS {typ})")
        if pa.types.is_decimal(t):  # exact decimal arithmetic, no detour through floating point
            return CompiledMask(f"CAST({x} - ((({x} % {w}) + {w}) % {w}) AS {typ})")
        if not float(n).is_integer():
            return misfit(f"has a fractional width, which does not fit integer type {t}")
        width = int(n)
        if width > _int_max(t):
            return misfit(f"has a width larger than the largest value of type {t}")
        big = "BIGINT" if duck else "bigint"
        if pa.types.is_unsigned_integer(t) and t.bit_width == 64:
            big = "HUGEINT"  # duckdb only: Trino has no unsigned types (rejected above)
        xb = f"CAST({x} AS {big})"
        # floor(x / W) * W == x - floor_mod(x, W), in integers; % truncates towards zero in both engines.
        expr = f"CAST({xb} - ((({xb} % {w}) + {w}) % {w}) AS {typ})"
        lowest = -(-_int_min(t) // width) * width  # the lowest bucket bound the type can hold
        if lowest > _int_min(t):  # values below it have no representable bound: NULL, not an error
            expr = f"CASE WHEN {x} < {lowest} THEN NULL ELSE {expr} END"
        return CompiledMask(expr)

    if pa.types.is_date(t) or pa.types.is_timestamp(t):
        if kind is not MaskKind.YEAR:
            return misfit("does not apply to date/time columns (dates: null, year)")
        typ = sql_type(t, dialect)
        if pa.types.is_timestamp(t) and t.tz is not None:
            if duck:  # truncate in UTC whatever the session's time zone
                return CompiledMask(f"(date_trunc('year', {x} AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')")
            return CompiledMask(f"date_trunc('year', {x} AT TIME ZONE 'UTC')")
        if duck:
            return CompiledMask(f"CAST(date_trunc('year', {x}) AS {typ})")
        return CompiledMask(f"date_trunc('year', {x})")

    if _is_binary(t):
        return misfit("does not apply to binary (encrypted) columns (binary: null only)")
    if pa.types.is_boolean(t):
        return misfit("does not apply to boolean columns (booleans: null only)")
    return misfit(f"does not apply to columns of type {t} (only null does)")


def mask_sql(
    mask: str | Mask, column_sql: str, arrow_type: pa.DataType, *, dialect: Dialect, hashed: str | None = None
) -> str:
    """The SQL expression of ``mask`` over ``column_sql``, of the same type as the column.

    A mask that does not fit the type compiles to NULL of the column's type and
    warns with :class:`MaskWarning`; use :func:`compile_mask` to get that as a flag.

    Example::

        >>> mask_sql("hash", '"customer_id"', pa.string(), dialect="trino", hashed='"_hash_customer_id"')
        '"_hash_customer_id"'
    """
    c = compile_mask(mask, column_sql, arrow_type, dialect=dialect, hashed=hashed)
    if not c.fits:
        warnings.warn(f"{column_sql}: {c.reason}", MaskWarning, stacklevel=2)
    return c.sql


# -- helpers ------------------------------------------------------------------------------
def _check_dialect(dialect: str) -> None:
    if dialect not in _DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r} (dialects: duckdb, trino)")


def _parse(mask: str | Mask) -> Mask:
    if isinstance(mask, Mask):
        return mask
    try:
        return Mask.model_validate(mask)
    except Exception as exc:  # pydantic's ValidationError: restate it in the vocabulary's words
        raise ValueError(
            f"invalid mask {mask!r} (masks: null, redact, hash, partial:N, prefix:N, year, bucket:W)"
        ) from exc


def _count(m: Mask) -> int:
    assert m.n is not None
    if not float(m.n).is_integer():
        raise ValueError(f"mask '{m}' needs a whole number of characters")
    return int(m.n)


def _number(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else repr(float(n))


def _int_max(t: pa.DataType) -> int:
    return 2 ** (t.bit_width - (1 if pa.types.is_signed_integer(t) else 0)) - 1


def _int_min(t: pa.DataType) -> int:
    return -(2 ** (t.bit_width - 1)) if pa.types.is_signed_integer(t) else 0


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_fixed_size_binary(t)
        or pa.types.is_binary_view(t)
    )


def _typed_null(x: str, t: pa.DataType, dialect: Dialect) -> str:
    typ = sql_type(t, dialect)
    if typ is not None:
        return f"CAST(NULL AS {typ})"
    return f"CASE WHEN FALSE THEN {x} END"  # NULL of the column's own type, whatever it is
