//! JSON text -> Python values, by a recursive-descent parser that builds dict/list/str/int/
//! float/bool/None directly (no intermediate tree, no `json` module).
//!
//! It reads everything `json.dumps` writes, including what older Flujo versions stored:
//! `ensure_ascii` escapes with surrogate pairs, integers of any size, and the bare tokens
//! `NaN`, `Infinity` and `-Infinity`. Like `json.loads`, it rejects raw control characters
//! inside strings and keeps the last of duplicate keys.

use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyFloat, PyInt, PyList, PyNone, PyString};
use pyo3::PyTypeInfo;
use std::sync::Mutex;

use super::errors;
use super::stack::StackBudget;

/// Deeper documents are refused rather than risk the stack (a level costs about as much as in
/// `from_python`); neither our encoder nor `json.dumps` writes them.
const MAX_DEPTH: usize = 1000;

/// Object keys repeat from one stored state to the next ("status", "step", ...). Reusing their
/// `str` objects saves creating, hashing (a `str` caches its hash) and freeing them on every
/// load. A fixed number of slots, each holding the last key that hashed to it, so the cache
/// never grows; only the GIL holder touches it, so its lock is never contended.
static KEY_CACHE: Mutex<Vec<CachedKey>> = Mutex::new(Vec::new());
type CachedKey = Option<(Box<str>, Py<PyString>)>;
const KEY_CACHE_SLOTS: usize = 1024;
const MAX_CACHED_KEY_LEN: usize = 48;

fn cached_key<'py>(py: Python<'py>, key: &str) -> Bound<'py, PyString> {
    // FNV-1a: keys are short, and a collision only costs a fresh `str`.
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    });
    let slot = (hash % KEY_CACHE_SLOTS as u64) as usize;
    let mut slots = KEY_CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if slots.is_empty() {
        slots.resize_with(KEY_CACHE_SLOTS, || None);
    }
    if let Some((cached, string)) = &slots[slot] {
        if **cached == *key {
            return string.bind(py).clone();
        }
    }
    let string = PyString::new(py, key);
    slots[slot] = Some((key.into(), string.clone().unbind()));
    string
}

#[pyfunction]
#[pyo3(name = "decode_json")]
pub(crate) fn decode_json_py<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    decode_json(py, text)
}

pub(crate) fn decode_json<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyAny>> {
    let mut parser = Parser {
        py,
        text,
        bytes: text.as_bytes(),
        position: 0,
        scratch: Vec::new(),
        stack: StackBudget::new(),
    };
    let value = parser.value(0)?;
    parser.skip_whitespace();
    if parser.position < parser.bytes.len() {
        return Err(parser.error("unexpected data after the JSON value"));
    }
    Ok(value)
}

struct Parser<'a, 'py> {
    py: Python<'py>,
    text: &'a str,
    bytes: &'a [u8],
    position: usize,
    /// Reused buffer for strings with escapes.
    scratch: Vec<u8>,
    stack: StackBudget,
}

impl<'py> Parser<'_, 'py> {
    fn error(&self, problem: &str) -> PyErr {
        let before = &self.bytes[..self.position];
        let line = before.iter().filter(|&&byte| byte == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&byte| byte == b'\n')
            .map_or(0, |at| at + 1);
        // Positions are counted in characters, as `json.loads` reports them.
        let characters = |bytes: &[u8]| bytes.iter().filter(|&&byte| byte & 0xC0 != 0x80).count();
        errors::invalid_state(
            self.py,
            format!(
                "invalid JSON: {problem} at line {line} column {} (char {})",
                characters(&before[line_start..]) + 1,
                characters(before),
            ),
        )
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.position).copied()
    }

    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.peek() {
            self.position += 1;
        }
    }

    fn value(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        self.skip_whitespace();
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => Ok(self.string()?.into_any()),
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b't') => self.literal("true", |py| PyBool::new(py, true).to_owned().into_any()),
            Some(b'f') => self.literal("false", |py| PyBool::new(py, false).to_owned().into_any()),
            Some(b'n') => self.literal("null", |py| PyNone::get(py).to_owned().into_any()),
            Some(b'N') => self.literal("NaN", |py| PyFloat::new(py, f64::NAN).into_any()),
            Some(b'I') => self.literal("Infinity", |py| PyFloat::new(py, f64::INFINITY).into_any()),
            Some(_) => Err(self.error("expected a value")),
            None => Err(self.error("unexpected end of input, expected a value")),
        }
    }

    fn literal(
        &mut self,
        word: &str,
        make: impl FnOnce(Python<'py>) -> Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.bytes[self.position..].starts_with(word.as_bytes()) {
            self.position += word.len();
            Ok(make(self.py))
        } else {
            Err(self.error("expected a value"))
        }
    }

    fn nested(&mut self, depth: usize) -> PyResult<()> {
        if depth >= MAX_DEPTH || self.stack.spent() {
            return Err(self.error(&format!(
                "nested more than {MAX_DEPTH} levels deep (or deeper than this thread's stack \
                 holds)"
            )));
        }
        self.position += 1;
        self.skip_whitespace();
        Ok(())
    }

    fn object(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        self.nested(depth)?;
        let dict = PyDict::new(self.py);
        if self.peek() == Some(b'}') {
            self.position += 1;
            return Ok(dict.into_any());
        }
        loop {
            if self.peek() != Some(b'"') {
                return Err(self.error("expected a property name in double quotes"));
            }
            let key = self.key()?;
            self.skip_whitespace();
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':' after a property name"));
            }
            self.position += 1;
            let value = self.value(depth + 1)?;
            dict.set_item(key, value)?;
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => {
                    self.position += 1;
                    self.skip_whitespace();
                }
                Some(b'}') => {
                    self.position += 1;
                    return Ok(dict.into_any());
                }
                _ => return Err(self.error("expected ',' or '}' in an object")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> PyResult<Bound<'py, PyAny>> {
        self.nested(depth)?;
        let mut items = Vec::new();
        if self.peek() == Some(b']') {
            self.position += 1;
            return Ok(PyList::empty(self.py).into_any());
        }
        loop {
            items.push(self.value(depth + 1)?);
            self.skip_whitespace();
            match self.peek() {
                Some(b',') => self.position += 1,
                Some(b']') => {
                    self.position += 1;
                    return Ok(PyList::new(self.py, items)?.into_any());
                }
                _ => return Err(self.error("expected ',' or ']' in an array")),
            }
        }
    }

    /// An object key: like a string, but short plain keys come from `KEY_CACHE`.
    fn key(&mut self) -> PyResult<Bound<'py, PyString>> {
        let start = self.position + 1;
        let end = self.bytes[start..]
            .iter()
            .position(|&byte| byte == b'"' || byte == b'\\' || byte < 0x20)
            .map(|offset| start + offset);
        match end {
            Some(end) if self.bytes[end] == b'"' && end - start <= MAX_CACHED_KEY_LEN => {
                self.position = end + 1;
                Ok(cached_key(self.py, &self.text[start..end]))
            }
            _ => self.string(),
        }
    }

    fn string(&mut self) -> PyResult<Bound<'py, PyString>> {
        self.position += 1;
        let start = self.position;
        // Most strings have no escapes and are sliced straight from the input.
        loop {
            match self.peek() {
                Some(b'"') => {
                    let text = &self.text[start..self.position];
                    self.position += 1;
                    return Ok(PyString::new(self.py, text));
                }
                Some(b'\\') => break,
                Some(0..=0x1f) => return Err(self.error("invalid control character in a string")),
                Some(_) => self.position += 1,
                None => return Err(self.error("unterminated string")),
            }
        }
        let mut buffer = std::mem::take(&mut self.scratch);
        buffer.clear();
        buffer.extend_from_slice(&self.bytes[start..self.position]);
        let result = self.escaped_string(&mut buffer);
        self.scratch = buffer;
        result
    }

    /// The rest of a string that has escapes, decoded into `buffer`. A `\u` escape of a lone
    /// surrogate has no UTF-8 form, so it is written as its generalized UTF-8 bytes and the
    /// string is then decoded with Python's "surrogatepass", giving the same str as json.loads.
    fn escaped_string(&mut self, buffer: &mut Vec<u8>) -> PyResult<Bound<'py, PyString>> {
        let mut has_lone_surrogate = false;
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.position += 1;
                    break;
                }
                Some(b'\\') => {
                    self.position += 1;
                    let escaped = match self.peek() {
                        Some(b'"') => b'"',
                        Some(b'\\') => b'\\',
                        Some(b'/') => b'/',
                        Some(b'b') => 0x08,
                        Some(b'f') => 0x0c,
                        Some(b'n') => b'\n',
                        Some(b'r') => b'\r',
                        Some(b't') => b'\t',
                        Some(b'u') => {
                            self.position += 1;
                            let code_point = self.unicode_escape()?;
                            has_lone_surrogate |= (0xD800..0xE000).contains(&code_point);
                            push_code_point(buffer, code_point);
                            continue;
                        }
                        _ => return Err(self.error("invalid escape in a string")),
                    };
                    buffer.push(escaped);
                    self.position += 1;
                }
                Some(0..=0x1f) => return Err(self.error("invalid control character in a string")),
                Some(byte) => {
                    buffer.push(byte);
                    self.position += 1;
                }
                None => return Err(self.error("unterminated string")),
            }
        }
        if has_lone_surrogate {
            let bytes = PyBytes::new(self.py, buffer);
            PyString::from_encoded_object(&bytes, Some(c"utf-8"), Some(c"surrogatepass"))
        } else {
            // Unescaped bytes come from a `&str` and escapes are encoded as UTF-8 above.
            let text = std::str::from_utf8(buffer).map_err(|_| self.error("invalid UTF-8"))?;
            Ok(PyString::new(self.py, text))
        }
    }

    /// The code point of a `\uXXXX` escape (the `\u` already consumed), joining a surrogate
    /// pair written as two escapes.
    fn unicode_escape(&mut self) -> PyResult<u32> {
        let first = self.hex4()?;
        if (0xD800..0xDC00).contains(&first) && self.bytes[self.position..].starts_with(b"\\u") {
            let resume = self.position;
            self.position += 2;
            let second = self.hex4()?;
            if (0xDC00..0xE000).contains(&second) {
                return Ok(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00));
            }
            // Not a pair: the second escape is decoded on its own.
            self.position = resume;
        }
        Ok(first)
    }

    fn hex4(&mut self) -> PyResult<u32> {
        let digits = self
            .bytes
            .get(self.position..self.position + 4)
            .ok_or_else(|| self.error("incomplete \\u escape"))?;
        let mut code_point = 0;
        for &digit in digits {
            let value = char::from(digit)
                .to_digit(16)
                .ok_or_else(|| self.error("invalid \\u escape"))?;
            code_point = code_point * 16 + value;
        }
        self.position += 4;
        Ok(code_point)
    }

    fn number(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let start = self.position;
        if self.peek() == Some(b'-') {
            self.position += 1;
            if self.peek() == Some(b'I') {
                return self.literal("Infinity", |py| {
                    PyFloat::new(py, f64::NEG_INFINITY).into_any()
                });
            }
        }
        match self.peek() {
            Some(b'0') => self.position += 1,
            Some(b'1'..=b'9') => self.skip_digits(),
            _ => return Err(self.error("expected a digit")),
        }
        let mut is_float = false;
        if self.peek() == Some(b'.') {
            self.position += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit after the decimal point"));
            }
            self.skip_digits();
            is_float = true;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.position += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.position += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.error("expected a digit in the exponent"));
            }
            self.skip_digits();
            is_float = true;
        }
        let literal = &self.text[start..self.position];
        if is_float {
            // Rust's parser is correctly rounded, like Python's float(); overflow gives inf
            // as json.loads does.
            let number: f64 = literal.parse().map_err(|_| self.error("invalid number"))?;
            Ok(PyFloat::new(self.py, number).into_any())
        } else if let Ok(small) = literal.parse::<i64>() {
            Ok(small.into_pyobject(self.py)?.into_any())
        } else {
            big_int(self.py, literal)
        }
    }

    fn skip_digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.position += 1;
        }
    }
}

/// Appends `code_point` as UTF-8, or as the three-byte form "surrogatepass" reads for a lone
/// surrogate.
fn push_code_point(buffer: &mut Vec<u8>, code_point: u32) {
    match char::from_u32(code_point) {
        Some(character) => {
            let mut encoded = [0; 4];
            buffer.extend_from_slice(character.encode_utf8(&mut encoded).as_bytes());
        }
        None => buffer.extend_from_slice(&[
            0xE0 | (code_point >> 12) as u8,
            0x80 | ((code_point >> 6) & 0x3F) as u8,
            0x80 | (code_point & 0x3F) as u8,
        ]),
    }
}

/// An integer literal too large for i64. `int(str)` would refuse past 4300 digits (CPython's
/// int_max_str_digits), so the digits are turned into bytes here and read with int.from_bytes.
fn big_int<'py>(py: Python<'py>, literal: &str) -> PyResult<Bound<'py, PyAny>> {
    let (negative, digits) = match literal.strip_prefix('-') {
        Some(digits) => (true, digits),
        None => (false, literal),
    };
    // Little-endian base-2^32 words, multiplied by 10^9 and added to once per group of nine
    // digits: quadratic, but only ever run on the rare huge int.
    let mut words: Vec<u32> = Vec::with_capacity(digits.len() / 9 + 1);
    let first_group = match digits.len() % 9 {
        0 => 9,
        short => short,
    };
    let mut rest = digits;
    let mut group_length = first_group;
    while !rest.is_empty() {
        let (group, tail) = rest.split_at(group_length);
        rest = tail;
        let scale = 10u64.pow(u32::try_from(group.len()).expect("a group has at most 9 digits"));
        let mut carry: u64 = group.parse().expect("a group of ASCII digits");
        for word in &mut words {
            let product = u64::from(*word) * scale + carry;
            *word = product as u32;
            carry = product >> 32;
        }
        if carry != 0 {
            words.push(carry as u32);
        }
        group_length = 9;
    }
    let bytes: Vec<u8> = words.iter().flat_map(|word| word.to_le_bytes()).collect();
    let magnitude =
        PyInt::type_object(py).call_method1("from_bytes", (PyBytes::new(py, &bytes), "little"))?;
    if negative {
        magnitude.neg()
    } else {
        Ok(magnitude)
    }
}
