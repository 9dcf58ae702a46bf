//! The SQLite engine through its public contract, with no Python involved.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use flujo_sqlite::engine::{
    self, CallerGone, Completion, Durability, EngineSettings, FreshLayout, Request, Response,
    StateEngine,
};
use flujo_sqlite::error::Error;
use flujo_sqlite::model::{BackgroundFields, Cell, SpanRecord, StateRecord, WorkflowQuery};
use flujo_sqlite::sqlite::{SqliteEngine, SqliteOptions};
use flujo_sqlite::timestamp::Age;
use rusqlite::Connection;

/// The tables of a Flujo 0.4.35 file besides `workflow_state`, as Flujo creates them.
const FLUJO_04_OTHER_TABLES: &str =
    "CREATE TABLE runs (run_id TEXT PRIMARY KEY, pipeline_name TEXT NOT NULL, \
     pipeline_version TEXT NOT NULL, status TEXT NOT NULL, start_time TEXT NOT NULL, \
     end_time TEXT, total_cost REAL, final_context_blob TEXT);
     CREATE TABLE steps (step_run_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, \
     step_name TEXT NOT NULL, step_index INTEGER NOT NULL, status TEXT NOT NULL, \
     start_time TEXT NOT NULL, end_time TEXT, duration_ms INTEGER, cost REAL, \
     tokens INTEGER, input_blob TEXT, output_blob TEXT, error_blob TEXT);
     CREATE TABLE spans (span_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, \
     parent_span_id TEXT, name TEXT NOT NULL, start_time REAL NOT NULL, end_time REAL, \
     status TEXT DEFAULT 'running', attributes TEXT, created_at DATETIME);";

fn engine(path: &Path) -> SqliteEngine {
    SqliteEngine::start(SqliteOptions::new(path)).unwrap()
}

fn call(engine: &SqliteEngine, request: Request) -> Result<Response, Error> {
    let (tx, rx) = mpsc::channel();
    engine.submit(
        request,
        Completion::new(move |outcome| tx.send(outcome).unwrap()),
    );
    rx.recv_timeout(Duration::from_secs(60)).unwrap()
}

/// `call` by a caller that stopped waiting before the engine began the request.
fn call_as_gone(engine: &SqliteEngine, request: Request) -> Result<Response, Error> {
    let (tx, rx) = mpsc::channel();
    let caller_gone = CallerGone::default();
    caller_gone.set();
    let done = Completion::watching(caller_gone, move |outcome| tx.send(outcome).unwrap());
    engine.submit(request, done);
    rx.recv_timeout(Duration::from_secs(60)).unwrap()
}

fn record(pipeline: &str, status: &str, created_at: &str) -> StateRecord {
    StateRecord {
        pipeline_id: pipeline.into(),
        pipeline_name: format!("{pipeline} pipeline"),
        pipeline_version: "1.0".into(),
        current_step_index: 2,
        pipeline_context: r#"{"rows":1000}"#.into(),
        last_step_output: Some(r#"{"ok":true}"#.into()),
        step_history: None,
        status: status.into(),
        created_at: created_at.into(),
        updated_at: created_at.into(),
        total_steps: 5,
        error_message: (status == "failed").then(|| "boom".into()),
        execution_time_ms: Some(1500),
        memory_usage_mb: Some(45.2),
        background: BackgroundFields::default(),
    }
}

fn save(engine: &SqliteEngine, run_id: &str, record: StateRecord) {
    call(
        engine,
        Request::SaveState {
            run_id: run_id.into(),
            record: Box::new(record),
            expected_updated_at: None,
        },
    )
    .unwrap();
}

/// Queues every save at once, so that they commit in groups, and waits until all are stored.
fn save_all(engine: &SqliteEngine, runs: impl Iterator<Item = (String, StateRecord)>) {
    let (tx, rx) = mpsc::channel();
    for (run_id, record) in runs {
        let request = Request::SaveState {
            run_id,
            record: Box::new(record),
            expected_updated_at: None,
        };
        let tx = tx.clone();
        engine.submit(
            request,
            Completion::new(move |outcome| tx.send(outcome.is_ok()).unwrap()),
        );
    }
    drop(tx);
    assert!(rx.iter().all(|ok| ok));
}

fn listed_ids(response: Response) -> Vec<String> {
    let Response::Workflows(items) = response else {
        panic!("not a list: {response:?}")
    };
    items
        .into_iter()
        .map(|w| match w.run_id {
            Cell::Text(t) => t,
            other => panic!("run_id {other:?}"),
        })
        .collect()
}

fn utc_text(age: chrono::Duration) -> String {
    (chrono::Utc::now() - age)
        .format("%Y-%m-%d %H:%M:%S+00:00")
        .to_string()
}

struct TempDb {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn temp_db() -> TempDb {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wf.db");
    TempDb { _dir: dir, path }
}

/// Runs `sql` on the file at `path` with a connection of its own (as another program would).
fn run_sql(path: &Path, sql: &str) {
    Connection::open(path).unwrap().execute_batch(sql).unwrap();
}

fn tables_and_version(path: &Path) -> (Vec<String>, i64, String) {
    let conn = Connection::open(path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    let tables = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    (tables, version, mode)
}

#[test]
fn a_fresh_file_gets_the_requested_flujo_layout_in_wal_mode() {
    for (layout, version, steps_key) in [
        (FreshLayout::Flujo04, 0, "step_run_id"),
        (FreshLayout::Flujo06, 1, "id"),
    ] {
        let db = temp_db();
        let mut options = SqliteOptions::new(&db.path);
        options.fresh_layout = layout;
        let e = SqliteEngine::start(options).unwrap();
        save(
            &e,
            "r1",
            record("p", "running", &utc_text(chrono::Duration::zero())),
        );
        e.close();
        let (tables, found_version, mode) = tables_and_version(&db.path);
        assert_eq!(mode, "wal");
        assert_eq!(found_version, version, "{layout:?}");
        for table in [
            "evaluations",
            "runs",
            "spans",
            "steps",
            "system_state",
            "traces",
            "workflow_state",
        ] {
            assert!(
                tables.iter().any(|t| t == table),
                "{layout:?} lacks {table}"
            );
        }
        let conn = Connection::open(&db.path).unwrap();
        let steps_key_present: i64 = conn
            .query_row(
                "SELECT count(*) FROM pragma_table_info('steps') WHERE name = ?1",
                [steps_key],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(steps_key_present, 1, "{layout:?}");
    }
    // Flujo 0.4.35's CHECK constraint on status is kept in its layout.
    let db = temp_db();
    let mut options = SqliteOptions::new(&db.path);
    options.fresh_layout = FreshLayout::Flujo04;
    let e = SqliteEngine::start(options).unwrap();
    save(
        &e,
        "r1",
        record("p", "running", &utc_text(chrono::Duration::zero())),
    );
    e.close();
    let check = Connection::open(&db.path).unwrap().execute(
        "INSERT INTO workflow_state (run_id, pipeline_id, pipeline_name, pipeline_version, \
         pipeline_context, status, created_at, updated_at) VALUES ('x','p','n','1','{}','bogus','t','t')",
        [],
    );
    assert!(check
        .unwrap_err()
        .to_string()
        .contains("CHECK constraint failed"));
}

/// What the binding starts: the engine for the store, set up as the backend's constructor asked.
#[test]
fn the_engine_started_for_the_backend_follows_its_settings() {
    for durability in [Durability::Full, Durability::Normal] {
        let db = temp_db();
        let settings = EngineSettings {
            durability,
            lock_wait: Duration::from_secs(5),
            readers: 1,
            fresh_layout: FreshLayout::Flujo04,
        };
        let started = engine::start(&db.path, settings, None).unwrap();
        // Only commits that skip the fsync are quick enough to wait for on the loop's thread;
        // point reads always are.
        assert_eq!(
            started.quick_write_wait().is_some(),
            durability == Durability::Normal
        );
        assert!(started.quick_read_wait().is_some());
        let answer = |request| {
            let (tx, rx) = mpsc::channel();
            started.submit(
                request,
                Completion::new(move |outcome| tx.send(outcome).unwrap()),
            );
            rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap()
        };
        let now = utc_text(chrono::Duration::zero());
        answer(Request::SaveState {
            run_id: "r1".into(),
            record: Box::new(record("p", "running", &now)),
            expected_updated_at: None,
        });
        let loaded = answer(Request::LoadState {
            run_id: "r1".into(),
        });
        assert!(matches!(loaded, Response::State(Some(_))), "{loaded:?}");
        started.close();
        assert_eq!(tables_and_version(&db.path).1, 0, "Flujo 0.4.35's layout");
    }
}

#[test]
fn saves_round_trip_and_upsert_replaces_the_whole_row() {
    let db = temp_db();
    let e = engine(&db.path);
    let created = utc_text(chrono::Duration::zero());
    save(&e, "r1", record("p", "running", &created));
    let mut second = record("p", "failed", &created);
    second.last_step_output = None;
    save(&e, "r1", second);
    let Response::State(Some(state)) = call(
        &e,
        Request::LoadState {
            run_id: "r1".into(),
        },
    )
    .unwrap() else {
        panic!("missing")
    };
    assert_eq!(state.status, Cell::Text("failed".into()));
    assert_eq!(state.last_step_output, None);
    assert_eq!(state.pipeline_context.as_deref(), Some(r#"{"rows":1000}"#));
    assert_eq!(state.created_at, Cell::Text(created));
    assert_eq!(state.execution_time_ms, Cell::Integer(1500));
    assert_eq!(state.background.is_background_task, Cell::Integer(0));
    assert_eq!(
        call(
            &e,
            Request::LoadState {
                run_id: "nope".into()
            }
        )
        .unwrap(),
        Response::State(None)
    );
    call(
        &e,
        Request::DeleteState {
            run_id: "r1".into(),
        },
    )
    .unwrap();
    assert_eq!(
        call(
            &e,
            Request::LoadState {
                run_id: "r1".into()
            }
        )
        .unwrap(),
        Response::State(None)
    );
}

#[test]
fn queued_writes_commit_together_and_a_failing_one_fails_alone() {
    let db = temp_db();
    let mut options = SqliteOptions::new(&db.path);
    // 0.4.35's layout has the CHECK constraint on status that makes one write fail in the DB.
    options.fresh_layout = FreshLayout::Flujo04;
    let e = SqliteEngine::start(options).unwrap();
    let created = utc_text(chrono::Duration::zero());
    let (tx, rx) = mpsc::channel();
    for i in 0..500 {
        // The CHECK constraint rejects this status, inside the same batch as the others.
        let status = if i == 250 { "bogus" } else { "completed" };
        let tx = tx.clone();
        e.submit(
            Request::SaveState {
                run_id: format!("r{i}"),
                record: Box::new(record("p", status, &created)),
                expected_updated_at: None,
            },
            Completion::new(move |outcome| tx.send((i, outcome.is_ok())).unwrap()),
        );
    }
    drop(tx);
    let outcomes: Vec<(i32, bool)> = rx.iter().collect();
    assert_eq!(outcomes.len(), 500);
    assert!(outcomes.iter().all(|&(i, ok)| ok == (i != 250)));
    let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
        panic!()
    };
    assert_eq!(stats.total_workflows, 499);
}

/// An engine on a fresh file with 0.4.35's layout, where span ids are unique across runs, so a
/// trace can fail on its last span.
fn flujo04_engine(path: &Path) -> SqliteEngine {
    let mut options = SqliteOptions::new(path);
    options.fresh_layout = FreshLayout::Flujo04;
    SqliteEngine::start(options).unwrap()
}

/// `save_trace`: replaces the run's spans with one span per id.
fn trace(run_id: &str, span_ids: &[&str]) -> Request {
    Request::SaveSpans {
        run_id: run_id.into(),
        spans: span_ids
            .iter()
            .map(|id| SpanRecord {
                span_id: (*id).into(),
                parent_span_id: None,
                name: "step".into(),
                start_time: 1.0,
                end_time: Some(2.0),
                status: "completed".into(),
                attributes: "{}".into(),
            })
            .collect(),
        replace: true,
        pipeline_name: None,
        pipeline_version: None,
    }
}

fn span_ids(engine: &SqliteEngine, run_id: &str) -> Vec<Cell> {
    let request = Request::GetSpans {
        run_id: run_id.into(),
        status: None,
        name: None,
    };
    let Response::Spans(spans) = call(engine, request).unwrap() else {
        panic!("GetSpans answered with something else")
    };
    spans.into_iter().map(|s| s.span_id).collect()
}

/// A write alone in its transaction runs without a savepoint; when it fails halfway, rolling
/// the transaction back must still undo the part it did.
#[test]
fn a_lone_write_that_fails_halfway_leaves_nothing_behind() {
    let db = temp_db();
    let e = flujo04_engine(&db.path);
    call(&e, trace("a", &["taken"])).unwrap();
    call(&e, trace("b", &["b1"])).unwrap();
    // Deletes b's spans and inserts b2 before "taken" is refused.
    let refused = call(&e, trace("b", &["b2", "taken"])).unwrap_err();
    assert!(matches!(refused, Error::InvalidInput(_)), "{refused:?}");
    assert_eq!(span_ids(&e, "b"), [Cell::Text("b1".into())]);
    // The transaction was closed: the next write goes through.
    call(&e, trace("b", &["b3"])).unwrap();
    assert_eq!(span_ids(&e, "b"), [Cell::Text("b3".into())]);
    assert_eq!(span_ids(&e, "a"), [Cell::Text("taken".into())]);
}

/// Writes queued together share a transaction, each in a savepoint: one failing halfway undoes
/// only itself, and a batch where every write fails is rolled back whole.
#[test]
fn queued_writes_that_fail_halfway_undo_only_themselves() {
    let db = temp_db();
    let e = flujo04_engine(&db.path);
    let burst = |requests: Vec<Request>| {
        let (tx, rx) = mpsc::channel();
        let count = requests.len();
        for (i, request) in requests.into_iter().enumerate() {
            let tx = tx.clone();
            e.submit(
                request,
                Completion::new(move |outcome| tx.send((i, outcome)).unwrap()),
            );
        }
        let mut outcomes: Vec<_> = rx.iter().take(count).collect();
        outcomes.sort_by_key(|(i, _)| *i);
        outcomes
            .into_iter()
            .map(|(_, outcome)| outcome.is_ok())
            .collect::<Vec<_>>()
    };
    call(&e, trace("a", &["taken"])).unwrap();
    call(&e, trace("b", &["b1"])).unwrap();
    // 40 good traces around one that deletes b's spans, inserts b2, then hits a taken id.
    let mut requests: Vec<Request> = (0..40)
        .map(|i| trace(&format!("g{i}"), &[&format!("g{i}-span")]))
        .collect();
    requests.insert(20, trace("b", &["b2", "taken"]));
    let outcomes = burst(requests);
    assert_eq!(outcomes.iter().filter(|ok| !**ok).count(), 1);
    assert!(!outcomes[20]);
    assert_eq!(span_ids(&e, "b"), [Cell::Text("b1".into())]);
    assert_eq!(span_ids(&e, "g39"), [Cell::Text("g39-span".into())]);
    // Every write of the batch fails: nothing of any of them stays.
    let outcomes = burst((0..20).map(|_| trace("b", &["b3", "taken"])).collect());
    assert!(outcomes.iter().all(|ok| !ok));
    assert_eq!(span_ids(&e, "b"), [Cell::Text("b1".into())]);
    call(&e, trace("b", &["b4"])).unwrap();
    assert_eq!(span_ids(&e, "b"), [Cell::Text("b4".into())]);
}

#[test]
fn lists_page_through_ties_exactly_once_and_offset_works_without_limit() {
    let db = temp_db();
    let e = engine(&db.path);
    let same_time = utc_text(chrono::Duration::hours(1));
    for i in 0..200 {
        let status = if i % 2 == 0 { "failed" } else { "completed" };
        save(&e, &format!("r{i:03}"), record("p", status, &same_time));
    }
    for status in [None, Some("failed".to_string())] {
        let mut seen = Vec::new();
        for page in 0..10 {
            let query = WorkflowQuery {
                status: status.clone(),
                pipeline_id: None,
                limit: Some(25),
                offset: page * 25,
            };
            seen.extend(listed_ids(call(&e, Request::ListWorkflows(query)).unwrap()));
        }
        let expected = if status.is_some() { 100 } else { 200 };
        let mut unique = seen.clone();
        unique.sort();
        unique.dedup();
        assert_eq!((seen.len(), unique.len()), (expected, expected));
    }
    let query = WorkflowQuery {
        offset: 190,
        ..WorkflowQuery::default()
    };
    assert_eq!(
        listed_ids(call(&e, Request::ListWorkflows(query)).unwrap()).len(),
        10
    );
    let no_rows = WorkflowQuery {
        limit: Some(0),
        ..WorkflowQuery::default()
    };
    assert!(listed_ids(call(&e, Request::ListWorkflows(no_rows)).unwrap()).is_empty());
}

#[test]
fn time_windows_are_exact_for_our_format_and_flujos() {
    let db = temp_db();
    let e = engine(&db.path);
    let hours = chrono::Duration::hours;
    let flujo_text = |age: chrono::Duration| {
        (chrono::Utc::now() - age)
            .format("%Y-%m-%dT%H:%M:%S+00:00")
            .to_string()
    };
    // Just inside and just outside 24 h, in both stored formats; Flujo's own text comparison
    // would count the 25 h old rows whenever they fall on yesterday's date.
    save(&e, "ours_23h", record("p", "failed", &utc_text(hours(23))));
    save(&e, "ours_25h", record("p", "failed", &utc_text(hours(25))));
    save(
        &e,
        "flujo_23h",
        record("p", "failed", &flujo_text(hours(23))),
    );
    save(
        &e,
        "flujo_25h",
        record("p", "failed", &flujo_text(hours(25))),
    );
    save(
        &e,
        "offset_23h",
        record(
            "p",
            "failed",
            &(chrono::Utc::now() - hours(23))
                .with_timezone(&chrono::FixedOffset::east_opt(5 * 3600).unwrap())
                .format("%Y-%m-%dT%H:%M:%S%:z")
                .to_string(),
        ),
    );
    let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
        panic!()
    };
    assert_eq!(stats.recent_workflows_24h, 3);
    let mut failed = listed_ids(
        call(
            &e,
            Request::FailedWorkflows {
                hours_back: age_hours(24.0),
            },
        )
        .unwrap(),
    );
    failed.sort();
    assert_eq!(failed, ["flujo_23h", "offset_23h", "ours_23h"]);
    let Response::Count(deleted) = call(&e, cleanup_request(1.0)).unwrap() else {
        panic!()
    };
    assert_eq!(deleted, 2);
}

#[test]
fn cleanup_deletes_in_batches_and_counts_every_row() {
    let db = temp_db();
    let e = engine(&db.path);
    save_all(
        &e,
        (0..5000).map(|i| {
            let age = if i % 2 == 0 {
                chrono::Duration::days(40)
            } else {
                chrono::Duration::days(1)
            };
            (format!("r{i}"), record("p", "completed", &utc_text(age)))
        }),
    );
    assert_eq!(
        call(&e, cleanup_request(30.0)).unwrap(),
        Response::Count(2500)
    );
    let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
        panic!()
    };
    assert_eq!(stats.total_workflows, 2500);
}

#[test]
fn a_cleanup_whose_caller_is_gone_deletes_nothing_more() {
    let db = temp_db();
    let e = engine(&db.path);
    let old = utc_text(chrono::Duration::days(40));
    save_all(
        &e,
        (0..10).map(|i| (format!("r{i}"), record("p", "completed", &old))),
    );
    assert_eq!(
        call_as_gone(&e, cleanup_request(30.0)).unwrap(),
        Response::Count(0)
    );
    assert_eq!(stored_run_ids(&db.path).len(), 10);
}

#[test]
fn reads_whose_caller_is_gone_are_skipped_and_writes_are_not() {
    let db = temp_db();
    let e = engine(&db.path);
    let now = utc_text(chrono::Duration::zero());
    save(&e, "r", record("p", "running", &now));
    let load = || Request::LoadState {
        run_id: "r".to_owned(),
    };
    assert!(matches!(call(&e, load()), Ok(Response::State(Some(_)))));
    assert!(matches!(call_as_gone(&e, load()), Err(Error::CallerGone)));
    assert!(matches!(
        call_as_gone(&e, Request::WorkflowStats),
        Err(Error::CallerGone)
    ));
    // A gone caller cannot tell whether its save happened, so it happens, as with Flujo.
    let save = Request::SaveState {
        run_id: "s".to_owned(),
        record: Box::new(record("p", "running", &now)),
        expected_updated_at: None,
    };
    assert_eq!(call_as_gone(&e, save).unwrap(), Response::Done);
    assert_eq!(stored_run_ids(&db.path).len(), 2);
}

/// Another process waiting to write cannot be seen, and SQLite's busy handler looks again only
/// every 100 ms: a cleanup that takes the lock back right after each batch kept it from writing
/// for the whole cleanup (Flujo 0.4.35, starting meanwhile, gives up after 5 s and moves the
/// file aside as corrupt). A second engine on the file stands for that process. Halfway, the
/// backend is closed, which must not end the gaps (closing waits for the cleanup).
#[test]
fn a_long_cleanup_lets_writers_of_other_connections_in() {
    const OLD_RUNS: usize = 320_000;
    let db = temp_db();
    let e = std::sync::Arc::new(engine(&db.path));
    let now = utc_text(chrono::Duration::zero());
    save(&e, "warm", record("p", "running", &now));
    let old = utc_text(chrono::Duration::days(40));
    {
        let mut conn = Connection::open(&db.path).unwrap();
        let tx = conn.transaction().unwrap();
        let mut insert = tx
            .prepare(
                "INSERT INTO workflow_state (run_id, pipeline_id, pipeline_name, \
                 pipeline_version, current_step_index, pipeline_context, status, created_at, \
                 updated_at) VALUES (?1, 'p', 'n', '1', 0, '{}', 'completed', ?2, ?2)",
            )
            .unwrap();
        for i in 0..OLD_RUNS as u64 {
            // Scattered, as real run ids are: each batch then touches pages all over the index.
            let run_id = format!("{:016x}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            insert.execute(rusqlite::params![run_id, old]).unwrap();
        }
        drop(insert);
        tx.commit().unwrap();
    }
    // A save waits at most a second of batches plus SQLite's 100 ms between looks (1.2 s
    // measured, under load too); the lock_wait leaves room for a stall on a busy machine.
    let lock_wait = Duration::from_secs(3);
    let mut options = SqliteOptions::new(&db.path);
    options.lock_wait = lock_wait;
    let other = SqliteEngine::start(options).unwrap();
    save(&other, "other-warm", record("p", "running", &now));

    let (done_tx, done_rx) = mpsc::channel();
    let started = std::time::Instant::now();
    e.submit(
        cleanup_request(30.0),
        Completion::new(move |outcome| done_tx.send(outcome).unwrap()),
    );
    let mut saved_meanwhile = 0;
    let mut closing = None;
    let deleted = loop {
        if let Ok(outcome) = done_rx.try_recv() {
            break outcome.unwrap();
        }
        if closing.is_none() && started.elapsed() > Duration::from_millis(1500) {
            let e = std::sync::Arc::clone(&e);
            closing = Some(std::thread::spawn(move || e.close()));
        }
        let during = Request::SaveState {
            run_id: format!("during{saved_meanwhile}"),
            record: Box::new(record("p", "running", &now)),
            expected_updated_at: None,
        };
        if let Err(error) = call(&other, during) {
            panic!("{error} (after {:?} of cleanup)", started.elapsed());
        }
        saved_meanwhile += 1;
    };
    let took = started.elapsed();
    assert_eq!(deleted, Response::Count(OLD_RUNS as u64));
    closing.expect("closed halfway").join().unwrap();
    // Otherwise the other engine's saves could not have waited past their lock_wait anyway.
    assert!(
        took > lock_wait + Duration::from_secs(1),
        "the cleanup took only {took:?}, too short to show anything: raise OLD_RUNS"
    );
    assert!(saved_meanwhile > 1, "{saved_meanwhile}");
}

#[test]
fn saves_queued_behind_a_long_cleanup_are_served_between_its_batches() {
    let db = temp_db();
    let e = engine(&db.path);
    let (saved_tx, saved_rx) = mpsc::channel();
    let old = utc_text(chrono::Duration::days(40));
    for i in 0..20_000 {
        let tx = saved_tx.clone();
        e.submit(
            Request::SaveState {
                run_id: format!("old{i}"),
                record: Box::new(record("p", "completed", &old)),
                expected_updated_at: None,
            },
            Completion::new(move |outcome| tx.send(outcome.is_ok()).unwrap()),
        );
    }
    drop(saved_tx);
    assert!(saved_rx.iter().all(|ok| ok));

    // Completions are numbered in the order the engine reports them.
    let (order_tx, order_rx) = mpsc::channel();
    let cleanup_tx = order_tx.clone();
    e.submit(
        cleanup_request(30.0),
        Completion::new(move |outcome| cleanup_tx.send(("cleanup", outcome.unwrap())).unwrap()),
    );
    let now = utc_text(chrono::Duration::zero());
    for i in 0..10 {
        let tx = order_tx.clone();
        e.submit(
            Request::SaveState {
                run_id: format!("new{i}"),
                record: Box::new(record("p", "running", &now)),
                expected_updated_at: None,
            },
            Completion::new(move |outcome| tx.send(("save", outcome.unwrap())).unwrap()),
        );
    }
    drop(order_tx);
    let order: Vec<_> = order_rx.iter().collect();
    assert_eq!(order.len(), 11);
    let cleanup_position = order
        .iter()
        .position(|(what, _)| *what == "cleanup")
        .unwrap();
    assert_eq!(order[cleanup_position].1, Response::Count(20_000));
    assert!(
        cleanup_position > 0,
        "the saves waited for the whole cleanup instead of going between its batches"
    );
    let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
        panic!()
    };
    assert_eq!(stats.total_workflows, 10);
    // A second cleanup right after, likely while the first one's checkpoint still runs.
    for i in 0..3000 {
        save(&e, &format!("again{i}"), record("p", "completed", &old));
    }
    assert_eq!(
        call(&e, cleanup_request(30.0)).unwrap(),
        Response::Count(3000)
    );
    save(&e, "after", record("p", "running", &now));
    e.close();
    // The checkpoints started after the cleanups have finished by the time close returns, and
    // the file is whole.
    let conn = Connection::open(&db.path).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM workflow_state", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 11);
}

#[test]
fn a_legacy_table_is_migrated_in_place_with_its_rows() {
    let db = temp_db();
    {
        let conn = Connection::open(&db.path).unwrap();
        conn.execute_batch(
            "CREATE TABLE workflow_state (run_id TEXT PRIMARY KEY, pipeline_id TEXT NOT NULL);
             INSERT INTO workflow_state VALUES ('old', 'legacy_pipeline');",
        )
        .unwrap();
        conn.execute_batch(FLUJO_04_OTHER_TABLES).unwrap();
    }
    let e = engine(&db.path);
    let Response::State(Some(state)) = call(
        &e,
        Request::LoadState {
            run_id: "old".into(),
        },
    )
    .unwrap() else {
        panic!("the legacy row was lost")
    };
    assert_eq!(state.pipeline_name, Cell::Text("legacy_pipeline".into()));
    assert_eq!(state.status, Cell::Text("running".into()));
    assert_eq!(state.pipeline_context.as_deref(), Some("{}"));
    save(
        &e,
        "new",
        record("p", "running", &utc_text(chrono::Duration::zero())),
    );
    let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
        panic!()
    };
    assert_eq!(stats.total_workflows, 2);
}

fn index_definitions(path: &Path) -> Vec<(String, String)> {
    let conn = Connection::open(path).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' \
             AND name LIKE 'idx_flujo_sqlite_%' ORDER BY name",
        )
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<Result<_, _>>().unwrap()
}

#[test]
fn whole_table_indexes_of_earlier_builds_give_way_to_partial_ones() {
    let db = temp_db();
    let fresh = {
        let e = engine(&db.path);
        save(
            &e,
            "a",
            record("p", "failed", &utc_text(chrono::Duration::zero())),
        );
        e.close();
        index_definitions(&db.path)
    };
    // What a file written by an earlier build of ours looked like.
    {
        let conn = Connection::open(&db.path).unwrap();
        for (name, _) in &fresh {
            if !name.ends_with("_created") {
                conn.execute_batch(&format!("DROP INDEX {name}")).unwrap();
            }
        }
        conn.execute_batch(
            "CREATE INDEX idx_flujo_sqlite_state_status_updated \
                 ON workflow_state(status, updated_at);
             CREATE INDEX idx_flujo_sqlite_state_execution_time \
                 ON workflow_state(execution_time_ms);
             CREATE INDEX idx_flujo_sqlite_state_background \
                 ON workflow_state(is_background_task, updated_at);
             CREATE INDEX idx_flujo_sqlite_state_background_updated \
                 ON workflow_state(is_background_task, updated_at) WHERE is_background_task = 1;",
        )
        .unwrap();
    }
    let e = engine(&db.path);
    let Response::Workflows(failed) = call(
        &e,
        Request::FailedWorkflows {
            hours_back: age_hours(24.0),
        },
    )
    .unwrap() else {
        panic!("not a list of failed runs")
    };
    assert_eq!(failed.len(), 1);
    e.close();
    assert_eq!(index_definitions(&db.path), fresh);
    assert!(
        fresh
            .iter()
            .filter(|(_, sql)| sql.contains(" WHERE "))
            .count()
            == 5
    );
}

#[test]
fn text_that_is_not_utf8_loads_with_replacement_characters() {
    let db = temp_db();
    let e = engine(&db.path);
    save(
        &e,
        "bad",
        record("p", "failed", &utc_text(chrono::Duration::zero())),
    );
    {
        // Another program storing Latin-1 bytes as TEXT.
        let conn = Connection::open(&db.path).unwrap();
        conn.execute_batch(
            "UPDATE workflow_state SET pipeline_context = CAST(X'7B2261223A22E9227D' AS TEXT), \
             error_message = CAST(X'6361E966E9' AS TEXT) WHERE run_id = 'bad'",
        )
        .unwrap();
    }
    let Response::State(Some(state)) = call(
        &e,
        Request::LoadState {
            run_id: "bad".into(),
        },
    )
    .unwrap() else {
        panic!("the run was not found")
    };
    assert_eq!(
        state.pipeline_context.as_deref(),
        Some("{\"a\":\"\u{FFFD}\"}")
    );
    assert_eq!(
        state.error_message,
        Cell::Text("ca\u{FFFD}f\u{FFFD}".into())
    );
}

#[test]
fn stats_count_every_status_another_program_wrote() {
    let db = temp_db();
    {
        let conn = Connection::open(&db.path).unwrap();
        // An unconstrained status column, as in files older than Flujo's CHECK constraint.
        conn.execute_batch(
            "CREATE TABLE workflow_state (run_id TEXT PRIMARY KEY, pipeline_id TEXT NOT NULL, \
             status TEXT);",
        )
        .unwrap();
        conn.execute_batch(FLUJO_04_OTHER_TABLES).unwrap();
        let statuses: [Option<&str>; 9] = [
            Some("completed"),
            Some("completed"),
            Some("failed"),
            None,
            None,
            Some(""),
            Some("Completed"),
            Some("zzz \u{1F600}"),
            Some("5"),
        ];
        for (i, status) in statuses.iter().enumerate() {
            conn.execute(
                "INSERT INTO workflow_state VALUES (?1, 'p', ?2)",
                rusqlite::params![format!("r{i}"), status],
            )
            .unwrap();
        }
        conn.execute_batch(
            "INSERT INTO workflow_state VALUES ('r-int', 'p', 7);
             INSERT INTO workflow_state VALUES ('r-blob-failed', 'p', CAST('failed' AS BLOB));
             INSERT INTO workflow_state VALUES ('r-blob-done', 'p', CAST('completed' AS BLOB));",
        )
        .unwrap();
    }
    let e = engine(&db.path);
    let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
        panic!()
    };
    assert_eq!(stats.total_workflows, 12);
    let counts: Vec<(&str, u64)> = stats
        .status_counts
        .iter()
        .map(|(status, n)| (status.as_str(), *n))
        .collect();
    assert_eq!(
        counts,
        [
            ("", 1),
            ("5", 1),
            ("7", 1),
            ("Completed", 1),
            ("completed", 3),
            ("failed", 2),
            ("zzz \u{1F600}", 1),
        ]
    );
}

#[test]
fn a_file_that_is_not_a_database_is_reported_and_left_untouched() {
    let db = temp_db();
    std::fs::write(
        &db.path,
        b"this is not a database, it is a shopping list\n".repeat(100),
    )
    .unwrap();
    let before = std::fs::read(&db.path).unwrap();
    let e = engine(&db.path);
    let error = call(&e, Request::LoadState { run_id: "r".into() }).unwrap_err();
    assert!(matches!(error, Error::Corrupt { .. }), "{error:?}");
    assert!(error.to_string().contains("never renames"));
    e.close();
    assert_eq!(std::fs::read(&db.path).unwrap(), before);
    let siblings = std::fs::read_dir(db.path.parent().unwrap())
        .unwrap()
        .count();
    assert_eq!(siblings, 1);
}

#[test]
fn a_newer_schema_version_is_refused() {
    let db = temp_db();
    run_sql(&db.path, "PRAGMA user_version = 7");
    let e = engine(&db.path);
    let error = call(&e, Request::WorkflowStats).unwrap_err();
    assert!(
        matches!(error, Error::SchemaTooNew { found: 7, .. }),
        "{error:?}"
    );
}

/// Completing another application's `workflow_state` with Flujo's 19 columns damaged it and
/// then failed anyway ("no such column: run_id").
#[test]
fn a_workflow_state_table_that_is_not_flujos_is_refused_and_the_file_left_unchanged() {
    let db = temp_db();
    run_sql(
        &db.path,
        "CREATE TABLE workflow_state (id INTEGER PRIMARY KEY, step TEXT, payload BLOB);
             INSERT INTO workflow_state (step, payload) VALUES ('draft', x'00ff');",
    );
    let before = std::fs::read(&db.path).unwrap();
    let e = engine(&db.path);
    for request in [
        Request::LoadState { run_id: "r".into() },
        Request::SaveState {
            run_id: "r".into(),
            record: Box::new(record("p", "running", &utc_text(chrono::Duration::zero()))),
            expected_updated_at: None,
        },
    ] {
        let error = call(&e, request).unwrap_err();
        assert!(matches!(error, Error::NotFlujo { .. }), "{error:?}");
        assert!(error.to_string().contains("changed nothing"), "{error}");
    }
    e.close();
    assert_eq!(std::fs::read(&db.path).unwrap(), before);
    let (tables, _, mode) = tables_and_version(&db.path);
    assert_eq!(
        (tables, mode.as_str()),
        (vec!["workflow_state".to_string()], "delete")
    );
}

/// An engine that gives up on a lock after `lock_wait`, with one run saved, and another
/// connection holding the file's write lock.
fn engine_behind_a_lock(lock_wait: Duration) -> (TempDb, std::sync::Arc<SqliteEngine>, Connection) {
    let db = temp_db();
    let mut options = SqliteOptions::new(&db.path);
    options.lock_wait = lock_wait;
    let e = std::sync::Arc::new(SqliteEngine::start(options).unwrap());
    save(
        &e,
        "r1",
        record("p", "running", &utc_text(chrono::Duration::zero())),
    );
    let holder = Connection::open(&db.path).unwrap();
    holder.execute_batch("BEGIN EXCLUSIVE").unwrap();
    (db, e, holder)
}

#[test]
fn a_lock_held_too_long_gives_a_locked_error() {
    let (_db, e, holder) = engine_behind_a_lock(Duration::from_millis(300));
    let error = call(
        &e,
        Request::SaveState {
            run_id: "r2".into(),
            record: Box::new(record("p", "running", &utc_text(chrono::Duration::zero()))),
            expected_updated_at: None,
        },
    )
    .unwrap_err();
    assert!(matches!(error, Error::Locked { .. }), "{error:?}");
    holder.execute_batch("ROLLBACK").unwrap();
    save(
        &e,
        "r3",
        record("p", "running", &utc_text(chrono::Duration::zero())),
    );
}

/// Saves `run_id` on a thread of its own; joining it gives the outcome and how long it took.
fn save_on_a_thread(
    e: &std::sync::Arc<SqliteEngine>,
    run_id: &'static str,
) -> std::thread::JoinHandle<(Result<Response, Error>, Duration)> {
    let e = std::sync::Arc::clone(e);
    std::thread::spawn(move || {
        let started = std::time::Instant::now();
        let outcome = call(
            &e,
            Request::SaveState {
                run_id: run_id.into(),
                record: Box::new(record("p", "running", &utc_text(chrono::Duration::zero()))),
                expected_updated_at: None,
            },
        );
        (outcome, started.elapsed())
    })
}

/// `lock_wait` bounds each call from the moment it was made. A call queued behind another that
/// was waiting for the same lock used to start its own full wait only when that one gave up.
#[test]
fn a_call_queued_behind_one_waiting_for_a_lock_waits_lock_wait_in_all_not_twice() {
    let (_db, e, holder) = engine_behind_a_lock(Duration::from_secs(2));
    let timed_save = |run_id: &'static str| save_on_a_thread(&e, run_id);
    let first = timed_save("first");
    std::thread::sleep(Duration::from_millis(200));
    let second = timed_save("second").join().unwrap();
    let first = first.join().unwrap();
    holder.execute_batch("ROLLBACK").unwrap();

    for (outcome, took) in [&first, &second] {
        match outcome {
            Err(Error::Locked { waited, .. }) => {
                assert!(*waited >= Duration::from_secs(2), "{waited:?}");
                assert!(waited.as_secs_f64() <= took.as_secs_f64() + 0.01);
            }
            other => panic!("expected a lock error, got {other:?}"),
        }
    }
    // Queued behind the first's full 2 s, the second used to wait 2 s more (3.8 s in all);
    // bounding it by its own 2 s, the bound leaves 1.5 s for a busy machine's delays.
    assert!(
        second.1 < Duration::from_millis(3500),
        "the second call took {:?}",
        second.1
    );
}

#[test]
fn a_closed_engine_refuses_work_and_close_is_idempotent() {
    let db = temp_db();
    let e = engine(&db.path);
    save(
        &e,
        "r1",
        record("p", "running", &utc_text(chrono::Duration::zero())),
    );
    assert!(!e.is_closed());
    e.close();
    assert!(e.is_closed());
    e.close();
    assert!(matches!(
        call(&e, Request::WorkflowStats),
        Err(Error::Closed { .. })
    ));
}

#[test]
fn a_second_close_waits_for_the_queued_work_like_the_first() {
    let db = temp_db();
    let e = std::sync::Arc::new(engine(&db.path));
    let now = || record("p", "running", &utc_text(chrono::Duration::zero()));
    let save_request = |run_id: &str| Request::SaveState {
        run_id: run_id.into(),
        record: Box::new(now()),
        expected_updated_at: None,
    };
    save(&e, "warm", now());
    // The writer answers "held" and then waits in its completion, so "queued" stays queued.
    let (entered_tx, entered_rx) = mpsc::channel();
    let (gate_tx, gate_rx) = mpsc::channel::<()>();
    e.submit(
        save_request("held"),
        Completion::new(move |_| {
            entered_tx.send(()).unwrap();
            gate_rx.recv().unwrap();
        }),
    );
    entered_rx.recv().unwrap();
    let (queued_tx, queued_rx) = mpsc::channel();
    e.submit(
        save_request("queued"),
        // Ignored if a wrong second close already returned and dropped the receiver.
        Completion::new(move |outcome| {
            let _ = queued_tx.send(outcome);
        }),
    );
    let first = {
        let e = std::sync::Arc::clone(&e);
        std::thread::spawn(move || e.close())
    };
    while !matches!(call(&e, Request::WorkflowStats), Err(Error::Closed { .. })) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let second = {
        let e = std::sync::Arc::clone(&e);
        std::thread::spawn(move || {
            e.close();
            queued_rx.try_recv().is_ok_and(|outcome| outcome.is_ok())
        })
    };
    // Give a wrong second close the chance to return before the writer moves on (the verdict
    // does not depend on this wait, only how often a wrong close is caught).
    for _ in 0..500 {
        if second.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    gate_tx.send(()).unwrap();
    first.join().unwrap();
    assert!(
        second.join().unwrap(),
        "the second close returned before the queued save was committed"
    );
}

#[test]
fn a_conditional_save_fails_when_another_writer_got_there_first() {
    let db = temp_db();
    let e = engine(&db.path);
    let first = utc_text(chrono::Duration::hours(1));
    save(&e, "r1", record("p", "running", &first));
    let conditional = |expected: &str, status: &str| {
        call(
            &e,
            Request::SaveState {
                run_id: "r1".into(),
                record: Box::new(record("p", status, &utc_text(chrono::Duration::zero()))),
                expected_updated_at: Some(expected.into()),
            },
        )
    };
    // The first worker saw `first` and wins; the second, holding the same stale view, loses.
    conditional(&first, "paused").unwrap();
    let lost = conditional(&first, "failed").unwrap_err();
    assert!(matches!(lost, Error::Conflict { .. }), "{lost:?}");
    let Response::State(Some(state)) = call(
        &e,
        Request::LoadState {
            run_id: "r1".into(),
        },
    )
    .unwrap() else {
        panic!("missing")
    };
    assert_eq!(state.status, Cell::Text("paused".into()));
    // Flujo's spelling of the same instant is the same version.
    let Cell::Text(stored) = state.updated_at else {
        panic!()
    };
    conditional(&stored.replacen(' ', "T", 1), "completed").unwrap();
    call(
        &e,
        Request::DeleteState {
            run_id: "r1".into(),
        },
    )
    .unwrap();
    assert!(matches!(
        conditional(&stored, "failed"),
        Err(Error::Conflict { .. })
    ));
}

/// The stats' counts and their average duration run as two parts on two readers; with a single
/// reader both run on it one after the other, and either way the figures are the same.
#[test]
fn stats_add_up_with_one_reader_or_two() {
    for readers in [1, 2] {
        let db = temp_db();
        let mut options = SqliteOptions::new(&db.path);
        options.readers = readers;
        let e = SqliteEngine::start(options).unwrap();
        let now = utc_text(chrono::Duration::zero());
        for (i, (status, time)) in [
            ("completed", Some(1000)),
            ("completed", Some(3000)),
            ("failed", None),
        ]
        .into_iter()
        .enumerate()
        {
            let mut run = record("p", status, &now);
            run.execution_time_ms = time;
            save(&e, &format!("r{i}"), run);
        }
        let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
            panic!()
        };
        assert_eq!(stats.total_workflows, 3, "{readers} readers");
        assert_eq!(stats.status_counts.get("completed"), Some(&2));
        assert_eq!(stats.status_counts.get("failed"), Some(&1));
        assert_eq!(stats.recent_workflows_24h, 3);
        assert_eq!(stats.average_execution_time_ms, Some(2000.0));
    }
}

/// While saves keep landing, each answer's counts still come from one snapshot: the statuses
/// add up to the total, and the average is one of the durations' possible means.
#[test]
fn stats_taken_during_saves_agree_with_themselves() {
    let db = temp_db();
    let e = std::sync::Arc::new(engine(&db.path));
    let now = utc_text(chrono::Duration::zero());
    let saver = {
        let e = std::sync::Arc::clone(&e);
        let now = now.clone();
        std::thread::spawn(move || {
            for i in 0..2_000 {
                let status = ["running", "completed", "failed"][i % 3];
                let mut run = record("p", status, &now);
                run.execution_time_ms = Some(if i % 2 == 0 { 1000 } else { 3000 });
                save(&e, &format!("r{i}"), run);
            }
        })
    };
    let mut answers = 0;
    while !saver.is_finished() || answers == 0 {
        let Response::Stats(stats) = call(&e, Request::WorkflowStats).unwrap() else {
            panic!()
        };
        let counted: u64 = stats.status_counts.values().sum();
        assert_eq!(counted, stats.total_workflows, "{stats:?}");
        if let Some(average) = stats.average_execution_time_ms {
            assert!((1000.0..=3000.0).contains(&average), "{stats:?}");
        }
        answers += 1;
    }
    saver.join().unwrap();
    assert!(answers > 1, "stats never overlapped the saves");
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn stored_run_ids(path: &Path) -> Vec<String> {
    let conn = Connection::open(path).unwrap();
    let ids = conn
        .prepare("SELECT run_id FROM workflow_state ORDER BY run_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    ids
}

/// SQLite keeps writing to a renamed or deleted file through its open descriptor, so without a
/// check these writes were acknowledged and then found nowhere.
#[test]
fn writes_to_a_file_moved_or_deleted_while_open_are_refused_not_acknowledged() {
    for how in [
        "renamed with its sidecars",
        "deleted",
        "moved aside and replaced",
    ] {
        let db = temp_db();
        let e = engine(&db.path);
        let old = utc_text(chrono::Duration::days(90));
        save(&e, "before", record("p", "completed", &old));
        call(
            &e,
            Request::LoadState {
                run_id: "before".into(),
            },
        )
        .unwrap();
        let aside = db.path.with_file_name("wf.db.corrupt.1");
        match how {
            "renamed with its sidecars" => {
                for suffix in ["", "-wal", "-shm"] {
                    std::fs::rename(with_suffix(&db.path, suffix), with_suffix(&aside, suffix))
                        .unwrap();
                }
            }
            "deleted" => {
                for suffix in ["", "-wal", "-shm"] {
                    std::fs::remove_file(with_suffix(&db.path, suffix)).unwrap();
                }
            }
            _ => {
                // What Flujo's own backend does to a file it cannot open.
                std::fs::rename(&db.path, &aside).unwrap();
                run_sql(&db.path, "CREATE TABLE fresh (x)");
            }
        }

        let save_after = Request::SaveState {
            run_id: "after".into(),
            record: Box::new(record("p", "running", &utc_text(chrono::Duration::zero()))),
            expected_updated_at: None,
        };
        let error = call(&e, save_after).unwrap_err();
        assert!(
            matches!(error, Error::FileReplaced { .. }),
            "{how}: {error:?}"
        );
        assert!(error.to_string().contains("not stored"), "{error}");
        let cleanup = call(&e, cleanup_request(30.0));
        assert!(
            matches!(cleanup, Err(Error::FileReplaced { .. })),
            "{how}: {cleanup:?}"
        );
        for _ in 0..4 {
            // Whichever reader serves it, a load must not create a file at the path. A reader
            // that connects only now says why it cannot; one connected before reads on.
            let load = Request::LoadState {
                run_id: "before".into(),
            };
            match call(&e, load) {
                Ok(_) | Err(Error::FileReplaced { .. }) => {}
                Err(other) => panic!("{how}: a load after the move failed with {other:?}"),
            }
        }
        e.close();

        match how {
            "renamed with its sidecars" => {
                assert!(!db.path.exists(), "{how}: a file was created at the path");
                assert_eq!(stored_run_ids(&aside), ["before"], "{how}");
            }
            "deleted" => assert!(!db.path.exists(), "{how}: a file was created at the path"),
            _ => {
                let (tables, _, _) = tables_and_version(&db.path);
                assert_eq!(tables, ["fresh"], "{how}: the new file was written to");
            }
        }
    }
}

/// Batches a cleanup committed stay committed when a later one fails; the error says how many.
#[test]
fn a_cleanup_stopped_by_an_error_says_how_many_states_it_had_deleted() {
    let db = temp_db();
    let e = engine(&db.path);
    let old = utc_text(chrono::Duration::days(40));
    save_all(
        &e,
        (0..2500).map(|i| (format!("r{i}"), record("p", "completed", &old))),
    );
    // Old, but the newest of the old ones, so that a later batch than the first meets it.
    save(
        &e,
        "poison",
        record("p", "completed", &utc_text(chrono::Duration::days(31))),
    );
    run_sql(
        &db.path,
        "CREATE TRIGGER refuse BEFORE DELETE ON workflow_state WHEN old.run_id = 'poison' \
             BEGIN SELECT RAISE(ABORT, 'this one stays'); END;",
    );

    let error = call(&e, cleanup_request(30.0)).unwrap_err();
    let Error::Interrupted { cause, .. } = &error else {
        panic!("expected the deleted count with the error, got {error:?}")
    };
    assert!(cause.to_string().contains("this one stays"), "{cause}");
    let remaining = stored_run_ids(&db.path).len();
    let deleted = 2501 - remaining;
    assert!(deleted > 0 && remaining > 1, "deleted {deleted}");
    assert!(
        error
            .to_string()
            .contains(&format!("had deleted {deleted} old states")),
        "{error}"
    );
}

/// The same while the file is being prepared: jobs that land in one batch behind a caller that
/// gave up each wait for their own `lock_wait`, not the oldest one's.
#[test]
fn jobs_batched_while_the_file_cannot_be_prepared_each_wait_their_own_lock_wait() {
    let db = temp_db();
    let holder = Connection::open(&db.path).unwrap();
    holder
        .execute_batch(
            "CREATE TABLE unrelated (x); BEGIN EXCLUSIVE; INSERT INTO unrelated VALUES (1);",
        )
        .unwrap();
    let mut options = SqliteOptions::new(&db.path);
    options.lock_wait = Duration::from_secs(1);
    let e = std::sync::Arc::new(SqliteEngine::start(options).unwrap());
    let timed_save = |run_id: &'static str| save_on_a_thread(&e, run_id);
    let first = timed_save("first");
    std::thread::sleep(Duration::from_millis(500));
    let second = timed_save("second");
    std::thread::sleep(Duration::from_millis(450));
    let third = timed_save("third");
    let results = [first, second, third].map(|t| t.join().unwrap());
    holder.execute_batch("ROLLBACK").unwrap();

    for (outcome, took) in &results {
        match outcome {
            Err(Error::Locked { waited, .. }) => {
                assert!(*waited >= Duration::from_secs(1), "reported {waited:?}");
                // The third used to fail with the second, after ~0.55 s of its own.
                assert!(*took >= Duration::from_millis(950), "failed after {took:?}");
            }
            other => panic!("expected a lock error, got {other:?}"),
        }
    }
}

/// Column names are case-insensitive in SQLite: a `RUN_ID` column is Flujo's `run_id`.
#[test]
fn a_run_id_column_spelled_in_capitals_is_still_flujos() {
    let db = temp_db();
    run_sql(
        &db.path,
        "CREATE TABLE workflow_state (RUN_ID TEXT PRIMARY KEY)",
    );
    let e = engine(&db.path);
    save(
        &e,
        "r",
        record("p", "running", &utc_text(chrono::Duration::zero())),
    );
    e.close();
    assert_eq!(stored_run_ids(&db.path), ["r"]);
}

fn age_hours(amount: f64) -> Age {
    Age::hours(amount, "hours_back").unwrap()
}

fn age_days(amount: f64) -> Age {
    Age::days(amount, "days_old").unwrap()
}

fn cleanup_request(days_old: f64) -> Request {
    Request::CleanupOldWorkflows {
        days_old: age_days(days_old),
    }
}

/// Warnings logged by any engine of this test binary.
static WARNINGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

struct CaptureWarnings;

impl log::Log for CaptureWarnings {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            WARNINGS.lock().unwrap().push(record.args().to_string());
        }
    }

    fn flush(&self) {}
}

#[test]
fn a_wal_that_a_reader_keeps_from_being_copied_back_is_warned_about() {
    if log::set_logger(&CaptureWarnings).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    let db = temp_db();
    let mut options = SqliteOptions::new(&db.path);
    options.durability = Durability::Normal;
    let e = SqliteEngine::start(options).unwrap();
    let now = utc_text(chrono::Duration::zero());
    save(&e, "first", record("p", "running", &now));
    let reader = Connection::open(&db.path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM workflow_state", [], |r| r.get(0))
        .unwrap();
    let warned = || {
        WARNINGS
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.contains("has grown to") && w.contains(&*db.path.to_string_lossy()))
            .count()
    };
    let mut saved = 0;
    while warned() == 0 {
        save(&e, &format!("r{saved}"), record("p", "running", &now));
        saved += 1;
        assert!(saved < 20_000, "no warning after {saved} saves");
    }
    let wal = std::fs::metadata(format!("{}-wal", db.path.display()))
        .unwrap()
        .len();
    assert!(wal >= 128 << 20, "warned at {wal} bytes");
    reader.execute_batch("COMMIT").unwrap();
}

/// A program that moves the database aside while a backend has it open (Flujo's backend does,
/// taking it for corrupt) takes the file without its -wal: writes must reach the file itself
/// once writes pause, or the acknowledged ones would be in neither file.
#[test]
fn writes_reach_the_database_file_itself_once_writes_pause() {
    let db = temp_db();
    let e = engine(&db.path);
    let now = utc_text(chrono::Duration::zero());
    save(&e, "r1", record("p", "running", &now));
    assert!(soon_in_the_file_alone(&db.path, "r1"));

    // A reader whose snapshot predates a save keeps that save from being copied at first...
    let reader = Connection::open(&db.path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM workflow_state", [], |r| r.get(0))
        .unwrap();
    save(&e, "r2", record("p", "running", &now));
    std::thread::sleep(Duration::from_millis(1500));
    // ...and once it is done the copy is tried again.
    reader.execute_batch("COMMIT").unwrap();
    assert!(soon_in_the_file_alone(&db.path, "r2"));

    // Saves made while a cleanup's own checkpoint runs are copied once it is done.
    let old = utc_text(chrono::Duration::days(40));
    save_all(
        &e,
        (0..5000).map(|i| (format!("old{i}"), record("p", "completed", &old))),
    );
    assert_eq!(
        call(&e, cleanup_request(30.0)).unwrap(),
        Response::Count(5000)
    );
    save(&e, "r3", record("p", "running", &now));
    assert!(soon_in_the_file_alone(&db.path, "r3"));
}

/// Whether `run_id` is found, within 10 s, in a copy of the database file taken without its
/// -wal (what a program moving the file aside takes).
fn soon_in_the_file_alone(path: &Path, run_id: &str) -> bool {
    let alone = path.with_extension("alone.db");
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::copy(path, &alone).unwrap();
        let found = Connection::open(&alone).and_then(|conn| {
            conn.query_row(
                "SELECT count(*) FROM workflow_state WHERE run_id = ?1",
                [run_id],
                |r| r.get::<_, i64>(0),
            )
        });
        // Before a first copy the file holds no table at all; a copy taken mid-checkpoint may
        // be torn: both are "not yet".
        if matches!(found, Ok(1)) {
            return true;
        }
    }
    false
}

/// New files get 2 KB pages (see `schema::NEW_FILE_PAGE_SIZE`); a file that has pages keeps its
/// page size, which only a VACUUM could change.
#[test]
fn new_files_get_small_pages_and_existing_files_keep_theirs() {
    let page_size = |path: &Path| -> i64 {
        Connection::open(path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .unwrap()
    };
    let now = utc_text(chrono::Duration::zero());
    let new = temp_db();
    let e = engine(&new.path);
    save(&e, "r", record("p", "running", &now));
    e.close();
    assert_eq!(page_size(&new.path), 2048);

    let existing = temp_db();
    Connection::open(&existing.path)
        .unwrap()
        .execute_batch("PRAGMA page_size = 4096; CREATE TABLE other (x)")
        .unwrap();
    let e = engine(&existing.path);
    save(&e, "r", record("p", "running", &now));
    e.close();
    assert_eq!(page_size(&existing.path), 4096);
}
