//! The one place where core errors become Python exceptions. The classes live in
//! `flujo_sqlite/errors.py` (they need multiple inheritance from stdlib exceptions).

use pyo3::exceptions::asyncio::CancelledError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::error::Error;

fn class<'py>(
    py: Python<'py>,
    cell: &'static PyOnceLock<Py<PyType>>,
    name: &str,
) -> PyResult<Bound<'py, PyType>> {
    cell.import(py, "flujo_sqlite.errors", name).cloned()
}

macro_rules! exception_class {
    ($fn_name:ident, $class:literal) => {
        pub(crate) fn $fn_name(py: Python<'_>, message: impl Into<String>) -> PyErr {
            static CLASS: PyOnceLock<Py<PyType>> = PyOnceLock::new();
            match class(py, &CLASS, $class) {
                Ok(class) => PyErr::from_type(class, message.into()),
                Err(import_failed) => import_failed,
            }
        }
    };
}

exception_class!(invalid_state, "InvalidStateError");
exception_class!(invalid_type, "InvalidTypeError");
exception_class!(missing_key, "MissingKeyError");
exception_class!(serialization_error, "SerializationError");
exception_class!(database_error, "DatabaseError");
exception_class!(database_locked, "DatabaseLockedError");
exception_class!(corrupt_database, "CorruptDatabaseError");
exception_class!(backend_closed, "BackendClosedError");
exception_class!(conflict, "ConflictError");

pub(crate) fn to_py_err(py: Python<'_>, error: &Error) -> PyErr {
    raised_as(py, error, error.to_string())
}

/// The exception for `kind` of error, with `message`.
fn raised_as(py: Python<'_>, kind: &Error, message: String) -> PyErr {
    match kind {
        Error::Interrupted { cause, .. } => raised_as(py, cause, message),
        Error::InvalidInput(_) => invalid_state(py, message),
        Error::Locked { .. } => database_locked(py, message),
        Error::Corrupt { .. } => corrupt_database(py, message),
        Error::Closed { .. } | Error::ForkedWhileInUse { .. } => backend_closed(py, message),
        Error::Conflict { .. } => conflict(py, message),
        Error::CallerGone => CancelledError::new_err(message),
        Error::CannotOpen { .. }
        | Error::SchemaTooNew { .. }
        | Error::FileReplaced { .. }
        | Error::DiskFull { .. }
        | Error::NotFlujo { .. }
        | Error::Storage { .. }
        | Error::System { .. }
        | Error::Unanswered => database_error(py, message),
    }
}
