//! Rust `log` records to Python's `logging`, through pyo3-log, under the "flujo_sqlite" logger.

use log::{Log, Metadata, Record};
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// pyo3-log, and one thing more: a record logged on one of the engine's threads leaves no
/// phantom thread behind. `logging` names a record's thread with `threading.current_thread()`,
/// which for a thread Python did not start registers a `_DummyThread`; before Python 3.13
/// nothing removes it, and it reports itself alive after its thread has ended, so a test
/// suite's "no threads left over" check fails whenever logging is at INFO.
pub(crate) struct Logger {
    inner: pyo3_log::Logger,
    /// `threading`, where phantom threads must be removed (Python before 3.13).
    threading: Option<Py<PyModule>>,
}

impl Logger {
    pub(crate) fn new(py: Python<'_>, inner: pyo3_log::Logger) -> PyResult<Self> {
        let threading = if py.version_info() < (3, 13) {
            Some(py.import("threading")?.unbind())
        } else {
            None
        };
        Ok(Logger { inner, threading })
    }
}

/// Removes this thread's `_DummyThread` from `threading`'s record of live threads, if it has
/// one: Python started the thread that logged otherwise. The next record makes another.
fn forget_dummy_thread(threading: &Bound<'_, PyModule>) -> PyResult<()> {
    let active = threading.getattr("_active")?.cast_into::<PyDict>()?;
    let ident = threading.getattr("get_ident")?.call0()?;
    if let Some(thread) = active.get_item(&ident)? {
        if thread.is_instance(&threading.getattr("_DummyThread")?)? {
            active.del_item(&ident)?;
        }
    }
    Ok(())
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.inner.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.inner.enabled(record.metadata()) {
            return;
        }
        self.inner.log(record);
        if let Some(threading) = &self.threading {
            Python::attach(|py| {
                // Never an exception for the caller to find: this is housekeeping.
                let pending = PyErr::take(py);
                if forget_dummy_thread(threading.bind(py)).is_err() {
                    PyErr::take(py);
                }
                if let Some(pending) = pending {
                    pending.restore(py);
                }
            });
        }
    }

    fn flush(&self) {
        self.inner.flush();
    }
}
