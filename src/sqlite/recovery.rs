//! Rescuing what a damaged database file still holds, on the user's explicit request.
//!
//! This is the only code that replaces a user's file, so it never loses a byte: the file and its
//! sidecars are first copied (never renamed) to a backup and fsynced; rows are read from a
//! private scratch copy of that backup, never from the original; the new database is built
//! beside the original under a temporary name, fsynced and renamed over it. Until that rename
//! the original is untouched, so any failure before it leaves things as they were.
//!
//! Rows are read in rowid order in bounded batches. When a read fails on a damaged page, we probe
//! further and further ahead, then bisect back to the first rowid that reads again, so one bad
//! page costs only the rows on it. Afterwards the table's indexes (which live on other pages)
//! name the rowids that were in the damaged ranges: each is tried once more by itself, and those
//! that still fail are counted as skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::{Connection, ErrorCode, OpenFlags, Statement, ToSql};

use super::open_files;
use super::options::SqliteOptions;
use super::schema;
use crate::engine::FreshLayout;
use crate::error::{Error, Result};

/// Files SQLite keeps beside a database. A `-journal` is included because a hot rollback journal
/// left next to the rebuilt file would be played back into it.
const SIDECARS: [&str; 3] = ["-wal", "-shm", "-journal"];

/// Rows read per query; small enough that a damaged page is met after little work is wasted.
const BATCH_ROWS: usize = 500;

/// What was rescued from one table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableRecovery {
    pub rescued: u64,
    /// Rows known to be lost: listed by one of the table's indexes but unreadable, or read but
    /// refused by the table's constraints. A table without a readable index counts at least one
    /// per damaged region, since what that region held cannot be known.
    pub skipped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Where the damaged file (and its sidecars, with `-wal`/`-shm`/`-journal` appended) was
    /// copied; `None` when nothing was at the path.
    pub backup_path: Option<PathBuf>,
    pub tables: BTreeMap<String, TableRecovery>,
    pub rows_rescued: u64,
    pub rows_skipped: u64,
    /// True when the tables were recreated from the damaged file's own schema; false when that
    /// was unreadable or empty and the fresh layout was used instead.
    pub schema_recovered: bool,
}

/// Backs up `path`, rebuilds it from every row that can still be read, and puts the rebuilt
/// database (in WAL mode) in its place. Must not run while any connection has the file open.
pub fn recover(
    path: &Path,
    backup_path: Option<PathBuf>,
    fresh_layout: FreshLayout,
) -> Result<RecoveryReport> {
    let path = resolve(path)?;
    let _recovering = open_files::recovery_starts(&path)?;
    let folder = folder_of(&path);
    fs::create_dir_all(&folder).map_err(io_error(&folder, "cannot create the folder"))?;
    log::info!("recovering {}", path.display());

    let backup = back_up(&path, backup_path)?;
    let reading = ScratchFiles::new(&path, "read");
    let rebuilt = ScratchFiles::new(&path, "new");
    let source = match &backup {
        Some(backup) => Some(reading.copy_from(backup)?),
        None => None,
    };
    let (tables, schema_recovered) = rebuild(source, &rebuilt.path, fresh_layout)?;
    drop(reading);
    if let Ok(original) = fs::metadata(&path) {
        // The rebuilt file gets the original's permissions, not the umask's.
        fs::set_permissions(&rebuilt.path, original.permissions()).map_err(io_error(
            &rebuilt.path,
            "cannot copy the file's permissions",
        ))?;
    }
    sync_file(&rebuilt.path)?;

    // The stale sidecars go before the rename (they are in the backup): a WAL left beside the
    // new file would be played back into it.
    for suffix in SIDECARS {
        let sidecar = with_suffix(&path, suffix);
        match fs::remove_file(&sidecar) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error(&sidecar, "cannot remove the stale sidecar")(e));
            }
            _ => {}
        }
    }
    fs::rename(&rebuilt.path, &path).map_err(io_error(&path, "cannot put the rebuilt file"))?;
    rebuilt.keep();
    sync_folder(&folder)?;

    let rows_rescued = tables.values().map(|t| t.rescued).sum();
    let rows_skipped = tables.values().map(|t| t.skipped).sum();
    log::info!(
        "recovered {}: {rows_rescued} rows rescued, {rows_skipped} skipped{}",
        path.display(),
        backup
            .as_ref()
            .map(|b| format!("; the damaged file is kept at {}", b.display()))
            .unwrap_or_default()
    );
    Ok(RecoveryReport {
        backup_path: backup,
        tables,
        rows_rescued,
        rows_skipped,
        schema_recovered,
    })
}

/// The file to replace: a symlink's target, so the link keeps pointing at the database.
fn resolve(path: &Path) -> Result<PathBuf> {
    if path.as_os_str().is_empty() {
        return Err(Error::InvalidInput("recover() needs a file path".into()));
    }
    let resolved = match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(io_error(path, "cannot follow the symbolic link"))?
        }
        _ => path.to_owned(),
    };
    if resolved.is_dir() {
        return Err(Error::InvalidInput(format!(
            "{} is a directory, not a database file; pass the path of the database file itself",
            resolved.display()
        )));
    }
    Ok(resolved)
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn io_error<'a>(path: &'a Path, what: &'a str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |error| Error::System {
        path: path.to_owned(),
        what: what.to_owned(),
        detail: error.to_string(),
    }
}

/// Copies the file and its sidecars to a backup that overwrites nothing, fsynced. Returns the
/// backup's path, or `None` when neither the file nor a sidecar exists.
fn back_up(path: &Path, requested: Option<PathBuf>) -> Result<Option<PathBuf>> {
    let present: Vec<&str> = file_and_sidecars()
        .filter(|suffix| with_suffix(path, suffix).exists())
        .collect();
    if present.is_empty() {
        log::info!("{} does not exist: nothing to back up", path.display());
        return Ok(None);
    }
    let base = match requested {
        Some(requested) if requested.is_dir() => requested.join(default_backup_name(path)),
        Some(requested) => requested,
        None => folder_of(path).join(default_backup_name(path)),
    };
    for attempt in 0u32.. {
        let candidate = if attempt == 0 {
            base.clone()
        } else {
            with_suffix(&base, &format!(".{attempt}"))
        };
        // A sidecar of another database under this name would be read as part of ours.
        if file_and_sidecars().any(|suffix| with_suffix(&candidate, suffix).exists()) {
            continue;
        }
        let mut created = Vec::new();
        let mut taken = false;
        for suffix in &present {
            let target = with_suffix(&candidate, suffix);
            match copy_new(&with_suffix(path, suffix), &target) {
                Ok(()) => created.push(target),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    taken = true;
                    break;
                }
                Err(e) => {
                    remove_all(&created);
                    return Err(io_error(&target, "cannot write the backup")(e));
                }
            }
        }
        if taken {
            // Only copies made by this attempt are removed; the existing file is not ours.
            remove_all(&created);
            continue;
        }
        sync_folder(&folder_of(&candidate))?;
        log::info!("backed up {} to {}", path.display(), candidate.display());
        return Ok(Some(candidate));
    }
    unreachable!("some backup name is free")
}

/// The suffixes of the database file itself ("") and of its sidecars.
fn file_and_sidecars() -> impl Iterator<Item = &'static str> {
    std::iter::once("").chain(SIDECARS)
}

fn default_backup_name(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "database".into());
    let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
    format!("{name}.corrupt-{stamp}")
}

/// Copies `from` to a new file `to` (failing if `to` exists) and fsyncs the copy.
fn copy_new(from: &Path, to: &Path) -> io::Result<()> {
    let mut source = File::open(from)?;
    let mut target = OpenOptions::new().write(true).create_new(true).open(to)?;
    let copied = io::copy(&mut source, &mut target).and_then(|_| target.sync_all());
    if copied.is_err() {
        drop(target);
        let _ = fs::remove_file(to);
    }
    copied
}

fn remove_all(paths: &[PathBuf]) {
    for path in paths {
        let _ = fs::remove_file(path);
    }
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_error(path, "cannot fsync"))
}

/// Makes a rename in `folder` durable.
fn sync_folder(folder: &Path) -> Result<()> {
    sync_file(folder)
}

/// A database under a temporary name beside the original, removed with its sidecars on drop
/// unless kept.
struct ScratchFiles {
    path: PathBuf,
    keep: std::cell::Cell<bool>,
}

impl ScratchFiles {
    fn new(original: &Path, role: &str) -> Self {
        let name = original
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let unique = format!(".{name}.recover-{}-{nanos}.{role}", std::process::id());
        ScratchFiles {
            path: folder_of(original).join(unique),
            keep: std::cell::Cell::new(false),
        }
    }

    /// Copies the backup's main file, WAL and rollback journal (not its `-shm`, which SQLite
    /// rebuilds) to this scratch path, so reading can never change a byte of the backup, then
    /// lets SQLite play a hot journal back, as it would on the next open of the original: the
    /// file then holds what was committed, not a transaction cut short.
    fn copy_from(&self, backup: &Path) -> Result<&Path> {
        for suffix in ["", "-wal", "-journal"] {
            let from = with_suffix(backup, suffix);
            let to = with_suffix(&self.path, suffix);
            let copied = if from.exists() {
                fs::copy(&from, &to).map(drop)
            } else if suffix.is_empty() {
                File::create(&to).map(drop)
            } else {
                Ok(())
            };
            copied.map_err(io_error(&to, "cannot make a scratch copy"))?;
        }
        if with_suffix(&self.path, "-journal").exists() {
            // A read with write access is what makes SQLite roll a hot journal back.
            let played_back = Connection::open_with_flags(
                &self.path,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .and_then(|conn| conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0)));
            if let Err(e) = played_back {
                log::warn!(
                    "cannot play back the rollback journal ({e}); reading the file as it is"
                );
            }
        }
        Ok(&self.path)
    }

    fn keep(&self) {
        self.keep.set(true);
    }
}

impl Drop for ScratchFiles {
    fn drop(&mut self) {
        if !self.keep.get() {
            let _ = fs::remove_file(&self.path);
        }
        for suffix in SIDECARS {
            let _ = fs::remove_file(with_suffix(&self.path, suffix));
        }
    }
}

/// One row of `sqlite_master`.
struct SchemaEntry {
    kind: String,
    name: String,
    table: String,
    sql: Option<String>,
}

impl SchemaEntry {
    fn is_internal(&self) -> bool {
        self.name.starts_with("sqlite_")
    }
}

/// Everything the damaged file still tells about itself.
#[derive(Default)]
struct SourceSchema {
    entries: Vec<SchemaEntry>,
    user_version: i64,
}

/// Builds the new database at `target` from what `source` (the scratch copy) still holds.
fn rebuild(
    source: Option<&Path>,
    target: &Path,
    fresh_layout: FreshLayout,
) -> Result<(BTreeMap<String, TableRecovery>, bool)> {
    let fail = |e| storage(target, e);
    let source = source.and_then(|path| match open_read_only(path) {
        Ok(conn) => Some(conn),
        Err(e) => {
            log::warn!("cannot open the damaged copy at all ({e}); rescuing nothing");
            None
        }
    });
    let schema = source.as_ref().map(read_schema).unwrap_or_default();

    let mut conn = Connection::open_with_flags(
        target,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(fail)?;
    // A private file, fsynced by hand before it replaces the original.
    conn.execute_batch("PRAGMA journal_mode = MEMORY; PRAGMA synchronous = OFF;")
        .map_err(fail)?;

    let mut tables = BTreeMap::new();
    let transaction = conn.transaction().map_err(fail)?;
    let recreated = recreate_tables(&transaction, &schema, target)?;
    if let Some(source) = &source {
        for table in &recreated {
            let indexes: Vec<&str> = schema
                .entries
                .iter()
                .filter(|e| e.kind == "index" && e.table == *table)
                .map(|e| e.name.as_str())
                .collect();
            let outcome = copy_table(source, &transaction, table, &indexes, target)?;
            log::info!(
                "table {table}: {} rows rescued, {} skipped",
                outcome.rescued,
                outcome.skipped
            );
            tables.insert(table.clone(), outcome);
        }
        if !recreated.is_empty() {
            copy_autoincrement_counters(source, &transaction, target)?;
        }
    }
    if !recreated.is_empty() {
        recreate_the_rest(&transaction, &schema, &recreated, target)?;
        transaction
            .pragma_update(None, "user_version", schema.user_version)
            .map_err(fail)?;
    }
    transaction.commit().map_err(fail)?;

    let schema_recovered = !recreated.is_empty();
    if !schema_recovered {
        log::warn!("no table could be recreated from the damaged file; creating the fresh layout");
        let mut options = SqliteOptions::new(target);
        options.fresh_layout = fresh_layout;
        schema::prepare(&mut conn, &options)?;
    }
    let _: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(fail)?;
    // Closing the last connection checkpoints the WAL into the file and deletes it.
    conn.close().map_err(|(_, e)| fail(e))?;
    Ok((tables, schema_recovered))
}

fn storage(path: &Path, error: rusqlite::Error) -> Error {
    Error::Storage {
        path: path.to_owned(),
        detail: error.to_string(),
    }
}

fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
}

/// Reads `sqlite_master` as far as it goes; a damaged schema yields what came before the damage.
fn read_schema(conn: &Connection) -> SourceSchema {
    let mut schema = SourceSchema::default();
    let mut complete = read_schema_entries(conn, &mut schema.entries);
    if complete.is_err() && schema.entries.is_empty() {
        // Lets SQLite skip schema entries it cannot parse instead of refusing every query.
        if conn.pragma_update(None, "writable_schema", true).is_ok() {
            complete = read_schema_entries(conn, &mut schema.entries);
        }
    }
    if let Err(e) = complete {
        log::warn!(
            "the schema is damaged ({e}); {} entries could be read",
            schema.entries.len()
        );
    }
    schema.user_version = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap_or(0);
    schema
}

fn read_schema_entries(conn: &Connection, into: &mut Vec<SchemaEntry>) -> rusqlite::Result<()> {
    let mut stmt =
        conn.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY rowid")?;
    let mut rows = stmt.query([])?;
    while let Some(row) = rows.next()? {
        into.push(SchemaEntry {
            kind: row.get(0)?,
            name: row.get(1)?,
            table: row.get(2)?,
            sql: row.get(3)?,
        });
    }
    Ok(())
}

/// Creates the damaged file's tables with their original statements; returns those created.
fn recreate_tables(conn: &Connection, schema: &SourceSchema, target: &Path) -> Result<Vec<String>> {
    let mut created = Vec::new();
    for entry in schema.entries.iter().filter(|e| e.kind == "table") {
        let Some(sql) = entry.sql.as_deref() else {
            continue;
        };
        if entry.is_internal() {
            continue;
        }
        if sql
            .trim_start()
            .to_ascii_uppercase()
            .starts_with("CREATE VIRTUAL")
        {
            log::warn!("virtual table {} is not rescued", entry.name);
            continue;
        }
        match conn.execute_batch(sql) {
            Ok(()) => created.push(entry.name.clone()),
            Err(e) if is_statement_error(&e) => {
                log::warn!(
                    "table {} cannot be recreated ({e}); not rescued",
                    entry.name
                );
            }
            Err(e) => return Err(storage(target, e)),
        }
    }
    Ok(created)
}

/// Indexes, views and triggers, after the rows so triggers do not fire on rescued rows.
fn recreate_the_rest(
    conn: &Connection,
    schema: &SourceSchema,
    tables: &[String],
    target: &Path,
) -> Result<()> {
    for kind in ["index", "view", "trigger"] {
        for entry in schema.entries.iter().filter(|e| e.kind == kind) {
            let Some(sql) = entry.sql.as_deref() else {
                continue; // an automatic index, made again by its table's constraint
            };
            if entry.is_internal() || (kind != "view" && !tables.contains(&entry.table)) {
                continue;
            }
            match conn.execute_batch(sql) {
                Ok(()) => {}
                Err(e) if is_statement_error(&e) => {
                    log::warn!("{kind} {} cannot be recreated ({e})", entry.name);
                }
                Err(e) => return Err(storage(target, e)),
            }
        }
    }
    Ok(())
}

/// Keeps AUTOINCREMENT tables from reusing ids of rows deleted (or lost) before the damage.
fn copy_autoincrement_counters(
    source: &Connection,
    target: &Connection,
    target_path: &Path,
) -> Result<()> {
    let counters = (|| -> rusqlite::Result<Vec<(String, i64)>> {
        let mut stmt = source.prepare("SELECT name, seq FROM sqlite_sequence")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    })();
    let Ok(counters) = counters else {
        return Ok(()); // no AUTOINCREMENT table, or its counters are unreadable
    };
    let has_sequence = target
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'sqlite_sequence'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .map_err(|e| storage(target_path, e))?
        > 0;
    if !has_sequence {
        return Ok(());
    }
    for (name, seq) in counters {
        let updated = target
            .execute(
                "UPDATE sqlite_sequence SET seq = max(seq, ?2) WHERE name = ?1",
                rusqlite::params![name, seq],
            )
            .map_err(|e| storage(target_path, e))?;
        if updated == 0 {
            target
                .execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES (?1, ?2)",
                    rusqlite::params![name, seq],
                )
                .map_err(|e| storage(target_path, e))?;
        }
    }
    Ok(())
}

/// A failure of one statement (bad SQL, a constraint, a name taken) rather than of the file.
fn is_statement_error(error: &rusqlite::Error) -> bool {
    match error {
        rusqlite::Error::SqliteFailure(failure, _) => matches!(
            failure.code,
            ErrorCode::Unknown
                | ErrorCode::ConstraintViolation
                | ErrorCode::TypeMismatch
                | ErrorCode::TooBig
        ),
        _ => true,
    }
}

fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// One value as read, bytes kept exactly (damaged text need not be valid UTF-8).
enum Cell {
    Null,
    Integer(i64),
    Real(f64),
    Text(Vec<u8>),
    Blob(Vec<u8>),
}

impl ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            Cell::Null => ValueRef::Null,
            Cell::Integer(i) => ValueRef::Integer(*i),
            Cell::Real(r) => ValueRef::Real(*r),
            Cell::Text(t) => ValueRef::Text(t),
            Cell::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl From<ValueRef<'_>> for Cell {
    fn from(value: ValueRef<'_>) -> Self {
        match value {
            ValueRef::Null => Cell::Null,
            ValueRef::Integer(i) => Cell::Integer(i),
            ValueRef::Real(r) => Cell::Real(r),
            ValueRef::Text(t) => Cell::Text(t.to_vec()),
            ValueRef::Blob(b) => Cell::Blob(b.to_vec()),
        }
    }
}

/// A row: its rowid first, then the table's columns.
type Row = Vec<Cell>;

/// Reads rows of one table from the damaged copy, starting at a rowid.
struct TableReader<'conn> {
    scan: Statement<'conn>,
    width: usize,
}

impl TableReader<'_> {
    /// Up to `limit` rows with rowid >= `start`, and the error that stopped the read early.
    fn read(&mut self, start: i64, limit: usize) -> (Vec<Row>, Option<rusqlite::Error>) {
        let mut read = Vec::new();
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut rows = match self.scan.query(rusqlite::params![start, limit]) {
            Ok(rows) => rows,
            Err(e) => return (read, Some(e)),
        };
        loop {
            match rows.next() {
                Ok(Some(row)) => {
                    let cells: rusqlite::Result<Row> = (0..=self.width)
                        .map(|i| row.get_ref(i).map(Cell::from))
                        .collect();
                    match cells {
                        Ok(cells) => read.push(cells),
                        Err(e) => return (read, Some(e)),
                    }
                }
                Ok(None) => return (read, None),
                Err(e) => return (read, Some(e)),
            }
        }
    }

    fn readable_from(&mut self, start: i64) -> bool {
        self.read(start, 1).1.is_none()
    }

    /// Reading from `failed_at` fails; the smallest later rowid from which reading works again,
    /// or `None` if none does. Probes 1, 10, 100... ahead, then bisects back.
    fn next_readable(&mut self, failed_at: i64) -> Option<i64> {
        // In i128, so that the probes from i64::MIN (damage before the first row read) go on
        // past zero up to i64::MAX.
        let last = i128::from(i64::MAX);
        let mut failing = i128::from(failed_at);
        let mut step: i128 = 1;
        let readable = loop {
            let probe = (i128::from(failed_at) + step).min(last);
            if probe == failing {
                return None; // reached the largest rowid there is
            }
            if self.readable_from(i64::try_from(probe).expect("at most i64::MAX")) {
                break probe;
            }
            failing = probe;
            step *= 10;
        };
        let (mut low, mut high) = (failing, readable);
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            let start = i64::try_from(middle).expect("between two i64 values");
            if self.readable_from(start) {
                high = middle;
            } else {
                low = middle;
            }
        }
        Some(i64::try_from(high).expect("an i64 value"))
    }
}

fn row_id(row: &Row) -> i64 {
    match row.first() {
        Some(Cell::Integer(id)) => *id,
        _ => unreachable!("the first column is the rowid"),
    }
}

/// Copies every readable row of `table` from `source` into the same table of `target`.
fn copy_table(
    source: &Connection,
    target: &Connection,
    table: &str,
    indexes: &[&str],
    target_path: &Path,
) -> Result<TableRecovery> {
    let mut outcome = TableRecovery::default();
    let columns = table_columns(target, table).map_err(|e| storage(target_path, e))?;
    if columns.is_empty() {
        return Ok(outcome);
    }
    let column_list = columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(", ");
    let quoted_table = quote(table);
    let scan = match rowid_alias(target, table).map_err(|e| storage(target_path, e))? {
        Some(rowid) => source
            .prepare(&format!(
                "SELECT {rowid}, {column_list} FROM {quoted_table} \
                 WHERE {rowid} >= ?1 ORDER BY {rowid} LIMIT ?2"
            ))
            .map(|scan| (rowid, scan))
            // A WITHOUT ROWID table, or one whose definition is damaged.
            .map_err(|e| format!("cannot be read by rowid ({e})")),
        None => Err("has columns named rowid, oid and _rowid_".to_owned()),
    };
    let (rowid, scan) = match scan {
        Ok(found) => found,
        Err(why) => {
            log::warn!("table {table} {why}; reading it in one pass");
            return copy_without_rowid(
                source,
                target,
                table,
                &column_list,
                columns.len(),
                target_path,
            );
        }
    };
    let mut reader = TableReader {
        scan,
        width: columns.len(),
    };
    let placeholders = vec!["?"; columns.len() + 1].join(", ");
    let mut insert = target
        .prepare(&format!(
            "INSERT INTO {quoted_table} ({rowid}, {column_list}) VALUES ({placeholders})"
        ))
        .map_err(|e| storage(target_path, e))?;
    let mut store = |row: &Row, outcome: &mut TableRecovery| -> Result<()> {
        match insert.execute(rusqlite::params_from_iter(row)) {
            Ok(_) => outcome.rescued += 1,
            Err(e) if is_statement_error(&e) => {
                log::warn!(
                    "row {} of {table} was read but is refused: {e}",
                    row_id(row)
                );
                outcome.skipped += 1;
            }
            Err(e) => return Err(storage(target_path, e)),
        }
        Ok(())
    };

    // Rowid ranges [from, to) that could not be read, for the second pass below.
    let mut damaged: Vec<(i64, i64)> = Vec::new();
    let mut start = i64::MIN;
    // `start` only ever grows, so the loop ends: a damaged page can hand back rows out of
    // order (a rowid below `start`), which must not send the scan back.
    loop {
        let (rows, failure) = reader.read(start, BATCH_ROWS);
        for row in &rows {
            store(row, &mut outcome)?;
        }
        let next = rows
            .iter()
            .map(row_id)
            .filter(|&id| id >= start)
            .max()
            .map(|id| id.checked_add(1));
        let error = match (failure, next) {
            (None, _) if rows.len() < BATCH_ROWS => break,
            (_, Some(None)) => break, // the largest rowid there is
            (None, Some(Some(next))) => {
                start = next;
                continue;
            }
            (None, None) => format!("{BATCH_ROWS} rows before rowid {start} came back"),
            (Some(error), _) => error.to_string(),
        };
        let failed_at = next.flatten().unwrap_or(start);
        let resumed = reader.next_readable(failed_at);
        log::warn!(
            "table {table}: rows from rowid {failed_at} are unreadable ({error}); {}",
            match resumed {
                Some(resumed) => format!("reading again from rowid {resumed}"),
                None => "no later row is readable".into(),
            }
        );
        damaged.push((failed_at, resumed.unwrap_or(i64::MAX)));
        match resumed {
            Some(resumed) => start = resumed,
            None => break,
        }
    }
    if damaged.is_empty() {
        return Ok(outcome);
    }

    // The indexes live on other pages: they name the rowids the damaged ranges held.
    let mut listed = BTreeSet::new();
    let mut any_index_read = false;
    for index in indexes {
        let read = rowids_in_index(source, table, rowid, index, &damaged, &mut listed);
        any_index_read |= read;
    }
    if !any_index_read {
        log::warn!("table {table} has no readable index; its lost rows cannot be counted exactly");
        outcome.skipped += damaged.len() as u64;
        return Ok(outcome);
    }
    for rowid in listed {
        let (rows, failure) = reader.read(rowid, 1);
        match rows.first() {
            Some(row) if failure.is_none() && row_id(row) == rowid => store(row, &mut outcome)?,
            _ => outcome.skipped += 1,
        }
    }
    Ok(outcome)
}

/// Adds to `into` the rowids that `index` lists inside the `damaged` ranges; false if the index
/// could not be read at all. A damaged index gives what it lists before its damage.
fn rowids_in_index(
    source: &Connection,
    table: &str,
    rowid: &str,
    index: &str,
    damaged: &[(i64, i64)],
    into: &mut BTreeSet<i64>,
) -> bool {
    let sql = format!(
        "SELECT {rowid} FROM {} INDEXED BY {}",
        quote(table),
        quote(index)
    );
    let Ok(mut stmt) = source.prepare(&sql) else {
        return false; // e.g. a partial index, which cannot list the whole table
    };
    let Ok(mut rows) = stmt.query([]) else {
        return false;
    };
    let mut read_any = false;
    loop {
        match rows.next() {
            Ok(Some(row)) => {
                read_any = true;
                let Ok(rowid) = row.get::<_, i64>(0) else {
                    continue;
                };
                if damaged
                    .iter()
                    .any(|&(from, to)| rowid >= from && (rowid < to || to == i64::MAX))
                {
                    into.insert(rowid);
                }
            }
            Ok(None) => return true,
            Err(e) => {
                log::warn!("index {index} is damaged too ({e}); using what it listed");
                return read_any;
            }
        }
    }
}

/// A table without rowids is read in key order until the first unreadable row.
fn copy_without_rowid(
    source: &Connection,
    target: &Connection,
    table: &str,
    column_list: &str,
    width: usize,
    target_path: &Path,
) -> Result<TableRecovery> {
    let mut outcome = TableRecovery::default();
    let quoted_table = quote(table);
    let placeholders = vec!["?"; width].join(", ");
    let mut insert = target
        .prepare(&format!(
            "INSERT INTO {quoted_table} ({column_list}) VALUES ({placeholders})"
        ))
        .map_err(|e| storage(target_path, e))?;
    let Ok(mut scan) = source.prepare(&format!("SELECT {column_list} FROM {quoted_table}")) else {
        outcome.skipped += 1;
        return Ok(outcome);
    };
    let Ok(mut rows) = scan.query([]) else {
        outcome.skipped += 1;
        return Ok(outcome);
    };
    loop {
        match rows.next() {
            Ok(Some(row)) => {
                let cells: rusqlite::Result<Row> =
                    (0..width).map(|i| row.get_ref(i).map(Cell::from)).collect();
                let Ok(cells) = cells else {
                    outcome.skipped += 1;
                    break;
                };
                match insert.execute(rusqlite::params_from_iter(&cells)) {
                    Ok(_) => outcome.rescued += 1,
                    Err(e) if is_statement_error(&e) => outcome.skipped += 1,
                    Err(e) => return Err(storage(target_path, e)),
                }
            }
            Ok(None) => break,
            Err(e) => {
                log::warn!(
                    "table {table} is unreadable past {} rows ({e})",
                    outcome.rescued
                );
                outcome.skipped += 1;
                break;
            }
        }
    }
    Ok(outcome)
}

/// A name for the rowid of `table`: a column (a generated one too) called `_rowid_`, `rowid` or
/// `oid`, in any case, takes that name over. `None` when all three are columns.
fn rowid_alias(conn: &Connection, table: &str) -> rusqlite::Result<Option<&'static str>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_xinfo(?1)")?;
    let names = stmt
        .query_map([table], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(["_rowid_", "rowid", "oid"]
        .into_iter()
        .find(|alias| !names.iter().any(|name| name.eq_ignore_ascii_case(alias))))
}

/// The columns an INSERT can name (generated columns are left out by `table_info`).
fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
    let names = stmt.query_map([table], |r| r.get(0))?;
    names.collect()
}
