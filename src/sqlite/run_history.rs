//! Runs and steps, in whichever layout the file has (Flujo 0.4.35's or 0.6.11's, or a 0.4.35
//! file that 0.6.11 extended). Statements name only columns the file has; values that both
//! releases keep under different names are written to, and read from, whichever exists.

use std::collections::HashSet;

use rusqlite::types::Value;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use super::queries::{cell, json_text, sql_limit, sql_offset};
use super::schema::Layout;
use crate::model::{
    MetadataCondition, MetadataTest, RunDetails, RunEnd, RunQuery, RunStart, RunSummary,
    StepDetails, StepRecord,
};
use crate::timestamp::now_text;

/// Named values for one row; those whose column the table lacks are dropped.
struct ColumnValues<'a> {
    columns: &'a HashSet<String>,
    names: Vec<&'static str>,
    values: Vec<Value>,
}

impl<'a> ColumnValues<'a> {
    fn new(columns: &'a HashSet<String>) -> Self {
        ColumnValues {
            columns,
            names: Vec::new(),
            values: Vec::new(),
        }
    }

    fn set(mut self, name: &'static str, value: impl Into<Value>) -> Self {
        if self.columns.contains(name) {
            self.names.push(name);
            self.values.push(value.into());
        }
        self
    }

    fn placeholders(&self) -> String {
        (1..=self.names.len())
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Creates a placeholder run so rows that reference it satisfy the foreign key (Flujo 0.6.11
/// does the same; 0.4.35 left orphans). An existing run is left as it is.
pub(crate) fn ensure_run(
    conn: &Connection,
    layout: &Layout,
    run_id: &str,
    pipeline_name: Option<&str>,
    pipeline_version: Option<&str>,
) -> rusqlite::Result<()> {
    let now = now_text();
    let row = ColumnValues::new(&layout.runs)
        .set("run_id", run_id.to_owned())
        .set("pipeline_id", "unknown".to_owned())
        .set(
            "pipeline_name",
            pipeline_name.unwrap_or("unknown").to_owned(),
        )
        .set(
            "pipeline_version",
            pipeline_version.unwrap_or("latest").to_owned(),
        )
        .set("status", "running".to_owned())
        .set("start_time", now.clone())
        .set("created_at", now.clone())
        .set("updated_at", now);
    let sql = format!(
        "INSERT OR IGNORE INTO runs ({}) VALUES ({})",
        row.names.join(", "),
        row.placeholders()
    );
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(row.values))?;
    Ok(())
}

/// Upserts the run. Unlike Flujo's `INSERT OR REPLACE`, the row is updated in place, so a
/// second start never cascades away the run's steps and spans.
pub(crate) fn save_run_start(
    conn: &Connection,
    layout: &Layout,
    run: &RunStart,
) -> rusqlite::Result<()> {
    let row = ColumnValues::new(&layout.runs)
        .set("run_id", run.run_id.clone())
        .set("pipeline_id", run.pipeline_id.clone())
        .set("pipeline_name", run.pipeline_name.clone())
        .set("pipeline_version", run.pipeline_version.clone())
        .set("status", run.status.clone())
        .set("start_time", run.started_at.clone())
        .set("created_at", run.started_at.clone())
        .set("updated_at", run.updated_at.clone())
        .set("end_time", Value::Null)
        .set("total_cost", Value::Null)
        .set("final_context_blob", Value::Null)
        .set(
            "execution_time_ms",
            run.execution_time_ms.map_or(Value::Null, Value::Integer),
        )
        .set(
            "memory_usage_mb",
            run.memory_usage_mb.map_or(Value::Null, Value::Real),
        )
        .set("total_steps", run.total_steps)
        .set(
            "error_message",
            run.error_message.clone().map_or(Value::Null, Value::Text),
        );
    let updates: Vec<String> = row
        .names
        .iter()
        .filter(|n| **n != "run_id")
        .map(|n| format!("{n} = excluded.{n}"))
        .collect();
    let sql = format!(
        "INSERT INTO runs ({}) VALUES ({}) ON CONFLICT(run_id) DO UPDATE SET {}",
        row.names.join(", "),
        row.placeholders(),
        updates.join(", ")
    );
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(row.values))?;
    Ok(())
}

/// Updates a finished run; a run that does not exist is left alone, as in Flujo.
pub(crate) fn save_run_end(
    conn: &Connection,
    layout: &Layout,
    run_id: &str,
    end: &RunEnd,
) -> rusqlite::Result<()> {
    let optional = |value: Option<Value>| value.unwrap_or(Value::Null);
    let mut row = ColumnValues::new(&layout.runs)
        .set("status", end.status.clone())
        .set("end_time", end.ended_at.clone())
        .set("updated_at", end.ended_at.clone());
    for (name, value) in [
        ("total_cost", end.total_cost.map(Value::Real)),
        (
            "final_context_blob",
            end.final_context.clone().map(Value::Text),
        ),
        (
            "execution_time_ms",
            end.execution_time_ms.map(Value::Integer),
        ),
        ("memory_usage_mb", end.memory_usage_mb.map(Value::Real)),
        ("total_steps", end.total_steps.map(Value::Integer)),
        ("error_message", end.error_message.clone().map(Value::Text)),
    ] {
        // Only what the caller knows replaces what is stored.
        if value.is_some() {
            row = row.set(name, optional(value));
        }
    }
    let assignments: Vec<String> = row
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{n} = ?{}", i + 1))
        .collect();
    let sql = format!(
        "UPDATE runs SET {} WHERE run_id = ?{}",
        assignments.join(", "),
        row.names.len() + 1
    );
    let mut values = row.values;
    values.push(Value::Text(run_id.to_owned()));
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(values))?;
    Ok(())
}

pub(crate) fn save_step_result(
    conn: &Connection,
    layout: &Layout,
    step: &StepRecord,
) -> rusqlite::Result<()> {
    ensure_run(conn, layout, &step.run_id, None, None)?;
    let text = |v: &Option<String>| v.clone().map_or(Value::Null, Value::Text);
    let row = ColumnValues::new(&layout.steps)
        .set("step_run_id", step.step_run_id.clone())
        .set("run_id", step.run_id.clone())
        .set("step_name", step.step_name.clone())
        .set("step_index", step.step_index)
        .set("status", step.status.clone())
        .set("start_time", step.started_at.clone())
        .set("created_at", step.started_at.clone())
        .set("end_time", text(&step.ended_at))
        .set(
            "duration_ms",
            step.duration_ms.map_or(Value::Null, Value::Integer),
        )
        .set(
            "execution_time_ms",
            step.duration_ms.map_or(Value::Null, Value::Integer),
        )
        .set("cost", step.cost.map_or(Value::Null, Value::Real))
        .set("cost_usd", step.cost.map_or(Value::Null, Value::Real))
        .set("tokens", step.tokens.map_or(Value::Null, Value::Integer))
        .set(
            "token_counts",
            step.tokens.map_or(Value::Null, Value::Integer),
        )
        .set("input_blob", step.input.clone())
        .set("output_blob", step.output.clone())
        .set("output", step.output.clone())
        .set("error_blob", text(&step.error))
        .set("raw_response", text(&step.raw_response));
    // 0.4.35 keys steps by step_run_id and replaces; 0.6.11 appends a row per call.
    let verb = if layout.steps_are_appended() {
        "INSERT"
    } else {
        "INSERT OR REPLACE"
    };
    let sql = format!(
        "{verb} INTO steps ({}) VALUES ({})",
        row.names.join(", "),
        row.placeholders()
    );
    conn.prepare_cached(&sql)?
        .execute(params_from_iter(row.values))?;
    Ok(())
}

/// A column, or `NULL` when the layout lacks it, for building SELECT lists.
fn column_or_null(columns: &HashSet<String>, prefix: &str, name: &str) -> String {
    if columns.contains(name) {
        format!("{prefix}{name}")
    } else {
        "NULL".to_owned()
    }
}

/// The first of `names` the layout has, falling through blanks (0.6.11 backfills some with '').
fn first_present(columns: &HashSet<String>, prefix: &str, names: &[&str]) -> String {
    let present: Vec<String> = names
        .iter()
        .filter(|n| columns.contains(**n))
        .map(|n| format!("nullif({prefix}{n}, '')"))
        .collect();
    match present.len() {
        0 => "NULL".to_owned(),
        1 => present[0].clone(),
        _ => format!("coalesce({})", present.join(", ")),
    }
}

pub(crate) fn get_run_details(
    conn: &Connection,
    layout: &Layout,
    run_id: &str,
) -> rusqlite::Result<Option<RunDetails>> {
    let c = &layout.runs;
    let sql = format!(
        "SELECT run_id, {}, pipeline_name, pipeline_version, status, {}, {}, {}, {}, {}, {}, {}, {}, {}, {} \
         FROM runs WHERE run_id = ?1",
        column_or_null(c, "", "pipeline_id"),
        first_present(c, "", &["start_time", "created_at"]),
        column_or_null(c, "", "end_time"),
        column_or_null(c, "", "total_cost"),
        column_or_null(c, "", "final_context_blob"),
        first_present(c, "", &["created_at", "start_time"]),
        first_present(c, "", &["updated_at", "end_time", "start_time"]),
        column_or_null(c, "", "execution_time_ms"),
        column_or_null(c, "", "memory_usage_mb"),
        column_or_null(c, "", "total_steps"),
        column_or_null(c, "", "error_message"),
    );
    conn.prepare_cached(&sql)?
        .query_row([run_id], |row| {
            Ok(RunDetails {
                run_id: cell(row, 0)?,
                pipeline_id: cell(row, 1)?,
                pipeline_name: cell(row, 2)?,
                pipeline_version: cell(row, 3)?,
                status: cell(row, 4)?,
                start_time: cell(row, 5)?,
                end_time: cell(row, 6)?,
                total_cost: cell(row, 7)?,
                final_context: json_text(row, 8)?,
                created_at: cell(row, 9)?,
                updated_at: cell(row, 10)?,
                execution_time_ms: cell(row, 11)?,
                memory_usage_mb: cell(row, 12)?,
                total_steps: cell(row, 13)?,
                error_message: cell(row, 14)?,
            })
        })
        .optional()
}

pub(crate) fn list_run_steps(
    conn: &Connection,
    layout: &Layout,
    run_id: &str,
) -> rusqlite::Result<Vec<StepDetails>> {
    let c = &layout.steps;
    let order = if layout.steps_are_appended() {
        "step_index, id"
    } else {
        "step_index, rowid"
    };
    let sql = format!(
        "SELECT step_name, step_index, status, {}, {}, {}, {}, {}, {}, {}, {}, {} FROM steps \
         WHERE run_id = ?1 ORDER BY {order}",
        first_present(c, "", &["start_time", "created_at"]),
        column_or_null(c, "", "end_time"),
        first_present(c, "", &["duration_ms", "execution_time_ms"]),
        first_present(c, "", &["cost", "cost_usd"]),
        first_present(c, "", &["tokens", "token_counts"]),
        column_or_null(c, "", "input_blob"),
        first_present(c, "", &["output_blob", "output"]),
        column_or_null(c, "", "error_blob"),
        column_or_null(c, "", "raw_response"),
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map([run_id], |row| {
        Ok(StepDetails {
            step_name: cell(row, 0)?,
            step_index: cell(row, 1)?,
            status: cell(row, 2)?,
            start_time: cell(row, 3)?,
            end_time: cell(row, 4)?,
            duration_ms: cell(row, 5)?,
            cost: cell(row, 6)?,
            tokens: cell(row, 7)?,
            input: json_text(row, 8)?,
            output: json_text(row, 9)?,
            error: json_text(row, 10)?,
            raw_response: json_text(row, 11)?,
        })
    })?;
    rows.collect()
}

/// The name `list_runs` shows and filters by: the workflow state's, unless that is only the
/// placeholder "unknown" (what Flujo 0.4.35's runner saves there) and the run has a name.
const SHOWN_PIPELINE_NAME: &str = "coalesce(nullif(w.pipeline_name, 'unknown'), r.pipeline_name)";

/// A `json_each` item `e` spelled so that two items Python finds equal read the same: numbers
/// and booleans as their value (`1`, `1.0` and `true` all as `1`; integers exactly), text
/// quoted, and an array or object as `~`, whose contents are compared elsewhere.
const SPELLED_AS_PYTHON_COMPARES: &str = "CASE e.type \
     WHEN 'text' THEN json_quote(e.atom) WHEN 'null' THEN 'null' \
     WHEN 'true' THEN '1' WHEN 'false' THEN '0' \
     WHEN 'integer' THEN CAST(e.atom AS TEXT) \
     WHEN 'real' THEN iif(e.atom = CAST(e.atom AS INTEGER), \
         CAST(CAST(e.atom AS INTEGER) AS TEXT), printf('%!.17g', e.atom)) \
     ELSE '~' END";

/// Runs newest first, joined with their workflow state (whose name, version and status win,
/// as in Flujo 0.6.11), filtered by the name shown. Every filter, the metadata one included,
/// and the paging run in SQL.
pub(crate) fn list_runs(
    conn: &Connection,
    layout: &Layout,
    query: &RunQuery,
) -> rusqlite::Result<Vec<RunSummary>> {
    let (sql, values) = list_runs_statement(conn, layout, query)?;
    let mut stmt = conn.prepare_cached(&sql)?;
    let rows = stmt.query_map(params_from_iter(values), run_summary)?;
    rows.collect()
}

/// The SQL of a `list_runs` call and its parameters.
fn list_runs_statement(
    conn: &Connection,
    layout: &Layout,
    query: &RunQuery,
) -> rusqlite::Result<(String, Vec<Value>)> {
    let c = &layout.runs;
    let started = first_present(c, "r.", &["start_time", "created_at"]);
    // The bare column, whose index gives the newest runs first without sorting them all (the
    // expression above would not; a run's start is never blank in the layouts that have it),
    // and ties in the order that index keeps them: Flujo 0.4.35 declared its index DESC.
    let newest_first = if c.contains("start_time") {
        "r.start_time DESC, r.rowid"
    } else if c.contains("created_at") {
        "r.created_at DESC, r.rowid DESC"
    } else {
        "r.rowid DESC"
    };
    let mut conditions = Vec::new();
    let mut values: Vec<Value> = Vec::new();
    if let Some(status) = query.status.as_deref() {
        values.push(Value::Text(status.to_owned()));
        let n = values.len();
        // coalesce(w.status, r.status) = ?n, spelled so that it needs only the state's rowid,
        // which the join reads from workflow_state's run_id index: each walked run then costs a
        // probe of the status index for (status, rowid), and a state's row (~4 KB, a page each)
        // is read only for the runs returned. The range, not `x.rowid = w.rowid`, is what makes
        // SQLite probe that index rather than fetch the state's row by its rowid.
        let state_with = |status: &str| {
            format!(
                "EXISTS (SELECT 1 FROM workflow_state x \
                 WHERE x.status {status} AND x.rowid BETWEEN w.rowid AND w.rowid)"
            )
        };
        conditions.push(format!(
            "({} OR ((w.rowid IS NULL OR {}) AND r.status = ?{n}))",
            state_with(&format!("= ?{n}")),
            state_with("IS NULL"),
        ));
        // Walking the runs newest first until the page is full is quick when the status is
        // common and reads every run when it is rare; then the status indexes list the few.
        if few_runs_with_status(conn, status)? {
            conditions.push(format!(
                "r.rowid IN (SELECT rowid FROM runs WHERE status = ?{n} UNION \
                 SELECT r2.rowid FROM workflow_state w2 JOIN runs r2 ON r2.run_id = w2.run_id \
                 WHERE w2.status = ?{n})"
            ));
        }
    }
    if let Some(name) = query.pipeline_name.as_deref() {
        values.push(Value::Text(name.to_owned()));
        conditions.push(format!("{SHOWN_PIPELINE_NAME} = ?{}", values.len()));
    }
    for MetadataCondition { path, test } in &query.metadata {
        values.push(Value::Text(path.clone()));
        let p = values.len();
        let compared_with = match test {
            MetadataTest::ObjectOfSize(n) | MetadataTest::ArrayOfLength(n) => {
                Some(Value::Integer(*n as i64))
            }
            MetadataTest::Text(text)
            | MetadataTest::EncodedAs(text)
            | MetadataTest::ArrayLike(text)
            | MetadataTest::BigInteger(text) => Some(Value::Text(text.clone())),
            MetadataTest::Integer(n) => Some(Value::Integer(*n)),
            MetadataTest::Real(x) => Some(Value::Real(*x)),
            MetadataTest::Object | MetadataTest::Null | MetadataTest::Nothing => None,
        };
        let v = compared_with.map_or(0, |value| {
            values.push(value);
            values.len()
        });
        // json_valid first: the JSON functions raise on text that is not JSON.
        let at = format!("json_valid(w.metadata) AND json_type(w.metadata, ?{p})");
        conditions.push(match test {
            MetadataTest::Object => format!("{at} = 'object'"),
            MetadataTest::ObjectOfSize(_) => format!(
                "{at} = 'object' AND (SELECT count(*) FROM json_each(w.metadata, ?{p})) = ?{v}"
            ),
            MetadataTest::ArrayOfLength(_) => {
                format!("{at} = 'array' AND json_array_length(w.metadata, ?{p}) = ?{v}")
            }
            // Each side's items spelled one way per value, in order; compared whole, so a long
            // list costs one pass over each side rather than a condition per item.
            MetadataTest::ArrayLike(_) => format!(
                "{at} = 'array' AND \
                 (SELECT group_concat({}, ',' ORDER BY e.key) \
                  FROM json_each(w.metadata, ?{p}) e) IS \
                 (SELECT group_concat({}, ',' ORDER BY e.key) FROM json_each(?{v}) e)",
                SPELLED_AS_PYTHON_COMPARES,
                SPELLED_AS_PYTHON_COMPARES,
            ),
            MetadataTest::BigInteger(_) => {
                format!("{at} = 'integer' AND (w.metadata -> ?{p}) = ?{v}")
            }
            MetadataTest::Nothing => "0".to_owned(),
            MetadataTest::Text(_) => {
                format!("{at} = 'text' AND json_extract(w.metadata, ?{p}) = ?{v}")
            }
            // json_extract reads true and false as 1 and 0, and SQL compares 1 and 1.0 equal.
            MetadataTest::Integer(_) | MetadataTest::Real(_) => format!(
                "{at} IN ('integer', 'real', 'true', 'false') \
                 AND json_extract(w.metadata, ?{p}) = ?{v}"
            ),
            MetadataTest::Null => format!("{at} = 'null'"),
            MetadataTest::EncodedAs(_) => format!(
                "{at} IS json_type(?{v}) AND json_extract(w.metadata, ?{p}) IS json_extract(?{v}, '$')"
            ),
        });
    }
    values.push(Value::Integer(sql_limit(query.limit)));
    values.push(Value::Integer(sql_offset(query.offset)));
    let (limit, offset) = (values.len() - 1, values.len());
    let order = format!("ORDER BY {newest_first}");
    let page = format!("{order} LIMIT ?{limit} OFFSET ?{offset}");
    let (source, rest) = if conditions.is_empty() && query.offset > 0 {
        // The page is picked from the runs' own index before any state is looked up, so the
        // runs an offset skips cost an index step each, not a join.
        (
            format!("(SELECT rowid FROM runs r {page}) page JOIN runs r ON r.rowid = page.rowid"),
            order,
        )
    } else if conditions.is_empty() {
        ("runs r".to_owned(), page)
    } else {
        (
            "runs r".to_owned(),
            format!("WHERE {} {page}", all_of(&conditions)),
        )
    };
    let (end_time, total_cost) = if c.contains("start_time") {
        (
            column_or_null(c, "r.", "end_time"),
            column_or_null(c, "r.", "total_cost"),
        )
    } else {
        // Flujo 0.6.11's layout, whose list always gives a number and a time there: 0.0 for
        // a run without a cost, and the run's last update for one without an end.
        (
            format!(
                "coalesce(nullif({}, ''), r.updated_at)",
                column_or_null(c, "r.", "end_time")
            ),
            format!("coalesce({}, 0.0)", column_or_null(c, "r.", "total_cost")),
        )
    };
    let sql = format!(
        "SELECT r.run_id, {SHOWN_PIPELINE_NAME}, \
         coalesce(w.pipeline_version, r.pipeline_version), coalesce(w.status, r.status), \
         {started}, {end_time}, {total_cost}, {}, {}, w.metadata \
         FROM {source} LEFT JOIN workflow_state w ON w.run_id = r.run_id {rest}",
        first_present(c, "r.", &["created_at", "start_time"]),
        first_present(c, "r.", &["updated_at", "end_time", "start_time"]),
    );
    Ok((sql, values))
}

/// `conditions` joined by AND in a balanced tree: SQLite refuses an expression more than 1,000
/// levels deep, which a flat chain of a metadata filter's 334 values already was.
fn all_of(conditions: &[String]) -> String {
    match conditions {
        [] => "1".to_owned(),
        [one] => one.clone(),
        _ => {
            let (left, right) = conditions.split_at(conditions.len() / 2);
            format!("({}) AND ({})", all_of(left), all_of(right))
        }
    }
}

/// Below this many runs with a status (counted in their run records and in their states),
/// listing them is quicker from the status indexes than by walking all runs newest first.
const FEW_RUNS: i64 = 2_000;

fn few_runs_with_status(conn: &Connection, status: &str) -> rusqlite::Result<bool> {
    let counted: i64 = conn
        .prepare_cached(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM runs WHERE status = ?1 LIMIT ?2)) \
             + (SELECT count(*) FROM (SELECT 1 FROM workflow_state WHERE status = ?1 LIMIT ?2))",
        )?
        .query_row(params![status, FEW_RUNS], |r| r.get(0))?;
    Ok(counted < FEW_RUNS)
}

fn run_summary(row: &Row) -> rusqlite::Result<RunSummary> {
    Ok(RunSummary {
        run_id: cell(row, 0)?,
        pipeline_name: cell(row, 1)?,
        pipeline_version: cell(row, 2)?,
        status: cell(row, 3)?,
        start_time: cell(row, 4)?,
        end_time: cell(row, 5)?,
        total_cost: cell(row, 6)?,
        created_at: cell(row, 7)?,
        updated_at: cell(row, 8)?,
        metadata: json_text(row, 9)?,
    })
}

/// Deletes the run and everything recorded under it. Each child table is cleared explicitly,
/// so files whose tables lack the cascading foreign keys lose no rows to orphaning either.
pub(crate) fn delete_run(conn: &Connection, run_id: &str) -> rusqlite::Result<()> {
    for sql in [
        "DELETE FROM steps WHERE run_id = ?1",
        "DELETE FROM spans WHERE run_id = ?1",
        "DELETE FROM traces WHERE run_id = ?1",
        "DELETE FROM evaluations WHERE run_id = ?1",
        "DELETE FROM runs WHERE run_id = ?1",
    ] {
        conn.prepare_cached(sql)?.execute([run_id])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::FreshLayout;
    use crate::sqlite::query_plans::{prepared_file, query_plan as plan};

    /// `flujo lens` pages through runs: a plan that sorts every run would still list the right
    /// ones, only ~100x slower at 100,000 runs, so nothing else would notice.
    #[test]
    fn runs_are_paged_from_an_index_without_sorting_them_all() {
        let dir = tempfile::tempdir().unwrap();
        for fresh_layout in [FreshLayout::Flujo04, FreshLayout::Flujo06] {
            let (conn, layout) = prepared_file(dir.path(), fresh_layout);
            let time = if layout.runs.contains("start_time") {
                "start_time"
            } else {
                "created_at, updated_at, pipeline_id"
            };
            let values = if layout.runs.contains("start_time") {
                "printf('2026-01-01T00:00:%05d', n)"
            } else {
                "printf('2026-01-01 00:00:%05d', n), '2026-01-02', 'p'"
            };
            conn.execute_batch(&format!(
                "WITH RECURSIVE k(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM k WHERE n < {FEW_RUNS}) \
                 INSERT INTO runs (run_id, pipeline_name, pipeline_version, status, {time}) \
                 SELECT 'run-' || n, 'P', '1', 'completed', {values} FROM k"
            ))
            .unwrap();
            let query = |status: Option<&str>, offset: u64| RunQuery {
                status: status.map(str::to_owned),
                pipeline_name: None,
                limit: Some(50),
                offset,
                metadata: Vec::new(),
            };
            for (status, offset, reads) in [
                (None, 0, "INDEX idx_runs_"),
                (None, 100, "COVERING INDEX idx_runs_"),
                (Some("completed"), 100, "INDEX idx_runs_"),
                (Some("cancelled"), 100, "(status=?)"),
            ] {
                let query = query(status, offset);
                let (sql, values) = list_runs_statement(&conn, &layout, &query).unwrap();
                let steps = plan(&conn, &sql, &values);
                assert!(
                    steps.iter().any(|s| s.contains(reads)),
                    "{fresh_layout:?} {status:?}: {steps:?}"
                );
                // A walk past runs of other statuses looks at each state's status in its index,
                // not in the state's row (a page of its own per run).
                assert!(
                    status != Some("completed")
                        || steps
                            .iter()
                            .any(|s| s.contains("COVERING INDEX idx_workflow_state_status")),
                    "{fresh_layout:?} {status:?} reads each state's row: {steps:?}"
                );
                // Sorting the few runs of a rare status is fine, and so is sorting the page
                // once it is picked (the steps after "SCAN page").
                let picking = steps.iter().take_while(|s| !s.starts_with("SCAN page"));
                let sorts_all = picking.clone().any(|s| s.contains("TEMP B-TREE"));
                assert!(
                    status == Some("cancelled") || !sorts_all,
                    "{fresh_layout:?} {status:?} sorts every run: {steps:?}"
                );
            }
        }
    }
}
