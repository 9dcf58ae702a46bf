//! Python arguments of the runner-facing methods (runs, steps, traces, evaluations) to core
//! values. Keys of both Flujo releases are accepted: 0.4.35's runner sends `cost`, `tokens`,
//! `duration_ms` and `start_time`; 0.6.11's sends `cost_usd`, `token_counts`,
//! `execution_time_ms` and `created_at`, often with timestamps already turned into text.

use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};

use super::arguments::{integer, preview, real, run_id, text, timestamp_text, type_name};
use super::errors::{invalid_state, invalid_type, missing_key};
use super::from_python::encode_json;
use super::log_with_gil;
use crate::model::{
    Evaluation, MetadataCondition, MetadataTest, RunEnd, RunStart, SpanRecord, StepRecord,
};
use crate::timestamp::now_text;

/// Deeper trees are cut there, as Flujo does: a runaway trace must not exhaust the stack.
const MAX_TRACE_DEPTH: usize = 100;

fn as_dict<'a, 'py>(value: &'a Bound<'py, PyAny>, what: &str) -> PyResult<&'a Bound<'py, PyDict>> {
    value.cast::<PyDict>().map_err(|_| {
        invalid_type(
            value.py(),
            format!("{what} must be a dict, got {}", type_name(value)),
        )
    })
}

/// A present, non-None value under the first of `keys` found.
fn get<'py>(dict: &Bound<'py, PyDict>, keys: &[&str]) -> PyResult<Option<Bound<'py, PyAny>>> {
    for key in keys {
        if let Some(value) = dict.get_item(key)?.filter(|v| !v.is_none()) {
            return Ok(Some(value));
        }
    }
    Ok(None)
}

/// The value under the first of `keys` found, converted; `None` when absent or None.
fn optional<T>(
    dict: &Bound<'_, PyDict>,
    keys: &[&str],
    convert: impl Fn(&Bound<'_, PyAny>, &str) -> PyResult<T>,
) -> PyResult<Option<T>> {
    get(dict, keys)?.map(|v| convert(&v, keys[0])).transpose()
}

fn text_or(dict: &Bound<'_, PyDict>, key: &str, default: &str) -> PyResult<String> {
    get(dict, &[key])?.map_or(Ok(default.to_owned()), |v| loose_text(&v, key))
}

/// Names and versions are free-form in Flujo (`str(...)` of whatever was given).
fn loose_text(value: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    if value.is_instance_of::<PyString>() {
        return text(value, what);
    }
    let shown = value.str()?;
    text(shown.as_any(), what)
}

fn required<'py>(dict: &Bound<'py, PyDict>, key: &str, what: &str) -> PyResult<Bound<'py, PyAny>> {
    get(dict, &[key])?
        .ok_or_else(|| missing_key(dict.py(), format!("{what} needs the key {key:?}")))
}

fn time_or_now(dict: &Bound<'_, PyDict>, keys: &[&str]) -> PyResult<String> {
    match get(dict, keys)? {
        Some(value) => timestamp_text(&value, keys[0]),
        None => Ok(now_text()),
    }
}

pub(crate) fn run_start(run_data: &Bound<'_, PyAny>) -> PyResult<RunStart> {
    let data = as_dict(run_data, "run_data")?;
    let started_at = time_or_now(data, &["start_time", "created_at"])?;
    Ok(RunStart {
        run_id: run_id(&required(data, "run_id", "run_data")?)?,
        pipeline_id: text_or(data, "pipeline_id", "unknown")?,
        pipeline_name: text_or(data, "pipeline_name", "unknown")?,
        pipeline_version: text_or(data, "pipeline_version", "latest")?,
        status: text_or(data, "status", "running")?,
        updated_at: match get(data, &["updated_at"])? {
            Some(value) => timestamp_text(&value, "updated_at")?,
            None => started_at.clone(),
        },
        started_at,
        execution_time_ms: optional(data, &["execution_time_ms"], integer)?,
        memory_usage_mb: optional(data, &["memory_usage_mb"], real)?,
        total_steps: optional(data, &["total_steps"], integer)?.unwrap_or(0),
        error_message: optional(data, &["error_message"], loose_text)?,
    })
}

pub(crate) fn run_end(end_data: &Bound<'_, PyAny>) -> PyResult<RunEnd> {
    let data = as_dict(end_data, "end_data")?;
    Ok(RunEnd {
        status: text_or(data, "status", "completed")?,
        ended_at: time_or_now(data, &["end_time", "updated_at"])?,
        total_cost: optional(data, &["total_cost"], real)?,
        final_context: optional(data, &["final_context"], encode_json)?,
        execution_time_ms: optional(data, &["execution_time_ms"], integer)?,
        memory_usage_mb: optional(data, &["memory_usage_mb"], real)?,
        total_steps: optional(data, &["total_steps"], integer)?,
        error_message: optional(data, &["error_message"], loose_text)?,
    })
}

pub(crate) fn step_record(step_data: &Bound<'_, PyAny>) -> PyResult<StepRecord> {
    let data = as_dict(step_data, "step_data")?;
    let run = run_id(&required(data, "run_id", "step_data")?)?;
    let step_index = integer(&required(data, "step_index", "step_data")?, "step_index")?;
    let json = |key: &str| optional(data, &[key], encode_json);
    Ok(StepRecord {
        step_run_id: match get(data, &["step_run_id"])? {
            Some(value) => loose_text(&value, "step_run_id")?,
            None => format!("{run}:{step_index}"),
        },
        run_id: run,
        step_name: loose_text(&required(data, "step_name", "step_data")?, "step_name")?,
        step_index,
        status: text_or(data, "status", "completed")?,
        started_at: time_or_now(data, &["start_time", "created_at"])?,
        ended_at: optional(data, &["end_time"], timestamp_text)?,
        duration_ms: optional(data, &["duration_ms", "execution_time_ms"], integer)?,
        cost: optional(data, &["cost", "cost_usd"], real)?,
        tokens: optional(data, &["tokens", "token_counts"], integer)?,
        // Flujo always stores input and output as JSON, `null` when absent.
        input: json("input")?.unwrap_or_else(|| "null".to_owned()),
        output: json("output")?.unwrap_or_else(|| "null".to_owned()),
        error: json("error")?,
        raw_response: json("raw_response")?,
    })
}

/// A span whose start or end time is not a number of seconds: what is wrong with it.
struct BadSpanTime(String);

/// One span from a dict of the trace tree or of a `save_spans` list. A time that is not a
/// number is the inner error, which the two callers treat differently; anything else the dict
/// holds that cannot be stored (or an interrupt while reading it) is the outer one.
fn span(
    node: &Bound<'_, PyDict>,
    parent_span_id: Option<String>,
) -> PyResult<Result<SpanRecord, BadSpanTime>> {
    let span_id = loose_text(&required(node, "span_id", "a span")?, "span_id")?;
    let seconds = |key: &str| -> PyResult<Result<Option<f64>, BadSpanTime>> {
        Ok(match get(node, &[key])? {
            None => Ok(None),
            Some(v) => v
                .extract::<f64>()
                // Text that reads as a number, as Python's float() (and so Flujo) reads it.
                .or_else(|e| match v.cast::<PyString>() {
                    Ok(_) => v.py().get_type::<PyFloat>().call1((&v,))?.extract::<f64>(),
                    Err(_) => Err(e),
                })
                .map(Some)
                .map_err(|_| {
                    BadSpanTime(format!(
                        "span {span_id:?}: {key} must be a number of seconds, got {}",
                        match v.cast::<PyString>() {
                            Ok(_) => format!("the text {}", preview(&v)),
                            Err(_) => format!("a {}", type_name(&v)),
                        }
                    ))
                }),
        })
    };
    let start_time = match seconds("start_time")? {
        // SQLite stores NaN as NULL, which the NOT NULL start_time would refuse along with the
        // whole call. (A NaN end is stored as NULL, an unfinished span, as Flujo does.)
        Ok(Some(start)) if start.is_nan() => {
            return Ok(Err(BadSpanTime(format!(
                "span {span_id:?}: start_time must be a number of seconds, got NaN"
            ))))
        }
        Ok(start) => start.unwrap_or(0.0),
        Err(bad) => return Ok(Err(bad)),
    };
    let end_time = match seconds("end_time")? {
        Ok(end) => end,
        Err(bad) => return Ok(Err(bad)),
    };
    let attributes = match get(node, &["attributes"])? {
        Some(value) if value.is_instance_of::<PyDict>() => encode_json(&value, "attributes")?,
        // Another mapping, or an object a serializer turns into one, is kept as that object;
        // anything else is no attributes, as before.
        Some(value) => match encode_json(&value, "attributes") {
            Ok(json) if json.starts_with('{') => json,
            Ok(_) => "{}".to_owned(),
            Err(error) if error.is_instance_of::<PyException>(value.py()) => "{}".to_owned(),
            Err(interrupt) => return Err(interrupt),
        },
        None => "{}".to_owned(),
    };
    let name = text_or(node, "name", "span")?;
    Ok(Ok(SpanRecord {
        parent_span_id,
        name: if name.is_empty() {
            "span".to_owned()
        } else {
            name
        },
        start_time,
        end_time,
        status: text_or(node, "status", "running")?,
        attributes,
        span_id,
    }))
}

/// Flattens a trace tree pre-order; parent ids come from the tree's shape. A node that is not a
/// dict with `span_id` and `name` is skipped with its subtree, as in Flujo.
pub(crate) fn trace_spans(trace: &Bound<'_, PyAny>) -> PyResult<Vec<SpanRecord>> {
    let py = trace.py();
    let mut spans = Vec::new();
    let mut pending: Vec<(Bound<'_, PyAny>, Option<String>, usize)> =
        vec![(trace.clone(), None, 0)];
    while let Some((node, parent, depth)) = pending.pop() {
        let Ok(node) = node.cast::<PyDict>() else {
            continue;
        };
        if !(node.contains("span_id")? && node.contains("name")?) {
            continue;
        }
        if depth > MAX_TRACE_DEPTH {
            log_with_gil!(
                trace.py(),
                warn,
                "trace deeper than {MAX_TRACE_DEPTH} levels: deeper spans were not stored"
            )?;
            continue;
        }
        let record = span(node, parent)?.map_err(|BadSpanTime(why)| invalid_state(py, why))?;
        let id = record.span_id.clone();
        spans.push(record);
        if let Some(children) = get(node, &["children"])? {
            if let Ok(children) = children.cast::<PyList>() {
                // Reversed so the stack pops them in their given order.
                for child in children.iter().collect::<Vec<_>>().into_iter().rev() {
                    pending.push((child, Some(id.clone()), depth + 1));
                }
            }
        }
    }
    Ok(spans)
}

/// `save_spans`' flat list. Spans without an id are skipped; so are spans whose times are not
/// numbers (with a warning), as Flujo 0.6.11 does; any other span that cannot be stored fails
/// the call. Returns the pipeline name and version found
/// in the spans' `flujo.pipeline.*` attributes, for the placeholder run.
pub(crate) fn span_list(
    spans: &Bound<'_, PyAny>,
) -> PyResult<(Vec<SpanRecord>, Option<String>, Option<String>)> {
    let py = spans.py();
    let spans = spans.cast::<PyList>().map_err(|_| {
        invalid_type(
            py,
            format!("spans must be a list of dicts, got {}", type_name(spans)),
        )
    })?;
    let mut records = Vec::new();
    let (mut pipeline_name, mut pipeline_version) = (None, None);
    for item in spans.iter() {
        let Ok(item) = item.cast::<PyDict>() else {
            continue;
        };
        if get(item, &["span_id"])?.is_none_or(|id| id.is_truthy().is_ok_and(|t| !t)) {
            continue;
        }
        if let Some(attributes) = get(item, &["attributes"])? {
            if let Ok(attributes) = attributes.cast::<PyDict>() {
                for (key, slot) in [
                    ("flujo.pipeline.name", &mut pipeline_name),
                    ("flujo.pipeline.version", &mut pipeline_version),
                ] {
                    if slot.is_none() {
                        if let Some(value) = get(attributes, &[key])? {
                            *slot = Some(loose_text(&value, key)?);
                        }
                    }
                }
            }
        }
        let parent = optional(item, &["parent_span_id"], loose_text)?;
        match span(item, parent)? {
            Ok(record) => records.push(record),
            Err(BadSpanTime(why)) => log_with_gil!(item.py(), warn, "span skipped: {why}")?,
        }
    }
    Ok((records, pipeline_name, pipeline_version))
}

/// `metadata_filter` as conditions on a run's metadata, with Flujo's meaning: each dict of the
/// filter must be contained in the object stored at its place, any other value must equal
/// the stored one (see `MetadataTest`).
pub(crate) fn metadata_conditions(
    filter: Option<&Bound<'_, PyAny>>,
) -> PyResult<Vec<MetadataCondition>> {
    let Some(filter) = filter.filter(|f| !f.is_none()) else {
        return Ok(Vec::new());
    };
    let mut conditions = Vec::new();
    let mut pending = vec![(
        "$".to_owned(),
        as_dict(filter, "metadata_filter")?.clone().into_any(),
        Compared::Contains,
    )];
    while let Some((path, value, compared)) = pending.pop() {
        let mut test = |test| {
            conditions.push(MetadataCondition {
                path: path.clone(),
                test,
            })
        };
        if let Ok(dict) = value.cast::<PyDict>() {
            match compared {
                // The whole filter is a dict, and so is what its keys are found in.
                _ if path == "$" => {}
                Compared::Contains if dict.is_empty() => test(MetadataTest::Object),
                Compared::Contains => {}
                Compared::Equals => test(MetadataTest::ObjectOfSize(dict.len())),
            }
            // A snapshot: encoding a value runs the caller's code, which may change the dict.
            for item in dict.items().iter() {
                let (key, value) = (item.get_item(0)?, item.get_item(1)?);
                let key = text(&key, "metadata_filter keys")?;
                pending.push((format!("{path}.{}", path_label(&key)), value, compared));
            }
        } else if let Ok(list) = value.cast::<PyList>() {
            let items: Vec<_> = list.iter().collect();
            match plain_items(&items)? {
                // Its arrays and objects are each compared on their own, at their place.
                Some(like) => {
                    test(MetadataTest::ArrayLike(like));
                    for (index, item) in items.into_iter().enumerate() {
                        if item.cast::<PyDict>().is_ok() || item.cast::<PyList>().is_ok() {
                            pending.push((format!("{path}[{index}]"), item, Compared::Equals));
                        }
                    }
                }
                None => {
                    test(MetadataTest::ArrayOfLength(items.len()));
                    for (index, item) in items.into_iter().enumerate() {
                        pending.push((format!("{path}[{index}]"), item, Compared::Equals));
                    }
                }
            }
        } else if value.cast::<PyTuple>().is_ok() {
            // Python finds no tuple equal to a list, and JSON holds only lists.
            test(MetadataTest::Nothing);
        } else if value.is_none() {
            test(MetadataTest::Null);
        } else if let Ok(text) = value.cast::<PyString>() {
            test(MetadataTest::Text(text.to_str()?.to_owned()));
        } else if let Ok(flag) = value.cast::<PyBool>() {
            test(MetadataTest::Integer(i64::from(flag.is_true())));
        } else if value.is_instance_of::<PyInt>() {
            test(match value.extract::<i64>() {
                Ok(n) => MetadataTest::Integer(n),
                Err(_) => match value.str() {
                    Ok(digits) => MetadataTest::BigInteger(digits.to_str()?.to_owned()),
                    // Longer than Python writes out (sys.get_int_max_str_digits()), so no
                    // stored JSON holds it either.
                    Err(_) => MetadataTest::Nothing,
                },
            });
        } else if let Ok(x) = value.cast::<PyFloat>() {
            test(MetadataTest::Real(x.value()));
        } else {
            test(MetadataTest::EncodedAs(encode_json(
                &value,
                "metadata_filter",
            )?));
        }
    }
    Ok(conditions)
}

/// A key as a quoted label of a JSON path (SQL/JSON syntax), with JSON string escapes: a control character
/// (a NUL above all) is not allowed in the path as it is.
fn path_label(key: &str) -> String {
    let mut label = String::with_capacity(key.len() + 2);
    label.push('"');
    for c in key.chars() {
        match c {
            '"' => label.push_str("\\\""),
            '\\' => label.push_str("\\\\"),
            c if u32::from(c) < 0x20 => label.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => label.push(c),
        }
    }
    label.push('"');
    label
}

/// The items of a filter's list as a JSON array for `MetadataTest::ArrayLike`, when each is text,
/// None, a bool, a 64-bit int, a finite float, or a dict or list (written `[]`: compared on its
/// own); `None` when some other value needs a condition of its own.
fn plain_items(items: &[Bound<'_, PyAny>]) -> PyResult<Option<String>> {
    let mut json = String::from("[");
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            json.push(',');
        }
        if item.cast::<PyDict>().is_ok() || item.cast::<PyList>().is_ok() {
            json.push_str("[]");
        } else if item.is_none() {
            json.push_str("null");
        } else if let Ok(text) = item.cast::<PyString>() {
            json.push_str(&encode_json(text.as_any(), "metadata_filter")?);
        } else if let Ok(flag) = item.cast::<PyBool>() {
            json.push_str(if flag.is_true() { "true" } else { "false" });
        } else if let (true, Ok(n)) = (item.is_instance_of::<PyInt>(), item.extract::<i64>()) {
            json.push_str(&n.to_string());
        } else if let Some(x) = item
            .cast::<PyFloat>()
            .ok()
            .map(|x| x.value())
            .filter(|x| x.is_finite())
        {
            json.push_str(&format!("{x:?}"));
        } else {
            return Ok(None);
        }
    }
    json.push(']');
    Ok(Some(json))
}

/// How a value of the metadata filter is compared with the stored one.
#[derive(Clone, Copy)]
enum Compared {
    /// A dict is contained in the stored object (Flujo's rule for the filter's own dicts).
    Contains,
    /// Equal as Python's `==` has it (inside a list, a dict must match whole).
    Equals,
}

pub(crate) fn evaluation(
    run: &Bound<'_, PyAny>,
    score: &Bound<'_, PyAny>,
    feedback: Option<&Bound<'_, PyAny>>,
    step_name: Option<&Bound<'_, PyAny>>,
    metadata: Option<&Bound<'_, PyAny>>,
) -> PyResult<Evaluation> {
    let optional_text = |value: Option<&Bound<'_, PyAny>>, what: &str| {
        value
            .filter(|v| !v.is_none())
            .map(|v| loose_text(v, what))
            .transpose()
    };
    Ok(Evaluation {
        run_id: run_id(run)?,
        score: real(score, "score")?,
        feedback: optional_text(feedback, "feedback")?,
        step_name: optional_text(step_name, "step_name")?,
        metadata: metadata
            .filter(|v| !v.is_none())
            .map(|v| encode_json(v, "metadata"))
            .transpose()?,
    })
}
