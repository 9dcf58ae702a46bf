//! `sqlite::recover`: backing up a damaged file and rebuilding it from every readable row.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use flujo_sqlite::engine::{Completion, FreshLayout, Request, Response, StateEngine};
use flujo_sqlite::error::Error;
use flujo_sqlite::model::{BackgroundFields, Cell, StateRecord};
use flujo_sqlite::sqlite::{recover, SqliteEngine, SqliteOptions};
use rusqlite::Connection;

const ROWS: usize = 200;

fn call(engine: &SqliteEngine, request: Request) -> Result<Response, Error> {
    let (tx, rx) = mpsc::channel();
    engine.submit(
        request,
        Completion::new(move |outcome| tx.send(outcome).unwrap()),
    );
    rx.recv_timeout(Duration::from_secs(60)).unwrap()
}

fn record(index: usize) -> StateRecord {
    StateRecord {
        pipeline_id: format!("pipeline-{}", index % 7),
        pipeline_name: "Recovery pipeline".into(),
        pipeline_version: "1.0".into(),
        current_step_index: 2,
        // Big enough that the table spans many pages, small enough to need no overflow pages.
        pipeline_context: format!(r#"{{"index":{index},"padding":"{}"}}"#, "x".repeat(600)),
        last_step_output: Some(r#"{"ok":true}"#.into()),
        step_history: None,
        status: "running".into(),
        created_at: format!(
            "2024-06-01 12:{:02}:{:02}+00:00",
            index / 60 % 60,
            index % 60
        ),
        updated_at: "2024-06-01 13:00:00+00:00".into(),
        total_steps: 5,
        error_message: None,
        execution_time_ms: Some(1500),
        memory_usage_mb: Some(45.2),
        background: BackgroundFields::default(),
    }
}

fn run_id(index: usize) -> String {
    format!("run-{index:04}")
}

struct Folder {
    dir: tempfile::TempDir,
    path: PathBuf,
}

impl Folder {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wf.db");
        Folder { dir, path }
    }

    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

/// A database written by the engine, with `ROWS` states and one system-state row, checkpointed
/// so the whole of it is in the main file.
fn write_database(path: &Path) {
    let engine = SqliteEngine::start(SqliteOptions::new(path)).unwrap();
    for index in 0..ROWS {
        call(
            &engine,
            Request::SaveState {
                run_id: run_id(index),
                record: Box::new(record(index)),
                expected_updated_at: None,
            },
        )
        .unwrap();
    }
    call(
        &engine,
        Request::SetSystemState {
            key: "watermark".into(),
            value: r#"{"at":7}"#.into(),
        },
    )
    .unwrap();
    engine.close();
    let conn = Connection::open(path).unwrap();
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
}

/// The leaf pages of a rowid table, in rowid order, each with how many rows it holds.
fn leaf_pages(path: &Path, table: &str) -> (usize, Vec<(usize, usize)>) {
    let conn = Connection::open(path).unwrap();
    let page_size: i64 = conn
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    let root: i64 = conn
        .query_row(
            "SELECT rootpage FROM sqlite_master WHERE name = ?1",
            [table],
            |r| r.get(0),
        )
        .unwrap();
    drop(conn);
    let (page_size, root) = (page_size as usize, root as usize);
    let bytes = std::fs::read(path).unwrap();
    let mut leaves = Vec::new();
    walk(&bytes, page_size, root, &mut leaves);
    (page_size, leaves)
}

fn walk(bytes: &[u8], page_size: usize, page: usize, leaves: &mut Vec<(usize, usize)>) {
    let start = (page - 1) * page_size;
    let header = start + if page == 1 { 100 } else { 0 };
    let u16_at = |at: usize| usize::from(u16::from_be_bytes([bytes[at], bytes[at + 1]]));
    let u32_at = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
    let cells = u16_at(header + 3);
    match bytes[header] {
        0x0D => leaves.push((page, cells)),
        0x05 => {
            for cell in 0..cells {
                let offset = u16_at(header + 12 + 2 * cell);
                walk(bytes, page_size, u32_at(start + offset), leaves);
            }
            walk(bytes, page_size, u32_at(header + 8), leaves);
        }
        other => panic!("page {page} is not a table b-tree page ({other:#x})"),
    }
}

/// Deterministic garbage over one whole page.
fn smash_page(path: &Path, page_size: usize, page: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15 ^ page as u64;
    for byte in &mut bytes[(page - 1) * page_size..page * page_size] {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        *byte = state as u8;
    }
    std::fs::write(path, bytes).unwrap();
}

fn count(path: &Path, table: &str) -> usize {
    let rows: i64 = Connection::open(path)
        .unwrap()
        .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
        .unwrap();
    rows as usize
}

fn load(engine: &SqliteEngine, index: usize) -> Option<Box<flujo_sqlite::model::StoredState>> {
    match call(
        engine,
        Request::LoadState {
            run_id: run_id(index),
        },
    )
    .unwrap()
    {
        Response::State(state) => state,
        other => panic!("{other:?}"),
    }
}

fn schema(conn: &Connection) -> Vec<(String, String, Option<String>)> {
    conn.prepare("SELECT type, name, sql FROM sqlite_master ORDER BY type, name")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn assert_usable_in_wal_mode(path: &Path) {
    let conn = Connection::open(path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

#[test]
fn a_healthy_file_is_copied_whole_and_backed_up_byte_for_byte() {
    let folder = Folder::new();
    write_database(&folder.path);
    let original = std::fs::read(&folder.path).unwrap();
    let schema_before = schema(&Connection::open(&folder.path).unwrap());
    let rowids: Vec<(i64, String)> = {
        let conn = Connection::open(&folder.path).unwrap();
        let mut stmt = conn
            .prepare("SELECT rowid, run_id FROM workflow_state ORDER BY rowid")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    let backup = report.backup_path.clone().unwrap();
    assert_eq!(std::fs::read(&backup).unwrap(), original);
    let backup_name = backup.file_name().unwrap().to_string_lossy().into_owned();
    assert!(backup_name.starts_with("wf.db.corrupt-"), "{backup_name}");
    assert!(report.schema_recovered);
    assert_eq!(report.rows_rescued, ROWS as u64 + 1);
    assert_eq!(report.rows_skipped, 0);
    assert_eq!(report.tables["workflow_state"].rescued, ROWS as u64);
    assert_eq!(report.tables["system_state"].rescued, 1);
    assert_eq!(report.tables["runs"].rescued, 0);
    assert_usable_in_wal_mode(&folder.path);
    // Nothing but the database and its backup is left behind.
    assert_eq!(folder.names(), vec!["wf.db".to_owned(), backup_name]);

    let conn = Connection::open(&folder.path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1, "Flujo 0.6.11's schema version is kept");
    let after: Vec<(i64, String)> = conn
        .prepare("SELECT rowid, run_id FROM workflow_state ORDER BY rowid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(after, rowids, "rowids (the list tie-breaker) are kept");
    assert_eq!(
        schema(&conn),
        schema_before,
        "tables and indexes are recreated as they were"
    );
    drop(conn);

    let engine = SqliteEngine::start(SqliteOptions::new(&folder.path)).unwrap();
    let state = load(&engine, 123).unwrap();
    assert_eq!(state.pipeline_id, Cell::Text("pipeline-4".into()));
}

#[test]
fn a_damaged_page_in_the_middle_costs_only_its_own_rows() {
    let folder = Folder::new();
    write_database(&folder.path);
    let (page_size, leaves) = leaf_pages(&folder.path, "workflow_state");
    assert!(
        leaves.len() >= 10,
        "the table should span many pages: {leaves:?}"
    );
    let (damaged_page, lost) = leaves[leaves.len() / 2];
    smash_page(&folder.path, page_size, damaged_page);
    let damaged = std::fs::read(&folder.path).unwrap();
    {
        let engine = SqliteEngine::start(SqliteOptions::new(&folder.path)).unwrap();
        let whole_table = call(&engine, Request::ListStates { status: None });
        assert!(
            matches!(whole_table, Err(Error::Corrupt { .. })),
            "{whole_table:?}"
        );
    }

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    assert_eq!(
        std::fs::read(report.backup_path.as_ref().unwrap()).unwrap(),
        damaged
    );
    let table = report.tables["workflow_state"];
    assert_eq!(table.skipped, lost as u64, "{report:?}");
    assert_eq!(table.rescued, (ROWS - lost) as u64, "{report:?}");
    assert_eq!(report.tables["system_state"].rescued, 1);
    assert!(report.schema_recovered);
    assert_usable_in_wal_mode(&folder.path);
    assert_eq!(count(&folder.path, "workflow_state"), ROWS - lost);

    // Rows on both sides of the damaged page are there, with their content.
    let engine = SqliteEngine::start(SqliteOptions::new(&folder.path)).unwrap();
    let (first, last) = (load(&engine, 0).unwrap(), load(&engine, ROWS - 1).unwrap());
    assert!(first
        .pipeline_context
        .as_deref()
        .unwrap()
        .contains(r#""index":0"#));
    assert!(last.pipeline_context.as_deref().unwrap().contains("199"));
    let missing = (0..ROWS).filter(|&i| load(&engine, i).is_none()).count();
    assert_eq!(missing, lost);
}

#[test]
fn two_damaged_regions_and_a_damaged_first_page_of_the_table() {
    let folder = Folder::new();
    write_database(&folder.path);
    let (page_size, leaves) = leaf_pages(&folder.path, "workflow_state");
    let chosen = [0, leaves.len() / 3, leaves.len() / 3 + 2];
    for &leaf in &chosen {
        smash_page(&folder.path, page_size, leaves[leaf].0);
    }
    let lost: usize = chosen.iter().map(|&leaf| leaves[leaf].1).sum();

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    let table = report.tables["workflow_state"];
    assert_eq!(table.skipped, lost as u64, "{report:?}");
    assert_eq!(table.rescued, (ROWS - lost) as u64, "{report:?}");
    assert_eq!(report.rows_skipped, lost as u64);
    assert_usable_in_wal_mode(&folder.path);
}

#[test]
fn rows_still_in_the_write_ahead_log_are_rescued_and_the_log_is_backed_up() {
    let folder = Folder::new();
    let crashed = folder.dir.path().join("live.db");
    {
        // A writer that never checkpoints; its files are copied as a crash would leave them.
        let conn = Connection::open(&crashed).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA wal_autocheckpoint = 0;
             CREATE TABLE system_state (key TEXT PRIMARY KEY, value TEXT NOT NULL,
                                        updated_at TEXT NOT NULL);",
        )
        .unwrap();
        for index in 0..50 {
            conn.execute(
                "INSERT INTO system_state VALUES (?1, '{}', '2024-06-01')",
                [format!("key-{index}")],
            )
            .unwrap();
        }
        for suffix in ["", "-wal"] {
            std::fs::copy(
                format!("{}{suffix}", crashed.display()),
                format!("{}{suffix}", folder.path.display()),
            )
            .unwrap();
        }
    }
    let wal = std::fs::read(format!("{}-wal", folder.path.display())).unwrap();
    assert!(!wal.is_empty());

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    assert_eq!(report.tables["system_state"].rescued, 50);
    let backup = report.backup_path.unwrap();
    assert_eq!(
        std::fs::read(format!("{}-wal", backup.display())).unwrap(),
        wal
    );
    assert!(!Path::new(&format!("{}-wal", folder.path.display())).exists());
    assert_eq!(count(&folder.path, "system_state"), 50);
}

#[test]
fn random_bytes_are_backed_up_and_replaced_by_a_fresh_database() {
    let folder = Folder::new();
    let garbage: Vec<u8> = (0..20_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&folder.path, &garbage).unwrap();

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    assert_eq!(std::fs::read(report.backup_path.unwrap()).unwrap(), garbage);
    assert!(!report.schema_recovered);
    assert!(report.tables.is_empty());
    assert_eq!((report.rows_rescued, report.rows_skipped), (0, 0));
    assert_usable_in_wal_mode(&folder.path);
    let conn = Connection::open(&folder.path).unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1, "the fresh layout of Flujo 0.6.11");
    drop(conn);
    let engine = SqliteEngine::start(SqliteOptions::new(&folder.path)).unwrap();
    call(
        &engine,
        Request::SaveState {
            run_id: run_id(1),
            record: Box::new(record(1)),
            expected_updated_at: None,
        },
    )
    .unwrap();
    assert!(load(&engine, 1).is_some());
}

#[test]
fn a_zero_length_file_becomes_a_fresh_database_in_the_requested_layout() {
    let folder = Folder::new();
    std::fs::write(&folder.path, b"").unwrap();

    let report = recover(&folder.path, None, FreshLayout::Flujo04).unwrap();

    let backup = report.backup_path.unwrap();
    assert_eq!(std::fs::metadata(&backup).unwrap().len(), 0);
    assert!(!report.schema_recovered);
    assert_usable_in_wal_mode(&folder.path);
    let conn = Connection::open(&folder.path).unwrap();
    let steps_key: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_table_info('steps') WHERE name = 'step_run_id'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(steps_key, 1, "Flujo 0.4.35's steps table");
}

#[test]
fn a_missing_file_needs_no_backup_and_becomes_a_fresh_database() {
    let folder = Folder::new();
    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();
    assert_eq!(report.backup_path, None);
    assert!(!report.schema_recovered);
    assert_usable_in_wal_mode(&folder.path);
    assert_eq!(folder.names(), vec!["wf.db".to_owned()]);
}

#[test]
fn a_directory_is_refused_and_left_alone() {
    let folder = Folder::new();
    std::fs::create_dir(&folder.path).unwrap();
    std::fs::write(folder.path.join("inside"), b"keep").unwrap();
    let error = recover(&folder.path, None, FreshLayout::Flujo06).unwrap_err();
    assert!(matches!(error, Error::InvalidInput(_)), "{error:?}");
    assert!(error.to_string().contains("is a directory"), "{error}");
    assert_eq!(folder.names(), vec!["wf.db".to_owned()]);
    assert_eq!(std::fs::read(folder.path.join("inside")).unwrap(), b"keep");
}

#[test]
fn a_damaged_first_page_of_a_table_without_indexes_costs_only_its_own_rows() {
    let folder = Folder::new();
    write_database(&folder.path);
    let conn = Connection::open(&folder.path).unwrap();
    conn.execute_batch(
        "CREATE TABLE notes (body TEXT);
         WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
         INSERT INTO notes (body) SELECT printf('note %d %.80c', i, 'x') FROM n;
         PRAGMA wal_checkpoint(TRUNCATE);",
    )
    .unwrap();
    drop(conn);
    let (page_size, leaves) = leaf_pages(&folder.path, "notes");
    let (first_page, lost) = leaves[0];
    smash_page(&folder.path, page_size, first_page);

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    // Nothing but the rowids leads past the damage: no index holds these rows.
    let notes = report.tables["notes"];
    assert_eq!(notes.rescued, (2000 - lost) as u64, "{report:?}");
    assert_eq!(count(&folder.path, "notes"), 2000 - lost);
}

#[test]
fn a_transaction_cut_short_in_a_rollback_journal_is_rolled_back_not_rescued() {
    let folder = Folder::new();
    write_database(&folder.path);
    let writer = Connection::open(&folder.path).unwrap();
    // A small cache spills the deletions into the file, the old pages into the journal; the
    // connection is then abandoned mid-transaction, as a killed process leaves it.
    writer
        .execute_batch(
            "PRAGMA journal_mode = DELETE; PRAGMA cache_size = 10;
             BEGIN; DELETE FROM workflow_state;",
        )
        .unwrap();
    std::mem::forget(writer);
    assert!(folder.names().contains(&"wf.db-journal".to_owned()));

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    assert_eq!(
        report.tables["workflow_state"].rescued, ROWS as u64,
        "{report:?}"
    );
    assert_eq!(count(&folder.path, "workflow_state"), ROWS);
}

#[test]
fn a_backup_name_whose_sidecar_exists_is_not_taken() {
    let folder = Folder::new();
    write_database(&folder.path);
    let requested = folder.dir.path().join("old.db");
    let foreign_wal = folder.dir.path().join("old.db-wal");
    std::fs::write(&foreign_wal, b"another database's log").unwrap();

    let report = recover(&folder.path, Some(requested), FreshLayout::Flujo06).unwrap();

    assert_eq!(
        report.backup_path.unwrap(),
        folder.dir.path().join("old.db.1")
    );
    assert_eq!(
        std::fs::read(&foreign_wal).unwrap(),
        b"another database's log"
    );
    assert_eq!(report.tables["workflow_state"].rescued, ROWS as u64);
}

#[test]
fn an_existing_backup_is_never_overwritten() {
    let folder = Folder::new();
    write_database(&folder.path);
    let original = std::fs::read(&folder.path).unwrap();
    let requested = folder.dir.path().join("saved.db");
    std::fs::write(&requested, b"an older backup").unwrap();

    let report = recover(&folder.path, Some(requested.clone()), FreshLayout::Flujo06).unwrap();

    let backup = report.backup_path.unwrap();
    assert_eq!(backup, folder.dir.path().join("saved.db.1"));
    assert_eq!(std::fs::read(&requested).unwrap(), b"an older backup");
    assert_eq!(std::fs::read(&backup).unwrap(), original);

    // A second recovery of the same file the same second gets a name of its own too.
    let first = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();
    let second = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();
    assert_ne!(first.backup_path, second.backup_path);
    assert_eq!(second.tables["workflow_state"].rescued, ROWS as u64);
}

#[test]
fn an_unreadable_schema_leaves_a_fresh_database_and_the_bytes_in_the_backup() {
    let folder = Folder::new();
    write_database(&folder.path);
    let (page_size, _) = leaf_pages(&folder.path, "workflow_state");
    smash_page(&folder.path, page_size, 1);
    let damaged = std::fs::read(&folder.path).unwrap();

    let report = recover(&folder.path, None, FreshLayout::Flujo06).unwrap();

    assert_eq!(std::fs::read(report.backup_path.unwrap()).unwrap(), damaged);
    assert!(!report.schema_recovered);
    assert_eq!(report.rows_rescued, 0);
    assert_usable_in_wal_mode(&folder.path);
    assert_eq!(count(&folder.path, "workflow_state"), 0);
}

#[test]
fn the_rebuilt_file_keeps_the_original_permissions() {
    use std::os::unix::fs::PermissionsExt;
    let folder = Folder::new();
    write_database(&folder.path);
    std::fs::set_permissions(&folder.path, std::fs::Permissions::from_mode(0o600)).unwrap();
    recover(&folder.path, None, FreshLayout::Flujo06).unwrap();
    let mode = std::fs::metadata(&folder.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
