"""Key store tests' helpers: schema 5's invariants read from the file, and stores as older schemas wrote them."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import numpy as np

from governance.keys import runs, wire
from governance.keys.kek import LocalKek
from governance.keys.store import KeyStore


def raw_rows(path: Path, sql: str, args: tuple = ()) -> list[tuple]:
    """Rows of ``sql`` read from the store file directly (read-only)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def check_layout(path: Path) -> tuple[int, dict[int, int]]:
    """Check schema 5's invariants and return ``(live subjects, {level: runs})``.

    Every run's entries are in blind-index order across its parts, each fence is its part's first
    entry's first 8 bytes (an emptied part's, the next part's), no blind index is in two places,
    the key blocks tile the ids 1 .. ``last_id`` with no overlap, and the ids in the runs are
    exactly those with a live key."""
    blocks = raw_rows(path, "SELECT first_id, n, wrapped FROM keyblocks ORDER BY first_id")
    last = raw_rows(path, "SELECT coalesce((SELECT value FROM lsm WHERE name='last_id'), 0)")[0][0]
    at, live = 1, []
    for first, n, w in blocks:
        assert first == at and len(w) == n * runs.WRAPPED, (first, at, n, len(w))
        arr = np.frombuffer(w, np.uint8).reshape(n, runs.WRAPPED)
        live.extend((first + np.flatnonzero(arr.any(axis=1))).tolist())
        at = first + n
    assert at == last + 1, (at, last)
    levels: dict[int, int] = {}
    seen_bis, seen_ids = [], []
    for run, level, fences in raw_rows(path, "SELECT run, level, fences FROM bi_runs ORDER BY run"):
        levels[level] = levels.get(level, 0) + 1
        parts = raw_rows(path, "SELECT part, entries FROM bi_parts WHERE run=? ORDER BY part", (run,))
        f = np.frombuffer(fences, ">u8")
        assert [p for p, _ in parts] == list(range(len(f)))
        assert np.all(f[1:] >= f[:-1]), f"run {run}'s fences are not in order"
        entries = [np.frombuffer(e, np.uint8).reshape(-1, runs.ENTRY) for _, e in parts]
        for p, e in enumerate(entries):
            if len(e):
                assert bytes(e[0, :8]) == fences[p * 8 : p * 8 + 8], f"run {run} part {p}: fence is not its first entry"
        every = np.concatenate(entries) if entries else np.empty((0, runs.ENTRY), np.uint8)
        bis = [bytes(b) for b in every[:, : runs.KEY]]
        assert bis == sorted(bis) and len(set(bis)) == len(bis), f"run {run} is not in order"
        seen_bis.extend(bis)
        seen_ids.extend(np.ascontiguousarray(every[:, runs.KEY :]).view(">u8").reshape(-1).tolist())
    assert len(set(seen_bis)) == len(seen_bis), "a blind index is in two runs"
    assert sorted(seen_ids) == live, "the runs' ids are not the ids with a live key"
    return len(live), levels


def wrapped_of(path: Path, token_key: bytes, token: str) -> bytes:
    """The wrapped key of ``token`` as stored in its block."""
    (i,) = wire.token_ids(token_key, [token])
    first, w = raw_rows(path, "SELECT first_id, wrapped FROM keyblocks WHERE first_id <= ? ORDER BY first_id DESC LIMIT 1", (i,))[0]
    return w[(i - first) * runs.WRAPPED : (i - first + 1) * runs.WRAPPED]


_V4 = """
CREATE TABLE subjects(id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL, blind_index BLOB NOT NULL {unique},
                      wrapped_dek BLOB NOT NULL, kek_id TEXT NOT NULL, created_at TEXT NOT NULL);
"""


def old_store(path: Path, kek: LocalKek, ids: list[str], *, version: int, shredded: int = 0,
              main: int = 0) -> dict[str, tuple[str, bytes]]:
    """A store at ``path`` as schema ``version`` (2, 3 or 4) wrote it, holding ``ids`` (row ids 1 on,
    in that order), the last ``shredded`` of them shredded (their rows gone, their ids used);
    schema 3 and 4 have the first ``main`` of them in the main index, the rest recent (schema 4: a
    run per 100). ``{id: (token, data key)}`` of the live ones. Its system keys come from a new
    schema-5 store, so the tokens are the permutation of the row ids under its token key."""
    with KeyStore(path, kek) as ks:
        bi_key, tkey = ks.system_key("blind-index"), ks.system_key("subject-token")
    conn = sqlite3.connect(path)
    conn.execute("BEGIN")
    for table in ("keyblocks", "bi_runs", "bi_parts", "lsm"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute(_V4.format(unique="UNIQUE" if version == 2 else ""))
    tokens = wire.derived_tokens(tkey, list(range(1, len(ids) + 1)))
    out: dict[str, tuple[str, bytes]] = {}
    live = len(ids) - shredded
    rows = []
    for n, (sid, tok) in enumerate(zip(ids, tokens), start=1):
        dek = os.urandom(32)
        if n <= live:
            rows.append((n, tok, wire.blind_index(bi_key, sid), kek.wrap(dek, wire.dek_aad(tok)), kek.key_id, "2026-01-01T00:00:00+00:00"))
            out[sid] = (tok, dek)
    conn.executemany("INSERT INTO subjects VALUES (?,?,?,?,?,?)", rows)
    conn.execute("DELETE FROM sqlite_sequence WHERE name='subjects'")
    conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES ('subjects', ?)", (len(ids),))
    if version >= 3:
        conn.execute("CREATE TABLE bi_main(blind_index BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID")
        conn.execute("CREATE TABLE lsm(name TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        conn.execute("INSERT INTO lsm VALUES ('merged_through', ?)", (main,))
        conn.execute("INSERT INTO bi_main SELECT blind_index, id FROM subjects WHERE id <= ? ORDER BY blind_index", (main,))
        if version == 3:
            conn.execute("CREATE TABLE bi_recent(blind_index BLOB PRIMARY KEY, id INTEGER NOT NULL) WITHOUT ROWID")
            conn.execute("INSERT INTO bi_recent SELECT blind_index, id FROM subjects WHERE id > ?", (main,))
        else:
            conn.execute("CREATE TABLE bi_recent(run INTEGER NOT NULL, blind_index BLOB NOT NULL, id INTEGER NOT NULL, "
                         "PRIMARY KEY (run, blind_index)) WITHOUT ROWID")
            conn.execute("CREATE TABLE recent_runs(run INTEGER PRIMARY KEY, keys BLOB NOT NULL)")
            conn.execute("INSERT INTO bi_recent SELECT main + 1 + (id - main - 1) / 100 * 100, blind_index, id "
                         "FROM subjects, (SELECT ? AS main) WHERE id > main", (main,))
            for (run,) in conn.execute("SELECT DISTINCT run FROM bi_recent").fetchall():
                keys = sorted(b[:8] for (b,) in conn.execute("SELECT blind_index FROM bi_recent WHERE run=?", (run,)))
                conn.execute("INSERT INTO recent_runs VALUES (?, ?)", (run, b"".join(keys)))
    conn.execute(f"PRAGMA user_version={version}")
    conn.commit()
    conn.close()
    return out
