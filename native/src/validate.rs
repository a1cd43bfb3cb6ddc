//! The data contract's per-value rules on text columns, in one pass per column: trim, empty as
//! null, type, length, spreadsheet formula, allowed values, range, and the generalized value of a
//! quasi-identifier. `lakehouse.validate` runs the same rules as a DuckDB query; this is its fast
//! path, and it must give the same answer for every value it decides.
//!
//! So it decides only what it can decide exactly as DuckDB does. A value in a form outside the
//! strict grammars below (an integer written `1e3` or `0x10`, a date `2024/1/5`, a timestamp with
//! seven fractional digits, a boolean in another script...) is *undecided*: the row goes to the
//! DuckDB query, which decides it. Typical files never take that path; odd ones still get DuckDB's
//! answer, only more slowly. Tests compare the two on random and hostile values.
//!
//! Rule codes, in the order the query's `CASE` tries them within a column: 1 missing (required),
//! 2 not a valid type, 3 too long, 4 starts like a formula, 5 does not match the pattern (the
//! named patterns `email`, `phone` and `zip5` here, see `named_pattern`; a pattern of the policy's
//! own is checked by the caller with DuckDB's own regular expressions), 6 not an allowed value,
//! 7 below the minimum, 8 above it.

use pyo3::prelude::*;
use pyo3::types::PyBytes;
use rayon::prelude::*;

use crate::{Col, ColArg, OutCol, PyCol};

const STRING: u8 = 0;
const INT: u8 = 1;
const DOUBLE: u8 = 2;
const BOOL: u8 = 3;
const DATE: u8 = 4;
const TIMESTAMP: u8 = 5;

const GEN_NONE: u8 = 0;
const GEN_YEAR: u8 = 1;
const GEN_MONTH: u8 = 2;
const GEN_PREFIX: u8 = 3;
const GEN_BUCKET: u8 = 4;

/// One column's rules, as `lakehouse.validate` sends them.
#[derive(FromPyObject)]
pub(crate) struct Spec {
    kind: u8,
    required: bool,
    max_length: Option<usize>,
    formula: bool,
    allowed: Option<Vec<Vec<u8>>>,
    lo: Option<f64>,   // int and double bounds
    hi: Option<f64>,
    lo_i: Option<i64>, // date (days) and timestamp (µs) bounds; "today" is resolved by the caller
    hi_i: Option<i64>,
    generalize: u8,
    param: f64, // prefix length or bucket width
    pattern: u8, // a named pattern (`EMAIL`, `PHONE`, `ZIP5`), or 0: none, or one the caller checks
}

/// What DuckDB's `trim` removes: the Unicode space separators (category Zs), nothing else (not
/// tab, not newline). Returns the width of the separator `b` starts with, or 0.
#[inline]
fn space_at_start(b: &[u8]) -> usize {
    match b {
        [b' ', ..] => 1,
        [0xC2, 0xA0, ..] => 2,                                   // U+00A0
        [0xE1, 0x9A, 0x80, ..] => 3,                             // U+1680
        [0xE2, 0x80, 0x80..=0x8A, ..] | [0xE2, 0x80, 0xAF, ..] => 3, // U+2000..200A, U+202F
        [0xE2, 0x81, 0x9F, ..] | [0xE3, 0x80, 0x80, ..] => 3,   // U+205F, U+3000
        _ => 0,
    }
}

#[inline]
fn space_at_end(b: &[u8]) -> usize {
    match b {
        [.., b' '] => 1,
        [.., 0xC2, 0xA0] => 2,
        [.., 0xE1, 0x9A, 0x80] => 3,
        [.., 0xE2, 0x80, 0x80..=0x8A] | [.., 0xE2, 0x80, 0xAF] => 3,
        [.., 0xE2, 0x81, 0x9F] | [.., 0xE3, 0x80, 0x80] => 3,
        _ => 0,
    }
}

/// `NULLIF(trim(v), '')`.
#[inline]
pub(crate) fn trim(mut b: &[u8]) -> Option<&[u8]> {
    loop {
        let k = space_at_start(b);
        if k == 0 {
            break;
        }
        b = &b[k..];
    }
    loop {
        let k = space_at_end(b);
        if k == 0 {
            break;
        }
        b = &b[..b.len() - k];
    }
    (!b.is_empty()).then_some(b)
}

fn digits(b: &[u8]) -> Option<i64> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
}

/// `[+-]?[0-9]{1,18}`: no overflow possible, and DuckDB reads it the same way.
fn parse_int(b: &[u8]) -> Option<i64> {
    let (neg, d) = match b.first()? {
        b'-' => (true, &b[1..]),
        b'+' => (false, &b[1..]),
        _ => (false, b),
    };
    if d.len() > 18 {
        return None;
    }
    digits(d).map(|v| if neg { -v } else { v })
}

/// `[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)`: both sides round the decimal correctly to the nearest
/// double, so they agree on every such value.
fn parse_double(b: &[u8]) -> Option<f64> {
    let d = match b.first()? {
        b'-' | b'+' => &b[1..],
        _ => b,
    };
    let mut seen_digit = false;
    let mut seen_dot = false;
    for &c in d {
        match c {
            b'0'..=b'9' => seen_digit = true,
            b'.' if !seen_dot => seen_dot = true,
            _ => return None,
        }
    }
    if !seen_digit {
        return None;
    }
    std::str::from_utf8(b).ok()?.parse::<f64>().ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

fn leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

/// `YYYY-MM-DD` (years 0001 to 9999), a real calendar day.
fn parse_date(b: &[u8]) -> Option<i64> {
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, m, d) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let dim = [31, if leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if y < 1 || !(1..=12).contains(&m) || d < 1 || d > dim[(m - 1) as usize] {
        return None;
    }
    Some(days_from_civil(y, m, d))
}

/// `YYYY-MM-DD[T ]HH:MM:SS[.f{1,6}][Z|+HH:MM|-HH:MM]` in µs since the epoch, UTC (a time
/// without an offset is UTC: the validator's session time zone).
fn parse_timestamp(b: &[u8]) -> Option<i64> {
    if b.len() < 19 || !(b[10] == b'T' || b[10] == b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let day = parse_date(&b[..10])?;
    let (h, mi, s) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if h > 23 || mi > 59 || s > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut micros = 0i64;
    if let [b'.', tail @ ..] = rest {
        let n = tail.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 6 {
            return None;
        }
        micros = digits(&tail[..n])? * 10i64.pow(6 - n as u32);
        rest = &tail[n..];
    }
    let offset = match rest {
        [] | [b'Z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (oh, om) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = (oh * 60 + om) * 60;
            if *sign == b'-' { -o } else { o }
        }
        _ => return None,
    };
    Some((day * 86_400 + h * 3600 + mi * 60 + s - offset) * 1_000_000 + micros)
}

/// Characters in `b` (valid UTF-8), or None when it is not valid UTF-8.
fn chars(b: &[u8]) -> Option<usize> {
    if b.is_ascii() {
        return Some(b.len());
    }
    std::str::from_utf8(b).ok().map(|s| s.chars().count())
}

/// The check `^[=@\t\r]|^[+-][^0-9 .(]` on a value's first characters.
fn formula(b: &[u8]) -> bool {
    match b {
        [b'=' | b'@' | b'\t' | b'\r', ..] => true,
        [b'+' | b'-', c, ..] => !matches!(c, b'0'..=b'9' | b' ' | b'.' | b'('),
        _ => false,
    }
}

const EMAIL: u8 = 1;
const PHONE: u8 = 2;
const ZIP5: u8 = 3;

/// Whether a (trimmed) value fully matches a named pattern of `governance.policy.NAMED_PATTERNS`,
/// decided as RE2 (DuckDB's `regexp_full_match`) decides it. Each pattern is a few ASCII classes,
/// so its language is spelled out below; a byte outside them (any non-ASCII character, a newline)
/// fails, as it fails the class in RE2. Tests compare both on random and hostile values.
fn named_pattern(pattern: u8, v: &[u8]) -> bool {
    let digit = |c: &u8| c.is_ascii_digit();
    match pattern {
        // ^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}$: neither class holds
        // '@', so there is exactly one; '.' is outside the domain's class, so the domain is labels
        // split by '.': two or more, none empty, the last two or more letters.
        EMAIL => {
            let Some(at) = v.iter().position(|&c| c == b'@') else { return false };
            let (local, domain) = (&v[..at], &v[at + 1..]);
            let local_ok = !local.is_empty()
                && local.iter().all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-'));
            let mut labels = domain.split(|&c| c == b'.');
            let Some(last) = labels.next_back() else { return false };
            let mut before = 0usize;
            for label in labels {
                if label.is_empty() || !label.iter().all(|&c| c.is_ascii_alphanumeric() || c == b'-') {
                    return false;
                }
                before += 1;
            }
            local_ok && before >= 1 && last.len() >= 2 && last.iter().all(u8::is_ascii_alphabetic)
        }
        // ^\+?[0-9][0-9 ().-]{6,24}[0-9]$: '+' is not a digit, so a leading '+' is the optional one.
        PHONE => {
            let v = v.strip_prefix(b"+").unwrap_or(v);
            (8..=26).contains(&v.len())
                && digit(&v[0])
                && digit(&v[v.len() - 1])
                && v[1..v.len() - 1].iter().all(|&c| c.is_ascii_digit() || matches!(c, b' ' | b'(' | b')' | b'.' | b'-'))
        }
        // ^[0-9]{5}$
        ZIP5 => v.len() == 5 && v.iter().all(digit),
        _ => true,
    }
}

const TRUE: [&[u8]; 5] = [b"true", b"t", b"yes", b"y", b"1"];
const FALSE: [&[u8]; 5] = [b"false", b"f", b"no", b"n", b"0"];

/// One column's result: rule codes, undecided rows, the typed value, the generalized value.
struct ColResult {
    codes: Vec<u8>,
    undecided: Vec<bool>,
    typed: Typed,
    general: Option<Typed>,
}

enum Typed {
    Text(Vec<Option<usize>>, Vec<u8>),
    Fixed(Vec<u8>, Vec<bool>, usize), // little-endian values, validity, width
}

impl Typed {
    fn fixed(width: usize, n: usize) -> Typed {
        Typed::Fixed(Vec::with_capacity(n * width), Vec::with_capacity(n), width)
    }
    fn push_fixed(&mut self, v: Option<&[u8]>) {
        if let Typed::Fixed(data, valid, w) = self {
            match v {
                Some(b) => data.extend_from_slice(b),
                None => data.extend(std::iter::repeat(0).take(*w)),
            }
            valid.push(v.is_some());
        }
    }
    fn push_null(&mut self) {
        match self {
            Typed::Text(..) => self.push_text(None),
            Typed::Fixed(..) => self.push_fixed(None),
        }
    }
    fn push_text(&mut self, v: Option<&[u8]>) {
        if let Typed::Text(lens, data) = self {
            lens.push(v.map(|b| {
                data.extend_from_slice(b);
                b.len()
            }));
        }
    }
}

macro_rules! fail {
    ($code:ident, $c:expr) => {
        if $code == 0 {
            $code = $c;
        }
    };
}

fn check_column(col: &Col, s: &Spec) -> ColResult {
    let n = col.len;
    let mut codes = vec![0u8; n];
    let mut undecided = vec![false; n];
    let mut typed = match s.kind {
        STRING => Typed::Text(Vec::with_capacity(n), Vec::with_capacity(col.data.len())),
        BOOL => Typed::fixed(1, n),
        DATE => Typed::fixed(4, n),
        _ => Typed::fixed(8, n),
    };
    let mut general = match s.generalize {
        GEN_NONE => None,
        GEN_YEAR => Some(Typed::fixed(4, n)),
        GEN_BUCKET => Some(Typed::fixed(8, n)),
        _ => Some(Typed::Text(Vec::with_capacity(n), Vec::new())),
    };
    for i in 0..n {
        let v = col.get(i).and_then(trim);
        let mut code = 0u8;
        let Some(v) = v else {
            if s.required {
                fail!(code, 1);
            }
            typed.push_null();
            if let Some(g) = &mut general {
                g.push_null();
            }
            codes[i] = code;
            continue;
        };
        // The typed value; a form outside the grammar leaves the row to DuckDB.
        let mut num: Option<f64> = None; // int and double, for bounds and buckets
        let mut at: Option<i64> = None; // date (days) and timestamp (µs), for bounds and years
        let ok = match s.kind {
            STRING => {
                if let Some(max) = s.max_length {
                    if v.len() > max {
                        match chars(v) {
                            Some(c) if c > max => fail!(code, 3),
                            Some(_) => {}
                            None => undecided[i] = true,
                        }
                    }
                }
                if s.formula && formula(v) {
                    fail!(code, 4);
                }
                if s.pattern != 0 && !named_pattern(s.pattern, v) {
                    fail!(code, 5);
                }
                if let Some(allowed) = &s.allowed {
                    if !allowed.iter().any(|a| a.as_slice() == v) {
                        fail!(code, 6);
                    }
                }
                typed.push_text(Some(v));
                true
            }
            INT => parse_int(v)
                .map(|x| {
                    typed.push_fixed(Some(&x.to_le_bytes()));
                    num = Some(x as f64);
                })
                .is_some(),
            DOUBLE => parse_double(v)
                .map(|x| {
                    typed.push_fixed(Some(&x.to_le_bytes()));
                    num = Some(x);
                })
                .is_some(),
            BOOL => {
                if !v.is_ascii() {
                    false
                } else {
                    let low = v.to_ascii_lowercase();
                    let b = if TRUE.contains(&low.as_slice()) {
                        Some(1u8)
                    } else if FALSE.contains(&low.as_slice()) {
                        Some(0u8)
                    } else {
                        None
                    };
                    if b.is_none() {
                        fail!(code, 2); // any other ASCII text is no boolean, for DuckDB too
                    }
                    typed.push_fixed(b.as_ref().map(std::slice::from_ref));
                    true
                }
            }
            DATE => parse_date(v)
                .map(|d| {
                    typed.push_fixed(Some(&(d as i32).to_le_bytes()));
                    at = Some(d);
                })
                .is_some(),
            TIMESTAMP => parse_timestamp(v)
                .map(|t| {
                    typed.push_fixed(Some(&t.to_le_bytes()));
                    at = Some(t);
                })
                .is_some(),
            _ => false,
        };
        if !ok {
            undecided[i] = true;
            typed.push_null();
            if let Some(g) = &mut general {
                g.push_null();
            }
            continue;
        }
        if let Some(x) = num {
            if s.lo.is_some_and(|b| x < b) {
                fail!(code, 7);
            } else if s.hi.is_some_and(|b| x > b) {
                fail!(code, 8);
            }
        }
        if let Some(t) = at {
            if s.lo_i.is_some_and(|b| t < b) {
                fail!(code, 7);
            } else if s.hi_i.is_some_and(|b| t > b) {
                fail!(code, 8);
            }
        }
        codes[i] = code;
        if let Some(g) = &mut general {
            let days = at.map(|t| if s.kind == DATE { t } else { t.div_euclid(86_400_000_000) });
            match s.generalize {
                GEN_YEAR => g.push_fixed(days.map(|d| (civil_from_days(d).0 as i32).to_le_bytes()).as_ref().map(|b| &b[..])),
                GEN_MONTH => {
                    let text = days.map(|d| {
                        let (y, m) = civil_from_days(d);
                        format!("{y:04}-{m:02}").into_bytes()
                    });
                    g.push_text(text.as_deref());
                }
                GEN_PREFIX => {
                    let k = s.param as usize;
                    let cut = match std::str::from_utf8(v) {
                        Ok(t) => t.char_indices().nth(k).map_or(v.len(), |(p, _)| p),
                        Err(_) => {
                            undecided[i] = true;
                            v.len()
                        }
                    };
                    g.push_text(Some(&v[..cut]));
                }
                _ => g.push_fixed(num.map(|x| ((x / s.param).floor() * s.param).to_le_bytes()).as_ref().map(|b| &b[..])),
            }
        }
    }
    ColResult { codes, undecided, typed, general }
}

type Fixed = (Py<PyBytes>, Option<Py<PyBytes>>, usize);

fn fixed_into_py(py: Python<'_>, data: Vec<u8>, valid: Vec<bool>) -> Fixed {
    let nulls = valid.iter().filter(|v| !**v).count();
    let bits = (nulls > 0).then(|| {
        let mut b = vec![0u8; valid.len().div_ceil(8)];
        for (i, v) in valid.iter().enumerate() {
            if *v {
                b[i >> 3] |= 1 << (i & 7);
            }
        }
        PyBytes::new(py, &b).unbind()
    });
    (PyBytes::new(py, &data).unbind(), bits, nulls)
}

fn typed_into_py(py: Python<'_>, t: Typed, n: usize) -> PyResult<PyObject> {
    Ok(match t {
        Typed::Text(lens, data) => OutCol::from_parts(vec![(lens, data)], n)?.into_py(py).into_pyobject(py)?.into_any().unbind(),
        Typed::Fixed(data, valid, _) => fixed_into_py(py, data, valid).into_pyobject(py)?.into_any().unbind(),
    })
}

/// Check text columns against their specs. Returns the undecided rows (one byte each) and, per
/// column, its rule codes (one byte per row), its typed value (text: offsets, data, validity, null
/// count; else values, validity, null count) and its generalized value (or None).
#[pyfunction]
pub(crate) fn check_text(
    py: Python<'_>,
    columns: Vec<ColArg>,
    specs: Vec<Spec>,
) -> PyResult<(Py<PyBytes>, Vec<(Py<PyBytes>, PyObject, Option<PyObject>)>)> {
    if columns.len() != specs.len() {
        return Err(pyo3::exceptions::PyValueError::new_err("one spec per column"));
    }
    let cols = columns.iter().map(Col::new).collect::<PyResult<Vec<_>>>()?;
    let n = cols.first().map_or(0, |c| c.len);
    if cols.iter().any(|c| c.len != n) {
        return Err(pyo3::exceptions::PyValueError::new_err("columns differ in length"));
    }
    let results: Vec<ColResult> = py.allow_threads(|| {
        cols.par_iter().zip(specs.par_iter()).map(|(c, s)| check_column(c, s)).collect()
    });
    let mut undecided = vec![0u8; n];
    let mut out = Vec::with_capacity(results.len());
    for r in results {
        for (u, x) in undecided.iter_mut().zip(&r.undecided) {
            *u |= u8::from(*x);
        }
        let typed = typed_into_py(py, r.typed, n)?;
        let general = r.general.map(|g| typed_into_py(py, g, n)).transpose()?;
        out.push((PyBytes::new(py, &r.codes).unbind(), typed, general));
    }
    Ok((PyBytes::new(py, &undecided).unbind(), out))
}

/// `NULLIF(trim(v), '')` of a text column.
#[pyfunction]
pub(crate) fn trim_text(py: Python<'_>, values: ColArg) -> PyResult<PyCol> {
    let col = Col::new(&values)?;
    let mut lens = Vec::with_capacity(col.len);
    let mut data = Vec::new();
    for i in 0..col.len {
        lens.push(col.get(i).and_then(trim).map(|b| {
            data.extend_from_slice(b);
            b.len()
        }));
    }
    Ok(OutCol::from_parts(vec![(lens, data)], col.len)?.into_py(py))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(check_text, m)?)?;
    m.add_function(wrap_pyfunction!(trim_text, m)?)?;
    Ok(())
}
