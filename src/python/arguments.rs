//! Python arguments to core values: validated and encoded once, under the GIL, before any work
//! is queued. Every failure names the argument or state key and says what to pass instead.

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple, PyType};

use super::errors::{invalid_state, invalid_type, missing_key};
use super::from_python::encode_json;
use crate::engine::FreshLayout;
use crate::model::{BackgroundFields, StateRecord, WorkflowQuery, WORKFLOW_STATUSES};
use crate::timestamp::Age;

pub(crate) fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .name()
        .map_or_else(|_| "?".to_owned(), |n| n.to_string())
}

/// A short quotation of a str argument for an error message (never a repr of arbitrary objects:
/// those can be huge or raise).
pub(crate) fn preview(value: &Bound<'_, PyAny>) -> String {
    const LIMIT: usize = 60;
    let Ok(text) = value
        .cast::<PyString>()
        .map(|s| s.to_string_lossy().into_owned())
    else {
        return format!("(a {})", type_name(value));
    };
    if text.chars().count() <= LIMIT {
        format!("{text:?}")
    } else {
        format!(
            "{:?}... ({} characters)",
            text.chars().take(LIMIT).collect::<String>(),
            text.chars().count()
        )
    }
}

pub(crate) fn run_id(value: &Bound<'_, PyAny>) -> PyResult<String> {
    let text = value.cast::<PyString>().map_err(|_| {
        invalid_type(
            value.py(),
            format!("run_id must be a str, got {}", type_name(value)),
        )
    })?;
    text.to_str().map(str::to_owned).map_err(|_| {
        invalid_state(
            value.py(),
            "run_id contains a lone surrogate, which cannot be stored; pass valid Unicode text",
        )
    })
}

/// The keys every state must have, as in Flujo.
const REQUIRED_STATE_KEYS: [&str; 8] = [
    "pipeline_id",
    "pipeline_name",
    "pipeline_version",
    "current_step_index",
    "pipeline_context",
    "status",
    "created_at",
    "updated_at",
];

/// `state` as a record ready to store.
pub(crate) fn state_record(state: &Bound<'_, PyAny>) -> PyResult<StateRecord> {
    let py = state.py();
    let state = state.cast::<PyDict>().map_err(|_| {
        invalid_type(
            py,
            format!("state must be a dict, got {}", type_name(state)),
        )
    })?;
    // All the missing keys at once, so a hand-written state is fixed in one go.
    let mut missing = Vec::new();
    for key in REQUIRED_STATE_KEYS {
        if !state.contains(key)? {
            missing.push(format!("{key:?}"));
        }
    }
    if !missing.is_empty() {
        return Err(missing_key(
            py,
            format!(
                "state is missing the required key{} {}; every state needs {}",
                if missing.len() == 1 { "" } else { "s" },
                missing.join(", "),
                REQUIRED_STATE_KEYS.join(", "),
            ),
        ));
    }
    let required = |key: &str| -> PyResult<Bound<'_, PyAny>> {
        state
            .get_item(key)?
            .ok_or_else(|| missing_key(py, format!("state lost its key {key:?} while being read")))
    };
    let optional = |key: &str| -> PyResult<Option<Bound<'_, PyAny>>> {
        Ok(state.get_item(key)?.filter(|v| !v.is_none()))
    };

    let status = text(&required("status")?, "status")?;
    if !WORKFLOW_STATUSES.contains(&status.as_str()) {
        return Err(invalid_state(
            py,
            format!(
                "state['status'] is {status:?}; it must be one of {}",
                WORKFLOW_STATUSES.join(", ")
            ),
        ));
    }
    Ok(StateRecord {
        pipeline_id: text(&required("pipeline_id")?, "pipeline_id")?,
        pipeline_name: text(&required("pipeline_name")?, "pipeline_name")?,
        pipeline_version: version_text(&required("pipeline_version")?)?,
        current_step_index: integer(&required("current_step_index")?, "current_step_index")?,
        pipeline_context: encode_json(&required("pipeline_context")?, "pipeline_context")?,
        last_step_output: optional("last_step_output")?
            .map(|v| encode_json(&v, "last_step_output"))
            .transpose()?,
        step_history: optional("step_history")?
            .map(|v| encode_json(&v, "step_history"))
            .transpose()?,
        status,
        created_at: timestamp_text(&required("created_at")?, "state['created_at']")?,
        updated_at: timestamp_text(&required("updated_at")?, "state['updated_at']")?,
        total_steps: optional("total_steps")?
            .map(|v| integer(&v, "total_steps"))
            .transpose()?
            .unwrap_or(0),
        error_message: optional("error_message")?
            .map(|v| text(&v, "error_message"))
            .transpose()?,
        execution_time_ms: optional("execution_time_ms")?
            .map(|v| integer(&v, "execution_time_ms"))
            .transpose()?,
        memory_usage_mb: optional("memory_usage_mb")?
            .map(|v| real(&v, "memory_usage_mb"))
            .transpose()?,
        background: BackgroundFields {
            metadata: optional("metadata")?
                .map(|v| encode_json(&v, "metadata"))
                .transpose()?,
            is_background_task: optional("is_background_task")?
                .map(|v| v.is_truthy())
                .transpose()?
                .unwrap_or(false),
            parent_run_id: optional("parent_run_id")?
                .map(|v| text(&v, "parent_run_id"))
                .transpose()?,
            task_id: optional("task_id")?
                .map(|v| text(&v, "task_id"))
                .transpose()?,
            background_error: optional("background_error")?
                .map(|v| text(&v, "background_error"))
                .transpose()?,
        },
    })
}

pub(crate) fn workflow_query(
    status: Option<&Bound<'_, PyAny>>,
    pipeline_id: Option<&Bound<'_, PyAny>>,
    limit: Option<&Bound<'_, PyAny>>,
    offset: Option<&Bound<'_, PyAny>>,
) -> PyResult<WorkflowQuery> {
    Ok(WorkflowQuery {
        status: optional_filter(status, "status")?,
        pipeline_id: optional_filter(pipeline_id, "pipeline_id")?,
        // A negative limit means "no limit", as in SQLite, which Flujo hands it to.
        limit: match limit.filter(|v| !v.is_none()) {
            Some(v) => u64::try_from(integer(v, "limit")?).ok(),
            None => None,
        },
        offset: offset
            .filter(|v| !v.is_none())
            .map(|v| count(v, "offset"))
            .transpose()?
            .unwrap_or(0),
    })
}

/// A filter where only `None` means "no filter" and any text, the empty one too, is matched as
/// it is, as Flujo 0.6.11's background-task lists do.
pub(crate) fn literal_filter(
    value: Option<&Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<Option<String>> {
    value
        .filter(|v| !v.is_none())
        .map(|v| text(v, what))
        .transpose()
}

/// A filter argument: `None` or a str. An empty one means "no filter", as in Flujo, and is
/// passed on as `None`, the engine's only spelling of that.
pub(crate) fn optional_filter(
    value: Option<&Bound<'_, PyAny>>,
    what: &str,
) -> PyResult<Option<String>> {
    Ok(literal_filter(value, what)?.filter(|text| !text.is_empty()))
}

/// A "how far back" argument: a real number of hours or days, given to `unit` (`Age::hours` or
/// `Age::days`) to check and convert.
pub(crate) fn age(
    value: &Bound<'_, PyAny>,
    what: &str,
    unit: fn(f64, &str) -> Result<Age, String>,
) -> PyResult<Age> {
    unit(amount(value, what)?, what).map_err(|message| invalid_state(value.py(), message))
}

fn amount(value: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    if value.is_instance_of::<PyBool>()
        || !(value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>())
    {
        return Err(invalid_type(
            value.py(),
            format!("{what} must be an int or float, got {}", type_name(value)),
        ));
    }
    value.extract::<f64>().map_err(|_| {
        invalid_state(
            value.py(),
            format!("{what} is too large to be a number of hours or days"),
        )
    })
}

fn count(value: &Bound<'_, PyAny>, what: &str) -> PyResult<u64> {
    let n = integer(value, what)?;
    u64::try_from(n).map_err(|_| {
        invalid_state(
            value.py(),
            format!("{what} must be >= 0 (or None), got {n}"),
        )
    })
}

/// The layout a brand-new file gets, named as the shim names it.
pub(crate) fn fresh_layout(py: Python<'_>, name: &str) -> PyResult<FreshLayout> {
    match name {
        "flujo-0.4" => Ok(FreshLayout::Flujo04),
        "flujo-0.6" => Ok(FreshLayout::Flujo06),
        other => Err(invalid_state(
            py,
            format!("fresh_layout must be \"flujo-0.4\" or \"flujo-0.6\", got {other:?}"),
        )),
    }
}

pub(crate) fn text(value: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    let py = value.py();
    let text = value.cast::<PyString>().map_err(|_| {
        invalid_type(
            py,
            format!("{what} must be a str, got {}", type_name(value)),
        )
    })?;
    text.to_str().map(str::to_owned).map_err(|_| {
        invalid_state(
            py,
            format!("{what} contains a lone surrogate, which cannot be stored"),
        )
    })
}

/// Flujo stores `pipeline_version` in a TEXT column, so an int version becomes its digits.
fn version_text(value: &Bound<'_, PyAny>) -> PyResult<String> {
    if value.is_instance_of::<PyInt>() && !value.is_instance_of::<PyBool>() {
        return Ok(value.str()?.to_str()?.to_owned());
    }
    text(value, "pipeline_version")
}

pub(crate) fn integer(value: &Bound<'_, PyAny>, what: &str) -> PyResult<i64> {
    let py = value.py();
    if value.is_instance_of::<PyBool>() || !value.is_instance_of::<PyInt>() {
        return Err(invalid_type(
            py,
            format!("{what} must be an int, got {}", type_name(value)),
        ));
    }
    value
        .extract::<i64>()
        .map_err(|_| invalid_state(py, format!("{what} does not fit in a 64-bit integer")))
}

pub(crate) fn real(value: &Bound<'_, PyAny>, what: &str) -> PyResult<f64> {
    let py = value.py();
    if value.is_instance_of::<PyBool>()
        || !(value.is_instance_of::<PyInt>() || value.is_instance_of::<PyFloat>())
    {
        return Err(invalid_type(
            py,
            format!("{what} must be a float or int, got {}", type_name(value)),
        ));
    }
    let Ok(number) = value.extract::<f64>() else {
        return Err(invalid_state(
            py,
            format!("{what} is an int too large for a float (at most ~1.8e308)"),
        ));
    };
    if number.is_finite() {
        Ok(number)
    } else {
        Err(invalid_state(
            py,
            format!("{what} must be finite, got {number}"),
        ))
    }
}

/// `time_range`: a `(start, end)` pair of epoch seconds, as a tuple or a list.
pub(crate) fn time_range(value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<(f64, f64)>> {
    let Some(value) = value.filter(|v| !v.is_none()) else {
        return Ok(None);
    };
    let pair = match value.cast::<PyTuple>() {
        Ok(tuple) => tuple.to_list(),
        Err(_) => value.cast::<PyList>().cloned().map_err(|_| {
            invalid_type(
                value.py(),
                format!(
                    "time_range must be a (start, end) tuple of epoch seconds, got {}",
                    type_name(value)
                ),
            )
        })?,
    };
    if pair.len() != 2 {
        return Err(invalid_state(
            value.py(),
            format!(
                "time_range must hold exactly two numbers (start, end), got {}",
                pair.len()
            ),
        ));
    }
    Ok(Some((
        real(&pair.get_item(0)?, "time_range's start")?,
        real(&pair.get_item(1)?, "time_range's end")?,
    )))
}

/// A datetime (aware ones converted to UTC), a date, or ISO 8601 text (Flujo 0.6.11's runner
/// sends its timestamps already turned into strings) as its stored text; see `timestamp`.
pub(crate) fn timestamp_text(value: &Bound<'_, PyAny>, what: &str) -> PyResult<String> {
    static DATETIME: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static DATE: PyOnceLock<Py<PyType>> = PyOnceLock::new();
    static UTC: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let py = value.py();
    let datetime_type = DATETIME.import(py, "datetime", "datetime")?;
    let value = if value.is_instance_of::<PyString>() {
        datetime_type
            .call_method1("fromisoformat", (value,))
            .map_err(|_| {
                invalid_state(
                    py,
                    format!(
                        "{what} is the text {}, which is not an ISO 8601 timestamp",
                        preview(value)
                    ),
                )
            })?
    } else {
        value.clone()
    };
    let text = if value.is_instance(datetime_type)? {
        let in_utc = || -> PyResult<Bound<'_, PyAny>> {
            let aware = !value.call_method0("utcoffset")?.is_none();
            let in_utc = if aware {
                value.call_method1("astimezone", (UTC.import(py, "datetime", "UTC")?,))?
            } else {
                value.clone()
            };
            in_utc.call_method1("isoformat", (" ",))
        };
        in_utc().map_err(|cause| {
            let error = invalid_state(
                py,
                format!("{what} cannot be stored as a UTC timestamp: {cause}"),
            );
            error.set_cause(py, Some(cause));
            error
        })?
    } else if value.is_instance(DATE.import(py, "datetime", "date")?)? {
        value.call_method0("isoformat")?
    } else {
        return Err(invalid_type(
            py,
            format!(
                "{what} must be a datetime, a date or ISO 8601 text, got {}",
                type_name(&value)
            ),
        ));
    };
    Ok(text.cast::<PyString>()?.to_str()?.to_owned())
}
