//! Waiting for the next request: engine threads spin briefly before parking.
//!
//! Waking a parked thread costs ~30 us on these 2-vCPU machines (shared/notes/async-bridge.md),
//! more than a point read or a `durability="normal"` commit itself. So after each request one
//! engine thread (never more, to leave the other core to the event loop) spins briefly for the
//! next one before parking: a caller issuing requests back to back never pays for the wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

/// How long a thread waits actively for the next request before parking.
const SPIN: Duration = Duration::from_micros(100);

/// Set while one engine thread is spinning; the others park straight away.
static SPINNING: AtomicBool = AtomicBool::new(false);

/// What waiting for the next item gave.
pub(super) enum Waited<T> {
    Item(T),
    /// Nothing came for the time given.
    Idle,
    /// Every sender is gone and the queue is empty.
    Closed,
}

/// The next item: spun for briefly when `after_work` and no other thread is spinning, else
/// waited for, giving up once nothing has come for `idle` (when given). A thread woken by its
/// own timeout has no request to expect, and a spin would only keep a working one from its own.
pub(super) fn next_within<T>(
    queue: &Receiver<T>,
    idle: Option<Duration>,
    after_work: bool,
) -> Waited<T> {
    let started = Instant::now();
    if after_work
        && SPINNING
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    {
        let spun = loop {
            match queue.try_recv() {
                Ok(item) => break Some(Waited::Item(item)),
                Err(TryRecvError::Disconnected) => break Some(Waited::Closed),
                Err(TryRecvError::Empty) if started.elapsed() < SPIN => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break None,
            }
        };
        SPINNING.store(false, Ordering::Release);
        if let Some(waited) = spun {
            return waited;
        }
    }
    let outcome = match idle {
        Some(idle) => queue.recv_timeout(idle.saturating_sub(started.elapsed())),
        None => queue.recv().map_err(|_| RecvTimeoutError::Disconnected),
    };
    match outcome {
        Ok(item) => Waited::Item(item),
        Err(RecvTimeoutError::Timeout) => Waited::Idle,
        Err(RecvTimeoutError::Disconnected) => Waited::Closed,
    }
}
