//! Flujo 0.6.11's small key-value `system_state` table and its `evaluations`.

use rusqlite::{params, Connection, OptionalExtension};

use super::queries::{cell, json_text, listed_time, sql_limit};
use super::run_history::ensure_run;
use super::schema::Layout;
use crate::model::{Evaluation, StoredEvaluation, SystemStateEntry};
use crate::timestamp::now_text;

pub(crate) fn set_system_state(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO system_state (key, value, updated_at) VALUES (?1, ?2, ?3) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
    )?
    .execute(params![key, value, now_text()])?;
    Ok(())
}

pub(crate) fn get_system_state(
    conn: &Connection,
    key: &str,
) -> rusqlite::Result<Option<SystemStateEntry>> {
    conn.prepare_cached("SELECT key, value, updated_at FROM system_state WHERE key = ?1")?
        .query_row([key], |row| {
            Ok(SystemStateEntry {
                key: cell(row, 0)?,
                value: json_text(row, 1)?,
                updated_at: cell(row, 2)?,
            })
        })
        .optional()
}

/// Records an evaluation; a run that does not exist yet gets a placeholder row, so the foreign
/// key always holds (Flujo 0.6.11 enforced it only on some connections).
pub(crate) fn persist_evaluation(
    conn: &Connection,
    layout: &Layout,
    evaluation: &Evaluation,
) -> rusqlite::Result<()> {
    ensure_run(conn, layout, &evaluation.run_id, None, None)?;
    conn.prepare_cached(
        "INSERT INTO evaluations (run_id, step_name, score, feedback, metadata, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        evaluation.run_id,
        evaluation.step_name,
        evaluation.score,
        evaluation.feedback,
        evaluation.metadata,
        now_text(),
    ])?;
    Ok(())
}

pub(crate) fn list_evaluations(
    conn: &Connection,
    limit: Option<u64>,
    run_id: Option<&str>,
) -> rusqlite::Result<Vec<StoredEvaluation>> {
    // Two statements: `(?1 IS NULL OR run_id = ?1)` would keep SQLite off the run_id index.
    let sql = if run_id.is_some() {
        "SELECT run_id, step_name, score, feedback, metadata, created_at FROM evaluations \
         WHERE run_id = ?1 ORDER BY julianday(created_at) DESC, id DESC LIMIT ?2"
    } else {
        "SELECT run_id, step_name, score, feedback, metadata, created_at FROM evaluations \
         ORDER BY julianday(created_at) DESC, id DESC LIMIT ?2"
    };
    let mut stmt = conn.prepare_cached(sql)?;
    if let Some(run_id) = run_id {
        stmt.raw_bind_parameter(1, run_id)?;
    }
    stmt.raw_bind_parameter(2, sql_limit(limit))?;
    let rows = stmt.raw_query().mapped(|row| {
        Ok(StoredEvaluation {
            run_id: cell(row, 0)?,
            step_name: cell(row, 1)?,
            score: cell(row, 2)?,
            feedback: cell(row, 3)?,
            metadata: json_text(row, 4)?,
            created_at: listed_time(cell(row, 5)?),
        })
    });
    rows.collect()
}
