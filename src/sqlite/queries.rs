//! The SQL for each request, and the mapping of rows to the core's records.
//!
//! Statements are built only from the constant fragments below (never from caller text; all
//! values are bound) and go through rusqlite's prepared-statement cache.
//! Lists order by `created_at DESC, rowid DESC` (failed runs and background tasks by
//! `updated_at DESC, rowid DESC`): Flujo's order plus a tie-breaker, so paging sees every row
//! exactly once, and both columns come straight from our indexes.

use std::collections::BTreeMap;

use chrono::Utc;
use rusqlite::types::{Value, ValueRef};
use rusqlite::{params, Connection, OptionalExtension, Row, ToSql};

use crate::model::{
    BackgroundTaskQuery, Cell, StateListing, StateRecord, StoredBackground, StoredState,
    WorkflowQuery, WorkflowStats, WorkflowSummary,
};
use crate::timestamp::{self, TimeWindow};

/// The columns of a `WorkflowSummary`, in `summary`'s order: everything but the payloads. A
/// macro so the statements below can be `concat!`ed constants.
macro_rules! summary_columns {
    () => {
        "run_id, pipeline_id, pipeline_name, pipeline_version, current_step_index, status, \
         created_at, updated_at, total_steps, error_message, execution_time_ms, \
         memory_usage_mb, metadata, is_background_task, parent_run_id, task_id, \
         background_error"
    };
}

/// `SELECT` of the summary columns `FROM workflow_state`, then the rest of the statement.
macro_rules! summaries {
    ($($rest:literal),*) => {
        concat!("SELECT ", summary_columns!(), " FROM workflow_state ", $($rest),*)
    };
}

/// `avg` skips NULLs anyway; saying so lets SQLite read the partial index of known times.
const AVERAGE_EXECUTION_TIME: &str = "SELECT avg(execution_time_ms) FROM workflow_state \
     WHERE execution_time_ms IS NOT NULL";

const FAILED_WORKFLOWS: &str = summaries!(
    "WHERE status = 'failed' \
     AND updated_at >= ?1 AND julianday(updated_at) >= julianday(?2) \
     ORDER BY updated_at DESC, rowid DESC"
);

/// One statement per combination of filters, each naming only its own: a condition such as
/// `(?1 IS NULL OR parent_run_id = ?1)` keeps SQLite off the index that serves it.
fn background_tasks_sql(by_parent: bool, by_status: bool) -> &'static str {
    macro_rules! listing {
        ($filter:literal) => {
            summaries!(
                "WHERE is_background_task = 1 ",
                $filter,
                " ORDER BY updated_at DESC, rowid DESC LIMIT ?3 OFFSET ?4"
            )
        };
    }
    match (by_parent, by_status) {
        // A parent has few tasks, a status may have many: `+` keeps SQLite on the parent's.
        (true, true) => listing!("AND parent_run_id = ?1 AND +status = ?2"),
        (true, false) => listing!("AND parent_run_id = ?1"),
        (false, true) => listing!("AND status = ?2"),
        (false, false) => listing!(""),
    }
}

fn failed_background_tasks_sql(by_parent: bool) -> &'static str {
    macro_rules! listing {
        ($filter:literal) => {
            summaries!(
                "WHERE is_background_task = 1 ",
                $filter,
                " AND updated_at >= ?2 AND julianday(updated_at) >= julianday(?3) \
                 ORDER BY updated_at DESC, rowid DESC"
            )
        };
    }
    if by_parent {
        listing!("AND +status = 'failed' AND parent_run_id = ?1") // see background_tasks_sql
    } else {
        listing!("AND status = 'failed'")
    }
}

const BACKGROUND_STATUS_COUNTS: &str = "SELECT status, count(*) FROM workflow_state \
     WHERE is_background_task = 1 GROUP BY status";

const UPSERT_STATE: &str = "INSERT INTO workflow_state (run_id, pipeline_id, \
     pipeline_name, pipeline_version, current_step_index, pipeline_context, last_step_output, \
     step_history, status, created_at, updated_at, total_steps, error_message, \
     execution_time_ms, memory_usage_mb, metadata, is_background_task, parent_run_id, task_id, \
     background_error) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, \
     ?15, ?16, ?17, ?18, ?19, ?20) \
     ON CONFLICT(run_id) DO UPDATE SET pipeline_id = excluded.pipeline_id, \
     pipeline_name = excluded.pipeline_name, pipeline_version = excluded.pipeline_version, \
     current_step_index = excluded.current_step_index, \
     pipeline_context = excluded.pipeline_context, last_step_output = excluded.last_step_output, \
     step_history = excluded.step_history, status = excluded.status, \
     created_at = excluded.created_at, updated_at = excluded.updated_at, \
     total_steps = excluded.total_steps, error_message = excluded.error_message, \
     execution_time_ms = excluded.execution_time_ms, memory_usage_mb = excluded.memory_usage_mb, \
     metadata = excluded.metadata, is_background_task = excluded.is_background_task, \
     parent_run_id = excluded.parent_run_id, task_id = excluded.task_id, \
     background_error = excluded.background_error";

pub(crate) fn save_state(conn: &Connection, run_id: &str, r: &StateRecord) -> rusqlite::Result<()> {
    let b = &r.background;
    let values: [&dyn ToSql; 20] = [
        &run_id,
        &r.pipeline_id,
        &r.pipeline_name,
        &r.pipeline_version,
        &r.current_step_index,
        &r.pipeline_context,
        &r.last_step_output,
        &r.step_history,
        &r.status,
        &r.created_at,
        &r.updated_at,
        &r.total_steps,
        &r.error_message,
        &r.execution_time_ms,
        &r.memory_usage_mb,
        &b.metadata,
        &b.is_background_task,
        &b.parent_run_id,
        &b.task_id,
        &b.background_error,
    ];
    conn.prepare_cached(UPSERT_STATE)?
        .execute(values.as_slice())?;
    Ok(())
}

/// The stored `updated_at` text of a run, or `None` when the run does not exist.
pub(crate) fn stored_updated_at(
    conn: &Connection,
    run_id: &str,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT updated_at FROM workflow_state WHERE run_id = ?1")?
        .query_row([run_id], |row| {
            Ok(sql_text(row.get_ref(0)?).unwrap_or_else(|| "NULL".to_owned()))
        })
        .optional()
}

pub(crate) fn delete_state(conn: &Connection, run_id: &str) -> rusqlite::Result<()> {
    conn.prepare_cached("DELETE FROM workflow_state WHERE run_id = ?1")?
        .execute([run_id])?;
    Ok(())
}

pub(crate) fn load_state(conn: &Connection, run_id: &str) -> rusqlite::Result<Option<StoredState>> {
    conn.prepare_cached(
        "SELECT run_id, pipeline_id, pipeline_name, pipeline_version, current_step_index, \
         pipeline_context, last_step_output, step_history, status, created_at, updated_at, \
         total_steps, error_message, execution_time_ms, memory_usage_mb, metadata, \
         is_background_task, parent_run_id, task_id, background_error \
         FROM workflow_state WHERE run_id = ?1",
    )?
    .query_row([run_id], |row| {
        Ok(StoredState {
            run_id: cell(row, 0)?,
            pipeline_id: cell(row, 1)?,
            pipeline_name: cell(row, 2)?,
            pipeline_version: cell(row, 3)?,
            current_step_index: cell(row, 4)?,
            pipeline_context: json_text(row, 5)?,
            last_step_output: json_text(row, 6)?,
            step_history: json_text(row, 7)?,
            status: cell(row, 8)?,
            created_at: cell(row, 9)?,
            updated_at: cell(row, 10)?,
            total_steps: cell(row, 11)?,
            error_message: cell(row, 12)?,
            execution_time_ms: cell(row, 13)?,
            memory_usage_mb: cell(row, 14)?,
            background: background(row, 15)?,
        })
    })
    .optional()
}

pub(crate) fn list_states(
    conn: &Connection,
    status: Option<&str>,
) -> rusqlite::Result<Vec<StateListing>> {
    let sql = format!(
        "SELECT run_id, status, created_at, updated_at FROM workflow_state {} \
         ORDER BY created_at DESC, rowid DESC",
        if status.is_some() {
            "WHERE status = ?1"
        } else {
            ""
        }
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let map = |row: &Row| {
        Ok(StateListing {
            run_id: cell(row, 0)?,
            status: cell(row, 1)?,
            created_at: listed_time(cell(row, 2)?),
            updated_at: listed_time(cell(row, 3)?),
        })
    };
    let rows = match status {
        Some(s) => stmt.query_map([s], map)?.collect(),
        None => stmt.query_map([], map)?.collect(),
    };
    rows
}

/// The statement for a filter on status, pipeline, both or neither.
fn list_workflows_sql(by_status: bool, by_pipeline: bool) -> &'static str {
    macro_rules! listing {
        ($filter:literal) => {
            summaries!(
                $filter,
                " ORDER BY created_at DESC, rowid DESC LIMIT ?3 OFFSET ?4"
            )
        };
    }
    match (by_status, by_pipeline) {
        (true, true) => listing!("WHERE status = ?1 AND pipeline_id = ?2"),
        (true, false) => listing!("WHERE status = ?1"),
        (false, true) => listing!("WHERE pipeline_id = ?2"),
        (false, false) => listing!(""),
    }
}

pub(crate) fn list_workflows(
    conn: &Connection,
    query: &WorkflowQuery,
) -> rusqlite::Result<Vec<WorkflowSummary>> {
    let status = query.status.as_deref();
    let pipeline = query.pipeline_id.as_deref();
    let sql = list_workflows_sql(status.is_some(), pipeline.is_some());
    let (limit, offset) = (sql_limit(query.limit), sql_offset(query.offset));
    let mut stmt = conn.prepare_cached(sql)?;
    for (index, value) in [(1, status), (2, pipeline)] {
        if let Some(value) = value {
            stmt.raw_bind_parameter(index, value)?;
        }
    }
    stmt.raw_bind_parameter(3, limit)?;
    stmt.raw_bind_parameter(4, offset)?;
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(summary(row)?);
    }
    Ok(out)
}

/// The counts of `get_workflow_stats`, all from one read snapshot so they agree with each other
/// while saves go on. The average duration is left out: `stats` runs it on another connection
/// at the same time.
pub(crate) fn workflow_counts(conn: &Connection) -> rusqlite::Result<WorkflowCounts> {
    let snapshot = conn.unchecked_transaction()?;
    let conn: &Connection = &snapshot;
    let (status_counts, total) = counts_of_every_status(conn)?;
    let day = TimeWindow::before(Utc::now(), chrono::Duration::hours(24));
    let recent: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM workflow_state WHERE created_at >= ?1 \
             AND julianday(created_at) >= julianday(?2)",
        )?
        .query_row(params![day.text_low, day.cutoff], |r| r.get(0))?;
    let background_status_counts = background_status_counts(conn)?;
    snapshot.commit()?;
    Ok(WorkflowCounts {
        total_workflows: total,
        status_counts,
        recent_workflows_24h: recent.max(0) as u64,
        background_status_counts,
    })
}

/// What `workflow_counts` finds; `with_average` completes it into the stats a caller gets.
#[derive(Debug)]
pub(crate) struct WorkflowCounts {
    total_workflows: u64,
    status_counts: BTreeMap<String, u64>,
    recent_workflows_24h: u64,
    background_status_counts: BTreeMap<String, u64>,
}

impl WorkflowCounts {
    pub(crate) fn with_average(self, average_execution_time_ms: Option<f64>) -> WorkflowStats {
        WorkflowStats {
            total_workflows: self.total_workflows,
            status_counts: self.status_counts,
            recent_workflows_24h: self.recent_workflows_24h,
            average_execution_time_ms,
            background_status_counts: self.background_status_counts,
        }
    }
}

/// The mean of every known `execution_time_ms`, `None` when there is none.
pub(crate) fn average_execution_time(conn: &Connection) -> rusqlite::Result<Option<f64>> {
    conn.prepare_cached(AVERAGE_EXECUTION_TIME)?
        .query_row([], |r| r.get(0))
}

/// Counts per non-NULL status, and the total of all rows (those whose status is NULL, which
/// only another program could write, count in the total alone).
///
/// SQLite counts a whole table page by page (~10 us at 100k rows), but any filtered count, or
/// `GROUP BY status`, steps through every index entry (~25 ns each). So every status but the
/// most common one is counted on its own, the statuses found by seeking from one to the next,
/// and the most common one is what remains of the total: at 70 % completed runs this reads a
/// third of the entries.
fn counts_of_every_status(conn: &Connection) -> rusqlite::Result<(BTreeMap<String, u64>, u64)> {
    /// Finished runs pile up; any status is counted right if this guess is wrong, only slower.
    const MOST_COMMON: &str = "completed";
    let count_rows = |sql: &str, status: Option<&Value>| -> rusqlite::Result<u64> {
        let mut stmt = conn.prepare_cached(sql)?;
        let rows = match status {
            Some(status) => stmt.query_row([status], |r| r.get::<_, i64>(0))?,
            None => stmt.query_row([], |r| r.get::<_, i64>(0))?,
        };
        Ok(rows.max(0) as u64)
    };
    let total = count_rows("SELECT count(*) FROM workflow_state", None)?;
    let mut counted = count_rows(
        "SELECT count(*) FROM workflow_state WHERE status IS NULL",
        None,
    )?;
    let mut counts = BTreeMap::new();
    let mut most_common_seen = false;
    let mut after =
        conn.prepare_cached("SELECT min(status) FROM workflow_state WHERE status > ?1")?;
    let mut status: Option<Value> = conn
        .prepare_cached("SELECT min(status) FROM workflow_state")?
        .query_row([], |r| r.get(0))?;
    while let Some(current) = status {
        if matches!(&current, Value::Text(text) if text == MOST_COMMON) {
            most_common_seen = true;
        } else {
            let rows = count_rows(
                "SELECT count(*) FROM workflow_state WHERE status = ?1",
                Some(&current),
            )?;
            counted += rows;
            // The same status stored as text and as bytes counts under one key.
            *counts.entry(status_text(&current)).or_default() += rows;
        }
        status = after.query_row([&current], |r| r.get(0))?;
    }
    if most_common_seen {
        *counts.entry(MOST_COMMON.to_owned()).or_default() += total.saturating_sub(counted);
    }
    Ok((counts, total))
}

/// A status stored as bytes or a number by some other program still counts under its text.
fn status_text(value: &Value) -> String {
    sql_text(ValueRef::from(value)).unwrap_or_default()
}

/// Background tasks per non-NULL status.
fn background_status_counts(conn: &Connection) -> rusqlite::Result<BTreeMap<String, u64>> {
    let mut stmt = conn.prepare_cached(BACKGROUND_STATUS_COUNTS)?;
    let mut rows = stmt.query([])?;
    let mut counts = BTreeMap::new();
    while let Some(row) = rows.next()? {
        let status: Value = row.get(0)?;
        if status == Value::Null {
            continue;
        }
        // The same status stored as text and as bytes counts under one key.
        *counts.entry(status_text(&status)).or_default() += row.get::<_, i64>(1)?.max(0) as u64;
    }
    Ok(counts)
}

/// Failed runs updated at or after the window's cutoff, most recently updated first.
pub(crate) fn failed_workflows(
    conn: &Connection,
    window: &TimeWindow,
) -> rusqlite::Result<Vec<WorkflowSummary>> {
    let mut stmt = conn.prepare_cached(FAILED_WORKFLOWS)?;
    let rows = stmt.query_map(params![window.text_low, window.cutoff], summary)?;
    rows.collect()
}

/// Deletes at most `limit` rows created before the window's cutoff; the writer calls it
/// repeatedly, one transaction each, until it returns fewer.
pub(crate) fn cleanup_batch(
    conn: &Connection,
    window: &TimeWindow,
    limit: usize,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "DELETE FROM workflow_state WHERE rowid IN (SELECT rowid FROM workflow_state \
         WHERE created_at < ?1 AND julianday(created_at) < julianday(?2) LIMIT ?3)",
    )?
    .execute(params![window.text_high, window.cutoff, limit as i64])
}

fn summary(row: &Row) -> rusqlite::Result<WorkflowSummary> {
    Ok(WorkflowSummary {
        run_id: cell(row, 0)?,
        pipeline_id: cell(row, 1)?,
        pipeline_name: cell(row, 2)?,
        pipeline_version: cell(row, 3)?,
        current_step_index: cell(row, 4)?,
        status: cell(row, 5)?,
        created_at: listed_time(cell(row, 6)?),
        updated_at: listed_time(cell(row, 7)?),
        total_steps: cell(row, 8)?,
        error_message: cell(row, 9)?,
        execution_time_ms: cell(row, 10)?,
        memory_usage_mb: cell(row, 11)?,
        background: background(row, 12)?,
    })
}

fn background(row: &Row, first: usize) -> rusqlite::Result<StoredBackground> {
    Ok(StoredBackground {
        metadata: json_text(row, first)?,
        is_background_task: cell(row, first + 1)?,
        parent_run_id: cell(row, first + 2)?,
        task_id: cell(row, first + 3)?,
        background_error: cell(row, first + 4)?,
    })
}

/// A timestamp cell as the lists return it (see [`timestamp::listed_text`]).
pub(crate) fn listed_time(stored: Cell) -> Cell {
    match stored {
        Cell::Text(text) => Cell::Text(timestamp::listed_text(text)),
        other => other,
    }
}

pub(crate) fn cell(row: &Row, index: usize) -> rusqlite::Result<Cell> {
    Ok(match row.get_ref(index)? {
        ValueRef::Null => Cell::Null,
        ValueRef::Integer(i) => Cell::Integer(i),
        ValueRef::Real(f) => Cell::Real(f),
        ValueRef::Text(t) => Cell::Text(owned_text(t)?),
        ValueRef::Blob(b) => Cell::Blob(owned_bytes(b)?),
    })
}

/// Stored text as a `String`; bytes that are not UTF-8 (only another program could write them)
/// become U+FFFD. The strict check goes first because it validates ASCII a word at a time, several
/// times faster than the lossy decoder's byte loop on the ~4 KB of JSON a load returns.
fn owned_text(bytes: &[u8]) -> rusqlite::Result<String> {
    Ok(String::from_utf8(owned_bytes(bytes)?)
        .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()))
}

/// A copy of a stored value. One bigger than the memory the process may still take (under a
/// limit on its address space, say) is an error for its caller, where Rust's allocator would
/// abort the process.
fn owned_bytes(bytes: &[u8]) -> rusqlite::Result<Vec<u8>> {
    let mut copy = Vec::new();
    copy.try_reserve_exact(bytes.len()).map_err(|_| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_NOMEM),
            Some(format!(
                "out of memory: no room left in this process for a stored value of {} MB",
                bytes.len() >> 20
            )),
        )
    })?;
    copy.extend_from_slice(bytes);
    Ok(copy)
}

/// A JSON column: its text, or `None` for SQL NULL. Non-text values (written by hand through
/// SQL) are returned as their JSON spelling so decoding still succeeds.
pub(crate) fn json_text(row: &Row, index: usize) -> rusqlite::Result<Option<String>> {
    match row.get_ref(index)? {
        ValueRef::Text(t) | ValueRef::Blob(t) => owned_text(t).map(Some),
        other => Ok(sql_text(other)),
    }
}

/// A text column's value as text, whatever another program stored there; `None` for NULL.
/// Numbers are spelt so that JSON (and Python's `json`) reads them back as the same number: a
/// real keeps its fraction (`1.0`, `-0.0`), and the infinities become `Infinity`.
pub(crate) fn sql_text(value: ValueRef<'_>) -> Option<String> {
    match value {
        ValueRef::Null => None,
        ValueRef::Integer(i) => Some(i.to_string()),
        ValueRef::Real(f) if f.is_infinite() => {
            Some(if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned())
        }
        ValueRef::Real(f) => Some(format!("{f:?}")),
        ValueRef::Text(t) | ValueRef::Blob(t) => Some(String::from_utf8_lossy(t).into_owned()),
    }
}

/// Background tasks (workflow states flagged `is_background_task`), most recently updated first.
pub(crate) fn list_background_tasks(
    conn: &Connection,
    query: &BackgroundTaskQuery,
) -> rusqlite::Result<Vec<WorkflowSummary>> {
    let parent = query.parent_run_id.as_deref();
    let status = query.status.as_deref();
    let sql = background_tasks_sql(parent.is_some(), status.is_some());
    let mut stmt = conn.prepare_cached(sql)?;
    for (index, value) in [(1, parent), (2, status)] {
        if let Some(value) = value {
            stmt.raw_bind_parameter(index, value)?;
        }
    }
    stmt.raw_bind_parameter(3, sql_limit(query.limit))?;
    stmt.raw_bind_parameter(4, sql_offset(query.offset))?;
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(summary(row)?);
    }
    Ok(out)
}

/// Failed background tasks updated since the window's cutoff, compared as exact instants.
pub(crate) fn failed_background_tasks(
    conn: &Connection,
    parent_run_id: Option<&str>,
    window: &TimeWindow,
) -> rusqlite::Result<Vec<WorkflowSummary>> {
    let mut stmt = conn.prepare_cached(failed_background_tasks_sql(parent_run_id.is_some()))?;
    if let Some(parent) = parent_run_id {
        stmt.raw_bind_parameter(1, parent)?;
    }
    stmt.raw_bind_parameter(2, &window.text_low)?;
    stmt.raw_bind_parameter(3, &window.cutoff)?;
    let mut rows = stmt.raw_query();
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push(summary(row)?);
    }
    Ok(out)
}

/// Marks running background tasks not updated since the cutoff as failed; returns how many.
pub(crate) fn cleanup_stale_background_tasks(
    conn: &Connection,
    window: &TimeWindow,
) -> rusqlite::Result<usize> {
    conn.prepare_cached(
        "UPDATE workflow_state SET status = 'failed', \
         background_error = 'Task timeout: process likely crashed', updated_at = ?3 \
         WHERE is_background_task = 1 AND status = 'running' \
         AND updated_at < ?1 AND julianday(updated_at) < julianday(?2)",
    )?
    .execute(params![
        window.text_high,
        window.cutoff,
        crate::timestamp::now_text()
    ])
}

/// A list's `LIMIT`: SQLite reads a negative one as "no limit".
pub(crate) fn sql_limit(limit: Option<u64>) -> i64 {
    limit.map_or(-1, |l| i64::try_from(l).unwrap_or(i64::MAX))
}

/// A list's `OFFSET`, past the last row when larger than any table can hold.
pub(crate) fn sql_offset(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FreshLayout;
    use crate::sqlite::query_plans::{prepared_file, query_plan};

    /// Numbers another program stored where text belongs read as JSON spells them, so that a
    /// JSON column gives back the same number and a status counts under its plain text.
    #[test]
    fn values_that_are_not_text_read_as_their_text() {
        let cases = [
            (ValueRef::Integer(-1), "-1"),
            (ValueRef::Real(2.5), "2.5"),
            (ValueRef::Real(1.0), "1.0"),
            (ValueRef::Real(-0.0), "-0.0"),
            (ValueRef::Real(1e20), "1e20"),
            (ValueRef::Real(f64::INFINITY), "Infinity"),
            (ValueRef::Real(f64::NEG_INFINITY), "-Infinity"),
            (ValueRef::Text(b"running"), "running"),
            (ValueRef::Blob(b"failed"), "failed"),
        ];
        for (value, text) in cases {
            assert_eq!(sql_text(value).as_deref(), Some(text), "{value:?}");
        }
        assert_eq!(sql_text(ValueRef::Null), None);
        assert_eq!(status_text(&Value::Real(2.5)), "2.5");
    }

    /// The admin queries must find their rows through our indexes, in order, without reading
    /// or sorting the table: a planner that drifted to a scan would still return right answers,
    /// only 50-100x slower, so nothing else would notice. The partial indexes are picked only
    /// when the query repeats their condition, which this pins down.
    #[test]
    fn admin_queries_read_our_indexes_without_scanning_or_sorting() {
        let dir = tempfile::tempdir().unwrap();
        let (conn, _) = prepared_file(dir.path(), FreshLayout::default());
        let expected = [
            (
                list_workflows_sql(true, false),
                "idx_flujo_sqlite_state_status_created",
            ),
            (
                list_workflows_sql(false, true),
                "idx_flujo_sqlite_state_pipeline_created",
            ),
            (FAILED_WORKFLOWS, "idx_flujo_sqlite_state_failed_updated"),
            (
                AVERAGE_EXECUTION_TIME,
                "idx_flujo_sqlite_state_execution_time_known",
            ),
            (
                background_tasks_sql(false, false),
                "idx_flujo_sqlite_background_updated",
            ),
            (
                background_tasks_sql(true, false),
                "idx_flujo_sqlite_background_parent_updated",
            ),
            (
                background_tasks_sql(false, true),
                "idx_flujo_sqlite_background_status_updated",
            ),
            (
                background_tasks_sql(true, true),
                "idx_flujo_sqlite_background_parent_updated",
            ),
            (
                failed_background_tasks_sql(false),
                "idx_flujo_sqlite_background_status_updated",
            ),
            (
                failed_background_tasks_sql(true),
                "idx_flujo_sqlite_background_parent_updated",
            ),
            (
                BACKGROUND_STATUS_COUNTS,
                "idx_flujo_sqlite_background_status_updated",
            ),
        ];
        for (sql, index) in expected {
            let steps = query_plan(&conn, sql, &[]);
            assert!(
                steps
                    .iter()
                    .any(|s| s.split_whitespace().any(|word| word == index)),
                "{sql}\nshould use {index}, but the plan is {steps:?}"
            );
            // Scanning a partial index reads only the rows it lists; scanning the table, all.
            let scans_the_table =
                |s: &String| s.starts_with("SCAN workflow_state") && !s.contains(index);
            assert!(
                !steps
                    .iter()
                    .any(|s| scans_the_table(s) || s.contains("ORDER BY")),
                "{sql}\nscans or sorts: {steps:?}"
            );
        }
    }
}
