//! `cargo bench`: the core's hot paths from plain Rust threads (no Python), each next to SQLite's
//! own floor, a bare rusqlite loop doing the same work on the same table layout.
//!
//! Every group holds a `floor/...` and an `engine/...` member measuring the same operation, so
//! criterion prints them side by side and the ratio engine/floor is the core's overhead (channels,
//! thread hand-offs, savepoints for writes that share a transaction, row mapping). Throughput is in operations (saves, loads, queries).
//!
//! * `save_sequential/{floor,engine}/{full,normal}`: one new run per transaction, back to back. The
//!   floor is `BEGIN IMMEDIATE; INSERT .. ON CONFLICT DO UPDATE; COMMIT`; the engine is one
//!   `SaveState` submitted and its completion awaited through a std channel before the next.
//! * `save_64_in_flight/{floor,engine}/{full,normal}`: 64 runs re-saved per round. The floor
//!   upserts the 64 rows in one transaction; the engine gets 64 `SaveState` submitted at once and
//!   all 64 completions awaited (its writer commits what is queued together: group commit).
//! * `load_sequential`: a full row by `run_id`, random runs of the N-run file, one at a time.
//! * `load_64_in_flight`: 64 loads submitted at once, all awaited (the engine's 2 reader threads
//!   serve them); the floor is the same 64 point reads on one connection.
//! * `list_failed_50`: `list_workflows(status='failed', limit=50)`: the newest 50 failed runs
//!   without their JSON payloads, through the engine's `(status, created_at)` index.
//! * `workflow_stats`: the five statements behind `get_workflow_stats` on the N-run file.
//!
//! Write groups start from a fresh file each; read groups share one N-run file (default 100,000
//! runs, `FLUJO_SQLITE_BENCH_ROWS` to change) built once per run: the engine creates the file's
//! tables and indexes, then rusqlite bulk-inserts the runs in one transaction and the engine is
//! reopened on it. Files go to a temporary folder under `FLUJO_SQLITE_BENCH_DIR`, else the system
//! temp dir; it must be a real disk (not tmpfs) or fsync costs nothing. States are ~2 KB JSON
//! contexts (user, ticket, retrieval hits, plan, metrics) with step history, as `benchmarks/bench.py`.

use std::cell::OnceCell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chrono::Utc;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use flujo_sqlite::engine::{Completion, Durability, Request, Response, StateEngine};
use flujo_sqlite::model::{BackgroundFields, StateRecord, WorkflowQuery};
use flujo_sqlite::sqlite::{SqliteEngine, SqliteOptions};
use rusqlite::types::Value;
use rusqlite::{params, Connection};

type Measured<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;
type Outcome = flujo_sqlite::error::Result<Response>;

const IN_FLIGHT: usize = 64;
/// Distinct pre-built states that saves cycle through.
const STATE_POOL: usize = 256;

const COLUMNS: &str = "run_id, pipeline_id, pipeline_name, pipeline_version, \
     current_step_index, pipeline_context, last_step_output, step_history, status, created_at, \
     updated_at, total_steps, error_message, execution_time_ms, memory_usage_mb, metadata, \
     is_background_task, parent_run_id, task_id, background_error";

/// The engine's upsert, written out by hand (the floor must not call into the crate).
const UPSERT: &str = "INSERT INTO workflow_state (run_id, pipeline_id, \
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

const LOAD: &str = "SELECT run_id, pipeline_id, pipeline_name, pipeline_version, \
     current_step_index, pipeline_context, last_step_output, step_history, status, created_at, \
     updated_at, total_steps, error_message, execution_time_ms, memory_usage_mb, metadata, \
     is_background_task, parent_run_id, task_id, background_error \
     FROM workflow_state WHERE run_id = ?1";

const LIST_FAILED: &str = "SELECT run_id, pipeline_id, pipeline_name, pipeline_version, \
     current_step_index, status, created_at, updated_at, total_steps, error_message, \
     execution_time_ms, memory_usage_mb, metadata, is_background_task, parent_run_id, task_id, \
     background_error FROM workflow_state WHERE status = ?1 \
     ORDER BY created_at DESC, rowid DESC LIMIT ?2";

const STATUSES: [(&str, u64); 5] = [
    ("completed", 70),
    ("failed", 12),
    ("running", 8),
    ("paused", 5),
    ("cancelled", 5),
];

fn main() {
    let full_run = std::env::args().any(|a| a == "--bench");
    let rows = std::env::var("FLUJO_SQLITE_BENCH_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        // `cargo test --benches` runs each benchmark once: a small file is enough there.
        .unwrap_or(if full_run { 100_000 } else { 2_000 });
    let base = std::env::var_os("FLUJO_SQLITE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::Builder::new()
        .prefix("flujo-sqlite-bench-")
        .tempdir_in(&base)
        .expect("cannot create the benchmark folder");
    let bench = Bench {
        dir: dir.path().to_owned(),
        rows,
        states: StatePool::new(),
        big: OnceCell::new(),
    };
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .nresamples(10_000)
        .configure_from_args();
    save_sequential(&mut c, &bench);
    save_in_flight(&mut c, &bench);
    load_sequential(&mut c, &bench);
    load_in_flight(&mut c, &bench);
    list_failed(&mut c, &bench);
    workflow_stats(&mut c, &bench);
    c.final_summary();
}

struct Bench {
    dir: PathBuf,
    rows: usize,
    states: StatePool,
    big: OnceCell<BigFile>,
}

/// The N-run file, with an engine and a floor connection open on it.
struct BigFile {
    run_ids: Vec<String>,
    /// Runs with status 'failed'.
    failed: usize,
    engine: SqliteEngine,
    conn: Connection,
}

impl Bench {
    /// A brand-new file with the engine's tables and indexes (the floor writes the same layout).
    fn fresh_file(&self, name: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.db"));
        let engine = SqliteEngine::start(SqliteOptions::new(&path)).unwrap();
        // The first request prepares the file; a load writes nothing else.
        let loaded = call(&engine, load("absent"));
        assert!(matches!(loaded, Response::State(None)), "{loaded:?}");
        engine.close();
        path
    }

    fn big(&self) -> &BigFile {
        self.big.get_or_init(|| {
            let started = Instant::now();
            let path = self.fresh_file("runs");
            let (run_ids, failed) = build_runs(&path, self.rows);
            let engine = SqliteEngine::start(SqliteOptions::new(&path)).unwrap();
            let conn = floor_connection(&path, Durability::Full);
            let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "built a {}-run file ({} MB) in {:.1?}",
                self.rows,
                bytes / 1_000_000,
                started.elapsed()
            );
            BigFile {
                run_ids,
                failed,
                engine,
                conn,
            }
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The groups

fn save_sequential(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("save_sequential");
    fsync_bound(&mut group);
    group.throughput(Throughput::Elements(1));
    for (mode, durability) in [("full", Durability::Full), ("normal", Durability::Normal)] {
        let conn = floor_connection(&bench.fresh_file(&format!("seq-floor-{mode}")), durability);
        let mut next = 0usize;
        group.bench_function(format!("floor/{mode}"), |b| {
            b.iter_custom(|iters| {
                let batch = bench.states.new_runs(&mut next, iters as usize);
                let started = Instant::now();
                for (run_id, record) in &batch {
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    floor_upsert(&conn, run_id, record);
                    conn.execute_batch("COMMIT").unwrap();
                }
                started.elapsed()
            })
        });
        drop(conn);

        let engine = engine_on(&bench.fresh_file(&format!("seq-engine-{mode}")), durability);
        let (tx, rx) = mpsc::channel();
        let mut next = 0usize;
        group.bench_function(format!("engine/{mode}"), |b| {
            b.iter_custom(|iters| {
                let batch = bench.states.new_runs(&mut next, iters as usize);
                let started = Instant::now();
                for (run_id, record) in batch {
                    submit(&engine, save(run_id, record), &tx);
                    expect_done(rx.recv().unwrap());
                }
                started.elapsed()
            })
        });
        engine.close();
    }
    group.finish();
}

fn save_in_flight(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("save_64_in_flight");
    fsync_bound(&mut group);
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    let run_ids: Vec<String> = (0..IN_FLIGHT).map(|i| format!("task-{i:02}")).collect();
    for (mode, durability) in [("full", Durability::Full), ("normal", Durability::Normal)] {
        let conn = floor_connection(&bench.fresh_file(&format!("64-floor-{mode}")), durability);
        let mut round = 0usize;
        group.bench_function(format!("floor/{mode}"), |b| {
            b.iter_custom(|iters| {
                let rounds = bench.states.rounds(&run_ids, &mut round, iters as usize);
                let started = Instant::now();
                for batch in &rounds {
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    for (run_id, record) in batch {
                        floor_upsert(&conn, run_id, record);
                    }
                    conn.execute_batch("COMMIT").unwrap();
                }
                started.elapsed()
            })
        });
        drop(conn);

        let engine = engine_on(&bench.fresh_file(&format!("64-engine-{mode}")), durability);
        let (tx, rx) = mpsc::channel();
        let mut round = 0usize;
        group.bench_function(format!("engine/{mode}"), |b| {
            b.iter_custom(|iters| {
                let rounds = bench.states.rounds(&run_ids, &mut round, iters as usize);
                let started = Instant::now();
                for batch in rounds {
                    for (run_id, record) in batch {
                        submit(&engine, save(run_id, record), &tx);
                    }
                    for _ in 0..IN_FLIGHT {
                        expect_done(rx.recv().unwrap());
                    }
                }
                started.elapsed()
            })
        });
        engine.close();
    }
    group.finish();
}

fn load_sequential(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("load_sequential");
    cpu_bound(&mut group);
    group.throughput(Throughput::Elements(1));
    let mut picks = Rng(7);
    group.bench_function("floor", |b| {
        let big = bench.big();
        b.iter_custom(|iters| {
            let ids = big.pick(&mut picks, iters as usize);
            let started = Instant::now();
            for run_id in ids {
                black_box(floor_load(&big.conn, run_id));
            }
            started.elapsed()
        })
    });
    let (tx, rx) = mpsc::channel();
    group.bench_function("engine", |b| {
        let big = bench.big();
        b.iter_custom(|iters| {
            let ids = big.pick(&mut picks, iters as usize);
            let started = Instant::now();
            for run_id in ids {
                submit(&big.engine, load(run_id), &tx);
                black_box(expect_state(rx.recv().unwrap()));
            }
            started.elapsed()
        })
    });
    group.finish();
}

fn load_in_flight(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("load_64_in_flight");
    cpu_bound(&mut group);
    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    let mut picks = Rng(11);
    group.bench_function("floor", |b| {
        let big = bench.big();
        b.iter_custom(|iters| {
            let ids = big.pick(&mut picks, iters as usize * IN_FLIGHT);
            let started = Instant::now();
            for round in ids.chunks(IN_FLIGHT) {
                for run_id in round {
                    black_box(floor_load(&big.conn, run_id));
                }
            }
            started.elapsed()
        })
    });
    let (tx, rx) = mpsc::channel();
    group.bench_function("engine", |b| {
        let big = bench.big();
        b.iter_custom(|iters| {
            let ids = big.pick(&mut picks, iters as usize * IN_FLIGHT);
            let started = Instant::now();
            for round in ids.chunks(IN_FLIGHT) {
                for run_id in round {
                    submit(&big.engine, load(run_id), &tx);
                }
                for _ in 0..round.len() {
                    black_box(expect_state(rx.recv().unwrap()));
                }
            }
            started.elapsed()
        })
    });
    group.finish();
}

fn list_failed(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("list_failed_50");
    cpu_bound(&mut group);
    group.throughput(Throughput::Elements(1));
    group.bench_function("floor", |b| {
        let big = bench.big();
        b.iter(|| {
            let mut stmt = big.conn.prepare_cached(LIST_FAILED).unwrap();
            let rows: Vec<Vec<Value>> = stmt
                .query_map(params!["failed", 50], |row| owned_row(row, 17))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(rows.len(), 50.min(big.failed));
            rows
        })
    });
    let (tx, rx) = mpsc::channel();
    group.bench_function("engine", |b| {
        let big = bench.big();
        b.iter(|| {
            let query = WorkflowQuery {
                status: Some("failed".into()),
                limit: Some(50),
                ..WorkflowQuery::default()
            };
            submit(&big.engine, Request::ListWorkflows(query), &tx);
            match rx.recv().unwrap() {
                Ok(Response::Workflows(items)) => {
                    assert_eq!(items.len(), 50.min(big.failed));
                    items
                }
                other => panic!("list_workflows: {other:?}"),
            }
        })
    });
    group.finish();
}

fn workflow_stats(c: &mut Criterion, bench: &Bench) {
    let mut group = c.benchmark_group("workflow_stats");
    cpu_bound(&mut group);
    group.throughput(Throughput::Elements(1));
    group.bench_function("floor", |b| {
        let big = bench.big();
        b.iter(|| floor_stats(&big.conn))
    });
    let (tx, rx) = mpsc::channel();
    group.bench_function("engine", |b| {
        let big = bench.big();
        b.iter(|| {
            submit(&big.engine, Request::WorkflowStats, &tx);
            match rx.recv().unwrap() {
                Ok(Response::Stats(stats)) => {
                    assert_eq!(stats.total_workflows, big.run_ids.len() as u64);
                    stats
                }
                other => panic!("workflow_stats: {other:?}"),
            }
        })
    });
    group.finish();
}

/// Commits wait on the disk, whose fsync rate swings: every sample runs the same count.
fn fsync_bound(group: &mut Measured<'_>) {
    group
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(5));
}

fn cpu_bound(group: &mut Measured<'_>) {
    group.measurement_time(Duration::from_secs(3));
}

// ---------------------------------------------------------------------------------------------
// The floor: bare rusqlite with the engine's WAL, `synchronous`, busy timeout and foreign keys
// (SQLite's default cache and checkpoint interval: the floor is what SQLite does untuned)

fn floor_connection(path: &Path, durability: Durability) -> Connection {
    let conn = Connection::open(path).unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let synchronous = match durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)
        .unwrap();
    conn.pragma_update(None, "foreign_keys", "ON").unwrap();
    conn
}

fn floor_upsert(conn: &Connection, run_id: &str, r: &StateRecord) {
    let b = &r.background;
    conn.prepare_cached(UPSERT)
        .unwrap()
        .execute(params![
            run_id,
            r.pipeline_id,
            r.pipeline_name,
            r.pipeline_version,
            r.current_step_index,
            r.pipeline_context,
            r.last_step_output,
            r.step_history,
            r.status,
            r.created_at,
            r.updated_at,
            r.total_steps,
            r.error_message,
            r.execution_time_ms,
            r.memory_usage_mb,
            b.metadata,
            b.is_background_task,
            b.parent_run_id,
            b.task_id,
            b.background_error,
        ])
        .unwrap();
}

/// The full row, copied out of SQLite as owned values (what any caller must do with it).
fn floor_load(conn: &Connection, run_id: &str) -> Vec<Value> {
    conn.prepare_cached(LOAD)
        .unwrap()
        .query_row([run_id], |row| owned_row(row, 20))
        .unwrap()
}

fn owned_row(row: &rusqlite::Row<'_>, columns: usize) -> rusqlite::Result<Vec<Value>> {
    (0..columns).map(|i| row.get::<_, Value>(i)).collect()
}

/// The plain statements a careful hand would write for `get_workflow_stats`, on the engine's
/// indexes (the engine counts statuses differently, see `queries::counts_of_every_status`).
fn floor_stats(conn: &Connection) -> (i64, Vec<(String, i64)>, i64, Option<f64>, usize) {
    // The engine's 24 h window: a text range one day wide of slack, then exact instants.
    let cutoff = Utc::now() - chrono::Duration::hours(24);
    let total: i64 = conn
        .prepare_cached("SELECT count(*) FROM workflow_state")
        .unwrap()
        .query_row([], |r| r.get(0))
        .unwrap();
    let by_status = |sql: &str| -> Vec<(String, i64)> {
        conn.prepare_cached(sql)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let counts = by_status(
        "SELECT status, count(*) FROM workflow_state WHERE status IS NOT NULL GROUP BY status",
    );
    let recent: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM workflow_state WHERE created_at >= ?1 \
             AND julianday(created_at) >= julianday(?2)",
        )
        .unwrap()
        .query_row(
            params![
                (cutoff - chrono::Duration::days(1))
                    .format("%Y-%m-%d")
                    .to_string(),
                cutoff.format("%Y-%m-%d %H:%M:%S%.6f").to_string()
            ],
            |r| r.get(0),
        )
        .unwrap();
    let average: Option<f64> = conn
        .prepare_cached(
            "SELECT avg(execution_time_ms) FROM workflow_state \
             WHERE execution_time_ms IS NOT NULL",
        )
        .unwrap()
        .query_row([], |r| r.get(0))
        .unwrap();
    let background = by_status(
        "SELECT status, count(*) FROM workflow_state \
         WHERE is_background_task = 1 AND status IS NOT NULL GROUP BY status",
    );
    (total, counts, recent, average, background.len())
}

// ---------------------------------------------------------------------------------------------
// The engine, driven from plain Rust threads

fn engine_on(path: &Path, durability: Durability) -> SqliteEngine {
    let mut options = SqliteOptions::new(path);
    options.durability = durability;
    SqliteEngine::start(options).unwrap()
}

fn submit(engine: &SqliteEngine, request: Request, tx: &mpsc::Sender<Outcome>) {
    let tx = tx.clone();
    engine.submit(
        request,
        Completion::new(move |outcome| {
            let _ = tx.send(outcome);
        }),
    );
}

fn call(engine: &SqliteEngine, request: Request) -> Response {
    let (tx, rx) = mpsc::channel();
    submit(engine, request, &tx);
    rx.recv().unwrap().unwrap()
}

fn save(run_id: String, record: StateRecord) -> Request {
    Request::SaveState {
        run_id,
        record: Box::new(record),
        expected_updated_at: None,
    }
}

fn load(run_id: &str) -> Request {
    Request::LoadState {
        run_id: run_id.into(),
    }
}

fn expect_done(outcome: Outcome) {
    match outcome {
        Ok(Response::Done) => {}
        other => panic!("save_state: {other:?}"),
    }
}

fn expect_state(outcome: Outcome) -> Response {
    match outcome {
        Ok(state @ Response::State(Some(_))) => state,
        other => panic!("load_state: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// The data

/// splitmix64: deterministic, dependency-free.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn hex(&mut self) -> String {
        format!("{:016x}{:016x}", self.next(), self.next())
    }

    fn words(&mut self, count: usize) -> String {
        #[rustfmt::skip]
        const WORDS: [&str; 24] = [
            "invoice", "refund", "customer", "shipment", "delayed", "account", "password",
            "reset", "billing", "error", "upgrade", "plan", "support", "order", "tracking",
            "warehouse", "payment", "declined", "subscription", "renewal", "discount", "policy",
            "escalate", "priority",
        ];
        let mut out = String::new();
        for i in 0..count {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(WORDS[self.below(WORDS.len() as u64) as usize]);
        }
        out
    }
}

impl BigFile {
    fn pick<'a>(&'a self, rng: &mut Rng, count: usize) -> Vec<&'a str> {
        (0..count)
            .map(|_| self.run_ids[rng.below(self.run_ids.len() as u64) as usize].as_str())
            .collect()
    }
}

/// A nested JSON context of about 2 KB, like a support-bot pipeline's.
fn context(rng: &mut Rng, seq: usize) -> String {
    let hits: Vec<String> = (0..4)
        .map(|_| {
            format!(
                r#"{{"doc_id":"kb-{:06}","score":{:.4},"title":"{}","snippet":"{}"}}"#,
                rng.below(1_000_000),
                rng.unit(),
                rng.words(4),
                rng.words(22),
            )
        })
        .collect();
    format!(
        concat!(
            r#"{{"user":{{"id":"u-{}","name":"Customer {}","email":"customer{}@example.com","#,
            r#""tier":"{}","locale":"en-US"}},"ticket":{{"id":"T-{}","subject":"{}","body":"{}","#,
            r#""priority":"{}","tags":["{}","{}"]}},"retrieval":[{}],"plan":["classify","retrieve","#,
            r#""draft","review","send"],"attempt":{},"metrics":{{"tokens_in":{},"tokens_out":{},"#,
            r#""latency_ms":{},"cost_usd":{:.5}}}}}"#
        ),
        rng.below(100_000),
        seq,
        seq,
        ["free", "pro", "enterprise"][rng.below(3) as usize],
        rng.below(10_000_000),
        rng.words(6),
        rng.words(60),
        ["low", "normal", "high"][rng.below(3) as usize],
        rng.words(1),
        rng.words(1),
        hits.join(","),
        seq % 3,
        rng.below(4000),
        rng.below(800),
        rng.below(5000),
        rng.unit() / 10.0,
    )
}

fn step_history(rng: &mut Rng, steps: usize) -> String {
    let names = ["classify", "retrieve", "draft", "review"];
    let records: Vec<String> = names[..steps]
        .iter()
        .map(|name| {
            format!(
                r#"{{"name":"{name}","output":{{"text":"{}"}},"success":true,"attempts":1,"latency_s":{:.3},"token_counts":{},"cost_usd":{:.5},"feedback":null}}"#,
                rng.words(8),
                rng.unit() * 2.0,
                rng.below(900),
                rng.unit() / 100.0,
            )
        })
        .collect();
    format!("[{}]", records.join(","))
}

fn stored_time(t: chrono::DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S%.6f+00:00").to_string()
}

fn record(rng: &mut Rng, seq: usize, created: chrono::DateTime<Utc>, status: &str) -> StateRecord {
    // Zipf-like popularity over 20 pipelines.
    let pipeline = {
        let weights: u64 = (1..=20).map(|k| 2520 / k).sum();
        let mut pick = rng.below(weights);
        let mut k = 1;
        while pick >= 2520 / k {
            pick -= 2520 / k;
            k += 1;
        }
        k
    };
    let steps = 1 + rng.below(4) as usize;
    let updated = created + chrono::Duration::seconds(rng.below(1800) as i64);
    StateRecord {
        pipeline_id: format!("pipeline-{pipeline:02}"),
        pipeline_name: format!("Support pipeline {pipeline}"),
        pipeline_version: "1.4.2".into(),
        current_step_index: steps as i64,
        pipeline_context: context(rng, seq),
        last_step_output: Some(format!(
            r#"{{"answer":"{}","confidence":{:.3}}}"#,
            rng.words(10),
            rng.unit()
        )),
        step_history: Some(step_history(rng, steps)),
        status: status.into(),
        created_at: stored_time(created),
        updated_at: stored_time(updated),
        total_steps: 5,
        error_message: (status == "failed").then(|| format!("ToolError: {}", rng.words(6))),
        execution_time_ms: Some(rng.below(120_000) as i64),
        memory_usage_mb: Some(40.0 + rng.unit() * 200.0),
        background: BackgroundFields::default(),
    }
}

/// Pre-built states that saves cycle through, so the timed loops only save.
struct StatePool {
    states: Vec<StateRecord>,
}

impl StatePool {
    fn new() -> Self {
        let mut rng = Rng(42);
        let now = Utc::now();
        let states: Vec<StateRecord> = (0..STATE_POOL)
            .map(|seq| record(&mut rng, seq, now, "running"))
            .collect();
        let average = states
            .iter()
            .map(|s| s.pipeline_context.len())
            .sum::<usize>()
            / STATE_POOL;
        eprintln!("states: pipeline_context averages {average} bytes");
        StatePool { states }
    }

    /// `count` saves of new runs, numbered on from `next`.
    fn new_runs(&self, next: &mut usize, count: usize) -> Vec<(String, StateRecord)> {
        (0..count)
            .map(|_| {
                *next += 1;
                let record = self.states[*next % STATE_POOL].clone();
                (format!("run-{:09}", *next), record)
            })
            .collect()
    }

    /// `count` rounds re-saving each of `run_ids` (the step index and context move on each round).
    fn rounds(
        &self,
        run_ids: &[String],
        round: &mut usize,
        count: usize,
    ) -> Vec<Vec<(String, StateRecord)>> {
        let now = stored_time(Utc::now());
        (0..count)
            .map(|_| {
                *round += 1;
                run_ids
                    .iter()
                    .enumerate()
                    .map(|(i, run_id)| {
                        let mut record = self.states[(*round + i) % STATE_POOL].clone();
                        record.current_step_index = (*round % 5) as i64;
                        record.updated_at.clone_from(&now);
                        (run_id.clone(), record)
                    })
                    .collect()
            })
            .collect()
    }
}

/// Bulk-inserts `rows` runs, oldest first, into a file the engine has laid out; returns their ids.
fn build_runs(path: &Path, rows: usize) -> (Vec<String>, usize) {
    let mut rng = Rng(1234);
    let now = Utc::now();
    let span = 60 * 86_400;
    let mut conn = Connection::open(path).unwrap();
    conn.pragma_update(None, "synchronous", "OFF").unwrap();
    conn.pragma_update(None, "cache_size", -512_000).unwrap();
    let tx = conn.transaction().unwrap();
    let mut run_ids = Vec::with_capacity(rows);
    let mut failed = 0;
    {
        let mut insert = tx
            .prepare(&format!(
                "INSERT INTO workflow_state ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, \
                 ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)"
            ))
            .unwrap();
        for i in 0..rows {
            // Uniform over the last 60 days, oldest first.
            let age = span - (span * i as i64) / rows.max(1) as i64 - rng.below(60) as i64;
            let created = now - chrono::Duration::seconds(age.max(0));
            let status = {
                let mut pick = rng.below(100);
                let mut chosen = STATUSES[0].0;
                for (status, share) in STATUSES {
                    if pick < share {
                        chosen = status;
                        break;
                    }
                    pick -= share;
                }
                chosen
            };
            let r = record(&mut rng, i, created, status);
            failed += usize::from(status == "failed");
            let run_id = rng.hex();
            let b = &r.background;
            insert
                .execute(params![
                    run_id,
                    r.pipeline_id,
                    r.pipeline_name,
                    r.pipeline_version,
                    r.current_step_index,
                    r.pipeline_context,
                    r.last_step_output,
                    r.step_history,
                    r.status,
                    r.created_at,
                    r.updated_at,
                    r.total_steps,
                    r.error_message,
                    r.execution_time_ms,
                    r.memory_usage_mb,
                    b.metadata,
                    b.is_background_task,
                    b.parent_run_id,
                    b.task_id,
                    b.background_error,
                ])
                .unwrap();
            run_ids.push(run_id);
        }
    }
    tx.commit().unwrap();
    conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)")
        .unwrap();
    (run_ids, failed)
}
