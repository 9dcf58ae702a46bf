//! Plain data exchanged between the binding layer and a storage engine. Nothing here knows
//! about SQLite or Python: a second engine (PostgreSQL) speaks the same types.

use std::collections::BTreeMap;

/// A single stored cell as the database holds it. Columns that Flujo returns "raw" come back
/// as this, so a value written by another program (or another Flujo release) is never coerced.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// The five workflow statuses Flujo 0.4.35's CHECK constraint allows; the only ones we write.
pub const WORKFLOW_STATUSES: [&str; 5] = ["running", "paused", "completed", "failed", "cancelled"];

/// A workflow state ready to be written: every value already validated and encoded.
/// JSON fields hold JSON text; timestamps hold their stored text (see `timestamp`).
#[derive(Debug, Clone, PartialEq)]
pub struct StateRecord {
    pub pipeline_id: String,
    pub pipeline_name: String,
    pub pipeline_version: String,
    pub current_step_index: i64,
    pub pipeline_context: String,
    pub last_step_output: Option<String>,
    pub step_history: Option<String>,
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
    pub total_steps: i64,
    pub error_message: Option<String>,
    pub execution_time_ms: Option<i64>,
    pub memory_usage_mb: Option<f64>,
    /// Columns Flujo 0.6.11 added (we add them to older files too).
    pub background: BackgroundFields,
}

/// Flujo 0.6.11's extra `workflow_state` columns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackgroundFields {
    pub metadata: Option<String>,
    pub is_background_task: bool,
    pub parent_run_id: Option<String>,
    pub task_id: Option<String>,
    pub background_error: Option<String>,
}

/// A full `workflow_state` row, as `load_state` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredState {
    pub run_id: Cell,
    pub pipeline_id: Cell,
    pub pipeline_name: Cell,
    pub pipeline_version: Cell,
    pub current_step_index: Cell,
    pub pipeline_context: Option<String>,
    pub last_step_output: Option<String>,
    pub step_history: Option<String>,
    pub status: Cell,
    pub created_at: Cell,
    pub updated_at: Cell,
    pub total_steps: Cell,
    pub error_message: Cell,
    pub execution_time_ms: Cell,
    pub memory_usage_mb: Cell,
    pub background: StoredBackground,
}

/// Flujo 0.6.11's extra columns as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredBackground {
    pub metadata: Option<String>,
    pub is_background_task: Cell,
    pub parent_run_id: Cell,
    pub task_id: Cell,
    pub background_error: Cell,
}

/// One item of `list_workflows` / `get_failed_workflows`: the row without its JSON payloads.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowSummary {
    pub run_id: Cell,
    pub pipeline_id: Cell,
    pub pipeline_name: Cell,
    pub pipeline_version: Cell,
    pub current_step_index: Cell,
    pub status: Cell,
    pub created_at: Cell,
    pub updated_at: Cell,
    pub total_steps: Cell,
    pub error_message: Cell,
    pub execution_time_ms: Cell,
    pub memory_usage_mb: Cell,
    pub background: StoredBackground,
}

/// One item of `list_states`.
#[derive(Debug, Clone, PartialEq)]
pub struct StateListing {
    pub run_id: Cell,
    pub status: Cell,
    pub created_at: Cell,
    pub updated_at: Cell,
}

/// Filters and paging for `list_workflows`. Empty strings are "no filter", as in Flujo.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkflowQuery {
    pub status: Option<String>,
    pub pipeline_id: Option<String>,
    pub limit: Option<u64>,
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowStats {
    pub total_workflows: u64,
    pub status_counts: BTreeMap<String, u64>,
    pub recent_workflows_24h: u64,
    /// `None` when no row has an execution time (Flujo reports the integer 0 then).
    pub average_execution_time_ms: Option<f64>,
    /// Counts over background tasks only (Flujo 0.6.11's `background_status_counts`).
    pub background_status_counts: BTreeMap<String, u64>,
}
