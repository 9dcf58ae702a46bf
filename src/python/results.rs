//! Core responses to Python objects, in the shapes Flujo's backend returns (spec section 3.1).

use pyo3::gc::PyVisit;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyDict, PyList};
use pyo3::{IntoPyObjectExt, PyTraverseError};

use super::errors::database_error;
use super::log_with_gil;
use super::run_results;
use super::to_python::decode_json;
use crate::engine::Response;
use crate::model::{
    Cell, StateListing, StoredBackground, StoredState, WorkflowStats, WorkflowSummary,
};

/// The Python value of a response: at once, or for a long list, a chunk per turn of the event
/// loop (see `ListInProgress`).
pub(crate) fn response_to_python(py: Python<'_>, response: Response) -> PyResult<Built> {
    let done = |value: Py<PyAny>| Ok(Built::Done(value));
    match response {
        Response::Done => done(py.None()),
        Response::State(None) => done(py.None()),
        Response::State(Some(state)) => {
            let run_id = state.run_id.clone();
            done(
                in_row(py, &run_id, stored_state(py, *state))?
                    .into_any()
                    .unbind(),
            )
        }
        Response::States(states) => list(py, states, state_listing),
        Response::Workflows(items) => list(py, items, listed_workflow),
        Response::Stats(stats) => done(workflow_stats(py, stats)?.into_any().unbind()),
        Response::Count(n) => done(n.into_py_any(py)?),
        Response::RunDetails(None) | Response::SystemState(None) => done(py.None()),
        Response::RunDetails(Some(details)) => {
            done(run_results::run_details(py, *details)?.into_any().unbind())
        }
        Response::Steps(steps) => list(py, steps, run_results::step_details),
        Response::Runs(runs) => list(py, runs, run_results::run_summary),
        Response::Spans(spans) => list(py, spans, run_results::span),
        Response::Trace(spans) => done(run_results::trace(py, spans)?),
        Response::SpanStatistics(stats) => {
            done(run_results::span_statistics(py, stats)?.into_any().unbind())
        }
        Response::SystemState(Some(entry)) => {
            done(run_results::system_state(py, entry)?.into_any().unbind())
        }
        Response::Evaluations(items) => list(py, items, run_results::evaluation),
    }
}

/// A response's Python value, or a list still being built.
pub(crate) enum Built {
    Done(Py<PyAny>),
    Growing(ListInProgress),
}

impl Built {
    /// The whole value, what is left built at once (for callers that are not an event loop).
    pub(crate) fn finish(self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        match self {
            Built::Done(value) => Ok(value),
            Built::Growing(mut list) => loop {
                if let Some(value) = list.advance(py)? {
                    return Ok(value);
                }
            },
        }
    }
}

/// Items of a list converted per turn of the event loop, 2-5 ms of work: a list of 100,000
/// runs (~0.35 s to build) lets the loop run its other callbacks between turns rather than
/// blocking it throughout. (A full turn also pauses the collector: `CollectorPaused::ITEMS`.)
const ITEMS_PER_TURN: usize = 1_000;

/// A list result being converted a chunk at a time; nobody sees the list before it is whole.
pub(crate) struct ListInProgress {
    list: Py<PyList>,
    rest: Box<dyn RemainingItems>,
}

impl ListInProgress {
    /// Visits the list built so far (the items still to convert are not Python objects yet).
    pub(crate) fn traverse(&self, visit: &PyVisit<'_>) -> Result<(), PyTraverseError> {
        visit.call(&self.list)
    }

    /// Converts the next chunk of items; the finished list once the last one is in.
    pub(crate) fn advance(&mut self, py: Python<'_>) -> PyResult<Option<Py<PyAny>>> {
        let list = self.list.bind(py);
        Ok(self
            .rest
            .append_some(py, list)?
            .then(|| list.clone().into_any().unbind()))
    }
}

trait RemainingItems: Send {
    /// Appends up to `ITEMS_PER_TURN` more items to `list`; true once none is left.
    fn append_some(&mut self, py: Python<'_>, list: &Bound<'_, PyList>) -> PyResult<bool>;
}

type Convert<T> = for<'py> fn(Python<'py>, T) -> PyResult<Bound<'py, PyDict>>;

struct Items<T> {
    items: std::vec::IntoIter<T>,
    convert: Convert<T>,
}

impl<T: Send> RemainingItems for Items<T> {
    fn append_some(&mut self, py: Python<'_>, list: &Bound<'_, PyList>) -> PyResult<bool> {
        let _paused = CollectorPaused::for_items(py, self.items.len().min(ITEMS_PER_TURN))?;
        for item in self.items.by_ref().take(ITEMS_PER_TURN) {
            list.append((self.convert)(py, item)?)?;
        }
        Ok(self.items.len() == 0)
    }
}

fn list<T: Send + 'static>(py: Python<'_>, items: Vec<T>, convert: Convert<T>) -> PyResult<Built> {
    let mut list = ListInProgress {
        list: PyList::empty(py).unbind(),
        rest: Box::new(Items {
            items: items.into_iter(),
            convert,
        }),
    };
    Ok(match list.advance(py)? {
        Some(whole) => Built::Done(whole),
        None => Built::Growing(list),
    })
}

/// Python's cyclic garbage collector, paused while a big result is built. Every container
/// created counts towards a collection, so 100,000 result dicts set off several full ones, each
/// walking every object of the program (~55 ms with Flujo imported; a third of the time of
/// `list_workflows()` at 100,000 runs), although no result can be part of a cycle. No Python
/// code may run while it is paused (no logging: a handler can let other threads run), so that
/// no other thread finds the collector off; the next collection looks at the results once.
pub(crate) struct CollectorPaused<'py>(Option<Bound<'py, PyAny>>);

impl<'py> CollectorPaused<'py> {
    /// Below this many items a collection or two costs less than pausing.
    const ITEMS: usize = 1_000;

    pub(crate) fn for_items(py: Python<'py>, items: usize) -> PyResult<Self> {
        static GC: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
        if items < Self::ITEMS {
            return Ok(CollectorPaused(None));
        }
        let gc = GC
            .get_or_try_init(py, || py.import("gc").map(Bound::unbind))?
            .bind(py)
            .clone()
            .into_any();
        // One the program paused itself stays as it is.
        if !gc.call_method0(intern!(py, "isenabled"))?.is_truthy()? {
            return Ok(CollectorPaused(None));
        }
        gc.call_method0(intern!(py, "disable"))?;
        Ok(CollectorPaused(Some(gc)))
    }
}

impl Drop for CollectorPaused<'_> {
    fn drop(&mut self) {
        if let Some(gc) = &self.0 {
            if let Err(error) = gc.call_method0(intern!(gc.py(), "enable")) {
                error.write_unraisable(gc.py(), None);
            }
        }
    }
}

/// `dict[name] = cell(value.name)` for each field, in order, under its interned name.
macro_rules! set_cells {
    ($py:expr, $dict:expr, $value:expr => $($field:ident),+ $(,)?) => {
        $($dict.set_item(intern!($py, stringify!($field)), cell($py, $value.$field)?)?;)+
    };
}
pub(crate) use set_cells;

pub(crate) fn cell(py: Python<'_>, value: Cell) -> PyResult<Py<PyAny>> {
    match value {
        Cell::Null => Ok(py.None()),
        Cell::Integer(i) => i.into_py_any(py),
        Cell::Real(f) => f.into_py_any(py),
        Cell::Text(t) => t.into_py_any(py),
        Cell::Blob(b) => Ok(PyBytes::new(py, &b).into_any().unbind()),
    }
}

/// Flujo returns 0 for a NULL or otherwise falsy `total_steps`.
fn total_steps(py: Python<'_>, value: Cell) -> PyResult<Py<PyAny>> {
    match value {
        Cell::Null | Cell::Integer(0) | Cell::Real(0.0) => 0.into_py_any(py),
        Cell::Text(t) if t.is_empty() => 0.into_py_any(py),
        other => cell(py, other),
    }
}

/// A JSON column's value, or `missing()` for SQL NULL. Text that does not parse can only have
/// been written by another program; the error names the column so it can be repaired.
pub(crate) fn json_or(
    py: Python<'_>,
    column: &str,
    text: Option<String>,
    missing: impl FnOnce() -> PyResult<Py<PyAny>>,
) -> PyResult<Py<PyAny>> {
    match text {
        Some(text) => decode_json(py, &text).map(Bound::unbind).map_err(|cause| {
            let error = database_error(
                py,
                format!("column {column} holds malformed JSON ({cause})"),
            );
            error.set_cause(py, Some(cause));
            error
        }),
        None => missing(),
    }
}

/// Adds which row failed to convert, for errors about stored data.
fn in_row<T>(py: Python<'_>, run_id: &Cell, converted: PyResult<T>) -> PyResult<T> {
    converted.map_err(|cause| {
        let run = match run_id {
            Cell::Text(t) if t.chars().count() <= 80 => format!("{t:?}"),
            Cell::Text(t) => format!("{:?}...", t.chars().take(80).collect::<String>()),
            other => format!("{other:?}"),
        };
        let error = database_error(
            py,
            format!("the stored row of run {run} cannot be read: {cause}; repair or delete it"),
        );
        error.set_cause(py, Some(cause));
        error
    })
}

/// Stored timestamp text as a `datetime` (aware exactly when the text has an offset). Text that
/// is not ISO 8601 (only direct SQL can put it there) is returned as it is rather than failing
/// the whole load.
pub(crate) fn datetime(py: Python<'_>, value: Cell) -> PyResult<Py<PyAny>> {
    static FROMISOFORMAT: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    let Cell::Text(text) = value else {
        return cell(py, value);
    };
    let parse = FROMISOFORMAT.get_or_try_init(py, || {
        py.import("datetime")?
            .getattr("datetime")?
            .getattr("fromisoformat")
            .map(Bound::unbind)
    })?;
    match parse.bind(py).call1((text.as_str(),)) {
        Ok(parsed) => Ok(parsed.unbind()),
        Err(_) => {
            log_with_gil!(
                py,
                warn,
                "timestamp {text:?} is not ISO 8601; returning it as text"
            )?;
            text.into_py_any(py)
        }
    }
}

fn stored_state(py: Python<'_>, s: StoredState) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, s => run_id, pipeline_id, pipeline_name, pipeline_version, current_step_index);
    d.set_item(
        intern!(py, "pipeline_context"),
        json_or(py, "pipeline_context", s.pipeline_context, || {
            Ok(PyDict::new(py).into_any().unbind())
        })?,
    )?;
    d.set_item(
        intern!(py, "last_step_output"),
        json_or(py, "last_step_output", s.last_step_output, || Ok(py.None()))?,
    )?;
    d.set_item(
        intern!(py, "step_history"),
        json_or(py, "step_history", s.step_history, || {
            Ok(PyList::empty(py).into_any().unbind())
        })?,
    )?;
    d.set_item(intern!(py, "status"), cell(py, s.status)?)?;
    d.set_item(intern!(py, "created_at"), datetime(py, s.created_at)?)?;
    d.set_item(intern!(py, "updated_at"), datetime(py, s.updated_at)?)?;
    d.set_item(intern!(py, "total_steps"), total_steps(py, s.total_steps)?)?;
    set_cells!(py, d, s => error_message, execution_time_ms, memory_usage_mb);
    add_background(py, &d, s.background)?;
    Ok(d)
}

fn add_background(py: Python<'_>, d: &Bound<'_, PyDict>, b: StoredBackground) -> PyResult<()> {
    d.set_item(
        intern!(py, "metadata"),
        json_or(py, "metadata", b.metadata, || {
            Ok(PyDict::new(py).into_any().unbind())
        })?,
    )?;
    let is_background = match b.is_background_task {
        Cell::Integer(i) => i != 0,
        Cell::Real(f) => f != 0.0,
        Cell::Text(t) => !t.is_empty() && t != "0",
        Cell::Blob(bytes) => !bytes.is_empty(),
        Cell::Null => false,
    };
    d.set_item(intern!(py, "is_background_task"), is_background)?;
    set_cells!(py, d, b => parent_run_id, task_id, background_error);
    Ok(())
}

fn listed_workflow(py: Python<'_>, item: WorkflowSummary) -> PyResult<Bound<'_, PyDict>> {
    let run_id = item.run_id.clone();
    in_row(py, &run_id, workflow_summary(py, item))
}

fn workflow_summary(py: Python<'_>, s: WorkflowSummary) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, s => run_id, pipeline_id, pipeline_name, pipeline_version, current_step_index, status, created_at, updated_at);
    d.set_item(intern!(py, "total_steps"), total_steps(py, s.total_steps)?)?;
    set_cells!(py, d, s => error_message, execution_time_ms);
    // Left out when the run recorded none (Flujo gives None), so that the user guide's
    // `wf.get('memory_usage_mb', 0) > 100` works on every run, not only on measured ones.
    if !matches!(s.memory_usage_mb, Cell::Null) {
        d.set_item(intern!(py, "memory_usage_mb"), cell(py, s.memory_usage_mb)?)?;
    }
    add_background(py, &d, s.background)?;
    Ok(d)
}

fn state_listing(py: Python<'_>, s: StateListing) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, s => run_id, status, created_at, updated_at);
    Ok(d)
}

fn workflow_stats(py: Python<'_>, s: WorkflowStats) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item(intern!(py, "total_workflows"), s.total_workflows)?;
    d.set_item(intern!(py, "status_counts"), s.status_counts)?;
    d.set_item(intern!(py, "recent_workflows_24h"), s.recent_workflows_24h)?;
    // Flujo reports the integer 0 when no run has an execution time, a float average otherwise.
    match s.average_execution_time_ms {
        Some(average) => d.set_item(intern!(py, "average_execution_time_ms"), average)?,
        None => d.set_item(intern!(py, "average_execution_time_ms"), 0)?,
    }
    d.set_item(
        intern!(py, "background_status_counts"),
        s.background_status_counts,
    )?;
    Ok(d)
}
