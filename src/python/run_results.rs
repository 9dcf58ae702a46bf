//! Runner-facing results to Python, with the keys of both Flujo releases in each dict, so code
//! written against either (its runner, `flujo lens`) finds what it reads.

use std::collections::HashMap;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::log_with_gil;
use super::results::{cell, datetime, json_or, set_cells, CollectorPaused};
use crate::model::{
    Cell, RunDetails, RunSummary, SpanStatistics, StepDetails, StoredEvaluation, StoredSpan,
    SystemStateEntry,
};

fn json_or_none(py: Python<'_>, column: &str, text: Option<String>) -> PyResult<Py<PyAny>> {
    json_or(py, column, text, || Ok(py.None()))
}

fn json_or_empty_dict(py: Python<'_>, column: &str, text: Option<String>) -> PyResult<Py<PyAny>> {
    json_or(py, column, text, || Ok(PyDict::new(py).into_any().unbind()))
}

pub(crate) fn run_details(py: Python<'_>, r: RunDetails) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, r => run_id, pipeline_id, pipeline_name, pipeline_version, status, start_time, end_time, total_cost);
    // Flujo treats a stored JSON `null` like a missing context.
    d.set_item(
        intern!(py, "final_context"),
        json_or_none(py, "final_context", r.final_context)?,
    )?;
    set_cells!(py, d, r => created_at, updated_at, execution_time_ms, memory_usage_mb, total_steps, error_message);
    Ok(d)
}

pub(crate) fn step_details(py: Python<'_>, s: StepDetails) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, s => step_name, step_index, status);
    let start_time = cell(py, s.start_time)?;
    d.set_item(intern!(py, "start_time"), start_time.clone_ref(py))?;
    d.set_item(intern!(py, "created_at"), start_time)?;
    d.set_item(intern!(py, "end_time"), cell(py, s.end_time)?)?;
    let duration = cell(py, s.duration_ms)?;
    d.set_item(intern!(py, "duration_ms"), duration.clone_ref(py))?;
    d.set_item(intern!(py, "execution_time_ms"), duration)?;
    let cost = cell(py, s.cost)?;
    d.set_item(intern!(py, "cost"), cost.clone_ref(py))?;
    d.set_item(intern!(py, "cost_usd"), cost)?;
    let tokens = cell(py, s.tokens)?;
    d.set_item(intern!(py, "tokens"), tokens.clone_ref(py))?;
    d.set_item(intern!(py, "token_counts"), tokens)?;
    d.set_item(intern!(py, "input"), json_or_none(py, "input", s.input)?)?;
    d.set_item(intern!(py, "output"), json_or_none(py, "output", s.output)?)?;
    d.set_item(intern!(py, "error"), json_or_none(py, "error", s.error)?)?;
    d.set_item(
        intern!(py, "raw_response"),
        json_or_none(py, "raw_response", s.raw_response)?,
    )?;
    Ok(d)
}

pub(crate) fn run_summary(py: Python<'_>, r: RunSummary) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, r => run_id, pipeline_name, pipeline_version, status, start_time, end_time, total_cost, created_at, updated_at);
    d.set_item(
        intern!(py, "metadata"),
        json_or_empty_dict(py, "metadata", r.metadata)?,
    )?;
    Ok(d)
}

pub(crate) fn span(py: Python<'_>, s: StoredSpan) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, s => span_id, parent_span_id, name, start_time, end_time, status);
    // A NULL written by hand through SQL reads as no attributes (Flujo fails to decode it).
    d.set_item(
        intern!(py, "attributes"),
        json_or_empty_dict(py, "attributes", s.attributes)?,
    )?;
    Ok(d)
}

/// The run's spans as a tree: each span under its parent, children in start-time order. The
/// first root is returned, as in Flujo; other roots (a broken tree) are logged.
pub(crate) fn trace(py: Python<'_>, spans: Vec<StoredSpan>) -> PyResult<Py<PyAny>> {
    if spans.is_empty() {
        return Ok(py.None());
    }
    let paused = CollectorPaused::for_items(py, spans.len())?;
    let key = |c: &Cell| match c {
        Cell::Text(t) => Some(t.clone()),
        Cell::Integer(i) => Some(i.to_string()),
        _ => None,
    };
    let ids: Vec<Option<String>> = spans.iter().map(|s| key(&s.span_id)).collect();
    let parents: Vec<Option<String>> = spans.iter().map(|s| key(&s.parent_span_id)).collect();
    let mut nodes = Vec::with_capacity(spans.len());
    let mut by_id = HashMap::new();
    for (index, stored) in spans.into_iter().enumerate() {
        let node = span(py, stored)?;
        node.set_item(intern!(py, "children"), PyList::empty(py))?;
        if let Some(id) = &ids[index] {
            by_id.entry(id.clone()).or_insert(index);
        }
        nodes.push(node);
    }
    let mut roots = Vec::new();
    for (index, parent) in parents.iter().enumerate() {
        match parent
            .as_ref()
            .and_then(|p| by_id.get(p))
            .filter(|p| **p != index)
        {
            Some(&parent_index) => nodes[parent_index]
                .get_item(intern!(py, "children"))?
                .expect("set above")
                .cast::<PyList>()?
                .append(&nodes[index])?,
            None => roots.push(index),
        }
    }
    // Before logging: a logging handler may let other threads run, which must find the
    // collector as the program left it.
    drop(paused);
    match roots.len() {
        // Only parent links that form a cycle leave no root; Flujo returns None then too.
        0 => {
            log_with_gil!(
                py,
                warn,
                "trace has no root span (its parent links form a cycle); returning None"
            )?;
            return Ok(py.None());
        }
        1 => {}
        many => log_with_gil!(
            py,
            warn,
            "trace has {many} root spans; returning the earliest"
        )?,
    }
    Ok(nodes[roots[0]].clone().into_any().unbind())
}

pub(crate) fn span_statistics(py: Python<'_>, s: SpanStatistics) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item(intern!(py, "total_spans"), s.total_spans)?;
    d.set_item(intern!(py, "by_name"), s.by_name)?;
    d.set_item(intern!(py, "by_status"), s.by_status)?;
    let averages = PyDict::new(py);
    for (name, totals) in s.durations_by_name {
        let entry = PyDict::new(py);
        entry.set_item(intern!(py, "total"), totals.total_seconds)?;
        entry.set_item(intern!(py, "count"), totals.count)?;
        entry.set_item(
            intern!(py, "average"),
            totals.total_seconds / totals.count.max(1) as f64,
        )?;
        averages.set_item(name, entry)?;
    }
    d.set_item(intern!(py, "avg_duration_by_name"), averages)?;
    Ok(d)
}

pub(crate) fn system_state(py: Python<'_>, entry: SystemStateEntry) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item(intern!(py, "key"), cell(py, entry.key)?)?;
    d.set_item(
        intern!(py, "value"),
        json_or_none(py, "value", entry.value)?,
    )?;
    d.set_item(intern!(py, "updated_at"), datetime(py, entry.updated_at)?)?;
    Ok(d)
}

pub(crate) fn evaluation(py: Python<'_>, e: StoredEvaluation) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    set_cells!(py, d, e => run_id, step_name, score, feedback);
    d.set_item(
        intern!(py, "metadata"),
        json_or_none(py, "metadata", e.metadata)?,
    )?;
    d.set_item(intern!(py, "created_at"), cell(py, e.created_at)?)?;
    Ok(d)
}
