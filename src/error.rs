//! The core's one error type. The binding layer maps each variant to exactly one Python
//! exception class; messages are written for the person who has to fix the problem.

use std::path::PathBuf;
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The caller passed something the store cannot accept; nothing was written.
    #[error("{0}")]
    InvalidInput(String),

    /// Another connection kept the write lock for longer than the configured wait.
    #[error(
        "database {path} is locked: this call waited {waited:.1?} for another connection's \
         write lock and gave up. Check for other processes (or a long-running transaction, \
         e.g. an open sqlite3 shell) using this file, or raise `lock_timeout`."
    )]
    Locked { path: PathBuf, waited: Duration },

    /// The file exists but is not a readable SQLite database.
    #[error(
        "{path} is not a usable SQLite database ({detail}). flujo-sqlite never renames, \
         replaces or empties your file: restore it from a backup, rescue what it holds with \
         `SQLiteBackend.recover()`, or move it aside yourself so a fresh database can be created."
    )]
    Corrupt { path: PathBuf, detail: String },

    /// SQLite could not open or create the file at all.
    #[error("cannot open database {path}: {detail}")]
    CannotOpen { path: PathBuf, detail: String },

    /// The file was written by a newer release whose layout we do not know.
    #[error(
        "database {path} has schema version {found}, newer than the versions this flujo-sqlite \
         understands (up to {supported}): upgrade flujo-sqlite to open it, or, if this file \
         belongs to another application, give the backend a file of its own"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },

    /// The file holds a `workflow_state` table that is not Flujo's; nothing was changed.
    #[error(
        "{path} has a table named workflow_state that is not Flujo's (it has no run_id column), \
         so it belongs to another application; flujo-sqlite changed nothing in the file. Give \
         the backend a file of its own"
    )]
    NotFlujo { path: PathBuf },

    /// A conditional save found the run changed (or gone) since the caller read it.
    #[error(
        "run {run_id:?} was changed by another writer: its stored updated_at is {found}, not \
         {expected} as this save expected. Reload it with load_state, reapply your change and \
         save again"
    )]
    Conflict {
        run_id: String,
        expected: String,
        found: String,
    },

    /// The path no longer names the file the engine opened: someone moved, replaced or deleted
    /// it. Writes are refused from then on, since they would go into a file nobody will find.
    #[error(
        "database {path} was moved, replaced or deleted while this backend had it open, so \
         this call was refused: a write is not stored, there or anywhere else. A backend never \
         moves its own file: another program did, or a `recover()` you ran elsewhere (Flujo's \
         own backend moves a file it cannot open aside as `<name>.corrupt.<timestamp>`, \
         without the writes still in its -wal file). Put the file back or decide which one to \
         keep, then create a new backend"
    )]
    FileReplaced { path: PathBuf },

    /// `close()` was called; the engine accepts no more work. (The Python layer opens a new
    /// engine for calls made after `close()`; this reaches calls that raced it.)
    #[error("this SQLiteBackend was closed while the call was being made; call again to open {path} again")]
    Closed { path: PathBuf },

    /// A long request had done part of its work, which stays done, when `cause` stopped it.
    /// Reported as `cause` is, with what was done added to the message.
    #[error("{cause} ({done} before this, and that stays done)")]
    Interrupted { done: String, cause: Box<Error> },

    /// The disk (or the file system's quota) has no room for what a write needs.
    #[error("SQLite error on {path}: {detail}: free some space on the disk that holds it")]
    DiskFull { path: PathBuf, detail: String },

    /// Any other SQLite failure (read-only file, I/O error...).
    #[error("SQLite error on {path}: {detail}")]
    Storage { path: PathBuf, detail: String },

    /// The operating system refused something outside SQLite: a file operation of
    /// `recover()`, or a thread the engine needs. `what` reads "cannot ...".
    #[error("{what} {path}: {detail}")]
    System {
        path: PathBuf,
        what: String,
        detail: String,
    },

    /// This process was made by `fork()` while backends of its parent were using SQLite, whose
    /// internal locks and record of file locks do not survive it (see `sqlite::open_files`).
    #[error(
        "cannot open {path}: this process was forked from process {parent} while backends \
         there had files open, and SQLite does not survive fork() in use (its internal locks \
         may be held by threads that did not come along, and a connection here would not lock \
         the parent's files against it: saves could hang or be lost). Start processes with \
         multiprocessing's \"spawn\" or \"forkserver\" method, or fork before using any \
         backend (backends created but not used yet, or closed, are fine)"
    )]
    ForkedWhileInUse { path: PathBuf, parent: u32 },

    /// The engine dropped a call without answering it, which only a bug can do (an engine
    /// thread that panicked). Better an error than a caller waiting forever.
    #[error(
        "flujo-sqlite stopped working on this call without finishing it (an internal error, \
         logged above if an engine thread failed; please report it). A write may or may not \
         have been stored: load it to check"
    )]
    Unanswered,

    /// The caller stopped waiting before its read began, so the read was not run. Only a
    /// caller that is gone is ever answered so, and it no longer listens.
    #[error("the caller stopped waiting (cancelled or timed out) before this read began")]
    CallerGone,
}
