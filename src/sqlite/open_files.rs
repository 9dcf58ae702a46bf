//! The database files this process has engines on, and whether it may use SQLite at all.
//!
//! SQLite copies a WAL back into the file and deletes it when the last connection to the file
//! closes, but connections closing at the same moment each leave that to the other (an engine's
//! writer and readers, or two engines on one file, or backends dropped at exit and closed on
//! threads of their own). So the last engine of the process on a file to finish closing folds
//! the WAL back with one more connection of its own, opened once all the others are closed.
//!
//! `recover()` replaces the file at a path, so it runs only while no engine of the process is
//! on that path (not even one dropped and still finishing its queued work), and an engine whose
//! first connection comes while a recovery works on its path waits for the rebuilt file:
//! otherwise its writes would go into the file being replaced, and be lost with it.
//!
//! SQLite does not survive `fork()` while it is in use: a child inherits its internal mutexes as
//! they were (one held by another thread of the parent stays held forever, and the child hangs
//! on it), and its record of each open file's locks without the locks (a child's connection to
//! a file its parent has open then locks nothing, and the parent can delete the WAL under the
//! child's writes). So a process made by `fork()` while engines of its parent were using SQLite
//! refuses to use it; one forked while none were (backends created but not used yet, or all
//! closed) starts afresh.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, LazyLock, Mutex, MutexGuard, PoisonError};

use rusqlite::{Connection, OpenFlags};

use super::connection::{identity, FileIdentity};
use super::options::SqliteOptions;
use crate::error::{Error, Result};

/// The process using SQLite through engines (high 32 bits) and how many of its engines are
/// (low 32 bits), in one word so that a forked child reads both as they were at the fork and
/// takes over with one compare-and-swap, without a lock a parent's thread may have held.
static USING_SQLITE: AtomicU64 = AtomicU64::new(0);

/// An engine's or a recovery's use of SQLite and of its path, counted until dropped.
pub(super) struct InUse {
    path: PathBuf,
    by: User,
}

#[derive(Clone, Copy, PartialEq)]
enum User {
    Engine,
    Recovery,
}

impl Drop for InUse {
    fn drop(&mut self) {
        // The registry first: a child forked once the count is down must find it unlocked.
        let mut files = files();
        match self.by {
            User::Engine => {
                if let Some(engines) = files.on_path.get_mut(&self.path) {
                    *engines -= 1;
                    if *engines == 0 {
                        files.on_path.remove(&self.path);
                    }
                }
            }
            User::Recovery => {
                files.recovering.remove(&self.path);
                RECOVERY_FINISHED.notify_all();
            }
        }
        drop(files);
        USING_SQLITE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts an engine about to open `path` for the first time, once no recovery of this process
/// is rebuilding the file there, or refuses when this process was forked while engines of its
/// parent were using SQLite.
pub(super) fn engine_starts(path: &Path) -> Result<InUse> {
    count_a_user(path)?;
    let path = path_key(path);
    let mut files = files();
    if files.recovering.contains(&path) {
        log::info!(
            "waiting for the recovery of {} under way in this process",
            path.display()
        );
        while files.recovering.contains(&path) {
            files = RECOVERY_FINISHED
                .wait(files)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
    *files.on_path.entry(path.clone()).or_insert(0) += 1;
    Ok(InUse {
        path,
        by: User::Engine,
    })
}

/// Marks `path` as being rebuilt by a recovery, or refuses while an engine of this process is
/// on the file (or when this process was forked while engines of its parent used SQLite).
pub(super) fn recovery_starts(path: &Path) -> Result<InUse> {
    count_a_user(path)?;
    let key = path_key(path);
    let mut files = files();
    let open_here = files.on_path.contains_key(&key)
        || identity(path).is_ok_and(|file| files.engines.contains_key(&file));
    if !open_here && files.recovering.insert(key.clone()) {
        return Ok(InUse {
            path: key,
            by: User::Recovery,
        });
    }
    drop(files);
    USING_SQLITE.fetch_sub(1, Ordering::SeqCst);
    let what = if open_here {
        "is open in a SQLiteBackend of this process (or in one dropped and still finishing its \
         queued work); close it first (`await backend.close()`, or leave its `async with` \
         block), then call recover() again"
    } else {
        "is being recovered already, by another recover() call of this process"
    };
    Err(Error::InvalidInput(format!("{} {what}", path.display())))
}

/// Counts one more user of SQLite in this process, or refuses when it was forked while engines
/// of its parent were using it.
fn count_a_user(path: &Path) -> Result<()> {
    let me = u64::from(std::process::id());
    let mut current = USING_SQLITE.load(Ordering::SeqCst);
    loop {
        let next = next_user(current, me).map_err(|parent| Error::ForkedWhileInUse {
            path: path.to_owned(),
            parent,
        })?;
        match USING_SQLITE.compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst) {
            Ok(_) => return Ok(()),
            Err(seen) => current = seen,
        }
    }
}

/// One spelling per file for the paths engines and recoveries work on, symbolic links followed
/// (the file itself may not exist yet).
fn path_key(path: &Path) -> PathBuf {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    if let Ok(real) = std::fs::canonicalize(&path) {
        return real;
    }
    match (path.parent(), path.file_name()) {
        (Some(folder), Some(name)) => std::fs::canonicalize(folder)
            .map(|folder| folder.join(name))
            .unwrap_or(path),
        _ => path,
    }
}

/// The state after one more user in process `me`, or the parent that was using SQLite.
fn next_user(current: u64, me: u64) -> std::result::Result<u64, u32> {
    let (owner, users) = (current >> 32, current & 0xffff_ffff);
    if owner == me || users == 0 {
        Ok((me << 32) | (users * u64::from(owner == me) + 1))
    } else {
        Err(owner as u32)
    }
}

/// What the engines and recoveries of this process are on.
#[derive(Default)]
struct Files {
    /// Engines per file they have opened, for folding the WAL back when the last one closes.
    engines: HashMap<FileIdentity, usize>,
    /// Engines per path, from before their first connection until they are closed.
    on_path: HashMap<PathBuf, usize>,
    /// Paths a recovery is rebuilding.
    recovering: HashSet<PathBuf>,
}

static FILES: LazyLock<Mutex<Files>> = LazyLock::new(Mutex::default);
static RECOVERY_FINISHED: Condvar = Condvar::new();

fn files() -> MutexGuard<'static, Files> {
    FILES.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Counts an engine that has opened `file`.
pub(super) fn opened(file: FileIdentity) {
    *files().engines.entry(file).or_insert(0) += 1;
}

/// Uncounts an engine whose connections to `file` are all closed; the last one folds the WAL
/// back into the file.
pub(super) fn closed(file: FileIdentity, options: &SqliteOptions) {
    let last = {
        let mut files = files();
        match files.engines.get_mut(&file) {
            Some(engines) if *engines > 1 => {
                *engines -= 1;
                false
            }
            Some(_) => files.engines.remove(&file).is_some(),
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
    fn a_recovery_waits_for_no_engine_and_engines_wait_for_the_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wf.db");
        let engine = engine_starts(&path).unwrap();
        let refused = recovery_starts(&path).err().unwrap().to_string();
        assert!(refused.contains("close it first"), "{refused}");
        // Spelled another way, through a symbolic link to its folder.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(dir.path(), &link).unwrap();
        assert!(recovery_starts(&link.join("wf.db")).is_err());
        drop(engine);

        let recovery = recovery_starts(&link.join("wf.db")).unwrap();
        assert!(recovery_starts(&path).is_err(), "one recovery at a time");
        let (started, waiting) = std::sync::mpsc::channel();
        let engine = std::thread::spawn(move || {
            let in_use = engine_starts(&path);
            started.send(()).unwrap();
            in_use.map(drop)
        });
        let early = waiting.recv_timeout(std::time::Duration::from_millis(200));
        assert!(early.is_err(), "the engine started during the recovery");
        drop(recovery);
        waiting.recv().unwrap();
        engine.join().unwrap().unwrap();
    }

    #[test]
    fn a_child_forked_while_its_parent_used_sqlite_refuses_it() {
        let (parent, child) = (7_u64, 8_u64);
        assert_eq!(
            next_user(0, parent),
            Ok((parent << 32) | 1),
            "the first user"
        );
        assert_eq!(
            next_user((parent << 32) | 1, parent),
            Ok((parent << 32) | 2)
        );
        // The child sees the parent's count as it was at the fork.
        assert_eq!(next_user((parent << 32) | 2, child), Err(7));
        // Nothing of the parent's was using SQLite at the fork: the child starts afresh.
        assert_eq!(next_user(parent << 32, child), Ok((child << 32) | 1));
    }
}
