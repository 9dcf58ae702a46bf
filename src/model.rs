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

/// Filters and paging for `list_workflows`. A filter of `None` means no filter, here and in every
/// other request; the binding passes Flujo's way of saying it, an empty string, as `None`.
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

/// `save_run_start`: a run record as Flujo's runner announces it. Timestamps are stored text.
#[derive(Debug, Clone, PartialEq)]
pub struct RunStart {
    pub run_id: String,
    pub pipeline_id: String,
    pub pipeline_name: String,
    pub pipeline_version: String,
    pub status: String,
    pub started_at: String,
    pub updated_at: String,
    pub execution_time_ms: Option<i64>,
    pub memory_usage_mb: Option<f64>,
    pub total_steps: i64,
    pub error_message: Option<String>,
}

/// `save_run_end`: what is known when a run finishes. `None` leaves a column as it was.
#[derive(Debug, Clone, PartialEq)]
pub struct RunEnd {
    pub status: String,
    pub ended_at: String,
    pub total_cost: Option<f64>,
    /// JSON text of the final context.
    pub final_context: Option<String>,
    pub execution_time_ms: Option<i64>,
    pub memory_usage_mb: Option<f64>,
    pub total_steps: Option<i64>,
    pub error_message: Option<String>,
}

/// `save_step_result`, with the names of both Flujo releases folded together.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    pub run_id: String,
    /// Flujo 0.4.35's key, `"<run_id>:<step_index>"` unless given.
    pub step_run_id: String,
    pub step_name: String,
    pub step_index: i64,
    pub status: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub duration_ms: Option<i64>,
    pub cost: Option<f64>,
    pub tokens: Option<i64>,
    /// JSON texts.
    pub input: String,
    pub output: String,
    pub error: Option<String>,
    pub raw_response: Option<String>,
}

/// A `runs` row with the fields of both releases; a field the file's layout lacks is `Null`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunDetails {
    pub run_id: Cell,
    pub pipeline_id: Cell,
    pub pipeline_name: Cell,
    pub pipeline_version: Cell,
    pub status: Cell,
    pub start_time: Cell,
    pub end_time: Cell,
    pub total_cost: Cell,
    pub final_context: Option<String>,
    pub created_at: Cell,
    pub updated_at: Cell,
    pub execution_time_ms: Cell,
    pub memory_usage_mb: Cell,
    pub total_steps: Cell,
    pub error_message: Cell,
}

/// A `steps` row with the fields of both releases (0.6.11's `cost_usd` is 0.4.35's `cost`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct StepDetails {
    pub step_name: Cell,
    pub step_index: Cell,
    pub status: Cell,
    pub start_time: Cell,
    pub end_time: Cell,
    pub duration_ms: Cell,
    pub cost: Cell,
    pub tokens: Cell,
    pub input: Option<String>,
    pub output: Option<String>,
    pub error: Option<String>,
    pub raw_response: Option<String>,
}

/// One item of `list_runs`.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub run_id: Cell,
    pub pipeline_name: Cell,
    pub pipeline_version: Cell,
    pub status: Cell,
    pub start_time: Cell,
    pub end_time: Cell,
    pub total_cost: Cell,
    pub created_at: Cell,
    pub updated_at: Cell,
    pub metadata: Option<String>,
}

/// One condition of `list_runs`' metadata filter on the JSON value at `path` (a JSON path in the
/// SQL/JSON syntax that SQLite and PostgreSQL both read, such as `$."env"."region"` or
/// `$."xs"[0]`) of a run's `workflow_state.metadata`. Together
/// they give Flujo's "contains": each dict of the filter is a subset of the object stored there,
/// and every other value equals the stored one as Python's `==` has it (`1`, `1.0` and `True`
/// are equal, and a dict inside a list must match whole).
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataCondition {
    pub path: String,
    pub test: MetadataTest,
}

#[derive(Debug, Clone, PartialEq)]
pub enum MetadataTest {
    /// An object, with any keys.
    Object,
    /// An object with exactly this many keys.
    ObjectOfSize(usize),
    /// An array with exactly this many items.
    ArrayOfLength(usize),
    /// An array whose items equal those of this JSON array one by one, where each number or
    /// boolean stands for its value and each array or object only for being one (they get
    /// conditions of their own). One condition for a list of any length.
    ArrayLike(String),
    Text(String),
    /// A number or a boolean (`true` being 1) equal to this one.
    Integer(i64),
    Real(f64),
    /// An integer beyond 64 bits, written exactly so.
    BigInteger(String),
    Null,
    /// Nothing stored as JSON can equal it (a tuple, which Python never finds equal to a list).
    Nothing,
    /// A value no JSON type of Python's matches, compared as its JSON encoding.
    EncodedAs(String),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunQuery {
    pub status: Option<String>,
    pub pipeline_name: Option<String>,
    pub limit: Option<u64>,
    pub offset: u64,
    pub metadata: Vec<MetadataCondition>,
}

/// A span to store; the tree is flattened by the caller (pre-order, parent ids from position).
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRecord {
    pub span_id: String,
    pub parent_span_id: Option<String>,
    pub name: String,
    pub start_time: f64,
    pub end_time: Option<f64>,
    pub status: String,
    /// JSON text.
    pub attributes: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredSpan {
    pub span_id: Cell,
    pub parent_span_id: Cell,
    pub name: Cell,
    pub start_time: Cell,
    pub end_time: Cell,
    pub status: Cell,
    pub attributes: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct DurationTotals {
    pub total_seconds: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpanStatistics {
    pub total_spans: u64,
    pub by_name: BTreeMap<String, u64>,
    pub by_status: BTreeMap<String, u64>,
    pub durations_by_name: BTreeMap<String, DurationTotals>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SystemStateEntry {
    pub key: Cell,
    pub value: Option<String>,
    pub updated_at: Cell,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub run_id: String,
    pub score: f64,
    pub feedback: Option<String>,
    pub step_name: Option<String>,
    /// JSON text.
    pub metadata: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvaluation {
    pub run_id: Cell,
    pub step_name: Cell,
    pub score: Cell,
    pub feedback: Cell,
    pub metadata: Option<String>,
    pub created_at: Cell,
}

/// Filters and paging for background tasks (workflow states flagged `is_background_task`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BackgroundTaskQuery {
    pub parent_run_id: Option<String>,
    pub status: Option<String>,
    pub limit: Option<u64>,
    pub offset: u64,
}
