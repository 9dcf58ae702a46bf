"""The user guide (Flujo's ``sqlite_backend_guide.md``), run against flujo-sqlite.

Each Python example of the guide is its own test and runs as written, with only the import
changed to ``from flujo_sqlite import SQLiteBackend`` (the guide's relative paths resolve in a
per-test temporary directory). Each SQL query of the guide runs through the stdlib ``sqlite3``
module against a file our backend wrote, and its answer is checked against numbers computed
independently in Python from the states that were saved, including rows placed just inside and
just outside the 7-day and 30-day windows.
"""

# The guide's code is kept verbatim, including `timezone.utc` and `except Exception`.
# ruff: noqa: UP017, BLE001

from __future__ import annotations

import os
import random
import re
import shutil
import sqlite3
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import BACKGROUND_DEFAULTS, UTC, build_state, checkpoint, raw_rows
from flujo_sqlite import SQLiteBackend, load_backend_from_config
from flujo_sqlite.errors import CorruptDatabaseError, FlujoSQLiteError

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

# Text a timestamp we wrote must look like (spec: aware values are stored in UTC).
STORED_AWARE_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d{6})?\+00:00$")

PIPELINES = (
    ("data_processing", "Data Processing Pipeline"),
    ("ml_training", "ML Training"),
    ("report_builder", "Report Builder"),
)
ERRORS = ("Timeout contacting API", "Schema validation failed", "Out of memory")
# Ages (hours) the guide's examples and queries cut at; random rows keep 1.5 h away from them
# so that the seconds a test takes cannot move a row across a window edge.
WINDOW_EDGES_HOURS = (1, 24, 168, 30 * 24, 90 * 24)


@dataclass(frozen=True)
class SavedRow:
    """One state the test saved, with what the queries need, all in UTC."""

    run_id: str
    pipeline_id: str
    pipeline_name: str
    status: str
    current_step_index: int
    created_at: datetime
    updated_at: datetime
    execution_time_ms: int | None
    memory_usage_mb: float | None
    error_message: str | None


@dataclass
class GuideData:
    backend: SQLiteBackend
    path: Path
    rows: list[SavedRow]
    t0: datetime  # the "now" the rows' ages were measured from

    def where(self, predicate: Callable[[SavedRow], bool]) -> list[SavedRow]:
        return [r for r in self.rows if predicate(r)]

    def newer_than(self, age: timedelta, field: str = "created_at") -> list[SavedRow]:
        return [r for r in self.rows if getattr(r, field) >= self.t0 - age]


def _random_age_hours(rng: random.Random) -> float:
    while True:
        age = rng.uniform(0.3, 45 * 24)
        if all(abs(age - edge) > 1.5 for edge in WINDOW_EDGES_HOURS):
            return age


def _in_zone(moment: datetime, index: int) -> datetime:
    """The same instant, expressed in one of three offsets: the backend must normalise them."""
    zones = (UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8)))
    return moment.astimezone(zones[index % len(zones)])


async def seed_guide_data(
    backend: SQLiteBackend,
    path: Path,
    *,
    count: int = 90,
    with_missing_metrics: bool = True,
) -> GuideData:
    """Saves ``count`` realistic states of three pipelines plus rows placed just inside and just
    outside the 7-day and 30-day windows, and returns what was saved."""
    rng = random.Random(20261127)
    t0 = datetime.now(UTC)
    specs: list[tuple[float, str]] = []
    for _ in range(count):
        status = rng.choices(
            ("completed", "failed", "running", "paused", "cancelled"), (50, 20, 15, 8, 7)
        )[0]
        specs.append((_random_age_hours(rng), status))
    # Just inside and just outside the built-in 24-hour windows.
    specs += [(2, "failed"), (23, "completed"), (25, "failed"), (26, "running")]
    # Window edges: one hour inside and one hour outside 7 days and 30 days.
    specs += [
        (7 * 24 - 1, "completed"),
        (7 * 24 + 1, "failed"),
        (30 * 24 - 1, "running"),
        (30 * 24 + 1, "completed"),
    ]
    rows: list[SavedRow] = []
    for i, (age_hours, status) in enumerate(specs):
        # Uneven shares so that per-pipeline totals differ.
        pipeline_id, pipeline_name = PIPELINES[(0, 0, 0, 1, 1, 2)[i % 6]]
        created = t0 - timedelta(hours=age_hours)
        updated = created + timedelta(minutes=rng.uniform(1, 50))
        if status == "failed" and updated > t0 - timedelta(minutes=5):
            updated = t0 - timedelta(minutes=5)
        missing = with_missing_metrics and i % 9 == 4
        execution_time_ms = None if missing else 250 + 97 * i
        memory = None if (with_missing_metrics and i % 11 == 3) else round(12.5 + 1.7 * i, 1)
        error = None
        if status == "failed":
            error = ERRORS[i % len(ERRORS)]
        elif status == "cancelled":
            error = "Cancelled by operator"
        step_index = rng.randint(0, 9)
        run_id = f"run_{i:03d}"
        state = build_state(
            run_id=run_id,
            pipeline_id=pipeline_id,
            pipeline_name=pipeline_name,
            pipeline_version="1.4.0",
            current_step_index=step_index,
            pipeline_context={"batch": i, "source": f"s3://data/{pipeline_id}/{i}.parquet"},
            last_step_output={"rows": 10 * i},
            status=status,
            created_at=_in_zone(created, i),
            updated_at=_in_zone(updated, i + 1),
            total_steps=10,
            error_message=error,
            execution_time_ms=execution_time_ms,
            memory_usage_mb=memory,
        )
        await backend.save_state(run_id, state)
        rows.append(
            SavedRow(
                run_id=run_id,
                pipeline_id=pipeline_id,
                pipeline_name=pipeline_name,
                status=status,
                current_step_index=step_index,
                created_at=created,
                updated_at=updated,
                execution_time_ms=execution_time_ms,
                memory_usage_mb=memory,
                error_message=error,
            )
        )
    return GuideData(backend=backend, path=path, rows=rows, t0=t0)


@pytest.fixture
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The guide uses relative paths such as ``Path("workflow_state.db")``."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
async def guide_backend(in_tmp_dir: Path) -> AsyncIterator[SQLiteBackend]:
    backend = SQLiteBackend(Path("workflow_state.db"))
    try:
        yield backend
    finally:
        await backend.close()


@pytest.fixture
async def guide_data(guide_backend: SQLiteBackend, in_tmp_dir: Path) -> GuideData:
    return await seed_guide_data(guide_backend, in_tmp_dir / "workflow_state.db")


@pytest.fixture
async def guide_file(guide_data: GuideData) -> GuideData:
    """The seeded file, our backend closed: the queries run as from the ``sqlite3`` shell.
    (Reading while the backend is open is covered in test_api.py.)"""
    await guide_data.backend.close()
    return guide_data


def by_created_desc(rows: Iterable[SavedRow]) -> list[SavedRow]:
    return sorted(rows, key=lambda r: r.created_at, reverse=True)


def ids(rows: Iterable[Any]) -> list[str]:
    return [r.run_id if isinstance(r, SavedRow) else r["run_id"] for r in rows]


def assert_ordered(
    actual: Sequence[Sequence[Any]],
    expected: Iterable[Sequence[Any]],
    key_index: int,
    *,
    descending: bool = True,
) -> None:
    """``actual`` holds exactly the ``expected`` rows and is sorted on column ``key_index``
    (ties in any order, as SQL leaves them)."""
    expected = list(expected)
    assert sorted(map(tuple, actual), key=repr) == sorted(map(tuple, expected), key=repr)
    keys = [row[key_index] for row in actual]
    assert keys == sorted(keys, reverse=descending)


def approx_rows(rows: Iterable[Sequence[Any]]) -> list[tuple[Any, ...]]:
    """Rounds floats so AVG() computed by SQLite and by Python compare equal."""
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


# --------------------------------------------------------------------------------------------
# Basic usage


async def test_initialization_creates_database_on_first_use(in_tmp_dir: Path) -> None:
    # Initialize with a database file path
    backend = SQLiteBackend(Path("workflow_state.db"))

    # The database will be automatically created and initialized on first use
    assert not (in_tmp_dir / "workflow_state.db").exists()
    assert await backend.load_state("anything") is None
    assert (in_tmp_dir / "workflow_state.db").is_file()
    # Closed first: the stdlib sqlite3 module must not open the file in this process meanwhile.
    await backend.close()
    tables = {r["name"] for r in raw_rows("workflow_state.db", "SELECT name FROM sqlite_master")}
    assert {"workflow_state", "runs", "steps", "spans"} <= tables


async def test_core_operations(
    guide_backend: SQLiteBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = guide_backend

    # Save workflow state
    now = datetime.now(timezone.utc).replace(microsecond=0)
    state = {
        "run_id": "run_123",
        "pipeline_id": "data_processing",
        "pipeline_name": "Data Processing Pipeline",
        "pipeline_version": "1.0.0",
        "current_step_index": 2,
        "pipeline_context": {"input_data": "sample.csv", "processed_rows": 1000},
        "last_step_output": {"status": "success", "rows_processed": 1000},
        "status": "running",
        "created_at": now,
        "updated_at": now,
        "total_steps": 5,
        "error_message": None,
        "execution_time_ms": 1500,
        "memory_usage_mb": 45.2,
    }

    await backend.save_state("run_123", state)

    # Load workflow state
    loaded_state = await backend.load_state("run_123")
    print(f"Pipeline: {loaded_state['pipeline_name']}")
    print(f"Status: {loaded_state['status']}")
    print(f"Current step: {loaded_state['current_step_index']}")

    assert capsys.readouterr().out.splitlines() == [
        "Pipeline: Data Processing Pipeline",
        "Status: running",
        "Current step: 2",
    ]
    assert loaded_state == {
        "run_id": "run_123",
        "pipeline_id": "data_processing",
        "pipeline_name": "Data Processing Pipeline",
        "pipeline_version": "1.0.0",
        "current_step_index": 2,
        "pipeline_context": {"input_data": "sample.csv", "processed_rows": 1000},
        "last_step_output": {"status": "success", "rows_processed": 1000},
        "step_history": [],
        "status": "running",
        "created_at": now,
        "updated_at": now,
        "total_steps": 5,
        "error_message": None,
        "execution_time_ms": 1500,
        "memory_usage_mb": 45.2,
        # Flujo 0.6.11's background-task keys, at their defaults.
        **BACKGROUND_DEFAULTS,
    }
    assert loaded_state["created_at"].tzinfo is not None
    assert loaded_state["created_at"].utcoffset() == timedelta(0)

    # Delete workflow state
    await backend.delete_state("run_123")

    assert await backend.load_state("run_123") is None


# --------------------------------------------------------------------------------------------
# Admin queries and observability


async def test_list_workflows_example(guide_data: GuideData) -> None:
    backend = guide_data.backend
    rows = guide_data.rows

    # List all workflows
    all_workflows = await backend.list_workflows()
    print(f"Total workflows: {len(all_workflows)}")

    # Filter by status
    running_workflows = await backend.list_workflows(status="running")
    failed_workflows = await backend.list_workflows(status="failed")

    # Filter by pipeline
    pipeline_workflows = await backend.list_workflows(pipeline_id="data_processing")

    # Pagination
    recent_workflows = await backend.list_workflows(limit=10, offset=0)

    assert ids(all_workflows) == ids(by_created_desc(rows))
    assert ids(running_workflows) == ids(by_created_desc(r for r in rows if r.status == "running"))
    assert ids(failed_workflows) == ids(by_created_desc(r for r in rows if r.status == "failed"))
    assert ids(pipeline_workflows) == ids(
        by_created_desc(r for r in rows if r.pipeline_id == "data_processing")
    )
    assert ids(recent_workflows) == ids(by_created_desc(rows))[:10]
    assert running_workflows and failed_workflows  # the data exercises both filters


async def test_workflow_statistics_example(
    guide_data: GuideData, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = guide_data.backend
    rows = guide_data.rows

    # Get comprehensive workflow statistics
    stats = await backend.get_workflow_stats()

    print(f"Total workflows: {stats['total_workflows']}")
    print(f"Status breakdown: {stats['status_counts']}")
    print(f"Recent workflows (24h): {stats['recent_workflows_24h']}")
    print(f"Average execution time: {stats['average_execution_time_ms']}ms")

    timed = [r.execution_time_ms for r in rows if r.execution_time_ms is not None]
    expected_recent = len(guide_data.newer_than(24 * HOUR))
    assert stats["total_workflows"] == len(rows)
    assert stats["status_counts"] == dict(Counter(r.status for r in rows))
    assert stats["recent_workflows_24h"] == expected_recent
    assert 0 < expected_recent < len(rows)
    assert isinstance(stats["average_execution_time_ms"], float)
    assert stats["average_execution_time_ms"] == pytest.approx(sum(timed) / len(timed))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"Total workflows: {len(rows)}"
    assert out[2] == f"Recent workflows (24h): {expected_recent}"


async def test_failed_workflows_analysis_example(
    guide_data: GuideData, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = guide_data.backend

    # Get failed workflows from the last 24 hours
    failed_24h = await backend.get_failed_workflows(hours_back=24)

    for workflow in failed_24h:
        print(f"Failed workflow: {workflow['run_id']}")
        print(f"  Pipeline: {workflow['pipeline_name']}")
        print(f"  Error: {workflow['error_message']}")
        print(f"  Failed at: {workflow['updated_at']}")

    # Get failed workflows from the last week
    failed_week = await backend.get_failed_workflows(hours_back=168)

    def expected(hours: int) -> list[SavedRow]:
        return sorted(
            (r for r in guide_data.newer_than(hours * HOUR, "updated_at") if r.status == "failed"),
            key=lambda r: r.updated_at,
            reverse=True,
        )

    assert ids(failed_24h) == ids(expected(24))
    assert ids(failed_week) == ids(expected(168))
    assert (
        len(failed_24h)
        < len(failed_week)
        < len([r for r in guide_data.rows if r.status == "failed"])
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 * len(failed_24h)
    for wf, row in zip(failed_24h, expected(24), strict=True):
        assert f"Failed workflow: {row.run_id}" in lines
        assert f"  Error: {row.error_message}" in lines
        assert datetime.fromisoformat(wf["updated_at"]) == row.updated_at


async def test_cleanup_operations_example(guide_data: GuideData) -> None:
    backend = guide_data.backend
    rows = guide_data.rows
    older_than_30 = [r for r in rows if r.created_at < guide_data.t0 - 30 * DAY]
    between_7_and_30 = [
        r for r in rows if guide_data.t0 - 30 * DAY <= r.created_at < guide_data.t0 - 7 * DAY
    ]
    assert older_than_30 and between_7_and_30

    # Clean up workflows older than 30 days
    deleted_count = await backend.cleanup_old_workflows(days_old=30)
    print(f"Deleted {deleted_count} old workflows")
    assert deleted_count == len(older_than_30)

    # Clean up workflows older than 7 days
    deleted_count = await backend.cleanup_old_workflows(days_old=7)
    assert deleted_count == len(between_7_and_30)

    remaining = await backend.list_workflows()
    assert ids(remaining) == ids(by_created_desc(guide_data.newer_than(7 * DAY)))


# --------------------------------------------------------------------------------------------
# Direct SQL queries: performance monitoring


async def test_sql_average_execution_time_by_pipeline(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            pipeline_name,
            COUNT(*) as total_runs,
            AVG(execution_time_ms) as avg_execution_time,
            MAX(execution_time_ms) as max_execution_time,
            MIN(execution_time_ms) as min_execution_time
        FROM workflow_state
        WHERE execution_time_ms IS NOT NULL
        GROUP BY pipeline_name
        ORDER BY avg_execution_time DESC;
        """,
    )
    per_pipeline: dict[str, list[int]] = defaultdict(list)
    for r in guide_file.rows:
        if r.execution_time_ms is not None:
            per_pipeline[r.pipeline_name].append(r.execution_time_ms)
    expected = [(name, len(v), sum(v) / len(v), max(v), min(v)) for name, v in per_pipeline.items()]
    assert len(expected) == 3
    assert_ordered(approx_rows(map(tuple, result)), approx_rows(expected), key_index=2)


async def test_sql_memory_usage_statistics(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            pipeline_name,
            AVG(memory_usage_mb) as avg_memory_usage,
            MAX(memory_usage_mb) as max_memory_usage,
            COUNT(*) as total_runs
        FROM workflow_state
        WHERE memory_usage_mb IS NOT NULL
        GROUP BY pipeline_name;
        """,
    )
    per_pipeline: dict[str, list[float]] = defaultdict(list)
    for r in guide_file.rows:
        if r.memory_usage_mb is not None:
            per_pipeline[r.pipeline_name].append(r.memory_usage_mb)
    assert any(r.memory_usage_mb is None for r in guide_file.rows)
    actual = {r["pipeline_name"]: r for r in result}
    assert actual.keys() == per_pipeline.keys()
    for name, values in per_pipeline.items():
        assert actual[name]["avg_memory_usage"] == pytest.approx(sum(values) / len(values))
        assert actual[name]["max_memory_usage"] == pytest.approx(max(values))
        assert actual[name]["total_runs"] == len(values)


async def test_sql_slow_workflows(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            run_id,
            pipeline_name,
            execution_time_ms,
            created_at
        FROM workflow_state
        WHERE execution_time_ms > 5000
        ORDER BY execution_time_ms DESC;
        """,
    )
    slow = sorted(
        (r for r in guide_file.rows if (r.execution_time_ms or 0) > 5000),
        key=lambda r: r.execution_time_ms or 0,
        reverse=True,
    )
    assert 0 < len(slow) < len(guide_file.rows)
    assert [(r["run_id"], r["pipeline_name"], r["execution_time_ms"]) for r in result] == [
        (r.run_id, r.pipeline_name, r.execution_time_ms) for r in slow
    ]
    for got, saved in zip(result, slow, strict=True):
        assert STORED_AWARE_TIMESTAMP.match(got["created_at"]), got["created_at"]
        assert datetime.fromisoformat(got["created_at"]) == saved.created_at


# --------------------------------------------------------------------------------------------
# Direct SQL queries: error analysis


async def test_sql_error_patterns(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            error_message,
            COUNT(*) as error_count,
            pipeline_name
        FROM workflow_state
        WHERE error_message IS NOT NULL
        GROUP BY error_message, pipeline_name
        ORDER BY error_count DESC;
        """,
    )
    counts = Counter(
        (r.error_message, r.pipeline_name) for r in guide_file.rows if r.error_message is not None
    )
    expected = [(message, n, pipeline) for (message, pipeline), n in counts.items()]
    assert len(expected) > 3
    assert_ordered([tuple(r) for r in result], expected, key_index=1)


async def test_sql_failed_workflows_by_step(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            run_id,
            pipeline_name,
            current_step_index,
            error_message,
            updated_at
        FROM workflow_state
        WHERE status = 'failed'
        ORDER BY updated_at DESC;
        """,
    )
    failed = sorted(
        (r for r in guide_file.rows if r.status == "failed"),
        key=lambda r: r.updated_at,
        reverse=True,
    )
    assert [
        (r["run_id"], r["pipeline_name"], r["current_step_index"], r["error_message"])
        for r in result
    ] == [(r.run_id, r.pipeline_name, r.current_step_index, r.error_message) for r in failed]
    assert [datetime.fromisoformat(r["updated_at"]) for r in result] == [
        r.updated_at for r in failed
    ]


async def test_sql_failure_rate_by_pipeline(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            pipeline_name,
            COUNT(*) as total_runs,
            SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) as failed_runs,
            ROUND(
                (SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) * 100.0 / COUNT(*)),
                2
            ) as failure_rate_percent
        FROM workflow_state
        GROUP BY pipeline_name
        ORDER BY failure_rate_percent DESC;
        """,
    )
    totals = Counter(r.pipeline_name for r in guide_file.rows)
    failures = Counter(r.pipeline_name for r in guide_file.rows if r.status == "failed")
    expected = [
        (name, totals[name], failures[name], round(failures[name] * 100.0 / totals[name], 2))
        for name in totals
    ]
    assert_ordered(approx_rows(map(tuple, result)), approx_rows(expected), key_index=3)


# --------------------------------------------------------------------------------------------
# Direct SQL queries: activity analysis


async def test_sql_activity_by_hour_last_7_days(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            strftime('%Y-%m-%d %H:00:00', created_at) as hour,
            COUNT(*) as workflows_started,
            SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) as completed,
            SUM(CASE WHEN status = 'failed' THEN 1 ELSE 0 END) as failed
        FROM workflow_state
        WHERE created_at >= datetime('now', '-7 days')
        GROUP BY hour
        ORDER BY hour DESC;
        """,
    )
    in_window = guide_file.newer_than(7 * DAY)
    ids_in_window = set(ids(in_window))
    assert f"run_{len(guide_file.rows) - 4:03d}" in ids_in_window  # 7 days - 1 hour old
    assert f"run_{len(guide_file.rows) - 3:03d}" not in ids_in_window  # 7 days + 1 hour old
    buckets: dict[str, list[SavedRow]] = defaultdict(list)
    for r in in_window:
        buckets[r.created_at.astimezone(UTC).strftime("%Y-%m-%d %H:00:00")].append(r)
    expected = [
        (
            hour,
            len(bucket),
            sum(r.status == "completed" for r in bucket),
            sum(r.status == "failed" for r in bucket),
        )
        for hour, bucket in sorted(buckets.items(), reverse=True)
    ]
    assert [tuple(r) for r in result] == expected
    assert sum(e[1] for e in expected) == len(in_window)


async def test_sql_most_active_pipelines_last_30_days(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            pipeline_name,
            COUNT(*) as total_runs,
            COUNT(DISTINCT DATE(created_at)) as active_days
        FROM workflow_state
        WHERE created_at >= datetime('now', '-30 days')
        GROUP BY pipeline_name
        ORDER BY total_runs DESC;
        """,
    )
    in_window = guide_file.newer_than(30 * DAY)
    in_window_ids = set(ids(in_window))
    assert f"run_{len(guide_file.rows) - 2:03d}" in in_window_ids  # 30 days - 1 hour old
    assert f"run_{len(guide_file.rows) - 1:03d}" not in in_window_ids  # 30 days + 1 hour old
    per_pipeline: dict[str, list[SavedRow]] = defaultdict(list)
    for r in in_window:
        per_pipeline[r.pipeline_name].append(r)
    expected = [
        (name, len(v), len({r.created_at.astimezone(UTC).date() for r in v}))
        for name, v in per_pipeline.items()
    ]
    assert_ordered([tuple(r) for r in result], expected, key_index=1)


async def test_sql_step_completion_statistics(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            pipeline_name,
            AVG(current_step_index) as avg_step_progress,
            MAX(current_step_index) as max_steps,
            COUNT(*) as total_workflows
        FROM workflow_state
        WHERE status = 'running'
        GROUP BY pipeline_name;
        """,
    )
    per_pipeline: dict[str, list[int]] = defaultdict(list)
    for r in guide_file.rows:
        if r.status == "running":
            per_pipeline[r.pipeline_name].append(r.current_step_index)
    assert per_pipeline
    assert sorted(approx_rows(map(tuple, result))) == sorted(
        approx_rows((name, sum(v) / len(v), max(v), len(v)) for name, v in per_pipeline.items())
    )


# --------------------------------------------------------------------------------------------
# Performance considerations


async def test_wal_mode_enabled_automatically(in_tmp_dir: Path, make_state) -> None:
    # The backend automatically enables WAL mode during initialization
    backend = SQLiteBackend(Path("workflow_state.db"))
    # WAL mode is enabled automatically - no additional configuration needed
    await backend.save_state("run_1", make_state())
    await backend.close()

    assert raw_rows("workflow_state.db", "PRAGMA journal_mode")[0][0] == "wal"


async def test_documented_indexes_exist(guide_file: GuideData) -> None:
    # -- These indexes are created automatically
    documented = {
        "idx_workflow_state_status": (
            "CREATE INDEX idx_workflow_state_status ON workflow_state(status)"
        ),
        "idx_workflow_state_created_at": (
            "CREATE INDEX idx_workflow_state_created_at ON workflow_state(created_at)"
        ),
        "idx_workflow_state_pipeline_id": (
            "CREATE INDEX idx_workflow_state_pipeline_id ON workflow_state(pipeline_id)"
        ),
    }
    stored = {
        r["name"]: " ".join(r["sql"].split())
        for r in raw_rows(
            guide_file.path, "SELECT name, sql FROM sqlite_master WHERE type = 'index'"
        )
        if r["sql"]
    }
    for name, sql in documented.items():
        assert stored.get(name) == sql
    conn = sqlite3.connect(guide_file.path)
    try:
        for sql in documented.values():
            with pytest.raises(sqlite3.OperationalError, match="already exists"):
                conn.execute(sql)
    finally:
        conn.close()


async def test_large_dataset_optimization_example(guide_data: GuideData) -> None:
    backend = guide_data.backend
    rows = guide_data.rows

    # Use pagination for large result sets
    workflows = await backend.list_workflows(limit=100, offset=0)

    # Filter by specific criteria to reduce result size
    recent_failures = await backend.list_workflows(status="failed", limit=50)

    # Use cleanup to prevent database bloat
    await backend.cleanup_old_workflows(days_old=90)

    assert ids(workflows) == ids(by_created_desc(rows))[:100]
    assert (
        ids(recent_failures) == ids(by_created_desc(r for r in rows if r.status == "failed"))[:50]
    )
    # Nothing in the data is 90 days old.
    assert len(await backend.list_workflows()) == len(rows)


# --------------------------------------------------------------------------------------------
# Fault tolerance and recovery


async def test_automatic_schema_migration_example(in_tmp_dir: Path) -> None:
    # A database written by an older Flujo: no pipeline_name, step_history or metric columns.
    conn = sqlite3.connect("existing_workflow_state.db")
    conn.executescript(
        """
        CREATE TABLE workflow_state (
            run_id TEXT PRIMARY KEY,
            pipeline_id TEXT NOT NULL,
            pipeline_version TEXT NOT NULL,
            current_step_index INTEGER NOT NULL DEFAULT 0,
            pipeline_context TEXT NOT NULL,
            last_step_output TEXT,
            status TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        INSERT INTO workflow_state VALUES (
            'old_run', 'old_pipeline', '0.9', 3, '{"customer": "acme", "items": [1, 2]}',
            '{"ok": true}', 'paused', '2025-03-01T10:00:00+00:00', '2025-03-01T10:05:00+00:00'
        );
        """
    )
    conn.commit()
    conn.close()
    inode = os.stat("existing_workflow_state.db").st_ino

    backend = SQLiteBackend(Path("existing_workflow_state.db"))
    # Migration happens automatically on first access

    loaded = await backend.load_state("old_run")
    assert loaded is not None
    assert loaded["pipeline_id"] == "old_pipeline"
    assert loaded["pipeline_name"] == "old_pipeline"  # backfilled from pipeline_id, as Flujo does
    assert loaded["pipeline_version"] == "0.9"
    assert loaded["current_step_index"] == 3
    assert loaded["pipeline_context"] == {"customer": "acme", "items": [1, 2]}
    assert loaded["last_step_output"] == {"ok": True}
    assert loaded["step_history"] == []
    assert loaded["status"] == "paused"
    assert loaded["created_at"] == datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
    assert loaded["total_steps"] == 0
    await backend.save_state("new_run", build_state())
    assert (await backend.load_state("new_run")) is not None
    await backend.close()
    # Migrated in place: same file, nothing moved aside.
    assert os.stat("existing_workflow_state.db").st_ino == inode
    assert not [p for p in os.listdir(".") if "corrupt" in p]


async def test_corruption_recovery_example_on_healthy_database(
    guide_backend: SQLiteBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = guide_backend
    await backend.save_state("run_123", build_state(status="paused"))

    try:
        state = await backend.load_state("run_123")
    except Exception as e:
        # The backend will attempt automatic recovery
        print(f"Recovery attempted: {e}")

    assert capsys.readouterr().out == ""
    assert state["status"] == "paused"


async def test_corruption_recovery_example_on_corrupt_file(
    in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Our deliberate fix: the file is reported, never renamed or replaced.
    original = b"these are my notes, not a database\n" * 50
    Path("workflow_state.db").write_bytes(original)
    before = sorted(os.listdir("."))

    caught: list[BaseException] = []
    backend = SQLiteBackend(Path("workflow_state.db"))
    try:
        state = await backend.load_state("run_123")  # noqa: F841 (as in the guide)
    except Exception as e:
        # The backend will attempt automatic recovery
        print(f"Recovery attempted: {e}")
        caught.append(e)
    await backend.close()

    assert len(caught) == 1 and isinstance(caught[0], CorruptDatabaseError)
    assert capsys.readouterr().out.startswith("Recovery attempted: ")
    assert Path("workflow_state.db").read_bytes() == original
    assert sorted(os.listdir(".")) == before


async def test_connection_pooling_and_retry_example(in_tmp_dir: Path, make_state) -> None:
    # No additional configuration needed - handled automatically
    backend = SQLiteBackend(Path("workflow_state.db"))

    # Two handles on one file: each sees the other's writes.
    other = SQLiteBackend(Path("workflow_state.db"))
    await backend.save_state("a", make_state())
    await other.save_state("b", make_state(status="completed"))
    assert (await backend.load_state("b"))["status"] == "completed"
    assert (await other.load_state("a"))["status"] == "running"
    await other.close()
    await backend.close()


# --------------------------------------------------------------------------------------------
# Security considerations


async def test_sql_injection_prevention_example(guide_data: GuideData) -> None:
    backend = guide_data.backend
    rows = guide_data.rows

    # All user inputs are properly parameterized
    safe_running = await backend.list_workflows(status="running")  # Safe
    safe_pipeline = await backend.list_workflows(pipeline_id="user_input")  # Safe

    assert ids(safe_running) == ids(by_created_desc(r for r in rows if r.status == "running"))
    assert safe_pipeline == []
    for hostile in ("x' OR '1'='1", "data_processing'; DROP TABLE workflow_state; --"):
        assert await backend.list_workflows(pipeline_id=hostile) == []
    assert len(await backend.list_workflows()) == len(rows)


async def test_input_validation_example(guide_backend: SQLiteBackend) -> None:
    backend = guide_backend

    # Example of safe usage ("# ... other fields" filled in with realistic values):
    state = build_state(
        run_id="safe_run_id_123",  # Validated
        pipeline_id="safe_pipeline_name",  # Validated
    )
    await backend.save_state("run_123", state)

    # The positional run_id is the key; state["run_id"] is ignored (as in Flujo).
    loaded = await backend.load_state("run_123")
    assert loaded is not None
    assert loaded["run_id"] == "run_123"
    assert loaded["pipeline_id"] == "safe_pipeline_name"
    assert await backend.load_state("safe_run_id_123") is None


async def test_input_validation_example_as_literally_written(guide_backend: SQLiteBackend) -> None:
    # Taken literally, "# ... other fields" leaves the required keys out: we refuse clearly.
    state = {
        "run_id": "safe_run_id_123",
        "pipeline_id": "safe_pipeline_name",
    }
    with pytest.raises(FlujoSQLiteError, match="pipeline_name"):
        await guide_backend.save_state("run_123", state)
    assert await guide_backend.load_state("run_123") is None


# --------------------------------------------------------------------------------------------
# Best practices


async def test_maintenance_routine(in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seeded = SQLiteBackend(Path("workflow_state.db"))
    data = await seed_guide_data(seeded, in_tmp_dir / "workflow_state.db")
    await seeded.close()
    old = [r for r in data.rows if r.created_at < data.t0 - 30 * DAY]

    # Regular cleanup to prevent database bloat

    async def maintenance_routine():
        backend = SQLiteBackend(Path("workflow_state.db"))

        # Clean up workflows older than 30 days
        deleted = await backend.cleanup_old_workflows(days_old=30)
        print(f"Cleaned up {deleted} old workflows")

        # Get statistics for monitoring
        stats = await backend.get_workflow_stats()
        print(f"Database contains {stats['total_workflows']} workflows")

    # Run maintenance weekly (the guide uses asyncio.run; we are already inside a loop)
    await maintenance_routine()

    assert capsys.readouterr().out.splitlines() == [
        f"Cleaned up {len(old)} old workflows",
        f"Database contains {len(data.rows) - len(old)} workflows",
    ]
    assert old


async def test_monitoring_example(in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t0 = datetime.now(timezone.utc)
    seeded = SQLiteBackend(Path("workflow_state.db"))
    specs = [
        # run_id, status, created age, updated age, execution_time_ms
        ("fresh_failure", "failed", 50 * 60, 20 * 60, 31_000),
        ("older_failure", "failed", 5 * 3600, 2 * 3600, 9_000),
        ("stuck_run", "running", 3 * 3600, 60, 12_000),
        ("young_run", "running", 10 * 60, 60, None),
        ("done", "completed", 26 * 3600, 25 * 3600, 4_000),
    ]
    for run_id, status, created_age, updated_age, elapsed in specs:
        await seeded.save_state(
            run_id,
            build_state(
                status=status,
                created_at=t0 - timedelta(seconds=created_age),
                updated_at=t0 - timedelta(seconds=updated_age),
                error_message=f"{run_id} broke" if status == "failed" else None,
                execution_time_ms=elapsed,
            ),
        )
    # Flujo 0.4.35's runner saves naive times (read as UTC; the README says to run it with
    # TZ=UTC): the example subtracts them from an aware now.
    naive_t0 = t0.replace(tzinfo=None)
    for run_id, age in (("stuck_naive_run", 2 * 3600), ("young_naive_run", 5 * 60)):
        await seeded.save_state(
            run_id,
            build_state(
                status="running",
                created_at=naive_t0 - timedelta(seconds=age),
                updated_at=naive_t0 - timedelta(seconds=30),
                execution_time_ms=None,
            ),
        )
    await seeded.close()

    # Set up monitoring for your workflows
    async def monitor_workflows():
        backend = SQLiteBackend(Path("workflow_state.db"))

        # Check for failed workflows
        failed = await backend.get_failed_workflows(hours_back=1)
        if failed:
            print(f"Alert: {len(failed)} workflows failed in the last hour")
            for wf in failed:
                print(f"  - {wf['run_id']}: {wf['error_message']}")

        # Monitor performance
        stats = await backend.get_workflow_stats()
        if stats["average_execution_time_ms"] > 10000:  # 10 seconds
            print("Alert: Average execution time is high")

        # Check for stuck workflows
        running = await backend.list_workflows(status="running")
        for wf in running:
            # Check if workflow has been running too long
            created = datetime.fromisoformat(wf["created_at"])
            if (datetime.now(timezone.utc) - created).total_seconds() > 3600:  # 1 hour
                print(f"Alert: Workflow {wf['run_id']} has been running for over 1 hour")

    await monitor_workflows()

    # Mean of 31000, 9000, 12000 and 4000 is 14000 > 10000.
    assert capsys.readouterr().out.splitlines() == [
        "Alert: 1 workflows failed in the last hour",
        "  - fresh_failure: fresh_failure broke",
        "Alert: Average execution time is high",
        "Alert: Workflow stuck_naive_run has been running for over 1 hour",
        "Alert: Workflow stuck_run has been running for over 1 hour",
    ]


async def test_backup_recipe(
    guide_backend: SQLiteBackend, in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = await seed_guide_data(guide_backend, in_tmp_dir / "workflow_state.db", count=40)
    originals = {r.run_id: await guide_backend.load_state(r.run_id) for r in data.rows}

    def backup_database():
        """Create a backup of the workflow database."""
        db_path = Path("workflow_state.db")
        backup_path = Path(
            f"workflow_state_backup_{datetime.now(timezone.utc).strftime('%Y%m%d_%H%M%S')}.db"
        )

        if db_path.exists():
            shutil.copy2(db_path, backup_path)
            print(f"Backup created: {backup_path}")

        # Also backup the WAL file if it exists
        wal_path = db_path.with_suffix(".db-wal")
        if wal_path.exists():
            wal_backup = backup_path.with_suffix(".db-wal")
            shutil.copy2(wal_path, wal_backup)
            print(f"WAL backup created: {wal_backup}")

    # Taken while the backend is open and idle, as an application would.
    backup_database()

    backups = sorted(in_tmp_dir.glob("workflow_state_backup_*.db"))
    assert len(backups) == 1
    assert capsys.readouterr().out.splitlines()[0] == f"Backup created: {backups[0].name}"
    restored = SQLiteBackend(backups[0])
    try:
        for run_id, original in originals.items():
            assert await restored.load_state(run_id) == original
        assert len(await restored.list_workflows()) == len(originals)
    finally:
        await restored.close()


async def test_configuration_example(
    in_tmp_dir: Path, monkeypatch: pytest.MonkeyPatch, make_state
) -> None:
    monkeypatch.setenv("FLUJO_DB_PATH", str(in_tmp_dir / "from_env.db"))
    monkeypatch.setenv("FLUJO_STATE_URI", "sqlite:///configured.db")
    monkeypatch.delenv("FLUJO_CONFIG_PATH", raising=False)

    # Set database path via environment variable
    db_path = Path(os.getenv("FLUJO_DB_PATH", "flujo_ops.db"))
    backend = SQLiteBackend(db_path)

    assert backend.db_path == in_tmp_dir / "from_env.db"
    await backend.save_state("env_run", make_state())
    await backend.close()
    assert (in_tmp_dir / "from_env.db").is_file()

    # Or use the configuration system
    backend = load_backend_from_config()

    assert isinstance(backend, SQLiteBackend)
    assert backend.db_path.resolve() == (in_tmp_dir / "configured.db").resolve()
    await backend.close()


async def test_api_reference_signatures() -> None:
    import inspect

    expected = {
        "save_state": ["run_id", "state"],
        "load_state": ["run_id"],
        "delete_state": ["run_id"],
        "list_workflows": ["status", "pipeline_id", "limit", "offset"],
        "get_workflow_stats": [],
        "get_failed_workflows": ["hours_back"],
        "cleanup_old_workflows": ["days_old"],
    }
    defaults = {
        "list_workflows": {"status": None, "pipeline_id": None, "limit": None, "offset": 0},
        "get_failed_workflows": {"hours_back": 24},
        "cleanup_old_workflows": {"days_old": 30},
    }
    for name, params in expected.items():
        method = getattr(SQLiteBackend, name)
        assert inspect.iscoroutinefunction(method), name
        signature = inspect.signature(method)
        # The guide's parameters, in order; keyword-only extras (our opt-in features) may follow.
        positional = [
            p.name
            for p in signature.parameters.values()
            if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        ]
        assert positional[1:] == params, name
        for param, default in defaults.get(name, {}).items():
            assert signature.parameters[param].default == default, (name, param)


# --------------------------------------------------------------------------------------------
# Troubleshooting


async def test_high_memory_usage_example(
    guide_backend: SQLiteBackend, in_tmp_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = guide_backend
    # Some runs recorded no memory figure (Flujo 0.6.11's runner records none): the example's
    # `.get(..., 0)` must cover them, which Flujo's None does not.
    data = await seed_guide_data(backend, in_tmp_dir / "workflow_state.db", count=60)
    assert any(r.memory_usage_mb is None for r in data.rows)

    # Monitor memory usage with the built-in tracking
    stats = await backend.get_workflow_stats()
    workflows = await backend.list_workflows()

    for wf in workflows:
        if wf.get("memory_usage_mb", 0) > 100:  # 100MB threshold
            print(f"High memory usage: {wf['run_id']} - {wf['memory_usage_mb']}MB")

    heavy = [r for r in by_created_desc(data.rows) if (r.memory_usage_mb or 0) > 100]
    assert 0 < len(heavy) < len(data.rows)
    assert stats["total_workflows"] == len(data.rows)
    assert capsys.readouterr().out.splitlines() == [
        f"High memory usage: {r.run_id} - {r.memory_usage_mb}MB" for r in heavy
    ]


async def test_slow_queries_example(guide_data: GuideData) -> None:
    backend = guide_data.backend

    # Good: Uses index
    fast_query = await backend.list_workflows(status="running", limit=10)

    # Avoid: No filtering, could be slow with large datasets
    slow_query = await backend.list_workflows()  # No limit or filters

    running = by_created_desc(r for r in guide_data.rows if r.status == "running")
    assert len(running) > 10
    assert ids(fast_query) == ids(running)[:10]
    assert ids(slow_query) == ids(by_created_desc(guide_data.rows))


# --------------------------------------------------------------------------------------------
# Debug queries


GUIDE_DATABASE_SIZE_QUERY = """
SELECT
    name,
    page_count * page_size as size_bytes,
    page_count * page_size / 1024.0 / 1024.0 as size_mb
FROM pragma_page_count(), pragma_page_size()
WHERE name = 'workflow_state';
"""

DEFAULT_CORRECTED_SIZE_QUERY = (
    "SELECT page_count * page_size AS size_bytes, "
    "page_count * page_size / 1024.0 / 1024.0 AS size_mb "
    "FROM pragma_page_count(), pragma_page_size();"
)


def corrected_size_queries() -> list[str]:
    """The corrected "database size" statements the README documents (the known-good query
    when the README has none)."""
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if readme.is_file():
        for block in re.findall(r"```sql\n(.*?)```", readme.read_text(encoding="utf-8"), re.DOTALL):
            if "pragma_page_count" in block and "name = 'workflow_state'" not in block:
                return [s for s in block.split(";") if s.strip()]
    return [DEFAULT_CORRECTED_SIZE_QUERY]


async def test_debug_database_size_query(guide_data: GuideData) -> None:
    await guide_data.backend.close()
    checkpoint(guide_data.path)
    size = os.path.getsize(guide_data.path)
    conn = sqlite3.connect(guide_data.path)
    conn.row_factory = sqlite3.Row
    try:
        # The guide's query is not valid SQL: the pragma functions have no "name" column.
        with pytest.raises(sqlite3.OperationalError, match="no such column: name"):
            conn.execute(GUIDE_DATABASE_SIZE_QUERY).fetchall()
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        results = {
            statement: conn.execute(statement).fetchall() for statement in corrected_size_queries()
        }
    finally:
        conn.close()

    assert size > 0
    whole_file = [rows for statement, rows in results.items() if "pragma_page_count" in statement]
    assert len(whole_file) == 1
    (row,) = whole_file[0]
    assert row["size_bytes"] == size
    assert row["size_mb"] == pytest.approx(size / 1024 / 1024, abs=0.005)
    if "free_bytes" in row.keys():  # noqa: SIM118 (sqlite3.Row: `in` tests values)
        assert 0 <= row["free_bytes"] < size and row["free_bytes"] % page_size == 0
    for statement, rows in results.items():
        if "dbstat" in statement:  # the README's per-object breakdown
            sizes = {r["name"]: r["size_bytes"] for r in rows}
            assert sizes["workflow_state"] > 0
            assert "idx_workflow_state_created_at" in sizes
            assert all(v % page_size == 0 for v in sizes.values())
            assert sum(sizes.values()) < size
            assert [r["size_bytes"] for r in rows] == sorted(sizes.values(), reverse=True)


async def test_debug_index_usage_query(guide_file: GuideData) -> None:
    result = raw_rows(
        guide_file.path,
        """
        SELECT
            name,
            sql
        FROM sqlite_master
        WHERE type = 'index' AND tbl_name = 'workflow_state';
        """,
    )
    names = {r["name"] for r in result}
    assert {
        "idx_workflow_state_status",
        "idx_workflow_state_created_at",
        "idx_workflow_state_pipeline_id",
    } <= names


async def test_debug_integrity_check(guide_file: GuideData) -> None:
    assert [tuple(r) for r in raw_rows(guide_file.path, "PRAGMA integrity_check;")] == [("ok",)]


async def test_debug_query_plan_uses_an_index(guide_file: GuideData) -> None:
    plan = raw_rows(
        guide_file.path,
        """
        EXPLAIN QUERY PLAN
        SELECT * FROM workflow_state WHERE status = 'running';
        """,
    )
    details = " ".join(r["detail"] for r in plan)
    assert re.search(r"USING (COVERING )?INDEX idx_\w+ \(status=\?\)", details), details


async def test_separate_databases_per_pipeline_type(in_tmp_dir: Path, make_state) -> None:
    # Example: Separate databases by pipeline type
    data_processing_backend = SQLiteBackend(Path("data_processing.db"))
    ml_training_backend = SQLiteBackend(Path("ml_training.db"))

    await data_processing_backend.save_state("shared_id", make_state(pipeline_id="dp"))
    await ml_training_backend.save_state("shared_id", make_state(pipeline_id="ml"))
    assert (await data_processing_backend.load_state("shared_id"))["pipeline_id"] == "dp"
    assert (await ml_training_backend.load_state("shared_id"))["pipeline_id"] == "ml"
    await data_processing_backend.close()
    await ml_training_backend.close()
    assert (in_tmp_dir / "data_processing.db").is_file()
    assert (in_tmp_dir / "ml_training.db").is_file()
