//! How a SQLite engine is set up: the backend's `EngineSettings`, and what only SQLite needs.

use std::path::PathBuf;
use std::time::Duration;

use crate::engine::{Durability, EngineSettings, FreshLayout};

#[derive(Debug, Clone, PartialEq)]
pub struct SqliteOptions {
    /// Absolute: connections are opened later, on the engine's threads, maybe after the program
    /// changed its working directory, where a relative path would name another file.
    pub path: PathBuf,
    pub durability: Durability,
    /// How long one statement waits inside SQLite for another connection's lock before we look
    /// at the caller's deadline, back off and retry: a short slice, so no call overshoots
    /// `lock_wait` by much.
    pub busy_timeout: Duration,
    /// How long a call may wait, in total, for a lock before failing with `Error::Locked`.
    pub lock_wait: Duration,
    /// Connections serving reads in parallel with the writer.
    pub readers: usize,
    /// The tables a brand-new file gets; an existing file keeps its own.
    pub fresh_layout: FreshLayout,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        SqliteOptions {
            // Only an empty path, or a working directory that no longer exists, stays relative.
            path: std::path::absolute(&path).unwrap_or(path),
            durability: Durability::Full,
            busy_timeout: Duration::from_millis(100),
            lock_wait: Duration::from_secs(30),
            readers: 2,
            fresh_layout: FreshLayout::default(),
        }
    }

    /// The options for what the backend's constructor asked.
    pub fn from_settings(path: impl Into<PathBuf>, settings: EngineSettings) -> Self {
        let mut options = SqliteOptions::new(path);
        options.durability = settings.durability;
        options.lock_wait = settings.lock_wait;
        options.busy_timeout = options.busy_timeout.min(settings.lock_wait);
        options.readers = settings.readers;
        options.fresh_layout = settings.fresh_layout;
        options
    }
}
