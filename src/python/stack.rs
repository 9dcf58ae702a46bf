//! How much stack a recursive conversion of a nested value may use.
//!
//! Conversions stop at 1000 levels, which takes ~450 KB of stack: well within the megabytes
//! Python's threads get by default, but not within a thread started after
//! `threading.stack_size(256 * 1024)` (or a platform's small default), where such a value used
//! to crash the process. There they stop where the stack would run out instead.

/// Stack kept free below the deepest level of a conversion, for the Python code it may call (a
/// serializer, `model_dump`) and for raising its error; at most half of what was left when the
/// conversion began, so that a thread with a tiny stack still converts shallow values.
const RESERVE: usize = 64 * 1024;

/// Taken when a conversion begins; says when it has gone as deep as the stack allows.
pub(crate) struct StackBudget {
    /// Stop once less than this many bytes are left; 0 where the stack's size is unknown.
    stop_below: usize,
}

impl StackBudget {
    pub(crate) fn new() -> Self {
        // `stacker` looks the thread's stack bounds up once per thread.
        let stop_below = stacker::remaining_stack().map_or(0, |left| (left / 2).min(RESERVE));
        StackBudget { stop_below }
    }

    pub(crate) fn spent(&self) -> bool {
        self.stop_below != 0
            && stacker::remaining_stack().is_some_and(|left| left < self.stop_below)
    }
}
