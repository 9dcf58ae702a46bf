"""Rescuing what a damaged database file still holds: :func:`recover`.

flujo-sqlite never moves or replaces a database on its own. When a file is corrupt, every call
raises :class:`~flujo_sqlite.errors.CorruptDatabaseError` and the file is left as it is; this
module is the explicit, user-requested way out.
"""

from __future__ import annotations

import asyncio
import os
from typing import TypedDict, cast

from . import _native
from .backend import _file_path, _installed_flujo_layout

__all__ = ["RecoveryReport", "TableRecovery", "recover"]


class TableRecovery(TypedDict):
    rescued: int
    skipped: int


class RecoveryReport(TypedDict):
    backup_path: str | None
    tables: dict[str, TableRecovery]
    rows_rescued: int
    rows_skipped: int
    schema_recovered: bool


async def recover(
    db_path: str | os.PathLike[str], *, backup_path: str | os.PathLike[str] | None = None
) -> RecoveryReport:
    """Back up a damaged database, rebuild it from every row that can still be read, and put
    the rebuilt database in its place.

    1. The file and its ``-wal``/``-shm``/``-journal`` sidecars are **copied** (never renamed)
       to ``backup_path`` (default ``<name>.corrupt-<UTC YYYYmmddTHHMMSSZ>`` beside it; the
       sidecars get ``-wal``/``-shm``/``-journal`` appended) and fsynced. An existing file is
       never overwritten: ``.1``, ``.2``... is appended instead. A directory as ``backup_path``
       receives the default name.
    2. Every readable row of every table is copied, with its rowid, into a new database built
       under a temporary name in the same folder, with the original ``CREATE`` statements.
       A damaged page costs only the rows on it. If the schema itself is unreadable (or the
       file is not SQLite at all, is empty, or is missing), nothing is rescued and the new
       database gets the fresh layout a new ``SQLiteBackend`` would create.
    3. The new database (in WAL mode) is fsynced; the original's sidecars are removed (they are
       in the backup) and the new database is renamed over the original.

    Returns ``{"backup_path", "tables": {name: {"rescued", "skipped"}}, "rows_rescued",
    "rows_skipped", "schema_recovered"}``. ``backup_path`` is ``None`` when nothing was at the
    path. ``skipped`` counts rows known to be lost: listed by one of the table's indexes but
    unreadable, or read but refused by the table's constraints (a table without a readable
    index counts at least one per damaged region). Progress is logged to the
    ``flujo_sqlite.sqlite.recovery`` logger.

    **Nothing may have the file open while this runs**: close every ``SQLiteBackend`` on it
    (one open in this process, even one dropped and still finishing its queued work, is
    detected, and ``InvalidStateError`` is raised; a backend of this process whose first call
    comes while the recovery works waits for the rebuilt file), and stop other processes
    (Flujo, ``flujo lens``, an ``sqlite3`` shell) using it. A directory at
    ``db_path`` raises ``InvalidStateError`` and nothing is touched. The work runs on a worker
    thread without the GIL; cancelling the ``await`` does not stop a recovery that has begun,
    which then finishes (or fails, leaving the original in place) on its own.
    """
    path = _file_path(db_path, "db_path")
    backup = None if backup_path is None else _file_path(backup_path, "backup_path")
    report = await asyncio.to_thread(
        _native.recover,
        os.fspath(path),
        backup_path=None if backup is None else os.fspath(backup),
        fresh_layout=_installed_flujo_layout(),
    )
    return cast(RecoveryReport, report)
