"""Method-level tests of the runner-facing surface: what Flujo's runner and ``flujo lens`` call.

Runs and steps (``save_run_start``, ``save_step_result``, ``save_run_end``, ``get_run_details``,
``list_run_steps``, ``list_runs``, ``delete_run``), traces and spans (``save_trace``,
``save_spans``, ``get_trace``, ``get_spans``, ``get_span_statistics``), and Flujo 0.6.11's
additions (system state, evaluations, background tasks, ``get_workflow_stats_sync``).

Every test runs on both file layouts a new file can get: Flujo 0.4.35's (``steps`` keyed by
``step_run_id``, file-wide span ids) and Flujo 0.6.11's (autoincrement ``id`` keys). The layout
is chosen by ``flujo_sqlite.backend._installed_flujo_layout()``, which the ``backend`` fixture
patches; the fixture checks, once the backend is closed, that the file got the layout asked for.

Written from the behavioural specification (sections 2, 3.1, 3.2, 6.5, 10), not from Flujo's
code or tests. Where we deliberately differ from Flujo (README, "Differences"), the test asserts
our behaviour: offset without limit, the real ``total_cost`` in ``list_runs``, no cascade on a
repeated ``save_run_start``, no dangling transaction after a failed write, placeholder runs
instead of orphans or foreign-key errors.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
import sqlite3
import time
from collections import UserDict
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import flujo_sqlite
import flujo_sqlite.backend as backend_module
import pytest
from conftest import (
    EMPTY_WORKFLOW_STATS,
    WORKFLOW_ITEM_KEYS,
    build_state,
    raw_rows,
    run_python,
    sql_in_another_process,
    utc_now,
)
from flujo_sqlite import InvalidStateError, SerializationError, SQLiteBackend

LAYOUTS = ("flujo-0.4", "flujo-0.6")

#: Keys of ``get_run_details``: Flujo 0.4.35's eight plus 0.6.11's.
RUN_DETAILS_KEYS = frozenset(
    {
        "run_id",
        "pipeline_id",
        "pipeline_name",
        "pipeline_version",
        "status",
        "start_time",
        "end_time",
        "total_cost",
        "final_context",
        "created_at",
        "updated_at",
        "execution_time_ms",
        "memory_usage_mb",
        "total_steps",
        "error_message",
    }
)
#: Keys of a ``list_run_steps`` item, both releases' names side by side.
STEP_KEYS = frozenset(
    {
        "step_name",
        "step_index",
        "status",
        "start_time",
        "created_at",
        "end_time",
        "duration_ms",
        "execution_time_ms",
        "cost",
        "cost_usd",
        "tokens",
        "token_counts",
        "input",
        "output",
        "error",
        "raw_response",
    }
)
#: Keys of a ``list_runs`` item.
RUN_SUMMARY_KEYS = frozenset(
    {
        "run_id",
        "pipeline_name",
        "pipeline_version",
        "status",
        "start_time",
        "end_time",
        "total_cost",
        "created_at",
        "updated_at",
        "metadata",
    }
)
SPAN_KEYS = frozenset(
    {"span_id", "parent_span_id", "name", "start_time", "end_time", "status", "attributes"}
)
EVALUATION_KEYS = frozenset({"run_id", "step_name", "score", "feedback", "metadata", "created_at"})
STALE_TASK_ERROR = "Task timeout: process likely crashed"
T0 = 1_700_000_000.0  # epoch seconds for span times


# --------------------------------------------------------------------------------------------
# Fixtures and helpers


def table_columns(path: Path, table: str) -> set[str]:
    return {row["name"] for row in raw_rows(path, f"PRAGMA table_info({table})")}


def assert_file_layout(path: Path, layout: str) -> None:
    """Only once no backend of ours has ``path`` open in this process."""
    steps = table_columns(path, "steps")
    spans = table_columns(path, "spans")
    runs = table_columns(path, "runs")
    if layout == "flujo-0.4":
        assert "step_run_id" in steps and "id" not in steps, steps
        assert "id" not in spans, spans
        assert "start_time" in runs and "created_at" not in runs, runs
    else:
        assert "id" in steps and "step_run_id" not in steps, steps
        assert "id" in spans, spans
        assert "created_at" in runs and "start_time" not in runs, runs


@pytest.fixture(params=LAYOUTS)
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    chosen: str = request.param
    monkeypatch.setattr(backend_module, "_installed_flujo_layout", lambda: chosen)
    return chosen


@pytest.fixture
async def backend(layout: str, db_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(db_path)
    try:
        yield b
    finally:
        await b.close()
    assert_file_layout(db_path, layout)


def span(
    span_id: str,
    name: str,
    start: float,
    end: float | None = None,
    *,
    status: str = "completed",
    children: list[dict[str, Any]] | None = None,
    **attributes: Any,
) -> dict[str, Any]:
    return {
        "span_id": span_id,
        "name": name,
        "start_time": start,
        "end_time": end,
        "status": status,
        "attributes": attributes,
        "children": children or [],
    }


def strip_children(node: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k != "children"}


def walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    out = [node]
    for child in node["children"]:
        out.extend(walk(child))
    return out


async def start_run(backend: SQLiteBackend, run_id: str, **extra: Any) -> None:
    await backend.save_run_start({"run_id": run_id, **extra})


_CHILD_WRITE = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], timeout=float(sys.argv[3]))
conn.execute(
    "INSERT OR REPLACE INTO system_state (key, value, updated_at) VALUES (?, ?, ?)",
    (sys.argv[2], '{"from": "child"}', "2024-01-01 00:00:00+00:00"),
)
conn.commit()
conn.close()
"""


def write_from_another_process(path: Path, key: str, busy_timeout: float = 2.0) -> None:
    """Writes one row with the stdlib sqlite3 module in a child process that waits at most
    ``busy_timeout`` seconds for the lock (a lock left held makes it fail, however busy the
    machine: no clock is read)."""
    result = run_python(_CHILD_WRITE, str(path), key, str(busy_timeout), timeout=60)
    assert result.returncode == 0, f"the other process could not write: {result.stderr}"


async def assert_file_writable(backend: SQLiteBackend, path: Path, tag: str) -> None:
    """After a failed write: this backend and another process both write promptly."""
    began = time.monotonic()
    await backend.save_state(f"after-{tag}", build_state())
    await start_run(backend, f"run-after-{tag}")
    assert time.monotonic() - began < 5
    await asyncio.to_thread(write_from_another_process, path, f"probe-{tag}")
    probe = await backend.get_system_state(f"probe-{tag}")
    assert probe is not None and probe["value"] == {"from": "child"}
    assert (await backend.load_state(f"after-{tag}")) is not None
    assert (await backend.get_run_details(f"run-after-{tag}")) is not None


# --------------------------------------------------------------------------------------------
# Layout and run lifecycle


async def test_new_file_gets_the_requested_layout(layout: str, db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await start_run(backend, "r")
    await backend.save_step_result({"run_id": "r", "step_name": "s", "step_index": 0})
    await backend.close()
    assert_file_layout(db_path, layout)
    # The tables Flujo 0.6.11 added are in both layouts.
    tables = {row["name"] for row in raw_rows(db_path, "SELECT name FROM sqlite_master")}
    assert {"workflow_state", "runs", "steps", "spans", "system_state", "evaluations"} <= tables


def test_layout_follows_installed_flujo_by_default() -> None:
    version = importlib.metadata.version("flujo")
    expected = "flujo-0.4" if version.startswith("0.4.") else "flujo-0.6"
    assert backend_module._installed_flujo_layout() == expected


def test_without_flujo_the_layout_is_the_one_pip_would_install_on_this_python(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flujo 0.6 needs Python 3.13, so a 3.11 or 3.12 user who installs Flujo later gets 0.4.35,
    which moves a file in 0.6's layout aside as corrupt."""

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert backend_module._installed_flujo_layout((3, 11)) == "flujo-0.4"
    assert backend_module._installed_flujo_layout((3, 12)) == "flujo-0.4"
    assert backend_module._installed_flujo_layout((3, 13)) == "flujo-0.6"
    assert backend_module._installed_flujo_layout((3, 14)) == "flujo-0.6"


async def test_run_lifecycle_round_trip(backend: SQLiteBackend, layout: str) -> None:
    started = utc_now() - timedelta(seconds=30)
    await backend.save_run_start(
        {
            "run_id": "run-1",
            "pipeline_name": "report",
            "pipeline_version": "2.1",
            "status": "running",
            "start_time": started,
        }
    )
    details = await backend.get_run_details("run-1")
    assert details is not None and set(details) == RUN_DETAILS_KEYS
    assert details["run_id"] == "run-1"
    assert details["pipeline_name"] == "report"
    assert details["pipeline_version"] == "2.1"
    assert details["status"] == "running"
    assert isinstance(details["start_time"], str) and details["start_time"]
    assert details["end_time"] is None and details["total_cost"] is None
    assert details["final_context"] is None

    # 0.4.35's runner keys.
    await backend.save_step_result(
        {
            "step_run_id": "run-1:0",
            "run_id": "run-1",
            "step_name": "fetch",
            "step_index": 0,
            "status": "completed",
            "start_time": started,
            "end_time": started + timedelta(seconds=2),
            "duration_ms": 2000,
            "cost": 0.25,
            "tokens": 120,
            "input": {"url": "https://example.org"},
            "output": {"rows": [1, 2, 3]},
            "error": None,
        }
    )
    # 0.6.11's runner keys.
    await backend.save_step_result(
        {
            "run_id": "run-1",
            "step_name": "summarise",
            "step_index": 1,
            "status": "failed",
            "created_at": (started + timedelta(seconds=3)).isoformat(),
            "execution_time_ms": 750,
            "cost_usd": 0.5,
            "token_counts": 300,
            "output": "partial",
            "raw_response": {"choices": [{"text": "partial"}]},
        }
    )
    await backend.save_run_end(
        "run-1",
        {
            "status": "completed",
            "end_time": started + timedelta(seconds=10),
            "total_cost": 0.75,
            "final_context": {"summary": "ok", "n": 3, "nested": {"a": [None, True]}},
            "execution_time_ms": 10_000,
            "total_steps": 2,
        },
    )

    details = await backend.get_run_details("run-1")
    assert details is not None and set(details) == RUN_DETAILS_KEYS
    assert details["status"] == "completed"
    assert details["total_cost"] == pytest.approx(0.75)
    assert details["final_context"] == {"summary": "ok", "n": 3, "nested": {"a": [None, True]}}
    assert isinstance(details["end_time"], str) and details["end_time"] > details["start_time"]
    if layout == "flujo-0.6":
        assert details["pipeline_id"] == "unknown"
        assert details["execution_time_ms"] == 10_000
        assert details["total_steps"] == 2

    steps = await backend.list_run_steps("run-1")
    assert [s["step_name"] for s in steps] == ["fetch", "summarise"]
    for step in steps:
        assert set(step) == STEP_KEYS
        assert step["start_time"] == step["created_at"] and isinstance(step["start_time"], str)
        assert step["duration_ms"] == step["execution_time_ms"]
        assert step["cost"] == step["cost_usd"]
        assert step["tokens"] == step["token_counts"]
    fetch, summarise = steps
    assert (fetch["step_index"], fetch["status"]) == (0, "completed")
    assert (fetch["duration_ms"], fetch["cost"], fetch["tokens"]) == (2000, 0.25, 120)
    assert fetch["output"] == {"rows": [1, 2, 3]}
    assert fetch["error"] is None
    assert (summarise["step_index"], summarise["status"]) == (1, "failed")
    assert (summarise["duration_ms"], summarise["cost"], summarise["tokens"]) == (750, 0.5, 300)
    assert summarise["output"] == "partial"
    if layout == "flujo-0.4":  # 0.4.35's steps table keeps input and end_time
        assert fetch["input"] == {"url": "https://example.org"}
        assert isinstance(fetch["end_time"], str) and fetch["end_time"] > fetch["start_time"]
        assert summarise["raw_response"] is None  # no such column
    else:  # 0.6.11's keeps raw_response
        assert summarise["raw_response"] == {"choices": [{"text": "partial"}]}


async def test_columns_another_process_adds_to_runs_are_written_and_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flujo 0.6.11 adds its columns to a 0.4.35 file's runs table when it opens the file: a
    backend of ours open since before must write and read them, as a new backend would."""
    monkeypatch.setattr(backend_module, "_installed_flujo_layout", lambda: "flujo-0.4")
    db_path = tmp_path / "wf.db"
    backend = SQLiteBackend(db_path)
    try:
        await start_run(backend, "before")
        for column in ("pipeline_id TEXT", "created_at TEXT", "updated_at TEXT"):
            await asyncio.to_thread(
                sql_in_another_process, db_path, f"ALTER TABLE runs ADD COLUMN {column}"
            )
        await start_run(backend, "after", pipeline_id="pipe-id", pipeline_name="pipe")
        details = await backend.get_run_details("after")
        assert details is not None and details["pipeline_id"] == "pipe-id"
    finally:
        await backend.close()
    (row,) = raw_rows(db_path, "SELECT * FROM runs WHERE run_id = 'after'")
    assert row["pipeline_id"] == "pipe-id"
    assert row["created_at"] and row["updated_at"], dict(row)


async def test_unknown_run_reads(backend: SQLiteBackend) -> None:
    assert await backend.get_run_details("nope") is None
    assert await backend.list_run_steps("nope") == []
    assert await backend.get_trace("nope") is None
    assert await backend.get_spans("nope") == []
    assert await backend.list_runs() == []
    await backend.save_run_end("nope", {"status": "failed"})  # a silent no-op, as in Flujo
    await backend.delete_run("nope")
    assert await backend.get_run_details("nope") is None
    assert await backend.get_span_statistics() == {
        "total_spans": 0,
        "by_name": {},
        "by_status": {},
        "avg_duration_by_name": {},
    }


async def test_save_run_start_defaults_and_long_run_id(backend: SQLiteBackend) -> None:
    await backend.save_run_start({"run_id": "bare"})
    details = await backend.get_run_details("bare")
    assert details is not None
    assert details["pipeline_name"] == "unknown"
    assert details["pipeline_version"] == "latest"
    assert details["status"] == "running"
    assert isinstance(details["start_time"], str) and details["start_time"]

    long_id = "r" * 5_000 + "é" * 4_999 + "z"
    assert len(long_id) == 10_000
    await backend.save_run_start({"run_id": long_id, "pipeline_name": "long"})
    await backend.save_step_result({"run_id": long_id, "step_name": "s", "step_index": 0})
    await backend.save_trace(long_id, span("long-root", "pipeline", T0, T0 + 1))
    details = await backend.get_run_details(long_id)
    assert details is not None and details["run_id"] == long_id
    assert [s["step_name"] for s in await backend.list_run_steps(long_id)] == ["s"]
    trace = await backend.get_trace(long_id)
    assert trace is not None and trace["span_id"] == "long-root"
    assert {r["run_id"] for r in await backend.list_runs()} == {"bare", long_id}


async def test_runner_arguments_are_validated_before_anything_is_written(
    backend: SQLiteBackend,
) -> None:
    with pytest.raises(InvalidStateError):
        await backend.save_run_start({"pipeline_name": "no id"})
    with pytest.raises(InvalidStateError):
        await backend.save_step_result({"run_id": "r", "step_index": 0})  # no step_name
    with pytest.raises(InvalidStateError):
        await backend.save_step_result({"run_id": "r", "step_name": "s"})  # no step_index
    with pytest.raises(InvalidStateError):
        await backend.save_step_result({"step_name": "s", "step_index": 0})  # no run_id
    assert await backend.get_run_details("r") is None
    assert await backend.list_runs() == []


async def test_list_runs_order_paging_and_offset_without_limit(backend: SQLiteBackend) -> None:
    base = utc_now() - timedelta(hours=1)
    for i in range(6):
        await backend.save_run_start(
            {"run_id": f"run-{i}", "pipeline_name": "p", "start_time": base + timedelta(minutes=i)}
        )
    newest_first = [f"run-{i}" for i in reversed(range(6))]
    items = await backend.list_runs()
    assert [r["run_id"] for r in items] == newest_first
    for item in items:
        assert set(item) == RUN_SUMMARY_KEYS
        assert item["metadata"] == {}  # no workflow state
    # Offset without a limit: an SQL syntax error in Flujo, the remaining runs here.
    assert [r["run_id"] for r in await backend.list_runs(offset=2)] == newest_first[2:]
    assert await backend.list_runs(offset=6) == []
    assert await backend.list_runs(limit=0) == []
    paged: list[str] = []
    for offset in range(0, 6, 4):
        paged += [r["run_id"] for r in await backend.list_runs(limit=4, offset=offset)]
    assert paged == newest_first


async def test_list_runs_total_cost_is_the_cost(backend: SQLiteBackend, layout: str) -> None:
    await start_run(backend, "costly", pipeline_name="p")
    await backend.save_run_end(
        "costly", {"status": "completed", "total_cost": 1.25, "execution_time_ms": 99}
    )
    await start_run(backend, "unfinished", pipeline_name="p")
    by_id = {r["run_id"]: r for r in await backend.list_runs()}
    assert by_id["costly"]["total_cost"] == pytest.approx(1.25)  # 0.6.11 returned 99
    assert by_id["costly"]["status"] == "completed"
    assert isinstance(by_id["costly"]["end_time"], str)
    unfinished = by_id["unfinished"]
    if layout == "flujo-0.4":
        # What Flujo 0.4.35 lists for a run that has not ended.
        assert unfinished["total_cost"] is None and unfinished["end_time"] is None
    else:
        # Flujo 0.6.11 always lists a number and a time: 0.0 and the run's last update.
        assert unfinished["total_cost"] == 0.0
        assert unfinished["end_time"] == unfinished["updated_at"]


async def test_list_runs_status_and_pipeline_filters(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    base = utc_now() - timedelta(hours=1)
    plan = [("a1", "alpha", "completed"), ("a2", "alpha", "failed"), ("b1", "beta", "completed")]
    for i, (run_id, name, status) in enumerate(plan):
        await backend.save_run_start(
            {"run_id": run_id, "pipeline_name": name, "start_time": base + timedelta(minutes=i)}
        )
        await backend.save_run_end(run_id, {"status": status})

    async def ids(**filters: Any) -> list[str]:
        return [r["run_id"] for r in await backend.list_runs(**filters)]

    assert await ids(status="completed") == ["b1", "a1"]
    assert await ids(status="failed") == ["a2"]
    assert await ids(pipeline_name="alpha") == ["a2", "a1"]
    assert await ids(pipeline_name="alpha", status="completed") == ["a1"]
    assert await ids(pipeline_name="gamma") == []
    assert await ids(status="", pipeline_name="") == ["b1", "a2", "a1"]  # "" means no filter

    # A run with a workflow state shows (and is filtered by) the state's name and status.
    await backend.save_state("b1", make_state(pipeline_name="beta-renamed", status="paused"))
    [item] = await backend.list_runs(pipeline_name="beta-renamed")
    assert (item["run_id"], item["pipeline_name"], item["status"]) == (
        "b1",
        "beta-renamed",
        "paused",
    )
    assert await ids(status="paused") == ["b1"]
    for run in await backend.list_runs(pipeline_name="beta"):
        assert run["pipeline_name"] == "beta"


async def test_list_runs_shows_the_runs_name_over_the_states_placeholder(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    # Flujo 0.4.35's runner saves its states with pipeline_name "unknown"; the name the user gave
    # the runner is on the run.
    await backend.save_run_start({"run_id": "r", "pipeline_name": "daily_report"})
    await backend.save_state("r", make_state(pipeline_name="unknown"))
    [item] = await backend.list_runs(pipeline_name="daily_report")
    assert (item["run_id"], item["pipeline_name"]) == ("r", "daily_report")
    assert [r["pipeline_name"] for r in await backend.list_runs()] == ["daily_report"]


async def test_list_runs_metadata_filter(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    base = utc_now() - timedelta(hours=1)
    metadata = {
        "m0": {"team": "a", "env": {"region": "eu", "tier": 1}, "tags": ["x", "y"], "ok": True},
        "m1": {"team": "a", "env": {"region": "us", "tier": 1}, "ok": False},
        "m2": {"team": "b", "env": {"region": "eu", "tier": 2}, "tags": ["x"]},
        "m3": {"team": "a", "env": {"region": "eu", "tier": 2}, "note": None},
        "m4": {},
    }
    for i, (run_id, meta) in enumerate(metadata.items()):
        await backend.save_run_start({"run_id": run_id, "start_time": base + timedelta(minutes=i)})
        await backend.save_state(run_id, make_state(metadata=meta))
    await backend.save_run_start({"run_id": "no-state", "start_time": base - timedelta(minutes=1)})

    async def ids(flt: dict[str, Any] | None, **kw: Any) -> list[str]:
        return [r["run_id"] for r in await backend.list_runs(metadata_filter=flt, **kw)]

    assert await ids({"team": "a"}) == ["m3", "m1", "m0"]
    assert await ids({"env": {"region": "eu"}}) == ["m3", "m2", "m0"]
    assert await ids({"team": "a", "env": {"region": "eu", "tier": 2}}) == ["m3"]
    assert await ids({"tags": ["x", "y"]}) == ["m0"]  # lists compare whole
    assert await ids({"tags": ["x"]}) == ["m2"]
    assert await ids({"ok": True}) == ["m0"]
    assert await ids({"ok": False}) == ["m1"]
    assert await ids({"note": None}) == ["m3"]  # present and null, not merely absent
    assert await ids({"env": {"tier": "1"}}) == []  # "1" is not 1
    assert await ids({"team": "c"}) == []
    assert await ids({"missing": {"deep": 1}}) == []
    assert await ids({}) == ["m4", "m3", "m2", "m1", "m0", "no-state"]
    assert await ids(None) == ["m4", "m3", "m2", "m1", "m0", "no-state"]
    # Paging applies to the matching runs.
    assert await ids({"team": "a"}, limit=2) == ["m3", "m1"]
    assert await ids({"team": "a"}, limit=2, offset=2) == ["m0"]
    assert await ids({"team": "a"}, offset=1) == ["m1", "m0"]
    # Combined with the other filters.
    assert await ids({"team": "a"}, status="running") == ["m3", "m1", "m0"]
    assert await ids({"team": "a"}, status="failed") == []
    [item] = await backend.list_runs(metadata_filter={"tags": ["x"]})
    assert item["metadata"] == metadata["m2"]


def contains(stored: Any, subset: dict[str, Any]) -> bool:
    """Flujo 0.6.11's rule (spec, list_runs): each dict of the filter is a subset of the stored
    object at its place; any other value must be ``==`` to the stored one."""
    return isinstance(stored, dict) and all(
        key in stored
        and (contains(stored[key], value) if isinstance(value, dict) else stored[key] == value)
        for key, value in subset.items()
    )


async def test_list_runs_metadata_filter_matches_as_python_compares(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    """An empty dict in the filter matches any dict there, and numbers compare by value
    (``1 == 1.0 == True``), in lists too, as Flujo 0.6.11 filters; both used to match nothing.
    Then random filters against random metadata, checked against the rule itself."""
    import random

    stored = {
        "nested": {"env": {"region": "eu", "tier": 1}, "ok": True},
        "float": {"score": 1.0, "xs": [1.0, 2.0], "rows": [{"a": 1, "b": [2]}]},
        "flags": {"ok": 1, "score": True, "env": []},
    }
    base = utc_now() - timedelta(hours=1)
    for i, (run_id, meta) in enumerate(stored.items()):
        await backend.save_run_start({"run_id": run_id, "start_time": base + timedelta(minutes=i)})
        await backend.save_state(run_id, make_state(metadata=meta))

    async def ids(flt: dict[str, Any]) -> list[str]:
        return [r["run_id"] for r in await backend.list_runs(metadata_filter=flt)]

    assert await ids({"env": {}}) == ["nested"]  # a list is no dict
    assert await ids({"env": {"region": "eu", "tier": 1.0}}) == ["nested"]
    assert await ids({"score": 1}) == ["flags", "float"]
    assert await ids({"xs": [1, 2]}) == ["float"]
    assert await ids({"xs": [2, 1]}) == []
    assert await ids({"xs": [1]}) == []
    assert await ids({"rows": [{"a": 1.0, "b": [2.0]}]}) == ["float"]
    assert await ids({"rows": [{"a": 1}]}) == []  # a dict inside a list matches whole
    assert await ids({"ok": 1.0}) == ["flags", "nested"]
    assert await ids({"env": []}) == ["flags"]
    assert await ids({"xs": (1.0, 2.0)}) == []  # Python finds no tuple equal to a list

    # Integers beyond 64 bits compare exactly; keys with control characters; long lists.
    long = [i if i % 3 else float(i) for i in range(20_000)] + [None, "s", True, [1, {"k": 2}]]
    extra = {"big": 2**70, "a\x00b\n": 1, "long": long}
    await backend.save_run_start({"run_id": "extra", "start_time": base + timedelta(minutes=9)})
    await backend.save_state("extra", make_state(metadata=extra))
    assert await ids({"big": 2**70}) == ["extra"]
    assert await ids({"big": 2**70 + 1}) == []
    assert await ids({"big": 10**400}) == []
    assert await ids({"a\x00b\n": 1.0}) == ["extra"]
    assert await ids(
        {"long": [float(i) for i in range(20_000)] + [None, "s", 1, [1.0, {"k": 2}]]}
    ) == ["extra"]
    assert await ids({"long": [*long[:-1], [1, {"k": 3}]]}) == []
    assert await ids({"long": [*long[:-2], "t", long[-1]]}) == []
    assert await ids({"long": long[:-1]}) == []

    rng = random.Random(20261128)
    leaves = [0, 1, 1.0, 2, 2.5, True, False, None, "a", "1", "", [], {}]

    def value(depth: int) -> Any:
        kind = rng.random()
        if depth < 3 and kind < 0.25:
            return {rng.choice("abc"): value(depth + 1) for _ in range(rng.randint(0, 3))}
        if depth < 3 and kind < 0.4:
            return [value(depth + 1) for _ in range(rng.randint(0, 2))]
        return rng.choice(leaves)

    metadata = [{rng.choice("abc"): value(1) for _ in range(rng.randint(0, 3))} for _ in range(24)]
    for i, meta in enumerate(metadata):
        await backend.save_run_start(
            {"run_id": f"m{i:02}", "start_time": base + timedelta(hours=1, minutes=i)}
        )
        await backend.save_state(f"m{i:02}", make_state(metadata=meta))
    filters = [{rng.choice("abc"): value(1)} for _ in range(150)]
    # A filter made of a stored run's own values matches it, at least.
    filters += [dict(rng.sample(sorted(m.items()), k=min(len(m), 2))) for m in metadata if m]
    for flt in filters:
        expected = sorted(f"m{i:02}" for i, meta in enumerate(metadata) if contains(meta, flt))
        assert sorted(i for i in await ids(flt) if i.startswith("m")) == expected, flt


async def test_list_runs_metadata_filter_keys_with_json_path_characters(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    keys = ["back\\slash", 'quo"te', 'both\\"', "dot.ted", "br[0]", "spa ce", "", "ünï"]
    base = utc_now() - timedelta(hours=1)
    for i, key in enumerate(keys):
        await backend.save_run_start({"run_id": f"k{i}", "start_time": base + timedelta(minutes=i)})
        await backend.save_state(f"k{i}", make_state(metadata={key: i, "nested": {key: i}}))
    for i, key in enumerate(keys):
        for flt in ({key: i}, {"nested": {key: i}}):
            assert [r["run_id"] for r in await backend.list_runs(metadata_filter=flt)] == [
                f"k{i}"
            ], flt


async def test_save_run_start_again_keeps_steps_and_spans(backend: SQLiteBackend) -> None:
    await start_run(backend, "r", pipeline_name="p")
    await backend.save_step_result({"run_id": "r", "step_name": "a", "step_index": 0})
    await backend.save_step_result({"run_id": "r", "step_name": "b", "step_index": 1})
    await backend.save_trace("r", span("root", "p", T0, T0 + 5, children=[span("c", "a", T0 + 1)]))
    await backend.save_run_end("r", {"status": "failed", "total_cost": 3.0})
    # Resuming: the runner starts the run again. 0.6.11 cascaded its steps and spans away.
    await backend.save_run_start({"run_id": "r", "pipeline_name": "p"})
    details = await backend.get_run_details("r")
    assert details is not None
    assert details["status"] == "running"
    assert details["end_time"] is None
    assert [s["step_name"] for s in await backend.list_run_steps("r")] == ["a", "b"]
    assert len(await backend.get_spans("r")) == 2
    trace = await backend.get_trace("r")
    assert trace is not None and [c["span_id"] for c in trace["children"]] == ["c"]


async def test_writes_for_a_run_without_a_runs_row_create_a_placeholder(
    backend: SQLiteBackend, db_path: Path
) -> None:
    await backend.save_step_result({"run_id": "via-step", "step_name": "s", "step_index": 0})
    await backend.save_trace("via-trace", span("t-root", "pipeline", T0, T0 + 1))
    await backend.save_spans(
        "via-spans",
        [
            {
                "span_id": "sp-1",
                "name": "pipeline",
                "start_time": T0,
                "end_time": T0 + 2,
                "status": "completed",
                "attributes": {"flujo.pipeline.name": "named", "flujo.pipeline.version": "7"},
            }
        ],
    )
    await backend.persist_evaluation("via-eval", 0.5, feedback="meh")
    for run_id in ("via-step", "via-trace", "via-eval"):
        details = await backend.get_run_details(run_id)
        assert details is not None, run_id
        assert (details["pipeline_name"], details["pipeline_version"], details["status"]) == (
            "unknown",
            "latest",
            "running",
        )
    details = await backend.get_run_details("via-spans")
    assert details is not None
    assert (details["pipeline_name"], details["pipeline_version"]) == ("named", "7")
    assert [s["step_name"] for s in await backend.list_run_steps("via-step")] == ["s"]
    assert (await backend.get_trace("via-trace") or {}).get("span_id") == "t-root"
    assert [s["span_id"] for s in await backend.get_spans("via-spans")] == ["sp-1"]
    assert [e["run_id"] for e in await backend.list_evaluations()] == ["via-eval"]
    # A later save_run_start fills the placeholder in.
    await backend.save_run_start(
        {"run_id": "via-step", "pipeline_name": "real", "status": "running"}
    )
    details = await backend.get_run_details("via-step")
    assert details is not None and details["pipeline_name"] == "real"
    assert len(await backend.list_run_steps("via-step")) == 1
    await backend.close()
    for table in ("steps", "spans", "evaluations"):
        orphans = raw_rows(
            db_path,
            f"SELECT count(*) FROM {table} t LEFT JOIN runs r ON r.run_id = t.run_id "
            "WHERE r.run_id IS NULL",
        )
        assert orphans[0][0] == 0, table
    assert raw_rows(db_path, "PRAGMA foreign_key_check") == []


async def test_delete_run_removes_its_records_only(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    for run_id in ("doomed", "kept"):
        await start_run(backend, run_id, pipeline_name="p")
        await backend.save_state(run_id, make_state())
        await backend.save_step_result({"run_id": run_id, "step_name": "s", "step_index": 0})
        await backend.save_trace(
            run_id,
            span(f"{run_id}-root", "p", T0, T0 + 2, children=[span(f"{run_id}-c", "s", T0 + 1)]),
        )
        await backend.persist_evaluation(run_id, 0.9, step_name="s")
    await backend.delete_run("doomed")
    assert await backend.get_run_details("doomed") is None
    assert await backend.list_run_steps("doomed") == []
    assert await backend.get_spans("doomed") == []
    assert await backend.get_trace("doomed") is None
    assert await backend.list_evaluations(run_id="doomed") == []
    assert await backend.load_state("doomed") is not None  # workflow_state is left alone
    assert [r["run_id"] for r in await backend.list_runs()] == ["kept"]
    assert len(await backend.list_run_steps("kept")) == 1
    assert len(await backend.get_spans("kept")) == 2
    assert len(await backend.list_evaluations(run_id="kept")) == 1
    stats = await backend.get_span_statistics()
    assert stats["total_spans"] == 1  # kept's finished root; its child never ended
    # The span ids of a deleted run can be used again, even in 0.4.35's file-wide id space.
    await backend.save_trace("kept", span("doomed-root", "p", T0, T0 + 1))
    assert (await backend.get_trace("kept") or {}).get("span_id") == "doomed-root"


# --------------------------------------------------------------------------------------------
# Failed writes leave no transaction open


async def test_rejected_step_leaves_the_file_writable(
    backend: SQLiteBackend, db_path: Path
) -> None:
    await start_run(backend, "r")
    # 0.6.11 inserted the placeholder run, then raised KeyError with its transaction still
    # open: every other writer then got "database is locked" until close().
    with pytest.raises(InvalidStateError, match="step_name"):
        await backend.save_step_result({"run_id": "fresh", "step_index": 0})
    assert await backend.get_run_details("fresh") is None
    await assert_file_writable(backend, db_path, "step")


async def test_span_id_collision_fails_alone_and_leaves_the_file_writable(
    backend: SQLiteBackend, db_path: Path, layout: str
) -> None:
    first = span("shared-root", "p", T0, T0 + 1, children=[span("shared-child", "s", T0 + 0.5)])
    await start_run(backend, "owner")
    await backend.save_trace("owner", first)
    second = span("shared-root", "p", T0 + 10, T0 + 11, children=[span("other", "s", T0 + 10.5)])
    if layout == "flujo-0.4":
        # Span ids are file-wide in 0.4.35's layout: the save fails inside the database.
        with pytest.raises(InvalidStateError, match="span_id"):
            await backend.save_trace("intruder", second)
        # Rolled back whole: no placeholder run, no spans, the owner's trace untouched.
        assert await backend.get_run_details("intruder") is None
        assert await backend.get_spans("intruder") == []
    else:
        # Span ids are per run in 0.6.11's layout.
        await backend.save_trace("intruder", second)
        trace = await backend.get_trace("intruder")
        assert trace is not None and [c["span_id"] for c in trace["children"]] == ["other"]
    owner = await backend.get_trace("owner")
    assert owner is not None and owner["start_time"] == T0
    assert [c["span_id"] for c in owner["children"]] == ["shared-child"]
    await assert_file_writable(backend, db_path, "span")


async def test_failed_write_in_a_concurrent_batch_fails_alone(
    backend: SQLiteBackend, layout: str
) -> None:
    await start_run(backend, "owner")
    await backend.save_trace("owner", span("taken", "p", T0, T0 + 1))
    results = await asyncio.gather(
        *(start_run(backend, f"ok-{i}") for i in range(5)),
        backend.save_trace("intruder", span("taken", "p", T0, T0 + 1)),
        *(
            backend.save_step_result({"run_id": f"ok-{i}", "step_name": "s", "step_index": 0})
            for i in range(5)
        ),
        return_exceptions=True,
    )
    failures = [r for r in results if isinstance(r, BaseException)]
    if layout == "flujo-0.4":
        assert len(failures) == 1 and isinstance(failures[0], InvalidStateError), failures
    else:
        assert failures == []
    for i in range(5):
        assert await backend.get_run_details(f"ok-{i}") is not None
        assert len(await backend.list_run_steps(f"ok-{i}")) == 1


# --------------------------------------------------------------------------------------------
# Traces and spans


async def test_save_spans_takes_children_before_their_parents(backend: SQLiteBackend) -> None:
    # OpenTelemetry hands spans over in the order they end: children first. Flujo 0.4.35's
    # layout has a foreign key from each span to its parent (Flujo 0.6.11 fails here on it).
    def item(span_id: str, parent: str | None, start: float) -> dict[str, Any]:
        return {**span(span_id, "step", start, start + 1), "parent_span_id": parent}

    ended_order = [
        item("leaf", "mid", T0 + 2),
        item("sibling", "root", T0 + 3),
        item("mid", "root", T0 + 1),
        item("root", None, T0),
    ]
    await backend.save_spans("r", ended_order)
    trace = await backend.get_trace("r")
    assert trace is not None and trace["span_id"] == "root"
    assert [c["span_id"] for c in trace["children"]] == ["mid", "sibling"]
    assert [c["span_id"] for c in trace["children"][0]["children"]] == ["leaf"]


async def test_a_trace_whose_parent_links_form_a_cycle_reads_as_none(
    backend: SQLiteBackend, db_path: Path
) -> None:
    await start_run(backend, "r")
    await backend.save_trace(
        "r", span("a", "pipeline", T0, T0 + 2, children=[span("b", "step", T0 + 1, T0 + 2)])
    )
    # A cycle leaves no root. Only SQL from outside makes one in Flujo 0.4.35's layout, whose
    # foreign key wants each parent stored first; Flujo 0.6.11's save_spans stores one as given.
    await asyncio.to_thread(
        sql_in_another_process, db_path, "UPDATE spans SET parent_span_id = 'b' WHERE span_id = 'a'"
    )
    # Loads answered in the same hand-over as the trace must all arrive too.
    trace, *loads = await asyncio.gather(
        backend.get_trace("r"), *(backend.load_state(f"none-{i}") for i in range(50))
    )
    assert trace is None
    assert loads == [None] * 50
    assert {s["span_id"] for s in await backend.get_spans("r")} == {"a", "b"}


def branching_tree(branching: int, depth: int) -> dict[str, Any]:
    """A tree whose children are listed in reverse start-time order."""
    counter = iter(range(10_000))

    def node(path: str, level: int, start: float) -> dict[str, Any]:
        children = []
        if level < depth:
            for i in range(branching):
                children.append(node(f"{path}.{i}", level + 1, start + (i + 1) * 10.0**-level))
            children.reverse()
        return span(
            f"s{path}", f"level-{level}", start, start + 100, children=children, n=next(counter)
        )

    return node("0", 0, T0)


async def test_a_big_trace_logs_with_the_garbage_collector_as_the_program_left_it(
    backend: SQLiteBackend,
) -> None:
    """The collector is paused while a big trace is built; a logging handler may let other
    threads of the program run, and they must not find it paused."""

    def span(i: int, parent: str | None) -> dict[str, Any]:
        return {
            "span_id": f"s{i}",
            "parent_span_id": parent,
            "name": "n",
            "start_time": float(i),
            "end_time": float(i) + 1,
            "status": "completed",
        }

    await start_run(backend, "r")
    roots = [span(0, None), span(1, None)]  # two roots: get_trace warns
    await backend.save_spans("r", roots + [span(i, "s0") for i in range(2, 1_500)])
    seen: list[bool] = []

    class Recorder(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(gc.isenabled())

    recorder = Recorder(logging.WARNING)
    logging.getLogger("flujo_sqlite").addHandler(recorder)
    try:
        tree = await backend.get_trace("r")
    finally:
        logging.getLogger("flujo_sqlite").removeHandler(recorder)
    assert tree is not None and len(tree["children"]) == 1_498
    assert seen == [True]
    assert gc.isenabled()


async def test_trace_tree_round_trip(backend: SQLiteBackend) -> None:
    await start_run(backend, "r")
    tree = branching_tree(3, 4)
    await backend.save_trace("r", tree)
    trace = await backend.get_trace("r")
    assert trace is not None
    assert len(walk(trace)) == 1 + 3 + 9 + 27 + 81
    assert trace["span_id"] == "s0" and trace["parent_span_id"] is None

    def check(node: dict[str, Any], level: int) -> None:
        assert set(node) == SPAN_KEYS | {"children"}
        assert node["name"] == f"level-{level}"
        if level == 4:
            assert node["children"] == []
            return
        kids = node["children"]
        assert len(kids) == 3
        starts = [k["start_time"] for k in kids]
        assert starts == sorted(starts)  # start-time order, not the order given
        assert [k["span_id"] for k in kids] == [f"{node['span_id']}.{i}" for i in range(3)]
        for kid in kids:
            assert kid["parent_span_id"] == node["span_id"]
            check(kid, level + 1)

    check(trace, 0)
    given = {n["span_id"]: strip_children(n) for n in walk(tree)}
    got = {n["span_id"]: strip_children(n) for n in walk(trace)}
    assert set(got) == set(given)
    for span_id, node in got.items():
        expected = dict(given[span_id])
        expected["parent_span_id"] = node["parent_span_id"]
        assert node == expected, span_id


async def test_trace_keeps_statuses_and_child_order(backend: SQLiteBackend) -> None:
    await start_run(backend, "r")
    await backend.save_trace(
        "r",
        span(
            "root",
            "pipeline",
            T0,
            T0 + 10,
            children=[
                span("late", "second", T0 + 5, T0 + 6, status="failed"),
                span("early", "first", T0 + 1, None, status="running"),
            ],
        ),
    )
    trace = await backend.get_trace("r")
    assert trace is not None
    assert [(c["span_id"], c["status"], c["end_time"]) for c in trace["children"]] == [
        ("early", "running", None),
        ("late", "failed", T0 + 6),
    ]
    assert trace["status"] == "completed"
    assert isinstance(trace["start_time"], float)


async def test_span_attributes_round_trip(backend: SQLiteBackend) -> None:
    attributes = {
        "none": None,
        "yes": True,
        "no": False,
        "pi": 3.141592653589793,
        "tiny": 1e-7,
        "neg": -0.5,
        "int": 42,
        "empty_list": [],
        "empty_dict": {},
        "nested": {"list": [1, None, {"deep": []}], "text": 'é😀\n"q"'},
    }
    await start_run(backend, "r")
    await backend.save_trace(
        "r", span("root", "p", T0, T0 + 1, children=[span("kid", "k", T0 + 0.5, **attributes)])
    )
    trace = await backend.get_trace("r")
    assert trace is not None
    assert trace["attributes"] == {}
    [kid] = trace["children"]
    assert kid["attributes"] == attributes
    assert [s["attributes"] for s in await backend.get_spans("r", name="k")] == [attributes]


async def test_second_trace_replaces_and_empty_traces_keep(backend: SQLiteBackend) -> None:
    await start_run(backend, "r")
    await backend.save_trace("r", {})
    await backend.save_trace("r", None)  # type: ignore[arg-type]
    assert await backend.get_trace("r") is None
    await backend.save_trace("r", span("one", "p", T0, T0 + 1, children=[span("one-a", "a", T0)]))
    await backend.save_trace("r", {})
    await backend.save_trace("r", None)  # type: ignore[arg-type]
    await backend.save_trace("r", {"name": "no id"})  # a root without an id produces nothing
    trace = await backend.get_trace("r")
    assert trace is not None and trace["span_id"] == "one"
    assert len(await backend.get_spans("r")) == 2
    await backend.save_trace("r", span("two", "p", T0 + 50, T0 + 51))
    trace = await backend.get_trace("r")
    assert trace is not None and trace["span_id"] == "two" and trace["children"] == []
    assert [s["span_id"] for s in await backend.get_spans("r")] == ["two"]


async def test_save_spans_appends(backend: SQLiteBackend) -> None:
    await backend.save_spans("r", [])  # nothing, not even a placeholder run
    assert await backend.get_run_details("r") is None
    await backend.save_spans(
        "r",
        [
            {"span_id": "root", "name": "p", "start_time": T0, "end_time": T0 + 9},
            {"span_id": "", "name": "skipped", "start_time": T0},
            {
                "span_id": "a",
                "parent_span_id": "root",
                "name": "",
                "start_time": T0 + 1,
                "attributes": "not a dict",
            },
        ],
    )
    await backend.save_spans(
        "r", [{"span_id": "b", "parent_span_id": "root", "name": "b", "start_time": T0 + 2}]
    )
    spans = await backend.get_spans("r")
    assert [s["span_id"] for s in spans] == ["root", "a", "b"]
    assert spans[1]["name"] == "span" and spans[1]["attributes"] == {}
    trace = await backend.get_trace("r")
    assert trace is not None and [c["span_id"] for c in trace["children"]] == ["a", "b"]

    # Other mappings are kept as the object they hold (they used to become {}).
    await backend.save_trace(
        "m",
        span(
            "m",
            "p",
            T0,
            children=[
                {"span_id": "u", "name": "u", "start_time": T0, "attributes": UserDict(k=1)},
                {
                    "span_id": "v",
                    "name": "v",
                    "start_time": T0,
                    "attributes": MappingProxyType({"k": [2]}),
                },
            ],
        ),
    )
    kept = {s["span_id"]: s["attributes"] for s in await backend.get_spans("m")}
    assert (kept["u"], kept["v"]) == ({"k": 1}, {"k": [2]})


async def test_save_spans_skips_only_spans_whose_times_are_not_numbers(
    backend: SQLiteBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """Flujo 0.6.11 drops a span with unparsable times; any other span that cannot be stored,
    or an interrupt while reading it, must reach the caller rather than become a warning."""
    with caplog.at_level(logging.WARNING, logger="flujo_sqlite"):
        await backend.save_spans(
            "r",
            [
                {"span_id": "root", "name": "p", "start_time": T0},
                {"span_id": "late", "name": "p", "start_time": T0, "end_time": "tomorrow"},
            ],
        )
    assert [s["span_id"] for s in await backend.get_spans("r")] == ["root"]
    assert "span skipped" in caplog.text and "end_time must be a number" in caplog.text
    assert 'the text "tomorrow"' in caplog.text
    # Text that reads as a number is one, as Flujo's float() reads it.
    await backend.save_spans(
        "numeric", [{"span_id": "text", "name": "p", "start_time": " 7.5", "end_time": "9"}]
    )
    await backend.save_trace("t", {"span_id": "t", "name": "p", "start_time": "1e3"})
    spans = {
        s["span_id"]: s for s in await backend.get_spans("numeric") + await backend.get_spans("t")
    }
    assert (spans["text"]["start_time"], spans["text"]["end_time"]) == (7.5, 9.0)
    assert spans["t"]["start_time"] == 1000.0

    class Opaque:
        pass

    class Interrupting:
        pass

    def interrupt(_: object) -> object:
        raise KeyboardInterrupt

    flujo_sqlite.register_serializer(Interrupting, interrupt)
    for value, raised in ((Opaque(), SerializationError), (Interrupting(), KeyboardInterrupt)):
        stored = {"span_id": "kept", "name": "p", "start_time": T0}
        unstorable = {"span_id": "x", "name": "p", "start_time": T0, "attributes": {"v": value}}
        with pytest.raises(raised):
            await backend.save_spans("r", [stored, unstorable])
        assert [s["span_id"] for s in await backend.get_spans("r")] == ["root"]


async def test_get_spans_filters(backend: SQLiteBackend) -> None:
    await start_run(backend, "r")
    await backend.save_trace(
        "r",
        span(
            "root",
            "pipeline",
            T0,
            T0 + 10,
            children=[
                span("s1", "step", T0 + 1, T0 + 2, status="completed"),
                span("s2", "step", T0 + 3, T0 + 4, status="failed"),
                span("l1", "llm", T0 + 5, T0 + 6, status="completed"),
            ],
        ),
    )

    async def ids(**filters: Any) -> list[str]:
        spans = await backend.get_spans("r", **filters)
        for s in spans:
            assert set(s) == SPAN_KEYS
        return [s["span_id"] for s in spans]

    assert await ids() == ["root", "s1", "s2", "l1"]
    assert await ids(status="completed") == ["root", "s1", "l1"]
    assert await ids(name="step") == ["s1", "s2"]
    assert await ids(status="completed", name="step") == ["s1"]
    assert await ids(status="failed", name="llm") == []
    assert await ids(status="", name="") == ["root", "s1", "s2", "l1"]
    [s2] = await backend.get_spans("r", status="failed")
    assert s2["parent_span_id"] == "root" and s2["start_time"] == T0 + 3


async def test_span_statistics(backend: SQLiteBackend) -> None:
    await start_run(backend, "r1", pipeline_name="alpha")
    await start_run(backend, "r2", pipeline_name="beta")
    await backend.save_trace(
        "r1",
        span(
            "r1-root",
            "pipeline",
            T0,
            T0 + 100,
            children=[
                span("r1-step", "step", T0 + 10, T0 + 50),
                span("r1-open", "step", T0 + 60, None, status="running"),  # unfinished: not counted
            ],
        ),
    )
    await backend.save_trace(
        "r2",
        span(
            "r2-root",
            "pipeline",
            T0 + 200,
            T0 + 300,
            children=[span("r2-step", "step", T0 + 210, T0 + 260, status="failed")],
        ),
    )
    stats = await backend.get_span_statistics()
    assert stats["total_spans"] == 4
    assert stats["by_name"] == {"pipeline": 2, "step": 2}
    assert stats["by_status"] == {"completed": 3, "failed": 1}
    durations = stats["avg_duration_by_name"]
    assert set(durations) == {"pipeline", "step"}
    assert durations["pipeline"]["count"] == 2
    assert durations["pipeline"]["total"] == pytest.approx(200.0)
    assert durations["pipeline"]["average"] == pytest.approx(100.0)
    assert durations["step"]["count"] == 2
    assert durations["step"]["total"] == pytest.approx(90.0)
    assert durations["step"]["average"] == pytest.approx(45.0)

    alpha = await backend.get_span_statistics(pipeline_name="alpha")
    assert alpha["total_spans"] == 2
    assert alpha["by_name"] == {"pipeline": 1, "step": 1}
    assert alpha["avg_duration_by_name"]["step"]["average"] == pytest.approx(40.0)
    assert (await backend.get_span_statistics(pipeline_name="gamma"))["total_spans"] == 0

    later = await backend.get_span_statistics(time_range=(T0 + 150, T0 + 1000))
    assert later["total_spans"] == 2 and later["by_status"] == {"completed": 1, "failed": 1}
    assert later["avg_duration_by_name"]["step"]["average"] == pytest.approx(50.0)
    inclusive = await backend.get_span_statistics(time_range=(T0 + 200, T0 + 210))
    assert inclusive["by_name"] == {"pipeline": 1, "step": 1}
    both = await backend.get_span_statistics(pipeline_name="alpha", time_range=(T0 + 5, T0 + 20))
    assert both["by_name"] == {"step": 1}
    none = await backend.get_span_statistics(pipeline_name="beta", time_range=(T0, T0 + 100))
    assert none["total_spans"] == 0 and none["avg_duration_by_name"] == {}


async def test_concurrent_run_starts_and_traces(backend: SQLiteBackend) -> None:
    async def one(i: int) -> None:
        await backend.save_run_start({"run_id": f"c-{i}", "pipeline_name": f"p{i}"})
        await backend.save_trace(
            f"c-{i}",
            span(
                f"c-{i}-root",
                "pipeline",
                T0 + i,
                T0 + i + 1,
                children=[span(f"c-{i}-kid", "step", T0 + i + 0.5, T0 + i + 0.7)],
            ),
        )

    await asyncio.gather(*(one(i) for i in range(5)))
    for i in range(5):
        details = await backend.get_run_details(f"c-{i}")
        assert details is not None and details["pipeline_name"] == f"p{i}"
        trace = await backend.get_trace(f"c-{i}")
        assert trace is not None and trace["span_id"] == f"c-{i}-root"
        assert [c["span_id"] for c in trace["children"]] == [f"c-{i}-kid"]
    assert len(await backend.list_runs()) == 5


# --------------------------------------------------------------------------------------------
# System state and evaluations


async def test_system_state(backend: SQLiteBackend) -> None:
    assert await backend.get_system_state("missing") is None
    value = {"cursor": 17, "ids": [1, None, True, 2.5], "nested": {"é": "😀"}, "empty": {}}
    before = utc_now()
    await backend.set_system_state("scheduler", value)
    entry = await backend.get_system_state("scheduler")
    assert entry is not None and set(entry) == {"key", "value", "updated_at"}
    assert entry["key"] == "scheduler" and entry["value"] == value
    first_update = entry["updated_at"]
    assert isinstance(first_update, datetime) and first_update.tzinfo is not None
    assert before - timedelta(seconds=5) <= first_update <= utc_now() + timedelta(seconds=5)

    await asyncio.sleep(0.01)
    await backend.set_system_state("scheduler", {"cursor": 18})
    entry = await backend.get_system_state("scheduler")
    assert entry is not None and entry["value"] == {"cursor": 18}
    assert entry["updated_at"] > first_update
    await backend.set_system_state("other", {})
    assert (await backend.get_system_state("other") or {}).get("value") == {}
    assert (await backend.get_system_state("scheduler") or {}).get("value") == {"cursor": 18}


async def test_evaluations(backend: SQLiteBackend) -> None:
    assert await backend.list_evaluations() == []
    await start_run(backend, "a")
    plan = [
        ("a", 0.1, "first", "s1", {"judge": "x"}),
        ("b", 0.2, None, None, None),
        ("a", 0.3, "third", "s2", {"nested": {"ok": True}}),
        ("b", 0.4, "fourth", "s1", {}),
    ]
    for run_id, score, feedback, step_name, metadata in plan:
        await backend.persist_evaluation(
            run_id, score, feedback=feedback, step_name=step_name, metadata=metadata
        )
    everything = await backend.list_evaluations()
    assert [e["score"] for e in everything] == [0.4, 0.3, 0.2, 0.1]  # newest first
    for item in everything:
        assert set(item) == EVALUATION_KEYS
        assert isinstance(item["created_at"], str)
    by_score = {e["score"]: e for e in everything}
    assert by_score[0.3] == {
        "run_id": "a",
        "step_name": "s2",
        "score": 0.3,
        "feedback": "third",
        "metadata": {"nested": {"ok": True}},
        "created_at": by_score[0.3]["created_at"],
    }
    assert (by_score[0.2]["feedback"], by_score[0.2]["step_name"]) == (None, None)
    assert by_score[0.2]["metadata"] is None
    assert [e["score"] for e in await backend.list_evaluations(limit=2)] == [0.4, 0.3]
    assert (
        len(await backend.list_evaluations(limit=None))
        == len(await backend.list_evaluations(limit=-1))
        == 4
    )
    assert [e["score"] for e in await backend.list_evaluations(run_id="a")] == [0.3, 0.1]
    assert [e["score"] for e in await backend.list_evaluations(limit=1, run_id="b")] == [0.4]
    assert await backend.list_evaluations(run_id="nobody") == []
    # As in Flujo, an empty run id is no filter.
    assert [e["score"] for e in await backend.list_evaluations(run_id="")] == [0.4, 0.3, 0.2, 0.1]


async def test_evaluation_times_written_by_flujo_are_listed_with_an_offset(
    backend: SQLiteBackend, db_path: Path
) -> None:
    """Flujo 0.6.11 stores naive whole seconds (UTC); listed, they carry an offset like ours,
    so one arithmetic on them works for both."""
    await start_run(backend, "a")
    await backend.persist_evaluation("a", 0.5)
    await backend.close()
    conn = sqlite3.connect(db_path)
    conn.execute(
        "INSERT INTO evaluations (run_id, score, created_at) VALUES ('a', 0.9, ?)",
        ("2026-01-02 03:04:05",),
    )
    conn.commit()
    conn.close()

    listed = {e["score"]: e["created_at"] for e in await backend.list_evaluations()}
    assert listed[0.9] == "2026-01-02 03:04:05.000000+00:00"
    assert datetime.fromisoformat(listed[0.5]).utcoffset() == timedelta(0)


# --------------------------------------------------------------------------------------------
# Background tasks


async def test_background_tasks_list_and_filter(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    now = utc_now()
    plan = [  # run_id, parent, status, minutes since update
        ("t1", "parent-1", "running", 50),
        ("t2", "parent-1", "completed", 40),
        ("t3", "parent-2", "running", 30),
        ("t4", "parent-1", "failed", 20),
        ("t5", "parent-2", "completed", 10),
    ]
    for run_id, parent, status, minutes in plan:
        updated = now - timedelta(minutes=minutes)
        await backend.save_state(
            run_id,
            make_state(
                status=status,
                is_background_task=True,
                parent_run_id=parent,
                task_id=f"task-{run_id}",
                metadata={"kind": "bg", "of": parent},
                created_at=updated - timedelta(minutes=1),
                updated_at=updated,
                background_error="boom" if status == "failed" else None,
            ),
        )
    await backend.save_state("foreground", make_state(status="running"))

    async def ids(**kw: Any) -> list[str]:
        return [t["run_id"] for t in await backend.list_background_tasks(**kw)]

    tasks = await backend.list_background_tasks()
    assert [t["run_id"] for t in tasks] == ["t5", "t4", "t3", "t2", "t1"]  # updated_at DESC
    for task in tasks:
        assert set(task) == WORKFLOW_ITEM_KEYS
        assert task["is_background_task"] is True
        assert task["task_id"] == f"task-{task['run_id']}"
        assert task["metadata"] == {"kind": "bg", "of": task["parent_run_id"]}
    assert {t["run_id"]: t["background_error"] for t in tasks}["t4"] == "boom"
    assert await ids(parent_run_id="parent-1") == ["t4", "t2", "t1"]
    assert await ids(status="running") == ["t3", "t1"]
    assert await ids(parent_run_id="parent-2", status="completed") == ["t5"]
    assert await ids(parent_run_id="nobody") == []
    assert await ids(limit=2) == ["t5", "t4"]
    assert await ids(limit=2, offset=2) == ["t3", "t2"]
    assert await ids(offset=3) == ["t2", "t1"]
    assert await ids(parent_run_id="parent-1", limit=1, offset=1) == ["t2"]
    loaded = await backend.load_state("t3")
    assert loaded is not None
    assert (loaded["is_background_task"], loaded["parent_run_id"]) == (True, "parent-2")
    stats = await backend.get_workflow_stats()
    assert stats["background_status_counts"] == {"running": 2, "completed": 2, "failed": 1}
    assert stats["status_counts"] == {"running": 3, "completed": 2, "failed": 1}
    # Unlike the other lists (and as in Flujo 0.6.11), an empty filter here is matched as it is.
    assert await ids(parent_run_id="") == []
    assert await ids(status="") == []
    assert await backend.get_failed_background_tasks(parent_run_id="", hours_back=1) == []
    await backend.save_state(
        "orphan",
        make_state(status="failed", is_background_task=True, parent_run_id="", task_id="o"),
    )
    assert await ids(parent_run_id="") == ["orphan"]
    assert [
        t["run_id"]
        for t in await backend.get_failed_background_tasks(parent_run_id="", hours_back=1)
    ] == ["orphan"]


async def test_failed_background_tasks_hours_window(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    now = utc_now()
    ages = {  # run_id -> (parent, age)
        "f-1h": ("p1", timedelta(hours=1)),
        "f-23h58": ("p1", timedelta(hours=23, minutes=58)),
        "f-24h02": ("p2", timedelta(hours=24, minutes=2)),
        "f-47h": ("p1", timedelta(hours=47)),
    }
    for run_id, (parent, age) in ages.items():
        await backend.save_state(
            run_id,
            make_state(
                status="failed",
                is_background_task=True,
                parent_run_id=parent,
                created_at=now - age - timedelta(minutes=5),
                updated_at=now - age,
            ),
        )
    await backend.save_state(  # failed, but not a background task
        "fg-failed", make_state(status="failed", updated_at=now - timedelta(hours=1))
    )
    await backend.save_state(  # a background task, but not failed
        "bg-running",
        make_state(status="running", is_background_task=True, parent_run_id="p1"),
    )

    async def ids(**kw: Any) -> list[str]:
        return [t["run_id"] for t in await backend.get_failed_background_tasks(**kw)]

    assert await ids() == ["f-1h", "f-23h58"]  # hours_back=24 by default
    assert await ids(hours_back=24) == ["f-1h", "f-23h58"]
    assert await ids(hours_back=48) == ["f-1h", "f-23h58", "f-24h02", "f-47h"]
    assert await ids(hours_back=0.5) == []
    assert await ids(hours_back=1.5) == ["f-1h"]
    assert await ids(parent_run_id="p1", hours_back=48) == ["f-1h", "f-23h58", "f-47h"]
    assert await ids(parent_run_id="p2") == []
    assert await ids(parent_run_id="p2", hours_back=25) == ["f-24h02"]
    for task in await backend.get_failed_background_tasks(hours_back=48):
        assert set(task) == WORKFLOW_ITEM_KEYS


async def test_cleanup_stale_background_tasks(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    now = utc_now()

    def task(status: str, age: timedelta, *, background: bool = True) -> dict[str, Any]:
        return make_state(
            status=status,
            is_background_task=background,
            parent_run_id="parent" if background else None,
            created_at=now - age - timedelta(minutes=1),
            updated_at=now - age,
        )

    await backend.save_state("stale", task("running", timedelta(hours=3)))
    await backend.save_state("stale-too", task("running", timedelta(hours=2, minutes=2)))
    await backend.save_state("fresh", task("running", timedelta(hours=1, minutes=58)))
    await backend.save_state("old-but-done", task("completed", timedelta(hours=5)))
    await backend.save_state("old-paused", task("paused", timedelta(hours=5)))
    await backend.save_state(
        "old-foreground", task("running", timedelta(hours=5), background=False)
    )
    before = {
        run_id: await backend.load_state(run_id)
        for run_id in ("fresh", "old-but-done", "old-paused", "old-foreground")
    }

    assert await backend.cleanup_stale_background_tasks(stale_hours=2) == 2
    for run_id in ("stale", "stale-too"):
        state = await backend.load_state(run_id)
        assert state is not None
        assert state["status"] == "failed"
        assert state["background_error"] == STALE_TASK_ERROR
        assert abs(state["updated_at"].timestamp() - utc_now().timestamp()) < 60
        assert state["pipeline_context"] == build_state()["pipeline_context"]
    for run_id, old in before.items():
        assert await backend.load_state(run_id) == old, run_id
    failed = await backend.get_failed_background_tasks(hours_back=1)
    assert sorted(t["run_id"] for t in failed) == ["stale", "stale-too"]
    assert await backend.cleanup_stale_background_tasks(stale_hours=2) == 0
    assert await backend.cleanup_stale_background_tasks() == 0  # default 24 h: nothing that old


# --------------------------------------------------------------------------------------------
# get_workflow_stats_sync


async def test_workflow_stats_sync_matches_async(
    backend: SQLiteBackend, make_state: Callable[..., dict[str, Any]]
) -> None:
    assert await asyncio.to_thread(backend.get_workflow_stats_sync) == EMPTY_WORKFLOW_STATS
    now = utc_now()
    plan = [
        ("w1", "running", 1000, False, now),
        ("w2", "failed", 2000, False, now - timedelta(hours=30)),
        ("w3", "completed", None, True, now - timedelta(hours=2)),
        ("w4", "failed", 4000, True, now - timedelta(minutes=5)),
    ]
    for run_id, status, ms, bg, created in plan:
        await backend.save_state(
            run_id,
            make_state(
                status=status,
                execution_time_ms=ms,
                is_background_task=bg,
                created_at=created,
                updated_at=created,
            ),
        )
    stats = await backend.get_workflow_stats()
    assert stats == {
        "total_workflows": 4,
        "status_counts": {"running": 1, "failed": 2, "completed": 1},
        "recent_workflows_24h": 3,
        "average_execution_time_ms": pytest.approx(7000 / 3),
        "background_status_counts": {"completed": 1, "failed": 1},
    }
    assert await asyncio.to_thread(backend.get_workflow_stats_sync) == stats


def test_workflow_stats_sync_outside_any_event_loop(
    layout: str, db_path: Path, make_state: Callable[..., dict[str, Any]]
) -> None:
    backend = SQLiteBackend(db_path)
    try:
        assert backend.get_workflow_stats_sync() == EMPTY_WORKFLOW_STATS

        async def fill() -> dict[str, Any]:
            await backend.save_state("a", make_state(status="paused", execution_time_ms=10))
            await backend.save_state("b", make_state(status="paused", execution_time_ms=20))
            return await backend.get_workflow_stats()

        stats = asyncio.run(fill())
        assert stats["total_workflows"] == 2
        assert stats["average_execution_time_ms"] == pytest.approx(15.0)
        assert backend.get_workflow_stats_sync() == stats
    finally:
        asyncio.run(backend.close())
    assert_file_layout(db_path, layout)


# --------------------------------------------------------------------------------------------
# Flujo 0.4.35 reads what we wrote (0.4.35 layout only: it moves a 0.6.11-layout file aside)


@pytest.mark.flujo_compat
async def test_flujo_0435_reads_our_runs_steps_and_trace(layout: str, db_path: Path) -> None:
    if layout != "flujo-0.4":
        pytest.skip("Flujo 0.4.35 cannot read Flujo 0.6.11's layout")
    flujo_backends = pytest.importorskip("flujo.state.backends.sqlite")
    if importlib.metadata.version("flujo") != "0.4.35":
        pytest.skip(f"needs Flujo 0.4.35, found {importlib.metadata.version('flujo')}")

    started = utc_now() - timedelta(minutes=1)
    ours = SQLiteBackend(db_path)
    await ours.save_run_start(
        {
            "run_id": "shared",
            "pipeline_name": "report",
            "pipeline_version": "3",
            "start_time": started,
        }
    )
    for i, name in enumerate(("extract", "load")):
        await ours.save_step_result(
            {
                "step_run_id": f"shared:{i}",
                "run_id": "shared",
                "step_name": name,
                "step_index": i,
                "status": "completed",
                "start_time": started + timedelta(seconds=i),
                "end_time": started + timedelta(seconds=i, milliseconds=500),
                "duration_ms": 500,
                "cost": 0.01 * (i + 1),
                "tokens": 10 * (i + 1),
                "input": {"i": i},
                "output": [name, i],
            }
        )
    await ours.save_run_end(
        "shared",
        {"status": "completed", "total_cost": 0.03, "final_context": {"done": True, "n": 2}},
    )
    tree = span(
        "shared-root",
        "pipeline",
        T0,
        T0 + 3,
        children=[
            span("shared-b", "load", T0 + 2, T0 + 2.5, rows=3),
            span(
                "shared-a",
                "extract",
                T0 + 1,
                T0 + 1.5,
                children=[span("shared-a1", "llm", T0 + 1.1)],
            ),
        ],
        flag=None,
    )
    await ours.save_trace("shared", tree)
    our_details = await ours.get_run_details("shared")
    our_steps = await ours.list_run_steps("shared")
    our_trace = await ours.get_trace("shared")
    await ours.close()
    assert_file_layout(db_path, layout)

    flujo = flujo_backends.SQLiteBackend(db_path)
    try:
        details = await flujo.get_run_details("shared")
        steps = await flujo.list_run_steps("shared")
        trace = await flujo.get_trace("shared")
    finally:
        await flujo.close()

    assert details is not None and our_details is not None
    assert details == {key: our_details[key] for key in details}
    assert details["final_context"] == {"done": True, "n": 2}
    assert details["total_cost"] == pytest.approx(0.03)
    assert (details["pipeline_name"], details["pipeline_version"]) == ("report", "3")
    assert [s["step_name"] for s in steps] == ["extract", "load"]
    assert [
        {key: mine[key] for key in theirs} for theirs, mine in zip(steps, our_steps, strict=True)
    ] == steps
    assert steps[1]["input"] == {"i": 1} and steps[1]["output"] == ["load", 1]
    assert trace == our_trace
    assert trace is not None and [c["span_id"] for c in trace["children"]] == [
        "shared-a",
        "shared-b",
    ]
    assert trace["children"][0]["children"][0]["span_id"] == "shared-a1"
    assert trace["children"][1]["attributes"] == {"rows": 3}
