"""Shared fixtures for the flujo-sqlite test suite.

Every test gets a fresh database file under pytest's ``tmp_path``. ``make_state`` builds a
realistic, valid Flujo workflow state (aware UTC datetimes) that tests tweak with overrides.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from flujo_sqlite import SQLiteBackend

#: The keys ``save_state`` requires (Flujo 0.4.35, spec 3.1).
REQUIRED_KEYS = (
    "pipeline_id",
    "pipeline_name",
    "pipeline_version",
    "current_step_index",
    "pipeline_context",
    "status",
    "created_at",
    "updated_at",
)

#: The 15 keys Flujo 0.4.35's ``load_state`` returns (spec 3.1).
LOAD_STATE_KEYS_0435 = frozenset(
    {
        "run_id",
        "pipeline_id",
        "pipeline_name",
        "pipeline_version",
        "current_step_index",
        "pipeline_context",
        "last_step_output",
        "step_history",
        "status",
        "created_at",
        "updated_at",
        "total_steps",
        "error_message",
        "execution_time_ms",
        "memory_usage_mb",
    }
)

#: The 12 keys of a Flujo 0.4.35 ``list_workflows`` / ``get_failed_workflows`` item.
WORKFLOW_ITEM_KEYS_0435 = frozenset(
    {
        "run_id",
        "pipeline_id",
        "pipeline_name",
        "pipeline_version",
        "current_step_index",
        "status",
        "created_at",
        "updated_at",
        "total_steps",
        "error_message",
        "execution_time_ms",
        "memory_usage_mb",
    }
)

#: The five background-task keys Flujo 0.6.11 adds to states and workflow items.
BACKGROUND_KEYS = frozenset(
    {"metadata", "is_background_task", "parent_run_id", "task_id", "background_error"}
)

#: What those five keys hold for a row that was saved without any of them.
BACKGROUND_DEFAULTS: dict[str, Any] = {
    "metadata": {},
    "is_background_task": False,
    "parent_run_id": None,
    "task_id": None,
    "background_error": None,
}

#: Our return shapes are Flujo 0.6.11's (the user guide's release), a superset of 0.4.35's:
#: ``load_state`` returns 20 keys; ``list_workflows``, ``get_failed_workflows`` and
#: ``list_background_tasks`` items have 17.
LOAD_STATE_KEYS = LOAD_STATE_KEYS_0435 | BACKGROUND_KEYS
WORKFLOW_ITEM_KEYS = WORKFLOW_ITEM_KEYS_0435 | BACKGROUND_KEYS

#: ``get_workflow_stats()``: Flujo 0.4.35's four keys plus 0.6.11's ``background_status_counts``.
WORKFLOW_STATS_KEYS_0435 = frozenset(
    {"total_workflows", "status_counts", "recent_workflows_24h", "average_execution_time_ms"}
)
WORKFLOW_STATS_KEYS = WORKFLOW_STATS_KEYS_0435 | {"background_status_counts"}

#: ``get_workflow_stats()`` of a database without any workflow.
EMPTY_WORKFLOW_STATS: dict[str, Any] = {
    "total_workflows": 0,
    "status_counts": {},
    "recent_workflows_24h": 0,
    "average_execution_time_ms": 0,
    "background_status_counts": {},
}

STATUSES = ("running", "paused", "completed", "failed", "cancelled")


def utc_now() -> datetime:
    return datetime.now(UTC)


def build_state(**overrides: Any) -> dict[str, Any]:
    """A realistic, valid state as Flujo's runner would save it, with ``overrides`` applied."""
    now = utc_now()
    state: dict[str, Any] = {
        "pipeline_id": "data_processing",
        "pipeline_name": "Data Processing Pipeline",
        "pipeline_version": "1.0.0",
        "current_step_index": 2,
        "pipeline_context": {
            "input_data": "s3://bucket/2026/sample.csv",
            "processed_rows": 1000,
            "options": {"delimiter": ",", "header": True, "sample_rate": 0.25},
            "tags": ["etl", "nightly"],
            "owner": None,
        },
        "last_step_output": {"status": "success", "rows_processed": 1000},
        "step_history": [
            {"name": "extract", "success": True, "latency_s": 0.42},
            {"name": "transform", "success": True, "latency_s": 1.08},
        ],
        "status": "running",
        "created_at": now - timedelta(minutes=5),
        "updated_at": now,
        "total_steps": 5,
        "error_message": None,
        "execution_time_ms": 1500,
        "memory_usage_mb": 45.2,
    }
    state.update(overrides)
    return state


@pytest.fixture
def make_state() -> Callable[..., dict[str, Any]]:
    """``make_state(**overrides)`` -> a fresh valid state dict."""
    return build_state


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "wf.db"


@pytest.fixture
async def backend(db_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(db_path)
    try:
        yield b
    finally:
        await b.close()


# The stdlib sqlite3 module is a second copy of SQLite in this process (our wheel bundles its
# own). Closing one of its connections while one of our backends has the same file open in this
# process can delete our WAL (POSIX locks are per process): a documented limitation. So the two
# helpers below are only for files no backend of ours has open in this process; while one is
# open, do direct SQL from another process (``sql_in_another_process``).


def raw_rows(path: Path | str, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
    """Runs ``sql`` with the stdlib sqlite3 module on its own connection and returns all rows.
    Only while no backend of ours has ``path`` open in this process."""
    conn = sqlite3.connect(str(path))
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def checkpoint(path: Path | str) -> None:
    """Folds the WAL into the main file so the ``.db`` alone holds every committed row.
    Only while no backend of ours has ``path`` open in this process."""
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
    finally:
        conn.close()


_SQL_IN_CHILD = """
import json, sqlite3, sys
sql, params = json.loads(sys.stdin.read())
conn = sqlite3.connect(sys.argv[1])
try:
    rows = conn.execute(sql, params).fetchall()
    conn.commit()
finally:
    conn.close()
print(json.dumps([list(r) for r in rows]))
"""


def run_python(
    code: str, *args: str, stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Runs ``python -c code *args`` with this interpreter in a child process and returns what it
    did (text output captured; a non-zero exit is for the caller to check). A child that outlives
    ``timeout`` seconds is killed and ``subprocess.TimeoutExpired`` raised. Blocks: from a
    coroutine, call it through ``asyncio.to_thread``."""
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def sql_in_another_process(
    path: Path | str, sql: str, params: tuple[Any, ...] = ()
) -> list[list[Any]]:
    """Runs one statement (and commits) with the stdlib sqlite3 module in a child process, as
    the sqlite3 shell would, and returns the rows as lists. Safe while our backend is open.
    Blocks: from a coroutine, call it through ``asyncio.to_thread``."""
    result = run_python(_SQL_IN_CHILD, str(path), stdin=json.dumps([sql, list(params)]))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def same(left: Any, right: Any) -> bool:
    """Equality that also compares types (``True`` is not ``1``, ``1.0`` is not ``1``) and the
    order of dict keys (JSON keeps insertion order, and so does Flujo)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return list(left) == list(right) and all(same(left[key], right[key]) for key in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(same(a, b) for a, b in zip(left, right))
    if isinstance(left, float):
        return (math.isnan(left) and math.isnan(right)) or (
            left == right and math.copysign(1, left) == math.copysign(1, right)
        )
    return bool(left == right)
