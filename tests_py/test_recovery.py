"""``flujo_sqlite.recover`` / ``SQLiteBackend.recover``: the explicit way out of a corrupt file."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import random
import sqlite3
import struct
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flujo_sqlite import (
    CorruptDatabaseError,
    DatabaseError,
    InvalidStateError,
    InvalidTypeError,
    SQLiteBackend,
    recover,
)

ROWS = 150


def state(index: int) -> dict[str, Any]:
    moment = datetime(2024, 6, 1, 12, 0, tzinfo=UTC) + timedelta(seconds=index)
    return {
        "pipeline_id": f"pipeline-{index % 5}",
        "pipeline_name": "Recovery pipeline",
        "pipeline_version": "1.0",
        "current_step_index": index % 4,
        # Large enough that workflow_state spans many pages, without overflow pages.
        "pipeline_context": {"index": index, "padding": "x" * 600},
        "last_step_output": {"ok": True},
        "status": "completed" if index % 2 else "running",
        "created_at": moment,
        "updated_at": moment,
    }


async def write_states(path: Path) -> None:
    async with SQLiteBackend(path) as backend:
        for index in range(ROWS):
            await backend.save_state(f"run-{index:04}", state(index))


def leaf_pages(path: Path, table: str) -> tuple[int, list[tuple[int, int]]]:
    """The leaf pages of a rowid table in rowid order, each with its number of rows."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
    finally:
        conn.close()
    data = path.read_bytes()
    leaves: list[tuple[int, int]] = []

    def walk(page: int) -> None:
        start = (page - 1) * page_size
        header = start + (100 if page == 1 else 0)
        (cells,) = struct.unpack_from(">H", data, header + 3)
        if data[header] == 0x0D:
            leaves.append((page, cells))
            return
        assert data[header] == 0x05, f"page {page} is not a table b-tree page"
        for cell in range(cells):
            (offset,) = struct.unpack_from(">H", data, header + 12 + 2 * cell)
            walk(struct.unpack_from(">I", data, start + offset)[0])
        walk(struct.unpack_from(">I", data, header + 8)[0])

    walk(root)
    return page_size, leaves


def smash_page(path: Path, page_size: int, page: int) -> None:
    with path.open("r+b") as file:
        file.seek((page - 1) * page_size)
        file.write(random.Random(page).randbytes(page_size))


def names(folder: Path) -> set[str]:
    return {entry.name for entry in folder.iterdir()}


def test_recover_is_a_coroutine_function_on_the_module_and_the_class() -> None:
    assert inspect.iscoroutinefunction(recover)
    assert inspect.iscoroutinefunction(SQLiteBackend.recover)


async def test_a_corrupted_page_costs_only_its_rows_and_the_rest_loads_again(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "wf.db"
    await write_states(db_path)
    assert names(tmp_path) == {"wf.db"}, "the backend checkpoints and removes its WAL on close"
    page_size, leaves = leaf_pages(db_path, "workflow_state")
    damaged_page, lost = leaves[len(leaves) // 2]
    smash_page(db_path, page_size, damaged_page)
    damaged = db_path.read_bytes()

    async with SQLiteBackend(db_path) as backend:
        with pytest.raises(CorruptDatabaseError, match="recover"):
            await backend.list_states()

    report = await recover(db_path)

    backup = Path(report["backup_path"])
    assert backup.parent == tmp_path and backup.name.startswith("wf.db.corrupt-")
    assert backup.read_bytes() == damaged
    assert report["schema_recovered"] is True
    assert report["tables"]["workflow_state"] == {"rescued": ROWS - lost, "skipped": lost}
    assert report["rows_rescued"] == ROWS - lost
    assert report["rows_skipped"] == lost
    assert names(tmp_path) == {"wf.db", backup.name}, "no temporary file is left behind"

    async with SQLiteBackend(db_path) as backend:
        listed = await backend.list_states()
        assert len(listed) == ROWS - lost
        first = await backend.load_state("run-0000")
        last = await backend.load_state(f"run-{ROWS - 1:04}")
        assert first is not None and first["pipeline_context"]["index"] == 0
        assert last is not None and last["pipeline_context"]["index"] == ROWS - 1
        assert last["created_at"] == state(ROWS - 1)["created_at"]
        # The recovered file takes new writes as usual.
        await backend.save_state("after", state(0))
        assert await backend.load_state("after") is not None


def claim_rowid_zero_for_the_last_row(path: Path, page_size: int, page: int) -> int:
    """Rewrites the rowid of the last row of leaf ``page`` (one byte: a rowid below 128) to 0,
    as damage can; returns the rowid it had."""
    data = bytearray(path.read_bytes())
    start = (page - 1) * page_size
    (cells,) = struct.unpack_from(">H", data, start + 3)
    (offset,) = struct.unpack_from(">H", data, start + 8 + 2 * (cells - 1))
    cell = start + offset
    while data[cell] & 0x80:  # the payload length, a varint
        cell += 1
    rowid = data[cell + 1]
    assert rowid < 0x80, "a one-byte rowid"
    data[cell + 1] = 0
    path.write_bytes(bytes(data))
    return rowid


async def test_a_row_out_of_order_before_an_unreadable_page_does_not_loop_the_scan(
    tmp_path: Path,
) -> None:
    """The last row of a damaged leaf claims rowid 0 and the next leaf cannot be read: the scan
    resumed from that row and read the same rows again, forever, at full CPU and with a warning
    per row (a truncated file did this)."""
    db_path = tmp_path / "wf.db"
    await write_states(db_path)
    page_size, leaves = leaf_pages(db_path, "workflow_state")
    (first, _), (second, rows_second) = leaves[0], leaves[1]
    claim_rowid_zero_for_the_last_row(db_path, page_size, first)
    smash_page(db_path, page_size, second)

    report = await asyncio.wait_for(recover(db_path), 120)

    assert report["tables"]["workflow_state"]["rescued"] >= ROWS - rows_second - 1
    async with SQLiteBackend(db_path) as backend:
        assert await backend.load_state(f"run-{ROWS - 1:04}") is not None
        assert await backend.load_state("run-0000") is not None


async def test_a_user_table_with_a_column_named_rowid_is_copied_whole(tmp_path: Path) -> None:
    """A column called ``_rowid_`` (or ``rowid``, ``oid``) takes that name from the real rowid:
    paging by it read NULLs and repeated values wrongly (603 rows became 500, reported as all
    rescued), and a text one raised a PanicException."""
    db_path = tmp_path / "wf.db"
    await write_states(db_path)
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("CREATE TABLE notes (_rowid_ INTEGER, rowid TEXT, body TEXT)")
        conn.executemany(
            "INSERT INTO notes VALUES (?, ?, ?)", [(7, "same", f"same-{i}") for i in range(600)]
        )
        conn.executemany(
            "INSERT INTO notes VALUES (NULL, NULL, ?)", [(f"null-{i}",) for i in range(3)]
        )
        # A generated column, which table_info does not list, shadows the rowid too.
        conn.execute("CREATE TABLE shouts (body TEXT, _rowid_ GENERATED ALWAYS AS (upper(body)))")
        conn.executemany("INSERT INTO shouts (body) VALUES (?)", [(f"s{i}",) for i in range(50)])
        conn.commit()
    finally:
        conn.close()

    report = await recover(db_path)

    assert report["tables"]["notes"] == {"rescued": 603, "skipped": 0}
    assert report["tables"]["shouts"] == {"rescued": 50, "skipped": 0}
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute(
            "SELECT count(*), count(_rowid_), count(rowid) FROM notes"
        ).fetchone() == (
            603,
            600,
            600,
        )
        assert conn.execute("SELECT max(oid) FROM notes").fetchone() == (603,)
        assert conn.execute("SELECT count(*), max(_rowid_) FROM shouts").fetchone() == (50, "S9")
    finally:
        conn.close()


async def test_the_class_alias_recovers_a_healthy_file_whole(tmp_path: Path) -> None:
    db_path = tmp_path / "wf.db"
    await write_states(db_path)
    original = db_path.read_bytes()
    wanted = tmp_path / "kept" / "copy.db"
    wanted.parent.mkdir()

    report = await SQLiteBackend.recover(db_path, backup_path=wanted)

    assert report["backup_path"] == str(wanted)
    assert wanted.read_bytes() == original
    assert report["tables"]["workflow_state"] == {"rescued": ROWS, "skipped": 0}
    assert report["rows_skipped"] == 0
    async with SQLiteBackend(db_path) as backend:
        assert len(await backend.list_workflows()) == ROWS


async def test_random_bytes_become_a_fresh_database_and_stay_in_the_backup(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "wf.db"
    garbage = random.Random(1).randbytes(16384)
    db_path.write_bytes(garbage)
    async with SQLiteBackend(db_path) as backend:
        with pytest.raises(CorruptDatabaseError):
            await backend.load_state("anything")

    report = await recover(os.fspath(db_path))

    assert Path(report["backup_path"]).read_bytes() == garbage
    assert report["schema_recovered"] is False
    assert report["tables"] == {}
    assert (report["rows_rescued"], report["rows_skipped"]) == (0, 0)
    async with SQLiteBackend(db_path) as backend:
        await backend.save_state("fresh", state(1))
        loaded = await backend.load_state("fresh")
        assert loaded is not None and loaded["pipeline_context"]["index"] == 1


async def test_a_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    folder = tmp_path / "wf.db"
    folder.mkdir()
    (folder / "inside.txt").write_text("keep me")

    with pytest.raises(InvalidStateError, match="is a directory"):
        await recover(folder)

    assert names(tmp_path) == {"wf.db"}
    assert names(folder) == {"inside.txt"}
    assert (folder / "inside.txt").read_text() == "keep me"


async def test_paths_that_cannot_name_a_file_are_refused_clearly(tmp_path: Path) -> None:
    for bad in (123, None, b"wf.db"):
        with pytest.raises(InvalidTypeError, match="db_path must be a str or a path"):
            await recover(bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidTypeError, match="backup_path must be a str or a path"):
        await recover(tmp_path / "wf.db", backup_path=5)  # type: ignore[arg-type]
    with pytest.raises(InvalidStateError, match="NUL"):
        await recover(str(tmp_path / "wf.db") + "\0x")
    assert names(tmp_path) == set()


async def test_a_backup_that_cannot_be_written_is_reported_as_the_file_system_s_refusal(
    tmp_path: Path,
) -> None:
    db_path = tmp_path / "wf.db"
    db_path.write_bytes(b"garbage" * 100)
    backup = tmp_path / "no-such-folder" / "wf.bak"
    with pytest.raises(DatabaseError) as raised:
        await recover(db_path, backup_path=backup)
    message = str(raised.value)
    assert message.startswith(f"cannot write the backup {backup}: ")
    assert "No such file or directory" in message and "SQLite" not in message
    assert db_path.read_bytes() == b"garbage" * 100


async def test_a_file_open_in_a_backend_is_refused_until_it_is_closed(tmp_path: Path) -> None:
    db_path = tmp_path / "wf.db"
    backend = SQLiteBackend(db_path)
    try:
        await backend.save_state("run", state(3))
        before = names(tmp_path)
        # The same file under another spelling of its path is recognised too.
        other_spelling = tmp_path / "." / "wf.db"
        with pytest.raises(InvalidStateError, match="close it first"):
            await recover(other_spelling)
        with pytest.raises(InvalidStateError, match="close it first"):
            await SQLiteBackend.recover(db_path)
        assert names(tmp_path) == before, "nothing was backed up or replaced"
        assert await backend.load_state("run") is not None
    finally:
        await backend.close()

    report = await recover(db_path)
    assert report["tables"]["workflow_state"] == {"rescued": 1, "skipped": 0}


async def test_a_backend_first_used_during_a_recovery_waits_for_the_rebuilt_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A caller that stopped waiting for recover() (a timeout) cannot wait for it any more: a
    backend it opens meanwhile must not write into the file being replaced."""
    bulk_rows = 60_000
    db_path = tmp_path / "wf.db"
    await write_states(db_path)
    conn = sqlite3.connect(db_path)
    with conn:  # enough rows that the rebuild takes a while (~1 s; under load, longer)
        conn.executemany(
            "INSERT INTO workflow_state (run_id, pipeline_id, pipeline_name, pipeline_version, "
            "current_step_index, pipeline_context, status, created_at, updated_at) "
            "SELECT ?, pipeline_id, pipeline_name, pipeline_version, current_step_index, "
            "pipeline_context, status, created_at, updated_at FROM workflow_state "
            "WHERE run_id = 'run-0001'",
            ((f"bulk-{i}",) for i in range(bulk_rows)),
        )
    conn.close()
    caplog.set_level(logging.INFO, logger="flujo_sqlite")

    recovery = asyncio.ensure_future(recover(db_path))
    while not any(name.startswith(".wf.db.recover-") for name in names(tmp_path)):
        if recovery.done():
            pytest.fail("the recovery ended before its rebuilt file was seen: raise bulk_rows")
        await asyncio.sleep(0.001)
    assert not recovery.done()
    async with SQLiteBackend(db_path) as backend:
        await backend.save_state("saved-during-recovery", state(7))
    assert recovery.done()
    assert (await recovery)["rows_rescued"] == ROWS + bulk_rows
    assert "waiting for the recovery of" in caplog.text

    async with SQLiteBackend(db_path) as backend:
        assert await backend.load_state("saved-during-recovery") is not None
        assert (await backend.get_workflow_stats())["total_workflows"] == ROWS + bulk_rows + 1


async def test_a_missing_file_becomes_a_fresh_database_without_a_backup(tmp_path: Path) -> None:
    db_path = tmp_path / "new.db"
    report = await recover(db_path)
    assert report["backup_path"] is None
    assert report["schema_recovered"] is False
    async with SQLiteBackend(db_path) as backend:
        assert await backend.list_states() == []
