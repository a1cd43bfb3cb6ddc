"""Governed ingest: landing files become protected, validated Delta tables, exactly once.

For each file and each batch of at most ``batch_rows`` rows:

1. **read** — CSV, Parquet or JSON Lines as Arrow, without type inference;
2. **validate** — the data contract, in DuckDB (see :mod:`lakehouse.validate`);
   every rejected row gets a reason;
3. **protect** — subject keys become pseudonymous tokens; direct identifiers
   go to the vault, encrypted under the subject's own key; sensitive attributes
   are encrypted (or moved to the restricted table); quasi-identifiers are
   generalized or encrypted, as the column's protection says;
4. **write** — bronze, vault, restricted and quarantine appends, each a Delta
   commit carrying the application transaction ``lakewarden.ingest.<batch id>``,
   then one row in the ingest ledger. The batch id is a hash of the batch's
   content, so the same batch ingested twice is a no-op, and a rerun after a
   crash (even SIGKILL) writes exactly what is missing.

Rows read = rows accepted + rows quarantined (+ rows of batches skipped as
already ingested), checked after every file. Quarantined rows keep their
original values only encrypted: under the subject's key when the subject key
was valid (so erasure reaches them), else under a per-dataset quarantine key.
"""

from __future__ import annotations

import glob as globmod
import os
import json
import resource
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import ColumnProperties, CommitProperties, DeltaTable, Transaction, WriterProperties, write_deltalake
from deltalake.exceptions import CommitFailedError

from governance.gate import Actor, Resource
from governance.keys import KeyRing, SubjectKeys, native
from governance.lineage import DatasetRef
from governance.pii import redact
from governance.policy import ColumnClass, DatasetPolicy, Protection, Stage
from governance.workspace import Workspace
from lakehouse.alloc import batch_memory
from lakehouse.catalog import Catalog, TableRef, subject_buckets, table_buckets, table_configuration, table_description
from lakehouse.errors import IngestError
from lakehouse.landing import is_erasure_rewrite, record_kept
from lakehouse.readers import RawBatch, header, read_batches, to_text
from lakehouse.validate import ARROW_TYPE, ShapePlan, Validator, output_column, output_type, plan_shape

LEDGER = "_ingest/batches"
ENGINES = ("local", "ray")
_COMMIT_RETRIES = 8
# The columns ingest adds to every table it writes (see BatchWork._protected_tables).
_INGEST_COLUMNS = frozenset({"_subject_bucket", "_batch_id", "_row", "_ingested_at"})

LEDGER_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("first_row", pa.int64()),
        pa.field("rows_read", pa.int64()),
        pa.field("rows_accepted", pa.int64()),
        pa.field("rows_quarantined", pa.int64()),
        pa.field("actor", pa.string()),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC")),
    ]
)
QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("_batch_id", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("row_number", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("subject_token", pa.string()),
        pa.field("payload", pa.binary(), nullable=False),
        pa.field("_quarantined_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


@dataclass
class FileReport:
    source: str
    rows_read: int = 0
    rows_accepted: int = 0
    rows_quarantined: int = 0
    rows_skipped: int = 0
    batches: int = 0
    batches_skipped: int = 0
    dropped_columns: list[str] = field(default_factory=list)
    filled_columns: list[str] = field(default_factory=list)
    landing: str = "kept"

    @property
    def balanced(self) -> bool:
        return self.rows_read == self.rows_accepted + self.rows_quarantined + self.rows_skipped


@dataclass
class IngestReport:
    """What an ingest did; ``rows_read == rows_accepted + rows_quarantined + rows_skipped`` always."""

    dataset: str
    files: list[FileReport] = field(default_factory=list)
    reasons: Counter = field(default_factory=Counter)
    versions: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    engine: str = "local"
    worker_peak_rss_mb: list[float] = field(default_factory=list)  # the ray engine's workers
    driver_seconds: dict[str, float] = field(default_factory=dict)  # the ray engine's driver: where its time went

    def _sum(self, attr: str) -> int:
        return sum(getattr(f, attr) for f in self.files)

    rows_read = property(lambda self: self._sum("rows_read"))
    rows_accepted = property(lambda self: self._sum("rows_accepted"))
    rows_quarantined = property(lambda self: self._sum("rows_quarantined"))
    rows_skipped = property(lambda self: self._sum("rows_skipped"))
    batches = property(lambda self: self._sum("batches"))
    batches_skipped = property(lambda self: self._sum("batches_skipped"))

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "rows_read": self.rows_read,
            "rows_accepted": self.rows_accepted,
            "rows_quarantined": self.rows_quarantined,
            "rows_skipped": self.rows_skipped,
            "batches": self.batches,
            "batches_skipped": self.batches_skipped,
            "reasons": dict(self.reasons.most_common()),
            "versions": self.versions,
            "files": [
                {
                    "source": f.source,
                    "rows_read": f.rows_read,
                    "rows_accepted": f.rows_accepted,
                    "rows_quarantined": f.rows_quarantined,
                    "rows_skipped": f.rows_skipped,
                    "landing": f.landing,
                    "dropped_columns": f.dropped_columns,
                    "filled_columns": f.filled_columns,
                }
                for f in self.files
            ],
            "seconds": round(self.seconds, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "engine": self.engine,
            "worker_peak_rss_mb": self.worker_peak_rss_mb,
            "driver_seconds": {k: round(v, 3) for k, v in self.driver_seconds.items()},
        }


Progress = Callable[[str, int], None]



def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files named directly or by glob, in a stable order; a pattern matching nothing is an error."""
    out: list[Path] = []
    for p in paths:
        s = str(p)
        if any(ch in s for ch in "*?["):
            matches = sorted(Path(m) for m in globmod.glob(s, recursive=True) if Path(m).is_file())
            if not matches:
                raise IngestError(f"no files match {s!r}")
            out.extend(matches)
        else:
            path = Path(s)
            if not path.exists():
                raise IngestError(f"{s}: no such file")
            if path.is_dir():
                raise IngestError(f"{s}: is a folder; name the files or use a glob such as '{s}/*.csv'")
            out.append(path)
    seen: set[Path] = set()
    return [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]


class BatchWork:
    """What one batch goes through, with no state across batches but a token cache: text and
    shape, the contract's rules, tokens and keys, the sort into accepted and quarantined rows,
    sealing, and the tables' Arrow form. The embedded ingest (:class:`Ingestor`) runs it in
    threads; the Ray engine runs the same object in each worker (:mod:`lakehouse.distributed`)."""

    TOKEN_CACHE_MAX = 2_000_000  # subjects whose tokens an ingest keeps (datasets that seal nothing)

    def __init__(self, policy: DatasetPolicy, ring: KeyRing, dataset: str, *, buckets: int, compression: str,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.policy = policy
        self.ring = ring
        self.dataset = dataset
        self.buckets = buckets
        self.compression = compression
        self.validator = Validator(policy, clock=clock)  # "today" in the contract's bounds
        self.reasons: Counter = Counter()
        pol = policy
        self.vault_cols = [n for n, c in pol.columns.items() if c.protection is Protection.VAULT]
        self.restricted_cols = [n for n, c in pol.columns.items() if c.protection is Protection.RESTRICTED]
        self.bronze_cols = [n for n in pol.columns if n not in self.vault_cols and n not in self.restricted_cols]
        self.sealed_cols = sealed_columns(pol)
        self.partition_by = [*pol.layout.partition_by, "_subject_bucket"]
        self._token_cache = native.token_cache()  # None without the native core: Arrow arrays below
        self._cache_keys: pa.Array | None = None
        self._cache_tokens: pa.Array | None = None
        self._cache_lock = threading.Lock()

    def _check(self, raw: RawBatch, plan: ShapePlan, now: datetime | None = None) -> tuple[pa.Table, tuple | None] | None:
        """The part of a batch that runs in the pool, several batches at once: text, shape, every
        rule but uniqueness across batches, and the rows' subjects. ``now``: see
        :meth:`Validator.check`."""
        text, bad_utf8 = to_text(raw.table)
        text = self._conform(text, plan)
        pre = None
        if bad_utf8:
            pre_vals = [None] * text.num_rows
            for col, mask in bad_utf8.items():
                name = plan.rename.get(col, col)
                for i, m in enumerate(mask.to_pylist()):
                    if m and pre_vals[i] is None:
                        pre_vals[i] = f"{name}: not valid UTF-8 text"
            pre = pa.array(pre_vals, pa.string())
        if not text.num_rows:
            return None
        out = self.validator.check(text, raw.first_row, pre, now=now)
        if raw.offsets is not None and out.num_rows:  # a stream's batch: a row's number is its offset
            i = out.schema.get_field_index("_row")
            out = out.set_column(i, "_row", pc.take(raw.offsets, pc.subtract(out["_row"], raw.first_row)))
        # Tokens (and keys) now, in the pool too: the key store serializes its own transactions,
        # and a subject's token does not depend on which batch asked first.
        subjects = self._subjects(native.one_array(out["_t_" + self.policy.subject_key])) if out.num_rows else None
        return out, subjects

    def _conform(self, text: pa.Table, plan: ShapePlan) -> pa.Table:
        """Rename file columns to policy names, drop unknown ones, add missing optional ones as NULL."""
        cols, names = [], []
        for src, dst in plan.rename.items():
            cols.append(text[src])
            names.append(dst)
        for missing in plan.filled:
            cols.append(pa.nulls(text.num_rows, pa.string()))
            names.append(missing)
        return pa.table(cols, names=names)

    # -- protection -------------------------------------------------------------------
    def _subjects(self, keys: pa.Array) -> tuple[pa.Array, pa.Array, SubjectKeys | None, pa.Array]:
        """Per row: token, subject bucket; and, when the dataset seals columns, the batch's
        subjects' data keys with each row's index into them. NULL keys stay NULL.

        No Python per row: the ids go to the key store as one Arrow column (blind indexes in the
        native core), and tokens come back as one. A dataset that seals nothing keeps a
        per-ingest Arrow cache of tokens, so a subject seen in an earlier batch is not looked up
        again (transactions: many rows per customer).
        """
        store = self.ring.store
        if self.sealed_cols and self.policy.columns[self.policy.subject_key].unique and not keys.null_count:
            # A unique subject key (a row a person: customers): the key store takes the column as
            # it is, and finds a repeat itself (by blind index, as it dedupes any batch), without a
            # hash table of the ids here (unique, index_in and take: 20-40 ms a batch of 143k).
            subjects = store.subject_keys(keys, keys=True)
            tokens = subjects.tokens
            if tokens.null_count:  # never expected, as below
                raise IngestError(f"{self.dataset}: {tokens.null_count} subject key(s) got no token from the key store")
            every = pa.array(np.arange(len(keys), dtype=np.int32))
            return tokens, subject_buckets(tokens, self.buckets), subjects, every
        uniq = pc.unique(keys.drop_null())
        idx = pc.index_in(keys, value_set=uniq)
        if self.sealed_cols:
            subjects = store.subject_keys(uniq, keys=True)
            tok_u = subjects.tokens
        else:
            subjects = None
            tok_u = self._cached_tokens(uniq)
        if tok_u.null_count:  # never expected: every subject key gets a token (created if new)
            raise IngestError(f"{self.dataset}: {tok_u.null_count} subject key(s) got no token from the key store")
        bk_u = subject_buckets(tok_u, self.buckets)
        return pc.take(tok_u, idx), pc.take(bk_u, idx), subjects, idx

    def _cached_tokens(self, uniq: pa.Array) -> pa.Array:
        cache = self._token_cache
        if cache is None:
            with self._cache_lock:
                return self._cached_tokens_locked(uniq)
        # No lock: two batches that miss the same subject both ask the key store, which gives
        # both the same token; the cache keeps the first.
        tokens = cache.lookup(uniq)
        if not tokens.null_count:
            return tokens
        missing_mask = pc.is_null(tokens)
        missing = uniq.filter(missing_mask)
        new = self.ring.store.subject_keys(missing).tokens
        tokens = pc.replace_with_mask(tokens, missing_mask, new)
        if len(cache) + len(missing) > self.TOKEN_CACHE_MAX:
            cache.clear()  # start again from this batch's subjects
            cache.insert(uniq, tokens)
        else:
            cache.insert(missing, new)
        return tokens

    def _cached_tokens_locked(self, uniq: pa.Array) -> pa.Array:
        if self._cache_keys is not None:
            pos = pc.index_in(uniq, value_set=self._cache_keys)
            tokens = pc.take(self._cache_tokens, pos)  # null where not cached
            missing_mask = pc.is_null(pos)
        else:
            tokens = pa.nulls(len(uniq), pa.string())
            missing_mask = pa.array(np.ones(len(uniq), dtype=bool))
        missing = uniq.filter(missing_mask)
        if not len(missing):
            return tokens
        new = self.ring.store.subject_keys(missing).tokens
        tokens = pc.replace_with_mask(tokens, missing_mask, new)
        if self._cache_keys is None or len(self._cache_keys) + len(missing) > self.TOKEN_CACHE_MAX:
            self._cache_keys, self._cache_tokens = uniq, tokens  # start again from this batch's subjects
        else:
            self._cache_keys = pa.concat_arrays([self._cache_keys, missing])
            self._cache_tokens = pa.concat_arrays([self._cache_tokens, new])
        return tokens

    def _sort(
        self, out: pa.Table | None, resolved: tuple | None, reasons: pa.Array | None, raw: RawBatch, batch_id: str,
        source: str, now: datetime, submit: Callable[..., Any],
    ) -> tuple[Any, int, pa.Table]:
        """Sort a checked batch into accepted rows and quarantine by its final ``reasons`` (from
        :meth:`Ingestor._final_reasons`). The accepted rows' sealing and table building go to
        ``submit`` (a pool's, or a direct call): ``(its result, rows accepted, quarantine table)``."""
        pol = self.policy
        q_rows: dict[str, list[Any]] = {n: [] for n in QUARANTINE_SCHEMA.names}
        result: Any = None
        n_acc = 0
        if out is not None and out.num_rows:
            tokens, buckets, subjects, key_index = resolved  # type: ignore[misc]
            ok = pc.is_null(reasons)
            if reasons.null_count == len(reasons):  # every row accepted (the common case): nothing to cut out
                acc, acc_tokens, acc_buckets, acc_index = out, tokens, buckets, key_index
                rej = out.slice(0, 0)
                rej_tokens, rej_reasons = tokens.slice(0, 0), reasons.slice(0, 0)  # type: ignore[union-attr]
            else:
                acc = out.filter(ok)
                acc_tokens, acc_buckets, acc_index = tokens.filter(ok), buckets.filter(ok), key_index.filter(ok)
                rej = out.filter(pc.invert(ok))
                rej_tokens = tokens.filter(pc.invert(ok))
                rej_reasons = reasons.filter(pc.invert(ok))  # type: ignore[union-attr]
            n_acc = acc.num_rows
            result = submit(self._protected_tables, acc, acc_tokens, acc_buckets, subjects, acc_index, batch_id, now)
            # Quarantine: the original row, encrypted; the reason in plaintext (it names no value).
            raw_cols = [n for n in pol.columns]
            originals = rej.select([f"_v_{n}" for n in raw_cols]).rename_columns(raw_cols).to_pylist()
            for row, tok, reason, original in zip(
                rej["_row"].to_pylist(), rej_tokens.to_pylist(), rej_reasons.to_pylist(), originals
            ):
                payload = json.dumps(original, default=str, ensure_ascii=False, sort_keys=True)
                self._quarantine_row(q_rows, batch_id, source, row, reason, tok, payload, now)
        for m in raw.malformed:
            self._quarantine_row(q_rows, batch_id, source, m.row, m.reason, None, m.text, now)
        return result, n_acc, pa.table(q_rows, schema=QUARANTINE_SCHEMA)

    def _quarantine_row(self, q: dict[str, list[Any]], batch_id: str, source: str, row: int | None,
                        reason: str, token: str | None, payload: str, now: datetime) -> None:
        ds = f"quarantine.{self.dataset}"
        self.reasons[reason] += 1
        if token is not None:
            blob = self.ring.seal(payload, token=token, dataset=ds, column="row")
        else:
            blob = self.ring.seal_system(f"quarantine:{self.dataset}", payload, dataset=ds, column="row")
        q["_batch_id"].append(batch_id)
        q["source"].append(source)
        q["row_number"].append(row)
        q["reason"].append(reason)
        q["subject_token"].append(token)
        q["payload"].append(blob)
        q["_quarantined_at"].append(now)

    def _protected_tables(
        self, acc: pa.Table, tokens: pa.Array, buckets: pa.Array, subjects: SubjectKeys | None,
        key_index: pa.Array, batch_id: str, now: datetime,
    ) -> dict[str, pa.Table]:
        pol = self.policy
        n = acc.num_rows
        meta = {
            "_subject_bucket": buckets,
            "_batch_id": pa.repeat(pa.scalar(batch_id, pa.string()), n),
            "_row": acc["_row"],
            "_ingested_at": pa.repeat(pa.scalar(now, pa.timestamp("us", tz="UTC")), n),
        }

        # Every encrypted column is sealed whole: Arrow in, Arrow out (the native core when built).
        sealed_cols: dict[str, pa.Array] = {}
        if self.sealed_cols:
            values = {}
            for name in self.sealed_cols:
                vals = native.one_array(acc[f"_t_{name}"])
                if not (pa.types.is_string(vals.type) or pa.types.is_binary(vals.type)):
                    vals = pc.cast(vals, pa.string())
                values[name] = vals
            sealed_cols = self.ring.seal_arrow(values, subjects, key_index, dataset=self.dataset)  # type: ignore[arg-type]

        bronze: dict[str, Any] = {}
        for name in self.bronze_cols:
            col = pol.columns[name]
            if col.class_ is ColumnClass.SUBJECT_KEY:
                bronze[name] = tokens
            elif col.protection is Protection.ENCRYPT:
                bronze[name] = sealed_cols[name]
            else:
                bronze[name] = pc.cast(output_column(acc, name), output_type(col))
        tables = {"bronze": pa.table({**bronze, **meta})}
        for layer, cols in (("vault", self.vault_cols), ("restricted", self.restricted_cols)):
            if cols:
                t = {pol.subject_key: tokens, **{c: sealed_cols[c] for c in cols}, **meta}
                tbl = pa.table(t)
                present = None
                for c in cols:
                    nn = pc.is_valid(tbl[c])
                    present = nn if present is None else pc.or_(present, nn)
                # Every row present (a customers batch): the table as it is, not a copy of all its
                # ciphertext (5-60 ms a batch of 166k customers, the most when the copy's pages are new).
                tables[layer] = tbl if pc.all(present).as_py() else tbl.filter(present)
        return tables

    def partitions(self, columns: list[str]) -> list[str]:
        """A table's partition columns: the policy's layout and the subject bucket, those it has (the
        vault and restricted tables hold no public column, so they are partitioned by bucket only)."""
        return [c for c in self.partition_by if c in columns]

    def _writer_properties(self, tbl: pa.Table) -> WriterProperties:
        """The storage's compression, and per column what its values call for:

        * sealed columns (random bytes): no dictionary and no min/max statistics, which cost CPU
          and buy nothing on ciphertext; their lengths delta-encoded (``DELTA_LENGTH_BYTE_ARRAY``:
          a column of values of similar length stores its lengths in a few bits each, not four
          bytes each);
        * the subject token: no statistics (the Delta log keeps none for it either, see
          :func:`table_configuration`; a token's order means nothing), and no dictionary when
          most rows of the batch are distinct subjects (a dictionary would be built, found too
          large and dropped: 15% of a transactions write's CPU), its lengths delta-encoded then;
        * the row numbers: delta-encoded (consecutive numbers take a few bits each);
        * unique columns: no dictionary (every value differs), statistics kept for data skipping.

        A table that holds nothing but ciphertext, tokens and the ingest's own columns (the vault,
        the restricted table) is written without block compression: the encodings above already
        take what a compressor would find there, and compressing random bytes is the larger part
        of such a write's CPU (1M customers' vault: 0.58 s of CPU and 161 MB with zstd, 0.33 s and
        168 MB without; #15).
        """
        key = self.policy.subject_key
        props: dict[str, ColumnProperties] = {}
        for c in tbl.column_names:
            if c in self.sealed_cols:
                props[c] = ColumnProperties(dictionary_enabled=False, statistics_enabled="NONE",
                                            encoding="DELTA_LENGTH_BYTE_ARRAY")
            elif c == key:
                distinct = _mostly_distinct(tbl[c])
                props[c] = ColumnProperties(dictionary_enabled=not distinct, statistics_enabled="NONE",
                                            encoding="DELTA_LENGTH_BYTE_ARRAY" if distinct else None)
            elif c == "_row":
                props[c] = ColumnProperties(dictionary_enabled=False, encoding="DELTA_BINARY_PACKED")
            elif c in self.policy.columns and self.policy.columns[c].unique:
                props[c] = ColumnProperties(dictionary_enabled=False)
        compress = self.compression != "none" and not ciphertext_only(tbl.column_names, self.sealed_cols, key)
        return WriterProperties(
            compression=self.compression.upper() if compress else "UNCOMPRESSED",
            column_properties=props or None,
        )


def ciphertext_only(columns: list[str], sealed: list[str], subject_key: str) -> bool:
    """Whether a table holds sealed values and nothing else but subject tokens and ingest's own
    columns (the vault, the restricted table): block compression finds nothing there that the
    encodings of :meth:`BatchWork._writer_properties` leave (both writers skip it then)."""
    return any(c in sealed for c in columns) and all(
        c in sealed or c == subject_key or c in _INGEST_COLUMNS for c in columns)


def _mostly_distinct(col: pa.ChunkedArray | pa.Array, sample: int = 4096) -> bool:
    """Whether more than half of a sample of the column's first values are distinct."""
    head = col.slice(0, sample)
    return len(head) > 0 and pc.count_distinct(head).as_py() * 2 > len(head)


class Ingestor(BatchWork):
    """Ingest files into one dataset. Use :func:`ingest`; this class holds the per-ingest state:
    batches done, values seen (uniqueness across batches), the writer."""

    def __init__(self, ws: Workspace, actor: Actor, dataset: str, *, batch_rows: int, progress: Progress | None,
                 workers: int | None = None):
        self.ws = ws
        self.actor = actor
        self.dataset = dataset
        self.policy: DatasetPolicy = ws.policies.dataset(dataset)
        self.catalog = Catalog(ws.config)
        super().__init__(self.policy, ws.keyring, dataset, buckets=self._bucket_count(),
                         compression=ws.config.storage.compression, clock=ws.now)
        self.batch_rows = batch_rows
        self.progress = progress
        self.existing_tokens: pa.Array | None = None
        self._seen_chunks: list[pa.Array] = []  # tokens accepted by this ingest's batches, not yet joined
        self.done = self._done_batches()
        self.versions: dict[str, int] = {}
        self._handles: dict[str, DeltaTable] = {}  # open tables, the writer thread's own
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lakewarden-ingest-writer")
        # Batches are checked (text, shape, rules: DuckDB, which releases the GIL) in a pool sized
        # to the cores, while this thread resolves tokens and seals (the native core releases it
        # too) and the writer commits: all cores work, and at most workers + 2 batches are held.
        self.workers = max(1, min(os.cpu_count() or 1, 4)) if workers is None else workers
        self._recent: deque[pa.Array] = deque(maxlen=self.workers)  # the last batches' accepted tokens
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lakewarden-ingest-check")
        self._pending: Future | None = None
        self._preload_unique()

    # -- setup ------------------------------------------------------------------------
    def _bucket_count(self) -> int:
        """The bronze table's own bucket count once it exists (a later policy change applies to
        new tables, so one table's rows never mix two bucketings), else the policy's."""
        ref = TableRef("bronze", self.dataset)
        if self.catalog.exists(ref):
            n = table_buckets(self.catalog.open(ref))
            if n is not None:
                return n
        return self.policy.layout.subject_buckets

    def _done_batches(self) -> set[str]:
        uri = self.ws.config.table_uri(LEDGER)
        if not DeltaTable.is_deltatable(uri):
            return set()
        t = DeltaTable(uri).to_pyarrow_dataset().to_table(
            columns=["batch_id"], filter=pc.field("dataset") == self.dataset
        )
        return set(t["batch_id"].to_pylist())

    def _preload_unique(self) -> None:
        bronze = TableRef("bronze", self.dataset)
        if not self.catalog.exists(bronze):
            return
        ds = self.catalog.open(bronze).to_pyarrow_dataset()
        key = self.policy.subject_key
        for name in self.validator.unique:
            if name == key:
                self.existing_tokens = ds.to_table(columns=[key])[key].combine_chunks()
            elif name in ds.schema.names:
                self.validator.preload_unique(name, ds.to_table(columns=[name])[name])

    # -- the work ---------------------------------------------------------------------
    def ingest_file(self, path: Path, *, skip: bool = False) -> FileReport:
        """Ingest one file; ``skip``: its rows were ingested before (an erasure's rewrite of a kept
        file), so every batch is counted as already ingested."""
        source = redact(path.name)[0]
        rep = FileReport(source=source)
        plan = plan_shape(self.policy, header(path), source=path.name, policy_file=f"policies/{self.dataset}.yaml")
        rep.dropped_columns, rep.filled_columns = plan.dropped, plan.filled
        inflight: deque[tuple[RawBatch, str, Future]] = deque()
        try:
            for raw, batch_id in self._new_batches(path, rep, skip=skip):
                inflight.append((raw, batch_id, self._pool.submit(self._check, raw, plan)))
                while len(inflight) >= self.workers:
                    self._finish(*inflight.popleft(), rep)
            while inflight:
                self._finish(*inflight.popleft(), rep)
        finally:
            for _, _, fut in inflight:
                fut.cancel()
        self.wait()
        if not rep.balanced:  # never expected: it would mean a row was lost
            raise IngestError(
                f"{path.name}: row counts do not add up (read {rep.rows_read}, accepted {rep.rows_accepted}, "
                f"quarantined {rep.rows_quarantined}, skipped {rep.rows_skipped})"
            )
        return rep

    def _new_batches(self, path: Path, rep: FileReport, *, skip: bool) -> Iterator[tuple[RawBatch, str]]:
        """The file's batches not ingested before, with their ids; every batch is counted in ``rep``
        (read, and skipped when it is in the ledger or ``skip``)."""
        for raw in read_batches(path, batch_rows=self.batch_rows):
            rep.rows_read += raw.rows_read
            rep.batches += 1
            batch_id = None if skip else self._batch_id(raw)
            if batch_id is None or batch_id in self.done:
                rep.rows_skipped += raw.rows_read
                rep.batches_skipped += 1
                continue
            self.done.add(batch_id)  # a repeat of this batch later in the same ingest is skipped too
            yield raw, batch_id

    def _finish(self, raw: RawBatch, batch_id: str, checked: Future, rep: FileReport, *,
                txn: Transaction | None = None, on_commit: Callable[[int, int], None] | None = None) -> None:
        """The ordered part of a batch, in file order: uniqueness across batches, tokens, sealing;
        then its commits go to the writer (at most one batch waits, so memory stays bounded)."""
        checked_out = checked.result()
        out, subjects = (None, None) if checked_out is None else checked_out
        if out is not None:
            out = self.validator.dedupe(out)
        fresh = subjects is not None and subjects[2] is not None and subjects[2].created == len(subjects[2].tokens)
        reasons = self._final_reasons(out, None if subjects is None else subjects[0], fresh=fresh)
        now = self.ws.now()
        accepted, n_acc, quarantine = self._sort(out, subjects, reasons, raw, batch_id, rep.source, now,
                                                 self._pool.submit)
        n_q = quarantine.num_rows
        rep.rows_accepted += n_acc
        rep.rows_quarantined += n_q
        # Write behind: this batch's commits run while the next batches are checked and protected.
        # The ledger row is written after the tables.
        self.wait()
        self._pending = self._writer.submit(self._commit, batch_id, accepted, quarantine, rep.source, raw, n_acc, n_q,
                                            now, txn, on_commit)
        if self.progress:
            self.progress(rep.source, raw.rows_read)

    def _final_reasons(self, out: pa.Table | None, tokens: pa.Array | None, *, fresh: bool = False) -> pa.Array | None:
        """A batch's reasons after the rules that need every earlier batch, in file order: ``out``
        has been through :meth:`Validator.dedupe`; a unique subject key already in the table (an
        earlier ingest or batch) is a duplicate too. Only ``_row``, ``_reason`` and the unique
        columns of ``out`` are read, so a Ray driver runs this on a small slice of the batch.

        ``fresh``: the key store created every subject of this batch just now. None of them can be in
        the table, nor in an earlier batch whose subjects were resolved before this batch's were: that
        is every batch but the ``workers`` before it (a batch is submitted only once the batch
        ``workers`` places back has been resolved; batches in flight together may be resolved in
        either order). So a fresh batch is looked up in those few batches' tokens only, not in every
        token seen before (a file of new people: that was quadratic in the file's size). The tokens
        seen are kept as chunks, joined only when a batch needs the full lookup."""
        if out is None or not out.num_rows:
            return None
        key = self.policy.subject_key
        reasons = native.one_array(out["_reason"])
        if self.existing_tokens is not None:
            seen: pa.Array | None = self.existing_tokens
            if fresh:
                seen = pa.concat_arrays(list(self._recent)) if self._recent else None
            elif self._seen_chunks:  # join what earlier batches added, once, when a full lookup needs it
                seen = self.existing_tokens = pa.concat_arrays([self.existing_tokens, *self._seen_chunks])
                self._seen_chunks = []
            if seen is not None and len(seen):
                dup = pc.and_(pc.is_null(reasons), pc.is_in(tokens, value_set=seen))
                reasons = pc.if_else(dup, f"{key}: duplicate of a subject already ingested", reasons)
            if self.policy.columns[key].unique:
                accepted = tokens.filter(pc.is_null(reasons))
                self._seen_chunks.append(accepted)
                self._recent.append(accepted)
        return reasons

    def _commit(self, batch_id: str, protected: Future | None, quarantine: pa.Table, source: str,
                raw: RawBatch, n_acc: int, n_q: int, now: datetime, txn: Transaction | None = None,
                on_commit: Callable[[int, int], None] | None = None) -> None:
        accepted = protected.result() if protected is not None else None
        self._write_batch(batch_id, accepted, quarantine, txn)
        self._ledger(batch_id, source, raw.first_row, raw.rows_read, n_acc, n_q, now, txn)
        self.ws.audit.record(
            "ingest.batch", actor=self.actor.name, outcome="ok", stage=Stage.INGEST.value,
            resource=f"dataset:{self.dataset}",
            details={"batch_id": batch_id, "rows_read": raw.rows_read, "accepted": n_acc, "quarantined": n_q},
        )
        if on_commit is not None:
            on_commit(n_acc, n_q)

    def wait(self) -> None:
        """Wait for the batch being written; re-raise its error here, in the ingest's thread."""
        if self._pending is not None:
            fut, self._pending = self._pending, None
            fut.result()

    def _batch_id(self, raw: RawBatch) -> str:
        """A hash of the batch's content (values, lengths, nulls), independent of how it is chunked."""
        h = native.Hasher(f"lakewarden-batch:v1|{self.dataset}|{raw.table.num_rows}|".encode())
        for name in raw.table.column_names:
            h.update(b"|" + name.encode() + b"|")
            col = raw.table[name]
            for chunk in col.chunks:
                if pa.types.is_binary(chunk.type) or pa.types.is_string(chunk.type):
                    h.update_binary(chunk)
                else:
                    sink = pa.BufferOutputStream()
                    with pa.ipc.new_stream(sink, pa.schema([(name, chunk.type)])) as w:
                        w.write_batch(pa.record_batch([chunk], names=[name]))
                    h.update(sink.getvalue())
        for m in raw.malformed:
            h.update(b"|" + m.text.encode("utf-8", "replace"))
        return h.hexdigest()[:32]

    # -- writing ----------------------------------------------------------------------
    def _write_batch(self, batch_id: str, accepted: dict[str, pa.Table] | None, quarantine: pa.Table,
                     txn: Transaction | None = None) -> None:
        """Each table's append carries ``txn``: a file batch's own id at version 0, or a stream's
        partition at the batch's last offset. Bronze is written last, so a batch in bronze is in
        every table (streams rely on it when they resume)."""
        txn = txn or Transaction(app_id=f"lakewarden.ingest.{batch_id}", version=0)
        if quarantine.num_rows:
            self._append(TableRef("quarantine", self.dataset), quarantine, txn, [])
        if accepted:
            for layer in ("vault", "restricted", "bronze"):
                tbl = accepted.get(layer)
                if tbl is not None and tbl.num_rows:
                    self._append(TableRef(layer, self.dataset), tbl, txn, self.partitions(tbl.column_names))

    def _handle(self, uri: str) -> DeltaTable | None:
        """The table at ``uri`` brought up to date (None while it does not exist). Handles are
        kept from batch to batch: bringing one up to date reads only the commits made since,
        where opening a table replays its log (three opens a batch before)."""
        so = self.catalog.storage_options
        dt = self._handles.get(uri)
        if dt is not None:
            dt.update_incremental()  # another writer's commits, if any: the transaction check sees them
            return dt
        if not DeltaTable.is_deltatable(uri, storage_options=so):
            return None
        dt = self._handles[uri] = DeltaTable(uri, storage_options=so)
        return dt

    def _append(self, ref: TableRef, tbl: pa.Table, txn: Transaction, partition_by: list[str]) -> None:
        uri = self.catalog.uri(ref)
        so = self.catalog.storage_options
        evolve = self.policy.contract.schema_evolution == "merge"
        for attempt in range(_COMMIT_RETRIES):
            dt = self._handle(uri)
            if dt is not None:
                done = dt.transaction_version(txn.app_id)
                if done is not None and done >= txn.version:
                    self.versions[str(ref)] = dt.version()
                    return  # written before a crash: exactly once
                names = {f.name for f in dt.schema().fields}
                if not evolve and set(tbl.column_names) - names:
                    new = sorted(set(tbl.column_names) - names)
                    raise IngestError(
                        f"{ref}: the policy added column(s) {', '.join(new)} since the table was created "
                        "and contract.schema_evolution is reject"
                    )
            try:
                write_deltalake(
                    dt if dt is not None else uri, tbl, mode="append", partition_by=partition_by or None,
                    schema_mode="merge" if evolve else None,
                    configuration=table_configuration(tbl.column_names, self.policy.subject_key),
                    description=table_description(self.buckets if "_subject_bucket" in tbl.column_names else None),
                    storage_options=so if dt is None else None,
                    writer_properties=self._writer_properties(tbl),
                    commit_properties=CommitProperties(app_transactions=[txn]),
                )
                self.versions[str(ref)] = (dt or self._handle(uri)).version()  # type: ignore[union-attr]
                return
            except CommitFailedError:
                time.sleep(0.05 * (2**attempt))
            except Exception as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                if "Schema" in msg or "schema" in msg:
                    raise IngestError(f"{ref}: the batch does not fit the table's schema ({msg})") from None
                raise
        raise IngestError(f"{ref}: could not commit after {_COMMIT_RETRIES} attempts (concurrent writers)")

    def _ledger(self, batch_id: str, source: str, first_row: int, rows_read: int, acc: int, quar: int,
                now: datetime, txn: Transaction | None = None) -> None:
        """One row per batch. A stream's row carries its partition's transaction too: the ledger
        is where a stream resumes from, so it is written after every table of the batch."""
        self._ledger_rows([(batch_id, source, first_row, rows_read, acc, quar, now)], txn)

    def _ledger_rows(self, rows: list[tuple[str, str, int, int, int, int, datetime]],
                     txn: Transaction | None = None) -> None:
        """Ledger rows ``(batch id, source, first row, read, accepted, quarantined, time)`` in one commit."""
        cols = list(zip(*rows))
        row = pa.table(
            {
                "batch_id": cols[0], "dataset": [self.dataset] * len(rows), "source": cols[1], "first_row": cols[2],
                "rows_read": cols[3], "rows_accepted": cols[4], "rows_quarantined": cols[5],
                "actor": [self.actor.name] * len(rows), "ingested_at": cols[6],
            },
            schema=LEDGER_SCHEMA,
        )
        uri = self.ws.config.table_uri(LEDGER)
        for attempt in range(_COMMIT_RETRIES):
            try:
                dt = self._handle(uri)
                if txn is not None and dt is not None:
                    done = dt.transaction_version(txn.app_id)
                    if done is not None and done >= txn.version:
                        return
                write_deltalake(dt if dt is not None else uri, row, mode="append",
                                storage_options=self.catalog.storage_options if dt is None else None,
                                commit_properties=CommitProperties(app_transactions=[txn]) if txn else None)
                return
            except CommitFailedError:
                time.sleep(0.05 * (2**attempt))
        raise IngestError(f"{LEDGER}: could not commit after {_COMMIT_RETRIES} attempts")

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._writer.shutdown(wait=True)
            self.validator.close()




def sealed_columns(policy: DatasetPolicy) -> list[str]:
    """The columns an ingest encrypts: in place, into the vault, or into the restricted table."""
    return [n for n, c in policy.columns.items()
            if c.protection in (Protection.ENCRYPT, Protection.VAULT, Protection.RESTRICTED)]


def default_batch_rows(policy: DatasetPolicy) -> int:
    """Rows per batch when none is given: smaller when many columns are encrypted per row.

    With the native core a sealed value is a few Arrow bytes, so batches stay large (fewer
    commits). On the pure-Python path sealing turns every value into a Python bytes object for a
    moment (~0.3 KB each with its list slot and Arrow copy), so a batch's memory grows with the
    encrypted columns.
    """
    sealed = len(sealed_columns(policy))
    if native.backend() == "native":
        return max(50_000, min(250_000, 1_000_000 // (1 + sealed)))
    return max(20_000, min(250_000, 1_000_000 // (1 + 4 * sealed)))


def ingest(
    ws: Workspace,
    actor: Actor,
    dataset: str,
    paths: Iterable[str | Path],
    *,
    batch_rows: int | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    engine: str = "local",
) -> IngestReport:
    """Ingest landing files into ``dataset`` (see the module docstring). The gate decides first.

    ``batch_rows`` bounds memory (default: :func:`default_batch_rows` for the dataset);
    ``workers`` batches are checked at once (default: the machine's cores, at most 4; with the
    ray engine, one worker per CPU of the cluster). ``engine``: ``local`` (threads in this
    process) or ``ray`` (the batch work on a Ray cluster at ``$RAY_ADDRESS``, else one started
    here; see :mod:`lakehouse.distributed`): the same rules, tables, counts, audit and lineage.

    Raises:
        AccessDenied: the actor may not ingest into this dataset.
        PolicyError: no policy governs the dataset.
        IngestError: a file cannot be read or its shape breaks the contract; batches
            committed before the error stay committed and are skipped on a rerun.
    """
    if engine not in ENGINES:
        raise IngestError(f"unknown ingest engine {engine!r} (engines: {', '.join(ENGINES)})")
    if batch_rows is not None and batch_rows < 1:
        raise IngestError(f"batch size must be at least 1 row (got {batch_rows})")
    TableRef("bronze", dataset)  # validates the name: no paths, no odd characters
    t0 = time.perf_counter()
    ws.gate.enforce(Stage.INGEST, actor, Resource.dataset(dataset))
    if batch_rows is None:
        batch_rows = default_batch_rows(ws.policies.dataset(dataset))
    files = expand(paths)
    if not files:
        raise IngestError("no files to ingest")
    report = IngestReport(dataset)
    if engine == "ray":
        from lakehouse.distributed import RayIngestor

        ing: Ingestor = RayIngestor(ws, actor, dataset, batch_rows=batch_rows, progress=progress, workers=workers)
    else:
        ing = Ingestor(ws, actor, dataset, batch_rows=batch_rows, progress=progress, workers=workers)
    # Freed buffers stay in the process for the next batch (see lakehouse.alloc), given back at the end.
    with batch_memory():
        try:
            for path in files:
                rewritten = is_erasure_rewrite(ws, dataset, path)
                with ws.lineage.run(
                    f"ingest.{dataset}", inputs=[DatasetRef(f"landing.{dataset}/{redact(path.name)[0]}", kind="file")]
                ) as run:
                    frep = ing.ingest_file(path, skip=rewritten)
                    for name, version in sorted(ing.versions.items()):
                        run.add_output(DatasetRef(name, version=version))
                frep.landing = _landing(ing.policy, path)
                if path.exists():  # kept (by policy, or it could not be removed): erasure must find it
                    record_kept(ws, dataset, path, actor=actor.name)
                if rewritten:
                    frep.landing += "; rewritten by an erasure, its rows were ingested before"
                report.files.append(frep)
                ws.audit.record(
                    "ingest.file", actor=actor.name, outcome="ok", stage=Stage.INGEST.value,
                    resource=f"dataset:{dataset}",
                    details={
                        "source": frep.source, "rows_read": frep.rows_read, "accepted": frep.rows_accepted,
                        "quarantined": frep.rows_quarantined, "skipped": frep.rows_skipped, "landing": frep.landing,
                    },
                )
                ws.audit.flush()
        finally:
            ing.close()
    report.versions = dict(ing.versions)
    report.engine = engine
    report.worker_peak_rss_mb = list(getattr(ing, "worker_peak_rss_mb", []))
    report.driver_seconds = dict(getattr(ing, "driver_seconds", {}))
    report.reasons = ing.reasons
    report.seconds = time.perf_counter() - t0
    report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report


def _landing(policy: DatasetPolicy, path: Path) -> str:
    if policy.landing == "remove":
        try:
            path.unlink()
            return "removed"
        except OSError as exc:
            return f"kept (could not remove: {exc.strerror})"
    return "kept (in scope of erasure and retention)"


__all__ = ["FileReport", "IngestReport", "expand", "ingest", "LEDGER", "ARROW_TYPE"]
