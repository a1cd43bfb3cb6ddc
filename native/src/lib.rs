//! Lakewarden's native core: the per-value work of the key hierarchy on whole Arrow columns.
//!
//! Every function takes Arrow buffers (a variable-length binary column is its offsets, data and
//! validity buffers, its offset and its length) and returns buffers Python wraps as Arrow arrays
//! without touching a value. The GIL is released while the work runs, and large columns are split
//! over the cores with rayon.
//!
//! The wire formats are `governance/keys/wire.py`'s; `tests/fixtures/crypto_vectors.json` pins them
//! and tests check this module and the pure-Python reference against the same vectors. Primitives
//! come from the RustCrypto crates (`aes-gcm`, `hmac`, `sha2`); nothing here is hand-rolled. Key
//! material this module copies (KEK, data keys, cipher states) is zeroized when dropped.

use aes_gcm::aead::generic_array::GenericArray;
use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit};
use chacha20::cipher::{KeyIvInit, StreamCipher};
use chacha20::ChaCha20;
use hmac::{Hmac, Mac};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

mod keystore;
mod records;
mod sets;
mod validate;

pub(crate) const KEY: usize = 32;
pub(crate) const NONCE: usize = 12;
const TAG: usize = 16;
const VERSION: u8 = 1;
const SEAL_OVERHEAD: usize = 1 + NONCE + TAG;
pub(crate) const TOKEN_LEN: usize = 30; // "sub_" + 26 base32 characters
pub(crate) const WRAPPED: usize = NONCE + KEY + TAG;
pub(crate) const CHUNK: usize = 8192; // rows per parallel task

/// The characters Python's `str.strip()` removes (`str.isspace()`), so a subject id is normalised
/// exactly as the key store's Python path does it.
pub(crate) const PY_WHITESPACE: &[char] = &[
    '\u{9}', '\u{a}', '\u{b}', '\u{c}', '\u{d}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{1f}', '\u{20}',
    '\u{85}', '\u{a0}', '\u{1680}', '\u{2000}', '\u{2001}', '\u{2002}', '\u{2003}', '\u{2004}',
    '\u{2005}', '\u{2006}', '\u{2007}', '\u{2008}', '\u{2009}', '\u{200a}', '\u{2028}', '\u{2029}',
    '\u{202f}', '\u{205f}', '\u{3000}',
];

pub(crate) fn slice(b: &PyBuffer<u8>) -> PyResult<&[u8]> {
    if !b.is_c_contiguous() {
        return Err(PyValueError::new_err("buffer must be contiguous"));
    }
    // SAFETY: the buffer is contiguous, of len_bytes bytes, and the PyBuffer (which holds the
    // exporter alive and its memory pinned) outlives every use of the slice in this module.
    Ok(unsafe { std::slice::from_raw_parts(b.buf_ptr() as *const u8, b.len_bytes()) })
}

pub(crate) fn opt_slice(b: &Option<PyBuffer<u8>>) -> PyResult<Option<&[u8]>> {
    b.as_ref().map(slice).transpose()
}

/// A binary or string column as Python passes it: (offsets, data, validity, offset, length).
#[derive(FromPyObject)]
pub(crate) struct ColArg(
    PyBuffer<u8>,
    Option<PyBuffer<u8>>,
    Option<PyBuffer<u8>>,
    usize,
    usize,
);

#[derive(Clone, Copy)]
pub(crate) struct Col<'a> {
    offsets: &'a [u8],
    data: &'a [u8],
    validity: Option<&'a [u8]>,
    start: usize,
    len: usize,
}

impl<'a> Col<'a> {
    pub(crate) fn new(arg: &'a ColArg) -> PyResult<Col<'a>> {
        let offsets = slice(&arg.0)?;
        let data = opt_slice(&arg.1)?.unwrap_or(&[]);
        let validity = opt_slice(&arg.2)?;
        let (start, len) = (arg.3, arg.4);
        if offsets.len() < (start + len + 1) * 4 {
            return Err(PyValueError::new_err(
                "offsets buffer is shorter than the column",
            ));
        }
        if let Some(v) = validity {
            if v.len() * 8 < start + len {
                return Err(PyValueError::new_err(
                    "validity buffer is shorter than the column",
                ));
            }
        }
        let col = Col {
            offsets,
            data,
            validity,
            start,
            len,
        };
        if len > 0 {
            let (a, b) = (col.off(0), col.off(len));
            if a > b || b > data.len() {
                return Err(PyValueError::new_err(
                    "offsets point outside the data buffer",
                ));
            }
        }
        Ok(col)
    }

    #[inline]
    fn off(&self, i: usize) -> usize {
        let k = (self.start + i) * 4;
        i32::from_le_bytes(self.offsets[k..k + 4].try_into().expect("4 bytes")) as usize
    }

    /// Whether row `i` holds a value (not null): the validity bit alone, no offsets read.
    #[inline]
    pub(crate) fn is_valid(&self, i: usize) -> bool {
        match self.validity {
            Some(v) => {
                let bit = self.start + i;
                (v[bit >> 3] >> (bit & 7)) & 1 == 1
            }
            None => true,
        }
    }

    #[inline]
    pub(crate) fn get(&self, i: usize) -> Option<&'a [u8]> {
        if !self.is_valid(i) {
            return None;
        }
        // Both offsets in one read of 8 bytes (one bounds check, not eight).
        let k = (self.start + i) * 4;
        let w: [u8; 8] = self.offsets[k..k + 8].try_into().expect("8 bytes");
        let a = i32::from_le_bytes([w[0], w[1], w[2], w[3]]) as usize;
        let b = i32::from_le_bytes([w[4], w[5], w[6], w[7]]) as usize;
        Some(&self.data[a..b])
    }
}

/// An output column: offsets (i32, n + 1), data, validity (None when nothing is null), null count.
pub(crate) struct OutCol {
    offsets: Vec<u8>,
    data: Vec<u8>,
    validity: Option<Vec<u8>>,
    nulls: usize,
}

pub(crate) type PyCol = (Py<OwnedBuf>, Py<OwnedBuf>, Option<Py<OwnedBuf>>, usize);

/// A buffer made here, handed to Python without a copy: it exposes its bytes through the buffer
/// protocol (read-only), so `pyarrow.py_buffer` makes an Arrow buffer of them that keeps this
/// object alive. Before, each output column's offsets and values were copied into `bytes` (the
/// sealed columns of a batch of 166k customers: 37 MB a batch, each copy into fresh pages).
#[pyclass(frozen, module = "lakewarden_native")]
pub(crate) struct OwnedBuf {
    data: Vec<u8>,
}

impl OwnedBuf {
    pub(crate) fn new(py: Python<'_>, data: Vec<u8>) -> Py<OwnedBuf> {
        Py::new(py, OwnedBuf { data }).expect("a Python object for an output buffer")
    }
}

#[pymethods]
impl OwnedBuf {
    fn __len__(&self) -> usize {
        self.data.len()
    }

    /// # Safety
    /// `view` is the caller's `Py_buffer` (the buffer protocol's contract).
    unsafe fn __getbuffer__(slf: Bound<'_, Self>, view: *mut pyo3::ffi::Py_buffer, flags: std::os::raw::c_int) -> PyResult<()> {
        if flags & pyo3::ffi::PyBUF_WRITABLE != 0 {
            return Err(pyo3::exceptions::PyBufferError::new_err("an output buffer is read-only"));
        }
        let data = &slf.get().data;
        // Fills `view` and takes a reference to `slf`, released with the view: the bytes live as
        // long as any view of them (the object is frozen: they never change).
        if pyo3::ffi::PyBuffer_FillInfo(view, slf.as_ptr(), data.as_ptr() as *mut std::os::raw::c_void,
                                        data.len() as pyo3::ffi::Py_ssize_t, 1, flags) == -1 {
            return Err(PyErr::fetch(slf.py()));
        }
        Ok(())
    }

    unsafe fn __releasebuffer__(&self, _view: *mut pyo3::ffi::Py_buffer) {}
}

impl OutCol {
    pub(crate) fn from_parts(
        parts: Vec<(Vec<Option<usize>>, Vec<u8>)>,
        n: usize,
    ) -> PyResult<OutCol> {
        let mut offsets = Vec::with_capacity((n + 1) * 4);
        let total: usize = parts.iter().map(|p| p.1.len()).sum();
        if total > i32::MAX as usize {
            return Err(PyValueError::new_err(
                "column too large for 32-bit offsets; use smaller batches",
            ));
        }
        // One part (a column made in one piece) is moved, not copied.
        let whole = parts.len() == 1;
        let mut data = if whole { Vec::new() } else { Vec::with_capacity(total) };
        let mut valid = vec![0u8; n.div_ceil(8)];
        let mut nulls = 0;
        let mut pos: i32 = 0;
        let mut row = 0;
        offsets.extend_from_slice(&pos.to_le_bytes());
        for (lens, bytes) in parts {
            if whole {
                data = bytes;
            } else {
                data.extend_from_slice(&bytes);
            }
            for l in lens {
                match l {
                    Some(l) => {
                        pos += l as i32;
                        valid[row >> 3] |= 1 << (row & 7);
                    }
                    None => nulls += 1,
                }
                offsets.extend_from_slice(&pos.to_le_bytes());
                row += 1;
            }
        }
        Ok(OutCol {
            offsets,
            data,
            validity: if nulls > 0 { Some(valid) } else { None },
            nulls,
        })
    }

    pub(crate) fn into_py(self, py: Python<'_>) -> PyCol {
        (
            OwnedBuf::new(py, self.offsets),
            OwnedBuf::new(py, self.data),
            self.validity.map(|v| OwnedBuf::new(py, v)),
            self.nulls,
        )
    }
}

/// `n` random bytes (data keys, nonces), or the reason the OS random source failed.
///
/// Up to `SEEDED_FROM` bytes come from the OS (`getrandom`) directly. More are the ChaCha20
/// keystream under a 256-bit key drawn from the OS for this call alone, which is zeroized with
/// the cipher's state when the call returns: the construction the Linux kernel's own generator
/// uses to expand its pool, run here with the RustCrypto `chacha20` crate's vector code (about 4x
/// the kernel's generic ChaCha on this machine, where a governed ingest of 1M new people draws
/// about 100 MB: 0.3 s of CPU in the kernel). Nothing is kept between calls, so a forked child
/// shares no state with its parent.
pub(crate) fn os_random(n: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; n];
    if n <= SEEDED_FROM {
        getrandom::getrandom(&mut buf).map_err(|e| format!("OS random source failed: {e}"))?;
        return Ok(buf);
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(&mut seed[..]).map_err(|e| format!("OS random source failed: {e}"))?;
    // A fresh key for each call, so the nonce can be fixed; one key's stream is 256 GiB.
    let mut stream = ChaCha20::new(&(*seed).into(), &[0u8; 12].into());
    stream.apply_keystream(&mut buf);
    Ok(buf)
}
const SEEDED_FROM: usize = 256;

pub(crate) fn random(n: usize) -> PyResult<Vec<u8>> {
    os_random(n).map_err(PyRuntimeError::new_err)
}

pub(crate) fn cipher(key: &[u8]) -> PyResult<Aes256Gcm> {
    if key.len() != KEY {
        return Err(PyValueError::new_err(format!(
            "AES-256-GCM key must be {KEY} bytes, got {}",
            key.len()
        )));
    }
    Ok(Aes256Gcm::new(GenericArray::from_slice(key)))
}

/// `nonce || ciphertext || tag` of `plain` appended to `out`.
pub(crate) fn seal_into(c: &Aes256Gcm, nonce: &[u8], plain: &[u8], aad: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(nonce);
    let start = out.len();
    out.extend_from_slice(plain);
    let tag = c
        .encrypt_in_place_detached(GenericArray::from_slice(nonce), aad, &mut out[start..])
        .expect("AES-GCM encryption of a batch-sized value cannot fail");
    out.extend_from_slice(&tag);
}

/// The plaintext of `nonce || ciphertext || tag` appended to `out`; false when it does not open.
pub(crate) fn open_into(c: &Aes256Gcm, blob: &[u8], aad: &[u8], out: &mut Vec<u8>) -> bool {
    if blob.len() < NONCE + TAG {
        return false;
    }
    let (nonce, rest) = blob.split_at(NONCE);
    let (ct, tag) = rest.split_at(rest.len() - TAG);
    let start = out.len();
    out.extend_from_slice(ct);
    let ok = c
        .decrypt_in_place_detached(
            GenericArray::from_slice(nonce),
            aad,
            &mut out[start..],
            GenericArray::from_slice(tag),
        )
        .is_ok();
    if !ok {
        out[start..].zeroize();
        out.truncate(start);
    }
    ok
}

fn read_index(buf: &[u8], n: usize) -> PyResult<Vec<i32>> {
    if buf.len() < n * 4 {
        return Err(PyValueError::new_err(
            "key index buffer is shorter than the column",
        ));
    }
    Ok(buf[..n * 4]
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn check_keys(keys: &[u8], tokens: &Col) -> PyResult<usize> {
    if keys.len() % KEY != 0 || keys.len() / KEY != tokens.len {
        return Err(PyValueError::new_err(format!(
            "{} key bytes for {} tokens (each key is {KEY} bytes)",
            keys.len(),
            tokens.len
        )));
    }
    Ok(tokens.len)
}

/// The blind index of every id (HMAC-SHA256 under `key` of the id stripped as Python's
/// `str.strip()` does), or the message naming the first null, non-UTF-8 or blank id.
pub(crate) fn blind_index_all(key: &[u8], ids: &Col) -> Result<Vec<[u8; 32]>, String> {
    let base = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| e.to_string())?;
    let n = ids.len;
    let parts: Vec<Vec<[u8; 32]>> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let mut out = Vec::with_capacity(hi - lo);
            for i in lo..hi {
                let raw = ids
                    .get(i)
                    .ok_or_else(|| format!("subject id at position {i} is null"))?;
                let s = std::str::from_utf8(raw)
                    .map_err(|_| format!("subject id at position {i} is not valid UTF-8"))?;
                let s = s.trim_matches(PY_WHITESPACE);
                if s.is_empty() {
                    return Err(format!(
                        "subject id at position {i} is empty or whitespace only"
                    ));
                }
                let mut h = base.clone();
                h.update(s.as_bytes());
                out.push(h.finalize().into_bytes().into());
            }
            Ok(out)
        })
        .collect::<Result<_, String>>()?;
    Ok(parts.concat())
}

/// Blind indexes of subject ids: `n * 32` bytes. Raises ValueError naming the first null,
/// non-UTF-8 or blank id.
#[pyfunction]
fn blind_indexes(py: Python<'_>, key: PyBuffer<u8>, ids: ColArg) -> PyResult<Py<PyBytes>> {
    let key = slice(&key)?;
    let ids = Col::new(&ids)?;
    let out = py
        .allow_threads(|| blind_index_all(key, &ids))
        .map_err(PyValueError::new_err)?;
    Ok(PyBytes::new(py, &out.concat()).unbind())
}

/// Keyed hashes for the `hash` mask: the lowercase hex of HMAC-SHA256(key, value) truncated to
/// 128 bits (HASH_BYTES), of each value exactly as given (no stripping): `n * 32` ASCII bytes; a
/// null value gives 32 zero bytes (the caller keeps the input's validity).
#[pyfunction]
fn keyed_hashes(py: Python<'_>, key: PyBuffer<u8>, values: ColArg) -> PyResult<Py<PyBytes>> {
    let key = slice(&key)?;
    let values = Col::new(&values)?;
    let out = py
        .allow_threads(|| -> Result<Vec<u8>, String> {
            let base = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| e.to_string())?;
            let n = values.len;
            let parts: Vec<Vec<u8>> = (0..n.div_ceil(CHUNK))
                .into_par_iter()
                .map(|c| {
                    let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                    let mut out = vec![0u8; (hi - lo) * HASH_HEX];
                    for i in lo..hi {
                        if let Some(raw) = values.get(i) {
                            let mut h = base.clone();
                            h.update(raw);
                            let d = h.finalize().into_bytes();
                            let o = &mut out[(i - lo) * HASH_HEX..(i - lo + 1) * HASH_HEX];
                            for (j, b) in d.iter().take(HASH_HEX / 2).enumerate() {
                                o[2 * j] = HEX[(b >> 4) as usize];
                                o[2 * j + 1] = HEX[(b & 15) as usize];
                            }
                        }
                    }
                    out
                })
                .collect();
            Ok(parts.concat())
        })
        .map_err(PyValueError::new_err)?;
    Ok(PyBytes::new(py, &out).unbind())
}

const HEX: &[u8; 16] = b"0123456789abcdef";
const HASH_HEX: usize = 32; // 128 bits of HMAC-SHA256, in hex

const B32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// "sub_" + the first 26 characters of the lowercase base32 of 16 bytes.
pub(crate) fn spell_token(raw: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(b"sub_");
    let mut acc: u64 = 0;
    let mut bits = 0;
    let mut written = 0;
    for &b in raw {
        acc = (acc << 8) | b as u64;
        bits += 8;
        while bits >= 5 && written < 26 {
            bits -= 5;
            out.push(B32[((acc >> bits) & 31) as usize]);
            written += 1;
        }
    }
    if written < 26 {
        out.push(B32[((acc << (5 - bits)) & 31) as usize]);
    }
}

/// The token spelled from 16 random bytes (the wire format's token).
#[pyfunction]
fn token_from_bytes(raw: &[u8]) -> PyResult<String> {
    if raw.len() != 16 {
        return Err(PyValueError::new_err(format!(
            "a token is spelled from 16 bytes, got {}",
            raw.len()
        )));
    }
    let mut out = Vec::with_capacity(TOKEN_LEN);
    spell_token(raw, &mut out);
    Ok(String::from_utf8(out).expect("base32 is ASCII"))
}

/// Tokens spelled from `raw` (16 bytes each), ascending when `sorted`.
pub(crate) fn make_tokens(raw: &[u8], sorted: bool) -> Vec<[u8; TOKEN_LEN]> {
    let mut tokens: Vec<[u8; TOKEN_LEN]> = raw
        .chunks_exact(16)
        .map(|r| {
            let mut t = Vec::with_capacity(TOKEN_LEN);
            spell_token(r, &mut t);
            t.try_into().expect("a token is 30 bytes")
        })
        .collect();
    if sorted {
        tokens.sort_unstable();
    }
    tokens
}

/// `n` new random tokens (`n * 30` bytes), ascending when `sorted`, from the OS random source.
#[pyfunction]
#[pyo3(signature = (n, sorted=false))]
fn new_tokens(py: Python<'_>, n: usize, sorted: bool) -> PyResult<Py<PyBytes>> {
    let tokens = make_tokens(&random(n * 16)?, sorted);
    Ok(PyBytes::new(py, &tokens.concat()).unbind())
}

/// Wrap 32-byte keys under `kek` (`keys` is `n * 32` bytes; associated data `aad_prefix || names[i]`).
/// `nonces` (`n * 12` bytes) is for known-answer tests only; leave it None.
#[pyfunction]
#[pyo3(signature = (kek, keys, aad_prefix, names, nonces=None))]
fn wrap_keys(
    py: Python<'_>,
    kek: PyBuffer<u8>,
    keys: PyBuffer<u8>,
    aad_prefix: &[u8],
    names: ColArg,
    nonces: Option<PyBuffer<u8>>,
) -> PyResult<Py<PyBytes>> {
    let kek = cipher(slice(&kek)?)?;
    let keys = slice(&keys)?;
    let names = Col::new(&names)?;
    let n = check_keys(keys, &names)?;
    let nonces = match opt_slice(&nonces)? {
        Some(s) if s.len() == n * NONCE => s.to_vec(),
        Some(_) => return Err(PyValueError::new_err("nonces must be 12 bytes per key")),
        None => random(n * NONCE)?,
    };
    let mut out = Vec::with_capacity(n * WRAPPED);
    let mut aad = Vec::new();
    for i in 0..n {
        aad.clear();
        aad.extend_from_slice(aad_prefix);
        aad.extend_from_slice(
            names
                .get(i)
                .ok_or_else(|| PyValueError::new_err(format!("name at position {i} is null")))?,
        );
        seal_into(
            &kek,
            &nonces[i * NONCE..(i + 1) * NONCE],
            &keys[i * KEY..(i + 1) * KEY],
            &aad,
            &mut out,
        );
    }
    Ok(PyBytes::new(py, &out).unbind())
}

/// Unwrap keys wrapped by [`wrap_keys`]/[`new_subjects`]: `n * 32` bytes. Raises ValueError
/// "position i" for the first blob that does not open (Python turns it into DecryptionError).
#[pyfunction]
fn unwrap_keys(
    py: Python<'_>,
    kek: PyBuffer<u8>,
    blobs: ColArg,
    aad_prefix: &[u8],
    names: ColArg,
) -> PyResult<Py<PyBytes>> {
    let kek = cipher(slice(&kek)?)?;
    let blobs = Col::new(&blobs)?;
    let names = Col::new(&names)?;
    if blobs.len != names.len {
        return Err(PyValueError::new_err(format!(
            "{} wrapped keys but {} names",
            blobs.len, names.len
        )));
    }
    let n = blobs.len;
    let res: Result<Vec<Zeroizing<Vec<u8>>>, usize> = py.allow_threads(|| {
        (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                let mut out = Zeroizing::new(Vec::with_capacity((hi - lo) * KEY));
                let mut aad = Vec::new();
                for i in lo..hi {
                    aad.clear();
                    aad.extend_from_slice(aad_prefix);
                    aad.extend_from_slice(names.get(i).ok_or(i)?);
                    let blob = blobs.get(i).ok_or(i)?;
                    if blob.len() != WRAPPED || !open_into(&kek, blob, &aad, &mut out) {
                        return Err(i);
                    }
                }
                Ok(out)
            })
            .collect()
    });
    match res {
        Ok(parts) => {
            let mut flat = Zeroizing::new(Vec::with_capacity(n * KEY));
            for p in &parts {
                flat.extend_from_slice(p);
            }
            Ok(PyBytes::new(py, &flat).unbind())
        }
        Err(i) => Err(PyValueError::new_err(format!(
            "wrapped key at position {i} does not unwrap"
        ))),
    }
}

/// The cipher of row `i`'s subject (key `key_index[i]`) and, for each prefix, the associated data
/// `prefix || tokens[key_index[i]]`: built again only when the subject changes from one row to the
/// next (runs of one subject's rows share them).
struct RowCipher<'a> {
    keys: &'a [u8],
    idx: &'a [i32],
    tokens: Col<'a>,
    prefixes: &'a [&'a [u8]],
    current: Option<(i32, Aes256Gcm)>,
    aads: Vec<Vec<u8>>,
}

impl<'a> RowCipher<'a> {
    fn new(keys: &'a [u8], idx: &'a [i32], tokens: Col<'a>, prefixes: &'a [&'a [u8]]) -> Self {
        RowCipher { keys, idx, tokens, prefixes, current: None, aads: prefixes.iter().map(|p| p.to_vec()).collect() }
    }

    fn at(&mut self, i: usize) -> Result<(&Aes256Gcm, &[Vec<u8>]), String> {
        let j = self.idx[i];
        if j < 0 || j as usize >= self.tokens.len {
            return Err(format!("value at position {i} has no subject key"));
        }
        if self.current.as_ref().map(|c| c.0) != Some(j) {
            let ju = j as usize;
            let token = self.tokens.get(ju).ok_or_else(|| format!("token {ju} is null"))?;
            self.current = Some((j, Aes256Gcm::new(GenericArray::from_slice(&self.keys[ju * KEY..(ju + 1) * KEY]))));
            for (aad, prefix) in self.aads.iter_mut().zip(self.prefixes) {
                aad.clear();
                aad.extend_from_slice(prefix);
                aad.extend_from_slice(token);
            }
        }
        Ok((&self.current.as_ref().expect("set above").1, &self.aads))
    }
}

/// Row by row over a column, in parallel chunks: `f(cipher, aad, value, row, out)` appends row
/// `i`'s output to `out`, under the cipher of subject `key_index[i]` (built once per run of rows
/// with the same subject) and associated data `aad_prefix || tokens[key_index[i]]`. Null stays null.
fn map_column<F>(
    keys: &[u8],
    idx: &[i32],
    tokens: &Col,
    aad_prefix: &[u8],
    values: &Col,
    f: F,
) -> Result<Vec<(Vec<Option<usize>>, Vec<u8>)>, String>
where
    F: Fn(&Aes256Gcm, &[u8], &[u8], usize, &mut Vec<u8>) -> Result<(), String> + Sync,
{
    let n = values.len;
    let prefixes = [aad_prefix];
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let mut lens = Vec::with_capacity(hi - lo);
            let mut out = Vec::new();
            let mut rows = RowCipher::new(keys, idx, *tokens, &prefixes);
            for i in lo..hi {
                let Some(v) = values.get(i) else {
                    lens.push(None);
                    continue;
                };
                let (cipher, aads) = rows.at(i)?;
                let before = out.len();
                f(cipher, &aads[0], v, i, &mut out)?;
                lens.push(Some(out.len() - before));
            }
            Ok((lens, out))
        })
        .collect()
}

/// Seal a column: row `i`'s value under key `key_index[i]` of `keys` (`k * 32` bytes), associated
/// data `aad_prefix || tokens[key_index[i]]`, as `0x01 || nonce || ct || tag`. Null stays null.
/// `nonces` (`n * 12` bytes, one per row) is for known-answer tests only; leave it None.
#[pyfunction]
#[pyo3(signature = (keys, key_index, tokens, aad_prefix, values, nonces=None))]
fn seal_column(
    py: Python<'_>,
    keys: PyBuffer<u8>,
    key_index: PyBuffer<u8>,
    tokens: ColArg,
    aad_prefix: &[u8],
    values: ColArg,
    nonces: Option<PyBuffer<u8>>,
) -> PyResult<PyCol> {
    let nonces = nonces.map(|b| vec![b]);
    let mut out = seal_columns(py, keys, key_index, tokens, vec![aad_prefix.to_vec()], vec![values], nonces)?;
    Ok(out.pop().expect("one column in, one out"))
}

/// [`seal_column`] of several columns of the same rows at once (column `c` with associated data
/// `aad_prefixes[c] || token`): each run of rows of one subject builds its cipher once for all the
/// columns, and each column is written straight into one buffer of its final size (a sealed value
/// is its plaintext plus a fixed overhead, so every offset is known before anything is sealed).
/// `nonces`: one `n * 12`-byte buffer per column, for known-answer tests only.
#[pyfunction]
#[pyo3(signature = (keys, key_index, tokens, aad_prefixes, columns, nonces=None))]
fn seal_columns(
    py: Python<'_>,
    keys: PyBuffer<u8>,
    key_index: PyBuffer<u8>,
    tokens: ColArg,
    aad_prefixes: Vec<Vec<u8>>,
    columns: Vec<ColArg>,
    nonces: Option<Vec<PyBuffer<u8>>>,
) -> PyResult<Vec<PyCol>> {
    let keys = slice(&keys)?;
    let tokens = Col::new(&tokens)?;
    check_keys(keys, &tokens)?;
    if aad_prefixes.len() != columns.len() {
        return Err(PyValueError::new_err(format!(
            "{} columns but {} associated-data prefixes",
            columns.len(),
            aad_prefixes.len()
        )));
    }
    let cols = columns.iter().map(Col::new).collect::<PyResult<Vec<_>>>()?;
    let n = cols.first().map(|c| c.len).unwrap_or(0);
    if cols.iter().any(|c| c.len != n) {
        return Err(PyValueError::new_err("the columns to seal differ in length"));
    }
    let idx = read_index(slice(&key_index)?, n)?;
    let nonces = match &nonces {
        Some(bufs) => {
            let s = bufs.iter().map(slice).collect::<PyResult<Vec<_>>>()?;
            if s.len() != cols.len() || s.iter().any(|b| b.len() != n * NONCE) {
                return Err(PyValueError::new_err("nonces must be 12 bytes per row, one buffer per column"));
            }
            Some(s)
        }
        None => None,
    };
    let prefixes: Vec<&[u8]> = aad_prefixes.iter().map(|p| p.as_slice()).collect();
    let outs = py
        .allow_threads(|| seal_many(keys, &idx, &tokens, &prefixes, &cols, nonces.as_deref()))
        .map_err(PyValueError::new_err)?;
    Ok(outs.into_iter().map(|o| o.into_py(py)).collect())
}

fn seal_many(
    keys: &[u8],
    idx: &[i32],
    tokens: &Col,
    prefixes: &[&[u8]],
    cols: &[Col],
    nonces: Option<&[&[u8]]>,
) -> Result<Vec<OutCol>, String> {
    let n = idx.len().min(cols.first().map(|c| c.len).unwrap_or(0));
    let m = cols.len();
    // Offsets and validity first: each value's sealed length is its length plus the overhead.
    let mut outs = Vec::with_capacity(m);
    for col in cols {
        let mut offsets = Vec::with_capacity((n + 1) * 4);
        let mut valid = vec![0u8; n.div_ceil(8)];
        let (mut pos, mut nulls) = (0usize, 0usize);
        offsets.extend_from_slice(&0i32.to_le_bytes());
        for i in 0..n {
            match col.get(i) {
                Some(v) => {
                    pos += v.len() + SEAL_OVERHEAD;
                    valid[i >> 3] |= 1 << (i & 7);
                }
                None => nulls += 1,
            }
            if pos > i32::MAX as usize {
                return Err("column too large for 32-bit offsets; use smaller batches".into());
            }
            offsets.extend_from_slice(&(pos as i32).to_le_bytes());
        }
        outs.push(OutCol { offsets, data: vec![0u8; pos], validity: (nulls > 0).then_some(valid), nulls });
    }
    // Each chunk of rows gets its own slice of every column's buffer.
    let chunks = n.div_ceil(CHUNK);
    let mut parts: Vec<Vec<&mut [u8]>> = (0..chunks).map(|_| Vec::with_capacity(m)).collect();
    for out in outs.iter_mut() {
        let OutCol { offsets, data, .. } = out;
        let at = |i: usize| i32::from_le_bytes(offsets[i * 4..i * 4 + 4].try_into().expect("4 bytes")) as usize;
        let mut rest: &mut [u8] = data.as_mut_slice();
        for (c, part) in parts.iter_mut().enumerate() {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(at(hi) - at(lo));
            part.push(head);
            rest = tail;
        }
    }
    parts
        .into_par_iter()
        .enumerate()
        .try_for_each(|(c, mut bufs)| -> Result<(), String> {
            let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
            let fresh = match nonces {
                Some(_) => Vec::new(),
                None => os_random((hi - lo) * m * NONCE)?,
            };
            let mut pos = vec![0usize; m];
            let mut rows = RowCipher::new(keys, idx, *tokens, prefixes);
            for i in lo..hi {
                if !cols.iter().any(|col| col.is_valid(i)) {
                    continue;
                }
                let (cipher, aads) = rows.at(i)?;
                for (ci, col) in cols.iter().enumerate() {
                    let Some(v) = col.get(i) else { continue };
                    let nonce = match nonces {
                        Some(ns) => &ns[ci][i * NONCE..(i + 1) * NONCE],
                        None => {
                            let r = ((i - lo) * m + ci) * NONCE;
                            &fresh[r..r + NONCE]
                        }
                    };
                    let len = v.len() + SEAL_OVERHEAD;
                    let out = &mut bufs[ci][pos[ci]..pos[ci] + len];
                    pos[ci] += len;
                    out[0] = VERSION;
                    out[1..1 + NONCE].copy_from_slice(nonce);
                    let (ct, tag_out) = out[1 + NONCE..].split_at_mut(v.len());
                    ct.copy_from_slice(v);
                    let tag = cipher
                        .encrypt_in_place_detached(GenericArray::from_slice(nonce), &aads[ci], ct)
                        .map_err(|_| format!("AES-GCM encryption failed at position {i}"))?;
                    tag_out.copy_from_slice(&tag);
                }
            }
            Ok(())
        })?;
    Ok(outs)
}

/// Open a column sealed by [`seal_column`] (same keys, index, tokens and prefix). Null stays null.
/// Raises ValueError "position i" for the first value that does not open.
#[pyfunction]
fn open_column(
    py: Python<'_>,
    keys: PyBuffer<u8>,
    key_index: PyBuffer<u8>,
    tokens: ColArg,
    aad_prefix: &[u8],
    blobs: ColArg,
) -> PyResult<PyCol> {
    let keys = slice(&keys)?;
    let tokens = Col::new(&tokens)?;
    check_keys(keys, &tokens)?;
    let blobs = Col::new(&blobs)?;
    let n = blobs.len;
    let idx = read_index(slice(&key_index)?, n)?;
    let parts = py
        .allow_threads(|| {
            map_column(keys, &idx, &tokens, aad_prefix, &blobs, |c, aad, b, i, out| {
                if b.len() < SEAL_OVERHEAD || b[0] != VERSION {
                    return Err(format!("ciphertext at position {i} is invalid (too short or unknown format version)"));
                }
                if !open_into(c, &b[1..], aad, out) {
                    return Err(format!("ciphertext at position {i} failed authentication"));
                }
                Ok(())
            })
        })
        .map_err(PyValueError::new_err)?;
    Ok(OutCol::from_parts(parts, n)?.into_py(py))
}

/// SHA-256 over a batch's content, fed the same bytes as `lakehouse.ingest`'s Python hashing.
#[pyclass]
struct Hasher(Sha256);

#[pymethods]
impl Hasher {
    #[new]
    fn new() -> Self {
        Hasher(Sha256::new())
    }

    fn update(&mut self, py: Python<'_>, data: PyBuffer<u8>) -> PyResult<()> {
        let s = slice(&data)?;
        let h = &mut self.0;
        py.allow_threads(|| h.update(s));
        Ok(())
    }

    /// A binary column's value lengths (i32 LE), its bytes, and, when it has nulls, their
    /// positions (i64 LE): what `_hash_binary` feeds.
    fn update_binary(&mut self, py: Python<'_>, col: ColArg, null_count: usize) -> PyResult<()> {
        let col = Col::new(&col)?;
        let h = &mut self.0;
        py.allow_threads(|| {
            let n = col.len;
            if n == 0 {
                return;
            }
            let mut lens = Vec::with_capacity(n * 4);
            for i in 0..n {
                lens.extend_from_slice(
                    &((col.off(i + 1) as i32 - col.off(i) as i32).to_le_bytes()),
                );
            }
            h.update(&lens);
            h.update(&col.data[col.off(0)..col.off(n)]);
            if null_count > 0 {
                let mut pos = Vec::new();
                for i in 0..n {
                    if !col.is_valid(i) {
                        pos.extend_from_slice(&(i as i64).to_le_bytes());
                    }
                }
                h.update(&pos);
            }
        });
        Ok(())
    }

    fn hexdigest(&self) -> String {
        self.0
            .clone()
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// What this build asks of the CPU: `BUILT_FOR`, and the same kept in the file as
/// `lakewarden-native-built-for:<what>;` so that `governance/keys/native.py` can read it before it
/// loads the module: a build with `native/.cargo/config.toml`'s flags (x86-64-v3 with AES-NI and
/// PCLMULQDQ) would stop a process on a CPU without them, a portable build (`RUSTFLAGS=`) would not.
macro_rules! built_for {
    ($what:literal) => {
        const BUILT_FOR: &str = $what;
        #[used]
        static BUILT_FOR_MARK: &str = concat!("lakewarden-native-built-for:", $what, ";");
    };
}
#[cfg(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "bmi2", target_feature = "aes",
          target_feature = "pclmulqdq"))]
built_for!("x86-64-v3+aes+pclmulqdq");
#[cfg(not(all(target_arch = "x86_64", target_feature = "avx2", target_feature = "bmi2", target_feature = "aes",
              target_feature = "pclmulqdq")))]
built_for!("portable");

#[pymodule]
fn lakewarden_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("FORMAT_VERSION", VERSION)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("BUILT_FOR", BUILT_FOR)?;
    m.add_class::<OwnedBuf>()?;
    m.add_function(wrap_pyfunction!(blind_indexes, m)?)?;
    m.add_function(wrap_pyfunction!(keyed_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(token_from_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(new_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(wrap_keys, m)?)?;
    m.add_function(wrap_pyfunction!(unwrap_keys, m)?)?;
    m.add_function(wrap_pyfunction!(seal_column, m)?)?;
    m.add_function(wrap_pyfunction!(seal_columns, m)?)?;
    m.add_function(wrap_pyfunction!(open_column, m)?)?;
    m.add_function(wrap_pyfunction!(records::json_records, m)?)?;
    m.add_class::<Hasher>()?;
    keystore::register(m)?;
    sets::register(m)?;
    validate::register(m)?;
    Ok(())
}
