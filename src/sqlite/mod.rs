//! The SQLite storage engine: one writer thread that commits queued writes together, and a
//! small pool of reader threads with their own connections (WAL lets them run during writes).
//! No thread here ever touches Python.

mod connection;
mod open_files;
mod options;
mod queries;
#[cfg(test)]
mod query_plans;
mod readers;
mod recovery;
mod run_history;
mod schema;
mod spin;
mod stats;
mod system;
mod traces;
mod writer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use rusqlite::Connection;

pub use options::SqliteOptions;
pub use recovery::{recover, RecoveryReport, TableRecovery};

use crate::engine::{Completion, Durability, Request, Response, StateEngine};
use crate::error::{Error, Result};
use connection::{classify, FileIdentity, Role};
use readers::ReadJob;
use schema::Layout;

pub(crate) struct Job {
    request: Request,
    done: Completion,
    /// When the caller made the call; its wait for a lock counts from here.
    submitted: Instant,
}

/// How often an engine thread holding a connection, idle, looks whether the path still names
/// its file. Moved aside (Flujo's backend does that to a file it cannot open), deleted or
/// replaced, the file must be let go of at once: while any connection of ours keeps the `-shm`
/// at the path open, a process opening a new file there trusts our index of our WAL in it, and
/// its saves are acknowledged and then lost (Flujo's backend fails with "disk I/O error" and
/// moves its new file aside again). Closing is safe: SQLite skips the checkpoint and the
/// `-wal` deletion it makes at a last close when the file has moved.
pub(super) const LOOK_FOR_A_MOVED_FILE_EVERY: Duration = Duration::from_millis(250);

/// How long a caller waits on the event loop's thread for a lone point read: a reader answers
/// one in ~10-30 us, and parking the loop and waking it through its socket costs about as
/// much again.
const QUICK_READ_WAIT: Duration = Duration::from_micros(50);

/// The same for a lone write when commits skip the fsync (`Durability::Normal`): those take
/// ~40-80 us, and one that finds a checkpoint due or another write queued takes longer, when
/// the caller had better let the loop sleep. One that waits for an fsync always takes longer.
const QUICK_WRITE_WAIT: Duration = Duration::from_micros(150);

/// What every engine thread shares: the options and the file's layout, prepared once.
pub(crate) struct Shared {
    options: SqliteOptions,
    layout: Mutex<Option<Arc<Layout>>>,
    /// The file the layout was prepared on; every later connection and commit must find it
    /// still at the path.
    file: OnceLock<FileIdentity>,
    /// An engine on the same file whose queued work must be done before this one serves any:
    /// calls made after a backend's `close()` must not overtake the calls made before it.
    predecessor: Mutex<Option<Arc<dyn StateEngine>>>,
    /// Set before the first connection is opened (see `StateEngine::has_connected`).
    connected: AtomicBool,
    /// Held from before the first connection until `close` is done (see `open_files`).
    in_use: Mutex<Option<open_files::InUse>>,
    /// The path was found to name another file (or none); see `LOOK_FOR_A_MOVED_FILE_EVERY`.
    replaced: AtomicBool,
}

impl Shared {
    /// The file's layout, preparing the file on first use. A failure is not cached: the next
    /// call tries again (the lock may be gone, the folder may exist by then).
    fn layout(&self, since: Instant) -> Result<Arc<Layout>> {
        // Opening the path again would open (or create) whatever is there now.
        if self.is_replaced() {
            return Err(self.replaced());
        }
        let mut layout = self.layout.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = &*layout {
            return Ok(Arc::clone(known));
        }
        {
            let mut in_use = self.in_use.lock().unwrap_or_else(|p| p.into_inner());
            if in_use.is_none() {
                *in_use = Some(open_files::engine_starts(&self.options.path)?);
            }
        }
        self.connected.store(true, Ordering::Release);
        let (prepared, file) = connection::retry_while_locked(&self.options, since, || {
            let mut conn = connection::open_or_create(&self.options)?;
            // The file this connection opened, read before preparing it, which takes seconds
            // on a big file: another program may put a new file at the path meanwhile (Flujo
            // moves aside a file it found locked for a second).
            let file = connection::identity(&self.options.path).map_err(|_| self.replaced())?;
            if self.file.get().is_some_and(|prepared| *prepared != file) {
                return Err(self.replaced());
            }
            Ok((schema::prepare(&mut conn, &self.options)?, file))
        })?;
        if self.file.set(file).is_ok() {
            open_files::opened(file);
        }
        self.check_same_file()?;
        let prepared = Arc::new(prepared);
        *layout = Some(Arc::clone(&prepared));
        Ok(prepared)
    }

    /// `known`, or the file's layout read again on `conn` when another connection has changed
    /// the tables since, so that statements name the columns the file has now.
    fn current_layout(&self, conn: &Connection, known: Arc<Layout>) -> Result<Arc<Layout>> {
        let fail = |e| classify(&self.options.path, e);
        if schema::schema_version(conn).map_err(fail)? == known.schema_version {
            return Ok(known);
        }
        let current = Arc::new(schema::read_layout(conn).map_err(fail)?);
        *self.layout.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&current));
        Ok(current)
    }

    /// A connection to the database file, once the layout is prepared on it.
    fn open(&self, role: Role) -> Result<Connection> {
        self.check_same_file()?; // a file gone since then was moved or deleted
        let conn = connection::open(&self.options, role)?;
        self.check_same_file()?;
        Ok(conn)
    }

    /// Waits until the predecessor, if any, has finished its queued work and released the file.
    /// Every thread of this engine calls it before serving.
    fn wait_for_predecessor(&self) {
        let predecessor = self
            .predecessor
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(predecessor) = predecessor {
            predecessor.close();
            *self.predecessor.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// Fails when the path no longer names the file the layout was prepared on, or once did not.
    fn check_same_file(&self) -> Result<()> {
        let Some(expected) = self.file.get() else {
            return Ok(());
        };
        // For good: once our connections have let go, the file's inode number is free again,
        // and a new file at the path may get it.
        if self.is_replaced() {
            return Err(self.replaced());
        }
        match connection::identity(&self.options.path) {
            Ok(found) if found == *expected => return Ok(()),
            // Unknown (a folder made unreadable, an I/O error): this write is refused, as it
            // may go nowhere, but the file may well be ours still.
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {}
            _ => self.replaced.store(true, Ordering::Release),
        }
        Err(self.replaced())
    }

    /// Whether the path was found to name another file than ours (or none): every connection
    /// is closed when its thread next looks, and none is opened again.
    fn is_replaced(&self) -> bool {
        self.replaced.load(Ordering::Acquire)
    }

    fn replaced(&self) -> Error {
        Error::FileReplaced {
            path: self.options.path.clone(),
        }
    }
}

struct Queues {
    writes: Sender<Job>,
    reads: Sender<ReadJob>,
}

pub struct SqliteEngine {
    queues: RwLock<Option<Queues>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    path: std::path::PathBuf,
    closed: AtomicBool,
}

impl SqliteEngine {
    /// Starts the engine's threads. The file is opened (and created or migrated) by the first
    /// request, so a problem with it is reported to that request's caller.
    pub fn start(options: SqliteOptions) -> Result<Self> {
        Self::start_after(options, None)
    }

    /// Starts an engine that serves nothing until `predecessor`, an engine on the same file
    /// that is being closed, has finished the work queued on it (closing it if need be).
    pub fn start_after(
        options: SqliteOptions,
        predecessor: Option<Arc<dyn StateEngine>>,
    ) -> Result<Self> {
        if options.readers == 0 {
            return Err(Error::InvalidInput("readers must be at least 1".into()));
        }
        let path = options.path.clone();
        let readers = options.readers;
        let shared = Arc::new(Shared {
            options,
            layout: Mutex::new(None),
            file: OnceLock::new(),
            predecessor: Mutex::new(predecessor),
            connected: AtomicBool::new(false),
            in_use: Mutex::new(None),
            replaced: AtomicBool::new(false),
        });
        let (write_tx, write_rx) = crossbeam_channel::unbounded();
        let (read_tx, read_rx) = crossbeam_channel::unbounded();
        let mut threads = vec![writer::spawn(Arc::clone(&shared), write_rx)?];
        for index in 0..readers {
            threads.push(readers::spawn(Arc::clone(&shared), read_rx.clone(), index)?);
        }
        Ok(SqliteEngine {
            queues: RwLock::new(Some(Queues {
                writes: write_tx,
                reads: read_tx,
            })),
            threads: Mutex::new(threads),
            shared,
            path,
            closed: AtomicBool::new(false),
        })
    }
}

impl StateEngine for SqliteEngine {
    fn submit(&self, request: Request, done: Completion) {
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        let Some(queues) = queues.as_ref() else {
            return done.answer(Err(Error::Closed {
                path: self.path.clone(),
            }));
        };
        let closed = || Error::Closed {
            path: self.path.clone(),
        };
        let submitted = Instant::now();
        if matches!(request, Request::WorkflowStats) {
            stats::submit(&queues.reads, done, &self.path, submitted);
        } else if request.is_write() {
            let job = Job {
                request,
                done,
                submitted,
            };
            if let Err(refused) = queues.writes.send(job) {
                refused.0.done.answer(Err(closed()));
            }
        } else if let Err(refused) = queues.reads.send(ReadJob::Request(Job {
            request,
            done,
            submitted,
        })) {
            if let ReadJob::Request(job) = refused.0 {
                job.done.answer(Err(closed()));
            }
        }
    }

    fn close(&self) {
        // Dropping the senders lets each thread finish what is queued, then exit.
        self.queues
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        // Held while joining, so that a close overlapping this one also waits for the queue.
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        for thread in threads.drain(..) {
            if thread.join().is_err() {
                log::error!("a flujo-sqlite engine thread panicked while closing");
            }
        }
        // Once, by the first close to get here; a later one finds `closed` set.
        if let (false, Some(file)) = (self.is_closed(), self.shared.file.get()) {
            open_files::closed(*file, &self.shared.options);
        }
        drop(
            self.shared
                .in_use
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        self.closed.store(true, Ordering::Release);
    }

    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn has_connected(&self) -> bool {
        self.shared.connected.load(Ordering::Acquire)
    }

    fn quick_read_wait(&self) -> Option<Duration> {
        Some(QUICK_READ_WAIT)
    }

    fn quick_write_wait(&self) -> Option<Duration> {
        (self.shared.options.durability == Durability::Normal).then_some(QUICK_WRITE_WAIT)
    }
}

impl Drop for SqliteEngine {
    fn drop(&mut self) {
        self.close();
    }
}

/// Whether serving `request` builds statements from the columns of the file's `runs`, `steps`
/// and `spans` tables, which differ between the Flujo releases.
fn uses_layout(request: &Request) -> bool {
    matches!(
        request,
        Request::SaveRunStart(_)
            | Request::SaveStepResult(_)
            | Request::SaveRunEnd { .. }
            | Request::SaveSpans { .. }
            | Request::PersistEvaluation(_)
            | Request::GetRunDetails { .. }
            | Request::ListRunSteps { .. }
            | Request::ListRuns(_)
            | Request::GetTrace { .. }
            | Request::GetSpans { .. }
            | Request::ListEvaluations { .. }
    )
}

/// Runs one read request on a reader connection.
fn execute_read(
    conn: &Connection,
    layout: &Layout,
    shared: &Shared,
    request: &Request,
) -> Result<Response> {
    let fail = |e| classify(&shared.options.path, e);
    let response = match request {
        Request::LoadState { run_id } => Response::State(
            queries::load_state(conn, run_id)
                .map_err(fail)?
                .map(Box::new),
        ),
        Request::ListStates { status } => {
            Response::States(queries::list_states(conn, status.as_deref()).map_err(fail)?)
        }
        Request::ListWorkflows(query) => {
            Response::Workflows(queries::list_workflows(conn, query).map_err(fail)?)
        }
        Request::FailedWorkflows { hours_back } => Response::Workflows(
            queries::failed_workflows(conn, &hours_back.window()).map_err(fail)?,
        ),
        Request::GetRunDetails { run_id } => Response::RunDetails(
            run_history::get_run_details(conn, layout, run_id)
                .map_err(fail)?
                .map(Box::new),
        ),
        Request::ListRunSteps { run_id } => {
            Response::Steps(run_history::list_run_steps(conn, layout, run_id).map_err(fail)?)
        }
        Request::ListRuns(query) => {
            Response::Runs(run_history::list_runs(conn, layout, query).map_err(fail)?)
        }
        Request::GetTrace { run_id } => {
            Response::Trace(traces::get_spans(conn, layout, run_id, None, None).map_err(fail)?)
        }
        Request::GetSpans {
            run_id,
            status,
            name,
        } => Response::Spans(
            traces::get_spans(conn, layout, run_id, status.as_deref(), name.as_deref())
                .map_err(fail)?,
        ),
        Request::SpanStatistics {
            pipeline_name,
            time_range,
        } => Response::SpanStatistics(
            traces::span_statistics(conn, pipeline_name.as_deref(), *time_range).map_err(fail)?,
        ),
        Request::GetSystemState { key } => {
            Response::SystemState(system::get_system_state(conn, key).map_err(fail)?)
        }
        Request::ListEvaluations { limit, run_id } => Response::Evaluations(
            system::list_evaluations(conn, *limit, run_id.as_deref()).map_err(fail)?,
        ),
        Request::ListBackgroundTasks(query) => {
            Response::Workflows(queries::list_background_tasks(conn, query).map_err(fail)?)
        }
        Request::FailedBackgroundTasks {
            parent_run_id,
            hours_back,
        } => Response::Workflows(
            queries::failed_background_tasks(conn, parent_run_id.as_deref(), &hours_back.window())
                .map_err(fail)?,
        ),
        other => unreachable!("writes go to the writer, stats to `stats`, not here: {other:?}"),
    };
    Ok(response)
}
