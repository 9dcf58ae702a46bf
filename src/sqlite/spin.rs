//! Waiting for the next request: engine threads spin briefly before parking.
//!
//! Waking a parked thread costs ~30 us on these 2-vCPU machines (shared/notes/async-bridge.md),
//! more than a point read or a `durability="normal"` commit itself. So after each request one
//! engine thread (never more, to leave the other core to the event loop) spins briefly for the
//! next one before parking: a caller issuing requests back to back never pays for the wake-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

/// How long a thread waits actively for the next request before parking.
const SPIN: Duration = Duration::from_micros(100);

/// Set while one engine thread is spinning; the others park straight away.
static SPINNING: AtomicBool = AtomicBool::new(false);

/// The next item: spun for briefly when no other thread is spinning, else waited for.
/// `None` once every sender is gone and the queue is empty.
pub(super) fn next<T>(queue: &Receiver<T>) -> Option<T> {
    if SPINNING
        .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_ok()
    {
        let started = Instant::now();
        let spun = loop {
            match queue.try_recv() {
                Ok(item) => break Some(item),
                Err(TryRecvError::Disconnected) => break None,
                Err(TryRecvError::Empty) if started.elapsed() < SPIN => std::hint::spin_loop(),
                Err(TryRecvError::Empty) => break None,
            }
        };
        SPINNING.store(false, Ordering::Release);
        if spun.is_some() {
            return spun;
        }
    }
    queue.recv().ok()
}
