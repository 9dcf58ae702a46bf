//! Reader threads: each owns a `query_only` connection and takes read requests from one shared
//! queue, so loads and lists run in parallel with each other and with the writer.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use rusqlite::Connection;

use super::connection::{self, Role};
use super::{execute_read, spin, Job, Shared};
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

fn serve(shared: &Shared, jobs: &Receiver<Job>) {
    let mut conn: Option<Connection> = None;
    while let Some(job) = spin::next(jobs) {
        let outcome = shared.layout().and_then(|layout| {
            let conn = match &mut conn {
                Some(conn) => conn,
                slot => slot.insert(connection::open(&shared.options, Role::Reader)?),
            };
            connection::retry_while_locked(&shared.options, || {
                execute_read(conn, &layout, shared, &job.request)
            })
        });
        (job.done)(outcome);
    }
}
