"""Key store schema 5: data keys in per-batch blocks, blind indexes in sorted runs (the pure-Python twin).

``native/src/keystore.rs`` is the same layout in Rust (the bulk path of a large ingest); this module
is its reference, the whole layout for a machine without the native core, and the one place that
shreds, rotates, converts and counts (the key store calls it for both backends).

Schema 4 wrote a row of ``subjects`` and an index entry per subject, and merged its recent blind
indexes into one main B-tree: at 10M new subjects that storage took about 21 s of a 40 s ingest
(#15; ``bench_ingest_floor.py``). Schema 5 stores a batch of new subjects as a few large values
(``bench_keystore_layout.py`` measured the storage alone before it was built):

``keyblocks(first_id, n, kek_id, created_at, wrapped)``
    The wrapped data keys of subjects ``first_id .. first_id + n - 1`` (row ids, never reused), 60
    bytes each (:data:`WRAPPED`), at most :data:`BLOCK` a row. A shredded subject's 60 bytes are
    zeros. A lookup by token decrypts the token to its row id (a token is its id's keyed
    permutation, as since schema 2) and reads the block holding it.
``bi_runs(run, level, fences)`` and ``bi_parts(run, part, entries)``
    The blind indexes, in runs: a batch's new subjects are one run (numbered from ``lsm.last_run``,
    never reused; a merged run takes a new number), its entries sorted, 24 bytes each
    (:data:`ENTRY`): the blind index's key, its first 16 bytes (:data:`KEY`: 128 bits, so two of
    10^10 subjects share one with a chance below 10^-18), then the row id, 8 bytes big endian. A
    run is cut into parts of at most :data:`PART` entries; ``fences`` holds the first 8 bytes of
    each part's first entry (where a lookup finds the part that may hold a key); a part a shred
    emptied takes the fence of the part after it. Once :data:`FANOUT` runs share a level they are
    merged into one run of the next (a tiered merge: each subject is rewritten once a level, and a
    lookup searches at most ``FANOUT - 1`` runs a level). A key is in one run only: the writer
    looks every id of a batch up inside its write transaction first.
``lsm(name, value)``
    ``last_id``: the last row id given (``AUTOINCREMENT``'s role in schema 4); ``last_run``: the
    last run number given.

A shred zeroes the subject's 60 bytes in its block and takes its entry out of its run's part (both
values rewritten; ``secure_delete`` zeroes the pages they leave, and a merge's input pages too),
updating the fence when the entry was a part's first, so no byte of the erased blind index stays
in the file. Finding the entry reads every run's row ids (a subject's block does not hold its
blind index): 0.5 s for one subject in a store of 10M, 1.7 s for 1,000.

Each process keeps, per run, what lets a lookup skip the runs that cannot hold an id: here the
first 8 bytes of every entry, sorted (read once per run); in the native core a Bloom filter. Runs
are never added to, so what a process read stays a superset of the run for as long as the run
exists (a shred only takes entries out); a merged run is a new run.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

from governance.errors import KeyManagementError

if TYPE_CHECKING:
    import numpy as np

BLOCK = 1024  # subjects a key block (60 KB of wrapped keys)
PART = 1024  # entries a part of a run (24 KB)
FANOUT = 8  # runs of one level merged into one of the next
KEY = 16  # a blind index's key: its first 16 bytes (128 bits: a collision among 10^10 subjects has a chance below 10^-18)
ENTRY = KEY + 8  # a run's entry: the key, then the row id (8 bytes, big endian)
WRAPPED = 60
_ZERO = bytes(WRAPPED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    name       TEXT PRIMARY KEY,
    wrapped    BLOB NOT NULL,
    kek_id     TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS keyblocks(
    first_id   INTEGER PRIMARY KEY,
    n          INTEGER NOT NULL,
    kek_id     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    wrapped    BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS bi_runs(run INTEGER PRIMARY KEY, level INTEGER NOT NULL, fences BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS bi_parts(
    run     INTEGER NOT NULL,
    part    INTEGER NOT NULL,
    entries BLOB NOT NULL,
    PRIMARY KEY (run, part)
);
CREATE TABLE IF NOT EXISTS lsm(name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS shredded(
    token       TEXT PRIMARY KEY,
    shredded_at TEXT NOT NULL
);
"""


def create_tables(c: sqlite3.Connection) -> None:
    """Schema 5's tables, one statement at a time (``executescript`` would commit the caller's transaction)."""
    for stmt in SCHEMA.split(";"):
        if stmt.strip():
            c.execute(stmt)


def last_id(c: sqlite3.Connection) -> int:
    """The last row id given to a subject (0 in a new store)."""
    return c.execute("SELECT coalesce((SELECT value FROM lsm WHERE name='last_id'), 0)").fetchone()[0]


def next_run(c: sqlite3.Connection) -> int:
    """A new run number (taken: never given again)."""
    run = c.execute("SELECT coalesce((SELECT value FROM lsm WHERE name='last_run'), 0)").fetchone()[0] + 1
    c.execute("INSERT OR REPLACE INTO lsm(name, value) VALUES ('last_run', ?)", (run,))
    return run


def prefixes(entries: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each row of ``entries`` (uint8, n x 16 or n x 24), as big-endian numbers: their order."""
    import numpy as np

    return np.ascontiguousarray(entries[:, :8]).view(">u8").reshape(-1).astype(np.uint64)


def _entries(blob: bytes) -> np.ndarray:
    import numpy as np

    if len(blob) % ENTRY:
        raise KeyManagementError(f"a run's part is {len(blob)} bytes, not a multiple of {ENTRY}")
    return np.frombuffer(blob, np.uint8).reshape(-1, ENTRY)


def _ids(entries: np.ndarray) -> np.ndarray:
    import numpy as np

    return np.ascontiguousarray(entries[:, KEY:]).view(">u8").reshape(-1).astype(np.int64)


def _order(entries: np.ndarray) -> np.ndarray:
    """The order of ``entries`` by key (as two big-endian words)."""
    import numpy as np

    words = np.ascontiguousarray(entries[:, :KEY]).view(">u8").astype(np.uint64)
    return np.lexsort((words[:, 1], words[:, 0]))


def _fences(parts: Sequence[np.ndarray]) -> bytes:
    import numpy as np

    return np.asarray([int(prefixes(p[:1])[0]) for p in parts], dtype=">u8").tobytes()


def _fix_fences(fences: np.ndarray, empty: set[int]) -> bytes:
    """A run's fences with each empty part's set to the next part's (the last's to the largest
    key): a lookup then searches the part before it, which is where such a key would be."""
    import numpy as np

    out = fences.copy()
    nxt = np.uint64(2**64 - 1)
    for p in range(len(out) - 1, -1, -1):
        if p in empty:
            out[p] = nxt
        nxt = out[p]
    return out.astype(">u8").tobytes()


def write_run(c: sqlite3.Connection, run: int, level: int, entries: np.ndarray) -> None:
    """Store ``entries`` (sorted, n x ENTRY) as run ``run`` of ``level``, cut into parts."""
    parts = [entries[i : i + PART] for i in range(0, len(entries), PART)]
    c.execute("INSERT INTO bi_runs(run, level, fences) VALUES (?,?,?)", (run, level, _fences(parts)))
    c.executemany("INSERT INTO bi_parts(run, part, entries) VALUES (?,?,?)",
                  ((run, i, p.tobytes()) for i, p in enumerate(parts)))


def read_run(c: sqlite3.Connection, run: int) -> np.ndarray:
    """Every entry of run ``run``, in order (n x ENTRY)."""
    import numpy as np

    blobs = [b for (b,) in c.execute("SELECT entries FROM bi_parts WHERE run=? ORDER BY part", (run,))]
    if not blobs:
        return np.empty((0, ENTRY), np.uint8)
    return np.concatenate([_entries(b) for b in blobs])


def level_of(n: int, batch: int = 131_072) -> int:
    """The level a run of ``n`` entries belongs to when made at once (a conversion): as many as
    merges of runs of about ``batch`` would have made it."""
    level = 0
    while n >= FANOUT * batch:
        n //= FANOUT
        level += 1
    return level


def merge_levels(c: sqlite3.Connection, fanout: int = FANOUT) -> list[tuple[int, int]]:
    """Merge every level holding ``fanout`` runs into one run of the next, cascading; the
    ``(run, level)`` of each run made (a new run number each)."""
    import numpy as np

    made = []
    level = 0
    while True:
        runs = [r for (r,) in c.execute("SELECT run FROM bi_runs WHERE level=? ORDER BY run", (level,))]
        if len(runs) >= max(2, fanout):
            merged = np.concatenate([read_run(c, r) for r in runs])
            merged = merged[_order(merged)]
            c.executemany("DELETE FROM bi_parts WHERE run=?", ((r,) for r in runs))
            c.executemany("DELETE FROM bi_runs WHERE run=?", ((r,) for r in runs))
            run = next_run(c)
            write_run(c, run, level + 1, merged)
            made.append((run, level + 1))
        elif not c.execute("SELECT 1 FROM bi_runs WHERE level > ? LIMIT 1", (level,)).fetchone():
            return made
        level += 1


class Runs:
    """The runs as this store handle knows them (the pure-Python twin of the native core's run
    cache): per run, its fences and the first 8 bytes of every entry, sorted (read once, when
    first needed)."""

    def __init__(self) -> None:
        import numpy as np

        self.keys: dict[int, np.ndarray] = {}
        self.fences: dict[int, np.ndarray] = {}

    def refresh(self, c: sqlite3.Connection) -> None:
        """Bring the list of runs up to date with the transaction's view (fences are read again:
        a shred may have moved one; keys of runs still there are kept)."""
        import numpy as np

        current = {r: np.frombuffer(f, ">u8").astype(np.uint64) for r, f in c.execute("SELECT run, fences FROM bi_runs")}
        self.keys = {k: v for k, v in self.keys.items() if k in current}
        self.fences = current

    def add(self, run: int, entries: np.ndarray) -> None:
        """A run this handle just wrote (its keys are known without reading it)."""
        self.keys[run] = prefixes(entries)

    def _keys(self, c: sqlite3.Connection, run: int) -> np.ndarray:
        if run not in self.keys:
            self.keys[run] = prefixes(read_run(c, run))
        return self.keys[run]

    def lookup(self, c: sqlite3.Connection, bis: Sequence[bytes]) -> dict[bytes, int]:
        """The row ids of the keys ``bis`` (blind indexes' first :data:`KEY` bytes) the runs hold."""
        import numpy as np

        found: dict[bytes, int] = {}
        if not bis or not self.fences:
            return found
        wanted = prefixes(np.frombuffer(b"".join(bis), np.uint8).reshape(-1, KEY))
        for run, fences in self.fences.items():
            keys = self._keys(c, run)
            if not len(keys) or not len(fences):
                continue
            at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
            hit = np.flatnonzero(keys[at] == wanted)
            if not len(hit):
                continue
            # the parts that may hold each: from the last fence below it to the last fence at or below it
            lo = np.maximum(np.searchsorted(fences, wanted[hit], "left") - 1, 0)
            hi = np.maximum(np.searchsorted(fences, wanted[hit], "right") - 1, 0)
            by_part: dict[int, list[bytes]] = {}
            for i, a, b in zip(hit, lo, hi):
                if bis[i] not in found:
                    for p in range(int(a), int(b) + 1):
                        by_part.setdefault(p, []).append(bis[i])
            for p, named in by_part.items():
                row = c.execute("SELECT entries FROM bi_parts WHERE run=? AND part=?", (run, p)).fetchone()
                if row is None:
                    continue
                e = _entries(row[0])
                held = dict(zip((bytes(x) for x in e[:, :KEY]), _ids(e).tolist()))
                found.update((b, held[b]) for b in named if b in held)
        return found


def new_run_entries(bis: Sequence[bytes], first_id: int) -> np.ndarray:
    """The entries of a batch's new subjects: keys ``bis`` (sorted) with ids ``first_id`` on."""
    import numpy as np

    n = len(bis)
    e = np.empty((n, ENTRY), np.uint8)
    e[:, :KEY] = np.frombuffer(b"".join(bis), np.uint8).reshape(n, KEY)
    e[:, KEY:] = np.arange(first_id, first_id + n, dtype=">u8").view(np.uint8).reshape(n, 8)
    return e


def write_blocks(c: sqlite3.Connection, first_id: int, wrapped: Sequence[bytes], kek_id: str, now: str) -> None:
    """The key blocks of subjects ``first_id`` on (one wrapped key each, in id order)."""
    rows = []
    for i in range(0, len(wrapped), BLOCK):
        chunk = wrapped[i : i + BLOCK]
        if any(len(w) != WRAPPED for w in chunk):
            raise KeyManagementError(f"a wrapped data key is not {WRAPPED} bytes")
        rows.append((first_id + i, len(chunk), kek_id, now, b"".join(chunk)))
    c.executemany("INSERT INTO keyblocks(first_id, n, kek_id, created_at, wrapped) VALUES (?,?,?,?,?)", rows)


def _by_block(c: sqlite3.Connection, ids: Iterable[int]) -> Iterator[tuple[tuple[int, int, str, bytes], list[int]]]:
    """The key blocks holding ``ids`` (issued ones), each ``(first_id, n, kek_id, wrapped)`` once,
    with the ids it holds, ascending: one read of each block."""
    block: tuple[int, int, str, bytes] | None = None
    members: list[int] = []
    for i in sorted(set(ids)):
        if block is None or not (block[0] <= i < block[0] + block[1]):
            if members:
                yield block, members  # type: ignore[misc]
            members = []
            row = c.execute("SELECT first_id, n, kek_id, wrapped FROM keyblocks WHERE first_id <= ? "
                            "ORDER BY first_id DESC LIMIT 1", (i,)).fetchone()
            block = None if row is None else (row[0], row[1], row[2], bytes(row[3]))
        if block is not None and block[0] <= i < block[0] + block[1]:
            members.append(i)
    if members:
        yield block, members  # type: ignore[misc]


def key_entries(c: sqlite3.Connection, ids: Iterable[int]) -> dict[int, tuple[bytes, str]]:
    """``{id: (wrapped key, kek id)}`` for the ids among ``ids`` with a live key (not shredded, issued)."""
    out: dict[int, tuple[bytes, str]] = {}
    for (first, _, kid, w), members in _by_block(c, ids):
        for i in members:
            k = w[(i - first) * WRAPPED : (i - first + 1) * WRAPPED]
            if k != _ZERO:
                out[i] = (k, kid)
    return out


def blocks(c: sqlite3.Connection) -> Iterator[tuple[int, int, str, bytes]]:
    """Every key block ``(first_id, n, kek_id, wrapped)``, in id order."""
    for first, n, kid, w in c.execute("SELECT first_id, n, kek_id, wrapped FROM keyblocks ORDER BY first_id"):
        yield first, n, kid, bytes(w)


def erase(c: sqlite3.Connection, ids: Sequence[int]) -> list[int]:
    """Shred row ids ``ids``: their wrapped keys zeroed in their blocks, their entries taken out of
    their runs (fences updated). The ids that had a live key (in the order given)."""
    import numpy as np

    had: set[int] = set()
    for (first, _, _, w), members in list(_by_block(c, ids)):
        buf = bytearray(w)
        for i in members:
            if buf[(i - first) * WRAPPED : (i - first + 1) * WRAPPED] != _ZERO:
                buf[(i - first) * WRAPPED : (i - first + 1) * WRAPPED] = _ZERO
                had.add(i)
        if bytes(buf) != w:
            c.execute("UPDATE keyblocks SET wrapped=? WHERE first_id=?", (bytes(buf), first))
    if not had:
        return []
    victims = np.fromiter(had, dtype=np.int64)
    touched: dict[int, list[tuple[int, np.ndarray]]] = {}
    for run, part, blob in c.execute("SELECT run, part, entries FROM bi_parts"):  # streamed: a part in memory at a time
        e = _entries(blob)
        gone = np.isin(_ids(e), victims)
        if gone.any():
            touched.setdefault(run, []).append((part, e[~gone]))
    for run, parts in touched.items():
        fences = np.frombuffer(c.execute("SELECT fences FROM bi_runs WHERE run=?", (run,)).fetchone()[0], ">u8").astype(np.uint64)
        empty = {p for (p,) in c.execute("SELECT part FROM bi_parts WHERE run=? AND length(entries)=0", (run,))}
        for part, kept in parts:
            c.execute("UPDATE bi_parts SET entries=? WHERE run=? AND part=?", (kept.tobytes(), run, part))
            if len(kept):
                fences[part] = prefixes(kept[:1])[0]
            else:
                empty.add(part)
        c.execute("UPDATE bi_runs SET fences=? WHERE run=?", (_fix_fences(fences, empty), run))
    return [i for i in ids if i in had]


def count(c: sqlite3.Connection) -> int:
    """Live subjects: the runs' entries (``length`` reads no blob)."""
    return c.execute("SELECT coalesce(sum(length(entries)), 0) FROM bi_parts").fetchone()[0] // ENTRY


def from_schema_4(c: sqlite3.Connection, seq: int, version: int, kek_id: str) -> None:
    """Schema 2, 3 or 4 to 5, in the caller's transaction: the rows become key blocks (ids 1 to
    ``seq`` in blocks of :data:`BLOCK`; a shredded id's key is zeros; blocks take the KEK id of the
    rows, or of the system keys when no row is left, or ``kek_id`` when there are none), the blind indexes one run (schema 2 keeps them on the rows, 3 and 4 in two
    levels), and the id sequence ``seq`` is kept, so no token is ever issued twice. Streamed: a
    block and a part in memory at a time."""
    import numpy as np

    kek_ids = [r for (r,) in c.execute("SELECT DISTINCT kek_id FROM subjects")]
    if len(kek_ids) > 1:
        raise KeyManagementError(f"cannot convert the key store: its rows are wrapped by several KEKs ({', '.join(sorted(kek_ids))})")
    c.execute("DROP TABLE IF EXISTS lsm")  # schema 3 and 4's merge mark
    create_tables(c)
    if kek_ids:  # the store's KEK as its rows say (opening with another KEK is refused after this)
        kek_id = kek_ids[0]
    else:  # no row left: as its system keys say
        kek_id = next(iter(r for (r,) in c.execute("SELECT kek_id FROM meta LIMIT 1")), kek_id)
    rows = c.execute("SELECT id, wrapped_dek, created_at FROM subjects ORDER BY id")
    pending = rows.fetchone()
    for start in range(1, seq + 1, BLOCK):
        n = min(BLOCK, seq - start + 1)
        buf, created = bytearray(n * WRAPPED), None
        while pending is not None and pending[0] < start + n:
            i, w, at = pending
            if len(w) != WRAPPED:
                raise KeyManagementError(f"the wrapped key of row {i} is {len(w)} bytes, not {WRAPPED}")
            buf[(i - start) * WRAPPED : (i - start + 1) * WRAPPED] = w
            created = created or at
            pending = rows.fetchone()
        c.execute("INSERT INTO keyblocks(first_id, n, kek_id, created_at, wrapped) VALUES (?,?,?,?,?)",
                  (start, n, kek_id, created or "", bytes(buf)))
    source = ("SELECT blind_index, id FROM subjects" if version == 2 else
              "SELECT blind_index, id FROM bi_main UNION ALL SELECT blind_index, id FROM bi_recent")
    total = c.execute(f"SELECT count(*) FROM ({source})").fetchone()[0]
    if total:
        run, fences = next_run(c), []
        cur = c.execute(f"{source} ORDER BY blind_index")
        part = 0
        while chunk := cur.fetchmany(PART):
            e = np.empty((len(chunk), ENTRY), np.uint8)
            e[:, :KEY] = np.frombuffer(b"".join(b[:KEY] for b, _ in chunk), np.uint8).reshape(-1, KEY)
            e[:, KEY:] = np.asarray([i for _, i in chunk], dtype=">u8").view(np.uint8).reshape(-1, 8)
            fences.append(bytes(e[0, :8]))
            c.execute("INSERT INTO bi_parts(run, part, entries) VALUES (?,?,?)", (run, part, e.tobytes()))
            part += 1
        c.execute("INSERT INTO bi_runs(run, level, fences) VALUES (?,?,?)", (run, level_of(total), b"".join(fences)))
    for table in ("subjects", "bi_main", "bi_recent", "recent_runs"):
        c.execute(f"DROP TABLE IF EXISTS {table}")
    c.execute("DELETE FROM sqlite_sequence WHERE name='subjects'")
    c.execute("INSERT OR REPLACE INTO lsm(name, value) VALUES ('last_id', ?)", (seq,))
    c.execute("PRAGMA user_version=5")


def rows_of(blocks_: Iterable[tuple[int, int, str, bytes]]) -> Iterator[tuple[int, bytes, str]]:
    """``(id, wrapped, kek_id)`` of every live key in ``blocks_``."""
    for first, n, kid, w in blocks_:
        for j in range(n):
            k = w[j * WRAPPED : (j + 1) * WRAPPED]
            if k != _ZERO:
                yield first + j, k, kid


def rewrapped_blocks(blocks_: Iterable[tuple[int, int, str, bytes]], new: dict[int, bytes],
                     kek_id: str) -> Iterator[tuple[bytes, str, int]]:
    """``(wrapped, kek_id, first_id)`` of each block with its live keys replaced by ``new`` (by id)."""
    for first, n, _, w in blocks_:
        buf = bytearray(w)
        for j in range(n):
            k = new.get(first + j)
            if k is not None:
                if len(k) != WRAPPED:
                    raise KeyManagementError(f"a rewrapped data key is {len(k)} bytes, not {WRAPPED}")
                buf[j * WRAPPED : (j + 1) * WRAPPED] = k
        yield bytes(buf), kek_id, first


def by_tokens(c: sqlite3.Connection, token_key: bytes, tokens: Sequence[str]) -> dict[str, tuple[int, bytes, str]]:
    """``{token: (id, wrapped, kek id)}`` for the tokens with a live key."""
    from governance.keys import wire

    ids = {t: i for t, i in zip(tokens, wire.token_ids(token_key, list(tokens))) if i is not None}
    # only the token's own spelling: base32's padding bits would let another spelling decode to the same id
    ids = {t: i for (t, i), own in zip(ids.items(), wire.derived_tokens(token_key, list(ids.values()))) if t == own}
    keys = key_entries(c, ids.values())
    return {t: (i, *keys[i]) for t, i in ids.items() if i in keys}

