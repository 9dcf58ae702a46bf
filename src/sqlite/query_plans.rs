//! For the unit tests of our statements: what SQLite's planner makes of them. A plan that drifts
//! to a scan still gives the right answers, only 50-100x slower, so only its plan can tell.

use std::path::Path;

use rusqlite::types::Value;
use rusqlite::Connection;

use super::options::SqliteOptions;
use super::schema::{self, Layout};
use crate::engine::FreshLayout;

/// SQLite's plan for `sql` with `values` bound, one line per step. Parameters left unbound are
/// NULL; a plan does not depend on the values.
pub(crate) fn query_plan(conn: &Connection, sql: &str, values: &[Value]) -> Vec<String> {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    for (index, value) in values.iter().enumerate() {
        stmt.raw_bind_parameter(index + 1, value).unwrap();
    }
    let mut rows = stmt.raw_query();
    let mut steps = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        steps.push(row.get::<_, String>(3).unwrap());
    }
    steps
}

/// A new file in `dir` with `fresh_layout`'s tables and our indexes, and its layout.
pub(crate) fn prepared_file(dir: &Path, fresh_layout: FreshLayout) -> (Connection, Layout) {
    let mut options = SqliteOptions::new(dir.join(format!("{fresh_layout:?}.db")));
    options.fresh_layout = fresh_layout;
    let mut conn = Connection::open(&options.path).unwrap();
    let layout = schema::prepare(&mut conn, &options).unwrap();
    (conn, layout)
}
