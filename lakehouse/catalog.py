"""Where governed tables live, and how to open them (optionally as of a version or a time).

Every table is ``<storage root>/<layer>/<dataset>``; layers:

============  ===========================================================================
bronze        validated rows after protection (tokens, no direct identifiers, encrypted
              sensitive and quasi-identifiers), as ingested, one commit per ingest chunk
silver        conformed: generalized quasi-identifiers, preprocessing and derived features
quarantine    rejected rows: batch id, source, row number, reason; the raw row encrypted
vault         direct identifiers, encrypted with the subject's own key
restricted    sensitive attributes with ``protection: restricted``, encrypted, for
              fairness evaluation only
============  ===========================================================================

Example::

    cat = Catalog(ws.config)
    dt = cat.open(TableRef("silver", "customers"), version=3)
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

from governance.config import ProjectConfig
from lakehouse.errors import TableError

if TYPE_CHECKING:
    import pyarrow as pa

LAYERS = ("bronze", "silver", "quarantine", "vault", "restricted")
SUBJECT_COLUMNS = ("subject_token",)  # besides each policy's subject_key
_B32 = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz234567")}


def subject_bucket(token: str, n: int) -> int:
    """Subject hash bucket from the token's random characters (stable across versions and machines).

    It reads the six characters right after ``sub_``: 30 uniformly random bits. (The *last*
    characters will not do: a token is 128 random bits in 26 base32 characters, so the final
    character carries 3 bits and two zero bits of padding, and ``% 16`` of it fell in only
    four of sixteen buckets.)
    """
    v = 0
    for ch in token[4:10]:
        v = v * 32 + _B32[ch]
    return v % n


def subject_buckets(tokens: pa.Array, n: int) -> pa.Array:
    """:func:`subject_bucket` of a whole column of tokens (int32; null stays null), in numpy."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    valid = pc.is_valid(tokens)
    filled = tokens.fill_null("sub_" + "a" * 26) if tokens.null_count else tokens
    if len(filled) and pc.all(pc.equal(pc.binary_length(filled), 30)).as_py():
        offsets = np.frombuffer(filled.buffers()[1], dtype=np.int32, count=filled.offset + len(filled) + 1)[filled.offset:]
        data = np.frombuffer(filled.buffers()[2], dtype=np.uint8)
        chars = data[(offsets[:-1] + 4)[:, None] + np.arange(6)]  # the six characters after "sub_"
        digits = _b32_table()[chars]
        if (digits < 0).any():
            raise ValueError("a token has a character outside base32")
        v = np.zeros(len(filled), dtype=np.int64)
        for k in range(6):
            v = v * 32 + digits[:, k]
        dense = pa.array((v % n).astype(np.int32))
    else:
        dense = pa.array([subject_bucket(t, n) for t in filled.to_pylist()], pa.int32())
    return dense if not tokens.null_count else pc.if_else(valid, dense, pa.scalar(None, pa.int32()))


@functools.cache
def _b32_table():  # base32 character -> digit, -1 elsewhere (numpy; built on first use)
    import numpy as np

    table = np.full(256, -1, dtype=np.int64)
    for c, i in _B32.items():
        table[ord(c)] = i
    return table


# How ``_subject_bucket`` was computed for a table's rows — the function (by name) and the
# bucket count — is recorded in the table's description when it is created (delta-rs accepts
# only ``delta.*`` configuration keys). Erasure targets the subjects' buckets only when a table
# says how they were made; a table without it (or with another scheme) is searched whole.
BUCKETING_SCHEME = "token-chars-4-10-mod"
_DESCRIPTION = "Lakewarden governed table; subject buckets: {scheme}:{n}"
_BUCKETING_RE = re.compile(r"subject buckets: ([\w-]+):(\d+)")


HASH_PREFIX = "_hash_"  # silver's precomputed keyed hash of a column masked with `hash` (no statistics either)


def stats_columns(columns: list[str], subject_key: str) -> list[str]:
    """The columns whose statistics may go to the Delta log: none that holds a subject's token
    or a keyed hash (see :func:`table_configuration`)."""
    return [c for c in columns if c != subject_key and c not in SUBJECT_COLUMNS and not c.startswith(HASH_PREFIX)]


def table_configuration(columns: list[str], subject_key: str) -> dict[str, str]:
    """Delta table properties for a governed table: no data-skipping statistics on the subject
    token columns, so the Delta log (min/max per file) never copies a token — an erased
    subject's token must not outlive its rows in ``_delta_log``."""
    stats = stats_columns(columns, subject_key)
    return {"delta.dataSkippingStatsColumns": ",".join(f"`{c}`" for c in stats) if stats else "`_none_`"}


def table_description(buckets: int | None) -> str | None:
    """The description a new bucketed table is created with (None: the bucketing is unknown)."""
    return None if buckets is None else _DESCRIPTION.format(scheme=BUCKETING_SCHEME, n=buckets)


def table_buckets(dt: DeltaTable) -> int | None:
    """The bucket count a table's ``_subject_bucket`` was computed with by :func:`subject_bucket`;
    None when the table does not record it (older tables) or records another scheme."""
    m = _BUCKETING_RE.search(dt.metadata().description or "")
    return int(m.group(2)) if m and m.group(1) == BUCKETING_SCHEME and int(m.group(2)) > 0 else None


_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True, slots=True)
class TableRef:
    layer: str
    dataset: str

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise TableError(f"unknown layer {self.layer!r} (layers: {', '.join(LAYERS)})")
        if not _NAME.match(self.dataset):
            raise TableError(
                f"invalid dataset name {self.dataset!r}: use lower_snake_case letters, digits and _ (no paths)"
            )

    @classmethod
    def parse(cls, name: str, *, default_layer: str = "silver") -> "TableRef":
        """``silver.customers`` or ``customers`` (default layer)."""
        if not re.fullmatch(r"([a-z]+\.)?[a-z][a-z0-9_]{0,62}", name):
            raise TableError(
                f"invalid table name {name!r}: use layer.dataset, e.g. silver.customers (letters, digits, _; no paths)"
            )
        layer, _, ds = name.rpartition(".")
        return cls(layer or default_layer, ds)

    def __str__(self) -> str:
        return f"{self.layer}.{self.dataset}"


class Catalog:
    """Maps table references to Delta table URIs under the configured storage root."""

    def __init__(self, config: ProjectConfig) -> None:
        from governance.objectstore import check_root

        self.config = config
        self.storage_options = dict(config.storage.options) or None
        check_root(config.table_uri("x")[:-2])  # a bucket that is not there is named, not read as empty

    def uri(self, ref: TableRef) -> str:
        return self.config.table_uri(f"{ref.layer}/{ref.dataset}")

    def exists(self, ref: TableRef) -> bool:
        return DeltaTable.is_deltatable(self.uri(ref), storage_options=self.storage_options)

    def open(self, ref: TableRef, *, version: int | None = None, as_of: datetime | str | None = None) -> DeltaTable:
        """Open a table, optionally as of a version or a timestamp (time travel)."""
        try:
            dt = DeltaTable(self.uri(ref), version=version, storage_options=self.storage_options)
        except TableNotFoundError:
            raise TableError(f"table {ref} does not exist (nothing ingested into it yet?)") from None
        except Exception as exc:  # deltalake raises bare exceptions for a missing version
            raise TableError(f"cannot open {ref}" + (f" at version {version}" if version is not None else "") + f": {exc}") from None
        if as_of is not None:
            try:
                dt.load_as_version(as_of)
            except Exception as exc:
                raise TableError(f"cannot open {ref} as of {as_of}: {exc}") from None
        return dt

    def list(self) -> list[TableRef]:
        """Every governed table that exists, on a local folder or an object store."""
        from pyarrow.fs import FileSelector, FileType

        from governance.objectstore import filesystem

        out = []
        for layer in LAYERS:
            fs, base = filesystem(self.config.table_uri(layer))
            names = sorted(
                info.base_name
                for info in fs.get_file_info(FileSelector(base, allow_not_found=True))
                if info.type == FileType.Directory and _NAME.match(info.base_name)
            )
            for name in names:
                if fs.get_file_info(f"{base}/{name}/_delta_log").type == FileType.Directory:
                    out.append(TableRef(layer, name))
        return out
