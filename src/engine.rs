//! The interface between the binding layer and a storage engine.
//!
//! The binding turns each Python call into a [`Request`], hands it to [`StateEngine::submit`]
//! together with a [`Completion`], and returns to the event loop at once. The engine does the
//! work on its own threads and calls the completion exactly once, from one of them. Nothing in
//! this contract mentions SQLite, so a PostgreSQL engine can implement it unchanged.

use crate::error::Result;
use crate::model::{
    BackgroundTaskQuery, Evaluation, RunDetails, RunEnd, RunQuery, RunStart, RunSummary,
    SpanRecord, SpanStatistics, StateListing, StateRecord, StepDetails, StepRecord,
    StoredEvaluation, StoredSpan, StoredState, SystemStateEntry, WorkflowQuery, WorkflowStats,
    WorkflowSummary,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::timestamp::Age;

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
        /// Set when the caller stops waiting: the cleanup then stops after its current batch
        /// (what it deleted stays deleted), rather than going on for nobody, holding up exit.
        caller_gone: CallerGone,
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

/// A flag the caller of a long request sets once it no longer waits for the answer.
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

/// Requests compare by what they ask for; whether the caller still waits is not part of that.
impl PartialEq for CallerGone {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Request {
    /// The flag a long request watches to stop early once its caller no longer waits.
    pub fn caller_gone(&self) -> Option<&CallerGone> {
        match self {
            Request::CleanupOldWorkflows { caller_gone, .. } => Some(caller_gone),
            _ => None,
        }
    }

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

/// Called exactly once with the outcome of a request, on an engine thread.
pub type Completion = Box<dyn FnOnce(Result<Response>) + Send + 'static>;

pub trait StateEngine: Send + Sync {
    /// Queue `request`; `done` runs once it has finished (for writes: once durable).
    /// After `close`, `done` is called at once with `Error::Closed`.
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
}
