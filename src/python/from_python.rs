//! Python values -> compact JSON text, by a direct walk over the objects.
//!
//! Going straight to a `String` (no `serde_json::Value`, no `json` module) is what keeps a 2 KB
//! state near 5 µs (see `shared/notes/async-bridge.md`). Exact dict/list/str/int/float/bool/None
//! are tried first because they are almost every value; everything else goes through the
//! registered serializers, then the built-in rules. Errors never carry a placeholder: they name
//! the path inside the state and the type, so the caller knows what to fix.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};

use base64::Engine as _;
use pyo3::exceptions::{PyException, PyMemoryError, PyTypeError, PyUnicodeEncodeError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyComplex, PyDict, PyFloat, PyFrozenSet, PyInt, PyList,
    PyMemoryView, PySet, PyString, PyTuple, PyType,
};
use pyo3::PyTypeInfo;

use super::errors;
use super::stack::StackBudget;

/// Deeper states are refused, so the recursive walk cannot overflow the stack: a level of
/// plain dicts costs about 330 bytes of stack in a release build (measured: in a thread given a
/// 256 KB stack, ~790 levels fit), so 1000 levels need ~330 KB. Python's threads get megabytes
/// unless `threading.stack_size()` says otherwise; `json.dumps` stops near 1000 levels too, and
/// no real workflow state comes close to that depth.
/// Conversions (an Enum's value, a serializer's or `model_dump`'s result) count as a level too,
/// which is also what stops a serializer that keeps returning new objects to serialize.
const MAX_DEPTH: usize = 1000;

/// Serializers registered from Python, in registration order.
static SERIALIZERS: Mutex<Vec<(Py<PyType>, Py<PyAny>)>> = Mutex::new(Vec::new());

/// Flujo's `lookup_custom_serializer`, when Flujo is installed: the serializers registered with
/// Flujo's own `register_custom_serializer` apply here too, as they do in Flujo's backend.
static FLUJO_SERIALIZER_LOOKUP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

#[pyfunction]
pub(crate) fn honor_flujo_serializers(lookup: Bound<'_, PyAny>) {
    let _ = FLUJO_SERIALIZER_LOOKUP.set(lookup.py(), lookup.unbind());
}

/// Registers `function` as the serializer of `type_` and its subclasses; registering the same
/// type again replaces its function but keeps its place in the isinstance order.
pub(crate) fn register_serializer(type_: &Bound<'_, PyType>, function: Bound<'_, PyAny>) {
    let function = function.unbind();
    let mut registry = SERIALIZERS.lock().unwrap_or_else(PoisonError::into_inner);
    let replaced = match registry.iter_mut().find(|(known, _)| known.is(type_)) {
        Some((_, current)) => Some(std::mem::replace(current, function)),
        None => {
            registry.push((type_.clone().unbind(), function));
            None
        }
    };
    // Dropping the old function may run arbitrary Python code (`__del__`) that could register
    // again, so it must happen after the lock is released.
    drop(registry);
    drop(replaced);
}

#[pyfunction]
#[pyo3(name = "register_serializer")]
pub(crate) fn register_serializer_py(
    type_: &Bound<'_, PyAny>,
    function: Bound<'_, PyAny>,
) -> PyResult<()> {
    let Ok(type_) = type_.cast::<PyType>() else {
        return Err(PyTypeError::new_err(format!(
            "register_serializer's first argument must be a class, such as pathlib.Path, got \
             a {} ({:.60})",
            type_name(&type_.get_type()),
            type_.repr()?.to_string(),
        )));
    };
    if !function.is_callable() {
        return Err(PyTypeError::new_err(format!(
            "the serializer for {} must be callable, got a {}",
            type_name(type_),
            type_name(&function.get_type()),
        )));
    }
    let py = type_.py();
    let stored_as_is = [
        py.get_type::<PyString>(),
        py.get_type::<PyInt>(),
        py.get_type::<PyFloat>(),
        py.get_type::<PyBool>(),
        py.get_type::<PyDict>(),
        py.get_type::<PyList>(),
        py.None().into_bound(py).get_type(),
    ];
    if stored_as_is.iter().any(|t| t.is(type_)) {
        return Err(PyTypeError::new_err(format!(
            "{} is stored as JSON as it is, so a serializer for it would never be called; \
             register_serializer is for other classes (a subclass of {0} may have one of its \
             own)",
            type_name(type_),
        )));
    }
    register_serializer(type_, function);
    Ok(())
}

/// The serializer for `value`'s type: an exact match first, then the first registered type
/// `value` is an instance of.
fn registered_serializer<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = value.py();
    let registry = SERIALIZERS.lock().unwrap_or_else(PoisonError::into_inner);
    if registry.is_empty() {
        return Ok(None);
    }
    let value_type = value.get_type();
    if let Some((_, function)) = registry.iter().find(|(known, _)| known.is(&value_type)) {
        return Ok(Some(function.bind(py).clone()));
    }
    // isinstance may run Python code (`__instancecheck__`) that could register a serializer,
    // so it runs on a copy taken under the lock, not under the lock itself.
    let candidates: Vec<(Bound<'py, PyType>, Bound<'py, PyAny>)> = registry
        .iter()
        .map(|(known, function)| (known.bind(py).clone(), function.bind(py).clone()))
        .collect();
    drop(registry);
    for (known, function) in candidates {
        if value.is_instance(&known)? {
            return Ok(Some(function));
        }
    }
    Ok(None)
}

#[pyfunction]
#[pyo3(name = "encode_json", signature = (value, path = "value"))]
pub(crate) fn encode_json_py(value: &Bound<'_, PyAny>, path: &str) -> PyResult<String> {
    encode_json(value, path)
}

/// Encodes `value` as compact JSON; `path` names it in error messages (e.g. "pipeline_context").
pub(crate) fn encode_json<'py>(value: &Bound<'py, PyAny>, path: &str) -> PyResult<String> {
    let mut encoder = Encoder {
        out: String::with_capacity(512),
        ancestors: Vec::new(),
        walked_keys: Vec::new(),
        foreign_calls: 0,
        stack: StackBudget::new(),
    };
    match encoder.value(value, 0) {
        Ok(()) => Ok(encoder.out),
        Err(failure) => Err(failure.into_py_err(value.py(), path)),
    }
}

/// Why a value could not be stored. Built where the walk fails; the path is added while the
/// failure travels back up, so a successful walk never spends time formatting paths.
enum Reason {
    Unsupported {
        type_name: String,
    },
    BadKey {
        key_type: String,
    },
    Cycle,
    TooDeep,
    /// Two keys of one dict are stored as the same text.
    KeyCollision {
        stored_as: String,
    },
    /// A registered serializer returned another instance of the type it serializes.
    SerializerKeptItsType {
        type_name: String,
    },
    LoneSurrogate {
        /// The surrogate's code point and its index in the str, when Python said.
        found: Option<(u32, usize)>,
    },
    /// The dict gained or lost keys while it was being walked: code of the user's that the walk
    /// called (a serializer, `model_dump`, ...) changed it.
    ChangedDuringWalk,
    Raised {
        type_name: String,
        error: PyErr,
    },
}

struct Failure {
    reason: Reason,
    /// Path segments like `['key']` or `[3]`, innermost first.
    segments: Vec<String>,
}

/// Boxed so that `Result<(), Failure>` stays one word and the recursive frames stay small.
type Step = Result<(), Box<Failure>>;

impl Failure {
    fn new(reason: Reason) -> Box<Self> {
        Box::new(Self {
            reason,
            segments: Vec::new(),
        })
    }

    fn at(mut self: Box<Self>, segment: String) -> Box<Self> {
        self.segments.push(segment);
        self
    }

    fn into_py_err(self, py: Python<'_>, root: &str) -> PyErr {
        // A path through a thousand levels would bury the message: keep both ends.
        const SHOWN_AT_EACH_END: usize = 8;
        let outermost_first: Vec<&String> = self.segments.iter().rev().collect();
        let mut path = root.to_owned();
        if outermost_first.len() > 2 * SHOWN_AT_EACH_END {
            let hidden = outermost_first.len() - 2 * SHOWN_AT_EACH_END;
            outermost_first[..SHOWN_AT_EACH_END]
                .iter()
                .for_each(|s| path.push_str(s));
            path.push_str(&format!("...({hidden} levels)..."));
            outermost_first[outermost_first.len() - SHOWN_AT_EACH_END..]
                .iter()
                .for_each(|s| path.push_str(s));
        } else {
            outermost_first.iter().for_each(|s| path.push_str(s));
        }
        let message = match self.reason {
            Reason::Unsupported { type_name } => format!(
                "cannot store {path} (a {type_name}): register a serializer with \
                 flujo_sqlite.register_serializer({type_name}, fn) or convert it to \
                 dict/list/str/int/float/bool/None"
            ),
            Reason::BadKey { key_type } => format!(
                "cannot store {path}: the dict key is a {key_type}; keys must be str, int, \
                 float, bool, None, a date, time or datetime, a UUID, a Decimal, or an Enum of \
                 those (convert other keys to str yourself)"
            ),
            Reason::Cycle => format!("{root} contains a reference cycle at {path}"),
            Reason::KeyCollision { stored_as } => format!(
                "cannot store {path}: another key of the same dict is also stored as \
                 {stored_as:?} (keys that are not str are stored as their text, as Flujo does, \
                 and Flujo would keep only one of the two values); rename one of them"
            ),
            Reason::SerializerKeptItsType { type_name } => format!(
                "cannot store {path}: the serializer registered for {type_name} returned \
                 another {type_name}; it must return something storable (a dict, list, str, \
                 number, bool or None, or an object with a serializer of its own)"
            ),
            Reason::TooDeep => format!(
                "cannot store {path}: it is nested more than {MAX_DEPTH} levels deep (or deeper \
                 than this thread's stack holds)"
            ),
            Reason::LoneSurrogate { found } => format!(
                "cannot store {path}: the str contains a lone surrogate{}, which has no UTF-8 \
                 encoding; lone surrogates are not storable (text decoded with \
                 errors='surrogateescape' holds them: decode it properly or store it escaped)",
                found.map_or_else(String::new, |(code, at)| format!(
                    " ('\\u{code:04x}' at index {at})"
                ))
            ),
            Reason::ChangedDuringWalk => format!(
                "cannot store {path}: the dict changed while it was being stored, so a stored \
                 copy would match neither its old nor its new keys; a serializer or \
                 model_dump() called for one of its values must not add or remove its keys"
            ),
            // Ctrl-C or a `sys.exit()` inside a serializer is not a property of the value, nor
            // is a process out of memory.
            Reason::Raised { error, .. }
                if !error.is_instance_of::<PyException>(py)
                    || error.is_instance_of::<PyMemoryError>(py) =>
            {
                return error;
            }
            Reason::Raised { type_name, error } => {
                let detail = error.value(py).repr().map_or_else(
                    |_| "an exception".to_owned(),
                    |repr| repr.to_string_lossy().into_owned(),
                );
                let failure = errors::serialization_error(
                    py,
                    format!("cannot store {path} (a {type_name}): {detail}"),
                );
                failure.set_cause(py, Some(error));
                return failure;
            }
        };
        errors::serialization_error(py, message)
    }
}

fn type_name(type_: &Bound<'_, PyType>) -> String {
    type_.fully_qualified_name().map_or_else(
        |_| "object of unknown type".to_owned(),
        |name| name.to_string_lossy().into_owned(),
    )
}

/// Wraps an exception raised by `value`'s own code (a serializer, `model_dump`, `isoformat`...).
fn raised(value: &Bound<'_, PyAny>, error: PyErr) -> Box<Failure> {
    Failure::new(Reason::Raised {
        type_name: type_name(&value.get_type()),
        error,
    })
}

/// The text of a str key (walked keys are str until the first one that is not).
fn str_text(key: &Bound<'_, PyAny>) -> String {
    key.cast::<PyString>()
        .map(|text| text.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn key_segment(key: &Bound<'_, PyAny>) -> String {
    match key.repr() {
        Ok(repr) => format!("[{}]", repr.to_string_lossy()),
        Err(_) => "[<key whose repr() failed>]".to_owned(),
    }
}

/// The code point and index of the lone surrogate a `UnicodeEncodeError` of `text` points at.
fn lone_surrogate(text: &Bound<'_, PyString>, error: &PyErr) -> Option<(u32, usize)> {
    let at: usize = error
        .value(text.py())
        .getattr("start")
        .ok()?
        .extract()
        .ok()?;
    let found = text.get_item(at).ok()?;
    let code: u32 = found
        .py()
        .import("builtins")
        .ok()?
        .call_method1("ord", (found,))
        .ok()?
        .extract()
        .ok()?;
    Some((code, at))
}

/// The Python types behind the non-fast-path rules, imported once.
static ENUM: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DATE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static TIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static UUID: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DECIMAL: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static SEQUENCE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static MAPPING: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static USER_STRING: PyOnceLock<Py<PyType>> = PyOnceLock::new();
static DATACLASS_FIELDS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();

fn is_instance_of(
    value: &Bound<'_, PyAny>,
    cell: &'static PyOnceLock<Py<PyType>>,
    module: &str,
    name: &str,
) -> PyResult<bool> {
    value.is_instance(cell.import(value.py(), module, name)?)
}

/// The bytes -> JSON escape for each byte that needs one; 0 means "copy as is".
const ESCAPES: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut byte = 0;
    while byte < 0x20 {
        table[byte] = b'u';
        byte += 1;
    }
    table[b'\n' as usize] = b'n';
    table[b'\r' as usize] = b'r';
    table[b'\t' as usize] = b't';
    table[0x08] = b'b';
    table[0x0c] = b'f';
    table[b'"' as usize] = b'"';
    table[b'\\' as usize] = b'\\';
    table
};

/// Room for `text` as `write_string` writes it, quotes and escapes included: for short text the
/// most it can take (six bytes for each of its bytes), which costs nothing to know; for long
/// text, where that would reserve too much, its exact length, counted.
fn quoted_room(text: &str) -> usize {
    const COUNTED_FROM: usize = 64 * 1024;
    if text.len() < COUNTED_FROM {
        6 * text.len() + 2
    } else {
        quoted_len(text)
    }
}

/// The length of `text` as `write_string` writes it, quotes and escapes included.
fn quoted_len(text: &str) -> usize {
    let escapes: usize = text
        .bytes()
        .map(|byte| match ESCAPES[usize::from(byte)] {
            0 => 0,
            b'u' => 5, // \u00XX for one byte
            _ => 1,
        })
        .sum();
    text.len() + escapes + 2
}

/// Writes `text` as a JSON string. The caller has made room for it (see `Encoder::make_room`).
fn write_string(out: &mut String, text: &str) {
    out.push('"');
    let mut copied = 0;
    for (index, &byte) in text.as_bytes().iter().enumerate() {
        let escape = ESCAPES[usize::from(byte)];
        if escape == 0 {
            continue;
        }
        // Every escaped byte is ASCII, so `index` is a char boundary.
        out.push_str(&text[copied..index]);
        copied = index + 1;
        out.push('\\');
        if escape == b'u' {
            write!(out, "u{byte:04x}").expect("writing to a String cannot fail");
        } else {
            out.push(char::from(escape));
        }
    }
    out.push_str(&text[copied..]);
    out.push('"');
}

fn write_float(out: &mut String, number: f64) {
    if number.is_finite() {
        // `Debug` is the shortest text that parses back to the same f64 and keeps integral
        // values recognisable as floats ("2.0", "1e16"); every form it uses is valid JSON.
        write!(out, "{number:?}").expect("writing to a String cannot fail");
    } else if number.is_nan() {
        out.push_str("\"nan\"");
    } else if number > 0.0 {
        out.push_str("\"inf\"");
    } else {
        out.push_str("\"-inf\"");
    }
}

/// Decimal digits of an int too large for i64. `str(int)` would refuse past 4300 digits
/// (CPython's int_max_str_digits), so the digits are computed here from the int's bytes.
fn big_int_digits(int: &Bound<'_, PyAny>) -> PyResult<String> {
    let negative = int.lt(0)?;
    let magnitude = if negative { int.neg()? } else { int.clone() };
    let bits: usize = magnitude.call_method0("bit_length")?.extract()?;
    let bytes = magnitude.call_method1("to_bytes", (bits.div_ceil(8), "big"))?;
    let bytes = bytes.cast::<PyBytes>()?.as_bytes();

    // Big-endian base-2^32 words, divided by 10^9 repeatedly: quadratic, but only ever run on
    // the rare huge int.
    let mut words: Vec<u32> = bytes
        .rchunks(4)
        .rev()
        .map(|chunk| {
            chunk
                .iter()
                .fold(0u32, |word, &byte| (word << 8) | u32::from(byte))
        })
        .collect();
    let mut groups = Vec::new();
    while words.iter().any(|&word| word != 0) {
        let mut remainder = 0u64;
        for word in &mut words {
            let current = (remainder << 32) | u64::from(*word);
            *word = u32::try_from(current / 1_000_000_000).expect("quotient fits in a word");
            remainder = current % 1_000_000_000;
        }
        groups.push(remainder);
        let leading_zeros = words.iter().take_while(|&&word| word == 0).count();
        words.drain(..leading_zeros);
    }
    let mut digits = String::with_capacity(groups.len() * 9 + 1);
    if negative {
        digits.push('-');
    }
    let mut groups = groups.iter().rev();
    let first = groups.next().copied().unwrap_or(0);
    write!(digits, "{first}").expect("writing to a String cannot fail");
    for group in groups {
        write!(digits, "{group:09}").expect("writing to a String cannot fail");
    }
    Ok(digits)
}

struct Encoder<'py> {
    out: String,
    /// Addresses of the containers on the path from the root to the current value: a value
    /// found among them is a reference cycle.
    ancestors: Vec<usize>,
    /// The keys walked so far in each dict on that path, outermost first, kept until the dict is
    /// done so `dict` can check that no key was swapped for another meanwhile.
    walked_keys: Vec<Bound<'py, PyAny>>,
    /// How often the walk has run code that is not ours (a serializer, `model_dump`, an Enum's
    /// `value`, a garbage collection...), which might change a dict being walked.
    foreign_calls: u64,
    stack: StackBudget,
}

/// Room for what a value writes besides the text of its strings: a number, `null`, brackets,
/// a comma and a colon.
const ROOM_FOR_TOKENS: usize = 64;

impl<'py> Encoder<'py> {
    /// Grows the output for what comes next, if it must, without the allocator's abort when
    /// the process has no memory left for it (under a limit on its address space, say): a
    /// huge state raises `MemoryError`, as Python's `json` does, and the process goes on.
    fn make_room(&mut self, bytes: usize, value: &Bound<'py, PyAny>) -> Step {
        if self.out.capacity() - self.out.len() >= bytes {
            return Ok(());
        }
        self.out.try_reserve(bytes).map_err(|_| {
            raised(
                value,
                PyMemoryError::new_err(format!(
                    "no memory left to store this state: its JSON text needed {} MB more",
                    bytes.div_ceil(1 << 20)
                )),
            )
        })
    }

    /// Writes `value` with room to spare on both sides, for its own tokens and for the comma or
    /// bracket its container writes next.
    fn value(&mut self, value: &Bound<'py, PyAny>, depth: usize) -> Step {
        self.make_room(ROOM_FOR_TOKENS, value)?;
        self.write_value(value, depth)?;
        self.make_room(ROOM_FOR_TOKENS, value)
    }

    fn write_value(&mut self, value: &Bound<'py, PyAny>, depth: usize) -> Step {
        if let Ok(text) = value.cast_exact::<PyString>() {
            self.string(text)
        } else if let Ok(dict) = value.cast_exact::<PyDict>() {
            self.dict(dict, depth)
        } else if let Ok(list) = value.cast_exact::<PyList>() {
            self.list(list, depth)
        } else if let Ok(int) = value.cast_exact::<PyInt>() {
            self.int(int)
        } else if let Ok(flag) = value.cast_exact::<PyBool>() {
            self.out
                .push_str(if flag.is_true() { "true" } else { "false" });
            Ok(())
        } else if let Ok(float) = value.cast_exact::<PyFloat>() {
            write_float(&mut self.out, float.value());
            Ok(())
        } else if value.is_none() {
            self.out.push_str("null");
            Ok(())
        } else {
            self.other(value, depth)
        }
    }

    /// Marks `value` as an ancestor of what is encoded next, refusing cycles and deep nesting.
    fn enter(&mut self, value: &Bound<'py, PyAny>, depth: usize) -> Step {
        if depth >= MAX_DEPTH || self.stack.spent() {
            return Err(Failure::new(Reason::TooDeep));
        }
        let address = value.as_ptr() as usize;
        if self.ancestors.contains(&address) {
            return Err(Failure::new(Reason::Cycle));
        }
        self.ancestors.push(address);
        Ok(())
    }

    fn leave(&mut self) {
        self.ancestors.pop();
    }

    fn string(&mut self, string: &Bound<'py, PyString>) -> Step {
        let text = string.to_str().map_err(|error| {
            if error.is_instance_of::<PyUnicodeEncodeError>(string.py()) {
                Failure::new(Reason::LoneSurrogate {
                    found: lone_surrogate(string, &error),
                })
            } else {
                raised(string, error)
            }
        })?;
        self.write_text(text, string.as_any())
    }

    /// Writes `text` as a JSON string, once there is room for all of it.
    fn write_text(&mut self, text: &str, value: &Bound<'py, PyAny>) -> Step {
        self.make_room(quoted_room(text) + ROOM_FOR_TOKENS, value)?;
        write_string(&mut self.out, text);
        Ok(())
    }

    fn int(&mut self, int: &Bound<'py, PyInt>) -> Step {
        if let Ok(small) = int.extract::<i64>() {
            write!(self.out, "{small}").expect("writing to a String cannot fail");
        } else {
            // It makes Python objects, and with them possibly a garbage collection that runs
            // any object's `__del__`.
            self.foreign_calls += 1;
            let digits = big_int_digits(int.as_any()).map_err(|error| raised(int, error))?;
            self.make_room(digits.len(), int.as_any())?;
            self.out.push_str(&digits);
        }
        Ok(())
    }

    fn dict(&mut self, dict: &Bound<'py, PyDict>, depth: usize) -> Step {
        self.enter(dict.as_any(), depth)?;
        self.out.push('{');
        // Code that is not ours, run by the walk, may change this dict; nothing else can, so
        // until some has run there is nothing to check. pyo3's iterator panics when the dict
        // changed size since its previous step, so the size is checked right before each step;
        // it also panics on the step after one item too many, so it is asked for at most that
        // one. A key swapped for another keeps the size and may not show up as an extra item (a
        // resize compacts the dict), so every walked key must also still be there.
        let changed = || Err(Failure::new(Reason::ChangedDuringWalk));
        let size = dict.len();
        let foreign_calls_before = self.foreign_calls;
        let walked_from = self.walked_keys.len();
        // The stored texts of the keys so far, kept from the first key that is not a str on:
        // two keys stored as one text ({None: .., "None": ..}) would leave two values under one
        // JSON key, and Flujo keeps only one of them.
        let mut stored_keys: Option<HashSet<String>> = None;
        let mut items = dict.iter();
        for index in 0..size {
            if self.foreign_calls != foreign_calls_before && dict.len() != size {
                return changed();
            }
            let Some((key, item)) = items.next() else {
                return changed();
            };
            if index > 0 {
                self.out.push(',');
            }
            let converted = self
                .key(&key)
                .map_err(|failure| failure.at(key_segment(&key)))?;
            if converted.is_some() || stored_keys.is_some() {
                let seen = stored_keys.get_or_insert_with(|| {
                    self.walked_keys[walked_from..]
                        .iter()
                        .map(str_text)
                        .collect()
                });
                let text = converted.unwrap_or_else(|| str_text(&key));
                if !seen.insert(text.clone()) {
                    return Err(Failure::new(Reason::KeyCollision { stored_as: text })
                        .at(key_segment(&key)));
                }
            }
            self.out.push(':');
            self.value(&item, depth + 1)
                .map_err(|failure| failure.at(key_segment(&key)))?;
            self.walked_keys.push(key);
        }
        let unchanged = self.foreign_calls == foreign_calls_before
            || (dict.len() == size
                && items.next().is_none()
                && self.walked_keys[walked_from..]
                    .iter()
                    .all(|key| dict.contains(key).unwrap_or(false)));
        self.walked_keys.truncate(walked_from);
        if !unchanged {
            return changed();
        }
        self.out.push('}');
        self.leave();
        Ok(())
    }

    /// Non-str keys become the text both Flujo releases store for them, `str()` of the key as a
    /// value would be stored (`None` -> "None", `True` -> "True", NaN -> "nan", a datetime ->
    /// its isoformat), so a context reads back with the same keys whichever backend saved it.
    /// A key of a type registered with Flujo's serializer is the text of what it makes of the
    /// key; other keys Flujo would store as a mangled text (tuples, objects) are refused.
    /// Returns the text a key that is not a plain str was stored as.
    fn key(&mut self, key: &Bound<'py, PyAny>) -> Result<Option<String>, Box<Failure>> {
        if let Ok(text) = key.cast_exact::<PyString>() {
            return self.string(text).map(|()| None);
        }
        self.foreign_calls += 1;
        let failed = |error| raised(key, error);
        // As in Flujo: the text of what the serializer registered with Flujo makes of the key
        // (returned, so that a collision with another key of the dict is seen).
        if let Some(replacement) = flujo_serialized(key).map_err(failed)? {
            let text = replacement.str().map_err(failed)?;
            self.string(&text)?;
            return Ok(Some(str_text(&text)));
        }
        if let Ok(text) = key.cast::<PyString>() {
            return self.string(text).map(|()| None);
        }
        let text = if let Ok(flag) = key.cast_exact::<PyBool>() {
            if flag.is_true() { "True" } else { "False" }.to_owned()
        } else if let Ok(int) = key.cast::<PyInt>() {
            match int.extract::<i64>() {
                Ok(small) => small.to_string(),
                Err(_) => big_int_digits(key).map_err(|error| raised(key, error))?,
            }
        } else if let Ok(float) = key.cast::<PyFloat>() {
            let number = float.value();
            if number.is_nan() {
                "nan".to_owned()
            } else if number.is_infinite() {
                if number > 0.0 { "inf" } else { "-inf" }.to_owned()
            } else {
                // Python's repr spells exponents differently from Rust ("1e+16"); a key must
                // match what Flujo wrote, so ask Python.
                let repr = PyFloat::type_object(key.py())
                    .call_method1("__repr__", (key,))
                    .map_err(failed)?;
                repr.to_string()
            }
        } else if key.is_none() {
            "None".to_owned()
        } else if is_instance_of(key, &DATE, "datetime", "date").map_err(failed)?
            || is_instance_of(key, &TIME, "datetime", "time").map_err(failed)?
        {
            key.call_method0("isoformat")
                .map_err(failed)?
                .str()
                .map_err(failed)?
                .to_string()
        } else if is_instance_of(key, &UUID, "uuid", "UUID").map_err(failed)?
            || is_instance_of(key, &DECIMAL, "decimal", "Decimal").map_err(failed)?
        {
            key.str().map_err(failed)?.to_string()
        } else if is_instance_of(key, &ENUM, "enum", "Enum").map_err(failed)? {
            let inner = key.getattr("value").map_err(failed)?;
            if is_instance_of(&inner, &ENUM, "enum", "Enum").map_err(failed)? {
                return Err(Failure::new(Reason::BadKey {
                    key_type: type_name(&key.get_type()),
                }));
            }
            let stored = match self.key(&inner)? {
                Some(converted) => converted,
                None => str_text(&inner),
            };
            return Ok(Some(stored));
        } else {
            return Err(Failure::new(Reason::BadKey {
                key_type: type_name(&key.get_type()),
            }));
        };
        self.write_text(&text, key)?;
        Ok(Some(text))
    }

    fn sequence(
        &mut self,
        container: &Bound<'py, PyAny>,
        items: impl Iterator<Item = Bound<'py, PyAny>>,
        depth: usize,
    ) -> Step {
        self.enter(container, depth)?;
        self.out.push('[');
        for (index, item) in items.enumerate() {
            if index > 0 {
                self.out.push(',');
            }
            self.value(&item, depth + 1)
                .map_err(|failure| failure.at(format!("[{index}]")))?;
        }
        self.out.push(']');
        self.leave();
        Ok(())
    }

    fn list(&mut self, list: &Bound<'py, PyList>, depth: usize) -> Step {
        self.sequence(list.as_any(), list.iter(), depth)
    }

    /// Everything that is not an exact fast-path type: registered serializers first, then the
    /// built-in rules. `convert` itself never recurses: it writes leaves and hands containers
    /// and replacements back, so its large frame is not repeated once per nesting level.
    fn other(&mut self, value: &Bound<'py, PyAny>, depth: usize) -> Step {
        self.foreign_calls += 1;
        match self.convert(value)? {
            Converted::Written => Ok(()),
            Converted::Replaced(replacement) => {
                self.enter(value, depth)?;
                self.value(&replacement, depth + 1)?;
                self.leave();
                Ok(())
            }
            Converted::Dict(dict) => self.dict(&dict, depth),
            Converted::List(list) => self.list(&list, depth),
            Converted::Tuple(tuple) => self.sequence(value, tuple.iter(), depth),
            Converted::Set(items) => self.set(value, &items, depth),
        }
    }

    #[inline(never)]
    fn convert(&mut self, value: &Bound<'py, PyAny>) -> Result<Converted<'py>, Box<Failure>> {
        let py = value.py();
        // Every failure below is an exception raised by `value` itself.
        let failed = |error| raised(value, error);
        if let Some(serializer) = registered_serializer(value).map_err(failed)? {
            let replacement = serializer.call1((value,)).map_err(failed)?;
            if replacement.get_type().is(value.get_type()) {
                // It would be called again on its own result, until the depth limit said so.
                return Err(Failure::new(Reason::SerializerKeptItsType {
                    type_name: type_name(&value.get_type()),
                }));
            }
            return Ok(Converted::Replaced(replacement));
        }
        if let Some(replacement) = flujo_serialized(value).map_err(failed)? {
            return Ok(Converted::Replaced(replacement));
        }
        // Subclasses of the fast-path types (IntEnum, StrEnum, OrderedDict, namedtuple...).
        if let Ok(text) = value.cast::<PyString>() {
            self.string(text)?;
        } else if let Ok(int) = value.cast::<PyInt>() {
            self.int(int)?;
        } else if let Ok(float) = value.cast::<PyFloat>() {
            write_float(&mut self.out, float.value());
        } else if let Ok(dict) = value.cast::<PyDict>() {
            return Ok(Converted::Dict(dict.clone()));
        } else if let Ok(list) = value.cast::<PyList>() {
            return Ok(Converted::List(list.clone()));
        } else if let Ok(tuple) = value.cast::<PyTuple>() {
            return Ok(Converted::Tuple(tuple.clone()));
        } else if is_instance_of(value, &ENUM, "enum", "Enum").map_err(failed)? {
            return Ok(Converted::Replaced(value.getattr("value").map_err(failed)?));
        } else if is_instance_of(value, &DATE, "datetime", "date").map_err(failed)?
            || is_instance_of(value, &TIME, "datetime", "time").map_err(failed)?
        {
            return Ok(Converted::Replaced(
                value.call_method0("isoformat").map_err(failed)?,
            ));
        } else if is_instance_of(value, &UUID, "uuid", "UUID").map_err(failed)?
            || is_instance_of(value, &DECIMAL, "decimal", "Decimal").map_err(failed)?
        {
            self.string(&value.str().map_err(failed)?)?;
        } else if let Ok(bytes) = value.cast::<PyBytes>() {
            self.base64(bytes.as_bytes(), value)?;
        } else if let Ok(bytes) = value.cast::<PyByteArray>() {
            // A copy, made by Python (so a `MemoryError` if there is no room): the walk may run
            // code that changes the bytearray while its buffer is borrowed.
            let bytes = value.py().get_type::<PyBytes>().call1((bytes,));
            let bytes = bytes.map_err(failed)?;
            let bytes = bytes
                .cast::<PyBytes>()
                .map_err(|error| failed(error.into()))?;
            self.base64(bytes.as_bytes(), value)?;
        } else if value.is_instance_of::<PyMemoryView>() {
            let bytes = value.call_method0("tobytes").map_err(failed)?;
            let bytes = bytes
                .cast::<PyBytes>()
                .map_err(|error| failed(error.into()))?;
            self.base64(bytes.as_bytes(), value)?;
        } else if value.is_instance_of::<PySet>() || value.is_instance_of::<PyFrozenSet>() {
            let items = value
                .try_iter()
                .and_then(Iterator::collect)
                .map_err(failed)?;
            return Ok(Converted::Set(items));
        } else if let Ok(complex) = value.cast::<PyComplex>() {
            self.out.push_str("{\"real\":");
            write_float(&mut self.out, complex.real());
            self.out.push_str(",\"imag\":");
            write_float(&mut self.out, complex.imag());
            self.out.push('}');
        } else if value.is_instance_of::<PyType>() {
            // Looked at before `model_dump`: a model class is stored by its name too.
            self.string(&callable_name(value).map_err(failed)?)?;
        } else if value.get_type().hasattr("model_dump").map_err(failed)? {
            // Looked up on the type so that an instance's `__getattr__` cannot fake a model.
            let kwargs = PyDict::new(py);
            kwargs.set_item("mode", "python").map_err(failed)?;
            let dumped = value
                .call_method("model_dump", (), Some(&kwargs))
                .map_err(failed)?;
            return Ok(Converted::Replaced(dumped));
        } else if value
            .get_type()
            .hasattr("__dataclass_fields__")
            .map_err(failed)?
        {
            return Ok(Converted::Replaced(
                dataclass_fields(value).map_err(failed)?.into_any(),
            ));
        } else if is_instance_of(value, &MAPPING, "collections.abc", "Mapping").map_err(failed)? {
            // A UserDict, a MappingProxyType...: a dict, as Flujo 0.6.11 stores any mapping.
            let dict = py.get_type::<PyDict>().call1((value,)).map_err(failed)?;
            return Ok(Converted::Replaced(dict));
        } else if is_instance_of(value, &USER_STRING, "collections", "UserString")
            .map_err(failed)?
        {
            // A sequence too, of more UserStrings: its text, not a list of lists of characters.
            self.string(&value.str().map_err(failed)?)?;
        } else if is_instance_of(value, &SEQUENCE, "collections.abc", "Sequence").map_err(failed)? {
            // A deque, a range...: a list, as Flujo 0.6.11 stores any sequence.
            let items = value
                .try_iter()
                .and_then(Iterator::collect::<PyResult<Vec<_>>>)
                .map_err(failed)?;
            return Ok(Converted::Tuple(PyTuple::new(py, items).map_err(failed)?));
        } else if value.is_callable() {
            // A function, a lambda, a bound method: its name, as both Flujo releases store it.
            self.string(&callable_name(value).map_err(failed)?)?;
        } else {
            return Err(unsupported(value));
        }
        Ok(Converted::Written)
    }

    fn base64(&mut self, bytes: &[u8], value: &Bound<'py, PyAny>) -> Step {
        self.make_room(bytes.len().div_ceil(3) * 4 + ROOM_FOR_TOKENS, value)?;
        self.out.push('"');
        base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut self.out);
        self.out.push('"');
        Ok(())
    }

    /// Sets have no order, so items are sorted by their JSON text to store the same set the
    /// same way every time.
    fn set(&mut self, set: &Bound<'py, PyAny>, items: &[Bound<'py, PyAny>], depth: usize) -> Step {
        self.enter(set, depth)?;
        let outer = std::mem::take(&mut self.out);
        let mut encoded = Vec::new();
        for item in items {
            let result = self.value(item, depth + 1);
            encoded.push(std::mem::take(&mut self.out));
            if let Err(failure) = result {
                self.out = outer;
                return Err(failure);
            }
        }
        self.out = outer;
        encoded.sort_unstable();
        let length: usize = encoded.iter().map(|item| item.len() + 1).sum();
        self.make_room(length + ROOM_FOR_TOKENS, set)?;
        self.out.push('[');
        for (index, item) in encoded.iter().enumerate() {
            if index > 0 {
                self.out.push(',');
            }
            self.out.push_str(item);
        }
        self.out.push(']');
        self.leave();
        Ok(())
    }
}

/// `value` as the serializer registered with Flujo for its type makes it, if any does. As in
/// Flujo, a serializer that raises or hands back a value of the same type (Flujo's own
/// `register_custom_type` does for a class without `__dict__`) leaves `value` to the usual
/// rules.
fn flujo_serialized<'py>(value: &Bound<'py, PyAny>) -> PyResult<Option<Bound<'py, PyAny>>> {
    let py = value.py();
    let Some(lookup) = FLUJO_SERIALIZER_LOOKUP.get(py) else {
        return Ok(None);
    };
    let serializer = lookup.bind(py).call1((value,))?;
    if serializer.is_none() {
        return Ok(None);
    }
    match serializer.call1((value,)) {
        Ok(replacement) => Ok(Some(replacement).filter(|r| !r.get_type().is(value.get_type()))),
        // An interrupt is not the serializer's failure.
        Err(error) if error.is_instance_of::<PyException>(py) => Ok(None),
        Err(interrupt) => Err(interrupt),
    }
}

/// What Flujo stores for a callable: its `__name__`, else its `__qualname__`, else its repr.
fn callable_name<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyString>> {
    for attribute in ["__name__", "__qualname__"] {
        if let Ok(name) = value.getattr(attribute) {
            if let Ok(name) = name.cast_into::<PyString>() {
                return Ok(name);
            }
        }
    }
    value.repr()
}

fn unsupported(value: &Bound<'_, PyAny>) -> Box<Failure> {
    Failure::new(Reason::Unsupported {
        type_name: type_name(&value.get_type()),
    })
}

/// What `Encoder::convert` found a value to be, beyond what it wrote itself.
enum Converted<'py> {
    Written,
    /// Encode this in place of the value (a serializer's result, an Enum's value...).
    Replaced(Bound<'py, PyAny>),
    Dict(Bound<'py, PyDict>),
    List(Bound<'py, PyList>),
    Tuple(Bound<'py, PyTuple>),
    Set(Vec<Bound<'py, PyAny>>),
}

/// A dataclass instance as a shallow dict of its fields, read with getattr (not `asdict`,
/// which deep-copies every field first). Paths then read like a model's: `['field']`.
fn dataclass_fields<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let py = value.py();
    let fields = DATACLASS_FIELDS.get_or_try_init(py, || -> PyResult<_> {
        Ok(py.import("dataclasses")?.getattr("fields")?.unbind())
    })?;
    let dict = PyDict::new(py);
    for field in fields.bind(py).call1((value,))?.try_iter()? {
        let name = field?.getattr("name")?;
        dict.set_item(&name, value.getattr(name.cast::<PyString>()?)?)?;
    }
    Ok(dict)
}
