//! Creating, recognising and migrating the file's tables.
//!
//! We stay file-compatible with both Flujo releases. A fresh file gets the layout of the Flujo
//! release the caller names (`FreshLayout`); a file that either release wrote keeps its
//! `runs`/`steps`/`spans` layout, and statements are built for the columns it has. What is
//! missing elsewhere is added: `workflow_state` columns (both releases' migrations), 0.6.11's
//! background columns and its `system_state`/`evaluations`/`traces` tables; Flujo ignores
//! columns and tables it does not use. Columns are never dropped or renamed, `user_version`
//! is never raised past what Flujo accepts, and the file is never moved or replaced.
//! Our own indexes carry the `idx_flujo_sqlite_` prefix.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior};

use super::connection::classify;
use super::options::SqliteOptions;
use crate::engine::FreshLayout;
use crate::error::Error;

/// The highest `user_version` a Flujo release writes (0.6.11's); a larger one is a layout we do
/// not know.
pub(crate) const NEWEST_KNOWN_USER_VERSION: i64 = 1;

/// What the engine needs to know about a file's tables to build its statements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub runs: HashSet<String>,
    pub steps: HashSet<String>,
    pub spans: HashSet<String>,
    /// SQLite's count of schema changes when this was read: another connection that changes
    /// the tables (Flujo 0.6.11 adds its columns to a 0.4.35 file's `runs`) raises it.
    pub schema_version: i64,
}

impl Layout {
    /// Flujo 0.6.11's steps: one appended row per call, keyed by an autoincrement id.
    pub fn steps_are_appended(&self) -> bool {
        !self.steps.contains("step_run_id")
    }

    /// Flujo 0.4.35's spans: `span_id` is the primary key across the whole file.
    pub fn span_ids_are_global(&self) -> bool {
        !self.spans.contains("id")
    }
}

/// Flujo 0.4.35's tables with their indexes, each created when the file lacks it. Equivalent in
/// meaning (columns, types, constraints) to what Flujo creates, so both releases accept the file.
const FLUJO_04_TABLES: [(&str, &str); 4] = [
    (
        "workflow_state",
        "
CREATE TABLE IF NOT EXISTS workflow_state (
    run_id TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    pipeline_name TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    current_step_index INTEGER NOT NULL DEFAULT 0,
    pipeline_context TEXT NOT NULL,
    last_step_output TEXT,
    step_history TEXT,
    status TEXT NOT NULL CHECK (status IN ('running', 'paused', 'completed', 'failed', 'cancelled')),
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    total_steps INTEGER DEFAULT 0,
    error_message TEXT,
    execution_time_ms INTEGER,
    memory_usage_mb REAL
);
CREATE INDEX IF NOT EXISTS idx_workflow_state_status ON workflow_state(status);
CREATE INDEX IF NOT EXISTS idx_workflow_state_created_at ON workflow_state(created_at);
CREATE INDEX IF NOT EXISTS idx_workflow_state_pipeline_id ON workflow_state(pipeline_id);
",
    ),
    (
        "runs",
        "
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pipeline_name TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    status TEXT NOT NULL,
    start_time TEXT NOT NULL,
    end_time TEXT,
    total_cost REAL,
    final_context_blob TEXT
);
CREATE INDEX IF NOT EXISTS idx_runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS idx_runs_pipeline_name ON runs(pipeline_name);
CREATE INDEX IF NOT EXISTS idx_runs_start_time_desc ON runs(start_time DESC);
CREATE INDEX IF NOT EXISTS idx_runs_status_start_time ON runs(status, start_time DESC);
",
    ),
    (
        "steps",
        "
CREATE TABLE IF NOT EXISTS steps (
    step_run_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    step_name TEXT NOT NULL,
    step_index INTEGER NOT NULL,
    status TEXT NOT NULL,
    start_time TEXT NOT NULL,
    end_time TEXT,
    duration_ms INTEGER,
    cost REAL,
    tokens INTEGER,
    input_blob TEXT,
    output_blob TEXT,
    error_blob TEXT,
    FOREIGN KEY (run_id) REFERENCES runs(run_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_steps_run_id ON steps(run_id);
",
    ),
    (
        "spans",
        "
CREATE TABLE IF NOT EXISTS spans (
    span_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    parent_span_id TEXT,
    name TEXT NOT NULL,
    start_time REAL NOT NULL,
    end_time REAL,
    status TEXT DEFAULT 'running',
    attributes TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    FOREIGN KEY (run_id) REFERENCES runs(run_id) ON DELETE CASCADE,
    FOREIGN KEY (parent_span_id) REFERENCES spans(span_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_spans_run_id ON spans(run_id);
CREATE INDEX IF NOT EXISTS idx_spans_status ON spans(status);
CREATE INDEX IF NOT EXISTS idx_spans_name ON spans(name);
CREATE INDEX IF NOT EXISTS idx_spans_start_time ON spans(start_time);
CREATE INDEX IF NOT EXISTS idx_spans_parent_span_id ON spans(parent_span_id);
",
    ),
];

/// Flujo 0.6.11's tables with their indexes, each created when the file lacks it.
const FLUJO_06_TABLES: [(&str, &str); 4] = [
    (
        "workflow_state",
        "
CREATE TABLE IF NOT EXISTS workflow_state (
    run_id TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    pipeline_name TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    current_step_index INTEGER NOT NULL,
    pipeline_context TEXT,
    last_step_output TEXT,
    step_history TEXT,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    total_steps INTEGER DEFAULT 0,
    error_message TEXT,
    execution_time_ms INTEGER,
    memory_usage_mb REAL,
    metadata TEXT,
    is_background_task INTEGER DEFAULT 0,
    parent_run_id TEXT,
    task_id TEXT,
    background_error TEXT
);
CREATE INDEX IF NOT EXISTS idx_workflow_state_status ON workflow_state(status);
CREATE INDEX IF NOT EXISTS idx_workflow_state_pipeline_id ON workflow_state(pipeline_id);
CREATE INDEX IF NOT EXISTS idx_workflow_state_parent_run_id ON workflow_state(parent_run_id);
CREATE INDEX IF NOT EXISTS idx_workflow_state_created_at ON workflow_state(created_at);
",
    ),
    (
        "runs",
        "
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pipeline_id TEXT NOT NULL,
    pipeline_name TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    execution_time_ms INTEGER,
    memory_usage_mb REAL,
    total_steps INTEGER DEFAULT 0,
    error_message TEXT,
    end_time TEXT,
    total_cost REAL,
    final_context_blob TEXT
);
CREATE INDEX IF NOT EXISTS idx_runs_status ON runs(status);
CREATE INDEX IF NOT EXISTS idx_runs_pipeline_id ON runs(pipeline_id);
CREATE INDEX IF NOT EXISTS idx_runs_created_at ON runs(created_at);
CREATE INDEX IF NOT EXISTS idx_runs_pipeline_name ON runs(pipeline_name);
",
    ),
    (
        "steps",
        "
CREATE TABLE IF NOT EXISTS steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step_name TEXT NOT NULL,
    step_index INTEGER NOT NULL,
    status TEXT NOT NULL,
    output TEXT,
    raw_response TEXT,
    cost_usd REAL,
    token_counts INTEGER,
    execution_time_ms INTEGER,
    created_at TEXT NOT NULL,
    FOREIGN KEY (run_id) REFERENCES runs(run_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_steps_run_id ON steps(run_id);
CREATE INDEX IF NOT EXISTS idx_steps_step_index ON steps(step_index);
",
    ),
    (
        "spans",
        "
CREATE TABLE IF NOT EXISTS spans (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT,
    name TEXT NOT NULL,
    start_time REAL NOT NULL,
    end_time REAL,
    status TEXT NOT NULL,
    attributes TEXT,
    created_at TEXT NOT NULL,
    FOREIGN KEY (run_id) REFERENCES runs(run_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_spans_run_id ON spans(run_id);
CREATE INDEX IF NOT EXISTS idx_spans_parent_span ON spans(parent_span_id);
",
    ),
];

/// Flujo 0.6.11's auxiliary tables, added to any file that lacks them (0.4.35 ignores them).
const CREATE_AUXILIARY_TABLES: &str = "
CREATE TABLE IF NOT EXISTS system_state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS traces (
    run_id TEXT PRIMARY KEY,
    trace_data TEXT NOT NULL,
    created_at TEXT NOT NULL,
    FOREIGN KEY (run_id) REFERENCES runs(run_id) ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    step_name TEXT,
    score REAL NOT NULL,
    feedback TEXT,
    metadata TEXT,
    created_at TEXT NOT NULL DEFAULT (DATETIME('now')),
    FOREIGN KEY (run_id) REFERENCES runs(run_id) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS idx_evaluations_run_id ON evaluations(run_id);
CREATE INDEX IF NOT EXISTS idx_evaluations_created_at ON evaluations(created_at);
";

/// `workflow_state` columns an older file may lack, with the definition used to add each.
/// Defaults follow Flujo's own migrations so both releases read the migrated rows alike.
const ADDABLE_STATE_COLUMNS: [(&str, &str); 19] = [
    ("pipeline_id", "TEXT NOT NULL DEFAULT ''"),
    ("pipeline_name", "TEXT NOT NULL DEFAULT ''"),
    ("pipeline_version", "TEXT NOT NULL DEFAULT '1.0'"),
    ("current_step_index", "INTEGER NOT NULL DEFAULT 0"),
    ("pipeline_context", "TEXT"),
    ("last_step_output", "TEXT"),
    ("step_history", "TEXT"),
    ("status", "TEXT NOT NULL DEFAULT 'running'"),
    ("created_at", "TEXT NOT NULL DEFAULT ''"),
    ("updated_at", "TEXT NOT NULL DEFAULT ''"),
    ("total_steps", "INTEGER DEFAULT 0"),
    ("error_message", "TEXT"),
    ("execution_time_ms", "INTEGER"),
    ("memory_usage_mb", "REAL"),
    ("metadata", "TEXT"),
    ("is_background_task", "INTEGER DEFAULT 0"),
    ("parent_run_id", "TEXT"),
    ("task_id", "TEXT"),
    ("background_error", "TEXT"),
];

/// Columns added above whose blank values get a backfill, as Flujo's migrations do.
const BACKFILLS: [(&str, &str); 4] = [
    (
        "pipeline_name",
        "UPDATE workflow_state SET pipeline_name = pipeline_id WHERE pipeline_name = ''",
    ),
    (
        "pipeline_context",
        "UPDATE workflow_state SET pipeline_context = '{}' WHERE pipeline_context IS NULL",
    ),
    (
        "created_at",
        "UPDATE workflow_state SET created_at = datetime('now') WHERE created_at = ''",
    ),
    (
        "updated_at",
        "UPDATE workflow_state SET updated_at = datetime('now') WHERE updated_at = ''",
    ),
];

/// Indexes of ours that make the admin queries cheap; see `queries`. Every index costs each
/// save one more page written to the WAL (and later copied back), so the three that serve a
/// minority of rows are partial: a save of a running, foreground run touches none of them. Their
/// queries repeat the index's condition word for word, which is what lets SQLite pick them.
const OUR_INDEXES: [(&str, &str); 7] = [
    (
        "idx_flujo_sqlite_state_status_created",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_state_status_created \
         ON workflow_state(status, created_at)",
    ),
    (
        "idx_flujo_sqlite_state_pipeline_created",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_state_pipeline_created \
         ON workflow_state(pipeline_id, created_at)",
    ),
    (
        "idx_flujo_sqlite_state_failed_updated",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_state_failed_updated \
         ON workflow_state(status, updated_at) WHERE status = 'failed'",
    ),
    (
        // Lets `get_workflow_stats` average execution times from the index alone, without
        // reading every row's payload.
        "idx_flujo_sqlite_state_execution_time_known",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_state_execution_time_known \
         ON workflow_state(execution_time_ms) WHERE execution_time_ms IS NOT NULL",
    ),
    (
        // Not led by is_background_task: SQLite would prefer such an index, which serves the
        // order, to the two below, which also serve the filter.
        "idx_flujo_sqlite_background_updated",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_background_updated \
         ON workflow_state(updated_at) WHERE is_background_task = 1",
    ),
    (
        "idx_flujo_sqlite_background_parent_updated",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_background_parent_updated \
         ON workflow_state(parent_run_id, updated_at) WHERE is_background_task = 1",
    ),
    (
        "idx_flujo_sqlite_background_status_updated",
        "CREATE INDEX IF NOT EXISTS idx_flujo_sqlite_background_status_updated \
         ON workflow_state(status, updated_at) WHERE is_background_task = 1",
    ),
];

/// Whole-table indexes that earlier builds of flujo-sqlite created where a partial one of
/// `OUR_INDEXES` now serves; dropped when found, so saves stop paying for them.
const RETIRED_INDEXES: [&str; 4] = [
    "idx_flujo_sqlite_state_status_updated",
    "idx_flujo_sqlite_state_execution_time",
    "idx_flujo_sqlite_state_background",
    "idx_flujo_sqlite_state_background_updated",
];

/// The page size of the files we create (SQLite's default is 4 KB; files Flujo created keep
/// theirs). A save writes one page of each b-tree it touches, the table's leaf and one of each
/// index, and changes little of each: with 2 KB pages it writes half as much to the WAL and
/// copies half as much back. Measured (interleaved runs, flat-out `durability="normal"` saves
/// into a new file): ~2.5 KB states 12,300-13,800 against 10,000-10,900 saves/s, 17 KB states
/// +6-12 %, files ~35 % smaller for the former; `full` saves the same (each waits for its
/// fsync). On a 100,000-run file of ~4 KB states, where a state then spans one more overflow
/// page, lists measured the same and loads and statistics 0-15 % slower.
const NEW_FILE_PAGE_SIZE: i64 = 2048;

/// Brings the file to a layout we can serve, writing only when something is missing (so a
/// fully set-up file opens without taking the write lock), and reports that layout.
pub(crate) fn prepare(conn: &mut Connection, options: &SqliteOptions) -> Result<Layout, Error> {
    let fail = |e| classify(&options.path, e);
    let user_version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(fail)?;
    if user_version > NEWEST_KNOWN_USER_VERSION {
        return Err(Error::SchemaTooNew {
            path: options.path.clone(),
            found: user_version,
            supported: NEWEST_KNOWN_USER_VERSION,
        });
    }
    // Every Flujo release keys its states by run_id. A table of that name without it belongs
    // to some other application, and completing it with Flujo's columns would damage it.
    let state_columns = columns(conn, "workflow_state").map_err(fail)?;
    let has_run_id = state_columns
        .iter()
        .any(|c| c.eq_ignore_ascii_case("run_id"));
    if !state_columns.is_empty() && !has_run_id {
        return Err(Error::NotFlujo {
            path: options.path.clone(),
        });
    }
    // Only a file with no page yet takes a page size; it is fixed from the first write on.
    let pages: i64 = conn
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .map_err(fail)?;
    if pages == 0 {
        conn.pragma_update(None, "page_size", NEW_FILE_PAGE_SIZE)
            .map_err(fail)?;
    }
    let journal_mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .map_err(fail)?;
    if !journal_mode.eq_ignore_ascii_case("wal") {
        // Persistent: every later connection, Flujo's included, uses WAL.
        let _: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(fail)?;
    }

    if needs_changes(conn).map_err(fail)? {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(fail)?;
        // Re-check under the write lock: another process may have done it meanwhile.
        let layout = layout_to_complete(&tx, user_version, options.fresh_layout).map_err(fail)?;
        let tables = match layout {
            FreshLayout::Flujo04 => &FLUJO_04_TABLES,
            FreshLayout::Flujo06 => &FLUJO_06_TABLES,
        };
        let mut created = Vec::new();
        for (table, ddl) in tables {
            if columns(&tx, table).map_err(fail)?.is_empty() {
                tx.execute_batch(ddl).map_err(fail)?;
                created.push(*table);
            }
        }
        // Only a brand-new file is marked as migrated the way Flujo 0.6.11 marks its own.
        if created.len() == tables.len() && layout == FreshLayout::Flujo06 {
            tx.execute_batch("PRAGMA user_version = 1").map_err(fail)?;
        }
        let existing = columns(&tx, "workflow_state").map_err(fail)?;
        // Completing a table made just now is no news about the user's file.
        let level = if created.contains(&"workflow_state") {
            log::Level::Debug
        } else {
            log::Level::Info
        };
        add_missing_state_columns(&tx, &existing, level).map_err(fail)?;
        tx.execute_batch(CREATE_AUXILIARY_TABLES).map_err(fail)?;
        drop_retired_indexes(&tx).map_err(fail)?;
        // Over the empty tables of a new file our indexes take no time. Over a file Flujo has
        // filled they take seconds, during which every other writer waits, and Flujo 0.6.11
        // takes a file it finds locked for a second at start-up for a corrupt one and moves it
        // aside: so there each index is built in a transaction of its own, letting others in
        // between (one left unbuilt by a crash is built at the next open).
        let new_file = created.contains(&"workflow_state");
        if new_file {
            build_our_indexes(&tx, InTransaction::Current).map_err(fail)?;
        }
        tx.commit().map_err(fail)?;
        if !new_file {
            build_our_indexes(conn, InTransaction::OneEach).map_err(fail)?;
        }
        log::info!("prepared SQLite database at {}", options.path.display());
    }

    read_layout(conn).map_err(fail)
}

/// The file's layout as it is now.
pub(crate) fn read_layout(conn: &Connection) -> rusqlite::Result<Layout> {
    Ok(Layout {
        runs: columns(conn, "runs")?,
        steps: columns(conn, "steps")?,
        spans: columns(conn, "spans")?,
        schema_version: schema_version(conn)?,
    })
}

pub(crate) fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA schema_version")?
        .query_row([], |r| r.get(0))
}

/// Page cache while our indexes are built. Building one reads the table once, so a cache does
/// not speed it up, but SQLite's sorter holds up to the cache's size of keys in memory before it
/// spills to a temporary file (and never less than `SQLITE_SORTER_PMASZ` pages, set to 64 in
/// `.cargo/config.toml`), and the process keeps that memory after the build. Measured on the
/// first open of a 100,000-run file, as the peak above the process's size after import: 4.4 MB
/// with SQLite's 2 MB cache and 250-page sorter, 1.6 MB with this cache, the 64-page sorter and
/// the count below (a later open: 1.0 MB), and the same build time.
const INDEX_BUILD_CACHE_KIB: i64 = 256;

/// Creates the indexes of ours that the file lacks. On a file Flujo has filled this is the one
/// slow step of a first open (~0.7 s per 100,000 runs), so it is logged as it goes; there, a
/// full disk leaves the indexes that did not fit to a later open.
fn build_our_indexes(conn: &Connection, transactions: InTransaction) -> rusqlite::Result<()> {
    // `prepare`'s connection is closed right after it today, but whoever keeps one must not be
    // left with the build's small cache; a build error still wins over a failed restore.
    let cache_size: i64 = conn.query_row("PRAGMA cache_size", [], |r| r.get(0))?;
    conn.pragma_update(None, "cache_size", -INDEX_BUILD_CACHE_KIB)?;
    let built = build_missing_indexes(conn, transactions);
    let restored = conn.pragma_update(None, "cache_size", cache_size);
    built.and(restored)
}

/// Whether indexes are built in the transaction under way or each in one of its own.
#[derive(Clone, Copy, PartialEq)]
enum InTransaction {
    Current,
    OneEach,
}

fn drop_retired_indexes(conn: &Connection) -> rusqlite::Result<()> {
    for name in RETIRED_INDEXES {
        if index_exists(conn, name)? {
            // The name is one of our constants, never input.
            conn.execute_batch(&format!("DROP INDEX \"{name}\""))?;
            log::info!("dropped index {name}, replaced by a smaller one");
        }
    }
    Ok(())
}

fn build_missing_indexes(conn: &Connection, transactions: InTransaction) -> rusqlite::Result<()> {
    // Counted once an index is missing, under the build's cache: the count reads a whole
    // index, which would otherwise fill the connection's cache just to be logged.
    let mut counted: Option<i64> = None;
    for (name, ddl) in OUR_INDEXES {
        if index_exists(conn, name)? {
            continue;
        }
        let started = Instant::now();
        if transactions == InTransaction::Current {
            let runs = build_index(conn, name, ddl, &mut counted)?;
            log_built(name, runs, started);
            continue;
        }
        // Checked again under the write lock: another process may have built it meanwhile.
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let built = index_exists(conn, name).and_then(|present| {
            let runs = (!present)
                .then(|| build_index(conn, name, ddl, &mut counted))
                .transpose()?;
            conn.execute_batch("COMMIT")?;
            Ok(runs)
        });
        if built.is_err() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        let built = match built {
            // Our indexes only make queries faster. A file on a disk without room for them is
            // served without them, rather than not at all: its owner may be opening it to read
            // their runs, or to delete old ones and make room.
            Err(error) if error.sqlite_error_code() == Some(ErrorCode::DiskFull) => {
                log::warn!(
                    "no room on the disk of {} to build index {name}: the file is used \
                     without it (admin queries read more of the file, with the same results), \
                     and the next open builds it once there is room",
                    conn.path().unwrap_or("the database"),
                );
                return Ok(());
            }
            built => built?,
        };
        if let Some(runs) = built {
            log_built(name, runs, started);
            // A writer SQLite's busy handler keeps waiting looks again after a delay that grows
            // with its wait (up to 100 ms): without a pause as long, the next build would take
            // the lock again within microseconds, and it would wait for all of them.
            std::thread::sleep(started.elapsed().min(LET_WAITING_WRITERS_IN));
        }
    }
    Ok(())
}

/// The longest pause between two index builds; see `build_missing_indexes`.
const LET_WAITING_WRITERS_IN: Duration = Duration::from_millis(100);

/// Builds one index; returns how many runs it covers (for the log).
fn build_index(
    conn: &Connection,
    name: &str,
    ddl: &str,
    counted: &mut Option<i64>,
) -> rusqlite::Result<i64> {
    let runs = match *counted {
        Some(runs) => runs,
        None => {
            *counted
                .insert(conn.query_row("SELECT count(*) FROM workflow_state", [], |r| r.get(0))?)
        }
    };
    if runs > 0 {
        log::info!("building index {name} over {runs} stored runs (once per file)");
    }
    conn.execute_batch(ddl)?;
    Ok(runs)
}

fn log_built(name: &str, runs: i64, started: Instant) {
    if runs > 0 {
        log::info!("built index {name} in {:.2?}", started.elapsed());
    }
}

fn index_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    let present: Option<i64> = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    Ok(present.is_some())
}

/// The release whose tables a file that lacks some of them gets: the one its existing tables
/// follow, so that a file a Flujo release is still creating (each table in a commit of its own)
/// is completed in that release's layout. Only a file with none of them gets `fresh`.
fn layout_to_complete(
    conn: &Connection,
    user_version: i64,
    fresh: FreshLayout,
) -> rusqlite::Result<FreshLayout> {
    use FreshLayout::{Flujo04, Flujo06};
    if user_version >= 1 {
        return Ok(Flujo06);
    }
    // A column only one release has; 0.6.11's migration adds its columns to 0.4.35's runs but
    // leaves 0.4.35's in place.
    let markers = [
        ("runs", "start_time", Flujo04, Flujo06),
        ("steps", "step_run_id", Flujo04, Flujo06),
        ("spans", "id", Flujo06, Flujo04),
        ("workflow_state", "is_background_task", Flujo06, Flujo04),
    ];
    for (table, column, with, without) in markers {
        let columns = columns(conn, table)?;
        if !columns.is_empty() {
            return Ok(if columns.contains(column) {
                with
            } else {
                without
            });
        }
    }
    Ok(fresh)
}

fn needs_changes(conn: &Connection) -> rusqlite::Result<bool> {
    let columns = columns(conn, "workflow_state")?;
    if columns.is_empty()
        || ADDABLE_STATE_COLUMNS
            .iter()
            .any(|(c, _)| !columns.contains(*c))
    {
        return Ok(true);
    }
    for (name, _) in OUR_INDEXES {
        if !index_exists(conn, name)? {
            return Ok(true);
        }
    }
    for name in RETIRED_INDEXES {
        if index_exists(conn, name)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn columns(conn: &Connection, table: &str) -> rusqlite::Result<HashSet<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
    let names = stmt.query_map([table], |r| r.get::<_, String>(0))?;
    names.collect()
}

fn add_missing_state_columns(
    conn: &Connection,
    existing: &HashSet<String>,
    level: log::Level,
) -> rusqlite::Result<()> {
    for (name, definition) in ADDABLE_STATE_COLUMNS {
        if existing.contains(name) {
            continue;
        }
        // Both parts come from the constant table above, never from input.
        conn.execute_batch(&format!(
            "ALTER TABLE workflow_state ADD COLUMN \"{name}\" {definition}"
        ))?;
        if let Some((_, backfill)) = BACKFILLS.iter().find(|(column, _)| *column == name) {
            conn.execute_batch(backfill)?;
        }
        log::log!(level, "added missing column workflow_state.{name}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file with Flujo 0.4.35's `workflow_state` table holding `runs` states, as Flujo's
    /// backend leaves it: none of our indexes yet.
    fn flujo_filled(options: &SqliteOptions, runs: u32) -> Connection {
        let conn = Connection::open(&options.path).unwrap();
        conn.execute_batch(FLUJO_04_TABLES[0].1).unwrap();
        conn.execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1) \
             INSERT INTO workflow_state (run_id, pipeline_id, pipeline_name, pipeline_version, \
             current_step_index, pipeline_context, status, created_at, updated_at) \
             SELECT 'r' || i, 'p' || (i % 7), 'p', '1', 0, '{}', 'running', \
             '2026-01-01 00:00:00', '2026-01-01 00:00:00' FROM n",
            [runs],
        )
        .unwrap();
        conn
    }

    /// The build lowers the cache for itself; the connection must come out of it as it went in,
    /// or whoever keeps using it would run on a 256 KB cache.
    #[test]
    fn building_our_indexes_leaves_the_cache_size_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::new(dir.path().join("build.db"));
        let mut conn = flujo_filled(&options, 1);
        conn.pragma_update(None, "cache_size", -3000).unwrap();
        prepare(&mut conn, &options).unwrap();
        for (name, _) in OUR_INDEXES {
            assert!(index_exists(&conn, name).unwrap(), "{name} was not built");
        }
        let cache_size: i64 = conn
            .query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap();
        assert_eq!(cache_size, -3000);
    }

    /// On a file Flujo has filled, each of our indexes is built and committed on its own, so
    /// the write lock is let go between them (and what was built stays built).
    #[test]
    fn our_indexes_over_a_filled_file_are_committed_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::new(dir.path().join("flujo.db"));
        let mut conn = Connection::open(&options.path).unwrap();
        conn.execute_batch(FLUJO_04_TABLES[0].1).unwrap();
        let (last, _) = OUR_INDEXES[OUR_INDEXES.len() - 1];
        // Something else by the last index's name makes its build fail.
        conn.execute_batch(&format!("CREATE VIEW {last} AS SELECT 1"))
            .unwrap();
        assert!(prepare(&mut conn, &options).is_err());
        for (name, _) in &OUR_INDEXES[..OUR_INDEXES.len() - 1] {
            assert!(index_exists(&conn, name).unwrap(), "{name} was rolled back");
        }
        assert!(conn.is_autocommit(), "a transaction was left open");
    }

    /// Our indexes only speed queries up: on a file with no room left to build them, the open
    /// goes on without them, leaving no transaction open, and a later open with room builds them.
    #[test]
    fn a_full_disk_leaves_our_indexes_to_a_later_open() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::new(dir.path().join("full.db"));
        let mut conn = flujo_filled(&options, 5000);
        prepare(&mut conn, &options).unwrap();
        for (name, _) in OUR_INDEXES {
            conn.execute_batch(&format!("DROP INDEX {name}")).unwrap();
        }
        // No free pages left to reuse, and SQLite's "database or disk is full" at the next one.
        conn.execute_batch("VACUUM").unwrap();
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .unwrap();
        conn.pragma_update(None, "max_page_count", pages).unwrap();

        prepare(&mut conn, &options).unwrap();
        for (name, _) in OUR_INDEXES {
            assert!(!index_exists(&conn, name).unwrap(), "{name} was built");
        }
        assert!(conn.is_autocommit(), "a transaction was left open");
        let stored: i64 = conn
            .query_row("SELECT count(*) FROM workflow_state", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, 5000);

        conn.pragma_update(None, "max_page_count", 1 << 30).unwrap();
        prepare(&mut conn, &options).unwrap();
        for (name, _) in OUR_INDEXES {
            assert!(index_exists(&conn, name).unwrap(), "{name} was not built");
        }
    }

    /// Flujo creates its tables one commit at a time, so a file may hold some of them only.
    #[test]
    fn a_file_flujo_is_still_creating_is_completed_in_its_own_layout() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (FLUJO_04_TABLES[0], FreshLayout::Flujo06, Layout04),
            (FLUJO_04_TABLES[1], FreshLayout::Flujo06, Layout04),
            (FLUJO_06_TABLES[0], FreshLayout::Flujo04, Layout06),
            (FLUJO_06_TABLES[2], FreshLayout::Flujo04, Layout06),
        ];
        for (n, ((table, ddl), fresh, expected)) in cases.into_iter().enumerate() {
            let mut options = SqliteOptions::new(dir.path().join(format!("{n}.db")));
            options.fresh_layout = fresh;
            let mut conn = Connection::open(&options.path).unwrap();
            conn.execute_batch(ddl).unwrap();
            let layout = prepare(&mut conn, &options).unwrap();
            let found = if layout.runs.contains("start_time") && !layout.steps_are_appended() {
                Layout04
            } else if layout.runs.contains("created_at") && layout.steps_are_appended() {
                Layout06
            } else {
                panic!("{table} was completed with a mix of layouts: {layout:?}")
            };
            assert_eq!(found, expected, "a file holding {table}");
        }
    }

    #[derive(Debug, PartialEq)]
    enum Found {
        Layout04,
        Layout06,
    }
    use Found::{Layout04, Layout06};
}
