//! `NativeBackend`: the Python class that queues requests on a storage engine and hands back
//! asyncio futures. It sees only the `StateEngine` trait, never SQLite itself.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pyo3::prelude::*;

use super::arguments;
use super::completion::CompletionPort;
use super::errors::{invalid_state, to_py_err};
use crate::engine::{Request, Response, StateEngine};
use crate::sqlite::{Durability, SqliteEngine, SqliteOptions};

#[pyclass(frozen, module = "flujo_sqlite._native")]
pub(crate) struct NativeBackend {
    engine: Arc<dyn StateEngine>,
    path: PathBuf,
}

impl NativeBackend {
    fn submit<'py>(
        &self,
        py: Python<'py>,
        port: &CompletionPort,
        request: Request,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (future, done) = port.track(py)?;
        self.engine.submit(request, done);
        Ok(future)
    }
}

#[pymethods]
impl NativeBackend {
    #[new]
    #[pyo3(signature = (path, *, durability = "full", lock_timeout = 30.0, readers = 2))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        durability: &str,
        lock_timeout: f64,
        readers: usize,
    ) -> PyResult<Self> {
        let durability = match durability {
            "full" => Durability::Full,
            "normal" => Durability::Normal,
            other => {
                return Err(invalid_state(
                    py,
                    format!("durability must be \"full\" or \"normal\", got {other:?}"),
                ))
            }
        };
        if !lock_timeout.is_finite() || lock_timeout < 0.0 {
            return Err(invalid_state(
                py,
                format!("lock_timeout must be a finite number of seconds >= 0, got {lock_timeout}"),
            ));
        }
        let mut options = SqliteOptions::new(path.clone());
        options.durability = durability;
        options.lock_wait = Duration::from_secs_f64(lock_timeout);
        options.busy_timeout = options.busy_timeout.min(options.lock_wait);
        options.readers = readers;
        let engine = SqliteEngine::start(options).map_err(|e| to_py_err(py, &e))?;
        Ok(NativeBackend {
            engine: Arc::new(engine),
            path,
        })
    }

    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    fn save_state<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SaveState {
            run_id: arguments::run_id(run_id)?,
            record: Box::new(arguments::state_record(state)?),
        };
        self.submit(py, &port, request)
    }

    fn load_state<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::LoadState {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, &port, request)
    }

    fn delete_state<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::DeleteState {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, &port, request)
    }

    #[pyo3(signature = (port, status = None))]
    fn list_states<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        status: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::ListStates {
            status: arguments::optional_filter(status, "status")?,
        };
        self.submit(py, &port, request)
    }

    #[pyo3(signature = (port, status = None, pipeline_id = None, limit = None, offset = None))]
    fn list_workflows<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        status: Option<&Bound<'py, PyAny>>,
        pipeline_id: Option<&Bound<'py, PyAny>>,
        limit: Option<&Bound<'py, PyAny>>,
        offset: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = arguments::workflow_query(status, pipeline_id, limit, offset)?;
        self.submit(py, &port, Request::ListWorkflows(query))
    }

    fn get_workflow_stats<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.submit(py, &port, Request::WorkflowStats)
    }

    fn get_failed_workflows<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        hours_back: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::FailedWorkflows {
            hours_back: arguments::amount(hours_back, "hours_back")?,
        };
        self.submit(py, &port, request)
    }

    fn cleanup_old_workflows<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
        days_old: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::CleanupOldWorkflows {
            days_old: arguments::amount(days_old, "days_old")?,
        };
        self.submit(py, &port, request)
    }

    /// Finishes queued work and stops the engine on a helper thread, so the loop never blocks.
    fn close<'py>(
        &self,
        py: Python<'py>,
        port: PyRef<'py, CompletionPort>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (future, done) = port.track(py)?;
        let engine = Arc::clone(&self.engine);
        std::thread::Builder::new()
            .name("flujo-sqlite-close".into())
            .spawn(move || {
                engine.close();
                done(Ok(Response::Done));
            })?;
        Ok(future)
    }

    /// Closes from synchronous code (interpreter exit, `__del__`-free cleanup); waits without the GIL.
    fn close_blocking(&self, py: Python<'_>) {
        let engine = Arc::clone(&self.engine);
        py.detach(move || engine.close());
    }
}
