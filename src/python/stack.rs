//! How much stack the current thread has left, for the recursive conversions of nested values.
//!
//! They stop at 1000 levels, which takes ~450 KB of stack: well within the megabytes Python's
//! threads get by default, but not within a thread started after
//! `threading.stack_size(256 * 1024)` (or a platform's small default), where such a value used
//! to crash the process. There they stop where the stack would run out instead.

/// Stack kept free below the deepest conversion level: room for the Python code a conversion
/// may call (a serializer, `model_dump`) and for the error to be raised.
const RESERVE: usize = 128 * 1024;

/// Whether less than `RESERVE` of this thread's stack is left below the caller's frame
/// (`stacker` looks the stack's bounds up once per thread); `false` where they are unknown.
pub(crate) fn nearly_exhausted() -> bool {
    stacker::remaining_stack().is_some_and(|left| left < RESERVE)
}
