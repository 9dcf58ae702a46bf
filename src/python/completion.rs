//! The bridge from engine threads to asyncio: a `CompletionPort` per event loop.
//!
//! Engine threads never take the GIL. They push `(token, outcome)` into the port's inbox and,
//! only when it was empty, write one byte to a socketpair; the event loop watches the other end
//! with `loop.add_reader` and resolves every finished future in one `drain` call. Measured on
//! these machines (shared/notes/async-bridge.md) this beats one cross-thread hop per call by an
//! order of magnitude under concurrency and keeps the loop's wake-up delay low.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyRuntimeError;
use pyo3::gc::PyVisit;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::PyTraverseError;

use super::errors::to_py_err;
use super::log_with_gil;
use super::results::{response_to_python, Built, ListInProgress};
use crate::engine::{CallerGone, Completion, Response};
use crate::error::{Error, Result};

/// Finished work waiting for the event loop; shared with engine threads (no Python inside).
struct Inbox {
    finished: Mutex<Vec<(u64, Result<Response>)>>,
    /// How many outcomes were ever posted; lets a spinning caller notice one without locking.
    posted: AtomicU64,
    /// Set while the loop thread waits in `await_lone_request`, which drains the inbox itself:
    /// no wake-up needs to be written then.
    loop_is_waiting: AtomicBool,
    wake: UnixStream,
}

impl Inbox {
    /// Puts outcomes a `drain` did not get to back in front.
    fn put_back(&self, outcomes: impl Iterator<Item = (u64, Result<Response>)>) {
        let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
        let later = std::mem::take(&mut *finished);
        finished.extend(outcomes);
        finished.extend(later);
    }

    fn post(&self, token: u64, outcome: Result<Response>) {
        let was_empty = {
            let mut finished = self.finished.lock().unwrap_or_else(|p| p.into_inner());
            finished.push((token, outcome));
            finished.len() == 1
        };
        // Counted before the flag is read, both SeqCst, mirroring `await_lone_request` (flag
        // cleared, then count read): either the waiting loop thread sees this count after it
        // stops waiting, or we see that it stopped and write. No wake-up is ever lost.
        self.posted.fetch_add(1, Ordering::SeqCst);
        if was_empty && !self.loop_is_waiting.load(Ordering::SeqCst) {
            // A full socket already holds a pending wake-up, so a failed write loses nothing.
            let _ = (&self.wake).write(&[1]);
        }
    }
}

/// Resolves the asyncio futures of one event loop. Create one per loop with
/// `loop.add_reader(port.fileno(), port.drain)`; the Python shim does that.
#[pyclass(frozen, weakref, module = "flujo_sqlite._native")]
pub(crate) struct CompletionPort {
    inbox: Arc<Inbox>,
    woken_by: UnixStream,
    /// Calls awaiting an outcome, by the address of their future (see `track`). Only touched
    /// with the GIL held, on the loop's thread.
    waiting: Mutex<HashMap<u64, Waiting>>,
    /// Results already converted when an interrupt stopped a drain; delivered first next time.
    converted: Mutex<Vec<Converted>>,
    /// Long lists being converted, a chunk per drain; each drain wakes the loop for the next.
    growing: Mutex<Vec<(Py<PyAny>, ListInProgress)>>,
}

/// A call's future, and the flag that tells the engine when its caller stops waiting.
struct Waiting {
    future: Py<PyAny>,
    caller_gone: CallerGone,
}

/// A future and the value (or exception) to resolve it with.
type Converted = (Py<PyAny>, PyResult<Py<PyAny>>);

/// What converting one outcome gave: a value to hand over, or a list to go on building.
enum Step {
    Ready(Converted),
    Growing(Py<PyAny>, ListInProgress),
}

#[pymethods]
impl CompletionPort {
    #[new]
    fn new() -> PyResult<Self> {
        let (woken_by, wake) = UnixStream::pair()?;
        woken_by.set_nonblocking(true)?;
        wake.set_nonblocking(true)?;
        Ok(CompletionPort {
            inbox: Arc::new(Inbox {
                finished: Mutex::new(Vec::new()),
                posted: AtomicU64::new(0),
                loop_is_waiting: AtomicBool::new(false),
                wake,
            }),
            woken_by,
            waiting: Mutex::new(HashMap::new()),
            converted: Mutex::new(Vec::new()),
            growing: Mutex::new(Vec::new()),
        })
    }

    /// The futures the port holds, for the garbage collector: they hold their loop, which holds
    /// the port (its reader callback), and a loop dropped without `close()` while calls were in
    /// flight is such a cycle. A list locked by this thread (the collector can run while one
    /// is) is left out, which only keeps its objects alive longer.
    fn __traverse__(&self, visit: PyVisit<'_>) -> Result<(), PyTraverseError> {
        if let Ok(waiting) = self.waiting.try_lock() {
            for call in waiting.values() {
                visit.call(&call.future)?;
            }
        }
        if let Ok(converted) = self.converted.try_lock() {
            for (future, value) in converted.iter() {
                visit.call(future)?;
                if let Ok(value) = value {
                    visit.call(value)?;
                }
            }
        }
        if let Ok(growing) = self.growing.try_lock() {
            for (future, list) in growing.iter() {
                visit.call(future)?;
                list.traverse(&visit)?;
            }
        }
        Ok(())
    }

    fn __clear__(&self) {
        // Taken out first: dropping them runs arbitrary code, which must not find a lock held.
        let waiting = self.waiting.try_lock().map(|mut w| std::mem::take(&mut *w));
        let converted = self
            .converted
            .try_lock()
            .map(|mut c| std::mem::take(&mut *c));
        let growing = self.growing.try_lock().map(|mut g| std::mem::take(&mut *g));
        drop((waiting, converted, growing));
    }

    /// Tells the engine that the caller of `call` (an awaitable one of our methods returned)
    /// stopped waiting: a read not begun yet is then skipped, a cleanup stops after its batch.
    /// A call already answered (or a stand-in for one) is not found, and needs nothing.
    fn caller_gone(&self, call: &Bound<'_, PyAny>) {
        let waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(gone) = waiting.get(&token_of(call)).filter(|w| w.future.is(call)) {
            gone.caller_gone.set();
        }
    }

    /// The file descriptor the event loop watches.
    fn fileno(&self) -> i32 {
        self.woken_by.as_raw_fd()
    }

    /// Resolves every future whose work has finished. Runs on the event loop.
    ///
    /// An exception raised meanwhile by a signal handler (a `KeyboardInterrupt`, usually) is
    /// raised to the loop, which hands `KeyboardInterrupt` and `SystemExit` to the program as
    /// asyncio does; what is not delivered yet waits for the next drain.
    fn drain(&self, py: Python<'_>) -> PyResult<()> {
        // Empty the socket before taking the inbox: a wake-up written after this point belongs
        // to work we have not taken yet, so it must stay.
        let mut sink = [0u8; 64];
        loop {
            match (&self.woken_by).read(&mut sink) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let mut converted =
            std::mem::take(&mut *self.converted.lock().unwrap_or_else(|p| p.into_inner()));
        let growing = std::mem::take(&mut *self.growing.lock().unwrap_or_else(|p| p.into_inner()));
        let finished = std::mem::take(
            &mut *self
                .inbox
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        // Lists in progress get one more chunk each; a finished one is handed over below.
        let mut still_growing = Vec::new();
        for (future, mut list) in growing {
            if is_done(future.bind(py)) {
                continue; // its caller was cancelled
            }
            match guarded(|| list.advance(py)) {
                Ok(Some(whole)) => converted.push((future, Ok(whole))),
                Ok(None) => still_growing.push((future, list)),
                Err(error) => converted.push((future, Err(error))),
            }
        }
        let delivered = self.deliver(py, converted, finished, &mut still_growing);
        if !still_growing.is_empty() {
            self.growing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(still_growing);
            // Another turn of the loop for the next chunk, after its other callbacks.
            let _ = (&self.inbox.wake).write(&[1]);
        }
        delivered
    }
}

impl CompletionPort {
    /// Resolves the futures of `converted`, then of `finished` (converting them), in order;
    /// a long list is left in `growing` after its first chunk.
    fn deliver(
        &self,
        py: Python<'_>,
        converted: Vec<Converted>,
        finished: Vec<(u64, Result<Response>)>,
        growing: &mut Vec<(Py<PyAny>, ListInProgress)>,
    ) -> PyResult<()> {
        let mut converted = converted.into_iter();
        let mut finished = finished.into_iter();
        loop {
            let (future, value) = match converted.next() {
                // Its caller may have been cancelled since.
                Some((future, _)) if is_done(future.bind(py)) => continue,
                Some(ready) => ready,
                None => match finished.next() {
                    Some((token, outcome)) => match self.convert(py, token, outcome) {
                        Some(Step::Ready(ready)) => ready,
                        Some(Step::Growing(future, list)) => {
                            growing.push((future, list));
                            continue;
                        }
                        None => continue,
                    },
                    None => return Ok(()),
                },
            };
            // Signal handlers run here, after the (long) conversion and before `set_result`,
            // which calls back into Python: a handler that raised in there would leave the
            // future done with its waiter never woken (`settle` repairs that for the few
            // bytecodes of the loop's `call_soon` left). What is not delivered waits for the
            // next drain.
            let interrupted = match py.check_signals() {
                Err(interrupt) => Some(Interrupted {
                    interrupt,
                    delivered: false,
                }),
                Ok(()) => settle(py, future.bind(py), &value).err(),
            };
            if let Some(Interrupted {
                interrupt,
                delivered,
            }) = interrupted
            {
                if delivered {
                    self.hold(converted, finished);
                } else {
                    self.hold(std::iter::once((future, value)).chain(converted), finished);
                }
                return Err(interrupt);
            }
        }
    }

    /// The future waiting for `token` and its outcome as Python objects; `None` when nobody
    /// waits any more (a cancelled caller no longer wants the outcome: its write still
    /// committed or not, whole).
    fn convert(&self, py: Python<'_>, token: u64, outcome: Result<Response>) -> Option<Step> {
        let future = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&token)?
            .future;
        if is_done(future.bind(py)) {
            return None;
        }
        let built = guarded(|| {
            outcome
                .map_err(|e| to_py_err(py, &e))
                .and_then(|r| response_to_python(py, r))
        });
        Some(match built {
            Ok(Built::Done(value)) => Step::Ready((future, Ok(value))),
            Ok(Built::Growing(list)) => Step::Growing(future, list),
            Err(error) => Step::Ready((future, Err(error))),
        })
    }

    /// Keeps what an interrupted drain did not deliver for the next one, and wakes the loop.
    fn hold(
        &self,
        converted: impl Iterator<Item = Converted>,
        finished: impl Iterator<Item = (u64, Result<Response>)>,
    ) {
        self.converted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(converted);
        self.inbox.put_back(finished);
        let _ = (&self.inbox.wake).write(&[1]);
    }

    /// What the caller should await for the request just queued behind `future`. When it is
    /// the only request in flight on this loop, waits up to `wait` for it; if it finished, the
    /// future is resolved at once and `asyncio.sleep(0, result)` is returned, so the caller
    /// still yields to the loop once (other tasks run) but the loop neither sleeps nor takes a
    /// second turn to deliver the result (an error still takes that turn). Under concurrency
    /// (other requests in flight) it returns `future` at once, as the loop has other work.
    pub(crate) fn await_lone_request<'py>(
        &self,
        py: Python<'py>,
        future: Bound<'py, PyAny>,
        wait: Duration,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.waiting.lock().unwrap_or_else(|p| p.into_inner()).len() != 1 {
            return Ok(future);
        }
        let inbox = &self.inbox;
        let seen = inbox.posted.load(Ordering::SeqCst);
        inbox.loop_is_waiting.store(true, Ordering::SeqCst);
        // An outcome pushed before `seen` was read is already in the inbox.
        let arrived_early = !inbox
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        // Other Python threads may run meanwhile: the GIL is never held while SQLite works.
        let finished_in_time = arrived_early
            || py.detach(|| {
                let started = Instant::now();
                while inbox.posted.load(Ordering::SeqCst) == seen {
                    if started.elapsed() >= wait {
                        return false;
                    }
                    std::hint::spin_loop();
                }
                true
            });
        inbox.loop_is_waiting.store(false, Ordering::SeqCst);
        // A post between the last look and clearing the flag wrote no wake-up: take it here.
        if !finished_in_time && inbox.posted.load(Ordering::SeqCst) == seen {
            return Ok(future);
        }
        self.drain(py)?;
        if !future.call_method0("done")?.is_truthy()? {
            // A long list still being built, or resolving it failed (which went to
            // `sys.unraisablehook`): the future itself is the thing to await.
            return Ok(future);
        }
        // Never cancelled: nobody else has seen it yet.
        let exception = future.call_method0("exception")?;
        if exception.is_none() {
            static SLEEP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
            let result = future.call_method0("result")?;
            return SLEEP.import(py, "asyncio", "sleep")?.call1((0, result));
        }
        // A finished future would raise without yielding: hand the error over one loop turn
        // later through a fresh one, so a caller retrying in a loop does not starve the rest.
        let event_loop = running_loop(py)?;
        let later = event_loop.call_method0("create_future")?;
        static FAIL_UNLESS_DONE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
        let fail = FAIL_UNLESS_DONE.get_or_try_init(py, || {
            PyResult::Ok(wrap_pyfunction!(fail_unless_done, py)?.into_any().unbind())
        })?;
        event_loop.call_method1("call_soon", (fail, later.clone(), exception))?;
        Ok(later)
    }

    /// A new asyncio future on the running loop, and the completion that resolves it.
    pub(crate) fn track<'py>(&self, py: Python<'py>) -> PyResult<(Bound<'py, PyAny>, Completion)> {
        let future = running_loop(py)?.call_method0("create_future")?;
        let caller_gone = CallerGone::default();
        // The future's address: no other live object has it, and the port holds the future
        // until its one outcome is taken, so no outcome can reach a later future at the same
        // address. (A counter would need a second map for `caller_gone` to find a call.)
        let token = token_of(&future);
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                token,
                Waiting {
                    future: future.clone().unbind(),
                    caller_gone: caller_gone.clone(),
                },
            );
        let answer = Answer {
            inbox: Arc::clone(&self.inbox),
            token,
            given: false,
        };
        let done = Completion::watching(caller_gone, move |outcome| answer.give(outcome));
        Ok((future, done))
    }
}

fn token_of(future: &Bound<'_, PyAny>) -> u64 {
    future.as_ptr() as usize as u64
}

/// The outcome of one tracked call, owed to its future. Dropped without being given (which
/// only an engine bug does), it answers `Error::Unanswered`, so the caller gets an error
/// rather than waiting forever.
struct Answer {
    inbox: Arc<Inbox>,
    token: u64,
    given: bool,
}

impl Answer {
    fn give(mut self, outcome: Result<Response>) {
        self.given = true;
        self.inbox.post(self.token, outcome);
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.given {
            self.inbox.post(self.token, Err(Error::Unanswered));
        }
    }
}

/// Runs a conversion. A bug that panics while turning one outcome into Python objects must not
/// strand the other callers whose outcomes came in the same drain.
fn guarded<T>(convert: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    catch_unwind(AssertUnwindSafe(convert)).unwrap_or_else(|_| {
        Err(PyRuntimeError::new_err(
            "flujo-sqlite could not convert this call's result (a bug: please report it with \
             the panic message printed above)",
        ))
    })
}

/// Hands `error` to `future` unless its caller has cancelled it meanwhile.
#[pyfunction]
fn fail_unless_done(future: &Bound<'_, PyAny>, error: &Bound<'_, PyAny>) -> PyResult<()> {
    if !future.call_method0("done")?.is_truthy()? {
        future.call_method1("set_exception", (error,))?;
    }
    Ok(())
}

fn running_loop(py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
    static GET_RUNNING_LOOP: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    GET_RUNNING_LOOP
        .import(py, "asyncio", "get_running_loop")?
        .call0()
}

fn is_done(future: &Bound<'_, PyAny>) -> bool {
    future
        .call_method0("done")
        .and_then(|done| done.is_truthy())
        .unwrap_or(true)
}

/// A `KeyboardInterrupt` or `SystemExit` raised just before or while a future was resolved.
struct Interrupted {
    interrupt: PyErr,
    /// Whether the future got its value; if not (the interrupt came first, or a pure-Python
    /// future was interrupted before it stored it), the value is for the next drain.
    delivered: bool,
}

/// Resolves `future`. A failure to do so goes to `sys.unraisablehook` (naming the future), except
/// `KeyboardInterrupt` and `SystemExit` (a signal handler run by the callbacks `set_result`
/// schedules), which are returned for the program to see, as asyncio's own callbacks do.
fn settle(
    py: Python<'_>,
    future: &Bound<'_, PyAny>,
    value: &PyResult<Py<PyAny>>,
) -> Result<(), Interrupted> {
    // A copy: a pure-Python future empties its own list as it schedules them.
    let callbacks = future
        .getattr("_callbacks")
        .and_then(|callbacks| {
            if callbacks.is_none() {
                Ok(Vec::new())
            } else {
                callbacks.try_iter()?.collect::<PyResult<Vec<_>>>()
            }
        })
        .unwrap_or_default();
    let settled = match value {
        Ok(value) => future.call_method1("set_result", (value.bind(py),)),
        Err(error) => future.call_method1("set_exception", (error.value(py),)),
    };
    match settled {
        Ok(_) => Ok(()),
        Err(interrupt) if !interrupt.is_instance_of::<pyo3::exceptions::PyException>(py) => {
            let delivered = is_done(future);
            if delivered {
                requeue_dropped_callbacks(future, &callbacks);
            }
            Err(Interrupted {
                interrupt,
                delivered,
            })
        }
        Err(error) => {
            error.write_unraisable(py, Some(future));
            Ok(())
        }
    }
}

/// After a signal handler raised inside the loop's `call_soon` (pure Python in asyncio's own
/// loops) while `set_result` scheduled `future`'s callbacks, the future is done but asyncio has
/// dropped the callbacks not queued yet, so the task awaiting it would never wake. Queues each
/// callback of `callbacks` (`(callback, context)` pairs, taken before `set_result`) that is not
/// in the loop's ready queue. Best effort: a loop without asyncio's `_ready` queue (uvloop's
/// `call_soon` is compiled, so no handler runs inside it) is left alone.
fn requeue_dropped_callbacks(future: &Bound<'_, PyAny>, callbacks: &[Bound<'_, PyAny>]) {
    let requeued = || -> PyResult<()> {
        if callbacks.is_empty() {
            return Ok(());
        }
        let event_loop = future.call_method0("get_loop")?;
        let Ok(ready) = event_loop.getattr("_ready") else {
            return Ok(());
        };
        let mut queued = Vec::new();
        for handle in ready.try_iter()? {
            let handle = handle?;
            // A cancelled handle (a timer that ended early, say) has no arguments left.
            let Ok(args) = handle.getattr("_args") else {
                continue;
            };
            if args.len().is_ok_and(|n| n == 1) && args.get_item(0).is_ok_and(|a| a.is(future)) {
                queued.push(handle.getattr("_callback")?);
            }
        }
        for pair in callbacks {
            let (callback, context) = (pair.get_item(0)?, pair.get_item(1)?);
            if queued.iter().any(|q| q.is(&callback)) {
                continue;
            }
            let kwargs = pyo3::types::PyDict::new(future.py());
            kwargs.set_item("context", context)?;
            event_loop.call_method("call_soon", (callback, future), Some(&kwargs))?;
        }
        Ok(())
    };
    if let Err(error) = requeued() {
        // Whatever the logging raises goes the way of the interrupt being delivered.
        let _ = log_with_gil!(
            future.py(),
            error,
            "a task waiting on flujo-sqlite may never wake after an interrupt: {error}"
        );
    }
}
