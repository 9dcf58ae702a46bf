//! `recover()`: the binding of `sqlite::recover`. It blocks its caller (the shim runs it with
//! `asyncio.to_thread`) but never holds the GIL while SQLite and the file system work.

use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::arguments;
use super::errors::to_py_err;
use crate::sqlite::{self, RecoveryReport};

#[pyfunction]
#[pyo3(name = "recover", signature = (path, *, backup_path = None, fresh_layout = "flujo-0.6"))]
pub(crate) fn recover_py(
    py: Python<'_>,
    path: PathBuf,
    backup_path: Option<PathBuf>,
    fresh_layout: &str,
) -> PyResult<Py<PyDict>> {
    let fresh_layout = arguments::fresh_layout(py, fresh_layout)?;
    super::refresh_log_levels();
    let report = py
        .detach(move || sqlite::recover(&path, backup_path, fresh_layout))
        .map_err(|e| to_py_err(py, &e))?;
    report_to_python(py, &report).map(Bound::unbind)
}

fn report_to_python<'py>(py: Python<'py>, report: &RecoveryReport) -> PyResult<Bound<'py, PyDict>> {
    let tables = PyDict::new(py);
    for (name, table) in &report.tables {
        let counts = PyDict::new(py);
        counts.set_item("rescued", table.rescued)?;
        counts.set_item("skipped", table.skipped)?;
        tables.set_item(name, counts)?;
    }
    let result = PyDict::new(py);
    // A str (non-UTF-8 bytes as surrogate escapes, like os.fsdecode), not a pathlib.Path.
    result.set_item(
        "backup_path",
        report.backup_path.as_ref().map(|p| p.as_os_str()),
    )?;
    result.set_item("tables", tables)?;
    result.set_item("rows_rescued", report.rows_rescued)?;
    result.set_item("rows_skipped", report.rows_skipped)?;
    result.set_item("schema_recovered", report.schema_recovered)?;
    Ok(result)
}
