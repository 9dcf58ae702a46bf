//! `NativeBackend`: the Python class that queues requests on a storage engine and hands back
//! asyncio futures. It sees only `engine::start` and the `StateEngine` trait, never SQLite
//! itself.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use pyo3::prelude::*;

use super::arguments;
use super::completion::CompletionPort;
use super::errors::{backend_closed, invalid_state, to_py_err};
use super::from_python::encode_json;
use super::log_with_gil;
use super::results::response_to_python;
use super::run_arguments;
use crate::engine::{self, Completion, Durability, EngineSettings, Request, Response, StateEngine};
use crate::error::Error;
use crate::model::{BackgroundTaskQuery, RunQuery};
use crate::timestamp::{same_instant, Age};

// `weakref`: the Python layer keeps a weak set of the engines not closed yet.
#[pyclass(frozen, weakref, module = "flujo_sqlite._native")]
pub(crate) struct NativeBackend {
    engine: Arc<dyn StateEngine>,
    /// How long a lone read, or write, is waited for on the loop thread before the loop may
    /// sleep: the engine's `quick_read_wait` and `quick_write_wait`.
    lone_read_wait: Option<Duration>,
    lone_write_wait: Option<Duration>,
    /// The process that started the engine. A child made by `fork()` inherits this object but
    /// not the engine's threads: a call there would wait forever, and closing would join
    /// threads that exist only in the parent.
    owner_pid: u32,
}

/// Engines of backends dropped without `close()`, closing on threads of their own, with the
/// process that started each thread.
static CLOSING: Mutex<Vec<(u32, JoinHandle<()>)>> = Mutex::new(Vec::new());

/// How often a wait for an engine to close looks at the signals. A close finishes the queued
/// writes, which may wait up to `lock_timeout` for another process's lock: Ctrl-C must still
/// stop a program waiting for that, at exit above all.
const LOOK_AT_SIGNALS_EVERY: Duration = Duration::from_millis(5);

/// Closes `engine` on a thread of its own, then runs `then` there.
fn close_on_its_own_thread(
    engine: Arc<dyn StateEngine>,
    then: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("flujo-sqlite-close".into())
        .spawn(move || {
            engine.close();
            then();
        })
}

/// Waits without the GIL for `closing` to end, or for a signal whose handler raises
/// (`KeyboardInterrupt`): then the close goes on without anyone waiting for it.
fn join_closing(py: Python<'_>, closing: JoinHandle<()>) -> PyResult<()> {
    while !closing.is_finished() {
        py.detach(|| std::thread::park_timeout(LOOK_AT_SIGNALS_EVERY));
        py.check_signals()?;
    }
    if closing.join().is_err() {
        log::error!("closing a flujo-sqlite backend panicked");
    }
    Ok(())
}

impl Drop for NativeBackend {
    fn drop(&mut self) {
        if self.forked() {
            // The parent's engine, seen from a child: never closed or dropped here.
            std::mem::forget(Arc::clone(&self.engine));
            return;
        }
        // Closing waits for queued writes, maybe for another process's lock, and Python drops
        // us holding the GIL, perhaps on the event loop's thread (where an engine thread that
        // logs, which takes the GIL, would wait for us forever): close elsewhere, as `close`
        // does. `wait_for_dropped_backends` (run at exit) lets those writes finish.
        match close_on_its_own_thread(Arc::clone(&self.engine), || ()) {
            Ok(thread) => {
                let mut closing = CLOSING.lock().unwrap_or_else(PoisonError::into_inner);
                closing.retain(|(_, thread)| !thread.is_finished());
                closing.push((self.owner_pid, thread));
            }
            Err(_) => Python::attach(|py| py.detach(|| self.engine.close())),
        }
    }
}

/// Waits, without the GIL, until every backend dropped without `close()` has closed; a signal
/// whose handler raises (Ctrl-C) stops the wait.
#[pyfunction]
pub(crate) fn wait_for_dropped_backends(py: Python<'_>) -> PyResult<()> {
    let threads = std::mem::take(&mut *CLOSING.lock().unwrap_or_else(PoisonError::into_inner));
    let this_process = std::process::id();
    for (owner_pid, thread) in threads {
        if owner_pid != this_process {
            std::mem::forget(thread); // a thread of the parent, inherited by fork()
        } else {
            join_closing(py, thread)?;
        }
    }
    Ok(())
}

impl NativeBackend {
    fn forked(&self) -> bool {
        std::process::id() != self.owner_pid
    }

    fn refuse_if_forked(&self, py: Python<'_>) -> PyResult<()> {
        if !self.forked() {
            return Ok(());
        }
        Err(backend_closed(
            py,
            format!(
                "this SQLiteBackend was used in process {} and this is process {}, a fork() of \
                 it: SQLite connections, their locks and the backend's threads do not survive \
                 fork(), and no backend of this process may use SQLite. Start processes with \
                 multiprocessing's \"spawn\" or \"forkserver\" method, or fork before using \
                 any backend (backends created but not used yet, as with gunicorn --preload, \
                 or closed, are fine): each child then opens its files on its own",
                self.owner_pid,
                std::process::id()
            ),
        ))
    }

    fn submit<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        request: Request,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.refuse_if_forked(py)?;
        super::refresh_log_levels_now_and_then();
        let wait = if request.is_write() {
            self.lone_write_wait
        } else {
            self.lone_read_wait
        };
        let (future, done) = port.get().track(py)?;
        self.engine.submit(request, done);
        match wait {
            Some(wait) => port.get().await_lone_request(py, future, wait),
            None => Ok(future),
        }
    }
}

#[pymethods]
impl NativeBackend {
    /// `after`: the engine this one replaces on the same file (a backend used again after
    /// `close()`); nothing is served until the work queued on it is done.
    #[new]
    #[pyo3(signature = (path, *, durability, lock_timeout, readers = 2, fresh_layout = "flujo-0.6", after = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        durability: &Bound<'_, PyAny>,
        lock_timeout: &Bound<'_, PyAny>,
        readers: usize,
        fresh_layout: &str,
        after: Option<PyRef<'_, NativeBackend>>,
    ) -> PyResult<Self> {
        let durability = match arguments::text(durability, "durability")?.as_str() {
            "full" => Durability::Full,
            "normal" => Durability::Normal,
            other => {
                return Err(invalid_state(
                    py,
                    format!("durability must be \"full\" or \"normal\", got {other:?}"),
                ))
            }
        };
        let lock_timeout = arguments::real(lock_timeout, "lock_timeout")?;
        let lock_wait = Duration::try_from_secs_f64(lock_timeout).map_err(|_| {
            invalid_state(
                py,
                format!("lock_timeout must be a number of seconds >= 0 and < 1.8e19, got {lock_timeout}"),
            )
        })?;
        let settings = EngineSettings {
            durability,
            lock_wait,
            readers,
            fresh_layout: arguments::fresh_layout(py, fresh_layout)?,
        };
        super::refresh_log_levels();
        // The parent's engine, seen from a child made by fork(), has nothing to wait for here.
        let predecessor = after
            .filter(|previous| !previous.forked())
            .map(|previous| Arc::clone(&previous.engine));
        let engine = engine::start(&path, settings, predecessor).map_err(|e| to_py_err(py, &e))?;
        Ok(NativeBackend {
            lone_read_wait: engine.quick_read_wait(),
            lone_write_wait: engine.quick_write_wait(),
            engine,
            owner_pid: std::process::id(),
        })
    }

    /// Whether the engine has ever opened the file (it does on the first call).
    #[getter]
    fn has_connected(&self) -> bool {
        self.engine.has_connected()
    }

    #[pyo3(signature = (port, run_id, state, expected_updated_at = None))]
    fn save_state<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        state: &Bound<'py, PyAny>,
        expected_updated_at: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let run_id = arguments::run_id(run_id)?;
        let record = arguments::state_record(state)?;
        let expected_updated_at = expected_updated_at
            .filter(|v| !v.is_none())
            .map(|v| arguments::timestamp_text(v, "expected_updated_at"))
            .transpose()?;
        if let Some(expected) = &expected_updated_at {
            // The stored updated_at is the token a conditional save checks: one that keeps it
            // would let a second worker holding the same token overwrite this save unnoticed.
            if same_instant(&record.updated_at, expected) {
                return Err(invalid_state(
                    py,
                    format!(
                        "a save with expected_updated_at must give the state a new updated_at, \
                         but it is still {expected}: another worker that loaded the same state \
                         could then overwrite this save without a ConflictError. Set \
                         state[\"updated_at\"] to the time of this save, with its \
                         microseconds (two saves within a second would otherwise share it)"
                    ),
                ));
            }
        }
        let request = Request::SaveState {
            run_id,
            record: Box::new(record),
            expected_updated_at,
        };
        self.submit(py, port, request)
    }

    fn load_state<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::LoadState {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, port, request)
    }

    fn delete_state<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::DeleteState {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, status = None))]
    fn list_states<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        status: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::ListStates {
            status: arguments::optional_filter(status, "status")?,
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, status = None, pipeline_id = None, limit = None, offset = None))]
    fn list_workflows<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        status: Option<&Bound<'py, PyAny>>,
        pipeline_id: Option<&Bound<'py, PyAny>>,
        limit: Option<&Bound<'py, PyAny>>,
        offset: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let query = arguments::workflow_query(status, pipeline_id, limit, offset)?;
        self.submit(py, port, Request::ListWorkflows(query))
    }

    fn get_workflow_stats<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
    ) -> PyResult<Bound<'py, PyAny>> {
        self.submit(py, port, Request::WorkflowStats)
    }

    fn get_failed_workflows<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        hours_back: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::FailedWorkflows {
            hours_back: arguments::age(hours_back, "hours_back", Age::hours)?,
        };
        self.submit(py, port, request)
    }

    fn cleanup_old_workflows<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        days_old: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::CleanupOldWorkflows {
            days_old: arguments::age(days_old, "days_old", Age::days)?,
        };
        self.submit(py, port, request)
    }

    fn save_run_start<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SaveRunStart(Box::new(run_arguments::run_start(run_data)?));
        self.submit(py, port, request)
    }

    fn save_step_result<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        step_data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SaveStepResult(Box::new(run_arguments::step_record(step_data)?));
        self.submit(py, port, request)
    }

    fn save_run_end<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        end_data: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SaveRunEnd {
            run_id: arguments::run_id(run_id)?,
            end: Box::new(run_arguments::run_end(end_data)?),
        };
        self.submit(py, port, request)
    }

    fn get_run_details<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::GetRunDetails {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, port, request)
    }

    fn list_run_steps<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::ListRunSteps {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, status = None, pipeline_name = None, limit = None, offset = None, metadata_filter = None))]
    #[allow(clippy::too_many_arguments)]
    fn list_runs<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        status: Option<&Bound<'py, PyAny>>,
        pipeline_name: Option<&Bound<'py, PyAny>>,
        limit: Option<&Bound<'py, PyAny>>,
        offset: Option<&Bound<'py, PyAny>>,
        metadata_filter: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let paging = arguments::workflow_query(None, None, limit, offset)?;
        let request = Request::ListRuns(RunQuery {
            status: arguments::optional_filter(status, "status")?,
            pipeline_name: arguments::optional_filter(pipeline_name, "pipeline_name")?,
            limit: paging.limit,
            offset: paging.offset,
            metadata: run_arguments::metadata_conditions(metadata_filter)?,
        });
        self.submit(py, port, request)
    }

    fn delete_run<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::DeleteRun {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, port, request)
    }

    fn save_trace<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        trace: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SaveSpans {
            run_id: arguments::run_id(run_id)?,
            spans: run_arguments::trace_spans(trace)?,
            replace: true,
            pipeline_name: None,
            pipeline_version: None,
        };
        self.submit(py, port, request)
    }

    fn save_spans<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        spans: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let run_id = arguments::run_id(run_id)?;
        let (spans, pipeline_name, pipeline_version) = run_arguments::span_list(spans)?;
        let spans = if run_id.is_empty() { Vec::new() } else { spans };
        let request = Request::SaveSpans {
            run_id,
            spans,
            replace: false,
            pipeline_name,
            pipeline_version,
        };
        self.submit(py, port, request)
    }

    fn get_trace<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::GetTrace {
            run_id: arguments::run_id(run_id)?,
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, run_id, status = None, name = None))]
    fn get_spans<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        status: Option<&Bound<'py, PyAny>>,
        name: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::GetSpans {
            run_id: arguments::run_id(run_id)?,
            status: arguments::optional_filter(status, "status")?,
            name: arguments::optional_filter(name, "name")?,
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, pipeline_name = None, time_range = None))]
    fn get_span_statistics<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        pipeline_name: Option<&Bound<'py, PyAny>>,
        time_range: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SpanStatistics {
            pipeline_name: arguments::optional_filter(pipeline_name, "pipeline_name")?,
            time_range: arguments::time_range(time_range)?,
        };
        self.submit(py, port, request)
    }

    fn set_system_state<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        key: &Bound<'py, PyAny>,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::SetSystemState {
            key: arguments::text(key, "key")?,
            value: encode_json(value, "value")?,
        };
        self.submit(py, port, request)
    }

    fn get_system_state<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::GetSystemState {
            key: arguments::text(key, "key")?,
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, run_id, score, feedback = None, step_name = None, metadata = None))]
    #[allow(clippy::too_many_arguments)]
    fn persist_evaluation<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        run_id: &Bound<'py, PyAny>,
        score: &Bound<'py, PyAny>,
        feedback: Option<&Bound<'py, PyAny>>,
        step_name: Option<&Bound<'py, PyAny>>,
        metadata: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let evaluation = run_arguments::evaluation(run_id, score, feedback, step_name, metadata)?;
        self.submit(py, port, Request::PersistEvaluation(Box::new(evaluation)))
    }

    #[pyo3(signature = (port, limit = None, run_id = None))]
    fn list_evaluations<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        limit: Option<&Bound<'py, PyAny>>,
        run_id: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::ListEvaluations {
            limit: arguments::workflow_query(None, None, limit, None)?.limit,
            // As in Flujo, an empty run id lists every run's evaluations.
            run_id: run_id
                .filter(|r| !r.is_none())
                .map(arguments::run_id)
                .transpose()?
                .filter(|r| !r.is_empty()),
        };
        self.submit(py, port, request)
    }

    #[pyo3(signature = (port, parent_run_id = None, status = None, limit = None, offset = None))]
    fn list_background_tasks<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        parent_run_id: Option<&Bound<'py, PyAny>>,
        status: Option<&Bound<'py, PyAny>>,
        limit: Option<&Bound<'py, PyAny>>,
        offset: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let paging = arguments::workflow_query(None, None, limit, offset)?;
        let request = Request::ListBackgroundTasks(BackgroundTaskQuery {
            parent_run_id: arguments::literal_filter(parent_run_id, "parent_run_id")?,
            status: arguments::literal_filter(status, "status")?,
            limit: paging.limit,
            offset: paging.offset,
        });
        self.submit(py, port, request)
    }

    fn get_failed_background_tasks<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        parent_run_id: Option<&Bound<'py, PyAny>>,
        hours_back: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::FailedBackgroundTasks {
            parent_run_id: arguments::literal_filter(parent_run_id, "parent_run_id")?,
            hours_back: arguments::age(hours_back, "hours_back", Age::hours)?,
        };
        self.submit(py, port, request)
    }

    fn cleanup_stale_background_tasks<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
        stale_hours: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let request = Request::CleanupStaleBackgroundTasks {
            stale_hours: arguments::age(stale_hours, "stale_hours", Age::hours)?,
        };
        self.submit(py, port, request)
    }

    /// `get_workflow_stats` for synchronous callers: waits for a reader without the GIL.
    fn get_workflow_stats_blocking(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.refuse_if_forked(py)?;
        let (sender, receiver) = std::sync::mpsc::channel();
        let engine = Arc::clone(&self.engine);
        let outcome = py.detach(move || {
            engine.submit(
                Request::WorkflowStats,
                Completion::new(move |outcome| {
                    let _ = sender.send(outcome);
                }),
            );
            receiver.recv().unwrap_or(Err(Error::Unanswered))
        });
        let response = outcome.map_err(|e| to_py_err(py, &e))?;
        response_to_python(py, response)?.finish(py)
    }

    /// Finishes queued work and stops the engine on a helper thread, so the loop never blocks.
    fn close<'py>(
        &self,
        py: Python<'py>,
        port: &Bound<'py, CompletionPort>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (future, done) = port.get().track(py)?;
        if self.forked() {
            done.answer(Ok(Response::Done)); // the parent's engine; the parent closes it
            return Ok(future);
        }
        // `done` is handed over once the thread exists, so it is still ours if it cannot start.
        let (hand_over, take) = std::sync::mpsc::channel::<Completion>();
        let spawned = close_on_its_own_thread(Arc::clone(&self.engine), move || {
            if let Ok(done) = take.recv() {
                done.answer(Ok(Response::Done));
            }
        });
        match spawned {
            Ok(_) => {
                let _ = hand_over.send(done);
            }
            Err(error) => {
                // No thread to spare: close here rather than leave queued writes unfinished.
                let logged = log_with_gil!(
                    py,
                    warn,
                    "cannot start a thread to close on ({error}); closing on this one"
                );
                let engine = Arc::clone(&self.engine);
                py.detach(move || engine.close());
                done.answer(Ok(Response::Done));
                logged?;
            }
        }
        Ok(future)
    }

    /// Closes from synchronous code (interpreter exit, `__del__`-free cleanup); waits without
    /// the GIL, and a signal whose handler raises (Ctrl-C) stops the wait, not the close.
    fn close_blocking(&self, py: Python<'_>) -> PyResult<()> {
        if self.forked() {
            return Ok(()); // the parent's engine; the parent closes it
        }
        let waiter = std::thread::current();
        match close_on_its_own_thread(Arc::clone(&self.engine), move || waiter.unpark()) {
            Ok(closing) => join_closing(py, closing),
            // No thread to spare: wait here, as long as the close takes.
            Err(_) => {
                py.detach(|| self.engine.close());
                Ok(())
            }
        }
    }
}
