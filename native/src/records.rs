//! Stream messages (JSON objects, or Lakewarden's sealed envelopes) into Arrow text columns: the
//! per-record work of `lakehouse.stream`'s decoder, on a whole batch at once.
//!
//! The Python decoder stays the reference. This module decodes the messages whose outcome is
//! certain and hands every other one back (kind [`PYTHON`]): not JSON, not an object, a nested or
//! unexpected field, a duplicate key, a key that is not ASCII, an envelope that is not well formed,
//! a tombstone or an oversized message. The Python decoder then decides those with the exact reason
//! it always gives, so the two paths cannot disagree on what is quarantined and why.
//!
//! Values become the text Python's `str()` gives the value `json.loads` returns: strings as they
//! are, `true`/`false`, integers without a sign on zero, and floats in Python's `repr` form (the
//! shortest digits that round-trip, an exponent below 1e-4 and from 1e16). JSON parsing is
//! serde_json's; base64 is the `base64` crate's strict standard alphabet.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;

use base64::Engine;
use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::{Col, ColArg, OutCol, PyCol, CHUNK, PY_WHITESPACE};

/// A flat record: every field became a column value.
const RECORD: u8 = 0;
/// A well-formed sealed envelope: its subject token and sealed blob are in the outputs.
const ENVELOPE: u8 = 1;
/// The Python decoder decides this message.
const PYTHON: u8 = 2;

/// Python's `int()` refuses to read more digits than this (`sys.int_info.default_max_str_digits`).
const PY_MAX_INT_DIGITS: usize = 4300;

/// An object key, borrowed from the message unless it had escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A top-level JSON object's fields in document order, values unparsed.
struct Fields<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Fields<'de>, A::Error> {
                let mut out = Vec::with_capacity(m.size_hint().unwrap_or(16));
                while let Some(k) = m.next_key::<Key<'de>>()? {
                    let v: &'de RawValue = m.next_value()?;
                    out.push((k.0, v));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON string literal's value (None: not a string).
fn json_str(raw: &str) -> Option<Cow<'_, str>> {
    let b = raw.as_bytes();
    if b.first() != Some(&b'"') {
        return None;
    }
    if !raw.contains('\\') {
        // serde_json has already checked the literal: valid UTF-8, no control characters.
        return Some(Cow::Borrowed(&raw[1..raw.len() - 1]));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// Python's `repr(float)`: the shortest digits that round-trip, in fixed notation for
/// 1e-4 <= |x| < 1e16 (with `.0` when integral) and `d.ddde±XX` otherwise.
pub(crate) fn py_float_repr(x: f64, out: &mut Vec<u8>) {
    if x.is_nan() {
        out.extend_from_slice(b"nan");
        return;
    }
    if x.is_infinite() {
        out.extend_from_slice(if x > 0.0 { b"inf" } else { b"-inf" });
        return;
    }
    // The fewest digits that round-trip, e.g. "-1.234e-5", "0e0". When two such strings are as
    // near, Python takes the one rounded half to even; the exactly rounded string of that length
    // is it (kept only if it round-trips, as the nearest one does).
    let shortest = format!("{x:e}");
    let ndigits = shortest.split('e').next().map_or(1, |m| m.bytes().filter(u8::is_ascii_digit).count());
    let nearest = format!("{:.*e}", ndigits.saturating_sub(1), x);
    let s = if nearest.parse::<f64>() == Ok(x) { nearest } else { shortest };
    let (mant, exp) = s.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: Vec<u8> = mant.bytes().filter(|c| *c != b'.').collect();
    if neg {
        out.push(b'-');
    }
    if !(-4..16).contains(&exp) {
        out.push(digits[0]);
        if digits.len() > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if exp < 0 { b'-' } else { b'+' });
        let a = exp.unsigned_abs();
        if a < 10 {
            out.push(b'0');
        }
        out.extend_from_slice(a.to_string().as_bytes());
    } else if exp >= 0 {
        let whole = exp as usize + 1;
        if digits.len() > whole {
            out.extend_from_slice(&digits[..whole]);
            out.push(b'.');
            out.extend_from_slice(&digits[whole..]);
        } else {
            out.extend_from_slice(&digits);
            out.resize(out.len() + whole - digits.len(), b'0');
            out.extend_from_slice(b".0");
        }
    } else {
        out.extend_from_slice(b"0.");
        out.resize(out.len() + (-exp - 1) as usize, b'0');
        out.extend_from_slice(&digits);
    }
}

/// A field's value as the text the Python decoder gives it; Err(()) when Python must decide
/// (a nested object or array, an integer Python would refuse).
fn value_text(raw: &str, out: &mut Vec<u8>) -> Result<bool, ()> {
    match raw.as_bytes()[0] {
        b'"' => {
            out.extend_from_slice(json_str(raw).ok_or(())?.as_bytes());
            Ok(true)
        }
        b'n' => Ok(false),
        b't' => {
            out.extend_from_slice(b"true");
            Ok(true)
        }
        b'f' => {
            out.extend_from_slice(b"false");
            Ok(true)
        }
        b'{' | b'[' => Err(()),
        _ => {
            if raw.bytes().any(|c| matches!(c, b'.' | b'e' | b'E')) {
                py_float_repr(raw.parse::<f64>().map_err(|_| ())?, out);
            } else if raw.len() > PY_MAX_INT_DIGITS {
                return Err(());
            } else if raw == "-0" {
                out.push(b'0');
            } else {
                out.extend_from_slice(raw.as_bytes());
            }
            Ok(true)
        }
    }
}

/// What to do with one batch.
struct Spec<'a> {
    /// lower-cased, stripped field name -> column position
    lookup: &'a HashMap<String, usize>,
    ncols: usize,
    drop_unknown: bool,
    /// the envelope's format tag, when envelopes are expected (a topic's messages)
    envelope: Option<&'a str>,
    max_bytes: usize,
}

/// One chunk's output: kinds, each column's (lengths, bytes), the envelopes' tokens and blobs.
struct Part {
    kinds: Vec<u8>,
    cols: Vec<(Vec<Option<usize>>, Vec<u8>)>,
    tokens: (Vec<Option<usize>>, Vec<u8>),
    blobs: (Vec<Option<usize>>, Vec<u8>),
}

impl Part {
    fn new(ncols: usize, n: usize) -> Part {
        Part {
            kinds: Vec::with_capacity(n),
            cols: (0..ncols).map(|_| (Vec::with_capacity(n), Vec::new())).collect(),
            tokens: (Vec::with_capacity(n), Vec::new()),
            blobs: (Vec::with_capacity(n), Vec::new()),
        }
    }

    fn push(&mut self, kind: u8, row: Option<&[Option<(usize, usize)>]>, scratch: &[u8]) {
        self.kinds.push(kind);
        for (j, (lens, bytes)) in self.cols.iter_mut().enumerate() {
            match row.and_then(|r| r[j]) {
                Some((a, b)) => {
                    bytes.extend_from_slice(&scratch[a..b]);
                    lens.push(Some(b - a));
                }
                None => lens.push(None),
            }
        }
        if kind != ENVELOPE {
            self.tokens.0.push(None);
            self.blobs.0.push(None);
        }
    }
}

/// The column position a key names: Some(Some(j)), Some(None) for an unknown field, None when
/// Python must decide (a key that is not ASCII: Python's case folding is Unicode's).
fn column_of(spec: &Spec, key: &str, buf: &mut String) -> Option<Option<usize>> {
    if !key.is_ascii() {
        return None;
    }
    let k = key.trim_matches(PY_WHITESPACE);
    buf.clear();
    buf.push_str(k);
    buf.make_ascii_lowercase();
    Some(spec.lookup.get(buf.as_str()).copied())
}

fn envelope(fields: &Fields, tag: &str, part: &mut Part) -> bool {
    if fields.0.len() != 3 {
        return false;
    }
    let get = |name: &str| {
        let mut it = fields.0.iter().filter(|(k, _)| k == name);
        match (it.next(), it.next()) {
            (Some((_, v)), None) => json_str(v.get()),
            _ => None,
        }
    };
    let (Some(lw), Some(tok), Some(rec)) = (get("lakewarden"), get("subject"), get("record")) else {
        return false;
    };
    if lw != tag {
        return false;
    }
    let before = part.blobs.1.len();
    if base64::engine::general_purpose::STANDARD
        .decode_vec(rec.as_bytes(), &mut part.blobs.1)
        .is_err()
    {
        part.blobs.1.truncate(before);
        return false;
    }
    part.blobs.0.push(Some(part.blobs.1.len() - before));
    part.tokens.1.extend_from_slice(tok.as_bytes());
    part.tokens.0.push(Some(tok.len()));
    true
}

/// Decode one message into `part`.
fn decode_one(
    spec: &Spec,
    msg: Option<&[u8]>,
    part: &mut Part,
    row: &mut [Option<(usize, usize)>],
    assigned: &mut [bool],
    scratch: &mut Vec<u8>,
    keybuf: &mut String,
) {
    let kind = (|| {
        let msg = msg.ok_or(())?;
        if msg.len() > spec.max_bytes {
            return Err(());
        }
        let fields: Fields = serde_json::from_slice(msg).map_err(|_| ())?;
        if let Some(tag) = spec.envelope {
            if fields.0.iter().any(|(k, _)| k == "lakewarden") {
                return if envelope(&fields, tag, part) { Ok(ENVELOPE) } else { Err(()) };
            }
        }
        scratch.clear();
        row.iter_mut().for_each(|r| *r = None);
        assigned.iter_mut().for_each(|a| *a = false);
        for (k, v) in &fields.0 {
            let Some(j) = column_of(spec, k, keybuf).ok_or(())? else {
                if spec.drop_unknown {
                    continue;
                }
                return Err(());
            };
            if assigned[j] {
                return Err(()); // a key twice, in any case: Python's dict order decides
            }
            assigned[j] = true;
            let a = scratch.len();
            if value_text(v.get(), scratch)? {
                row[j] = Some((a, scratch.len()));
            }
        }
        Ok(RECORD)
    })()
    .unwrap_or(PYTHON);
    part.push(kind, if kind == RECORD { Some(row) } else { None }, scratch);
}

/// Decode a column of messages (binary, null = a tombstone).
///
/// `lookup` maps each lower-cased field name to its column (of `ncols`); fields it does not name
/// are dropped with `drop_unknown`, else the message goes to Python. With `envelope` (the format
/// tag), an object with a top-level `lakewarden` key is a sealed envelope. Returns the kind of
/// each message (0 record, 1 envelope, 2 Python decides), the `ncols` text columns (null outside
/// records), and the envelopes' subject tokens and decoded blobs (null outside envelopes).
#[pyfunction]
#[pyo3(signature = (messages, lookup, ncols, drop_unknown, envelope=None, max_bytes=usize::MAX))]
#[allow(clippy::type_complexity)]
pub(crate) fn json_records(
    py: Python<'_>,
    messages: ColArg,
    lookup: HashMap<String, usize>,
    ncols: usize,
    drop_unknown: bool,
    envelope: Option<String>,
    max_bytes: usize,
) -> PyResult<(Py<PyBytes>, Vec<PyCol>, PyCol, PyCol)> {
    if lookup.values().any(|&j| j >= ncols) {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "lookup names a column past ncols",
        ));
    }
    let msgs = Col::new(&messages)?;
    let n = msgs.len;
    let spec = Spec {
        lookup: &lookup,
        ncols,
        drop_unknown,
        envelope: envelope.as_deref(),
        max_bytes,
    };
    let parts: Vec<Part> = py.allow_threads(|| {
        (0..n.div_ceil(CHUNK))
            .into_par_iter()
            .map(|c| {
                let (lo, hi) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
                let mut part = Part::new(spec.ncols, hi - lo);
                let mut row = vec![None; spec.ncols];
                let mut assigned = vec![false; spec.ncols];
                let (mut scratch, mut keybuf) = (Vec::new(), String::new());
                for i in lo..hi {
                    decode_one(&spec, msgs.get(i), &mut part, &mut row, &mut assigned, &mut scratch, &mut keybuf);
                }
                part
            })
            .collect()
    });
    let mut kinds = Vec::with_capacity(n);
    let mut cols: Vec<Vec<(Vec<Option<usize>>, Vec<u8>)>> = (0..ncols).map(|_| Vec::new()).collect();
    let (mut toks, mut blobs) = (Vec::new(), Vec::new());
    for p in parts {
        kinds.extend_from_slice(&p.kinds);
        for (j, c) in p.cols.into_iter().enumerate() {
            cols[j].push(c);
        }
        toks.push(p.tokens);
        blobs.push(p.blobs);
    }
    let mut out_cols = Vec::with_capacity(ncols);
    for c in cols {
        out_cols.push(OutCol::from_parts(c, n)?.into_py(py));
    }
    Ok((
        PyBytes::new(py, &kinds).unbind(),
        out_cols,
        OutCol::from_parts(toks, n)?.into_py(py),
        OutCol::from_parts(blobs, n)?.into_py(py),
    ))
}
