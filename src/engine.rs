//! The interface between the binding layer and a storage engine.
//!
//! The binding starts an engine with [`start`], turns each Python call into a [`Request`],
//! hands it to [`StateEngine::submit`] together with a [`Completion`], and returns to the event
//! loop at once. The engine does the work on its own threads and calls the completion exactly
//! once, from one of them. Nothing in this contract mentions SQLite: a second engine (a
//! PostgreSQL server) is a module of its own that implements [`StateEngine`], plus one arm in
//! [`start`]; the binding's methods, conversions and asyncio bridge do not change.

use crate::error::Result;
use crate::model::{
    BackgroundTaskQuery, Evaluation, RunDetails, RunEnd, RunQuery, RunStart, RunSummary,
    SpanRecord, SpanStatistics, StateListing, StateRecord, StepDetails, StepRecord,
    StoredEvaluation, StoredSpan, StoredState, SystemStateEntry, WorkflowQuery, WorkflowStats,
    WorkflowSummary,
};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::timestamp::Age;

/// What a commit promises once the caller's `await` returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// The write survives a power loss or an OS crash (SQLite: the WAL is fsynced at every
    /// commit, as Flujo 0.4.35 commits).
    #[default]
    Full,
    /// The write survives a crash of the process, but the last commits before a power loss or
    /// OS crash may roll back (the store stays consistent).
    Normal,
}

/// Which Flujo release's tables a brand-new store gets; an existing store keeps its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FreshLayout {
    /// Flujo 0.4.35 (Python 3.11/3.12 users): opened by both releases.
    Flujo04,
    /// Flujo 0.6.11 (Python 3.13+).
    #[default]
    Flujo06,
}

/// What the backend's constructor asks of an engine, whichever engine serves the store.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineSettings {
    pub durability: Durability,
    /// How long a call may wait, in total, for another client's lock before failing with
    /// `Error::Locked`.
    pub lock_wait: Duration,
    /// Connections serving reads in parallel with the writer.
    pub readers: usize,
    pub fresh_layout: FreshLayout,
}

/// Starts the engine that serves the store at `store`, which serves nothing until
/// `predecessor` (an engine on the same store being closed) has finished its queued work. The
/// one place that knows which engines exist: today every store is a SQLite file; a server
/// engine would be picked here by the store's name.
pub fn start(
    store: &Path,
    settings: EngineSettings,
    predecessor: Option<Arc<dyn StateEngine>>,
) -> Result<Arc<dyn StateEngine>> {
    let engine = crate::sqlite::SqliteEngine::start_after(
        crate::sqlite::SqliteOptions::from_settings(store, settings),
        predecessor,
    )?;
    Ok(Arc::new(engine))
}

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    SaveState {
        run_id: String,
        record: Box<StateRecord>,
        /// Opt-in lost-update protection: write only if the stored row's `updated_at` is still
        /// this instant (stored-text form), else fail with `Error::Conflict`.
        expected_updated_at: Option<String>,
    },
    LoadState {
        run_id: String,
    },
    DeleteState {
        run_id: String,
    },
    ListStates {
        status: Option<String>,
    },
    ListWorkflows(WorkflowQuery),
    WorkflowStats,
    FailedWorkflows {
        hours_back: Age,
    },
    CleanupOldWorkflows {
        days_old: Age,
    },
    SaveRunStart(Box<RunStart>),
    SaveStepResult(Box<StepRecord>),
    SaveRunEnd {
        run_id: String,
        end: Box<RunEnd>,
    },
    GetRunDetails {
        run_id: String,
    },
    ListRunSteps {
        run_id: String,
    },
    ListRuns(RunQuery),
    /// Deletes the run with its steps, spans, trace and evaluations (not its workflow state).
    DeleteRun {
        run_id: String,
    },
    /// `replace`: drop the run's existing spans first (`save_trace`); otherwise append (`save_spans`).
    SaveSpans {
        run_id: String,
        spans: Vec<SpanRecord>,
        replace: bool,
        pipeline_name: Option<String>,
        pipeline_version: Option<String>,
    },
    /// All of a run's spans, for the caller to assemble into its trace tree.
    GetTrace {
        run_id: String,
    },
    GetSpans {
        run_id: String,
        status: Option<String>,
        name: Option<String>,
    },
    SpanStatistics {
        pipeline_name: Option<String>,
        time_range: Option<(f64, f64)>,
    },
    SetSystemState {
        key: String,
        value: String,
    },
    GetSystemState {
        key: String,
    },
    PersistEvaluation(Box<Evaluation>),
    ListEvaluations {
        limit: Option<u64>,
        run_id: Option<String>,
    },
    ListBackgroundTasks(BackgroundTaskQuery),
    FailedBackgroundTasks {
        parent_run_id: Option<String>,
        hours_back: Age,
    },
    CleanupStaleBackgroundTasks {
        stale_hours: Age,
    },
}

/// A flag the caller sets once it no longer waits for the answer (it was cancelled, timed out
/// or interrupted).
#[derive(Debug, Clone, Default)]
pub struct CallerGone(Arc<AtomicBool>);

impl CallerGone {
    pub fn set(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How the engine answers one request, exactly once, from one of its threads; and how it learns
/// that the caller stopped waiting.
pub struct Completion {
    answer: Box<dyn FnOnce(Result<Response>) + Send + 'static>,
    caller_gone: CallerGone,
}

impl Completion {
    pub fn new(answer: impl FnOnce(Result<Response>) + Send + 'static) -> Self {
        Self::watching(CallerGone::default(), answer)
    }

    /// A completion whose caller sets `caller_gone` once it stops waiting.
    pub fn watching(
        caller_gone: CallerGone,
        answer: impl FnOnce(Result<Response>) + Send + 'static,
    ) -> Self {
        Completion {
            answer: Box::new(answer),
            caller_gone,
        }
    }

    pub fn caller_gone(&self) -> &CallerGone {
        &self.caller_gone
    }

    pub fn answer(self, outcome: Result<Response>) {
        (self.answer)(outcome)
    }
}

impl Request {
    /// Whether the request changes the database (and so must go through the single writer).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::SaveState { .. }
                | Request::DeleteState { .. }
                | Request::CleanupOldWorkflows { .. }
                | Request::SaveRunStart(_)
                | Request::SaveStepResult(_)
                | Request::SaveRunEnd { .. }
                | Request::DeleteRun { .. }
                | Request::SaveSpans { .. }
                | Request::SetSystemState { .. }
                | Request::PersistEvaluation(_)
                | Request::CleanupStaleBackgroundTasks { .. }
        )
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Response {
    Done,
    State(Option<Box<StoredState>>),
    States(Vec<StateListing>),
    Workflows(Vec<WorkflowSummary>),
    Stats(WorkflowStats),
    Count(u64),
    RunDetails(Option<Box<RunDetails>>),
    Steps(Vec<StepDetails>),
    Runs(Vec<RunSummary>),
    Spans(Vec<StoredSpan>),
    Trace(Vec<StoredSpan>),
    SpanStatistics(SpanStatistics),
    SystemState(Option<SystemStateEntry>),
    Evaluations(Vec<StoredEvaluation>),
}

pub trait StateEngine: Send + Sync {
    /// Queue `request`; `done` is answered once it has finished (for writes: once durable).
    /// After `close`, `done` is answered at once with `Error::Closed`.
    ///
    /// A caller may stop waiting (see [`Completion::caller_gone`]). Nobody can see the answer
    /// of a read then, so one that has not begun is answered with `Error::CallerGone` without
    /// running: callers that keep retrying with a timeout shorter than the call must not build
    /// a backlog that every later read waits behind. A long write (a cleanup) stops after its
    /// current batch. Other writes run all the same, as the caller cannot tell whether they did.
    fn submit(&self, request: Request, done: Completion);

    /// Finish the work already queued, then stop the engine's threads. Idempotent; blocks
    /// until the work is done, also when another `close` is already under way.
    fn close(&self);

    /// Whether a `close` has finished: the queued work is done and the file released.
    fn is_closed(&self) -> bool;

    /// Whether the engine has ever tried to connect to its storage (it does on the first
    /// request). Until then it holds no connection state that a `fork()` could carry into a
    /// child process, so the child may start a fresh engine on the same storage.
    fn has_connected(&self) -> bool;

    /// How long a caller may wait on the event loop's thread for a lone read to be answered,
    /// instead of putting the loop to sleep and having it woken (which costs ~50-100 us): `Some`
    /// only when reads are usually answered within that time; `None` when they take longer
    /// (a network round trip), as waiting would only keep the loop busy.
    fn quick_read_wait(&self) -> Option<Duration> {
        None
    }

    /// The same for a lone write; `None` when writes take longer than a loop wake-up (an fsync,
    /// a network round trip).
    fn quick_write_wait(&self) -> Option<Duration> {
        None
    }
}
