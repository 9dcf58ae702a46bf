//! The interface between the binding layer and a storage engine.
//!
//! The binding turns each Python call into a [`Request`], hands it to [`StateEngine::submit`]
//! together with a [`Completion`], and returns to the event loop at once. The engine does the
//! work on its own threads and calls the completion exactly once, from one of them. Nothing in
//! this contract mentions SQLite, so a PostgreSQL engine can implement it unchanged.

use crate::error::Result;
use crate::model::{
    StateListing, StateRecord, StoredState, WorkflowQuery, WorkflowStats, WorkflowSummary,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    SaveState {
        run_id: String,
        record: Box<StateRecord>,
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
        hours_back: f64,
    },
    CleanupOldWorkflows {
        days_old: f64,
    },
}

impl Request {
    /// Whether the request changes the database (and so must go through the single writer).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Request::SaveState { .. }
                | Request::DeleteState { .. }
                | Request::CleanupOldWorkflows { .. }
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
}

/// Called exactly once with the outcome of a request, on an engine thread.
pub type Completion = Box<dyn FnOnce(Result<Response>) + Send + 'static>;

pub trait StateEngine: Send + Sync {
    /// Queue `request`; `done` runs once it has finished (for writes: once durable).
    /// After `close`, `done` is called at once with `Error::Closed`.
    fn submit(&self, request: Request, done: Completion);

    /// Finish the work already queued, then stop the engine's threads. Idempotent; blocks.
    fn close(&self);
}
