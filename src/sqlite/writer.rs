//! The single writer thread, with group commit.
//!
//! Writes queued while a commit is in progress are committed together in the next transaction:
//! one fsync for many saves. Writes sharing a transaction each run inside a savepoint, so one that
//! fails is rolled back alone and only its caller sees the error; a write alone in its transaction
//! is undone by rolling the transaction back. Callers are told of success only after
//! COMMIT has returned, i.e. once the write is durable at the configured `Durability`.
//! Cleanup deletes in batches and serves queued writes between them, so a large cleanup never
//! holds the write lock for long while someone is waiting for it.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use rusqlite::Connection;

use super::connection::{self, classify, retry_while_locked, Role};
use super::schema::Layout;
use super::{
    queries, run_history, spin, system, traces, uses_layout, Job, Shared,
    LOOK_FOR_A_MOVED_FILE_EVERY,
};
use crate::engine::{CallerGone, Completion, Request, Response};
use crate::error::{Error, Result};
use crate::timestamp::{differ_only_in_awareness, same_instant, TimeWindow};

/// Writes committed in one transaction at most; bounds the latency a batch adds to its first caller.
const MAX_BATCH: usize = 256;

/// Cleanup batch sizes, in rows. Each commit rewrites every index page its deletions touched,
/// and run ids are random, so small batches rewrite most of the run-id index every time;
/// batches therefore double while nobody waits (a save arriving then waits for at most one
/// batch, ~100 ms), and shrink to a quarter whenever a save was waiting, down to a few
/// milliseconds of work.
const CLEANUP_ROWS_FIRST: usize = 1000;
const CLEANUP_ROWS_MIN: usize = 250;
const CLEANUP_ROWS_MAX: usize = 16_000;
/// A cleanup batch only grows while it takes less than half of this.
const CLEANUP_BATCH_BUDGET: Duration = Duration::from_millis(100);
/// How long a cleanup goes on taking the write lock back after each batch before it leaves the
/// lock alone for `LET_OTHER_PROCESSES_IN`. Writers of other processes cannot be seen waiting,
/// and SQLite's busy handler (ours, Flujo's, the sqlite3 shell's) looks again only every
/// 100 ms: without such a gap one waits for the whole cleanup, and Flujo 0.4.35 starting up
/// meanwhile gives up after 5 s and moves the file aside as corrupt.
const CLEANUP_HOLDS_LOCK_FOR: Duration = Duration::from_secs(1);
const LET_OTHER_PROCESSES_IN: Duration = Duration::from_millis(100);

pub(super) fn spawn(shared: Arc<Shared>, jobs: Receiver<Job>) -> Result<JoinHandle<()>> {
    let path = shared.options.path.clone();
    std::thread::Builder::new()
        .name("flujo-sqlite-writer".into())
        .spawn(move || {
            Writer {
                shared: &shared,
                conn: None,
                cleanups: VecDeque::new(),
                checkpoint: None,
                checkpoint_again: false,
                wal_watch: WalWatch::default(),
                file_behind_wal: false,
                last_commit: Instant::now(),
            }
            .serve(&jobs)
        })
        .map_err(|e| Error::System {
            path: path.clone(),
            what: "cannot start the writer thread for".to_owned(),
            detail: e.to_string(),
        })
}

struct Writer<'a> {
    shared: &'a Shared,
    conn: Option<Connection>,
    /// Cleanups that arrived while another was running; served after it, in order.
    cleanups: VecDeque<Job>,
    /// The checkpoint started after a cleanup. While it runs auto-checkpoints stay off, so no
    /// commit copies the cleanup's WAL back inline.
    checkpoint: Option<JoinHandle<()>>,
    /// A cleanup ended while that checkpoint was running: start another when it is done.
    checkpoint_again: bool,
    wal_watch: WalWatch,
    /// Commits since the last checkpoint may not be in the database file yet.
    file_behind_wal: bool,
    /// When the last commit (or idle checkpoint try) was.
    last_commit: Instant,
}

/// How long writes must pause before the writer copies the WAL back into the file.
const CHECKPOINT_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);
/// How often an idle writer looks whether the checkpoint a cleanup started is done.
const CHECKPOINT_THREAD_POLL: Duration = Duration::from_millis(100);

/// Notices a WAL that checkpoints cannot copy back, which otherwise grows with every save
/// without a word: a connection holding an old read transaction open (an `sqlite3` shell left
/// inside `BEGIN`, a stuck process) keeps SQLite from reusing it. Looks only while automatic
/// checkpoints run (a cleanup turns them off and grows the WAL on purpose).
#[derive(Default)]
struct WalWatch {
    commits_since_look: u32,
    /// The size last warned about; a warning is repeated each time the WAL doubles.
    warned_at: u64,
}

/// A look costs a `stat` call: one every this many commits.
const WAL_LOOK_EVERY: u32 = 64;
/// Four times the size at which the writer checkpoints (see `connection`).
const WAL_WORRYING_BYTES: u64 = 128 << 20;

impl WalWatch {
    fn after_commit(&mut self, path: &Path) {
        self.commits_since_look += 1;
        if self.commits_since_look < WAL_LOOK_EVERY {
            return;
        }
        self.commits_since_look = 0;
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        let Ok(size) = std::fs::metadata(&wal).map(|m| m.len()) else {
            return;
        };
        if size < WAL_WORRYING_BYTES {
            self.warned_at = 0;
        } else if size >= 2 * self.warned_at {
            log::warn!(
                "the -wal file of {} has grown to {} MB: a connection holding a read \
                 transaction open (an sqlite3 shell inside BEGIN, a stuck process) keeps \
                 checkpoints from copying it back into the database. It is cut back once that \
                 transaction ends; until then it grows with every write",
                path.display(),
                size >> 20
            );
            self.warned_at = size;
        }
    }
}

impl Writer<'_> {
    fn serve(mut self, jobs: &Receiver<Job>) {
        self.shared.wait_for_predecessor();
        let mut after_work = true;
        loop {
            let first = match self.cleanups.pop_front() {
                Some(job) => job,
                None => match spin::next_within(jobs, self.next_look(), after_work) {
                    spin::Waited::Item(job) => job,
                    spin::Waited::Idle => {
                        after_work = false;
                        self.look_while_idle();
                        continue;
                    }
                    // The engine closed and everything queued is done.
                    spin::Waited::Closed => return self.join_checkpoint(),
                },
            };
            after_work = true;
            self.tend_checkpoint();
            if matches!(first.request, Request::CleanupOldWorkflows { .. }) {
                self.cleanup(first, jobs);
            } else {
                let batch = self.gather(first, jobs);
                self.commit(batch);
                self.wrote_to_wal();
                if self.checkpoint.is_none() {
                    self.wal_watch.after_commit(&self.shared.options.path);
                }
            }
            if self.shared.is_replaced() {
                self.conn = None; // see `LOOK_FOR_A_MOVED_FILE_EVERY`
            }
        }
    }

    /// The checkpoints an idle writer looks after, and whether its file is still at the path.
    fn look_while_idle(&mut self) {
        if self.conn.is_some() && self.shared.check_same_file().is_err() {
            self.conn = None; // see `LOOK_FOR_A_MOVED_FILE_EVERY`
        }
        self.tend_checkpoint();
        if self.checkpoint.is_none()
            && self.file_behind_wal
            && self.last_commit.elapsed() >= CHECKPOINT_WHEN_IDLE_FOR
        {
            self.checkpoint_when_idle();
        }
    }

    /// `first` plus whatever else is already waiting; cleanups are set aside for later.
    fn gather(&mut self, first: Job, jobs: &Receiver<Job>) -> Vec<Job> {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) if matches!(job.request, Request::CleanupOldWorkflows { .. }) => {
                    self.cleanups.push_back(job);
                }
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        batch
    }

    fn ready(&mut self, since: Instant) -> Result<(&mut Connection, Arc<Layout>)> {
        let layout = self.shared.layout(since)?;
        let conn = match &mut self.conn {
            Some(conn) => conn,
            slot => slot.insert(self.shared.open(Role::Writer)?),
        };
        Ok((conn, layout))
    }

    fn commit(&mut self, mut batch: Vec<Job>) {
        let shared = self.shared;
        let options = &shared.options;
        let oldest = |batch: &[Job]| batch.iter().map(|job| job.submitted).min();
        // Each caller waits for another connection's lock (to prepare the file, or to begin)
        // for `lock_wait` from its own call: when the oldest has waited that long, it alone
        // fails and the rest go on waiting.
        let layout = loop {
            let Some(since) = oldest(&batch) else {
                return;
            };
            let needs_layout = batch.iter().any(|job| uses_layout(&job.request));
            let begun = self.ready(since).and_then(|(conn, layout)| {
                retry_while_locked(options, since, || {
                    conn.execute_batch("BEGIN IMMEDIATE")
                        .map_err(|e| classify(&options.path, e))
                })?;
                if !needs_layout {
                    return Ok(layout);
                }
                // Inside the transaction: no other connection changes the tables until it ends.
                shared.current_layout(conn, layout).inspect_err(|_| {
                    let _ = conn.execute_batch("ROLLBACK");
                })
            });
            match begun {
                Ok(layout) => break layout,
                Err(error @ Error::Locked { .. }) => {
                    let (expired, waiting): (Vec<Job>, Vec<Job>) = batch
                        .into_iter()
                        .partition(|job| job.submitted.elapsed() >= options.lock_wait);
                    if expired.is_empty() {
                        return fail_all(waiting, &error); // not from a wait: no retry helps
                    }
                    batch = waiting;
                    for job in expired {
                        let waited = job.submitted.elapsed();
                        job.done.answer(Err(Error::Locked {
                            path: options.path.clone(),
                            waited,
                        }));
                    }
                }
                Err(error) => return fail_all(batch, &error),
            }
        };
        let conn = self.conn.as_mut().expect("opened by `ready`");
        // A savepoint per write lets one write fail without undoing the others in its batch. A
        // write alone in its transaction (every sequential save) does without: rolling the
        // transaction back undoes it as well, and skipping the savepoint's statements and the
        // copy it keeps of every page the write changes took sequential `durability="normal"`
        // saves from ~9,800 to ~10,600/s (medians of 9 alternating runs).
        let alone = batch.len() == 1;
        let mut outcomes: Vec<(Completion, Result<Response>)> = Vec::with_capacity(batch.len());
        let mut jobs = batch.into_iter();
        while let Some(job) = jobs.next() {
            let write =
                |conn: &Connection| execute_write(conn, &layout, &options.path, &job.request);
            let outcome = if alone {
                write(conn)
            } else {
                run_in_savepoint(conn, &options.path, write)
            };
            if let Err(error) = &outcome {
                if conn.is_autocommit() {
                    // SQLite rolled the whole transaction back itself (a full disk, an I/O
                    // error): nothing of this batch is stored, whatever earlier writes reported.
                    let error = error.clone();
                    job.done.answer(outcome);
                    for (done, _) in outcomes {
                        done.answer(Err(error.clone()));
                    }
                    return fail_all(jobs.collect(), &error);
                }
            }
            outcomes.push((job.done, outcome));
        }
        // With every write failed there is nothing to keep, and a lone write may have changed
        // rows before it failed. A file moved away meanwhile must not take the batch with it.
        let committed = if outcomes.iter().all(|(_, outcome)| outcome.is_err()) {
            None
        } else {
            Some(shared.check_same_file().and_then(|()| {
                conn.execute_batch("COMMIT")
                    .map_err(|e| classify(&options.path, e))
            }))
        };
        let usable = matches!(committed, Some(Ok(()))) || roll_back(conn, &options.path);
        let commit_error = match committed {
            Some(Err(error)) => {
                log::error!(
                    "commit failed, {} writes rolled back: {error}",
                    outcomes.len()
                );
                Some(error)
            }
            _ => None,
        };
        for (done, outcome) in outcomes {
            done.answer(match &commit_error {
                Some(error) => outcome.and(Err(error.clone())),
                None => outcome,
            });
        }
        if !usable {
            // Closing the connection ends its transaction; the next write opens a new one.
            self.conn = None;
        }
    }

    fn cleanup(&mut self, job: Job, jobs: &Receiver<Job>) {
        let Request::CleanupOldWorkflows { days_old } = job.request else {
            unreachable!("only cleanups are passed here")
        };
        let window = days_old.window();
        // Checkpointing after every batch would copy the same index pages back into the file
        // again and again; one checkpoint at the end, off this thread, copies each page once.
        let outcome = self
            .pause_autocheckpoint(job.submitted)
            .and_then(|()| self.delete_old(&window, job.done.caller_gone(), jobs));
        match &outcome {
            Ok(0) if self.checkpoint.is_none() => self.restore_autocheckpoint(),
            Ok(0) => {} // turned back on when the running checkpoint is done
            // After an error too: batches may have committed before it.
            _ if self.checkpoint.is_some() => self.checkpoint_again = true,
            _ => self.start_checkpoint(),
        }
        if let Ok(deleted @ 1..) = outcome {
            log::info!(
                "cleanup_old_workflows deleted {deleted} workflow states from {}",
                self.shared.options.path.display()
            );
        }
        // Saves served between its batches, and any after its checkpoint began, are left for the
        // copy once writes pause.
        self.wrote_to_wal();
        job.done.answer(outcome.map(Response::Count));
    }

    /// Deletes in batches that grow while no other write is waiting and shrink as soon as one
    /// is, serving waiting writes between batches.
    fn delete_old(
        &mut self,
        window: &TimeWindow,
        caller_gone: &CallerGone,
        jobs: &Receiver<Job>,
    ) -> Result<u64> {
        let mut deleted: u64 = 0;
        let mut rows = CLEANUP_ROWS_FIRST;
        let mut checkpointed_for_room = false;
        let mut held_since = Instant::now();
        loop {
            if caller_gone.is_set() {
                log::info!(
                    "cleanup_old_workflows on {} stopped after {deleted} deletions: its caller \
                     stopped waiting (cancelled, timed out or interrupted)",
                    self.shared.options.path.display()
                );
                return Ok(deleted);
            }
            let started = Instant::now();
            let count = match self.delete_batch(window, rows) {
                Ok(count) => count,
                // The WAL grows through a cleanup, as its checkpoint waits for the end: on a disk
                // that fills up, copy it back now, so that the next, smaller batches reuse its
                // space (run ids are random, so even a few hundred deletions touch thousands of
                // index pages). Only a full disk for a batch of one row stops the cleanup.
                Err(Error::DiskFull { .. }) if !checkpointed_for_room || rows > 1 => {
                    log::warn!(
                        "cleanup of {}: the disk is full after {deleted} deletions; \
                         checkpointing the WAL to reuse its space and going on in smaller batches",
                        self.shared.options.path.display()
                    );
                    self.checkpoint_here();
                    checkpointed_for_room = true;
                    rows = (rows / 4).max(1);
                    continue;
                }
                Err(error) if deleted == 0 => return Err(error),
                Err(error) => {
                    return Err(Error::Interrupted {
                        done: format!("cleanup_old_workflows had deleted {deleted} old states"),
                        cause: Box::new(error),
                    })
                }
            };
            deleted += count as u64;
            checkpointed_for_room = false;
            if count < rows {
                return Ok(deleted);
            }
            log::debug!(
                "cleanup: {deleted} rows deleted so far ({rows} in {:?})",
                started.elapsed()
            );
            if held_since.elapsed() >= CLEANUP_HOLDS_LOCK_FOR {
                // This process's own writes are still served meanwhile, each a short commit.
                let pause_ends = Instant::now() + LET_OTHER_PROCESSES_IN;
                loop {
                    match jobs.recv_deadline(pause_ends) {
                        Ok(first) => self.serve_during_cleanup(first, jobs),
                        Err(RecvTimeoutError::Timeout) => break,
                        // Closing: nothing more will come, but the pause is still owed.
                        Err(RecvTimeoutError::Disconnected) => {
                            std::thread::sleep(
                                pause_ends.saturating_duration_since(Instant::now()),
                            );
                            break;
                        }
                    }
                }
                held_since = Instant::now();
            }
            if let Ok(first) = jobs.try_recv() {
                rows = (rows / 4).max(CLEANUP_ROWS_MIN);
                self.serve_during_cleanup(first, jobs);
            } else if started.elapsed() < CLEANUP_BATCH_BUDGET / 2 {
                rows = (rows * 2).min(CLEANUP_ROWS_MAX);
            }
        }
    }

    /// Commits the writes queued behind a cleanup, with `first`; another cleanup waits its turn.
    fn serve_during_cleanup(&mut self, first: Job, jobs: &Receiver<Job>) {
        if matches!(first.request, Request::CleanupOldWorkflows { .. }) {
            self.cleanups.push_back(first);
        } else {
            let waiting = self.gather(first, jobs);
            self.commit(waiting);
        }
    }

    fn delete_batch(&mut self, window: &TimeWindow, rows: usize) -> Result<usize> {
        let shared = self.shared;
        let options = &shared.options;
        // The cleanup goes on for as long as it has rows to delete; a lock met by one of its
        // batches is waited for from the moment that batch starts.
        let since = Instant::now();
        let (conn, _) = self.ready(since)?;
        retry_while_locked(options, since, || {
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(|e| classify(&options.path, e))?;
            let count = queries::cleanup_batch(&tx, window, rows)
                .map_err(|e| classify(&options.path, e))?;
            shared.check_same_file()?;
            tx.commit().map_err(|e| classify(&options.path, e))?;
            Ok(count)
        })
    }

    fn pause_autocheckpoint(&mut self, since: Instant) -> Result<()> {
        let path = self.shared.options.path.clone();
        let (conn, _) = self.ready(since)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(|e| classify(&path, e))
    }

    fn restore_autocheckpoint(&mut self) {
        let path = self.shared.options.path.clone();
        let restored = self.ready(Instant::now()).and_then(|(conn, _)| {
            connection::autocheckpoint_pages(conn)
                .and_then(|pages| conn.pragma_update(None, "wal_autocheckpoint", pages))
                .map_err(|e| classify(&path, e))
        });
        if let Err(error) = restored {
            log::warn!("cannot turn automatic checkpoints back on: {error}");
        }
    }

    /// Copies the WAL back into the database file on the writer's own connection, so that the
    /// next write starts the WAL over (PASSIVE: readers are not waited for).
    fn checkpoint_here(&mut self) {
        let path = self.shared.options.path.clone();
        let checkpointed = self
            .ready(Instant::now())
            .and_then(|(conn, _)| passive_checkpoint(conn, &path));
        match checkpointed {
            Ok((logged, copied)) => {
                log::debug!(
                    "checkpoint during cleanup of {}: {copied} of {logged} WAL pages",
                    path.display()
                )
            }
            Err(error) => log::warn!("checkpoint during cleanup failed: {error}"),
        }
    }

    /// Copies the WAL a cleanup left behind back into the database file, on a thread of its
    /// own: a PASSIVE checkpoint never blocks writers or readers, so saves go on meanwhile.
    fn start_checkpoint(&mut self) {
        // It opens the path: whatever is there now, if our file has gone.
        if self.shared.check_same_file().is_err() {
            return;
        }
        let options = self.shared.options.clone();
        let spawned = std::thread::Builder::new()
            .name("flujo-sqlite-checkpoint".into())
            .spawn(move || {
                let outcome = connection::open(&options, Role::Writer)
                    .and_then(|conn| passive_checkpoint(&conn, &options.path));
                match outcome {
                    Ok((logged, copied)) => {
                        log::debug!(
                            "checkpoint after cleanup of {}: {copied} of {logged} WAL pages",
                            options.path.display()
                        )
                    }
                    // Not the caller's problem: auto-checkpoints copy it later.
                    Err(error) => log::warn!("checkpoint after cleanup failed: {error}"),
                }
            });
        match spawned {
            Ok(handle) => self.checkpoint = Some(handle),
            Err(error) => {
                log::warn!("cannot start a checkpoint thread: {error}");
                self.restore_autocheckpoint();
            }
        }
    }

    /// Commits just went to the WAL: the file lacks them until the next checkpoint.
    fn wrote_to_wal(&mut self) {
        self.file_behind_wal = true;
        self.last_commit = Instant::now();
    }

    /// How long to wait for the next write before looking after checkpoints: the one a cleanup
    /// left running (to turn automatic ones back on, or start the next, once it is done), and
    /// the copy of the WAL into the file once writes have paused; and, while the connection is
    /// open, whether the file is still at the path. `None`: nothing to look after.
    fn next_look(&self) -> Option<Duration> {
        let checkpoints = if self.checkpoint.is_some() {
            Some(CHECKPOINT_THREAD_POLL)
        } else if self.file_behind_wal {
            Some(CHECKPOINT_WHEN_IDLE_FOR.saturating_sub(self.last_commit.elapsed()))
        } else {
            None
        };
        let file = self.conn.is_some().then_some(LOOK_FOR_A_MOVED_FILE_EVERY);
        checkpoints.into_iter().chain(file).min()
    }

    /// Copies the WAL back into the database file once writes pause. A program that moves the
    /// file aside while we have it open (Flujo's backend does, as "corrupt") takes only the
    /// file: the acknowledged writes still in the WAL would be in neither file. A reader still
    /// using part of the WAL keeps part of it from being copied: tried again a second later.
    fn checkpoint_when_idle(&mut self) {
        let path = self.shared.options.path.clone();
        let Some(conn) = self.conn.as_ref() else {
            self.file_behind_wal = false;
            return;
        };
        self.file_behind_wal = match passive_checkpoint(conn, &path) {
            Ok((logged, copied)) => {
                log::debug!(
                    "checkpoint of {} while idle: {copied} of {logged} WAL pages",
                    path.display()
                );
                copied < logged
            }
            Err(error) => {
                log::debug!("checkpoint while idle failed: {error}");
                true
            }
        };
        self.last_commit = Instant::now();
    }

    /// Once the background checkpoint is done, starts the one a later cleanup asked for or
    /// turns auto-checkpoints back on. Never waits.
    fn tend_checkpoint(&mut self) {
        if !self
            .checkpoint
            .as_ref()
            .is_some_and(JoinHandle::is_finished)
        {
            return;
        }
        self.join_checkpoint();
        if std::mem::take(&mut self.checkpoint_again) {
            self.start_checkpoint();
        } else {
            self.restore_autocheckpoint();
        }
    }

    fn join_checkpoint(&mut self) {
        if let Some(handle) = self.checkpoint.take() {
            if handle.join().is_err() {
                log::error!("the flujo-sqlite checkpoint thread panicked");
            }
        }
    }
}

/// Copies what it can of the WAL back into the file without waiting for anyone; returns the
/// pages in the WAL and the pages copied.
fn passive_checkpoint(conn: &Connection, path: &Path) -> Result<(i64, i64)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
    })
    .map_err(|e| classify(path, e))
}

/// Ends the open transaction unless SQLite already has (it rolls back by itself on some errors,
/// such as a full disk). Returns whether the connection can go on: one left inside a transaction
/// would fail every later `BEGIN`, so it must be closed instead.
fn roll_back(conn: &Connection, path: &Path) -> bool {
    if conn.is_autocommit() {
        return true;
    }
    if let Err(e) = conn.execute_batch("ROLLBACK") {
        log::error!("rollback failed: {}", classify(path, e));
    }
    conn.is_autocommit()
}

fn run_in_savepoint<T>(
    conn: &Connection,
    path: &Path,
    work: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let sql = |statement: &str| conn.execute_batch(statement).map_err(|e| classify(path, e));
    sql("SAVEPOINT write")?;
    match work(conn) {
        Ok(value) => {
            sql("RELEASE write")?;
            Ok(value)
        }
        Err(error) => {
            // If SQLite rolled the whole transaction back, there is no savepoint left to return
            // to, and the write's own error is the one to report.
            if !conn.is_autocommit() {
                sql("ROLLBACK TO write; RELEASE write")?;
            }
            Err(error)
        }
    }
}

fn execute_write(
    conn: &Connection,
    layout: &Layout,
    path: &Path,
    request: &Request,
) -> Result<Response> {
    let fail = |e| classify(path, e);
    match request {
        Request::SaveState {
            run_id,
            record,
            expected_updated_at,
        } => {
            if let Some(expected) = expected_updated_at {
                // Checked inside the write transaction, so no other writer can slip in between.
                let found = queries::stored_updated_at(conn, run_id).map_err(fail)?;
                if let Some(found) = found
                    .as_deref()
                    .filter(|f| differ_only_in_awareness(f, expected))
                {
                    return Err(Error::InvalidInput(format!(
                        "expected_updated_at {expected} and the stored updated_at {found} of run \
                         {run_id:?} are the same time, but only one of them has a UTC offset, so \
                         they cannot be compared: pass the updated_at that load_state returned, \
                         which keeps the kind (naive or aware) it was saved with"
                    )));
                }
                if !found.as_deref().is_some_and(|f| same_instant(f, expected)) {
                    return Err(Error::Conflict {
                        run_id: run_id.clone(),
                        expected: expected.clone(),
                        found: found.unwrap_or_else(|| "absent (never saved, or deleted)".into()),
                    });
                }
            }
            queries::save_state(conn, run_id, record).map_err(fail)?;
        }
        Request::DeleteState { run_id } => queries::delete_state(conn, run_id).map_err(fail)?,
        Request::SaveRunStart(run) => {
            run_history::save_run_start(conn, layout, run).map_err(fail)?
        }
        Request::SaveStepResult(step) => {
            run_history::save_step_result(conn, layout, step).map_err(fail)?;
        }
        Request::SaveRunEnd { run_id, end } => {
            run_history::save_run_end(conn, layout, run_id, end).map_err(fail)?;
        }
        Request::DeleteRun { run_id } => run_history::delete_run(conn, run_id).map_err(fail)?,
        Request::SaveSpans {
            run_id,
            spans,
            replace,
            pipeline_name,
            pipeline_version,
        } => traces::save_spans(
            conn,
            layout,
            run_id,
            spans,
            *replace,
            (pipeline_name.as_deref(), pipeline_version.as_deref()),
        )
        .map_err(|e| span_error(path, layout, e))?,
        Request::SetSystemState { key, value } => {
            system::set_system_state(conn, key, value).map_err(fail)?;
        }
        Request::PersistEvaluation(evaluation) => {
            system::persist_evaluation(conn, layout, evaluation).map_err(fail)?;
        }
        Request::CleanupStaleBackgroundTasks { stale_hours } => {
            let marked = queries::cleanup_stale_background_tasks(conn, &stale_hours.window())
                .map_err(fail)?;
            return Ok(Response::Count(marked as u64));
        }
        other => unreachable!("not a batched write: {other:?}"),
    }
    Ok(Response::Done)
}

/// Flujo 0.4.35 files key spans by `span_id` across all runs; say so when ids collide.
fn span_error(path: &Path, layout: &Layout, error: rusqlite::Error) -> Error {
    let unique_violation = matches!(
        &error,
        rusqlite::Error::SqliteFailure(f, _) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    );
    if layout.span_ids_are_global() && unique_violation {
        Error::InvalidInput(
            "a span_id in this trace is already used by another run; this file has Flujo \
             0.4.35's layout, where span ids must be unique across all runs"
                .into(),
        )
    } else {
        classify(path, error)
    }
}

fn fail_all(batch: Vec<Job>, error: &Error) {
    for job in batch {
        job.done.answer(Err(error.clone()));
    }
}
