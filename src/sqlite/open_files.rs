//! The database files this process has engines on, and how many on each.
//!
//! SQLite copies a WAL back into the file and deletes it when the last connection to the file
//! closes, but connections closing at the same moment each leave that to the other. Within one
//! engine the writer closes after its readers; across engines on one file (two backends, or
//! backends dropped at exit and closed on threads of their own) the last engine to finish
//! closing folds the WAL back with one more connection of its own.
//!
//! SQLite also keeps what it knows of a file's locks per process. A process made by `fork()`
//! inherits that record from its parent without the locks themselves, so a connection it opens
//! to a file its parent had open believes it holds locks it does not: the parent can then
//! checkpoint and delete the WAL under the child's writes, which are lost. A child therefore
//! refuses the files its parent had open.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use rusqlite::{Connection, OpenFlags};

use super::connection::{identity, FileIdentity};
use super::options::SqliteOptions;
use crate::error::{Error, Result};

struct Engines {
    /// The process that opened them; one that is not this process was our parent.
    pid: u32,
    count: usize,
}

static OPEN: Mutex<Option<HashMap<FileIdentity, Engines>>> = Mutex::new(None);

/// Refuses a file that an engine of the process we were forked from had open at the fork.
pub(super) fn refuse_if_open_in_parent(path: &Path) -> Result<()> {
    let Ok(file) = identity(path) else {
        return Ok(()); // not there yet: nobody had it open
    };
    let open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    match open.as_ref().and_then(|files| files.get(&file)) {
        Some(engines) if engines.pid != std::process::id() => Err(Error::OpenInParent {
            path: path.to_owned(),
            parent: engines.pid,
        }),
        _ => Ok(()),
    }
}

/// Counts an engine that has opened `file`.
pub(super) fn opened(file: FileIdentity) {
    let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
    let engines = open
        .get_or_insert_with(HashMap::new)
        .entry(file)
        .or_insert(Engines {
            pid: std::process::id(),
            count: 0,
        });
    engines.count += 1;
}

/// Uncounts an engine whose connections to `file` are all closed; the last one folds the WAL
/// back into the file.
pub(super) fn closed(file: FileIdentity, options: &SqliteOptions) {
    let last = {
        let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
        let files = open.get_or_insert_with(HashMap::new);
        match files.get_mut(&file) {
            Some(engines) if engines.count > 1 => {
                engines.count -= 1;
                false
            }
            Some(_) => files.remove(&file).is_some(),
            None => false,
        }
    };
    if last {
        fold_wal_back(file, &options.path);
    }
}

/// Opens the file and closes it again, alone in this process now, so that SQLite copies the WAL
/// back and deletes it (unless another process has the file open; then its last one will).
fn fold_wal_back(file: FileIdentity, path: &Path) {
    // A file moved or replaced meanwhile is not ours to touch, and nothing is ever created.
    if identity(path).ok() != Some(file) {
        return;
    }
    let folded = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .and_then(|conn| {
        conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
            r.get::<_, i64>(0)
        })?;
        conn.close().map_err(|(_, e)| e)
    });
    if let Err(error) = folded {
        log::debug!(
            "could not fold the WAL of {} back at close: {error}",
            path.display()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::config::DbConfig;

    /// A WAL database whose last connection closed without folding its WAL back.
    fn file_with_a_wal(dir: &Path) -> (SqliteOptions, FileIdentity) {
        let path = dir.join("wf.db");
        let conn = Connection::open(&path).unwrap();
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)
            .unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; CREATE TABLE t (x); INSERT INTO t VALUES (1);",
        )
        .unwrap();
        conn.close().unwrap();
        assert!(wal_of(&path).exists());
        let file = identity(&path).unwrap();
        (SqliteOptions::new(path), file)
    }

    fn wal_of(path: &Path) -> std::path::PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push("-wal");
        name.into()
    }

    #[test]
    fn the_last_engine_on_a_file_to_close_folds_its_wal_back() {
        let dir = tempfile::tempdir().unwrap();
        let (options, file) = file_with_a_wal(dir.path());
        opened(file);
        opened(file);
        closed(file, &options);
        assert!(
            wal_of(&options.path).exists(),
            "another engine still has the file"
        );
        closed(file, &options);
        assert!(!wal_of(&options.path).exists());
        let conn = Connection::open(&options.path).unwrap();
        let rows: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 1);
    }

    #[test]
    fn a_file_open_in_the_parent_process_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (options, file) = file_with_a_wal(dir.path());
        assert!(refuse_if_open_in_parent(&options.path).is_ok());
        opened(file);
        assert!(
            refuse_if_open_in_parent(&options.path).is_ok(),
            "opened by this process"
        );
        // As a child made by fork() finds an engine of its parent's.
        OPEN.lock()
            .unwrap()
            .as_mut()
            .unwrap()
            .get_mut(&file)
            .unwrap()
            .pid += 1;
        let refused = refuse_if_open_in_parent(&options.path);
        assert!(
            matches!(refused, Err(Error::OpenInParent { .. })),
            "{refused:?}"
        );
        assert!(refuse_if_open_in_parent(&dir.path().join("other.db")).is_ok());
        OPEN.lock().unwrap().as_mut().unwrap().remove(&file);
    }
}
