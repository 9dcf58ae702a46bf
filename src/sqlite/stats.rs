//! `get_workflow_stats` in two parts that two readers run at the same time: the counts on one
//! connection, the average duration on another. Averaging steps through every known
//! `execution_time_ms` in its index (~23 ns each in SQLite), two thirds of the call at 100,000
//! runs, so the call takes about as long as the average alone.
//!
//! The counts share one read snapshot and agree with each other. The average has a snapshot of
//! its own, begun when a reader takes it up: at the same moment as the counts' when both readers
//! are free, right after them with a single reader. While saves go on the two may be a few
//! commits apart, in which time a mean over every stored run barely moves.
//!
//! For the length of the call both readers are busy, so a load that arrives meanwhile waits for
//! the first part to finish (~1 ms at 100,000 runs); reads overall are served as fast as before.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::Sender;
use rusqlite::Connection;

use super::connection::{classify, retry_while_locked};
use super::queries::{self, WorkflowCounts};
use super::readers::ReadJob;
use super::Shared;
use crate::engine::{CallerGone, Completion, Response};
use crate::error::{Error, Result};

/// Queues both parts; the one that finishes second answers `done`.
pub(super) fn submit(reads: &Sender<ReadJob>, done: Completion, path: &Path, submitted: Instant) {
    // Each part looks before it begins; a caller gone by then hears `CallerGone` (unheard).
    let gone = done.caller_gone().clone();
    let counts_gone = gone.clone();
    let join = Arc::new(Mutex::new(Parts {
        counts: None,
        average: None,
        done: Some(done),
    }));
    let counts = Arc::clone(&join);
    let average = Arc::clone(&join);
    let parts = [
        ReadJob::Part {
            run: Box::new(move |shared, conn| {
                let outcome = run(
                    shared,
                    conn,
                    &counts_gone,
                    submitted,
                    queries::workflow_counts,
                );
                finish(&counts, |parts| parts.counts = Some(outcome));
            }),
            submitted,
        },
        ReadJob::Part {
            run: Box::new(move |shared, conn| {
                let outcome = run(
                    shared,
                    conn,
                    &gone,
                    submitted,
                    queries::average_execution_time,
                );
                finish(&average, |parts| parts.average = Some(outcome));
            }),
            submitted,
        },
    ];
    for part in parts {
        if reads.send(part).is_err() {
            // Every reader has stopped, so nothing will run the parts. Any part's error answers
            // the caller; it is recorded as the counts'.
            let closed = Error::Closed {
                path: path.to_owned(),
            };
            finish(&join, |parts| parts.counts = Some(Err(closed)));
            return;
        }
    }
}

/// One part's query on the connection a reader handed it, retried while the file is locked, as
/// a whole request would be; skipped once the caller is gone, as a whole request would be.
fn run<T>(
    shared: &Shared,
    conn: Result<&Connection>,
    caller_gone: &CallerGone,
    submitted: Instant,
    query: impl Fn(&Connection) -> rusqlite::Result<T>,
) -> Result<T> {
    if caller_gone.is_set() {
        log::debug!("skipped a part of get_workflow_stats whose caller stopped waiting");
        return Err(Error::CallerGone);
    }
    let conn = conn?;
    retry_while_locked(&shared.options, submitted, || {
        query(conn).map_err(|e| classify(&shared.options.path, e))
    })
}

struct Parts {
    counts: Option<Result<WorkflowCounts>>,
    average: Option<Result<Option<f64>>>,
    /// Taken by whoever answers, so the caller hears exactly once.
    done: Option<Completion>,
}

/// Records one part's outcome; answers the caller once both are in, or at the first error.
fn finish(join: &Mutex<Parts>, record: impl FnOnce(&mut Parts)) {
    let answer = {
        let mut parts = join.lock().unwrap_or_else(|p| p.into_inner());
        record(&mut parts);
        let outcome = match (parts.counts.take(), parts.average.take()) {
            (Some(Err(error)), _) | (_, Some(Err(error))) => Some(Err(error)),
            (Some(Ok(counts)), Some(Ok(average))) => {
                Some(Ok(Response::Stats(counts.with_average(average))))
            }
            (counts, average) => {
                (parts.counts, parts.average) = (counts, average);
                None
            }
        };
        outcome.and_then(|outcome| parts.done.take().map(|done| (done, outcome)))
    };
    // Outside the lock: the completion hands the result to Python.
    if let Some((done, outcome)) = answer {
        done.answer(outcome);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::mpsc;

    use super::*;

    /// A join whose caller's answers land in the returned channel.
    fn new_join() -> (Mutex<Parts>, mpsc::Receiver<Result<Response>>) {
        let (tx, rx) = mpsc::channel();
        let parts = Parts {
            counts: None,
            average: None,
            done: Some(Completion::new(move |outcome| tx.send(outcome).unwrap())),
        };
        (Mutex::new(parts), rx)
    }

    fn counts() -> WorkflowCounts {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE workflow_state (status TEXT, created_at TEXT, \
             is_background_task INTEGER); \
             INSERT INTO workflow_state VALUES ('completed', '2000-01-01', 0), \
             ('failed', '2000-01-01', 1);",
        )
        .unwrap();
        queries::workflow_counts(&conn).unwrap()
    }

    fn locked() -> Error {
        Error::Locked {
            path: "x.db".into(),
            waited: std::time::Duration::ZERO,
        }
    }

    #[test]
    fn the_caller_hears_once_both_parts_are_in_whichever_comes_first() {
        for average_first in [false, true] {
            let (join, answers) = new_join();
            let record_counts = |parts: &mut Parts| parts.counts = Some(Ok(counts()));
            let record_average = |parts: &mut Parts| parts.average = Some(Ok(Some(1500.0)));
            if average_first {
                finish(&join, record_average);
                assert!(
                    answers.try_recv().is_err(),
                    "answered with one part missing"
                );
                finish(&join, record_counts);
            } else {
                finish(&join, record_counts);
                assert!(
                    answers.try_recv().is_err(),
                    "answered with one part missing"
                );
                finish(&join, record_average);
            }
            let Ok(Response::Stats(stats)) = answers.try_recv().unwrap() else {
                panic!("no stats")
            };
            assert_eq!(stats.total_workflows, 2);
            let expected: BTreeMap<String, u64> =
                [("completed".into(), 1), ("failed".into(), 1)].into();
            assert_eq!(stats.status_counts, expected);
            assert_eq!(stats.average_execution_time_ms, Some(1500.0));
            assert_eq!(stats.background_status_counts.get("failed"), Some(&1));
            assert!(answers.try_recv().is_err(), "answered twice");
        }
    }

    #[test]
    fn the_first_failing_part_answers_and_the_other_is_dropped() {
        let (join, answers) = new_join();
        finish(&join, |parts| parts.average = Some(Err(locked())));
        assert!(matches!(answers.try_recv(), Ok(Err(Error::Locked { .. }))));
        finish(&join, |parts| parts.counts = Some(Ok(counts())));
        assert!(answers.try_recv().is_err(), "answered twice");
        let (join, answers) = new_join();
        finish(&join, |parts| parts.counts = Some(Err(locked())));
        finish(&join, |parts| {
            parts.average = Some(Err(Error::InvalidInput("second".into())))
        });
        assert!(matches!(answers.try_recv(), Ok(Err(Error::Locked { .. }))));
        assert!(answers.try_recv().is_err(), "answered twice");
    }
}
