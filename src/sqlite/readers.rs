//! Reader threads: each owns a `query_only` connection and takes read requests from one shared
//! queue, so loads and lists run in parallel with each other and with the writer.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Receiver;
use rusqlite::Connection;

use super::connection::{self, Role};
use super::{execute_read, spin, uses_layout, Job, Shared, LOOK_FOR_A_MOVED_FILE_EVERY};
use crate::error::{Error, Result};

/// What a reader takes from the shared queue.
pub(super) enum ReadJob {
    /// A caller's read request, answered through its completion.
    Request(Job),
    /// One part of a caller's request that is split so that two readers work on it at once
    /// (see `stats`), and when the caller made that request.
    Part { run: ReadPart, submitted: Instant },
}

/// Handed this reader's connection, or why there is none; reports its outcome itself.
pub(super) type ReadPart = Box<dyn FnOnce(&Shared, Result<&Connection>) + Send>;

pub(super) fn spawn(
    shared: Arc<Shared>,
    jobs: Receiver<ReadJob>,
    index: usize,
) -> Result<JoinHandle<()>> {
    let path = shared.options.path.clone();
    std::thread::Builder::new()
        .name(format!("flujo-sqlite-reader-{index}"))
        .spawn(move || serve(&shared, &jobs))
        .map_err(|e| Error::System {
            path,
            what: "cannot start a reader thread for".to_owned(),
            detail: e.to_string(),
        })
}

fn serve(shared: &Shared, jobs: &Receiver<ReadJob>) {
    shared.wait_for_predecessor();
    let mut conn: Option<Connection> = None;
    let mut after_work = true;
    loop {
        let look_again = conn.is_some().then_some(LOOK_FOR_A_MOVED_FILE_EVERY);
        let job = match spin::next_within(jobs, look_again, after_work) {
            spin::Waited::Item(job) => job,
            spin::Waited::Idle => {
                after_work = false;
                if shared.check_same_file().is_err() {
                    conn = None; // see `LOOK_FOR_A_MOVED_FILE_EVERY`
                }
                continue;
            }
            spin::Waited::Closed => break,
        };
        after_work = true;
        if shared.is_replaced() {
            conn = None;
        }
        let job = match job {
            ReadJob::Request(job) if job.done.caller_gone().is_set() => {
                log::debug!("skipped a read whose caller stopped waiting before it began");
                job.done.answer(Err(Error::CallerGone));
                continue;
            }
            job => job,
        };
        let submitted = match &job {
            ReadJob::Request(job) => job.submitted,
            ReadJob::Part { submitted, .. } => *submitted,
        };
        let ready = shared.layout(submitted).and_then(|layout| {
            let conn = match &mut conn {
                Some(conn) => conn,
                slot => slot.insert(shared.open(Role::Reader)?),
            };
            Ok((&*conn, layout))
        });
        match job {
            ReadJob::Request(job) => {
                let outcome = ready.and_then(|(conn, layout)| {
                    connection::retry_while_locked(&shared.options, job.submitted, || {
                        let layout = if uses_layout(&job.request) {
                            shared.current_layout(conn, Arc::clone(&layout))?
                        } else {
                            Arc::clone(&layout)
                        };
                        execute_read(conn, &layout, shared, &job.request)
                    })
                });
                job.done.answer(outcome);
            }
            ReadJob::Part { run, .. } => run(shared, ready.map(|(conn, _)| conn)),
        }
    }
}
