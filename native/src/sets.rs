//! In-memory lookups an ingest keeps from batch to batch, so that a batch costs the same whether
//! it is the first or the fortieth.
//!
//! * [`UniqueSet`]: the 64-bit hashes of a unique column's accepted values. A batch is checked
//!   against it in one pass over the batch, not over everything seen (the SQL it replaces joined
//!   each batch against every earlier hash: quadratic in the file's size).
//! * [`TokenCache`]: subject id to token, for datasets that seal nothing (transactions: many rows
//!   per subject), so a subject seen in an earlier batch is not asked of the key store again. The
//!   Arrow cache it replaces was rebuilt into a hash table, and copied, on every batch.
//!
//! Hashes are `ahash` under keys drawn at random for each object, so values chosen to collide
//! cannot be prepared in advance. A collision in a `UniqueSet` could only quarantine a row as a
//! duplicate (odds about n²/2⁶⁵), never accept one; a `TokenCache` compares the whole id before it
//! answers, and an id whose hash is taken by another is simply not cached.

use ahash::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, RwLock};

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::{slice, Col, ColArg, OutCol, PyCol};

/// A hasher for keys that are already hashes: the map does not hash them again. The bits are
/// rotated so that a `UniqueSet` shard's keys, which share their top bits (the shard's number),
/// differ in the top bits the map files them by.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.rotate_right(SHARD_BITS);
    }
}

type Pre = BuildHasherDefault<Prehashed>;

fn flags<'a>(buf: &'a Option<PyBuffer<u8>>, n: usize, what: &str) -> PyResult<Option<&'a [u8]>> {
    match buf {
        None => Ok(None),
        Some(b) => {
            let s = slice(b)?;
            if s.len() < n {
                return Err(PyValueError::new_err(format!("{what} is shorter than the column")));
            }
            Ok(Some(s))
        }
    }
}

const SHARD_BITS: u32 = 12;
const BUCKET_BITS: u32 = 16; // a batch's hashes are grouped this finely before lookup

/// The hashes of the values of one unique column accepted so far in an ingest.
///
/// The set is split into 4,096 shards by a hash's top bits, and a batch's hashes are sorted
/// before they are looked up, so the lookups walk the shards in order, each small enough to stay
/// in the CPU's cache (one flat set of ten million hashes missed the cache on every lookup).
/// Sorting also puts a value's repeats within the batch side by side.
#[pyclass]
pub(crate) struct UniqueSet {
    state: RandomState,
    inner: Mutex<Shards>,
}

struct Shards {
    sets: Vec<Shard>,
    len: usize,
    pending: Vec<(u64, usize)>, // inserted by the last check: (hash, row index), kept or undone by commit
}

/// One shard: a sorted array of hashes and a small hash set of those added since its last merge.
///
/// The set grows with every value an ingest accepts, so its bytes per value are what bound an
/// ingest's memory. A hash set of 64-bit hashes takes 10 to 21 bytes a value (its control bytes,
/// and half empty after it doubles: all shards double together, since the hashes are uniform);
/// the sorted array takes 8 (and at most an eighth spare), and the recent set stays under a
/// sixteenth of it: about 8 to 10.
/// A lookup is a binary search in the shard's few thousand sorted hashes, in cache.
#[derive(Default)]
struct Shard {
    merged: Vec<u64>,
    recent: HashSet<u64, Pre>,
}

const MERGE_FLOOR: usize = 64; // a shard's recent set is merged once it holds this many, or a sixteenth

impl Shard {
    fn contains(&self, h: u64) -> bool {
        self.recent.contains(&h) || self.merged.binary_search(&h).is_ok()
    }

    /// Add `h`; false when it was there.
    fn insert(&mut self, h: u64) -> bool {
        !self.contains(h) && self.recent.insert(h)
    }

    /// Take back a hash (what a check added and its commit undoes): from the recent set, where a
    /// check's additions stay until its commit; from the sorted array should a fold have come
    /// in between (an `add` before the commit).
    fn undo(&mut self, h: u64) {
        if !self.recent.remove(&h) {
            if let Ok(p) = self.merged.binary_search(&h) {
                self.merged.remove(p);
            }
        }
    }

    /// Fold the recent hashes into the sorted array once they are many enough.
    fn settle(&mut self) {
        if self.recent.len() < MERGE_FLOOR.max(self.merged.len() / 16) {
            return;
        }
        let mut fresh: Vec<u64> = std::mem::take(&mut self.recent).into_iter().collect();
        fresh.sort_unstable();
        // Merged in place from the back, into room grown an eighth at a time: the array is
        // reallocated every other merge or so, with at most an eighth of it spare.
        let (old, k) = (self.merged.len(), fresh.len());
        if self.merged.capacity() < old + k {
            self.merged.reserve_exact(k.max(old / 8));
        }
        self.merged.resize(old + k, 0);
        let (mut i, mut j) = (old, k);
        while j > 0 {
            let w = i + j - 1;
            if i > 0 && self.merged[i - 1] > fresh[j - 1] {
                self.merged[w] = self.merged[i - 1];
                i -= 1;
            } else {
                self.merged[w] = fresh[j - 1];
                j -= 1;
            }
        }
    }
}

fn shard_of(h: u64) -> usize {
    (h >> (64 - SHARD_BITS)) as usize
}

impl Shards {
    fn shard(&mut self, h: u64) -> &mut Shard {
        &mut self.sets[shard_of(h)]
    }
}

impl UniqueSet {
    fn lock(&self) -> PyResult<std::sync::MutexGuard<'_, Shards>> {
        self.inner.lock().map_err(|_| PyValueError::new_err("unique set poisoned"))
    }
}

#[pymethods]
impl UniqueSet {
    #[new]
    fn new() -> Self {
        UniqueSet {
            state: RandomState::new(),
            inner: Mutex::new(Shards {
                sets: (0..1usize << SHARD_BITS).map(|_| Shard::default()).collect(),
                len: 0,
                pending: Vec::new(),
            }),
        }
    }

    fn __len__(&self) -> PyResult<usize> {
        Ok(self.lock()?.len)
    }

    /// One byte per row: 0 not a duplicate, 1 a repeat within the batch (a row after the first
    /// with its value, by `rows`, the rows' numbers as i64), 2 a value already in the set. Only
    /// rows whose `candidate` byte is 1 and whose value is not null are looked at; the others
    /// are 0. Each value new to the set is added at once (the first row with it), and
    /// [`UniqueSet::commit`] then keeps or takes back each one.
    #[pyo3(signature = (values, rows, candidate=None))]
    fn check(
        &self,
        py: Python<'_>,
        values: ColArg,
        rows: PyBuffer<u8>,
        candidate: Option<PyBuffer<u8>>,
    ) -> PyResult<Py<PyBytes>> {
        let col = Col::new(&values)?;
        let n = col.len;
        let rows = slice(&rows)?;
        if rows.len() < n * 8 {
            return Err(PyValueError::new_err("row numbers are shorter than the column"));
        }
        let cand = flags(&candidate, n, "the candidate flags")?;
        // The lock is taken and dropped without the GIL: a thread that holds it never waits for
        // the GIL, so threads that hold the GIL and wait for the lock cannot deadlock with it.
        let out = py.allow_threads(|| {
            let mut guard = self.lock()?;
            let sh: &mut Shards = &mut guard;
            let row = |i: usize| i64::from_le_bytes(rows[i * 8..i * 8 + 8].try_into().unwrap());
            // Bucket the batch's hashes by their top 16 bits (a counting sort: two passes; the
            // buckets come in shard order), then sort each bucket's few by hash and row, so a
            // value's rows lie together, the first row first.
            let keyed: Vec<(u64, i64, usize)> = (0..n)
                .filter(|&i| cand.map_or(true, |c| c[i] != 0))
                .filter_map(|i| col.get(i).map(|v| (self.state.hash_one(v), row(i), i)))
                .collect();
            let bucket_of = |h: u64| (h >> (64 - BUCKET_BITS)) as usize;
            let mut start = vec![0usize; (1 << BUCKET_BITS) + 1];
            for e in &keyed {
                start[bucket_of(e.0) + 1] += 1;
            }
            for s in 1..start.len() {
                start[s] += start[s - 1];
            }
            let mut by_shard = vec![(0u64, 0i64, 0usize); keyed.len()];
            let mut at = start.clone();
            for e in keyed {
                let b = bucket_of(e.0);
                by_shard[at[b]] = e;
                at[b] += 1;
            }
            let mut kinds = vec![0u8; n];
            sh.pending.clear();
            for b in 0..1usize << BUCKET_BITS {
                let group = &mut by_shard[start[b]..start[b + 1]];
                if group.is_empty() {
                    continue;
                }
                if group.len() > 1 {
                    group.sort_unstable();
                }
                let set = &mut sh.sets[b >> (BUCKET_BITS - SHARD_BITS)];
                let mut k = 0;
                while k < group.len() {
                    let (h, _, first) = group[k];
                    let mut j = k + 1;
                    while j < group.len() && group[j].0 == h {
                        kinds[group[j].2] = 1;
                        j += 1;
                    }
                    if set.insert(h) {
                        sh.pending.push((h, first));
                    } else {
                        kinds[first] = 2;
                    }
                    k = j;
                }
            }
            sh.len += sh.pending.len();
            Ok::<_, PyErr>(kinds)
        })?;
        Ok(PyBytes::new(py, &out).unbind())
    }

    /// After [`UniqueSet::check`]: keep the values it added whose row's `keep` byte is 1, and
    /// take back the others (rows quarantined for another reason since).
    fn commit(&self, keep: PyBuffer<u8>) -> PyResult<()> {
        // Under the GIL: safe, since no holder of the lock ever waits for the GIL.
        let keep = slice(&keep)?;
        let mut guard = self.lock()?;
        let sh: &mut Shards = &mut guard;
        let pending = std::mem::take(&mut sh.pending);
        for (h, i) in pending {
            if keep.get(i).copied().unwrap_or(0) == 0 {
                sh.shard(h).undo(h);
                sh.len -= 1;
            }
        }
        sh.sets.iter_mut().for_each(Shard::settle); // only now: a check's additions stay undoable
        Ok(())
    }

    /// Add the column's values (nulls skipped): the values already in a table.
    fn add(&self, py: Python<'_>, values: ColArg) -> PyResult<()> {
        let col = Col::new(&values)?;
        py.allow_threads(|| {
            let mut guard = self.lock()?;
            let sh: &mut Shards = &mut guard;
            let mut hashes: Vec<u64> = (0..col.len).filter_map(|i| col.get(i)).map(|v| self.state.hash_one(v)).collect();
            hashes.sort_unstable();
            for h in hashes {
                if sh.shard(h).insert(h) {
                    sh.len += 1;
                }
            }
            sh.sets.iter_mut().for_each(Shard::settle);
            Ok(())
        })
    }
}

/// Subject ids and their tokens, held as two byte arenas and a map from an id's hash to its entry.
#[derive(Default)]
struct Entries {
    index: HashMap<u64, u32, Pre>,
    ids: Vec<u8>,
    tokens: Vec<u8>,
    spans: Vec<(usize, u32, usize, u32)>, // id start, id length, token start, token length
}

impl Entries {
    fn get(&self, h: u64, id: &[u8]) -> Option<&[u8]> {
        let &(a, al, t, tl) = self.spans.get(*self.index.get(&h)? as usize)?;
        (&self.ids[a..a + al as usize] == id).then(|| &self.tokens[t..t + tl as usize])
    }
}

/// Subject id to token, for the subjects an ingest has resolved; thread-safe, and lookups run
/// side by side.
#[pyclass]
pub(crate) struct TokenCache {
    state: RandomState,
    entries: RwLock<Entries>,
}

#[pymethods]
impl TokenCache {
    #[new]
    fn new() -> Self {
        TokenCache {
            state: RandomState::new(),
            entries: RwLock::new(Entries::default()),
        }
    }

    fn __len__(&self) -> usize {
        self.entries.read().map(|e| e.spans.len()).unwrap_or(0)
    }

    fn clear(&self) {
        if let Ok(mut e) = self.entries.write() {
            *e = Entries::default();
        }
    }

    /// Each id's token, or null where the id is null or not cached.
    fn lookup(&self, py: Python<'_>, ids: ColArg) -> PyResult<PyCol> {
        let col = Col::new(&ids)?;
        let out = py.allow_threads(|| {  // the lock without the GIL: see UniqueSet::check
            let guard = self.entries.read().map_err(|_| PyValueError::new_err("token cache poisoned"))?;
            let e: &Entries = &guard;
            let mut lens = Vec::with_capacity(col.len);
            let mut data = Vec::with_capacity(col.len * crate::TOKEN_LEN);
            for i in 0..col.len {
                let tok = col.get(i).and_then(|id| e.get(self.state.hash_one(id), id));
                lens.push(tok.map(|t| {
                    data.extend_from_slice(t);
                    t.len()
                }));
            }
            OutCol::from_parts(vec![(lens, data)], col.len)
        })?;
        Ok(out.into_py(py))
    }

    /// Cache each id's token (pairs where either is null are skipped; an id already cached, or
    /// whose hash another id holds, is left as it is).
    fn insert(&self, py: Python<'_>, ids: ColArg, tokens: ColArg) -> PyResult<()> {
        let (col, toks) = (Col::new(&ids)?, Col::new(&tokens)?);
        if col.len != toks.len {
            return Err(PyValueError::new_err("ids and tokens differ in length"));
        }
        py.allow_threads(|| {  // the lock without the GIL: see UniqueSet::check
            let mut guard = self.entries.write().map_err(|_| PyValueError::new_err("token cache poisoned"))?;
            let e: &mut Entries = &mut guard;
            for i in 0..col.len {
                let (Some(id), Some(tok)) = (col.get(i), toks.get(i)) else { continue };
                let h = self.state.hash_one(id);
                if e.index.contains_key(&h) || e.spans.len() >= u32::MAX as usize {
                    continue;
                }
                let span = (e.ids.len(), id.len() as u32, e.tokens.len(), tok.len() as u32);
                e.ids.extend_from_slice(id);
                e.tokens.extend_from_slice(tok);
                let at = e.spans.len() as u32;
                e.spans.push(span);
                e.index.insert(h, at);
            }
            Ok(())
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<UniqueSet>()?;
    m.add_class::<TokenCache>()?;
    Ok(())
}
