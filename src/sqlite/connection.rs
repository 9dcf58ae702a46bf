//! Opening connections and translating SQLite's failures into the core's error type.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{ffi, Connection, ErrorCode, OpenFlags};

use super::options::SqliteOptions;
use crate::engine::Durability;
use crate::error::Error;

/// Which work a connection is for; readers are opened `query_only` so a bug can never write
/// through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    Writer,
    Reader,
}

/// WAL size at which a commit copies the WAL back into the file. With `durability="normal"`
/// that checkpoint is where the cost of every save is paid: it fsyncs the whole WAL, then copies
/// and fsyncs each page it holds. The larger the WAL, the more of the pages that several saves
/// touch are copied once rather than once each. Measured on sequential `normal` saves with 4 KB
/// pages: SQLite's default 1,000 pages -> 4,000 took p99 from 4.7 to 0.35 ms; 4,000 -> 8,000
/// took throughput ~9,500 -> ~10,000/s (16,000 gave ~10,300/s but 50-65 ms checkpoints instead
/// of ~30 ms). Set in bytes, so a file with larger pages does not get a larger WAL.
const AUTOCHECKPOINT_BYTES: i64 = 32 * 1024 * 1024;

/// `AUTOCHECKPOINT_BYTES` in pages of this file.
pub(crate) fn autocheckpoint_pages(conn: &Connection) -> rusqlite::Result<i64> {
    let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok((AUTOCHECKPOINT_BYTES / page_size.max(512)).max(1))
}

/// What the WAL file is cut back to when SQLite starts it over after a checkpoint.
const WAL_SIZE_LIMIT_BYTES: i64 = 64 * 1024 * 1024;

/// Page cache of each reader connection, a quarter of SQLite's 2 MB default. Loading a run walks
/// down two b-trees to leaves that are seldom read again; 512 KB (128 pages of 4 KB) holds their
/// upper levels, the rest comes from the OS's file cache either way, and loads at 100,000 runs
/// measured the same speed as with 2 MB. Admin queries that sweep an index outgrow any cache
/// short of several MB. What the default bought was repeated queries over the same few hundred
/// rows: the benchmark's repeated `get_failed_workflows(24)` takes 0.65 ms instead of 0.47. What
/// it cost was 1.5 MB per reader of resident memory, most of the difference to Flujo's peak RSS.
const READER_CACHE_KIB: i64 = 512;

/// Page cache of the writer, half of SQLite's 2 MB default. A save touches one leaf per index and
/// writes its row into fresh pages that the writer never reads again, yet those pages are what
/// fills a larger cache: sequential saves measured the same with 512 KB as with 2 MB, 64
/// concurrent updaters the same with 1 MB. Cleanups are what a cache speeds up, as they delete
/// runs whose ids are spread over the whole run-id index: 50,000 of 100,000 runs took 0.74 s with
/// 2 MB, 0.80 s with 1 MB and 0.90 s with 512 KB. 1 MB keeps a cleanup well ahead of Flujo's
/// (1.3 s) and 1 MB less resident than 2 MB.
const WRITER_CACHE_KIB: i64 = 1024;

/// Opens the database file, which must exist. Every connection but the first is opened with
/// this: one that found the file gone must not put an empty database in its place.
/// Paths are plain file names, never URIs: a file called `file:x?mode=ro` means that file.
pub(crate) fn open(options: &SqliteOptions, role: Role) -> Result<Connection, Error> {
    open_with(options, role, OpenFlags::empty())
}

/// Opens the database file for the writer, creating it when it does not exist yet.
pub(crate) fn open_or_create(options: &SqliteOptions) -> Result<Connection, Error> {
    open_with(options, Role::Writer, OpenFlags::SQLITE_OPEN_CREATE)
}

fn open_with(options: &SqliteOptions, role: Role, extra: OpenFlags) -> Result<Connection, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX | extra;
    let conn = Connection::open_with_flags(&options.path, flags)
        .map_err(|e| classify(&options.path, e))?;
    configure(&conn, options, role).map_err(|e| classify(&options.path, e))?;
    Ok(conn)
}

fn configure(conn: &Connection, options: &SqliteOptions, role: Role) -> rusqlite::Result<()> {
    conn.busy_timeout(options.busy_timeout)?;
    conn.set_prepared_statement_cache_capacity(64);
    let synchronous = match options.durability {
        Durability::Full => "FULL",
        Durability::Normal => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    match role {
        Role::Reader => {
            conn.pragma_update(None, "query_only", "ON")?;
            conn.pragma_update(None, "cache_size", -READER_CACHE_KIB)?;
        }
        // A cleanup can grow the WAL to hundreds of MB; without a limit the file would keep
        // that size on disk after its pages have been copied back.
        Role::Writer => {
            conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT_BYTES)?;
            conn.pragma_update(None, "wal_autocheckpoint", autocheckpoint_pages(conn)?)?;
            conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)?;
        }
    }
    Ok(())
}

/// Which file a path names. SQLite does not notice (in WAL mode) that its file was renamed or
/// deleted while open: commits go on into the old file, acknowledged, and are lost to anyone who
/// opens the path. Comparing this before each commit catches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FileIdentity {
    device: u64,
    inode: u64,
}

/// The identity of the file at `path` now.
pub(crate) fn identity(path: &Path) -> std::io::Result<FileIdentity> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path)?;
    Ok(FileIdentity {
        device: metadata.dev(),
        inode: metadata.ino(),
    })
}

/// Maps a rusqlite error to the core error a caller can act on.
pub(crate) fn classify(path: &Path, error: rusqlite::Error) -> Error {
    let detail = error.to_string();
    let (code, extended) = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => (Some(failure.code), failure.extended_code),
        _ => (None, 0),
    };
    match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Locked {
            path: path.to_owned(),
            waited: Duration::ZERO,
        },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => Error::Corrupt {
            path: path.to_owned(),
            detail,
        },
        Some(ErrorCode::DiskFull) => Error::DiskFull {
            path: path.to_owned(),
            detail,
        },
        // Only a value of the caller's can be that big: say what to change, not that the
        // database failed.
        Some(ErrorCode::TooBig) => Error::InvalidInput(format!(
            "a value is too big to store in {} ({detail}): SQLite keeps at most 1,000,000,000 \
             bytes in one value (a state's pipeline_context, step_history or output, once \
             encoded as JSON); keep large payloads elsewhere and store a reference to them",
            path.display()
        )),
        Some(ErrorCode::CannotOpen) => Error::CannotOpen {
            path: path.to_owned(),
            detail: cannot_open_hint(path, detail),
        },
        _ => Error::Storage {
            path: path.to_owned(),
            detail: storage_hint(path, extended, detail),
        },
    }
}

/// SQLite's words for the failures a user meets most ("disk I/O error", "attempt to write a
/// readonly database") name neither the file nor the fix when the trouble is with the
/// `-wal` and `-shm` files SQLite keeps beside the database.
fn storage_hint(path: &Path, extended_code: i32, detail: String) -> String {
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.display().to_string(),
        _ => ".".into(),
    };
    match extended_code {
        ffi::SQLITE_IOERR_SHMOPEN | ffi::SQLITE_IOERR_SHMSIZE | ffi::SQLITE_IOERR_SHMMAP => {
            format!(
                "{detail}: cannot create or grow the shared-memory file {}-shm beside the \
                 database; check that {folder} has free space and is writable",
                path.display()
            )
        }
        ffi::SQLITE_READONLY_DIRECTORY | ffi::SQLITE_READONLY_CANTINIT => format!(
            "{detail}: the folder {folder} must be writable, as SQLite keeps the -wal and -shm \
             files beside the database"
        ),
        // SQLite opens a file it may not write read-only, and says so only at the first write.
        ffi::SQLITE_READONLY => format!(
            "{detail}: this process may not write {} (or its -wal/-shm files); check their \
             permissions and owner",
            path.display()
        ),
        _ => detail,
    }
}

/// "unable to open database file" alone does not say what to fix; look at the path.
fn cannot_open_hint(path: &Path, detail: String) -> String {
    if path.is_dir() {
        return format!("{detail}: the path is a directory, not a file");
    }
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() && !parent.exists() => {
            format!("{detail}: its folder {} does not exist", parent.display())
        }
        _ if out_of_file_descriptors(path) => format!(
            "{detail}: this process has as many files open as it may (`ulimit -n`); each \
             backend in use keeps about 7 open (its connections and their -wal and -shm files): \
             close the backends you no longer need, share one per database, or raise the limit"
        ),
        _ => format!("{detail}: check that the folder exists and is writable"),
    }
}

/// Whether opening `path` fails because the process (or the system) has no file descriptor left.
fn out_of_file_descriptors(path: &Path) -> bool {
    const EMFILE: i32 = 24; // the same number on Linux, macOS and the BSDs
    const ENFILE: i32 = 23;
    // The kernel takes a descriptor before it looks the path up, so a missing file tells too.
    let probe = std::fs::File::open(path);
    matches!(
        probe.err().and_then(|e| e.raw_os_error()),
        Some(EMFILE | ENFILE)
    )
}

/// Runs `attempt` until it stops failing with `Error::Locked`, backing off between tries, until
/// `options.lock_wait` has passed since `since`: when the caller's call was made, so that a call
/// queued behind others that waited for the same lock does not wait that long again. Each try
/// waits at most `busy_timeout` inside SQLite, a short slice. The error reports the whole wait.
pub(crate) fn retry_while_locked<T>(
    options: &SqliteOptions,
    since: Instant,
    mut attempt: impl FnMut() -> Result<T, Error>,
) -> Result<T, Error> {
    let mut pause = Duration::from_millis(5);
    loop {
        match attempt() {
            Err(Error::Locked { .. }) => {
                let waited = since.elapsed();
                if waited >= options.lock_wait {
                    return Err(Error::Locked {
                        path: options.path.clone(),
                        waited,
                    });
                }
                log::debug!(
                    "{} is locked; retrying in {pause:?}",
                    options.path.display()
                );
                std::thread::sleep(pause.min(options.lock_wait - waited));
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_too_big_for_sqlite_is_the_callers_to_change() {
        let too_big = rusqlite::Error::SqliteFailure(
            ffi::Error::new(ffi::SQLITE_TOOBIG),
            Some("string or blob too big".into()),
        );
        let Error::InvalidInput(message) = classify(Path::new("wf.db"), too_big) else {
            panic!("not an input error");
        };
        assert!(message.contains("1,000,000,000 bytes"), "{message}");
    }

    fn cache_size(conn: &Connection) -> i64 {
        conn.query_row("PRAGMA cache_size", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn only_the_first_writer_creates_the_file_readers_cannot_write_and_each_role_gets_its_cache() {
        let dir = tempfile::tempdir().unwrap();
        let options = SqliteOptions::new(dir.path().join("roles.db"));
        let missing = open(&options, Role::Reader).unwrap_err();
        assert!(matches!(missing, Error::CannotOpen { .. }), "{missing:?}");
        assert!(
            !options.path.exists(),
            "only the writer's first connection creates the file"
        );
        let writer = open_or_create(&options).unwrap();
        writer.execute_batch("CREATE TABLE t (x)").unwrap();
        let reader = open(&options, Role::Reader).unwrap();
        let refused = reader.execute("INSERT INTO t VALUES (1)", []).unwrap_err();
        assert!(refused.to_string().contains("readonly"), "{refused}");
        assert_eq!(cache_size(&reader), -READER_CACHE_KIB);
        assert_eq!(cache_size(&writer), -WRITER_CACHE_KIB);
    }

    /// `.cargo/config.toml` trims the bundled SQLite; without it every build silently grows by
    /// the extensions again.
    #[test]
    fn the_bundled_sqlite_has_json_but_not_the_extensions_we_never_call() {
        let conn = Connection::open_in_memory().unwrap();
        let mut stmt = conn.prepare("PRAGMA compile_options").unwrap();
        let options: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        for unwanted in [
            "ENABLE_FTS3",
            "ENABLE_FTS5",
            "ENABLE_RTREE",
            "ENABLE_DBSTAT_VTAB",
            "ENABLE_STAT4",
            "SOUNDEX",
        ] {
            assert!(
                !options.iter().any(|o| o == unwanted),
                "{unwanted} in {options:?}"
            );
        }
        for wanted in [
            "OMIT_LOAD_EXTENSION",
            "OMIT_DEPRECATED",
            "OMIT_SHARED_CACHE",
        ] {
            assert!(
                options.iter().any(|o| o == wanted),
                "{wanted} not in {options:?}"
            );
        }
        let value: i64 = conn
            .query_row("SELECT json_extract('{\"a\": 7}', '$.a')", [], |r| r.get(0))
            .unwrap();
        assert_eq!(value, 7);
    }

    #[test]
    fn the_checkpoint_interval_is_the_same_size_whatever_the_page_size() {
        for (page_size, pages) in [(4096, 8192), (65536, 512), (512, 65536)] {
            let conn = Connection::open_in_memory().unwrap();
            conn.pragma_update(None, "page_size", page_size).unwrap();
            conn.execute_batch("CREATE TABLE t (x)").unwrap();
            assert_eq!(
                autocheckpoint_pages(&conn).unwrap(),
                pages,
                "page size {page_size}"
            );
        }
    }
}
