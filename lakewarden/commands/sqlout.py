"""How ``lakewarden sql`` renders a query's result: a table, CSV, JSON or Parquet (the verb returns it typed)."""

from __future__ import annotations

import io
import json
import sys
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa

from lakehouse.errors import SqlError
from lakehouse.sql import QueryResult

if TYPE_CHECKING:
    from rich.console import Console

_TABLE_ROWS_SHOWN = 50


def write_result(
    result: QueryResult,
    fmt: Literal["table", "csv", "parquet", "json"],
    out: Path | None,
    console: "Console",
) -> None:
    """Write a result for the CLI.

    ``table``: a rich table on ``console`` (first 50 rows, then "… N more rows");
    ``csv`` and ``json`` (an array of records): to ``out`` or to the console's file
    (stdout); ``parquet``: to ``out``, which it requires. Binary values are written as
    hex in text formats.

    Raises:
        SqlError: unknown format, or ``parquet`` without ``out``.
    """
    tbl = result.table
    if fmt == "table":
        console.print(_rich_table(result))
        return
    if fmt == "parquet":
        if out is None:
            raise SqlError("--format parquet writes a file: give --out FILE.parquet")
        import pyarrow.parquet as pq

        pq.write_table(tbl, out)
        console.print(f"wrote {tbl.num_rows:,} rows to {out}")
        return
    if fmt == "csv":
        import pyarrow.csv as pcsv

        buf = io.BytesIO()
        pcsv.write_csv(_text_safe(tbl), buf)
        _emit(buf.getvalue().decode("utf-8"), out, console, tbl.num_rows)
        return
    if fmt == "json":
        safe = _text_safe(tbl)
        names = _unique(safe.column_names)
        columns = [c.to_pylist() for c in safe.columns]
        records = [dict(zip(names, vals)) for vals in zip(*columns)] if columns else []
        _emit(json.dumps(records, ensure_ascii=False, default=_json_default, indent=None) + "\n", out, console, tbl.num_rows)
        return
    raise SqlError(f"unknown output format {fmt!r} (formats: table, csv, parquet, json)")



def _text_safe(tbl: pa.Table) -> pa.Table:
    """Binary columns as hex strings (CSV and JSON cannot carry raw bytes)."""
    cols = []
    for f, col in zip(tbl.schema, tbl.columns):
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type):
            hexed = pa.array([None if v is None else v.hex() for v in col.to_pylist()], pa.string())
            cols.append(hexed)
        else:
            cols.append(col)
    return pa.Table.from_arrays(cols, names=tbl.column_names)


def _unique(names: list[str]) -> list[str]:
    """Result names may repeat (``SELECT 1 AS a, 2 AS a``): suffix repeats so no value is lost."""
    seen: dict[str, int] = {}
    out = []
    for n in names:
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}_{k}")
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, (datetime, date, time)):
        return v.isoformat()
    if isinstance(v, Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    return str(v)


def _emit(text: str, out: Path | None, console: "Console", rows: int) -> None:
    if out is None:
        stream = getattr(console, "file", None) or sys.stdout
        stream.write(text)
        stream.flush()
    else:
        Path(out).write_text(text, encoding="utf-8")
        console.print(f"wrote {rows:,} rows to {out}")


def _rich_table(result: QueryResult) -> Any:
    from rich.table import Table
    from rich.text import Text

    tbl = result.table
    t = Table(show_lines=False)
    for name in tbl.column_names:
        t.add_column(Text(name), overflow="fold")
    head = tbl.slice(0, _TABLE_ROWS_SHOWN)
    columns = [c.to_pylist() for c in head.columns]  # by position: result names may repeat
    for i in range(head.num_rows):
        t.add_row(*(_cell(col[i]) for col in columns))
    more = tbl.num_rows - head.num_rows
    if more > 0 or result.truncated:
        note = f"… {more:,} more rows" if more > 0 else "…"
        if result.truncated:
            note += " (stopped at max rows)"
        t.caption = note
    return t


def _cell(v: Any) -> Any:
    from rich.text import Text

    if v is None:
        return Text("NULL", style="dim")
    if isinstance(v, bytes):
        return Text(f"<{len(v)} bytes>", style="dim")
    return Text(str(v))  # Text, not markup: values never style the table
