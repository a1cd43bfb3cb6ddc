//! The key store's bulk path: tokens (and data keys) of a whole column of subject ids, with the
//! new subjects created, in one SQLite transaction and no Python per id.
//!
//! It runs the same statements on the same schema as `governance/keys/store.py` (which creates the
//! file and owns every other operation), through the system SQLite library. Python's `sqlite3`
//! module must use that same library instance (the Python side checks it before calling here):
//! two SQLite copies in one process would not see each other's POSIX locks.

use crate::{
    blind_index_all, cipher, make_tokens, open_into, seal_into, slice, Col, ColArg, OutCol, CHUNK,
    KEY, NONCE, TOKEN_LEN, WRAPPED,
};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;
use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

enum Failure {
    Value(String),
    Sqlite(String),
    ForeignKek(String, String),
    Unwrap(String),
    RotatedKek(String),
}

/// One key-store transaction at a time in this process (see `resolve_subjects`), on the
/// connection kept from the last one (see `Kept`).
static WRITER: std::sync::Mutex<Option<Kept>> = std::sync::Mutex::new(None);
/// The connection of the read transactions that run before the writer's turn (see `pre_probe`),
/// kept the same way.
static READER: std::sync::Mutex<Option<Kept>> = std::sync::Mutex::new(None);

/// The last call's connection, kept open so SQLite's page cache (the blind indexes' upper pages,
/// the recent index) survives from one batch to the next: a fresh connection per batch read every
/// page it touched again. SQLite empties that cache itself when another connection has written
/// the file since. It is used again only for the same path, the same file (device and inode: a
/// store deleted and made again at that path is another file), the same timeout, and in the
/// process that opened it (a forked child opens its own).
struct Kept {
    path: String,
    file: (u64, u64),
    timeout_ms: u64,
    pid: u32,
    conn: Connection,
}

fn file_id(path: &str) -> Result<(u64, u64), Failure> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).map_err(|e| Failure::Sqlite(format!("{path}: {e}")))?;
    Ok((m.dev(), m.ino()))
}

/// The kept connection to `db` (opened now if there is none for it).
fn connection<'a>(kept: &'a mut Option<Kept>, db: &str, timeout_ms: u64) -> Result<&'a mut Connection, Failure> {
    let file = file_id(db)?;
    let pid = std::process::id();
    let reuse = matches!(kept, Some(k) if k.path == db && k.file == file && k.timeout_ms == timeout_ms && k.pid == pid);
    if !reuse {
        discard(kept);
        let conn = open(db, timeout_ms)?;
        *kept = Some(Kept { path: db.to_string(), file, timeout_ms, pid, conn });
    }
    Ok(&mut kept.as_mut().expect("set above").conn)
}

/// Close the kept connection; one a forked child inherited is forgotten, not closed (closing the
/// parent's file descriptor here could drop the parent's POSIX locks on it).
fn discard(kept: &mut Option<Kept>) {
    if let Some(old) = kept.take() {
        if old.pid != std::process::id() {
            std::mem::forget(old);
        }
    }
}

/// Close the kept connections (a key store's `close`).
#[pyfunction]
fn release_connections(py: Python<'_>) {
    py.allow_threads(release)
}

fn release() {
    for kept in [&WRITER, &READER] {
        discard(&mut kept.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    }
    *RECENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
    *main_filters() = None;
}

impl From<rusqlite::Error> for Failure {
    fn from(e: rusqlite::Error) -> Self {
        Failure::Sqlite(e.to_string())
    }
}

impl Failure {
    fn into_py(self) -> PyErr {
        match self {
            Failure::Value(m) => PyValueError::new_err(m),
            Failure::Sqlite(m) => PyRuntimeError::new_err(format!("sqlite\t{m}")),
            Failure::ForeignKek(t, k) => PyRuntimeError::new_err(format!("foreign-kek\t{t}\t{k}")),
            Failure::Unwrap(t) => PyRuntimeError::new_err(format!("unwrap\t{t}")),
            Failure::RotatedKek(k) => PyRuntimeError::new_err(format!("rotated-kek\t{k}")),
        }
    }
}

fn random(n: usize) -> Result<Vec<u8>, Failure> {
    crate::os_random(n).map_err(Failure::Sqlite)
}

/// The address and version of the SQLite library this module calls, so Python can check that its
/// own `sqlite3` module resolves the same function to the same address (one library instance).
#[pyfunction]
fn sqlite_library() -> (usize, String) {
    (
        rusqlite::ffi::sqlite3_libversion as *const () as usize,
        rusqlite::version().to_string(),
    )
}

struct Slot {
    token: [u8; TOKEN_LEN],
    wrapped: Option<Vec<u8>>, // an existing subject's wrapped key (None: created here, or unknown)
    known: bool,
    created: bool,
}

fn open(db: &str, timeout_ms: u64) -> Result<Connection, Failure> {
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(timeout_ms))?;
    conn.pragma_update(None, "secure_delete", "ON")?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "DELETE", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("delete") {
        return Err(Failure::Sqlite(format!(
            "journal_mode is {mode}, not delete; deletion would not be final"
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "cache_size", -65536)?;
    rusqlite::vtab::array::load_module(&conn)?;
    Ok(conn)
}

/// Tokens of `ids` (a string column), creating the subjects not in the store when `create`:
/// `(tokens column, keys (n * 32 bytes, zeros where unknown) when want_keys, subjects created)`.
///
/// Every distinct id is looked up in blind-index order; the missing ones are then inserted in
/// that order with their (random) tokens sorted, so both of the table's indexes are walked in
/// order. The pairing this makes between a token's rank and its blind index's rank within one
/// batch says nothing about the ids without the blind-index key, and goes with the row on shred.
///
/// With `token_key` (a version-2 store) a new subject's token is the keyed permutation of its row
/// id (`governance/keys/wire.py: derived_tokens`): the next ids after the table's AUTOINCREMENT
/// sequence, given in blind-index order, so the blind index is the only index written at random.
/// There, a batch that a sample shows to be new people is inserted first (`INSERT OR IGNORE`) and
/// only what was not inserted is looked up; tokens alone come from the blind-index index.
///
/// Each step is one statement for the whole batch (see `Lookup` and `INSERT` below).
#[pyfunction]
#[pyo3(signature = (db, bi_key, kek, kek_id, ids, create, want_keys, now, *, merge_min, merge_fraction, timeout_ms=30_000, token_key=None, after_probe=None))]
#[allow(clippy::too_many_arguments)]
fn resolve_subjects(
    py: Python<'_>,
    db: &str,
    bi_key: PyBuffer<u8>,
    kek: PyBuffer<u8>,
    kek_id: &str,
    ids: ColArg,
    create: bool,
    want_keys: bool,
    now: &str,
    merge_min: i64,
    merge_fraction: i64,
    timeout_ms: u64,
    token_key: Option<PyBuffer<u8>>,
    after_probe: Option<Py<PyAny>>,
) -> PyResult<(crate::PyCol, Option<Py<PyBytes>>, usize)> {
    let token_cipher = match &token_key {
        Some(k) => {
            let k = slice(k)?;
            if k.len() != KEY {
                return Err(PyValueError::new_err(format!("the token key must be {KEY} bytes, got {}", k.len())));
            }
            Some(aes::Aes256::new(GenericArray::from_slice(k)))
        }
        None => None,
    };
    let bi_key = slice(&bi_key)?;
    let kek = Zeroizing::new(slice(&kek)?.to_vec());
    let kek_cipher = cipher(&kek)?;
    let ids = Col::new(&ids)?;
    let n = ids.len;
    let db = db.to_string();
    let kek_id = kek_id.to_string();
    let now = now.to_string();
    let res = py.allow_threads(|| -> Result<(Vec<usize>, Vec<Slot>, Zeroizing<Vec<u8>>, usize), Failure> {
        let bis = blind_index_all(bi_key, &ids).map_err(Failure::Value)?;
        let store = store_of(bi_key); // which store the main index's filter is of
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_unstable_by(|a, b| bis[*a].cmp(&bis[*b]));
        let mut slot_of = vec![0usize; n];
        let mut uniq: Vec<usize> = Vec::new(); // the first id of each distinct blind index, sorted
        for &i in &order {
            if uniq.last().map(|&u| bis[u] != bis[i]).unwrap_or(true) {
                uniq.push(i);
            }
            slot_of[i] = uniq.len() - 1;
        }
        let m = uniq.len();
        // A batch large enough to sample, in a store that makes tokens from row ids: is it new
        // people, and which of them does the main index hold? Asked before the writer's turn, in a
        // read transaction, while another batch writes (see `pre_probe`).
        let sampled = create && token_cipher.is_some() && m >= 4 * SAMPLE;
        let pre = if sampled {
            pre_probe(&db, timeout_ms, store, &bis, &uniq)?
        } else {
            None
        };
        // New people (so the probe found): the random bytes of their data keys and nonces are drawn
        // now, before the writer's turn, one set for each distinct id (those found after all leave
        // theirs unused; the buffer is zeroized when dropped).
        let drawn = match &pre {
            Some(_) => Some(Zeroizing::new(random(m * (KEY + NONCE))?)),
            None => None,
        };
        if let Some(hook) = &after_probe {
            // Tests: another writer's turn between the read and the write (a merge, a shred).
            Python::with_gil(|py| hook.call0(py).map(drop)).map_err(|e| Failure::Value(format!("after_probe: {e}")))?;
        }
        // Only the transaction is serialized: the blind indexes above and the data keys' assembly
        // below run beside another batch's transaction (one writer at a time in this process; other
        // processes wait on SQLite's own lock).
        let mut writer = WRITER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = connection(&mut writer, &db, timeout_ms)?;
        let tx = conn.transaction_with_behavior(if create { TransactionBehavior::Immediate } else { TransactionBehavior::Deferred })?;
        if create {
            // The store's KEK, read inside the write transaction: a rotation that committed since this
            // process loaded its KEK (here or in another process) is seen, and nothing is wrapped
            // under a KEK the store no longer uses.
            let current: Option<String> = tx
                .query_row("SELECT kek_id FROM meta WHERE kek_id <> ?1 LIMIT 1", params![kek_id], |r| r.get(0))
                .optional()?;
            if let Some(other) = current {
                return Err(Failure::RotatedKek(other));
            }
        }
        // 1. Look the distinct ids up, in blind-index order (in-order index probes), one
        //    statement for all of them (`lookup`). A batch of new people (a customers file) skips
        //    most of that: when a sample of its ids is (nearly) all unknown, every id goes
        //    straight to `INSERT OR IGNORE` and what was not inserted is looked up afterwards
        //    (schema 2 only: new rows' ids are chosen before the insert, so they can be read back).
        // Schema 4 keeps the blind indexes apart from the rows, in two levels: `bi_main`, large, and
        // `bi_recent`, the subjects created since the last merge, in runs (one a batch): see
        // `merge_recent` and `RecentIndex`. There every id is looked up exactly before the insert.
        let version = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?;
        let split = version >= 3;
        if split && token_cipher.is_none() {
            return Err(Failure::Sqlite("a schema-3 store without its token key".into()));
        }
        if version == 3 {
            return Err(Failure::Sqlite("a schema-3 store; open it with KeyStore, which converts it to schema 4".into()));
        }
        // Schema 4: the recent level's keys, cached in this process and brought up to date with
        // the runs this transaction sees (see `recent_index`).
        let recent = if split { Some(recent_index(&tx, &db)?) } else { None };
        let recent_ref = recent.as_deref();
        // and the main index's filter, when one was made at the mark this transaction sees
        let main_filter = if split { kept_main_filter(&db, store, merged_through(&tx)?)? } else { None };
        let look = Lookup {
            tx: &tx,
            recent: recent_ref,
            main_filter: main_filter.as_deref(),
            token_cipher: token_cipher.as_ref(),
            want_keys,
            kek_id: &kek_id,
            bis: &bis,
            uniq: &uniq,
        };
        let mut slots: Vec<Slot> = (0..m)
            .map(|_| Slot { token: [0; TOKEN_LEN], wrapped: None, known: false, created: false })
            .collect();
        let mut insert_first = false;
        if sampled {
            let sample = sample_of(m);
            let hits = look.run(&sample, &mut slots)?;
            // At most 5% known; a schema-4 store asked before the writer's turn (the answer only
            // chooses the way: both give the same result).
            insert_first = match (&pre, recent_ref) {
                (Some(_), Some(_)) => true,
                _ => mostly_new(hits),
            };
            let rest = rest_of(m, &sample);
            if !insert_first {
                look.run(&rest, &mut slots)?;
            } else if let Some(ix) = recent_ref {
                // Schema 4: only the ids that may be known are looked up. Those the main index held
                // when probed before the writer's turn (that probe stands unless a merge has moved
                // recent subjects into the main index since; a subject shredded since is simply not
                // found below, and is created again), and those whose blind index's first 8 bytes
                // the recent level's cached keys hold (exact probes of their runs below).
                let found = match pre {
                    Some(Pre { merged, found }) if merged == merged_through(&tx)? => found,
                    _ => probe(&tx, PROBE_MAIN, None, &bis, &uniq, &may_hold(main_filter.as_deref(), &bis, &uniq, rest.clone()))?,
                };
                let mut maybe: Vec<usize> = ix.route(&bis, &uniq, &rest).into_iter().flat_map(|(_, members)| members).collect();
                maybe.extend(found);
                maybe.sort_unstable();
                maybe.dedup();
                if !maybe.is_empty() {
                    look.run(&maybe, &mut slots)?;
                }
            }
        } else if m > 0 {
            let all: Vec<usize> = (0..m).collect();
            look.run(&all, &mut slots)?;
        }
        // 2. Create the missing ones: random tokens (sorted, so the token index is appended to in
        //    order too), random data keys, wrapped under the KEK with the token as associated data.
        let missing: Vec<usize> = if create { (0..m).filter(|&s| !slots[s].known).collect() } else { Vec::new() };
        let k = missing.len();
        let drawn = match drawn {
            Some(d) if d.len() >= k * (KEY + NONCE) => d,
            _ => Zeroizing::new(random(k * (KEY + NONCE))?),
        };
        let (keys, nonces) = drawn.split_at(k * KEY);
        let mut created = 0usize;
        let mut run = 0i64; // schema 4: the run this batch's blind indexes enter (its first row id)
        if k > 0 {
            let first_id: i64 = match &token_cipher {
                Some(_) => tx.query_row(
                    "SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name='subjects'), 0)",
                    [],
                    |r| r.get::<_, i64>(0),
                )? + 1,
                None => 0,
            };
            run = first_id;
            let tokens = match &token_cipher {
                Some(c) => (0..k).into_par_iter().map(|j| derived_token(c, first_id + j as i64)).collect::<Vec<_>>(),
                None => make_tokens(&Zeroizing::new(random(k * 16)?), true),
            };
            let parts: Vec<Vec<u8>> = (0..k.div_ceil(CHUNK))
                .into_par_iter()
                .map(|c| {
                    let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(k));
                    let mut out = Vec::with_capacity((hi - lo) * WRAPPED);
                    let mut aad = Vec::with_capacity(15 + TOKEN_LEN);
                    for j in lo..hi {
                        aad.clear();
                        aad.extend_from_slice(b"lakewarden:dek\x00");
                        aad.extend_from_slice(&tokens[j]);
                        seal_into(&kek_cipher, &nonces[j * NONCE..(j + 1) * NONCE], &keys[j * KEY..(j + 1) * KEY], &aad, &mut out);
                    }
                    out
                })
                .collect();
            let wrapped = parts.concat();
            // One INSERT ... SELECT for the whole batch (tokens, blind indexes and wrapped keys
            // packed in blobs, sliced per row): 2.5x faster than a statement per subject.
            let mut tok_packed = Vec::with_capacity(k * TOKEN_LEN);
            let mut bi_packed = Vec::with_capacity(k * BI_LEN);
            for (j, &s) in missing.iter().enumerate() {
                tok_packed.extend_from_slice(&tokens[j]);
                bi_packed.extend_from_slice(&bis[uniq[s]]);
            }
            let sql = match (token_cipher.is_some(), insert_first) {
                (true, true) => INSERT_OR_IGNORE_WITH_IDS,
                (true, false) => INSERT_WITH_IDS,
                _ => INSERT,
            };
            let inserted = if split {
                // Schema 4: every id was looked up exactly above, inside this write transaction, so
                // these are new. The rows are appended (ids ascending; no index on them but the
                // id), then their blind indexes, as the run numbered by the first id, at the end
                // of the recent level (ascending within the run, as the rows were inserted).
                let end = first_id + k as i64;
                let rows = tx.execute(INSERT_ROWS_SPLIT, params![&tok_packed[..], &bi_packed[..], &wrapped[..], kek_id, now, numbers(k), first_id])?;
                let indexed = tx.execute(INDEX_RECENT, params![first_id, end])?;
                if rows != k || indexed != k {
                    return Err(Failure::Sqlite(format!("{rows} rows and {indexed} blind indexes for {k} new subjects")));
                }
                // and the run's keys (the blind indexes are in order, so their first 8 bytes are)
                let keys: Vec<u8> = bi_packed.chunks_exact(BI_LEN).flat_map(|b| b[..8].iter().copied()).collect();
                tx.execute("INSERT INTO recent_runs(run, keys) VALUES (?1, ?2)", params![first_id, keys])?;
                k
            } else if token_cipher.is_some() {
                tx.execute(sql, params![&tok_packed[..], &bi_packed[..], &wrapped[..], kek_id, now, numbers(k), first_id])?
            } else {
                tx.execute(sql, params![&tok_packed[..], &bi_packed[..], &wrapped[..], kek_id, now, numbers(k)])?
            };
            // Every row went in (the usual case for a file of new people): they are ours, with the
            // ids chosen above, and nothing needs reading back.
            let mut is_new = vec![!insert_first || inserted == k; k];
            if insert_first && inserted != k {
                // Which rows went in: ours are the ids first_id .. first_id + k with our blind
                // index; an id whose row holds another blind index would be a broken sequence.
                // (Schema 2 only: schema 4 looked every id up first.)
                let mut sel = tx.prepare("SELECT id, blind_index FROM subjects WHERE id >= ?1 AND id < ?2")?;
                let mut rows = sel.query(params![first_id, first_id + k as i64])?;
                let mut seen = 0usize;
                while let Some(r) = rows.next()? {
                    let j = usize::try_from(r.get::<_, i64>(0)? - first_id).map_err(|e| Failure::Sqlite(e.to_string()))?;
                    if j >= k || r.get_ref(1)?.as_blob().map_err(|e| Failure::Sqlite(e.to_string()))? != &bis[uniq[missing[j]]][..] {
                        return Err(Failure::Sqlite(format!("row id {} holds another subject than the one inserted", first_id + j as i64)));
                    }
                    is_new[j] = true;
                    seen += 1;
                }
                if seen != inserted {
                    return Err(Failure::Sqlite(format!("{inserted} new subjects were inserted, {seen} read back")));
                }
                // The ones already there (a repeat, or a subject another writer created): look up.
                let known: Vec<usize> = (0..k).filter(|&j| !is_new[j]).map(|j| missing[j]).collect();
                if !known.is_empty() {
                    look.run(&known, &mut slots)?;
                    if let Some(&s) = known.iter().find(|&&s| !slots[s].known) {
                        return Err(Failure::Sqlite(format!("subject {s} was neither inserted nor found")));
                    }
                }
            } else if inserted != k {
                return Err(Failure::Sqlite(format!("{inserted} of {k} new subjects were inserted")));
            }
            for (j, &s) in missing.iter().enumerate() {
                if is_new[j] {
                    slots[s] = Slot { token: tokens[j], wrapped: None, known: true, created: true };
                    created += 1;
                }
            }
        }
        let merged = split && created > 0 && merge_recent(&tx, merge_min, merge_fraction)?; // last: the steps above read bi_recent
        let mut new_key_of = vec![usize::MAX; m];
        for (j, &s) in missing.iter().enumerate() {
            new_key_of[s] = j;
        }
        tx.commit()?;
        if let Some(ix) = &recent {
            // Committed: the cache takes this batch's run (or, after a merge, an empty level).
            if merged {
                keep_recent(&db, Arc::new(RecentIndex::default()))?;
            } else if created > 0 {
                let mut added: Vec<(u64, i64)> = missing.iter().map(|&s| (prefix(&bis[uniq[s]]), run)).collect();
                added.sort_unstable();
                keep_recent(&db, Arc::new(ix.merged(&[run], &added)))?;
            }
        }
        drop(writer);
        // The data key of each slot: created here (keys[s]) or unwrapped from the store.
        let mut out_keys = Zeroizing::new(Vec::new());
        if want_keys {
            let per_slot: Vec<Result<Zeroizing<Vec<u8>>, Failure>> = slots
                .par_iter()
                .enumerate()
                .map(|(s, slot)| {
                    let mut k = Zeroizing::new(Vec::with_capacity(KEY));
                    if slot.created {
                        let j = new_key_of[s];
                        k.extend_from_slice(&keys[j * KEY..(j + 1) * KEY]);
                    } else if let Some(w) = &slot.wrapped {
                        let mut aad = b"lakewarden:dek\x00".to_vec();
                        aad.extend_from_slice(&slot.token);
                        if w.len() != WRAPPED || !open_into(&kek_cipher, w, &aad, &mut k) {
                            return Err(Failure::Unwrap(String::from_utf8_lossy(&slot.token).into_owned()));
                        }
                    } else {
                        k.extend_from_slice(&[0u8; KEY]);
                    }
                    Ok(k)
                })
                .collect();
            out_keys.reserve(n * KEY);
            let per_slot: Vec<Zeroizing<Vec<u8>>> = per_slot.into_iter().collect::<Result<_, _>>()?;
            for &s in &slot_of {
                out_keys.extend_from_slice(&per_slot[s]);
            }
        }
        Ok((slot_of, slots, out_keys, created))
    });
    if res.is_err() {
        // Whatever failed (a lock timeout, an I/O error, a foreign KEK), the next call starts on
        // fresh connections.
        py.allow_threads(release);
    }
    let (slot_of, slots, keys, created) = res.map_err(Failure::into_py)?;
    let mut lens = Vec::with_capacity(n);
    let mut data = Vec::with_capacity(n * TOKEN_LEN);
    for &s in &slot_of {
        let slot = &slots[s];
        if slot.known {
            data.extend_from_slice(&slot.token);
            lens.push(Some(TOKEN_LEN));
        } else {
            lens.push(None);
        }
    }
    let col = OutCol::from_parts(vec![(lens, data)], n)?.into_py(py);
    let keys = if want_keys {
        Some(PyBytes::new(py, &keys).unbind())
    } else {
        None
    };
    Ok((col, keys, created))
}

/// The token of row `id` under the token key: AES-256 of `TOKEN_MAGIC || id (8 bytes, big
/// endian)`, spelled as any token (`wire.derived_tokens` is the reference).
fn derived_token(c: &aes::Aes256, id: i64) -> [u8; TOKEN_LEN] {
    let mut block = GenericArray::clone_from_slice(&[TOKEN_MAGIC.as_slice(), &id.to_be_bytes()].concat());
    c.encrypt_block(&mut block);
    let mut t = Vec::with_capacity(TOKEN_LEN);
    crate::spell_token(&block, &mut t);
    t.try_into().expect("a token is 30 bytes")
}

/// The numbers 0 .. `k`, bound to `rarray(?)` (see `numbered`).
fn numbers(k: usize) -> std::rc::Rc<Vec<rusqlite::types::Value>> {
    std::rc::Rc::new((0..k as i64).map(rusqlite::types::Value::Integer).collect())
}

const BI_LEN: usize = 32; // a blind index: HMAC-SHA256
// The statements below slice packed blobs at these widths.
const _: () = assert!(TOKEN_LEN == 30 && BI_LEN == 32 && WRAPPED == 60);

/// A batch's rows numbered `n` = 0 .. k - 1, from `?count` bound to `numbers(k)` (the `rarray`
/// table-valued function: a recursive CTE counting to k cost 0.2 µs a row, a third of an insert's
/// time): each statement below slices row `n`'s values out of blobs packed at fixed widths.
macro_rules! numbered {
    ($count:literal) => {
        concat!("WITH i(n) AS (SELECT value FROM rarray(?", $count, ")) ")
    };
}
/// `?1`: the distinct blind indexes, sorted and packed; `?2`: `numbers` of how many. A row `(n, columns)` for
/// each one the store knows. `CROSS JOIN` keeps the numbers outside, so each is one probe of the
/// blind-index index.
macro_rules! probe {
    ($columns:literal) => {
        concat!(numbered!(2), "SELECT i.n, ", $columns,
                " FROM i CROSS JOIN subjects s ON s.blind_index = substr(?1, i.n * 32 + 1, 32)")
    };
}
/// A lookup's three forms: tokens (and KEK ids), tokens with wrapped keys, or row ids alone (the
/// index alone holds the id; the token is derived from it).
struct Lookups {
    tokens: &'static str,
    keys: &'static str,
    ids: &'static str,
}
/// Schema 2: the blind-index index on the rows.
const LOOKUP_ROWS: Lookups = Lookups {
    tokens: probe!("s.token, NULL, s.kek_id"),
    keys: probe!("s.token, s.wrapped_dek, s.kek_id"),
    ids: probe!("s.id"),
};
/// `?1` tokens (30 bytes each), `?2` blind indexes (32), `?3` wrapped keys (60), `?4` KEK id,
/// `?5` time, `?6` `numbers` of how many; `?7` the first row id (schema 2: a token is its row id's permutation).
macro_rules! insert {
    ($verb:literal, $id_column:literal, $id_value:literal) => {
        concat!(numbered!(6), $verb,
                " INTO subjects(token, blind_index, wrapped_dek, kek_id, created_at", $id_column, ") ",
                "SELECT CAST(substr(?1, n * 30 + 1, 30) AS TEXT), substr(?2, n * 32 + 1, 32), ",
                "substr(?3, n * 60 + 1, 60), ?4, ?5", $id_value, " FROM i")
    };
}
const INSERT: &str = insert!("INSERT", "", "");
const INSERT_WITH_IDS: &str = insert!("INSERT", ", id", ", ?7 + n");
const INSERT_OR_IGNORE_WITH_IDS: &str = insert!("INSERT OR IGNORE", ", id", ", ?7 + n");
/// Schema 4: new subjects' rows (`?1`..`?7` as `INSERT_WITH_IDS`; `subjects` has no blind-index
/// index, so this is an append).
const INSERT_ROWS_SPLIT: &str = insert!("INSERT", ", id", ", ?7 + n");
/// The blind indexes of the rows just appended (ids `?1` to `?2`, this batch's alone: a range
/// scan of the rows, in blind-index order as they were inserted), into the recent level as run
/// `?1`: the largest run yet (row ids only grow), so the entries are appended at the end of
/// `bi_recent`'s key `(run, blind_index)`, and no page of an earlier run is touched or journaled.
const INDEX_RECENT: &str =
    "INSERT INTO bi_recent(run, blind_index, id) SELECT ?1, blind_index, id FROM subjects WHERE id >= ?1 AND id < ?2";
/// The blind indexes of the ids at `subset` (positions in `uniq`), packed for the statements above.
fn packed(bis: &[[u8; 32]], uniq: &[usize], subset: &[usize]) -> Vec<u8> {
    let mut out = Vec::with_capacity(subset.len() * BI_LEN);
    for &s in subset {
        out.extend_from_slice(&bis[uniq[s]]);
    }
    out
}

/// Which of the ids at `subset` (positions in `uniq`) an index holds (index only): `PROBE_MAIN`,
/// or `PROBE_RECENT` in run `run`.
fn probe(tx: &rusqlite::Transaction<'_>, sql: &str, run: Option<i64>, bis: &[[u8; 32]], uniq: &[usize], subset: &[usize]) -> Result<Vec<usize>, Failure> {
    if subset.is_empty() {
        return Ok(Vec::new());
    }
    let packed = packed(bis, uniq, subset);
    let mut sel = tx.prepare_cached(sql)?;
    let mut rows = match run {
        Some(run) => sel.query(params![&packed[..], numbers(subset.len()), run])?,
        None => sel.query(params![&packed[..], numbers(subset.len())])?,
    };
    let mut found = Vec::new();
    while let Some(r) = rows.next()? {
        let n = usize::try_from(r.get::<_, i64>(0)?).map_err(|e| Failure::Sqlite(e.to_string()))?;
        found.push(*subset.get(n).ok_or_else(|| Failure::Sqlite(format!("probe returned position {n} of {}", subset.len())))?);
    }
    Ok(found)
}
const PROBE_MAIN: &str = concat!(numbered!(2), "SELECT i.n FROM i CROSS JOIN bi_main b ON b.blind_index = substr(?1, i.n * 32 + 1, 32)");
const PROBE_RECENT: &str =
    concat!(numbered!(2), "SELECT i.n FROM i CROSS JOIN bi_recent b ON b.run = ?3 AND b.blind_index = substr(?1, i.n * 32 + 1, 32)");

/// A sample of a batch with at most 5% known subjects: a batch of new people.
fn mostly_new(hits: usize) -> bool {
    hits * 20 <= SAMPLE
}

/// The ids sampled to tell a batch of new people (positions in `uniq`), and the others.
fn sample_of(m: usize) -> Vec<usize> {
    (0..SAMPLE).map(|j| j * m / SAMPLE).collect()
}
fn rest_of(m: usize, sample: &[usize]) -> Vec<usize> {
    let mut sampled = vec![false; m];
    sample.iter().for_each(|&s| sampled[s] = true);
    (0..m).filter(|&s| !sampled[s]).collect()
}

fn merged_through(tx: &rusqlite::Transaction<'_>) -> Result<i64, Failure> {
    Ok(tx.query_row("SELECT coalesce((SELECT value FROM lsm WHERE name='merged_through'), 0)", [], |r| r.get(0))?)
}

/// What a read transaction found before the writer's turn: the main index's merge mark then, and
/// which of the batch's ids (outside the sample) the main index held.
struct Pre {
    merged: i64,
    found: Vec<usize>,
}

/// Before the writer's turn, on the kept reader connection (a read transaction, which waits for no
/// writer in this process and takes no write lock): sample the batch; when (nearly) none of the
/// sample is known, probe the main index for the rest, the largest lookup of a batch of new people.
/// `None`: not a schema-4 store, or not new people (the writer looks everything up itself).
fn pre_probe(db: &str, timeout_ms: u64, store: [u8; 8], bis: &[[u8; 32]], uniq: &[usize]) -> Result<Option<Pre>, Failure> {
    let mut reader = READER.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let conn = connection(&mut reader, db, timeout_ms)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Deferred)?;
    if tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? < 4 {
        return Ok(None);
    }
    let m = uniq.len();
    let sample = sample_of(m);
    // The sample's known ids: those in a run of the recent level that its cached keys name, and
    // the rest in the main index.
    let ix = recent_index(&tx, db)?;
    let mut hits = 0usize;
    let mut in_recent = vec![false; m];
    for (run, members) in ix.route(bis, uniq, &sample) {
        for s in probe(&tx, PROBE_RECENT, Some(run), bis, uniq, &members)? {
            hits += usize::from(!std::mem::replace(&mut in_recent[s], true));
        }
    }
    // A store that has never merged has an empty main index: nothing there to probe. The sample
    // goes through a filter already made; only a batch of new people counts towards making one
    // (a batch of known subjects would pay for a scan it cannot use).
    let merged = merged_through(&tx)?;
    let main_empty = !tx.query_row("SELECT EXISTS (SELECT 1 FROM bi_main)", [], |r| r.get::<_, bool>(0))?;
    let kept = if main_empty { None } else { kept_main_filter(db, store, merged)? };
    let others: Vec<usize> = sample.iter().copied().filter(|&s| !in_recent[s]).collect();
    hits += probe(&tx, PROBE_MAIN, None, bis, uniq, &may_hold(kept.as_deref(), bis, uniq, others))?.len();
    if !mostly_new(hits) {
        return Ok(None);
    }
    let found = if main_empty {
        Vec::new()
    } else {
        let filter = match kept {
            Some(f) => Some(f),
            None => main_filter(&tx, db, store, merged, m)?,
        };
        probe(&tx, PROBE_MAIN, None, bis, uniq, &may_hold(filter.as_deref(), bis, uniq, rest_of(m, &sample)))?
    };
    Ok(Some(Pre { merged, found }))
}

/// Which blind indexes the main index may hold, in memory: a split-block Bloom filter (Parquet's
/// layout: 256-bit blocks of eight 32-bit words, one bit set in each word per key) of 16 bits a
/// key, about 0.13% false positives (1.25% at 10 bits) and no false negatives. A batch of new
/// people no longer probes the main index for each id (every page of it, once the index is larger
/// than a batch: 0.08-0.1 s a batch of 166k at 5M subjects, and the whole index read again for
/// every batch; #15), only for the ids the filter may hold, which it probes exactly.
///
/// The main index gains entries only in a merge, which moves `lsm.merged_through` (conversions
/// from schema 2 and 3 set it too), so a filter made in a read transaction holds every entry the
/// index has for as long as that mark stays where it was; a shred takes entries out, which only
/// costs a probe that finds nothing. A filter is kept for one store file (path, device and inode,
/// the blind-index key's fingerprint), in the process that made it, and for one mark.
///
/// Made by reading the whole index once (0.06 us an entry), so it is made only when it pays: once
/// the ids of batches of new people this process would have probed at that mark reach a sixteenth
/// of the index (a probe reads a page of the index, a scan reads each page once); a small batch in
/// a large store probes as before. Memory: 16 bits an entry of the main index (20 MB at 10M subjects). The sample that
/// tells a batch of new people, and the writer's own look-ups (when the filter is for the mark its
/// transaction sees), go through it too.
struct Sbbf {
    blocks: Vec<[u32; 8]>,
}

/// 16 bits a key: 0.13% false positives (measured over 1M keys). At 10 bits (1.25%) the probes
/// that passed still read about 27 MB of the index a batch of 166k at 10M subjects, a page each.
const BITS_PER_KEY: usize = 16;

const SBBF_SALT: [u32; 8] = [0x47b6137b, 0x44974d91, 0x8824ad5b, 0xa2b7289d, 0x705495c7, 0x2df1424b, 0x9efc4947, 0x5c6bfb31];

impl Sbbf {
    fn with_capacity(n: usize) -> Self {
        Sbbf { blocks: vec![[0u32; 8]; (n.max(1) * BITS_PER_KEY).div_ceil(256)] }
    }
    /// A blind index is an HMAC, so its bytes are uniform already: bytes 8..16 are the hash (the
    /// first 8 are the recent level's keys; any bytes would do).
    fn hash(bi: &[u8; 32]) -> u64 {
        u64::from_le_bytes(bi[8..16].try_into().expect("8 bytes"))
    }
    fn block(&self, h: u64) -> usize {
        (((h >> 32) * self.blocks.len() as u64) >> 32) as usize
    }
    fn bit(h: u64, i: usize) -> u32 {
        1u32 << ((h as u32).wrapping_mul(SBBF_SALT[i]) >> 27)
    }
    fn insert(&mut self, bi: &[u8; 32]) {
        let h = Self::hash(bi);
        let b = self.block(h);
        for i in 0..8 {
            self.blocks[b][i] |= Self::bit(h, i);
        }
    }
    fn may_hold(&self, bi: &[u8; 32]) -> bool {
        let h = Self::hash(bi);
        let block = &self.blocks[self.block(h)];
        (0..8).all(|i| block[i] & Self::bit(h, i) != 0)
    }
}

/// The filter of one store's main index at one mark, or (`filter: None`) how many ids this process
/// has probed there since, towards making it.
struct MainFilter {
    path: String,
    file: (u64, u64),
    pid: u32,
    store: [u8; 8],
    merged: i64,
    asked: usize,
    filter: Option<Arc<Sbbf>>,
}
static MAIN_FILTER: std::sync::Mutex<Option<MainFilter>> = std::sync::Mutex::new(None);

impl MainFilter {
    /// Whether this is the filter (or the count towards one) of store `db` at mark `merged`.
    fn is(&self, db: &str, file: (u64, u64), store: [u8; 8], merged: i64) -> bool {
        self.path == db && self.file == file && self.pid == std::process::id() && self.store == store && self.merged == merged
    }
}

fn main_filters() -> std::sync::MutexGuard<'static, Option<MainFilter>> {
    MAIN_FILTER.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
/// Filters made, and ids the filters spared a probe of the main index (tests, benchmarks:
/// `main_filter_counts`).
static FILTERS_MADE: AtomicU64 = AtomicU64::new(0);
static FILTERED: AtomicU64 = AtomicU64::new(0);

/// Filters of the main index made in this process, and the ids they spared a probe.
#[pyfunction]
fn main_filter_counts() -> (u64, u64) {
    (FILTERS_MADE.load(Ordering::Relaxed), FILTERED.load(Ordering::Relaxed))
}

/// The ids at `subset` whose blind index the main index may hold (all of them without a filter).
fn may_hold(filter: Option<&Sbbf>, bis: &[[u8; 32]], uniq: &[usize], subset: Vec<usize>) -> Vec<usize> {
    let Some(f) = filter else { return subset };
    let n = subset.len();
    let maybe: Vec<usize> = subset.into_iter().filter(|&s| f.may_hold(&bis[uniq[s]])).collect();
    FILTERED.fetch_add((n - maybe.len()) as u64, Ordering::Relaxed);
    maybe
}

/// The filter kept for store `db` at mark `merged`, if there is one (none is made here).
fn kept_main_filter(db: &str, store: [u8; 8], merged: i64) -> Result<Option<Arc<Sbbf>>, Failure> {
    let file = file_id(db)?;
    Ok(main_filters().as_ref().filter(|f| f.is(db, file, store, merged)).and_then(|f| f.filter.clone()))
}

/// A store's fingerprint: the first 8 bytes of SHA-256 of its blind-index key (a file copied over
/// the same inode from another store is another store).
fn store_of(bi_key: &[u8]) -> [u8; 8] {
    use sha2::Digest;
    let d = sha2::Sha256::digest([b"lakewarden:main-filter\x00".as_slice(), bi_key].concat());
    d[..8].try_into().expect("8 bytes")
}

/// The main index's filter at mark `merged`, as read in `tx`, for a probe of `asking` ids: the kept
/// one, or one made now when it pays (see `Sbbf`), or `None` (probe every id). Only `pre_probe`
/// calls it (under the reader's lock, so one scan at a time), and the scan runs without the
/// filters' lock, which the writer's turn takes too (`kept_main_filter`).
fn main_filter(tx: &rusqlite::Transaction<'_>, db: &str, store: [u8; 8], merged: i64, asking: usize) -> Result<Option<Arc<Sbbf>>, Failure> {
    let file = file_id(db)?;
    {
        let mut kept = main_filters();
        if !kept.as_ref().is_some_and(|f| f.is(db, file, store, merged)) {
            *kept = Some(MainFilter { path: db.to_string(), file, pid: std::process::id(), store, merged, asked: 0, filter: None });
        }
        let slot = kept.as_mut().expect("set above");
        if let Some(f) = &slot.filter {
            return Ok(Some(Arc::clone(f)));
        }
        slot.asked += asking;
        // `merged` (the last id merged) bounds the index's size from above.
        if slot.asked.saturating_mul(16) < usize::try_from(merged).unwrap_or(usize::MAX) {
            return Ok(None);
        }
    }
    let mut filter = Sbbf::with_capacity(usize::try_from(merged).unwrap_or(0));
    let mut sel = tx.prepare("SELECT blind_index FROM bi_main")?;
    let mut rows = sel.query([])?;
    while let Some(r) = rows.next()? {
        let bi: &[u8; 32] = r.get_ref(0)?.as_blob().map_err(|e| Failure::Sqlite(e.to_string()))?.try_into()
            .map_err(|_| Failure::Sqlite("a blind index of the main index is not 32 bytes".into()))?;
        filter.insert(bi);
    }
    FILTERS_MADE.fetch_add(1, Ordering::Relaxed);
    let filter = Arc::new(filter);
    if let Some(slot) = main_filters().as_mut().filter(|f| f.is(db, file, store, merged)) {
        slot.filter = Some(Arc::clone(&filter));
    }
    Ok(Some(filter))
}

/// Schema 4's recent level, as this process knows it: the first 8 bytes (big endian, so in the
/// blind indexes' order) of every blind index in the runs `runs`, sorted, each with its run.
///
/// A run is one batch's new subjects (numbered by its first row id, which `AUTOINCREMENT` never
/// gives again) and never gains an entry after its transaction commits: it only loses those a
/// shred deletes, or goes whole in a merge. So keys read once stay a superset of the run's for as
/// long as the run exists, and a cached level is brought up to date by reading only the runs it
/// lacks, from `recent_runs` (each run's keys, 8 bytes a subject, written with the run: 1M recent
/// subjects load in one read of 8 MB, not a scan of their entries). A key left by a shred (which
/// takes it out of `recent_runs` too) only costs an exact probe that finds nothing. Memory: 12
/// bytes a recent subject (the level holds at most `max(merge_min, main / merge_fraction)` of
/// them); a store's `close` drops it.
#[derive(Default)]
struct RecentIndex {
    runs: Vec<i64>,   // ascending
    keys: Vec<u64>,   // ascending
    run_of: Vec<u32>, // keys[i]'s run, as a position in `runs`
}

/// The cached level, for one store file in one process (as `Kept`).
struct RecentCache {
    path: String,
    file: (u64, u64),
    pid: u32,
    index: Arc<RecentIndex>,
}
static RECENT: std::sync::Mutex<Option<RecentCache>> = std::sync::Mutex::new(None);

fn prefix(bi: &[u8; 32]) -> u64 {
    u64::from_be_bytes(bi[..8].try_into().expect("8 bytes"))
}

/// The runs of the recent level, ascending (`recent_runs`: a row a run, with its keys).
const RUNS: &str = "SELECT run FROM recent_runs ORDER BY run";

/// The recent level's keys for the runs `tx` sees: the cached ones when they are the same runs;
/// the cached ones and the runs they lack, read now, when the cache's runs all still exist;
/// otherwise (a merge, or a run shredded whole) all of them, read now.
fn recent_index(tx: &rusqlite::Transaction<'_>, db: &str) -> Result<Arc<RecentIndex>, Failure> {
    let current: Vec<i64> = tx.prepare_cached(RUNS)?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
    let file = file_id(db)?;
    let pid = std::process::id();
    let cached = match &*RECENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) {
        Some(c) if c.path == db && c.file == file && c.pid == pid => Some(c.index.clone()),
        _ => None,
    };
    let base = match cached {
        Some(ix) if ix.runs.iter().all(|r| current.binary_search(r).is_ok()) => ix,
        _ => Arc::new(RecentIndex::default()),
    };
    if base.runs.len() == current.len() {
        return Ok(base); // the same runs
    }
    let mut added: Vec<(u64, i64)> = Vec::new();
    let mut sel = tx.prepare_cached("SELECT keys FROM recent_runs WHERE run = ?1")?;
    let lacking: Vec<i64> = current.iter().copied().filter(|r| base.runs.binary_search(r).is_err()).collect();
    for &run in &lacking {
        let keys: Vec<u8> = sel.query_row(params![run], |r| r.get(0))?;
        if keys.len() % 8 != 0 {
            return Err(Failure::Sqlite(format!("the keys of run {run} are {} bytes, not a multiple of 8", keys.len())));
        }
        added.extend(keys.chunks_exact(8).map(|k| (u64::from_be_bytes(k.try_into().expect("8 bytes")), run)));
    }
    added.sort_unstable();
    let ix = Arc::new(base.merged(&lacking, &added));
    keep_recent(db, ix.clone())?;
    Ok(ix)
}

/// Cache `ix` as the recent level of `db` (for this process).
fn keep_recent(db: &str, ix: Arc<RecentIndex>) -> Result<(), Failure> {
    let file = file_id(db)?;
    *RECENT.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) =
        Some(RecentCache { path: db.to_string(), file, pid: std::process::id(), index: ix });
    Ok(())
}

impl RecentIndex {
    /// This level with the runs `new_runs` (which it does not hold) and their keys `added`
    /// (sorted `(key, run)`) merged in. A run may have no key left (every subject in it shredded):
    /// it is held all the same, so it is not read again.
    fn merged(&self, new_runs: &[i64], added: &[(u64, i64)]) -> RecentIndex {
        let mut runs = self.runs.clone();
        runs.extend_from_slice(new_runs);
        runs.sort_unstable();
        runs.dedup();
        let at = |r: i64| runs.binary_search(&r).expect("a run listed above") as u32;
        let remap: Vec<u32> = self.runs.iter().map(|&r| at(r)).collect();
        let n = self.keys.len() + added.len();
        let (mut keys, mut run_of) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut i, mut j) = (0, 0);
        while i < self.keys.len() || j < added.len() {
            if j == added.len() || (i < self.keys.len() && self.keys[i] <= added[j].0) {
                keys.push(self.keys[i]);
                run_of.push(remap[self.run_of[i] as usize]);
                i += 1;
            } else {
                keys.push(added[j].0);
                run_of.push(at(added[j].1));
                j += 1;
            }
        }
        RecentIndex { runs, keys, run_of }
    }

    /// The ids at `subset` (positions in `uniq`) whose key this level holds, by run: `(run, ids)`,
    /// each list ascending. One pass over both sorted lists, galloping over the keys between ids.
    fn route(&self, bis: &[[u8; 32]], uniq: &[usize], subset: &[usize]) -> Vec<(i64, Vec<usize>)> {
        let mut by_run: Vec<Vec<usize>> = vec![Vec::new(); self.runs.len()];
        let mut sorted: Vec<(u64, usize)> = subset.iter().map(|&s| (prefix(&bis[uniq[s]]), s)).collect();
        if !sorted.windows(2).all(|w| w[0] <= w[1]) {
            sorted.sort_unstable();
        }
        let keys = &self.keys;
        let mut j = 0usize;
        for (p, s) in sorted {
            // the first key >= p, from j: double the step, then bisect
            let mut step = 1usize;
            while j + step < keys.len() && keys[j + step] < p {
                step *= 2;
            }
            let hi = (j + step + 1).min(keys.len());
            j += keys[j..hi].partition_point(|&k| k < p);
            let mut t = j;
            while t < keys.len() && keys[t] == p {
                by_run[self.run_of[t] as usize].push(s);
                t += 1;
            }
        }
        self.runs.iter().zip(by_run).filter(|(_, m)| !m.is_empty()).map(|(&r, m)| (r, m)).collect()
    }
}

/// Schema 4 lookups: each level probed in order (`bi_recent` in one run), joined to the row by id
/// (`*_IDS_*`: the index alone, tokens derive from the id).
macro_rules! probe_level {
    ($columns:literal, $on:literal) => {
        concat!(numbered!(2), "SELECT i.n, ", $columns, " FROM i CROSS JOIN ", $on,
                " b.blind_index = substr(?1, i.n * 32 + 1, 32) JOIN subjects s ON s.id = b.id")
    };
}
const LOOKUP_MAIN: Lookups = Lookups {
    tokens: probe_level!("s.token, NULL, s.kek_id", "bi_main b ON"),
    keys: probe_level!("s.token, s.wrapped_dek, s.kek_id", "bi_main b ON"),
    ids: concat!(numbered!(2), "SELECT i.n, b.id FROM i CROSS JOIN bi_main b ON b.blind_index = substr(?1, i.n * 32 + 1, 32)"),
};
const LOOKUP_RECENT: Lookups = Lookups {
    tokens: probe_level!("s.token, NULL, s.kek_id", "bi_recent b ON b.run = ?3 AND"),
    keys: probe_level!("s.token, s.wrapped_dek, s.kek_id", "bi_recent b ON b.run = ?3 AND"),
    ids: concat!(numbered!(2), "SELECT i.n, b.id FROM i CROSS JOIN bi_recent b ON b.run = ?3 AND b.blind_index = substr(?1, i.n * 32 + 1, 32)"),
};

/// Schema 4: move the recent blind indexes into the main index once they are many, `merge_min`
/// or a `merge_fraction`-th of the main index (whichever is more). A batch of random blind
/// indexes touches nearly every page of the index it enters, so new subjects enter the recent
/// level (appended, in runs), and the large index is rewritten (in one ordered pass) once per merge
/// rather than once per batch: a geometric merge, so each subject's share of that rewrite stays
/// bounded as the store grows. The rule counts from the row-id sequence (`lsm.merged_through`: the
/// sequence at the last merge), never from a scan; the merge itself counts what it moves.
fn merge_recent(tx: &rusqlite::Transaction<'_>, merge_min: i64, merge_fraction: i64) -> Result<bool, Failure> {
    let seq: i64 = tx.query_row("SELECT coalesce((SELECT seq FROM sqlite_sequence WHERE name='subjects'), 0)", [], |r| r.get(0))?;
    let merged = merged_through(tx)?;
    if seq - merged < merge_min.max(merged / merge_fraction.max(1)) {
        return Ok(false);
    }
    merge(tx)?;
    tx.execute("INSERT OR REPLACE INTO lsm(name, value) VALUES ('merged_through', ?1)", params![seq])?;
    Ok(true)
}

/// The merge itself (also `governance/keys/store.py`'s): the runs' entries enter the main index in
/// blind-index order, a slice of the key space at a time (`merge_parts`), each slice read run by
/// run from the runs' own order and sorted alone: sorting the whole level at once held all of it
/// in SQLite's sorter (115 MB more peak memory at 2M recent subjects). A blind index in both
/// would fail the main index's primary key; every entry must have gone in before the level is
/// emptied.
fn merge(tx: &rusqlite::Transaction<'_>) -> Result<(), Failure> {
    let total: i64 = tx.query_row("SELECT count(*) FROM bi_recent", [], |r| r.get(0))?;
    let mut moved = 0usize;
    let mut part = tx.prepare_cached(MERGE_PART)?;
    for (lo, hi) in merge_parts(total) {
        moved += part.execute(params![lo, hi])?;
    }
    if moved as i64 != total {
        return Err(Failure::Sqlite(format!("a merge moved {moved} of the recent level's {total} blind indexes (a run not in recent_runs?)")));
    }
    tx.execute_batch("DELETE FROM bi_recent; DELETE FROM recent_runs;")?;
    Ok(())
}
const MERGE_PART: &str = "INSERT INTO bi_main(blind_index, id) SELECT b.blind_index, b.id FROM recent_runs r \
    CROSS JOIN bi_recent b ON b.run = r.run AND b.blind_index >= ?1 AND b.blind_index < ?2 ORDER BY b.blind_index";
/// About how many blind indexes a merge sorts at once (`store.py`'s `_MERGE_SLICE`).
const MERGE_SLICE: i64 = 131_072;

/// The slices of the blind-index space a merge of `n` entries takes one at a time: a power of two
/// of them (at most 65,536), split on the first two bytes, each bound as `[lo, hi)` (the last `hi`
/// is above every 32-byte blind index).
fn merge_parts(n: i64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let parts = (((n.max(1) + MERGE_SLICE - 1) / MERGE_SLICE) as u64).next_power_of_two().min(65_536) as u32;
    let step = 65_536 / parts;
    (0..parts)
        .map(|i| {
            let lo = ((i * step) as u16).to_be_bytes().to_vec();
            let hi = if i + 1 == parts { vec![0xff; 33] } else { (((i + 1) * step) as u16).to_be_bytes().to_vec() };
            (lo, hi)
        })
        .collect()
}

/// Ids sampled to decide whether a batch is new people (see `resolve_subjects`).
const SAMPLE: usize = 256;

/// What every lookup of one batch shares: its transaction, the store's recent level (schema 4) or
/// none (schema 2), what is asked for, and the batch's blind indexes.
struct Lookup<'a> {
    tx: &'a rusqlite::Transaction<'a>,
    recent: Option<&'a RecentIndex>,
    main_filter: Option<&'a Sbbf>, // schema 4: the main index's filter at this transaction's mark
    token_cipher: Option<&'a aes::Aes256>,
    want_keys: bool,
    kek_id: &'a str,
    bis: &'a [[u8; 32]],
    uniq: &'a [usize],
}

impl Lookup<'_> {
    /// Tokens only, with tokens made from row ids: the blind-index index alone (it holds the row
    /// id) and the token derived from the id, without reading the table's rows.
    fn ids_only(&self) -> bool {
        !self.want_keys && self.token_cipher.is_some()
    }

    fn statement(&self, family: &Lookups) -> &'static str {
        match (self.ids_only(), self.want_keys) {
            (true, _) => family.ids,
            (false, true) => family.keys,
            (false, false) => family.tokens,
        }
    }

    /// Look up the distinct ids at `subset` (positions in `uniq`, none known yet) and fill their
    /// slots; the number found. Schema 2: one statement. Schema 4: one statement for each run of
    /// the recent level that its keys name for some of the ids, then one in the main index for
    /// the ids not found there.
    fn run(&self, subset: &[usize], slots: &mut [Slot]) -> Result<usize, Failure> {
        let Some(ix) = self.recent else {
            return self.one(self.statement(&LOOKUP_ROWS), None, subset, slots);
        };
        let mut found = 0usize;
        for (run, members) in ix.route(self.bis, self.uniq, subset) {
            found += self.one(self.statement(&LOOKUP_RECENT), Some(run), &members, slots)?;
        }
        let rest: Vec<usize> = subset.iter().copied().filter(|&s| !slots[s].known).collect();
        let rest = may_hold(self.main_filter, self.bis, self.uniq, rest);
        Ok(found + self.one(self.statement(&LOOKUP_MAIN), None, &rest, slots)?)
    }

    /// One lookup statement (`run`: its `?3`) for the ids at `subset`.
    fn one(&self, sql: &str, run: Option<i64>, subset: &[usize], slots: &mut [Slot]) -> Result<usize, Failure> {
        if subset.is_empty() {
            return Ok(0);
        }
        let packed = packed(self.bis, self.uniq, subset);
        let mut sel = self.tx.prepare_cached(sql)?;
        let mut rows = match run {
            Some(run) => sel.query(params![&packed[..], numbers(subset.len()), run])?,
            None => sel.query(params![&packed[..], numbers(subset.len())])?,
        };
        let mut found = 0usize;
        while let Some(r) = rows.next()? {
            let n = usize::try_from(r.get::<_, i64>(0)?).map_err(|e| Failure::Sqlite(e.to_string()))?;
            let s = *subset
                .get(n)
                .ok_or_else(|| Failure::Sqlite(format!("lookup returned position {n} of {}", subset.len())))?;
            let (token, wrapped) = match (self.ids_only(), self.token_cipher) {
                (true, Some(c)) => (derived_token(c, r.get::<_, i64>(1)?), Vec::new()),
                _ => {
                    let tok = r.get_ref(1)?.as_str().map_err(|e| Failure::Sqlite(e.to_string()))?;
                    let kid = r.get_ref(3)?.as_str().map_err(|e| Failure::Sqlite(e.to_string()))?;
                    if kid != self.kek_id {
                        return Err(Failure::ForeignKek(tok.to_string(), kid.to_string()));
                    }
                    let t: [u8; TOKEN_LEN] = tok
                        .as_bytes()
                        .try_into()
                        .map_err(|_| Failure::Sqlite(format!("token {tok:?} in the key store is malformed")))?;
                    let w = if self.want_keys { r.get_ref(2)?.as_blob().map_err(|e| Failure::Sqlite(e.to_string()))?.to_vec() } else { Vec::new() };
                    (t, w)
                }
            };
            if slots[s].known {
                return Err(Failure::Sqlite(format!("lookup returned subject {s} twice")));
            }
            slots[s] = Slot { token, wrapped: Some(wrapped), known: true, created: false };
            found += 1;
        }
        Ok(found)
    }
}

const TOKEN_MAGIC: &[u8; 8] = b"lw-subj\x02";

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sqlite_library, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_subjects, m)?)?;
    m.add_function(wrap_pyfunction!(release_connections, m)?)?;
    m.add_function(wrap_pyfunction!(main_filter_counts, m)?)?;
    Ok(())
}
