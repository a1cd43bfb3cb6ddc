//! The key store's bulk path: tokens (and data keys) of a whole column of subject ids, with the
//! new subjects created, in one SQLite transaction and no Python per id.
//!
//! Schema 5 (`governance/keys/runs.py` is the reference and describes the layout): data keys in
//! per-batch blocks, blind indexes in sorted runs merged by level. It runs the same statements on
//! the same tables as the Python twin (which creates the file, converts older schemas and owns
//! every other operation), through the system SQLite library. Python's `sqlite3` module must use
//! that same library instance (the Python side checks it before calling here): two SQLite copies in
//! one process would not see each other's POSIX locks. A version-1 store (random tokens, a row per
//! subject) keeps its own path.

use crate::{
    blind_index_all, cipher, make_tokens, open_into, seal_into, slice, Col, ColArg, OutCol, CHUNK,
    KEY, NONCE, TOKEN_LEN, WRAPPED,
};
use aes::cipher::{generic_array::GenericArray, BlockEncrypt, KeyInit};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
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

/// The last call's connection, kept open so SQLite's page cache survives from one batch to the
/// next: a fresh connection per batch read every page it touched again. SQLite empties that cache
/// itself when another connection has written the file since. It is used again only for the same
/// path, the same file (device and inode: a store deleted and made again at that path is another
/// file), the same timeout, and in the process that opened it (a forked child opens its own).
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

/// Close the kept connection and forget the runs' filters (a key store's `close`).
#[pyfunction]
fn release_connections(py: Python<'_>) {
    py.allow_threads(release)
}

fn release() {
    discard(&mut WRITER.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
    *run_cache() = None;
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

fn sqlite_err(e: impl std::fmt::Display) -> Failure {
    Failure::Sqlite(e.to_string())
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

/// Schema 5's sizes, for the test that holds them equal to `governance/keys/runs.py`'s:
/// `(BLOCK, PART, ENTRY)`.
#[pyfunction]
fn layout() -> (usize, usize, usize) {
    (BLOCK, PART, ENTRY)
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
/// Every distinct id is looked up, inside the write transaction, in blind-index order; the
/// missing ones then take the next row ids in that order. Schema 5: their tokens are the keyed
/// permutation of those ids (`token_key`), their wrapped keys go in blocks, their blind indexes in
/// one new run, and the levels that reach `fanout` runs are merged (see `merge_levels`). Only the
/// transaction is serialized: the blind indexes before it and the unwrapping after it run beside
/// another batch's transaction (one writer at a time in this process; other processes wait on
/// SQLite's own lock).
#[pyfunction]
#[pyo3(signature = (db, bi_key, kek, kek_id, ids, create, want_keys, now, *, fanout, timeout_ms=30_000, token_key=None, before_turn=None))]
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
    fanout: usize,
    timeout_ms: u64,
    token_key: Option<PyBuffer<u8>>,
    before_turn: Option<Py<PyAny>>,
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
        let store = store_of(bi_key);
        // Ids are told apart by their key, the blind index's first 16 bytes (what schema 5 stores;
        // see `KEY_BYTES`), sorted as integers.
        let mut order: Vec<(u128, u32)> = bis.iter().enumerate().map(|(i, b)| (key_of(b), i as u32)).collect();
        order.sort_unstable();
        let mut slot_of = vec![0usize; n];
        let mut uniq: Vec<usize> = Vec::new(); // the first id of each distinct key, in key order
        let mut ukeys: Vec<u128> = Vec::new();
        for &(k, i) in &order {
            if ukeys.last() != Some(&k) {
                uniq.push(i as usize);
                ukeys.push(k);
            }
            slot_of[i as usize] = uniq.len() - 1;
        }
        drop(order);
        let m = uniq.len();
        if let Some(hook) = &before_turn {
            // Tests: another writer's turn between the blind indexes and the write (a merge, a shred).
            Python::with_gil(|py| hook.call0(py).map(drop)).map_err(|e| Failure::Value(format!("before_turn: {e}")))?;
        }
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
        let version = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?;
        let mut slots: Vec<Slot> = (0..m)
            .map(|_| Slot { token: [0; TOKEN_LEN], wrapped: None, known: false, created: false })
            .collect();
        // 1. Look every distinct id up.
        let mut runs = None;
        match (version, &token_cipher) {
            (5, Some(tc)) => {
                let mut r = Runs::load(&tx, &db, store)?;
                let ids_found = r.lookup(&tx, &ukeys)?;
                let found: Vec<(i64, usize)> = ids_found.iter().enumerate().filter_map(|(s, id)| id.map(|i| (i, s))).collect();
                if want_keys {
                    read_keys(&tx, &found, tc, &kek_id, &mut slots)?;
                }
                for &(id, s) in &found {
                    slots[s].token = derived_token(tc, id);
                    slots[s].known = true;
                }
                runs = Some(r);
            }
            (1, None) => {
                let ubis: Vec<[u8; 32]> = uniq.iter().map(|&u| bis[u]).collect();
                lookup_rows(&tx, want_keys, &kek_id, &ubis, &mut slots)?
            }
            (5, None) => return Err(Failure::Sqlite("a schema-5 store without its token key".into())),
            (v, _) => {
                return Err(Failure::Sqlite(format!("a schema-{v} store; open it with KeyStore, which converts it to schema 5")))
            }
        }
        // 2. Create the missing ones: random data keys, wrapped under the KEK with the token as
        //    associated data.
        let missing: Vec<usize> = if create { (0..m).filter(|&s| !slots[s].known).collect() } else { Vec::new() };
        let k = missing.len();
        let drawn = Zeroizing::new(random(k * (KEY + NONCE))?);
        let (keys, nonces) = drawn.split_at(k * KEY);
        if k > 0 {
            let first_id: i64 = match &token_cipher {
                Some(_) => last_id(&tx)? + 1,
                None => 0,
            };
            let tokens = match &token_cipher {
                Some(c) => derived_tokens(c, first_id, k),
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
            match &mut runs {
                Some(r) => {
                    // Schema 5: the key blocks, then the run (its entries in blind-index order, as
                    // `missing` is, with ids ascending), then the levels it completes.
                    let mut ins = tx.prepare_cached(
                        "INSERT INTO keyblocks(first_id, n, kek_id, created_at, wrapped) VALUES (?1, ?2, ?3, ?4, ?5)",
                    )?;
                    for lo in (0..k).step_by(BLOCK) {
                        let hi = (lo + BLOCK).min(k);
                        ins.execute(params![first_id + lo as i64, (hi - lo) as i64, kek_id, now, &wrapped[lo * WRAPPED..hi * WRAPPED]])?;
                    }
                    let mut entries = Vec::with_capacity(k * ENTRY);
                    let mut filter = Sbbf::with_capacity(k);
                    for (j, &s) in missing.iter().enumerate() {
                        entries.extend_from_slice(&ukeys[s].to_be_bytes());
                        entries.extend_from_slice(&(first_id + j as i64).to_be_bytes());
                        filter.insert(ukeys[s]);
                    }
                    let run = next_run(&tx)?;
                    write_run(&tx, run, 0, &entries)?;
                    tx.execute(
                        "INSERT OR REPLACE INTO lsm(name, value) VALUES ('last_id', ?1)",
                        params![first_id + k as i64 - 1],
                    )?;
                    r.made.push((run, Arc::new(filter)));
                    merge_levels(&tx, fanout, r)?;
                }
                None => {
                    // A version-1 store: a row per subject, its random tokens sorted (appended in order).
                    let mut tok_packed = Vec::with_capacity(k * TOKEN_LEN);
                    let mut bi_packed = Vec::with_capacity(k * BI_LEN);
                    for (j, &s) in missing.iter().enumerate() {
                        tok_packed.extend_from_slice(&tokens[j]);
                        bi_packed.extend_from_slice(&bis[uniq[s]]);
                    }
                    let inserted = tx.execute(INSERT_V1, params![&tok_packed[..], &bi_packed[..], &wrapped[..], kek_id, now, numbers(k)])?;
                    if inserted != k {
                        return Err(Failure::Sqlite(format!("{inserted} of {k} new subjects were inserted")));
                    }
                }
            }
            for (j, &s) in missing.iter().enumerate() {
                slots[s] = Slot { token: tokens[j], wrapped: None, known: true, created: true };
            }
        }
        tx.commit()?;
        if let Some(r) = runs {
            r.keep(&db, store)?; // committed: this process's filters take the runs made and lose the merged
        }
        drop(writer);
        let mut new_key_of = vec![usize::MAX; m];
        for (j, &s) in missing.iter().enumerate() {
            new_key_of[s] = j;
        }
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
        Ok((slot_of, slots, out_keys, k))
    });
    if res.is_err() {
        // Whatever failed (a lock timeout, an I/O error, a foreign KEK), the next call starts on
        // a fresh connection, with no filter kept.
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

/// The tokens of row ids `first` .. `first + k - 1` (as `derived_token`), a chunk of ids a task, each
/// chunk's blocks encrypted together (the AES instructions pipelined over 8 blocks at once).
fn derived_tokens(c: &aes::Aes256, first: i64, k: usize) -> Vec<[u8; TOKEN_LEN]> {
    let parts: Vec<Vec<[u8; TOKEN_LEN]>> = (0..k.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ch| {
            let (lo, hi) = (ch * CHUNK, ((ch + 1) * CHUNK).min(k));
            let mut blocks: Vec<aes::Block> = (lo..hi)
                .map(|j| {
                    let mut b = aes::Block::default();
                    b[..8].copy_from_slice(TOKEN_MAGIC);
                    b[8..].copy_from_slice(&(first + j as i64).to_be_bytes());
                    b
                })
                .collect();
            c.encrypt_blocks(&mut blocks);
            let mut t = Vec::with_capacity(TOKEN_LEN);
            blocks
                .iter()
                .map(|b| {
                    t.clear();
                    crate::spell_token(b, &mut t);
                    t.as_slice().try_into().expect("a token is 30 bytes")
                })
                .collect()
        })
        .collect();
    parts.concat()
}

/// The numbers 0 .. `k`, bound to `rarray(?)` (see `INSERT_V1`).
fn numbers(k: usize) -> std::rc::Rc<Vec<rusqlite::types::Value>> {
    std::rc::Rc::new((0..k as i64).map(rusqlite::types::Value::Integer).collect())
}

const BI_LEN: usize = 32; // a blind index: HMAC-SHA256
/// Schema 5 keeps a blind index's first 16 bytes, its key: 128 bits tell 10^10 subjects apart with
/// a chance of a collision below 10^-18, and each entry is 24 bytes instead of 40.
const KEY_BYTES: usize = 16;
/// Schema 5 (`governance/keys/runs.py`: BLOCK, PART, ENTRY): subjects a key block, entries a part
/// of a run, bytes an entry (the key, then the row id, 8 bytes big endian).
const BLOCK: usize = 1024;
const PART: usize = 1024;
const ENTRY: usize = KEY_BYTES + 8;
// The statements below slice packed blobs at these widths.
const _: () = assert!(TOKEN_LEN == 30 && BI_LEN == 32 && WRAPPED == 60);

/// Version 1: `?1` the distinct blind indexes, sorted and packed; `?2`: `numbers` of how many. A
/// row `(n, token, wrapped key or NULL, kek id)` for each one the store knows; `CROSS JOIN` keeps
/// the numbers outside, so each is one probe of the blind-index index.
const LOOKUP_V1_TOKENS: &str = "WITH i(n) AS (SELECT value FROM rarray(?2)) SELECT i.n, s.token, NULL, s.kek_id \
    FROM i CROSS JOIN subjects s ON s.blind_index = substr(?1, i.n * 32 + 1, 32)";
const LOOKUP_V1_KEYS: &str = "WITH i(n) AS (SELECT value FROM rarray(?2)) SELECT i.n, s.token, s.wrapped_dek, s.kek_id \
    FROM i CROSS JOIN subjects s ON s.blind_index = substr(?1, i.n * 32 + 1, 32)";
/// Version 1: `?1` tokens (30 bytes each), `?2` blind indexes (32), `?3` wrapped keys (60), `?4`
/// KEK id, `?5` time, `?6` `numbers` of how many: one statement for the batch (2.5x faster than a
/// statement per subject).
const INSERT_V1: &str = "WITH i(n) AS (SELECT value FROM rarray(?6)) \
    INSERT INTO subjects(token, blind_index, wrapped_dek, kek_id, created_at) \
    SELECT CAST(substr(?1, n * 30 + 1, 30) AS TEXT), substr(?2, n * 32 + 1, 32), substr(?3, n * 60 + 1, 60), ?4, ?5 FROM i";

/// A version-1 store: every distinct id looked up in one statement.
fn lookup_rows(tx: &rusqlite::Transaction<'_>, want_keys: bool, kek_id: &str, ubis: &[[u8; 32]], slots: &mut [Slot]) -> Result<(), Failure> {
    if ubis.is_empty() {
        return Ok(());
    }
    let packed: Vec<u8> = ubis.concat();
    let mut sel = tx.prepare_cached(if want_keys { LOOKUP_V1_KEYS } else { LOOKUP_V1_TOKENS })?;
    let mut rows = sel.query(params![&packed[..], numbers(ubis.len())])?;
    while let Some(r) = rows.next()? {
        let s = usize::try_from(r.get::<_, i64>(0)?).map_err(sqlite_err)?;
        let tok = r.get_ref(1)?.as_str().map_err(sqlite_err)?;
        let kid = r.get_ref(3)?.as_str().map_err(sqlite_err)?;
        if kid != kek_id {
            return Err(Failure::ForeignKek(tok.to_string(), kid.to_string()));
        }
        let token: [u8; TOKEN_LEN] = tok
            .as_bytes()
            .try_into()
            .map_err(|_| Failure::Sqlite(format!("token {tok:?} in the key store is malformed")))?;
        let wrapped = if want_keys { r.get_ref(2)?.as_blob().map_err(sqlite_err)?.to_vec() } else { Vec::new() };
        let slot = slots.get_mut(s).ok_or_else(|| Failure::Sqlite(format!("lookup returned position {s}")))?;
        if slot.known {
            return Err(Failure::Sqlite(format!("lookup returned subject {s} twice")));
        }
        *slot = Slot { token, wrapped: Some(wrapped), known: true, created: false };
    }
    Ok(())
}

fn last_id(tx: &rusqlite::Transaction<'_>) -> Result<i64, Failure> {
    Ok(tx.query_row("SELECT coalesce((SELECT value FROM lsm WHERE name='last_id'), 0)", [], |r| r.get(0))?)
}

/// A new run number (`lsm.last_run`, never given again).
fn next_run(tx: &rusqlite::Transaction<'_>) -> Result<i64, Failure> {
    let run: i64 = tx.query_row("SELECT coalesce((SELECT value FROM lsm WHERE name='last_run'), 0)", [], |r| r.get::<_, i64>(0))? + 1;
    tx.execute("INSERT OR REPLACE INTO lsm(name, value) VALUES ('last_run', ?1)", params![run])?;
    Ok(run)
}

fn prefix(bi: &[u8]) -> u64 {
    u64::from_be_bytes(bi[..8].try_into().expect("8 bytes"))
}

/// A blind index's key: its first 16 bytes, as a big-endian number (so in the same order).
fn key_of(bi: &[u8]) -> u128 {
    u128::from_be_bytes(bi[..KEY_BYTES].try_into().expect("16 bytes"))
}

fn key_at(entries: &[u8], i: usize) -> u128 {
    key_of(&entries[i * ENTRY..])
}

fn id_at(entries: &[u8], i: usize) -> i64 {
    i64::from_be_bytes(entries[i * ENTRY + KEY_BYTES..(i + 1) * ENTRY].try_into().expect("8 bytes"))
}

/// Run `run` of `level`: `entries` (sorted, ENTRY bytes each) in parts of PART, and its fences.
fn write_run(tx: &rusqlite::Transaction<'_>, run: i64, level: i64, entries: &[u8]) -> Result<(), Failure> {
    let mut fences = Vec::with_capacity(entries.len().div_ceil(PART * ENTRY) * 8);
    let mut ins = tx.prepare_cached("INSERT INTO bi_parts(run, part, entries) VALUES (?1, ?2, ?3)")?;
    for (p, part) in entries.chunks(PART * ENTRY).enumerate() {
        fences.extend_from_slice(&part[..8]);
        ins.execute(params![run, p as i64, part])?;
    }
    tx.execute("INSERT INTO bi_runs(run, level, fences) VALUES (?1, ?2, ?3)", params![run, level, fences])?;
    Ok(())
}

/// One part of run `run` (empty when a shred emptied it, or it is not there).
fn read_part(tx: &rusqlite::Transaction<'_>, run: i64, part: usize) -> Result<Vec<u8>, Failure> {
    let blob: Option<Vec<u8>> = tx
        .prepare_cached("SELECT entries FROM bi_parts WHERE run = ?1 AND part = ?2")?
        .query_row(params![run, part as i64], |r| r.get(0))
        .optional()?;
    let blob = blob.unwrap_or_default();
    if blob.len() % ENTRY != 0 {
        return Err(Failure::Sqlite(format!("part {part} of run {run} is {} bytes, not a multiple of {ENTRY}", blob.len())));
    }
    Ok(blob)
}

/// The position of `key` in sorted `entries`, if they hold it.
fn find(entries: &[u8], key: u128) -> Option<usize> {
    let (mut lo, mut hi) = (0usize, entries.len() / ENTRY);
    while lo < hi {
        let mid = (lo + hi) / 2;
        match key_at(entries, mid).cmp(&key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

/// Which blind indexes a run may hold, in memory: a split-block Bloom filter (Parquet's layout:
/// 256-bit blocks of eight 32-bit words, one bit set in each word per key) of 16 bits a key, about
/// 0.13% false positives and no false negatives. A batch of new people reads no part of a run for
/// an id its filter does not hold. A run never gains an entry after its transaction, so a filter
/// stays a superset of its run for as long as the run exists (a shred only costs a read that finds
/// nothing). Kept in memory only: kept in the file, its bits would outlive a shredded subject.
/// Memory: 16 bits an entry (20 MB at 10M subjects).
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
    /// A blind index is an HMAC, so its bits are uniform already: the key's low 64 bits are the
    /// hash (its high 64 are the fences'; any bits would do).
    fn hash(key: u128) -> u64 {
        key as u64
    }
    fn block(&self, h: u64) -> usize {
        (((h >> 32) * self.blocks.len() as u64) >> 32) as usize
    }
    fn bit(h: u64, i: usize) -> u32 {
        1u32 << ((h as u32).wrapping_mul(SBBF_SALT[i]) >> 27)
    }
    fn insert(&mut self, key: u128) {
        let h = Self::hash(key);
        let b = self.block(h);
        for i in 0..8 {
            self.blocks[b][i] |= Self::bit(h, i);
        }
    }
    fn may_hold(&self, key: u128) -> bool {
        let h = Self::hash(key);
        let block = &self.blocks[self.block(h)];
        (0..8).all(|i| block[i] & Self::bit(h, i) != 0)
    }
}


/// Filters made by reading a run, and ids the runs' filters spared a read (tests, benchmarks:
/// `run_filter_counts`).
static FILTERS_MADE: AtomicU64 = AtomicU64::new(0);
static FILTERED: AtomicU64 = AtomicU64::new(0);

/// Filters of runs made in this process by reading a run, and the ids they spared a part's read.
#[pyfunction]
fn run_filter_counts() -> (u64, u64) {
    (FILTERS_MADE.load(Ordering::Relaxed), FILTERED.load(Ordering::Relaxed))
}

/// A store's fingerprint: the first 8 bytes of SHA-256 of its blind-index key (a file copied over
/// the same inode from another store is another store).
fn store_of(bi_key: &[u8]) -> [u8; 8] {
    use sha2::Digest;
    let d = sha2::Sha256::digest([b"lakewarden:main-filter\x00".as_slice(), bi_key].concat());
    d[..8].try_into().expect("8 bytes")
}

/// What this process knows of one run: its filter once made, or how many parts lookups have read
/// from it since, towards making one.
#[derive(Clone, Default)]
struct Memo {
    filter: Option<Arc<Sbbf>>,
    asked: usize,
}

/// The runs' memos of one store file, in the process that made them (as `Kept`).
struct RunCache {
    path: String,
    file: (u64, u64),
    pid: u32,
    store: [u8; 8],
    memos: HashMap<i64, Memo>,
}
static RUN_CACHE: std::sync::Mutex<Option<RunCache>> = std::sync::Mutex::new(None);

fn run_cache() -> std::sync::MutexGuard<'static, Option<RunCache>> {
    RUN_CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A run as one transaction sees it.
struct RunView {
    run: i64,
    fences: Vec<u64>,
}

/// The runs of one transaction, with this process's memos of them; the runs it made and merged.
struct Runs {
    views: Vec<RunView>,
    memos: HashMap<i64, Memo>,
    made: Vec<(i64, Arc<Sbbf>)>,
    merged: Vec<i64>,
}

impl Runs {
    /// The runs `tx` sees, with the memos this process holds of them (a run no longer there is
    /// forgotten: merged, by this process or another).
    fn load(tx: &rusqlite::Transaction<'_>, db: &str, store: [u8; 8]) -> Result<Runs, Failure> {
        let mut views = Vec::new();
        let mut sel = tx.prepare_cached("SELECT run, fences FROM bi_runs ORDER BY run DESC")?;
        let mut rows = sel.query([])?;
        while let Some(r) = rows.next()? {
            let f = r.get_ref(1)?.as_blob().map_err(sqlite_err)?;
            if f.len() % 8 != 0 {
                return Err(Failure::Sqlite(format!("the fences of run {} are {} bytes", r.get::<_, i64>(0)?, f.len())));
            }
            views.push(RunView { run: r.get(0)?, fences: f.chunks_exact(8).map(prefix).collect() });
        }
        let file = file_id(db)?;
        let pid = std::process::id();
        let mut memos = HashMap::new();
        if let Some(c) = run_cache().as_ref().filter(|c| c.path == db && c.file == file && c.pid == pid && c.store == store) {
            for v in &views {
                if let Some(m) = c.memos.get(&v.run) {
                    memos.insert(v.run, m.clone());
                }
            }
        }
        Ok(Runs { views, memos, made: Vec::new(), merged: Vec::new() })
    }

    /// The row id of each of `ukeys` (distinct keys, sorted) that a run holds. Newest run
    /// first; in each, only the ids its filter may hold, each in the part its fences name. A run
    /// with no filter yet is read whole (and its filter made) once the parts read from it reach a
    /// sixteenth of it: a batch of new people in a store this process has not seen yet would read
    /// most parts anyway.
    fn lookup(&mut self, tx: &rusqlite::Transaction<'_>, ukeys: &[u128]) -> Result<Vec<Option<i64>>, Failure> {
        let mut found: Vec<Option<i64>> = vec![None; ukeys.len()];
        let mut open: Vec<usize> = (0..ukeys.len()).collect();
        for v in &self.views {
            if open.is_empty() {
                break;
            }
            let memo = self.memos.entry(v.run).or_default();
            let cands: Vec<usize> = match &memo.filter {
                Some(f) => {
                    let c: Vec<usize> = open.iter().copied().filter(|&s| f.may_hold(ukeys[s])).collect();
                    FILTERED.fetch_add((open.len() - c.len()) as u64, Ordering::Relaxed);
                    c
                }
                None => open.clone(),
            };
            if cands.is_empty() || v.fences.is_empty() {
                continue;
            }
            let mut by_part: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for &s in &cands {
                let k = (ukeys[s] >> 64) as u64;
                let lo = v.fences.partition_point(|&f| f < k).saturating_sub(1);
                let hi = v.fences.partition_point(|&f| f <= k).saturating_sub(1);
                for p in lo..=hi.max(lo) {
                    by_part.entry(p).or_default().push(s);
                }
            }
            if memo.filter.is_none() {
                memo.asked += by_part.len();
                if memo.asked * 16 >= v.fences.len() {
                    // read it whole: the filter, and every candidate's answer
                    let mut all = Vec::new();
                    for p in 0..v.fences.len() {
                        all.extend_from_slice(&read_part(tx, v.run, p)?);
                    }
                    let count = all.len() / ENTRY;
                    let mut filter = Sbbf::with_capacity(count);
                    for i in 0..count {
                        filter.insert(key_at(&all, i));
                    }
                    FILTERS_MADE.fetch_add(1, Ordering::Relaxed);
                    memo.filter = Some(Arc::new(filter));
                    for &s in &cands {
                        if let Some(i) = find(&all, ukeys[s]) {
                            found[s] = Some(id_at(&all, i));
                        }
                    }
                    open.retain(|&s| found[s].is_none());
                    continue;
                }
            }
            for (p, members) in by_part {
                let part = read_part(tx, v.run, p)?;
                for s in members {
                    if let Some(i) = find(&part, ukeys[s]) {
                        found[s] = Some(id_at(&part, i));
                    }
                }
            }
            open.retain(|&s| found[s].is_none());
        }
        Ok(found)
    }

    /// After the commit: this process's memos of the store become the runs it saw, less those it
    /// merged, with the runs it made (their filters built from what it wrote).
    fn keep(self, db: &str, store: [u8; 8]) -> Result<(), Failure> {
        let mut memos = self.memos;
        for r in &self.merged {
            memos.remove(r);
        }
        for (r, f) in self.made {
            memos.insert(r, Memo { filter: Some(f), asked: 0 });
        }
        *run_cache() = Some(RunCache { path: db.to_string(), file: file_id(db)?, pid: std::process::id(), store, memos });
        Ok(())
    }
}

/// The wrapped keys of the subjects `found` (`(row id, slot)`) from their key blocks, into their
/// slots; a block wrapped by another KEK is refused by a token of its.
fn read_keys(tx: &rusqlite::Transaction<'_>, found: &[(i64, usize)], tc: &aes::Aes256, kek_id: &str, slots: &mut [Slot]) -> Result<(), Failure> {
    let mut wanted: Vec<(i64, usize)> = found.to_vec();
    wanted.sort_unstable();
    let mut sel = tx.prepare_cached("SELECT first_id, n, kek_id, wrapped FROM keyblocks WHERE first_id <= ?1 ORDER BY first_id DESC LIMIT 1")?;
    let mut block: Option<(i64, i64, String, Vec<u8>)> = None;
    for (id, s) in wanted {
        if !matches!(&block, Some((first, n, _, _)) if *first <= id && id < first + n) {
            block = sel.query_row(params![id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).optional()?;
        }
        let w = match &block {
            Some((first, n, kid, w)) if *first <= id && id < first + n => {
                if kid != kek_id {
                    let tok = derived_token(tc, id);
                    return Err(Failure::ForeignKek(String::from_utf8_lossy(&tok).into_owned(), kid.clone()));
                }
                let at = usize::try_from(id - first).map_err(sqlite_err)? * WRAPPED;
                w.get(at..at + WRAPPED).filter(|k| k.iter().any(|&b| b != 0))
            }
            _ => None,
        };
        let w = w.ok_or_else(|| Failure::Sqlite(format!("row {id} has a blind index but no data key")))?;
        slots[s].wrapped = Some(w.to_vec());
    }
    Ok(())
}

/// Merge every level holding `fanout` runs into one run of the next (a new run number), cascading
/// (`runs.py: merge_levels` is the reference). The runs are read a part at a time and merged by
/// blind index through a heap, and the merged run written a part at a time, so memory holds a part
/// of each, whatever their size; its filter is built as it goes.
fn merge_levels(tx: &rusqlite::Transaction<'_>, fanout: usize, runs: &mut Runs) -> Result<(), Failure> {
    let mut level = 0i64;
    loop {
        let members: Vec<(i64, usize)> = tx
            .prepare_cached("SELECT run, length(fences) / 8 FROM bi_runs WHERE level = ?1 ORDER BY run")?
            .query_map(params![level], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))?
            .collect::<Result<_, _>>()?;
        if members.len() >= fanout.max(2) {
            let mut total = 0usize;
            for &(run, _) in &members {
                let bytes: i64 = tx.query_row("SELECT coalesce(sum(length(entries)), 0) FROM bi_parts WHERE run = ?1", params![run], |r| r.get(0))?;
                total += bytes as usize / ENTRY;
            }
            // one cursor a run: its current part, the position in it, and the next part's number
            let mut cursors: Vec<(Vec<u8>, usize, usize)> = Vec::with_capacity(members.len());
            let mut heap = BinaryHeap::new();
            for (c, &(run, parts)) in members.iter().enumerate() {
                let mut cur = (Vec::new(), 0usize, 0usize);
                while cur.0.is_empty() && cur.2 < parts {
                    cur.0 = read_part(tx, run, cur.2)?;
                    cur.2 += 1;
                }
                if !cur.0.is_empty() {
                    heap.push(Reverse((key_at(&cur.0, 0), c)));
                }
                cursors.push(cur);
            }
            let run = next_run(tx)?;
            let mut filter = Sbbf::with_capacity(total);
            let mut out = Vec::with_capacity(PART * ENTRY);
            let mut fences = Vec::new();
            let mut ins = tx.prepare_cached("INSERT INTO bi_parts(run, part, entries) VALUES (?1, ?2, ?3)")?;
            while let Some(Reverse((key, c))) = heap.pop() {
                let (buf, at, next) = &mut cursors[c];
                out.extend_from_slice(&buf[*at * ENTRY..(*at + 1) * ENTRY]);
                filter.insert(key);
                *at += 1;
                if *at * ENTRY == buf.len() {
                    buf.clear();
                    *at = 0;
                    while buf.is_empty() && *next < members[c].1 {
                        *buf = read_part(tx, members[c].0, *next)?;
                        *next += 1;
                    }
                }
                if !buf.is_empty() {
                    heap.push(Reverse((key_at(buf, *at), c)));
                }
                if out.len() == PART * ENTRY {
                    fences.extend_from_slice(&out[..8]);
                    ins.execute(params![run, (fences.len() / 8 - 1) as i64, &out[..]])?;
                    out.clear();
                }
            }
            if !out.is_empty() {
                fences.extend_from_slice(&out[..8]);
                ins.execute(params![run, (fences.len() / 8 - 1) as i64, &out[..]])?;
            }
            let written = fences.len() / 8;
            if written.saturating_sub(1) * PART > total || written * PART < total {
                return Err(Failure::Sqlite(format!("a merge wrote {written} parts for {total} entries")));
            }
            for &(r, _) in &members {
                tx.execute("DELETE FROM bi_parts WHERE run = ?1", params![r])?;
                tx.execute("DELETE FROM bi_runs WHERE run = ?1", params![r])?;
                runs.merged.push(r);
            }
            runs.made.retain(|(r, _)| !members.iter().any(|&(m, _)| m == *r));
            tx.execute("INSERT INTO bi_runs(run, level, fences) VALUES (?1, ?2, ?3)", params![run, level + 1, fences])?;
            runs.made.push((run, Arc::new(filter)));
        } else if !tx
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM bi_runs WHERE level > ?1)")?
            .query_row(params![level], |r| r.get::<_, bool>(0))?
        {
            return Ok(());
        }
        level += 1;
    }
}

const TOKEN_MAGIC: &[u8; 8] = b"lw-subj\x02";

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sqlite_library, m)?)?;
    m.add_function(wrap_pyfunction!(resolve_subjects, m)?)?;
    m.add_function(wrap_pyfunction!(release_connections, m)?)?;
    m.add_function(wrap_pyfunction!(run_filter_counts, m)?)?;
    m.add_function(wrap_pyfunction!(layout, m)?)?;
    Ok(())
}
