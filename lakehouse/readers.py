"""Stream landing files as Arrow batches of bounded size: CSV, Parquet, JSON Lines.

Every reader yields :class:`RawBatch` objects holding at most ``batch_rows`` rows,
so a file many times larger than a batch streams through in bounded memory.
Text formats are read without type inference — CSV cells as bytes, JSON scalars
as strings — so that typing happens in validation, row by row, with a reason
for every rejected row instead of one failure for the whole file. Rows the
parser cannot split into the header's columns (a short or long CSV row, a JSON
line that is not an object) are not dropped: they travel with the batch as
:class:`Malformed` records and end up in quarantine.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from lakehouse.errors import IngestError

Format = Literal["csv", "parquet", "jsonl"]
_SUFFIX: dict[str, Format] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row the parser could not split into columns; ``text`` is the raw row (kept only encrypted)."""

    row: int | None
    text: str
    reason: str


@dataclass
class RawBatch:
    """Up to ``batch_rows`` rows of one file; ``first_row`` is the 1-based number of its first row."""

    table: pa.Table
    first_row: int
    malformed: list[Malformed] = field(default_factory=list)
    offsets: pa.Array | None = None  # a stream's batch: each table row's offset in its partition (its row number)

    @property
    def rows_read(self) -> int:
        return self.table.num_rows + len(self.malformed)


def detect_format(path: Path) -> Format:
    fmt = _SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise IngestError(
            f"{path.name}: unsupported file type '{path.suffix or '(none)'}' (use .csv, .parquet or .jsonl)"
        )
    return fmt


def read_batches(path: Path, *, batch_rows: int) -> Iterator[RawBatch]:
    """Yield the file's rows in batches of at most ``batch_rows`` (plus any malformed rows)."""
    if not path.is_file():
        raise IngestError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise IngestError(f"{path.name}: the file is empty (0 bytes)")
    fmt = detect_format(path)
    if fmt == "csv":
        yield from _csv(path, batch_rows)
    elif fmt == "parquet":
        yield from _parquet(path, batch_rows)
    else:
        yield from _jsonl(path, batch_rows)


def header(path: Path) -> list[str]:
    """Column names of a file, without reading its rows."""
    fmt = detect_format(path)
    if path.is_file() and path.stat().st_size == 0:
        raise IngestError(f"{path.name}: the file is empty (0 bytes)")
    if fmt == "parquet":
        try:
            return pq.ParquetFile(path).schema_arrow.names
        except Exception as exc:
            raise IngestError(f"{path.name}: not a readable Parquet file ({_first_line(exc)})") from None
    if fmt == "csv":
        with open(path, "rb") as fh:
            first = fh.readline()
        if first.startswith(b"\xef\xbb\xbf"):
            first = first[3:]
        try:
            text = first.decode("utf-8")
        except UnicodeDecodeError:
            raise IngestError(f"{path.name}: the header line is not UTF-8 text") from None
        import csv

        names = next(csv.reader([text]), [])
        if not names or not any(n.strip() for n in names):
            raise IngestError(f"{path.name}: no header line (the first line must name the columns)")
        return [n.strip() for n in names]
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.strip():
                try:
                    obj = json.loads(raw)
                except ValueError:
                    raise IngestError(f"{path.name}: the first line is not a JSON object") from None
                if not isinstance(obj, dict):
                    raise IngestError(f"{path.name}: the first line is not a JSON object")
                return list(obj)
    raise IngestError(f"{path.name}: no JSON objects in the file")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _rechunk(batches: Iterator[tuple[pa.Table, list[Malformed]]], batch_rows: int) -> Iterator[RawBatch]:
    """Regroup parser output into batches of exactly ``batch_rows`` rows (the last may be shorter)."""
    pending: list[pa.Table] = []
    pending_rows = 0
    bad: list[Malformed] = []
    row = 1
    for tbl, malformed in batches:
        bad.extend(malformed)
        pending.append(tbl)
        pending_rows += tbl.num_rows
        while pending_rows >= batch_rows:
            whole = pa.concat_tables(pending)
            out, rest = whole.slice(0, batch_rows), whole.slice(batch_rows)
            yield RawBatch(out, row, bad)
            row += batch_rows
            bad = []
            pending, pending_rows = ([rest] if rest.num_rows else []), rest.num_rows
    if pending_rows or bad:
        whole = pa.concat_tables(pending) if pending else None
        if whole is None:
            whole = pa.table({})
        yield RawBatch(whole, row, bad)


def _csv(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    names = header(path)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise IngestError(f"{path.name}: duplicate column name(s) in the header: {', '.join(dup)}")
    if any(not n for n in names):
        raise IngestError(f"{path.name}: the header has an empty column name")
    malformed: list[Malformed] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        malformed.append(
            Malformed(
                row.number,
                row.text,
                f"malformed CSV row: expected {row.expected_columns} fields, got {row.actual_columns}",
            )
        )
        return "skip"

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=8 << 20, column_names=names, skip_rows=1),
            parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.binary() for n in names},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as exc:
        raise IngestError(f"{path.name}: not a readable CSV file ({_first_line(exc)})") from None

    def parsed() -> Iterator[tuple[pa.Table, list[Malformed]]]:
        nonlocal malformed
        while True:
            try:
                rb = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as exc:
                raise IngestError(
                    f"{path.name}: the file is truncated or malformed after the rows already read "
                    f"({_first_line(exc)}); rows before this point were ingested, fix the file and ingest it "
                    "again: batches already ingested are skipped"
                ) from None
            got, malformed = malformed, []
            yield pa.Table.from_batches([rb]), got
        if malformed:
            yield pa.Table.from_batches([], schema=reader.schema), malformed

    yield from _rechunk(parsed(), batch_rows)


def _parquet(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise IngestError(f"{path.name}: not a readable Parquet file ({_first_line(exc)})") from None
    row = 1
    try:
        for rb in pf.iter_batches(batch_size=batch_rows):
            yield RawBatch(pa.Table.from_batches([rb]), row)
            row += rb.num_rows
    except Exception as exc:
        raise IngestError(f"{path.name}: the Parquet file is damaged near row {row} ({_first_line(exc)})") from None


def json_text(v: object) -> str | None:
    """A JSON value (as ``json.loads`` gives it) as ingest text; nested values raise TypeError."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        raise TypeError("nested")
    return str(v)


def utf8_encodable(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (JSON's "\\ud800" escapes decode to text that cannot)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _jsonl(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    names = header(path)
    cols: dict[str, list[str | None]] = {n: [] for n in names}
    bad: list[Malformed] = []
    first = 1
    lineno = 0
    count = 0

    def flush() -> RawBatch:
        nonlocal cols, bad, first, count
        tbl = pa.table({n: pa.array(v, pa.string()) for n, v in cols.items()})
        out = RawBatch(tbl, first, bad)
        first += count
        cols, bad, count = {n: [] for n in names}, [], 0
        return out

    with open(path, "rb") as fh:
        for raw in fh:
            lineno += 1
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                bad.append(Malformed(lineno, raw.decode("utf-8", "replace"), "not valid UTF-8 text"))
                continue
            except ValueError as exc:
                bad.append(Malformed(lineno, raw.decode("utf-8", "replace"), f"invalid JSON ({exc.msg})"))
                continue
            if not isinstance(obj, dict):
                bad.append(Malformed(lineno, raw.decode("utf-8", "replace"), "a JSON line must be an object"))
                continue
            extra = [k for k in obj if k not in cols]
            if extra:
                bad.append(Malformed(lineno, raw.decode("utf-8", "replace"), f"unexpected field(s) {', '.join(extra[:5])}"))
                continue
            try:
                vals = [json_text(obj.get(n)) for n in names]
            except TypeError:
                bad.append(Malformed(lineno, raw.decode("utf-8", "replace"), "nested objects or arrays are not allowed"))
                continue
            broken = next((n for n, v in zip(names, vals) if v is not None and not v.isascii() and not utf8_encodable(v)), None)
            if broken is not None:  # "\ud800" is valid JSON, but decodes to text no file can hold
                bad.append(Malformed(lineno, raw.decode("utf-8", "replace"),
                                     f"field '{broken}' is not valid Unicode text (an unpaired surrogate escape)"))
                continue
            for n, v in zip(names, vals):
                cols[n].append(v)
            count += 1
            if count >= batch_rows:
                yield flush()
    if count or bad:
        yield flush()


def to_text(tbl: pa.Table) -> tuple[pa.Table, dict[str, pa.Array]]:
    """Decode binary (CSV) columns as UTF-8; rows with invalid bytes become NULL plus a per-column mask.

    Returns the decoded table and, for each column that had invalid bytes, a boolean array
    marking those rows.
    """
    bad: dict[str, pa.Array] = {}
    cols = []
    for name in tbl.column_names:
        col = tbl[name]
        if pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type):
            try:
                col = col.cast(pa.string())
            except (pa.ArrowInvalid, UnicodeDecodeError):
                vals, mask = [], []
                for v in col.to_pylist():
                    if v is None:
                        vals.append(None)
                        mask.append(False)
                        continue
                    try:
                        vals.append(v.decode("utf-8"))
                        mask.append(False)
                    except UnicodeDecodeError:
                        vals.append(None)
                        mask.append(True)
                col = pa.chunked_array([pa.array(vals, pa.string())])
                bad[name] = pa.array(mask, pa.bool_())
        cols.append(col)
    return pa.table(cols, names=tbl.column_names), bad


__all__ = ["Format", "Malformed", "RawBatch", "detect_format", "header", "read_batches", "to_text"]
