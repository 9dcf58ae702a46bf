//! Reader threads: each owns a `query_only` connection and takes read requests from one shared
//! queue, so loads and lists run in parallel with each other and with the writer.
//!
//! Waking a parked thread costs ~30 us on these 2-vCPU machines (shared/notes/async-bridge.md),
//! more than a point read itself. So after each request one reader (never more, to leave the
//! other core to the event loop) spins briefly for the next one before parking: a caller
//! issuing reads back to back then never pays for the wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};
use rusqlite::Connection;

use super::connection::{self, Role};
use super::{execute_read, Job, Shared};
use crate::error::{Error, Result};

pub(super) fn spawn(
    shared: Arc<Shared>,
    jobs: Receiver<Job>,
    index: usize,
) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("flujo-sqlite-reader-{index}"))
        .spawn(move || serve(&shared, &jobs))
        .map_err(|e| Error::Storage {
            path: std::path::PathBuf::new(),
            detail: format!("cannot start a reader thread: {e}"),
        })
}

/// How long a reader waits actively for the next request before parking.
const SPIN: Duration = Duration::from_micros(100);

/// Set while one reader is spinning; the others park straight away.
static READER_SPINNING: AtomicBool = AtomicBool::new(false);

/// The next request: spun for briefly when no other reader is spinning, else waited for.
/// `None` once the engine has closed and the queue is empty.
fn next_job(jobs: &Receiver<Job>) -> Option<Job> {
    if READER_SPINNING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        let started = Instant::now();
        let spun = loop {
            match jobs.try_recv() {
                Ok(job) => break Some(job),
                Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) if started.elapsed() < SPIN => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break None,
            }
        };
        READER_SPINNING.store(false, Ordering::Release);
        if spun.is_some() {
            return spun;
        }
    }
    jobs.recv().ok()
}

fn serve(shared: &Shared, jobs: &Receiver<Job>) {
    let mut conn: Option<Connection> = None;
    let mut spare: Option<Connection> = None;
    while let Some(job) = next_job(jobs) {
        let outcome = shared.layout().and_then(|layout| {
            let conn = match &mut conn {
                Some(conn) => conn,
                slot => slot.insert(connection::open(&shared.options, Role::Reader)?),
            };
            connection::retry_while_locked(&shared.options, || {
                execute_read(conn, &mut spare, &layout, shared, &job.request)
            })
        });
        (job.done)(outcome);
    }
}
