"""The public coroutines of ``SQLiteBackend``: return shapes, ordering, filters, paging, time
windows, lifecycle, concurrency and input validation.

Return shapes follow Flujo 0.6.11 (the user guide's release), a superset of 0.4.35's (spec 3.1,
3.2): 0.4.35's keys plus the five background-task keys. Where we deliberately differ from Flujo (exact time
windows, offset without limit, input validation, never touching a file that is not a database),
the tests assert our behaviour.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import enum
import gc
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any

import pydantic
import pytest
from conftest import (
    BACKGROUND_DEFAULTS,
    EMPTY_WORKFLOW_STATS,
    LOAD_STATE_KEYS,
    LOAD_STATE_KEYS_0435,
    REQUIRED_KEYS,
    STATUSES,
    UTC,
    WORKFLOW_ITEM_KEYS,
    WORKFLOW_STATS_KEYS,
    build_state,
    raw_rows,
    run_python,
    sql_in_another_process,
    utc_now,
)
from flujo_sqlite import SQLiteBackend, recover
from flujo_sqlite._native import wait_for_dropped_backends
from flujo_sqlite.backend import _port
from flujo_sqlite.errors import (
    BackendClosedError,
    CorruptDatabaseError,
    DatabaseError,
    DatabaseLockedError,
    FlujoSQLiteError,
    InvalidStateError,
    InvalidTypeError,
    MissingKeyError,
    SerializationError,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)


async def save_many(backend: SQLiteBackend, specs: list[tuple[str, dict[str, Any]]]) -> None:
    for run_id, overrides in specs:
        await backend.save_state(run_id, build_state(**overrides))


def run_ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["run_id"] for item in items]


async def stored_row(backend: SQLiteBackend, run_id: str) -> sqlite3.Row:
    """The raw stored row, read with the stdlib sqlite3 module. Closes ``backend`` first: a
    second copy of SQLite must not open the file in this process while ours has it open."""
    await backend.close()
    (row,) = raw_rows(backend.db_path, "SELECT * FROM workflow_state WHERE run_id = ?", (run_id,))
    return row


def test_the_version_is_the_installed_distribution_s() -> None:
    import importlib.metadata

    import flujo_sqlite

    assert flujo_sqlite.__version__ == importlib.metadata.version("flujo-sqlite")


# --------------------------------------------------------------------------------------------
# Errors


def test_error_classes_subclass_the_stdlib_exceptions_they_replace() -> None:
    assert issubclass(InvalidStateError, ValueError)
    assert issubclass(MissingKeyError, InvalidStateError) and issubclass(MissingKeyError, KeyError)
    assert issubclass(SerializationError, TypeError)
    assert issubclass(DatabaseError, sqlite3.DatabaseError)
    assert issubclass(DatabaseLockedError, sqlite3.OperationalError)
    assert issubclass(DatabaseLockedError, DatabaseError)
    assert issubclass(CorruptDatabaseError, DatabaseError)
    assert issubclass(BackendClosedError, RuntimeError)
    for cls in (
        InvalidStateError,
        SerializationError,
        DatabaseError,
        DatabaseLockedError,
        CorruptDatabaseError,
        BackendClosedError,
    ):
        assert issubclass(cls, FlujoSQLiteError)


# --------------------------------------------------------------------------------------------
# save_state / load_state


async def test_load_state_returns_the_twenty_keys_as_saved(backend: SQLiteBackend) -> None:
    state = build_state()
    await backend.save_state("run-1", state)

    loaded = await backend.load_state("run-1")

    assert loaded is not None
    assert set(loaded) == LOAD_STATE_KEYS
    assert loaded["run_id"] == "run-1"
    for key in LOAD_STATE_KEYS_0435 - {"run_id"}:
        assert loaded[key] == state[key], key
    # Saved without background-task keys: 0.6.11's defaults.
    assert {key: loaded[key] for key in BACKGROUND_DEFAULTS} == BACKGROUND_DEFAULTS
    assert type(loaded["is_background_task"]) is bool
    for key in ("created_at", "updated_at"):
        assert isinstance(loaded[key], datetime)
        assert loaded[key].utcoffset() == timedelta(0)
    assert type(loaded["current_step_index"]) is int
    assert type(loaded["total_steps"]) is int
    assert type(loaded["execution_time_ms"]) is int
    assert type(loaded["memory_usage_mb"]) is float


async def test_background_task_keys_round_trip(backend: SQLiteBackend) -> None:
    """Flujo 0.6.11's five background-task keys: saved, loaded, listed and counted."""
    background = {
        "metadata": {"origin": "scheduler", "attempt": 2},
        "is_background_task": True,
        "parent_run_id": "parent-1",
        "task_id": "task-7",
        "background_error": "worker lost",
    }
    await backend.save_state("bg", build_state(status="failed", **background))
    await backend.save_state("fg", build_state())

    loaded = await backend.load_state("bg")
    items = {item["run_id"]: item for item in await backend.list_workflows()}
    (task,) = await backend.list_background_tasks()
    (failed,) = await backend.get_failed_workflows()
    stats = await backend.get_workflow_stats()

    assert loaded is not None and set(loaded) == LOAD_STATE_KEYS
    assert {key: loaded[key] for key in background} == background
    assert type(loaded["is_background_task"]) is bool
    for item in (items["bg"], task, failed):
        assert set(item) == WORKFLOW_ITEM_KEYS
        assert item["run_id"] == "bg"
        assert {key: item[key] for key in background} == background
    assert {key: items["fg"][key] for key in BACKGROUND_DEFAULTS} == BACKGROUND_DEFAULTS
    assert stats["status_counts"] == {"failed": 1, "running": 1}
    assert stats["background_status_counts"] == {"failed": 1}


async def test_load_state_of_missing_run_is_none(backend: SQLiteBackend) -> None:
    assert await backend.load_state("never-saved") is None
    await backend.save_state("other", build_state())
    assert await backend.load_state("never-saved") is None


async def test_optional_keys_default_like_flujo(backend: SQLiteBackend) -> None:
    state = build_state()
    for key in (
        "last_step_output",
        "step_history",
        "total_steps",
        "error_message",
        "execution_time_ms",
        "memory_usage_mb",
    ):
        del state[key]
    await backend.save_state("minimal", state)
    await backend.save_state("explicit-none", build_state(step_history=None, total_steps=None))

    minimal = await backend.load_state("minimal")
    explicit = await backend.load_state("explicit-none")

    assert minimal is not None and explicit is not None
    assert minimal["last_step_output"] is None
    assert minimal["step_history"] == []
    assert minimal["total_steps"] == 0
    assert minimal["error_message"] is None
    assert minimal["execution_time_ms"] is None
    assert minimal["memory_usage_mb"] is None
    assert explicit["step_history"] == []
    assert explicit["total_steps"] == 0
    row = await stored_row(backend, "minimal")
    assert row["last_step_output"] is None and row["step_history"] is None


@pytest.mark.parametrize("falsy", [0, "", False, [], {}])
async def test_falsy_outputs_are_kept_not_nulled(backend: SQLiteBackend, falsy: Any) -> None:
    await backend.save_state("r", build_state(last_step_output=falsy, pipeline_context={}))

    loaded = await backend.load_state("r")

    assert loaded is not None
    assert loaded["last_step_output"] == falsy
    assert type(loaded["last_step_output"]) is type(falsy)
    assert loaded["pipeline_context"] == {}


async def test_save_replaces_the_whole_row(backend: SQLiteBackend) -> None:
    await backend.save_state("r", build_state(error_message="boom", status="failed"))
    second = build_state(status="completed", current_step_index=5, pipeline_context={"v": 2})
    del second["error_message"]
    del second["last_step_output"]

    await backend.save_state("r", second)

    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["status"] == "completed"
    assert loaded["current_step_index"] == 5
    assert loaded["pipeline_context"] == {"v": 2}
    assert loaded["error_message"] is None
    assert loaded["last_step_output"] is None
    assert len(await backend.list_workflows()) == 1


async def test_data_survives_reopening(db_path: Path) -> None:
    first = SQLiteBackend(db_path)
    state = build_state()
    await first.save_state("durable", state)
    await first.close()

    second = SQLiteBackend(db_path)
    try:
        loaded = await second.load_state("durable")
    finally:
        await second.close()
    assert loaded is not None
    assert loaded["pipeline_context"] == state["pipeline_context"]
    assert loaded["created_at"] == state["created_at"]


async def test_aware_timestamps_are_stored_in_utc_and_load_as_the_same_instant(
    backend: SQLiteBackend,
) -> None:
    plus_two = timezone(timedelta(hours=2))
    created = datetime(2026, 3, 4, 1, 30, 15, 250000, tzinfo=plus_two)
    updated = datetime(2026, 3, 4, 9, 0, 0, tzinfo=timezone(timedelta(hours=-7)))
    await backend.save_state("aware", build_state(created_at=created, updated_at=updated))

    loaded = await backend.load_state("aware")
    row = await stored_row(backend, "aware")

    assert row["created_at"] == "2026-03-03 23:30:15.250000+00:00"
    assert row["updated_at"] == "2026-03-04 16:00:00+00:00"
    assert loaded is not None
    assert loaded["created_at"] == created
    assert loaded["created_at"].utcoffset() == timedelta(0)
    assert loaded["updated_at"] == updated
    assert loaded["updated_at"].utcoffset() == timedelta(0)


async def test_naive_timestamps_stay_naive(backend: SQLiteBackend) -> None:
    created = datetime(2024, 1, 2, 3, 4, 5, 678901)
    updated = datetime(2024, 1, 2, 3, 5, 0)
    await backend.save_state("naive", build_state(created_at=created, updated_at=updated))

    loaded = await backend.load_state("naive")
    row = await stored_row(backend, "naive")

    assert row["created_at"] == "2024-01-02 03:04:05.678901"
    assert row["updated_at"] == "2024-01-02 03:05:00"
    assert loaded is not None
    assert loaded["created_at"] == created and loaded["created_at"].tzinfo is None
    assert loaded["updated_at"] == updated and loaded["updated_at"].tzinfo is None


async def test_date_timestamps_load_as_midnight(backend: SQLiteBackend) -> None:
    await backend.save_state(
        "dated", build_state(created_at=date(2024, 1, 2), updated_at=date(2024, 1, 3))
    )

    loaded = await backend.load_state("dated")

    assert loaded is not None
    assert loaded["created_at"] == datetime(2024, 1, 2)
    assert loaded["updated_at"] == datetime(2024, 1, 3)


class Color(enum.Enum):
    RED = "red"


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Model(pydantic.BaseModel):
    name: str
    when: datetime


async def test_loaded_json_fields_are_plain_json_data(backend: SQLiteBackend) -> None:
    # Shape only (the serialization rules are covered in depth in test_serialization.py).
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ident = uuid.UUID("12345678-1234-5678-1234-567812345678")
    context = {
        "when": when,
        "nan": math.nan,
        "raw": b"\x00\xffabc",
        "tags": {"b", "a", "c"},
        "color": Color.RED,
        "point": Point(1, 2),
        "model": Model(name="m", when=when),
        "id": ident,
        "price": Decimal("1.10"),
        "nested": [{"t": (1, 2)}],
    }
    await backend.save_state("json", build_state(pipeline_context=context))

    loaded = await backend.load_state("json")

    assert loaded is not None
    assert loaded["pipeline_context"] == {
        "when": when.isoformat(),
        "nan": "nan",
        "raw": base64.b64encode(b"\x00\xffabc").decode(),
        "tags": ["a", "b", "c"],
        "color": "red",
        "point": {"x": 1, "y": 2},
        "model": {"name": "m", "when": when.isoformat()},
        "id": str(ident),
        "price": "1.10",
        "nested": [{"t": [1, 2]}],
    }


# --------------------------------------------------------------------------------------------
# delete_state


async def test_delete_state_removes_only_that_run(backend: SQLiteBackend) -> None:
    await save_many(backend, [("a", {}), ("b", {}), ("c", {})])

    await backend.delete_state("b")
    await backend.delete_state("b")  # already gone: no error
    await backend.delete_state("never-existed")

    assert await backend.load_state("b") is None
    assert await backend.load_state("a") is not None
    assert await backend.load_state("c") is not None
    assert sorted(run_ids(await backend.list_workflows())) == ["a", "c"]


# --------------------------------------------------------------------------------------------
# list_states


async def test_list_states_shape_order_and_filter(backend: SQLiteBackend) -> None:
    now = utc_now()
    await save_many(
        backend,
        [
            ("old", {"created_at": now - 3 * HOUR, "status": "completed"}),
            ("new", {"created_at": now - HOUR, "status": "running"}),
            ("mid", {"created_at": now - 2 * HOUR, "status": "running"}),
        ],
    )

    everything = await backend.list_states()
    running = await backend.list_states(status="running")

    assert run_ids(everything) == ["new", "mid", "old"]
    assert run_ids(await backend.list_states(status="")) == ["new", "mid", "old"]
    assert run_ids(running) == ["new", "mid"]
    assert await backend.list_states(status="paused") == []
    for item in everything:
        assert set(item) == {"run_id", "status", "created_at", "updated_at"}
        assert isinstance(item["created_at"], str) and isinstance(item["updated_at"], str)
    assert datetime.fromisoformat(everything[0]["created_at"]) == now - HOUR


# --------------------------------------------------------------------------------------------
# list_workflows


async def test_list_workflows_items_have_seventeen_keys_and_string_timestamps(
    backend: SQLiteBackend,
) -> None:
    state = build_state(total_steps=None, error_message="e", memory_usage_mb=12.5)
    await backend.save_state("r", state)

    (item,) = await backend.list_workflows()
    row = await stored_row(backend, "r")

    assert set(item) == WORKFLOW_ITEM_KEYS
    assert item == {
        "run_id": "r",
        "pipeline_id": state["pipeline_id"],
        "pipeline_name": state["pipeline_name"],
        "pipeline_version": state["pipeline_version"],
        "current_step_index": state["current_step_index"],
        "status": state["status"],
        "created_at": row["created_at"],
        "updated_at": row["updated_at"],
        "total_steps": 0,
        "error_message": "e",
        "execution_time_ms": state["execution_time_ms"],
        "memory_usage_mb": 12.5,
        **BACKGROUND_DEFAULTS,
    }
    assert datetime.fromisoformat(item["created_at"]) == state["created_at"]
    assert datetime.fromisoformat(item["updated_at"]) == state["updated_at"]


async def test_list_items_leave_out_a_memory_figure_the_run_did_not_record(
    backend: SQLiteBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flujo puts None there, which breaks the user guide's ``wf.get('memory_usage_mb', 0) >
    100`` (Flujo 0.6.11's runner never records one); the key is left out instead."""
    await backend.save_state("measured", build_state(memory_usage_mb=150.0))
    await backend.save_state("unmeasured", build_state(status="failed", memory_usage_mb=None))

    items = {item["run_id"]: item for item in await backend.list_workflows()}
    (failed,) = await backend.get_failed_workflows()

    assert items["measured"]["memory_usage_mb"] == 150.0
    assert set(items["unmeasured"]) == set(failed) == WORKFLOW_ITEM_KEYS - {"memory_usage_mb"}
    loaded = await backend.load_state("unmeasured")
    assert loaded is not None and loaded["memory_usage_mb"] is None  # load_state keeps the key
    for wf in items.values():
        if wf.get("memory_usage_mb", 0) > 100:  # the guide's line, unchanged
            print(wf["run_id"])
    assert capsys.readouterr().out.split() == ["measured"]


async def test_listed_times_of_naive_timestamps_are_utc(backend: SQLiteBackend) -> None:
    """Flujo 0.4.35's runner saves naive ``datetime.now()``; the lists return every time with an
    offset, reading naive ones as UTC like the time windows do, so the guide's
    ``datetime.now(timezone.utc) - datetime.fromisoformat(wf['created_at'])`` works on them."""
    naive = datetime(2024, 1, 2, 3, 4, 5, 678901)
    await backend.save_state(
        "naive", build_state(created_at=naive, updated_at=naive, status="failed")
    )

    (item,) = await backend.list_workflows()
    (listed,) = await backend.list_states()
    (failed,) = await backend.get_failed_workflows(hours_back=24 * 365 * 100)
    loaded = await backend.load_state("naive")
    row = await stored_row(backend, "naive")  # closes the backend

    assert row["created_at"] == "2024-01-02 03:04:05.678901"  # stored as given
    for shown in (item, listed, failed):
        assert shown["created_at"] == shown["updated_at"] == "2024-01-02 03:04:05.678901+00:00"
        assert datetime.fromisoformat(shown["created_at"]) == naive.replace(tzinfo=UTC)
    assert loaded is not None and loaded["created_at"] == naive  # loads round-trip, naive


async def test_a_negative_limit_means_no_limit_as_in_flujo(backend: SQLiteBackend) -> None:
    """Flujo hands ``limit`` to SQLite, where -1 is the usual way of saying "no limit"."""
    for i in range(3):
        await backend.save_state(f"r{i}", build_state())
        await backend.save_run_start({"run_id": f"r{i}", "pipeline_name": "p"})

    assert run_ids(await backend.list_workflows(limit=-1)) == run_ids(
        await backend.list_workflows()
    )
    assert len(await backend.list_workflows(limit=-1, offset=1)) == 2
    assert len(await backend.list_runs(limit=-1)) == 3
    assert len(await backend.list_background_tasks(limit=-1)) == 0


async def test_list_workflows_filters(backend: SQLiteBackend) -> None:
    now = utc_now()
    specs = []
    for i in range(12):
        specs.append(
            (
                f"r{i:02d}",
                {
                    "pipeline_id": ("alpha", "beta", "gamma")[i % 3],
                    "status": STATUSES[i % 5],
                    "created_at": now - i * HOUR,
                },
            )
        )
    await save_many(backend, specs)
    newest_first = [run_id for run_id, _ in specs]

    def expect(status: str | None = None, pipeline: str | None = None) -> list[str]:
        return [
            run_id
            for run_id, o in specs
            if (not status or o["status"] == status)
            and (not pipeline or o["pipeline_id"] == pipeline)
        ]

    assert run_ids(await backend.list_workflows()) == newest_first
    assert run_ids(await backend.list_workflows(status="", pipeline_id="")) == newest_first
    assert run_ids(await backend.list_workflows(status=None, pipeline_id=None)) == newest_first
    for status in STATUSES:
        assert run_ids(await backend.list_workflows(status=status)) == expect(status=status)
    for pipeline in ("alpha", "beta", "gamma"):
        assert run_ids(await backend.list_workflows(pipeline_id=pipeline)) == expect(
            pipeline=pipeline
        )
    both = await backend.list_workflows(status="running", pipeline_id="alpha")
    assert run_ids(both) == expect("running", "alpha") == ["r00"]
    assert await backend.list_workflows(pipeline_id="delta") == []


async def test_list_workflows_limit_and_offset(backend: SQLiteBackend) -> None:
    now = utc_now()
    await save_many(backend, [(f"r{i}", {"created_at": now - i * HOUR}) for i in range(6)])
    order = [f"r{i}" for i in range(6)]

    assert await backend.list_workflows(limit=0) == []
    assert run_ids(await backend.list_workflows(limit=2)) == order[:2]
    assert run_ids(await backend.list_workflows(limit=2, offset=2)) == order[2:4]
    assert run_ids(await backend.list_workflows(limit=100, offset=4)) == order[4:]
    # Fixed versus Flujo, where an offset without a limit is a syntax error.
    assert run_ids(await backend.list_workflows(offset=3)) == order[3:]
    assert await backend.list_workflows(offset=6) == []
    assert await backend.list_workflows(limit=5, offset=60) == []


@pytest.mark.parametrize("offset", [-1, -5])
async def test_list_workflows_rejects_a_negative_offset(
    backend: SQLiteBackend, offset: int
) -> None:
    await backend.save_state("r", build_state())
    with pytest.raises(InvalidStateError):
        await backend.list_workflows(offset=offset)


@pytest.mark.parametrize("status", [None, "failed"])
async def test_paging_over_200_rows_sees_each_row_once(
    backend: SQLiteBackend, status: str | None
) -> None:
    # Only 8 distinct creation instants: paging relies on the tie-breaker.
    base = utc_now() - DAY
    for i in range(200):
        await backend.save_state(
            f"run-{i:03d}",
            build_state(
                created_at=base + (i % 8) * timedelta(minutes=7),
                status=("failed", "completed", "running", "failed", "paused")[i % 5],
            ),
        )
    everything = await backend.list_workflows(status=status)

    pages: list[dict[str, Any]] = []
    offset = 0
    while True:
        page = await backend.list_workflows(status=status, limit=25, offset=offset)
        if not page:
            break
        assert len(page) <= 25
        pages.extend(page)
        offset += 25

    expected_count = 200 if status is None else 80
    assert len(everything) == expected_count
    assert run_ids(pages) == run_ids(everything)
    assert len(set(run_ids(pages))) == expected_count
    created = [datetime.fromisoformat(item["created_at"]) for item in pages]
    assert created == sorted(created, reverse=True)
    # Repeating the walk gives the same order.
    assert run_ids(await backend.list_workflows(status=status)) == run_ids(everything)
    assert (
        run_ids(await backend.list_workflows(status=status, offset=40)) == run_ids(everything)[40:]
    )


# --------------------------------------------------------------------------------------------
# get_workflow_stats


async def test_stats_on_empty_database(backend: SQLiteBackend) -> None:
    stats = await backend.get_workflow_stats()

    assert stats == EMPTY_WORKFLOW_STATS
    assert type(stats["average_execution_time_ms"]) is int
    assert await backend.list_workflows() == []
    assert await backend.list_states() == []
    assert await backend.get_failed_workflows() == []
    assert await backend.cleanup_old_workflows() == 0


async def test_stats_counts_and_exact_24_hour_window(backend: SQLiteBackend) -> None:
    now = utc_now()
    await save_many(
        backend,
        [
            ("fresh", {"created_at": now - HOUR, "status": "running", "execution_time_ms": 100}),
            (
                "inside",
                {"created_at": now - 23 * HOUR, "status": "failed", "execution_time_ms": 250},
            ),
            # 25 hours old: Flujo counts it as recent (text comparison); we do not.
            (
                "outside",
                {"created_at": now - 25 * HOUR, "status": "failed", "execution_time_ms": None},
            ),
            (
                "old",
                {"created_at": now - 10 * DAY, "status": "completed", "execution_time_ms": 1000},
            ),
        ],
    )

    stats = await backend.get_workflow_stats()

    assert set(stats) == WORKFLOW_STATS_KEYS
    assert stats["total_workflows"] == 4
    assert stats["status_counts"] == {"running": 1, "failed": 2, "completed": 1}
    assert stats["background_status_counts"] == {}
    assert stats["recent_workflows_24h"] == 2
    assert type(stats["average_execution_time_ms"]) is float
    assert stats["average_execution_time_ms"] == pytest.approx(1350 / 3)


async def test_stats_average_is_int_zero_when_no_execution_times(backend: SQLiteBackend) -> None:
    await backend.save_state("r", build_state(execution_time_ms=None))

    stats = await backend.get_workflow_stats()

    assert stats["average_execution_time_ms"] == 0
    assert type(stats["average_execution_time_ms"]) is int
    assert stats["recent_workflows_24h"] == 1


async def test_stats_count_a_status_another_program_stored_as_bytes_under_its_text(
    db_path: Path,
) -> None:
    async with SQLiteBackend(db_path) as backend:
        for run_id in ("text", "bytes", "number"):
            await backend.save_state(run_id, build_state(status="paused", is_background_task=True))
    with contextlib.closing(sqlite3.connect(db_path)) as other, other:
        other.execute("PRAGMA ignore_check_constraints = ON")
        other.execute(
            "UPDATE workflow_state SET status = CAST('paused' AS BLOB) WHERE run_id = 'bytes'"
        )
        other.execute("UPDATE workflow_state SET status = 3 WHERE run_id = 'number'")
    async with SQLiteBackend(db_path) as backend:
        stats = await backend.get_workflow_stats()
    assert stats["status_counts"] == {"paused": 2, "3": 1}
    assert stats["background_status_counts"] == {"paused": 2, "3": 1}


# --------------------------------------------------------------------------------------------
# get_failed_workflows


async def test_failed_workflows_window_is_exact_on_updated_at(backend: SQLiteBackend) -> None:
    now = utc_now()
    await save_many(
        backend,
        [
            ("f-20min", {"status": "failed", "updated_at": now - timedelta(minutes=20)}),
            ("f-40min", {"status": "failed", "updated_at": now - timedelta(minutes=40)}),
            ("f-23h", {"status": "failed", "updated_at": now - 23 * HOUR}),
            ("f-25h", {"status": "failed", "updated_at": now - 25 * HOUR}),
            ("f-10d", {"status": "failed", "updated_at": now - 10 * DAY}),
            ("c-1min", {"status": "completed", "updated_at": now - timedelta(minutes=1)}),
            # Created long ago, failed recently: the window looks at updated_at.
            (
                "f-old-created",
                {
                    "status": "failed",
                    "created_at": now - 30 * DAY,
                    "updated_at": now - timedelta(minutes=10),
                },
            ),
        ],
    )

    default = await backend.get_failed_workflows()
    day = await backend.get_failed_workflows(hours_back=24)
    half_hour = await backend.get_failed_workflows(hours_back=0.5)
    week_and_a_half = await backend.get_failed_workflows(hours_back=24 * 11)

    assert run_ids(default) == ["f-old-created", "f-20min", "f-40min", "f-23h"]
    assert run_ids(day) == run_ids(default)
    assert run_ids(half_hour) == ["f-old-created", "f-20min"]
    assert run_ids(week_and_a_half) == [
        "f-old-created",
        "f-20min",
        "f-40min",
        "f-23h",
        "f-25h",
        "f-10d",
    ]
    # Flujo returns all of today's rows for 0; an exact window holds nothing in the past.
    assert await backend.get_failed_workflows(hours_back=0) == []
    for item in default:
        assert set(item) == WORKFLOW_ITEM_KEYS
        assert item["status"] == "failed"
        assert isinstance(item["updated_at"], str)


@pytest.mark.parametrize("hours_back", [-1, -0.5, math.nan, math.inf, -math.inf])
async def test_failed_workflows_rejects_bad_windows(
    backend: SQLiteBackend, hours_back: float
) -> None:
    await backend.save_state("r", build_state(status="failed"))
    with pytest.raises(InvalidStateError):
        await backend.get_failed_workflows(hours_back=hours_back)


async def test_bad_time_windows_are_refused_before_the_file_is_opened(tmp_path: Path) -> None:
    """A wrong "how far back" number is the caller's mistake whatever the file holds: it is
    refused at the call, not after the engine has opened the file or waited for its lock."""
    path = tmp_path / "notes.db"
    path.write_bytes(b"not a database\n" * 100)
    backend = SQLiteBackend(path)
    calls = {
        "hours_back": lambda: backend.get_failed_workflows(hours_back=-1),
        "days_old": lambda: backend.cleanup_old_workflows(days_old=math.nan),
        "stale_hours": lambda: backend.cleanup_stale_background_tasks(stale_hours=-0.5),
    }
    for name, call in calls.items():
        with pytest.raises(InvalidStateError, match=f"{name} must be a finite number >= 0"):
            await call()
    with pytest.raises(InvalidStateError, match="hours_back"):
        await backend.get_failed_background_tasks(hours_back=math.inf)
    with pytest.raises(CorruptDatabaseError):  # the file is only read for a valid call
        await backend.get_failed_workflows(hours_back=1)
    await backend.close()


@pytest.mark.parametrize("hours_back", ["24", "abc", None, [24]])
async def test_failed_workflows_rejects_non_numbers(
    backend: SQLiteBackend, hours_back: Any
) -> None:
    await backend.save_state("r", build_state(status="failed"))
    with pytest.raises((TypeError, ValueError)):
        await backend.get_failed_workflows(hours_back=hours_back)
    assert run_ids(await backend.get_failed_workflows()) == ["r"]


async def test_a_list_built_over_several_turns_of_the_loop_arrives_whole_and_in_order(
    backend: SQLiteBackend,
) -> None:
    """Lists longer than 1,000 items are converted 1,000 at a time, a turn of the event loop
    each, so that other tasks run meanwhile."""
    start = utc_now() - DAY
    await asyncio.gather(
        *(
            backend.save_state(f"r{i:04}", build_state(created_at=start + i * timedelta(seconds=1)))
            for i in range(2_500)
        )
    )
    newest_first = [f"r{i:04}" for i in reversed(range(2_500))]
    assert run_ids(await backend.list_workflows()) == newest_first
    assert run_ids(await backend.list_states()) == newest_first
    assert run_ids(await backend.list_workflows(limit=1_001, offset=1)) == newest_first[1:1_002]

    # Cancelled at any point, a long list leaves the backend as it was.
    for delay in (0, 0.001, 0.002, 0.005, 0.01):
        listing = asyncio.ensure_future(backend.list_workflows())
        await asyncio.sleep(delay)
        listing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listing
    assert len(await backend.list_workflows()) == 2_500


async def test_big_lists_leave_the_garbage_collector_as_they_found_it(
    backend: SQLiteBackend,
) -> None:
    """The collector is paused while a list of 1,000+ results is built, and only then."""
    await asyncio.gather(*(backend.save_state(f"r{i:04}", build_state()) for i in range(1_200)))
    assert gc.isenabled()
    listed = await backend.list_workflows()
    assert gc.isenabled()
    assert sorted(run_ids(listed)) == [f"r{i:04}" for i in range(1_200)]
    gc.disable()  # the program's own choice
    try:
        assert len(await backend.list_states()) == 1_200
        assert not gc.isenabled()
    finally:
        gc.enable()


# --------------------------------------------------------------------------------------------
# cleanup_old_workflows


async def test_cleanup_with_float_days_cuts_exactly(backend: SQLiteBackend) -> None:
    now = utc_now()
    cutoff = now - 1.5 * DAY
    await save_many(
        backend,
        [
            ("just-newer", {"created_at": cutoff + timedelta(minutes=2)}),
            ("just-older", {"created_at": cutoff - timedelta(minutes=2)}),
            # Updated recently but created long ago: the age is the creation time.
            ("old-but-updated", {"created_at": now - 3 * DAY, "updated_at": now}),
            ("new", {"created_at": now - HOUR}),
        ],
    )

    deleted = await backend.cleanup_old_workflows(days_old=1.5)

    assert deleted == 2
    assert sorted(run_ids(await backend.list_workflows())) == ["just-newer", "new"]
    assert await backend.cleanup_old_workflows(days_old=1.5) == 0


async def test_a_quick_cleanup_returns_its_count_every_time(tmp_path: Path) -> None:
    """A write that finishes while the loop waits for it is handed over without a second loop
    turn; a cleanup on that path once raised AttributeError after deleting its rows."""
    old = utc_now() - 90 * DAY
    async with SQLiteBackend(tmp_path / "wf.db", durability="normal") as backend:
        for i in range(400):
            await backend.save_state(f"old-{i}", build_state(created_at=old))
            assert await backend.cleanup_old_workflows(30) == 1
        assert await backend.list_workflows() == []


async def test_cleanup_keeps_recent_rows_and_zero_days_removes_the_past(
    backend: SQLiteBackend,
) -> None:
    now = utc_now()
    await save_many(backend, [(f"r{i}", {"created_at": now - DAY - i * HOUR}) for i in range(5)])

    assert await backend.cleanup_old_workflows(days_old=30) == 0
    assert await backend.cleanup_old_workflows() == 0
    assert await backend.cleanup_old_workflows(days_old=2) == 0
    assert await backend.cleanup_old_workflows(days_old=1) == 5
    assert await backend.list_workflows() == []

    await backend.save_state("a-minute-ago", build_state(created_at=now - timedelta(minutes=1)))
    assert await backend.cleanup_old_workflows(days_old=0) == 1
    assert await backend.get_workflow_stats() == EMPTY_WORKFLOW_STATS


@pytest.mark.parametrize("days_old", [-1, -0.01, math.nan, math.inf, -math.inf])
async def test_cleanup_rejects_bad_ages_and_deletes_nothing(
    backend: SQLiteBackend, days_old: float
) -> None:
    await backend.save_state("old", build_state(created_at=utc_now() - 100 * DAY))
    with pytest.raises(InvalidStateError):
        await backend.cleanup_old_workflows(days_old=days_old)
    assert run_ids(await backend.list_workflows()) == ["old"]


@pytest.mark.parametrize("days_old", ["30", "1; DELETE FROM workflow_state", None])
async def test_cleanup_rejects_non_numbers_and_deletes_nothing(
    backend: SQLiteBackend, days_old: Any
) -> None:
    await backend.save_state("old", build_state(created_at=utc_now() - 100 * DAY))
    with pytest.raises((TypeError, ValueError)):
        await backend.cleanup_old_workflows(days_old=days_old)
    assert run_ids(await backend.list_workflows()) == ["old"]


# --------------------------------------------------------------------------------------------
# Lifecycle


async def test_constructor_creates_parent_folders_but_not_the_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "wf.db"

    backend = SQLiteBackend(path)

    assert backend.db_path == path
    assert isinstance(backend.db_path, Path)
    assert path.parent.is_dir()
    assert not path.exists()
    await backend.save_state("r", build_state())
    assert path.is_file()
    await backend.close()


async def test_constructor_accepts_str_paths(tmp_path: Path) -> None:
    backend = SQLiteBackend(str(tmp_path / "as_str.db"))
    assert backend.db_path == tmp_path / "as_str.db"
    await backend.save_state("r", build_state())
    assert (await backend.load_state("r")) is not None
    await backend.close()


@pytest.mark.parametrize(
    ("spelling", "hint"),
    [
        ("", "is empty"),
        ("sqlite:///state.db", "is a URI"),
        ("sqlite+aiosqlite:///state.db", "is a URI"),
        ("sqlite3:///state.db", "is a URI"),
        ("postgresql://user@db.example/flujo", "is a postgresql:// URI"),
        ("file:///srv/state.db", "is a file:// URI"),
        ("~/state.db", "only a shell expands"),
        ("~", "only a shell expands"),
        ("$HOME/state.db", "only a shell expands"),
        ("${HOME}/state.db", "only a shell expands"),
    ],
)
def test_paths_only_a_shell_or_uri_parser_understands_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spelling: str, hint: str
) -> None:
    """As file paths these would quietly create a folder named "~", "$HOME" or "sqlite:"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(InvalidStateError, match=hint):
        SQLiteBackend(spelling)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "uri",
    [
        "postgresql://admin:hun@t/er2@db.internal/flujo",
        PurePosixPath("postgres://admin:hun@t/er2@db.internal/flujo"),  # "postgres:/admin..."
        "sqlite://admin:hun@t/er2@db.internal/flujo.db",
    ],
)
def test_a_password_in_a_uri_given_as_the_path_is_not_repeated(uri: str | PurePosixPath) -> None:
    with pytest.raises(InvalidStateError, match="URI") as raised:
        SQLiteBackend(uri)
    assert "admin:***@db.internal" in str(raised.value)
    assert "er2" not in str(raised.value)


def test_a_uri_made_into_a_path_is_refused_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("postgresql://user@db.example/flujo", "sqlite:///state.db"):
        with pytest.raises(InvalidStateError, match="URI"):
            SQLiteBackend(Path(uri))  # pathlib keeps one slash: "postgresql:/user@..."
    assert list(tmp_path.iterdir()) == []
    # A folder whose name merely ends with a colon is a folder.
    SQLiteBackend(Path("backup:/state.db"))
    assert (tmp_path / "backup:").is_dir()


@pytest.mark.parametrize(
    "name",
    [
        "~backup/state.db",
        "$no_such_variable/state.db",
        "sqlite:notes/state.db",
        "${x.db",
        "C://state.db",
    ],
)
async def test_names_that_merely_start_like_a_shell_word_are_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("no_such_variable", raising=False)
    async with SQLiteBackend(name) as backend:
        await backend.save_state("r", build_state())
    assert (tmp_path / name).is_file()


async def test_a_relative_path_keeps_naming_the_same_file_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(home)
    backend = SQLiteBackend("wf.db")
    try:
        await backend.save_state("before", build_state())
        monkeypatch.chdir(elsewhere)
        # Reader connections open lazily: this one opens after the chdir.
        assert (await backend.load_state("before")) is not None
        await backend.save_state("after", build_state())
        with pytest.raises(InvalidStateError, match="close it first"):
            await recover(home / "wf.db")
    finally:
        await backend.close()
    assert list(elsewhere.iterdir()) == []
    rows = raw_rows(home / "wf.db", "SELECT run_id FROM workflow_state ORDER BY run_id")
    assert [row["run_id"] for row in rows] == ["after", "before"]


def engine_threads() -> list[str]:
    """Names of this process's engine threads, the writer's and the readers' (Linux truncates
    them to 15 characters). The helper thread that runs a ``close()`` may still be on its way
    out when the close is awaited, so it is not counted."""
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            names.append((task / "comm").read_text().strip())
    return sorted(n for n in names if n.startswith(("flujo-sqlite-wr", "flujo-sqlite-re")))


# A writer and the default two readers.
THREADS_PER_ENGINE = 3


def engine_threads_once_named(count: int) -> list[str]:
    """``engine_threads()`` once ``count`` of them show: a thread names itself when it first
    runs, which on a busy machine can be well after its engine answered a call made with
    another of its threads. Gives up after 10 s with what it sees, for the assertion to show."""
    deadline = time.monotonic() + 10
    while len(names := engine_threads()) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return names


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/task").is_dir(), reason="counts threads through Linux's /proc"
)


@needs_proc
async def test_async_with_closes_on_exit_and_a_later_call_opens_the_file_again(
    db_path: Path,
) -> None:
    """Flujo's backend opens its file again on the next call after close(), and code written
    for it (a fixture closing a shared backend, two ``async with`` blocks on one instance)
    relies on that."""
    before = engine_threads()
    async with SQLiteBackend(db_path) as backend:
        assert isinstance(backend, SQLiteBackend)
        await backend.save_state("r", build_state())
        assert len(engine_threads()) > len(before)
    assert engine_threads() == before  # closed: the engine's threads are gone

    assert (await backend.load_state("r")) is not None
    async with backend:
        await backend.save_state("r2", build_state())
    assert engine_threads() == before
    async with SQLiteBackend(db_path) as other:
        assert run_ids(await other.list_workflows()) == ["r2", "r"]


@needs_proc
async def test_async_with_lets_the_body_exception_through_and_closes(db_path: Path) -> None:
    before = engine_threads()
    with pytest.raises(KeyError, match="from the body"):
        async with SQLiteBackend(db_path) as backend:
            await backend.save_state("r", build_state())
            raise KeyError("from the body")
    assert engine_threads() == before
    assert run_ids(await backend.list_workflows()) == ["r"]
    await backend.close()


@needs_proc
async def test_close_is_idempotent_and_shutdown_close_sync_and_shutdown_all_close_too(
    db_path: Path,
) -> None:
    before = engine_threads()
    backend = SQLiteBackend(db_path)
    await backend.save_state("r", build_state())
    await backend.close()
    await backend.close()
    await backend.shutdown()
    assert engine_threads() == before

    other = SQLiteBackend(db_path)
    await other.load_state("r")
    await other.shutdown()
    assert engine_threads() == before
    assert await other.load_state("r") is not None  # opens it again
    other.close_sync()
    other.close_sync()
    assert engine_threads() == before

    third = SQLiteBackend(db_path)
    await third.load_state("r")
    await other.load_state("r")
    SQLiteBackend.shutdown_all()
    assert engine_threads() == before
    assert await third.load_state("r") is not None
    await third.close()


@needs_proc
async def test_calls_that_reopen_at_once_open_one_engine(db_path: Path) -> None:
    """Two threads may both hold the closed backend's stand-in when they call: the second must
    use the engine the first opened, not open another."""
    before = engine_threads()
    backend = SQLiteBackend(db_path)
    await backend.save_state("r", build_state())
    await backend.close()
    stand_in = backend._native
    await backend.load_state("r")  # the first caller opens the file again
    opened = engine_threads_once_named(len(before) + THREADS_PER_ENGINE)
    # The second caller, late, goes through the old stand-in and gets the reopened engine.
    assert await stand_in.load_state(_port(), "r") is not None
    assert backend._native is not stand_in
    assert engine_threads() == opened and len(opened) > len(before)
    await backend.close()
    assert engine_threads() == before


async def test_close_before_any_use(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.close()
    assert not db_path.exists()
    await backend.save_state("r", build_state())
    await backend.close()
    assert [row["run_id"] for row in raw_rows(db_path, "SELECT run_id FROM workflow_state")] == [
        "r"
    ]


CALLS_AFTER_CLOSE = {
    "save_state": lambda b: b.save_state("r", build_state()),
    "load_state": lambda b: b.load_state("r"),
    "delete_state": lambda b: b.delete_state("r"),
    "list_states": lambda b: b.list_states(),
    "list_workflows": lambda b: b.list_workflows(),
    "get_workflow_stats": lambda b: b.get_workflow_stats(),
    "get_failed_workflows": lambda b: b.get_failed_workflows(),
    "cleanup_old_workflows": lambda b: b.cleanup_old_workflows(),
}


@pytest.mark.parametrize("call", CALLS_AFTER_CLOSE.values(), ids=CALLS_AFTER_CLOSE.keys())
async def test_every_call_after_close_opens_the_file_again(db_path: Path, call: Any) -> None:
    backend = SQLiteBackend(db_path)
    await backend.save_state("r", build_state(created_at=utc_now() - 90 * DAY))
    await backend.save_state("kept", build_state())
    await backend.close()

    await call(backend)
    await backend.close()

    async with SQLiteBackend(db_path) as check:
        assert "kept" in run_ids(await check.list_workflows())


async def test_two_backends_on_one_file_see_each_other(db_path: Path) -> None:
    first = SQLiteBackend(db_path)
    second = SQLiteBackend(db_path)
    try:
        await first.save_state("one", build_state())
        await second.save_state("two", build_state(status="paused"))
        assert (await first.load_state("two"))["status"] == "paused"
        await first.delete_state("two")
        assert await second.load_state("two") is None
        await first.close()
        assert (await second.load_state("one")) is not None
    finally:
        await first.close()
        await second.close()


def test_same_backend_from_two_threads_each_running_asyncio_run(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)

    def worker(tag: str) -> int:
        async def session(round_: int) -> int:
            for i in range(25):
                run_id = f"{tag}-{round_}-{i}"
                await backend.save_state(run_id, build_state(pipeline_id=tag))
                loaded = await backend.load_state(run_id)
                assert loaded is not None and loaded["pipeline_id"] == tag
            return len(await backend.list_workflows(pipeline_id=tag))

        # Two successive event loops in the same thread, too.
        return asyncio.run(session(0)) + asyncio.run(session(1))

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(worker, tag) for tag in ("left", "right")]
        counts = [f.result(timeout=120) for f in futures]

    async def verify() -> list[dict[str, Any]]:
        try:
            return await backend.list_workflows()
        finally:
            await backend.close()

    everything = asyncio.run(verify())
    assert len(everything) == 100
    # Each thread saw at least its own 25 rows after the first round and 50 after the second.
    assert all(count >= 75 for count in counts)


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_uvloop_runs_the_calls_as_asyncio_does(db_path: Path, durability: str) -> None:
    """uvloop (uvicorn's loop whenever it is installed) wakes for the completion port, resolves
    batches of futures, runs lone calls through the short wait on its thread and cancels calls
    as asyncio's own loop does; one backend serves two uvloop loops in turn, then asyncio's."""
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed (make test installs it)")
    backend = SQLiteBackend(db_path, durability=durability)

    async def session(tag: str) -> int:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        run_ids = [f"{tag}-{i}" for i in range(64)]
        await asyncio.gather(
            *(backend.save_state(r, build_state(pipeline_id=tag)) for r in run_ids)
        )
        loaded = await asyncio.gather(*(backend.load_state(r) for r in run_ids))
        assert [state and state["pipeline_id"] for state in loaded] == [tag] * 64
        for run_id in run_ids[:20]:  # one at a time: each a lone call
            state = await backend.load_state(run_id)
            assert state is not None and state["pipeline_id"] == tag
        in_flight = asyncio.ensure_future(backend.list_workflows())
        await asyncio.sleep(0)
        in_flight.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await in_flight
        return len(await backend.list_workflows(pipeline_id=tag))

    for tag in ("first", "second"):
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            assert runner.run(session(tag)) == 64

    async def count_on_asyncio() -> int:
        try:
            return len(await backend.list_workflows())
        finally:
            await backend.close()

    assert asyncio.run(count_on_asyncio()) == 128


@pytest.mark.parametrize("durability", ["full", "normal"])
async def test_every_call_lets_other_tasks_run(db_path: Path, durability: str) -> None:
    # A lone call may be answered while the loop thread waits for it, without the loop
    # sleeping; it must still give other tasks a turn, or a task calling in a tight loop
    # would starve the rest of the program.
    other_task_turns = 0
    done = False

    async def other_task() -> None:
        nonlocal other_task_turns
        while not done:
            other_task_turns += 1
            await asyncio.sleep(0)

    starved = []
    async with SQLiteBackend(db_path, durability=durability) as backend:
        await backend.save_state("r", build_state())
        other = asyncio.create_task(other_task())
        await asyncio.sleep(0)
        for i in range(300):
            turns_before = other_task_turns
            if i % 2:
                assert await backend.load_state("r") is not None
            else:
                await backend.save_state("r", build_state(current_step_index=i))
            if other_task_turns == turns_before:
                starved.append(i)
        done = True
        await other

    assert starved == []


async def closed_engine(db_path: Path) -> Any:
    """The engine of a backend whose close() has finished. A call on it fails with
    BackendClosedError before the loop thread even starts waiting, as a call racing close()
    does; the backend itself would open the file again instead."""
    backend = SQLiteBackend(db_path)
    engine = backend._native
    await backend.close()
    return engine


async def test_an_error_ready_at_once_still_lets_other_tasks_run(db_path: Path) -> None:
    # Such a call always takes the path that answers at once; the error must still cost one
    # turn of the loop.
    engine = await closed_engine(db_path)
    other_task_turns = 0

    async def other_task() -> None:
        nonlocal other_task_turns
        while True:
            other_task_turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    for _ in range(20):
        turns_before = other_task_turns
        with pytest.raises(BackendClosedError):
            await engine.load_state(_port(), "r")
        assert other_task_turns > turns_before
    other.cancel()


class _InterruptOnce(asyncio.SelectorEventLoop):
    """Raises KeyboardInterrupt from the first ``call_soon`` made while armed, as a SIGINT
    handler does when it runs inside the callbacks that ``Future.set_result`` schedules."""

    armed = False

    def call_soon(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt
        return super().call_soon(callback, *args, context=context)


# The thread method: a regression leaves the loop waiting for good, which a signal cannot end.
@pytest.mark.timeout(120, method="thread")
def test_a_ctrl_c_while_results_are_handed_over_reaches_the_program(tmp_path: Path) -> None:
    """It used to be reported as "Exception ignored" and lost, with the loop then waiting
    forever for a task whose future was done but never woke it. Now it reaches
    ``run_until_complete`` as with asyncio's own callbacks, and the other results are kept for
    the next turns of the loop."""
    loop = _InterruptOnce()
    try:
        backend = SQLiteBackend(tmp_path / "wf.db")
        loop.run_until_complete(backend.save_state("r", build_state()))

        async def this_loops_port() -> Any:
            return _port()

        port = loop.run_until_complete(this_loops_port())

        def armed_drain() -> None:
            loop.armed = True
            try:
                port.drain()
            finally:
                loop.armed = False

        loop.remove_reader(port.fileno())
        loop.add_reader(port.fileno(), armed_drain)

        async def loads() -> list[Any]:
            return await asyncio.gather(*(backend.load_state("r") for _ in range(16)))

        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.wait_for(loads(), 10))
        loop.remove_reader(port.fileno())
        loop.add_reader(port.fileno(), port.drain)
        # The program goes on: the loop still delivers every later call.
        again = loop.run_until_complete(asyncio.wait_for(loads(), 10))
        assert all(state is not None for state in again)
        loop.run_until_complete(backend.close())
    finally:
        loop.close()


def test_calls_finishing_around_the_loops_wait_are_all_delivered(tmp_path: Path) -> None:
    # The loop thread waits ~50-150 us for a lone call and, while it waits, engine threads skip
    # the socket wake-up. Rows from 1 KB to 400 KB make calls finish before, around and after
    # that wait. A wake-up lost in the hand-over leaves an await hanging for good (closing
    # included), so the calls run in a child process that a timeout can kill.
    script = textwrap.dedent(
        f"""
        import asyncio, random
        from datetime import datetime, timezone
        from flujo_sqlite import SQLiteBackend

        def state(size):
            now = datetime.now(timezone.utc)
            return dict(pipeline_id="p", pipeline_name="P", pipeline_version="1",
                        current_step_index=0, pipeline_context={{"blob": "x" * size}},
                        status="running", created_at=now, updated_at=now)

        async def main():
            rng = random.Random(7)
            sizes = [rng.choice([1, 30, 60, 100, 200, 400]) * 1000 for _ in range(40)]
            async with SQLiteBackend({str(tmp_path / "wait.db")!r}, durability="normal") as b:
                for i, size in enumerate(sizes):
                    await b.save_state(f"r{{i}}", state(size))
                for _ in range(50):
                    for i, size in enumerate(sizes):
                        loaded = await b.load_state(f"r{{i}}")
                        assert len(loaded["pipeline_context"]["blob"]) == size
                    await b.save_state("r0", state(sizes[0]))
            print("delivered")

        asyncio.run(main())
        """
    )
    try:
        result = run_python(script, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a call was never delivered: the child hung for 60 s")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "delivered"


async def test_200_concurrent_save_and_load_tasks(backend: SQLiteBackend) -> None:
    async def save_then_load(i: int) -> dict[str, Any] | None:
        await backend.save_state(f"c{i:03d}", build_state(pipeline_context={"i": i}))
        return await backend.load_state(f"c{i:03d}")

    results = await asyncio.gather(*(save_then_load(i) for i in range(200)))

    for i, loaded in enumerate(results):
        assert loaded is not None
        assert loaded["run_id"] == f"c{i:03d}"
        assert loaded["pipeline_context"] == {"i": i}
    assert len(await backend.list_workflows()) == 200


async def test_five_workers_save_load_delete_load(backend: SQLiteBackend) -> None:
    async def worker(i: int) -> tuple[Any, Any]:
        run_id = f"worker-{i}"
        await backend.save_state(run_id, build_state(current_step_index=i))
        loaded = await backend.load_state(run_id)
        await backend.delete_state(run_id)
        return loaded, await backend.load_state(run_id)

    results = await asyncio.gather(*(worker(i) for i in range(5)))

    for i, (loaded, after_delete) in enumerate(results):
        assert loaded is not None and loaded["current_step_index"] == i
        assert after_delete is None
    assert await backend.list_workflows() == []


async def test_1000_concurrent_writers_with_20_reader_loops(backend: SQLiteBackend) -> None:
    writers_done = asyncio.Event()
    contexts = {f"w{i:04d}": {"writer": i, "payload": "x" * (i % 50)} for i in range(1000)}

    async def writers() -> None:
        try:
            await asyncio.gather(
                *(
                    backend.save_state(run_id, build_state(pipeline_context=context))
                    for run_id, context in contexts.items()
                )
            )
        finally:
            writers_done.set()

    async def reader(k: int) -> int:
        seen = 0
        loops = 0
        probe = f"w{k * 50:04d}"
        while not writers_done.is_set():
            count = len(await backend.list_workflows())
            assert count >= seen, "a committed row disappeared"
            seen = count
            loaded = await backend.load_state(probe)
            assert loaded is None or loaded["pipeline_context"] == contexts[probe]
            loops += 1
        return loops

    _, *loops = await asyncio.gather(writers(), *(reader(k) for k in range(20)))

    assert all(n >= 1 for n in loops)
    rows = await backend.list_workflows()
    assert sorted(run_ids(rows)) == sorted(contexts)
    for run_id in ("w0000", "w0499", "w0999"):
        loaded = await backend.load_state(run_id)
        assert loaded is not None and loaded["pipeline_context"] == contexts[run_id]


async def test_cancelled_save_either_committed_or_not(backend: SQLiteBackend) -> None:
    await backend.save_state("keep", build_state(current_step_index=1))
    for i in range(20):
        run_id = f"cancel-{i}"
        task = asyncio.ensure_future(
            backend.save_state(run_id, build_state(current_step_index=7, pipeline_context={"i": i}))
        )
        for _ in range(i % 4):
            await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        loaded = await backend.load_state(run_id)
        if loaded is not None:
            assert loaded["current_step_index"] == 7
            assert loaded["pipeline_context"] == {"i": i}

    # The backend is still fully usable afterwards.
    await backend.save_state("after", build_state())
    assert (await backend.load_state("after")) is not None
    assert (await backend.load_state("keep"))["current_step_index"] == 1


# The start of a child program that saves `state` (it imports nothing of ours).
A_STATE_IN_A_CHILD = textwrap.dedent(
    """
    from datetime import datetime, timezone

    now = datetime.now(timezone.utc)
    state = dict(pipeline_id="p", pipeline_name="P", pipeline_version="1",
                 current_step_index=0, pipeline_context={}, status="running",
                 created_at=now, updated_at=now)
    """
)


def test_unclosed_backend_does_not_hang_interpreter_exit(tmp_path: Path) -> None:
    db = tmp_path / "exit.db"
    script = A_STATE_IN_A_CHILD + textwrap.dedent(
        f"""
        import asyncio
        from flujo_sqlite import SQLiteBackend

        async def main():
            backend = SQLiteBackend({str(db)!r})  # never closed
            await backend.save_state("left-open", state)

        asyncio.run(main())
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert [r["run_id"] for r in raw_rows(db, "SELECT run_id FROM workflow_state")] == ["left-open"]


def test_running_out_of_file_descriptors_is_named(tmp_path: Path) -> None:
    """SQLite says only "unable to open database file", which points at the folder."""
    script = A_STATE_IN_A_CHILD + textwrap.dedent(
        f"""
        import asyncio, resource
        from flujo_sqlite import SQLiteBackend, DatabaseError


        async def main():
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
            backends = []
            try:
                for i in range(64):
                    backend = SQLiteBackend({str(tmp_path)!r} + f"/{{i}}.db")
                    backends.append(backend)
                    await backend.save_state("r", state)
            except DatabaseError as error:
                print(error)
            for backend in backends:
                await backend.close()

        asyncio.run(main())
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert "unable to open database file" in result.stdout, result.stdout
    assert "ulimit -n" in result.stdout, result.stdout


def test_a_backend_used_by_a_later_exit_hook_opens_its_file_again(tmp_path: Path) -> None:
    """Exit hooks run last-registered first: one registered before flujo_sqlite was imported
    runs after ours has closed every backend, and its call must open the file again."""
    db = tmp_path / "exit.db"
    script = A_STATE_IN_A_CHILD + textwrap.dedent(
        f"""
        import asyncio, atexit

        def save_at_exit():
            asyncio.run(backend.save_state("at-exit", state))
            print("saved at exit")

        atexit.register(save_at_exit)
        from flujo_sqlite import SQLiteBackend

        backend = SQLiteBackend({str(db)!r})
        asyncio.run(backend.save_state("before-exit", state))
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == "saved at exit\n"
    rows = raw_rows(db, "SELECT run_id FROM workflow_state ORDER BY run_id")
    assert [r["run_id"] for r in rows] == ["at-exit", "before-exit"]


def test_threads_each_running_loops_share_one_backend(tmp_path: Path) -> None:
    """Each thread's first call on a loop makes that loop's completion port (and forgets the
    ports of closed loops): threads doing that at once must not trip over each other."""
    backend = SQLiteBackend(tmp_path / "wf.db")
    kept: list[asyncio.AbstractEventLoop] = []  # loops a thread pool's threads would keep open
    for _ in range(200):
        loop = asyncio.new_event_loop()
        loop.run_until_complete(backend.load_state("x"))
        kept.append(loop)
    errors: list[BaseException] = []

    def one_loop_per_call() -> None:
        for _ in range(100):
            try:
                asyncio.run(backend.load_state("x"))
            except Exception as error:  # noqa: BLE001 (any of them is the failure)
                errors.append(error)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often, as a loaded machine may
    try:
        threads = [threading.Thread(target=one_loop_per_call) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
        for loop in kept:
            loop.close()
        backend.close_sync()
    assert errors == []


def test_loops_closed_with_calls_in_flight_are_let_go(db_path: Path) -> None:
    """A program that runs ``asyncio.run`` per job, or a test suite with a loop per test, may
    close a loop while a call is still in flight: the loop (and its sockets) must not be kept
    alive by the call's future."""
    backend = SQLiteBackend(db_path)
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []

    async def leave_a_save_in_flight(i: int) -> None:
        loops.append(weakref.ref(asyncio.get_running_loop()))
        asyncio.ensure_future(backend.save_state(f"left-{i}", build_state()))
        await asyncio.sleep(0)  # queued; asyncio.run cancels the task on its way out

    for i in range(20):
        asyncio.run(leave_a_save_in_flight(i))

    asyncio.run(backend.close())
    # Queued saves were made, though nobody waited for them.
    assert len(raw_rows(db_path, "SELECT run_id FROM workflow_state")) == 20
    gc.collect()
    assert sum(ref() is not None for ref in loops) == 0


_HOLD_THE_WRITE_LOCK = """
import select, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
select.select([sys.stdin], [], [], 60)  # until told, or a minute at most
conn.execute("COMMIT")
"""


# Dropping used to join the engine's threads holding the GIL, which a writer that logs needs:
# a hang that the default timeout method cannot interrupt.
@pytest.mark.timeout(240, method="thread")
def test_dropping_an_unclosed_backend_does_not_wait_for_its_queued_writes_nor_lose_them(
    db_path: Path,
) -> None:
    async def create() -> None:
        async with SQLiteBackend(db_path) as backend:
            await backend.save_state("first", build_state())

    asyncio.run(create())
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_THE_WRITE_LOCK, str(db_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"

        async def queue_a_save_and_drop_the_backend() -> None:
            backend = SQLiteBackend(db_path, lock_timeout=300)
            task = asyncio.ensure_future(backend.save_state("queued", build_state()))
            await asyncio.sleep(0)  # queued behind the other process's lock
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            del backend, task
            gc.collect()  # dropped here, on the loop's thread, with the GIL held

        asyncio.run(queue_a_save_and_drop_the_backend())
        # Dropping the backend returned while the lock is still held: it did not wait for the
        # queued save (which blocked the loop and held the GIL until the lock was released).
        assert holder.poll() is None
    finally:
        assert holder.stdin is not None
        holder.stdin.write("release\n")
        holder.stdin.close()
        holder.wait(timeout=120)
        holder.stdout.close()
    wait_for_dropped_backends()
    rows = raw_rows(db_path, "SELECT run_id FROM workflow_state ORDER BY run_id")
    assert [row["run_id"] for row in rows] == ["first", "queued"]


async def test_cancelling_a_call_whose_error_is_ready_at_once_reports_nothing(
    db_path: Path,
) -> None:
    engine = await closed_engine(db_path)
    reported: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))

    async def load() -> Any:
        return await engine.load_state(_port(), "r")

    for _ in range(20):
        task = asyncio.ensure_future(load())
        await asyncio.sleep(0)  # it ran: its BackendClosedError is handed over a turn later
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, BackendClosedError):
            await task
    await asyncio.sleep(0.05)
    assert reported == []


async def test_direct_sql_from_another_process_does_not_break_an_open_backend(
    backend: SQLiteBackend, db_path: Path
) -> None:
    """The guide's direct SQL, run the supported way while our backend is open: from another
    process (the sqlite3 shell, or here the stdlib sqlite3 module in a child). Each of its
    connections opens and closes while ours stays open; that must not pull the WAL out from
    under us, and each side sees the other's committed rows. (The same from this process is a
    documented limitation: two copies of SQLite in one process.)"""
    await backend.save_state("before", build_state())

    count = await asyncio.to_thread(
        sql_in_another_process, db_path, "SELECT COUNT(*) FROM workflow_state"
    )
    assert count == [[1]]

    await backend.save_state("after", build_state(status="completed"))
    assert (await backend.load_state("after"))["status"] == "completed"
    assert (await backend.load_state("before")) is not None
    seen = await asyncio.to_thread(
        sql_in_another_process, db_path, "SELECT run_id FROM workflow_state ORDER BY run_id"
    )
    assert seen == [["after"], ["before"]]

    await asyncio.to_thread(
        sql_in_another_process,
        db_path,
        "UPDATE workflow_state SET status = 'paused' WHERE run_id = ?",
        ("before",),
    )
    assert (await backend.load_state("before"))["status"] == "paused"
    await backend.save_state("last", build_state())
    assert sorted(run_ids(await backend.list_workflows())) == ["after", "before", "last"]

    await backend.close()
    assert sorted(r[0] for r in raw_rows(db_path, "SELECT run_id FROM workflow_state")) == [
        "after",
        "before",
        "last",
    ]
    assert raw_rows(db_path, "PRAGMA integrity_check")[0][0] == "ok"


def test_another_process_reading_and_writing_while_backend_is_open(db_path: Path) -> None:
    async def scenario() -> dict[str, Any] | None:
        async with SQLiteBackend(db_path) as backend:
            await backend.save_state("a", build_state())
            script = (
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                "n = c.execute('SELECT COUNT(*) FROM workflow_state').fetchone()[0]; "
                "c.execute(\"UPDATE workflow_state SET status = 'paused'\"); c.commit(); "
                "c.close(); print(n)"
            )
            result = await asyncio.to_thread(run_python, script, str(db_path))
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == "1"
            await backend.save_state("b", build_state())
            assert await backend.load_state("b") is not None
            return await backend.load_state("a")

    loaded = asyncio.run(scenario())
    assert loaded is not None and loaded["status"] == "paused"


# --------------------------------------------------------------------------------------------
# Input validation


@pytest.mark.parametrize("run_id", [None, 5, 1.5, b"bytes", ["r"]])
async def test_run_id_must_be_a_str(backend: SQLiteBackend, run_id: Any) -> None:
    with pytest.raises(TypeError):
        await backend.save_state(run_id, build_state())
    with pytest.raises(TypeError):
        await backend.load_state(run_id)
    with pytest.raises(TypeError):
        await backend.delete_state(run_id)
    assert await backend.list_workflows() == []


HOSTILE_RUN_IDS = {
    "empty": "",
    "nul": "\x00",
    "embedded-nul": "a\x00b\x00",
    "long": "x" * 10_000,
    "unicode": "😀 café ☃ \u2028\u2029\u200b \U0010ffff",
    "sql-injection": "'; DROP TABLE workflow_state; --",
    "sql-tautology": "x' OR '1'='1",
    "like-wildcards": "%_\\",
    "whitespace": " \t\n ",
}


@pytest.mark.parametrize("run_id", HOSTILE_RUN_IDS.values(), ids=HOSTILE_RUN_IDS.keys())
async def test_any_str_run_id_round_trips_exactly(backend: SQLiteBackend, run_id: str) -> None:
    await backend.save_state("bystander", build_state())
    await backend.save_state(run_id, build_state(status="paused"))

    loaded = await backend.load_state(run_id)

    assert loaded is not None
    assert loaded["run_id"] == run_id
    assert loaded["status"] == "paused"
    assert sorted(run_ids(await backend.list_workflows())) == sorted(["bystander", run_id])
    assert run_ids(await backend.list_workflows(status="paused")) == [run_id]
    await backend.close()
    # Stored as the very same text, for other tools reading the file.
    stored = raw_rows(backend.db_path, "SELECT run_id FROM workflow_state WHERE status = 'paused'")
    assert [r["run_id"] for r in stored] == [run_id]

    async with SQLiteBackend(backend.db_path) as reopened:
        await reopened.delete_state(run_id)
        assert await reopened.load_state(run_id) is None
        assert run_ids(await reopened.list_workflows()) == ["bystander"]


@pytest.mark.parametrize("status", ["done", "RUNNING", "", None, "running; --"])
async def test_unknown_status_is_rejected_and_nothing_written(
    backend: SQLiteBackend, status: Any
) -> None:
    await backend.save_state("r", build_state(status="paused"))

    with pytest.raises(InvalidStateError):
        await backend.save_state("r", build_state(status=status))
    with pytest.raises(InvalidStateError):
        await backend.save_state("new", build_state(status=status))

    assert (await backend.load_state("r"))["status"] == "paused"
    assert await backend.load_state("new") is None


@pytest.mark.parametrize("key", REQUIRED_KEYS)
async def test_missing_required_key_is_named_and_nothing_written(
    backend: SQLiteBackend, key: str
) -> None:
    state = build_state()
    del state[key]

    # Also a KeyError, as Flujo's backend raises there, so `except KeyError` still works.
    with pytest.raises(KeyError) as excinfo:
        await backend.save_state("r", state)

    assert isinstance(excinfo.value, MissingKeyError)
    assert isinstance(excinfo.value, InvalidStateError)
    assert str(excinfo.value).startswith(f'state is missing the required key "{key}"')
    assert await backend.load_state("r") is None


async def test_every_missing_required_key_is_named_at_once(backend: SQLiteBackend) -> None:
    state = {"pipeline_id": "p", "status": "running", "pipeline_context": {}}
    with pytest.raises(MissingKeyError) as excinfo:
        await backend.save_state("r", state)
    assert str(excinfo.value).startswith(
        'state is missing the required keys "pipeline_name", "pipeline_version", '
        '"current_step_index", "created_at", "updated_at"; every state needs'
    )


async def test_run_and_step_records_missing_a_key_raise_a_key_error_too(
    backend: SQLiteBackend,
) -> None:
    with pytest.raises(KeyError, match='run_data needs the key "run_id"') as excinfo:
        await backend.save_run_start({"pipeline_name": "p"})
    assert isinstance(excinfo.value, MissingKeyError)
    with pytest.raises(MissingKeyError, match='step_data needs the key "step_name"'):
        await backend.save_step_result({"run_id": "r", "step_index": 0})


@pytest.mark.parametrize("field", ["created_at", "updated_at"])
@pytest.mark.parametrize(
    "value", ["yesterday", "", "2024-13-45T00:00:00", 1_700_000_000, None, 1.5]
)
async def test_timestamps_must_be_datetime_or_date_or_iso_text(
    backend: SQLiteBackend, field: str, value: Any
) -> None:
    # Non-ISO text: InvalidStateError; ints, floats, None: InvalidTypeError (a subclass of it).
    with pytest.raises(InvalidStateError) as excinfo:
        await backend.save_state("r", build_state(**{field: value}))

    if not isinstance(value, str):
        assert isinstance(excinfo.value, InvalidTypeError)
    assert field in str(excinfo.value)
    assert await backend.load_state("r") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00", datetime(2024, 1, 1)),
        ("2024-01-01 05:00:00.5+02:00", datetime(2024, 1, 1, 3, 0, 0, 500000, tzinfo=UTC)),
        ("2024-01-01", datetime(2024, 1, 1)),
    ],
)
async def test_iso_text_timestamps_are_accepted_like_datetimes(
    backend: SQLiteBackend, text: str, expected: datetime
) -> None:
    # Flujo 0.6.11's runner sends ISO text; it is stored exactly as the equivalent datetime.
    await backend.save_state("r", build_state(created_at=text, updated_at=text))

    loaded = await backend.load_state("r")

    assert loaded is not None
    assert loaded["created_at"] == expected
    assert (loaded["created_at"].tzinfo is None) == (expected.tzinfo is None)
    await backend.save_state("same", build_state(created_at=expected, updated_at=expected))
    await backend.close()
    stored = raw_rows(backend.db_path, "SELECT run_id, created_at, updated_at FROM workflow_state")
    assert len(stored) == 2
    assert len({r["created_at"] for r in stored} | {r["updated_at"] for r in stored}) == 1


class Opaque:
    """Has no registered serializer and is not a dataclass, model, enum or container."""

    def __init__(self) -> None:
        self.secret = 1


async def test_unserializable_value_names_its_path_and_keeps_the_old_state(
    backend: SQLiteBackend,
) -> None:
    before = build_state(pipeline_context={"model": "fine"}, current_step_index=1)
    await backend.save_state("r", before)

    with pytest.raises(SerializationError) as excinfo:
        await backend.save_state(
            "r", build_state(pipeline_context={"model": Opaque()}, current_step_index=2)
        )

    assert "pipeline_context['model']" in str(excinfo.value)
    loaded = await backend.load_state("r")
    assert loaded is not None
    assert loaded["pipeline_context"] == {"model": "fine"}
    assert loaded["current_step_index"] == 1


async def test_unserializable_value_deep_in_output_is_located(backend: SQLiteBackend) -> None:
    with pytest.raises(SerializationError) as excinfo:
        await backend.save_state(
            "r", build_state(last_step_output={"items": [1, {"obj": Opaque()}]})
        )

    message = str(excinfo.value)
    assert "last_step_output" in message
    assert "Opaque" in message
    assert await backend.load_state("r") is None


# --------------------------------------------------------------------------------------------
# Files that are not databases


async def test_text_file_at_path_is_reported_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    original = b"Shopping list\n- milk\n- eggs\n" * 100
    path.write_bytes(original)
    stat_before = path.stat()

    opened: list[SQLiteBackend] = []
    # The error may come from the constructor or from the first use; either is fine.
    with pytest.raises(CorruptDatabaseError):
        opened.append(SQLiteBackend(path))
        await opened[-1].load_state("r")
    with pytest.raises(CorruptDatabaseError):
        opened.append(SQLiteBackend(path))
        await opened[-1].save_state("r", build_state())
    for backend in opened:
        await backend.close()

    assert path.read_bytes() == original
    assert path.stat().st_ino == stat_before.st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


async def test_corrupt_database_error_is_a_sqlite_database_error(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(os.urandom(8192))
    backend = SQLiteBackend(path)
    with pytest.raises(sqlite3.DatabaseError):
        await backend.list_workflows()
    await backend.close()


async def test_a_log_level_raised_at_run_time_reaches_a_backend_already_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Levels are cached on the Rust side; a backend used to keep the ones it started with."""
    old = datetime.now(UTC) - timedelta(days=60)
    deleted = "cleanup_old_workflows deleted"
    logger = logging.getLogger("flujo_sqlite")
    with caplog.at_level(logging.INFO, logger="flujo_sqlite"):  # restores the level after
        logger.setLevel(logging.WARNING)
        async with SQLiteBackend(tmp_path / "wf.db") as backend:
            await backend.save_state("a", build_state(created_at=old, updated_at=old))
            assert await backend.cleanup_old_workflows(30) == 1
            assert not [r for r in caplog.records if deleted in r.getMessage()]
            logger.setLevel(logging.INFO)
            await asyncio.sleep(1.1)  # the cache is refreshed at most once a second
            await backend.save_state("b", build_state(created_at=old, updated_at=old))
            assert await backend.cleanup_old_workflows(30) == 1
    assert [r.getMessage() for r in caplog.records if deleted in r.getMessage()] == [
        f"{deleted} 1 workflow states from {tmp_path / 'wf.db'}"
    ]


async def test_logging_configured_after_a_first_backend_applies_to_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="flujo_sqlite"):
        async with SQLiteBackend(tmp_path / "first.db") as backend:
            await backend.save_state("r", build_state())
    assert not [r for r in caplog.records if r.levelno < logging.WARNING]
    with caplog.at_level(logging.INFO, logger="flujo_sqlite"):
        async with SQLiteBackend(tmp_path / "second.db") as backend:
            await backend.save_state("r", build_state())
    assert any(
        r.name.startswith("flujo_sqlite") and r.levelno == logging.INFO for r in caplog.records
    ), [r.getMessage() for r in caplog.records]


def test_records_logged_on_engine_threads_leave_no_phantom_threads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Python's logging names a record's thread through ``threading.current_thread()``, which
    for a thread Python did not start registers a ``_DummyThread`` that Python before 3.13
    never removes: each engine thread that logged stayed in ``threading.enumerate()``, "alive",
    after its backend closed, failing test suites' checks for threads left over."""
    before = set(threading.enumerate())
    with caplog.at_level(logging.INFO, logger="flujo_sqlite"):
        for name in ("a.db", "b.db", "c.db"):

            async def session(path: Path = tmp_path / name) -> None:
                async with SQLiteBackend(path) as backend:
                    await backend.save_state("r", build_state())

            asyncio.run(session())
    on_engine_threads = [
        r
        for r in caplog.records
        if r.name.startswith("flujo_sqlite") and r.thread != threading.get_ident()
    ]
    assert on_engine_threads, [r.getMessage() for r in caplog.records]
    assert [t for t in threading.enumerate() if t not in before] == []


def test_first_open_of_a_filled_file_logs_its_index_builds(tmp_path: Path) -> None:
    """Building our indexes is the one slow step of opening a big file Flujo filled (seconds at
    a million runs), so each index is logged through `logging` as it is built, and only once."""
    db = tmp_path / "filled.db"

    async def fill() -> None:
        async with SQLiteBackend(db) as backend:
            for i in range(30):
                await backend.save_state(f"r{i}", build_state())

    asyncio.run(fill())
    conn = sqlite3.connect(db)
    ours = [
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE name LIKE 'idx_flujo_sqlite_%'")
    ]
    for name in ours:
        conn.execute(f"DROP INDEX {name}")
    conn.commit()
    conn.close()
    assert ours, "a new file has indexes of ours"
    script = textwrap.dedent(
        """
        import asyncio, logging, sys
        logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
        from flujo_sqlite import SQLiteBackend

        async def main():
            async with SQLiteBackend(sys.argv[1]) as backend:
                assert len(await backend.list_workflows()) == 30

        asyncio.run(main())
        """
    )

    def open_and_log() -> str:
        result = run_python(script, str(db))
        assert result.returncode == 0, result.stderr
        return result.stderr

    first = open_and_log()
    for name in ours:
        assert f"flujo_sqlite.sqlite.schema building index {name} over 30 stored runs" in first
        assert f"flujo_sqlite.sqlite.schema built index {name} in " in first
    assert "building index" not in open_and_log()
