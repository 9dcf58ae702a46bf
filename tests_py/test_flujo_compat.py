"""Side by side with the real Flujo 0.4.35 backend, on the same files.

* A file Flujo wrote reads the same through our backend (every field of every row, the admin
  queries), and a file we wrote reads the same through Flujo's.
* Both can take turns writing one file, and Flujo's backend in another process can write while
  ours stays open. (Flujo's backend and ours open at once on one file in the same process is a
  documented limitation: two copies of SQLite in one process; it is not tested.)
* A fresh file of ours has Flujo's schema (tables, columns, CHECK, indexes, WAL), plus Flujo
  0.6.11's background columns and tables; opening a Flujo file adds those and changes nothing else.
* Legacy layouts (spec 5.1) are migrated in place, never moved aside.

Our return shapes are Flujo 0.6.11's, a superset of 0.4.35's: comparisons with Flujo 0.4.35 cover
its keys, and the extra background-task keys of ours must hold their defaults.

Where Flujo's text-comparison time windows are wrong (rows 24-48 h around a cutoff), we do not
compare with Flujo; test_api.py pins our exact behaviour, and one test below pins it on a file
Flujo wrote.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import pickle
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import flujo_sqlite.backend as our_backend_module
import pydantic
import pytest
from conftest import (
    BACKGROUND_DEFAULTS,
    BACKGROUND_KEYS,
    LOAD_STATE_KEYS,
    LOAD_STATE_KEYS_0435,
    UTC,
    WORKFLOW_ITEM_KEYS,
    WORKFLOW_ITEM_KEYS_0435,
    WORKFLOW_STATS_KEYS,
    WORKFLOW_STATS_KEYS_0435,
    build_state,
    raw_rows,
    utc_now,
)
from flujo_sqlite import SQLiteBackend

pytestmark = pytest.mark.flujo_compat

flujo_sqlite_module = pytest.importorskip(
    "flujo.state.backends.sqlite",
    reason="the reference Flujo backend (pip install flujo==0.4.35 sqlvalidator) is not installed",
)
if importlib.metadata.version("flujo") != "0.4.35":
    pytest.skip(
        f"these tests pin Flujo 0.4.35, found {importlib.metadata.version('flujo')}",
        allow_module_level=True,
    )
FlujoBackend = flujo_sqlite_module.SQLiteBackend

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
TABLES = ("workflow_state", "runs", "steps", "spans")
#: The tables Flujo 0.6.11 added, which we create in every file we open.
TABLES_06 = ("system_state", "traces", "evaluations")


# --------------------------------------------------------------------------------------------
# Shared helpers: one way to open each side, one way to compare what they return.

Side = str  # "flujo" or "ours"
SIDES: tuple[Side, ...] = ("flujo", "ours")


@asynccontextmanager
async def opened(side: Side, path: Path) -> AsyncIterator[Any]:
    backend = FlujoBackend(path) if side == "flujo" else SQLiteBackend(path)
    try:
        yield backend
    finally:
        await backend.close()


async def save_all(side: Side, path: Path, states: dict[str, dict[str, Any]]) -> None:
    async with opened(side, path) as backend:
        for run_id, state in states.items():
            await backend.save_state(run_id, state)


async def load_all(side: Side, path: Path, run_ids: list[str]) -> dict[str, Any]:
    async with opened(side, path) as backend:
        return {run_id: await backend.load_state(run_id) for run_id in run_ids}


def assert_same_loaded_state(
    flujo_state: Any,
    other_state: Any,
    *,
    context: str = "",
    reader: Side = "ours",
    expect_utc: bool = False,
) -> None:
    """Flujo's ``load_state`` result and another one (read by ``reader``) describe the same
    state: the same values and types for Flujo 0.4.35's 15 keys, and the two timestamps are the
    same instant with the same awareness. Read by ours, the state has the 20 keys of Flujo 0.6.11,
    the five background-task ones at their defaults (nothing here saves them).
    ``expect_utc``: the other side is ours reading what we wrote, so aware values are in UTC
    (text Flujo wrote with another offset comes back with that offset, as Flujo does)."""
    if flujo_state is None or other_state is None:
        assert flujo_state is other_state, context
        return
    assert set(flujo_state) == LOAD_STATE_KEYS_0435, context
    if reader == "ours":
        assert set(other_state) == LOAD_STATE_KEYS, context
        assert {k: other_state[k] for k in BACKGROUND_KEYS} == BACKGROUND_DEFAULTS, context
    else:
        assert set(other_state) == LOAD_STATE_KEYS_0435, context
    for key in LOAD_STATE_KEYS_0435:
        assert other_state[key] == flujo_state[key], f"{context}: {key}"
        assert type(other_state[key]) is type(flujo_state[key]), f"{context}: type of {key}"
    for key in ("created_at", "updated_at"):
        assert (other_state[key].tzinfo is None) == (flujo_state[key].tzinfo is None), context
        if expect_utc and other_state[key].tzinfo is not None:
            assert other_state[key].utcoffset() == timedelta(0), context


async def cross_load(
    tmp_path: Path, states: dict[str, dict[str, Any]]
) -> dict[tuple[Side, Side], dict[str, Any]]:
    """Saves ``states`` once with Flujo and once with ours (one file each), loads every run of
    each file with both backends, and returns ``{(writer, reader): {run_id: loaded}}``."""
    results: dict[tuple[Side, Side], dict[str, Any]] = {}
    for writer in SIDES:
        path = tmp_path / f"written_by_{writer}.db"
        await save_all(writer, path, states)
        for reader in SIDES:
            results[(writer, reader)] = await load_all(reader, path, list(states))
    return results


def assert_all_four_agree(loaded: dict[tuple[Side, Side], dict[str, Any]]) -> None:
    reference = loaded[("flujo", "flujo")]
    for (writer, reader), states in loaded.items():
        for run_id, state in states.items():
            assert_same_loaded_state(
                reference[run_id],
                state,
                context=f"{run_id!r} written by {writer}, read by {reader}",
                reader=reader,
                expect_utc=writer == reader == "ours",
            )


def as_0435_items(flujo_items: list[dict], our_items: list[dict]) -> list[dict]:
    """Checks the two shapes (Flujo 0.4.35's 12 keys; ours 17, the five background-task ones at
    their defaults, less ``memory_usage_mb`` where the run recorded none and Flujo gives None)
    and returns our items cut down to Flujo 0.4.35's keys, with that None put back."""
    for item in flujo_items:
        assert set(item) == WORKFLOW_ITEM_KEYS_0435, item["run_id"]
    for item in our_items:
        assert set(item) | {"memory_usage_mb"} == WORKFLOW_ITEM_KEYS, item["run_id"]
        assert item.get("memory_usage_mb", 0) is not None, item["run_id"]
        assert {k: item[k] for k in BACKGROUND_KEYS} == BACKGROUND_DEFAULTS, item["run_id"]
    return [{k: item.get(k) for k in WORKFLOW_ITEM_KEYS_0435} for item in our_items]


def assert_same_workflow_lists(
    flujo_items: list[dict], our_items: list[dict], context: object = ""
) -> None:
    """Both backends listing the same file: the same rows in the same order, and the same values,
    timestamps included (both return the stored text)."""
    assert [i["run_id"] for i in our_items] == [i["run_id"] for i in flujo_items], context
    assert as_0435_items(flujo_items, our_items) == flujo_items, context


def assert_same_workflow_items_in_text_order(
    flujo_items: list[dict], our_items: list[dict]
) -> None:
    """For files holding both Flujo's ``T`` timestamps and our space-separated ones: the same
    items, newest first by the stored text. That is Flujo's own order and the documented one
    (README, "Order"): an index on julianday() could make an older SQLite reject the file, and
    an unindexed sort by instant is too slow, so on one calendar day Flujo's ``...T...`` rows
    sort after ours whatever the time."""
    assert sorted(as_0435_items(flujo_items, our_items), key=lambda i: i["run_id"]) == sorted(
        flujo_items, key=lambda i: i["run_id"]
    )
    texts = [i["created_at"] for i in our_items]
    assert texts == sorted(texts, reverse=True), [i["run_id"] for i in our_items]


def sibling_names(path: Path) -> set[str]:
    """Files next to ``path`` apart from SQLite's own -wal/-shm companions."""
    return {
        p.name for p in path.parent.iterdir() if not p.name.endswith(("-wal", "-shm", "-journal"))
    }


def realistic_rows(now: datetime) -> dict[str, dict[str, Any]]:
    """Rows whose ages keep well away from every cutoff the admin queries use, so that Flujo's
    text comparisons give the true answer and the two backends must agree exactly.

    A row older than a cutoff must be older by more than a day: Flujo compares its stored
    ``...T...`` text with a cutoff spelled ``... ...``, so on the cutoff's calendar day every row
    counts as newer (``T`` sorts after a space). Rows inside a window may be close to it. Windows:
    1, 24, 168 and 8,760 h for failed runs (on ``updated_at``, 10 minutes after ``created_at``),
    24 h for the stats, 7, 30 and 60 days for cleanup (on ``created_at``)."""
    # run-04 (failed) is 50 h old, not 12 h: 12 h put it on the 1 h cutoff's calendar day from
    # 11:50 UTC on, and Flujo then listed it as failed within the last hour.
    ages_hours = [0.25, 1, 3, 7.5, 50, 20, 72, 100, 200, 300, 500, 800, 1000, 1500]
    statuses = ("running", "failed", "completed", "paused", "failed", "cancelled", "completed")
    pipelines = (("etl", "ETL"), ("train", "Model Training"), ("report", "Reports"))
    rows: dict[str, dict[str, Any]] = {}
    for i, age in enumerate(ages_hours):
        created = now - timedelta(hours=age)
        status = statuses[i % len(statuses)]
        pipeline_id, pipeline_name = pipelines[i % len(pipelines)]
        rows[f"run-{i:02d}"] = build_state(
            pipeline_id=pipeline_id,
            pipeline_name=pipeline_name,
            pipeline_version=f"2.{i % 3}",
            current_step_index=i % 6,
            status=status,
            created_at=created,
            updated_at=created + timedelta(minutes=10),
            pipeline_context={"batch": i, "note": "ünïcödé ✓", "ratio": i / 7},
            last_step_output=None if i % 4 == 0 else {"rows": i * 100},
            step_history=None if i % 5 == 0 else [{"step": "s", "ok": True}],
            total_steps=None if i % 6 == 0 else 6,
            error_message="upstream timeout" if status == "failed" else None,
            execution_time_ms=None if i % 3 == 0 else 1000 + 37 * i,
            memory_usage_mb=None if i % 4 == 1 else 20.5 + i,
        )
    return rows


# --------------------------------------------------------------------------------------------
# One state, four ways: written by Flujo or by us, read by Flujo or by us.


class Level(Enum):
    HIGH = "high"


@dataclass
class Coordinates:
    lat: float
    lon: float


class Customer(pydantic.BaseModel):
    name: str
    tier: int


def _states_for_cross_loading() -> dict[str, dict[str, Any]]:
    now = utc_now()
    plus_five = timezone(timedelta(hours=5, minutes=30))
    minimal = build_state()
    for key in (
        "last_step_output",
        "step_history",
        "total_steps",
        "error_message",
        "execution_time_ms",
        "memory_usage_mb",
    ):
        del minimal[key]
    return {
        "full": build_state(),
        "minimal-optional-keys": minimal,
        "whole-seconds": build_state(
            created_at=now.replace(microsecond=0), updated_at=now.replace(microsecond=0)
        ),
        "naive": build_state(
            created_at=datetime(2024, 1, 2, 3, 4, 5, 678901),
            updated_at=datetime(2024, 1, 2, 3, 4, 6),
        ),
        "other-offset": build_state(
            created_at=now.astimezone(plus_five), updated_at=now.astimezone(plus_five)
        ),
        "dates": build_state(created_at=date(2024, 5, 6), updated_at=date(2024, 5, 7)),
        "failed": build_state(
            status="failed", error_message="KeyError: 'x'\n  at step 3", current_step_index=3
        ),
        "rich-context": build_state(
            pipeline_context={
                "unicode": "é ü 😀 中文 \u2028",
                "nested": {"list": [1, 2.5, None, True, {"deep": ["x"]}], "empty": {}},
                "when": datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
                "day": date(2026, 1, 2),
                "nan": float("nan"),
                "inf": float("inf"),
                "bytes": b"\x00\xffabc",
                "set": {"b", "a", "c"},
                "tuple": (1, "two"),
                "enum": Level.HIGH,
                "dataclass": Coordinates(1.5, -2.25),
                "model": Customer(name="Acme", tier=2),
                "int_keys": {1: "one", 2: "two"},
                "odd_keys": {
                    None: 1,
                    True: 2,
                    False: 3,
                    float("nan"): 4,
                    float("-inf"): 5,
                    datetime(2026, 1, 2, tzinfo=UTC): 6,
                },
            },
            last_step_output=["a", {"b": [1, 2]}],
            step_history=[{"name": "extract", "output": {"rows": 3}}],
        ),
        "falsy-output": build_state(last_step_output=0, pipeline_context={}),
        "large": build_state(
            pipeline_context={"blob": "x" * 200_000, "keys": {str(i): i for i in range(500)}}
        ),
    }


async def test_states_read_the_same_whoever_wrote_or_reads_them(tmp_path: Path) -> None:
    assert_all_four_agree(await cross_load(tmp_path, _states_for_cross_loading()))


async def test_hostile_run_ids_cross_over(tmp_path: Path) -> None:
    states = {
        run_id: build_state(pipeline_context={"id": run_id})
        for run_id in ("", "a\x00b", "x" * 10_000, "'; DROP TABLE workflow_state; --", "😀")
    }
    assert_all_four_agree(await cross_load(tmp_path, states))


# --------------------------------------------------------------------------------------------
# A whole file written by one, read by the other.


LIST_WORKFLOWS_CALLS: tuple[dict[str, Any], ...] = (
    {},
    {"status": "failed"},
    {"status": "completed"},
    {"pipeline_id": "etl"},
    {"status": "failed", "pipeline_id": "train"},
    {"status": "", "pipeline_id": ""},
    {"limit": 5},
    {"limit": 5, "offset": 5},
    {"limit": 0},
    {"limit": 100, "offset": 3, "status": "completed"},
)
FAILED_WINDOWS_HOURS = (1, 24, 168, 24 * 365)


async def _admin_answers(side: Side, path: Path) -> dict[str, Any]:
    """Every read-only admin query, run by one backend on ``path``. (One side at a time: the
    two backends are never open at once in this process.)"""
    async with opened(side, path) as backend:
        return {
            "list_workflows": [await backend.list_workflows(**kw) for kw in LIST_WORKFLOWS_CALLS],
            "list_states": await backend.list_states(),
            "list_states_failed": await backend.list_states(status="failed"),
            "stats": await backend.get_workflow_stats(),
            "failed": [
                await backend.get_failed_workflows(hours_back=hours)
                for hours in FAILED_WINDOWS_HOURS
            ],
        }


async def _assert_admin_queries_agree(path: Path) -> None:
    """Runs every read-only admin query with both backends on ``path`` and compares."""
    flujo = await _admin_answers("flujo", path)
    ours = await _admin_answers("ours", path)
    for kwargs, flujo_items, our_items in zip(
        LIST_WORKFLOWS_CALLS, flujo["list_workflows"], ours["list_workflows"], strict=True
    ):
        assert_same_workflow_lists(flujo_items, our_items, kwargs)
    assert ours["list_states"] == flujo["list_states"]
    assert ours["list_states_failed"] == flujo["list_states_failed"]
    flujo_stats = flujo["stats"]
    our_stats = ours["stats"]
    assert set(flujo_stats) == WORKFLOW_STATS_KEYS_0435
    assert set(our_stats) == WORKFLOW_STATS_KEYS
    assert our_stats["background_status_counts"] == {}
    assert {k: our_stats[k] for k in WORKFLOW_STATS_KEYS_0435} == flujo_stats
    assert type(our_stats["average_execution_time_ms"]) is type(
        flujo_stats["average_execution_time_ms"]
    )
    for hours, flujo_items, our_items in zip(
        FAILED_WINDOWS_HOURS, flujo["failed"], ours["failed"], strict=True
    ):
        assert_same_workflow_lists(flujo_items, our_items, f"hours_back={hours}")


@pytest.mark.parametrize("writer", SIDES)
async def test_a_whole_file_reads_the_same_in_both(tmp_path: Path, writer: Side) -> None:
    path = tmp_path / "wf.db"
    rows = realistic_rows(utc_now())
    await save_all(writer, path, rows)

    flujo_loaded = await load_all("flujo", path, list(rows) + ["missing"])
    our_loaded = await load_all("ours", path, list(rows) + ["missing"])

    for run_id in flujo_loaded:
        assert_same_loaded_state(flujo_loaded[run_id], our_loaded[run_id], context=run_id)
    assert our_loaded["missing"] is None
    await _assert_admin_queries_agree(path)


@pytest.mark.parametrize("writer", SIDES)
async def test_cleanup_deletes_the_same_rows_in_both(tmp_path: Path, writer: Side) -> None:
    rows = realistic_rows(utc_now())
    await save_all(writer, tmp_path / "original.db", rows)
    shutil.copy(tmp_path / "original.db", tmp_path / "for_flujo.db")
    shutil.copy(tmp_path / "original.db", tmp_path / "for_ours.db")

    async with (
        opened("flujo", tmp_path / "for_flujo.db") as flujo,
        opened("ours", tmp_path / "for_ours.db") as ours,
    ):
        for days in (60, 30, 7):
            deleted_by_flujo = await flujo.cleanup_old_workflows(days_old=days)
            assert await ours.cleanup_old_workflows(days_old=days) == deleted_by_flujo
            assert deleted_by_flujo > 0
            assert_same_workflow_lists(await flujo.list_workflows(), await ours.list_workflows())


async def test_our_windows_are_exact_on_a_file_flujo_wrote(tmp_path: Path) -> None:
    """Flujo stores ``...T...+HH:MM`` text; our windows still compare instants exactly."""
    path = tmp_path / "wf.db"
    now = utc_now()
    minus_eight = timezone(timedelta(hours=-8))
    plus_ten = timezone(timedelta(hours=10))
    await save_all(
        "flujo",
        path,
        {
            "23h-utc": build_state(
                status="failed", created_at=now - 23 * HOUR, updated_at=now - 23 * HOUR
            ),
            "25h-utc": build_state(
                status="failed", created_at=now - 25 * HOUR, updated_at=now - 25 * HOUR
            ),
            "23h-west": build_state(
                status="failed",
                created_at=(now - 23 * HOUR).astimezone(minus_eight),
                updated_at=(now - 23 * HOUR).astimezone(minus_eight),
            ),
            "25h-east": build_state(
                status="failed",
                created_at=(now - 25 * HOUR).astimezone(plus_ten),
                updated_at=(now - 25 * HOUR).astimezone(plus_ten),
            ),
            "31d-naive-utc": build_state(
                created_at=(now - 31 * DAY).replace(tzinfo=None),
                updated_at=(now - 31 * DAY).replace(tzinfo=None),
            ),
            "29d-naive-utc": build_state(
                created_at=(now - 29 * DAY).replace(tzinfo=None),
                updated_at=(now - 29 * DAY).replace(tzinfo=None),
            ),
        },
    )
    stored = {r["run_id"]: r["created_at"] for r in raw_rows(path, "SELECT * FROM workflow_state")}
    assert "T" in stored["23h-west"] and stored["23h-west"].endswith("-08:00")

    async with opened("ours", path) as ours:
        stats = await ours.get_workflow_stats()
        failed = await ours.get_failed_workflows(hours_back=24)
        deleted = await ours.cleanup_old_workflows(days_old=30)
        remaining = {w["run_id"] for w in await ours.list_workflows()}

    # Flujo's text comparison also counts the 25-hour-old rows (and, in the east, more).
    assert stats["recent_workflows_24h"] == 2
    assert {w["run_id"] for w in failed} == {"23h-utc", "23h-west"}
    assert deleted == 1
    assert "31d-naive-utc" not in remaining and "29d-naive-utc" in remaining


# --------------------------------------------------------------------------------------------
# Taking turns on one file.


async def test_added_columns_are_logged_for_a_flujo_file_not_for_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def added() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.INFO and "added missing column" in r.getMessage()
        ]

    monkeypatch.setattr(our_backend_module, "_installed_flujo_layout", lambda: "flujo-0.4")
    with caplog.at_level(logging.INFO, logger="flujo_sqlite"):
        await save_all("ours", tmp_path / "new.db", {"r": build_state()})
        assert added() == []  # completing a table made just now is no news
        await save_all("flujo", tmp_path / "flujo.db", {"r": build_state()})
        await save_all("ours", tmp_path / "flujo.db", {"r2": build_state()})
        assert len(added()) == 5, added()  # the five background-task columns of Flujo 0.6.11


async def test_flujo_and_ours_take_turns_on_one_file(tmp_path: Path) -> None:
    """Each side opens, writes and closes in turn."""
    path = tmp_path / "shared.db"
    now = utc_now()
    async with opened("ours", path) as ours:
        await ours.save_state("a", build_state(current_step_index=1, created_at=now - 3 * HOUR))
        await ours.save_state("b", build_state(created_at=now - 2 * HOUR))

    async with opened("flujo", path) as flujo:
        assert (await flujo.load_state("a"))["current_step_index"] == 1
        await flujo.save_state(
            "a", build_state(current_step_index=2, status="paused", created_at=now - 3 * HOUR)
        )
        await flujo.save_state("c", build_state(status="failed", created_at=now - HOUR))
        await flujo.delete_state("b")

    async with opened("ours", path) as ours:
        after_flujo = await ours.load_state("a")
        assert after_flujo["current_step_index"] == 2 and after_flujo["status"] == "paused"
        assert await ours.load_state("b") is None
        assert (await ours.load_state("c"))["status"] == "failed"
        await ours.save_state("d", build_state(status="completed", created_at=now))
        await ours.delete_state("c")

    async with opened("flujo", path) as flujo:
        assert (await flujo.load_state("d"))["status"] == "completed"
        assert await flujo.load_state("c") is None
        flujo_list = await flujo.list_workflows()
        flujo_states = {r: await flujo.load_state(r) for r in ("a", "d")}
    async with opened("ours", path) as ours:
        our_list = await ours.list_workflows()
        for run_id, flujo_state in flujo_states.items():
            assert_same_loaded_state(flujo_state, await ours.load_state(run_id), context=run_id)

    # The file mixes Flujo's "YYYY-MM-DDTHH:MM:SS+00:00" ("a", last saved by Flujo) with our
    # "YYYY-MM-DD HH:MM:SS+00:00" ("d"): ours orders by the instant, newest first, although on
    # one calendar day "T" sorts after " " as text.
    assert {w["run_id"] for w in our_list} == {"a", "d"}
    assert_same_workflow_items_in_text_order(flujo_list, our_list)
    assert sibling_names(path) == {"shared.db"}


_FLUJO_CHILD = """
import asyncio, pickle, sys
from flujo.state.backends.sqlite import SQLiteBackend

async def main(path, calls):
    backend = SQLiteBackend(path)
    try:
        return [await getattr(backend, name)(*args) for name, args in calls]
    finally:
        await backend.close()

with open(sys.argv[2], "rb") as f:
    calls = pickle.load(f)
results = asyncio.run(main(sys.argv[1], calls))
with open(sys.argv[3], "wb") as f:
    pickle.dump(results, f)
"""


async def flujo_in_another_process(path: Path, calls: list[tuple[str, tuple[Any, ...]]]) -> list:
    """Runs ``calls`` (method name, arguments) in order on one Flujo backend in a child process
    with this interpreter, and returns their results. Flujo's backend goes through the stdlib
    sqlite3 module; from another process that is the supported way to share an open file."""
    exchange = path.parent / f".flujo-child-{id(calls)}"
    exchange.with_suffix(".in").write_bytes(pickle.dumps(calls))
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-c",
            _FLUJO_CHILD,
            str(path),
            str(exchange.with_suffix(".in")),
            str(exchange.with_suffix(".out")),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    results = pickle.loads(exchange.with_suffix(".out").read_bytes())
    exchange.with_suffix(".in").unlink()
    exchange.with_suffix(".out").unlink()
    return results


async def test_flujo_in_another_process_writes_while_our_backend_stays_open(
    tmp_path: Path,
) -> None:
    """The migration scenario: one part of an application still uses Flujo's backend while
    another already uses ours, on the same file, ours staying open throughout. Flujo's backend
    runs in another process (the supported way: in one process, the stdlib's copy of SQLite
    closing its connections can delete our WAL, a documented limitation). We see the other
    writer's rows, and it sees every save of ours that was acknowledged."""
    path = tmp_path / "shared.db"
    now = utc_now()
    async with opened("ours", path) as ours:
        await ours.save_state("a", build_state(current_step_index=1, created_at=now - 3 * HOUR))
        await ours.save_state("b", build_state(created_at=now - 2 * HOUR))

        flujo_a, *_ = await flujo_in_another_process(
            path,
            [
                ("load_state", ("a",)),
                (
                    "save_state",
                    (
                        "a",
                        build_state(
                            current_step_index=2, status="paused", created_at=now - 3 * HOUR
                        ),
                    ),
                ),
                ("save_state", ("c", build_state(status="failed", created_at=now - HOUR))),
                ("delete_state", ("b",)),
            ],
        )
        assert flujo_a["current_step_index"] == 1

        after_flujo = await ours.load_state("a")
        assert after_flujo["current_step_index"] == 2 and after_flujo["status"] == "paused"
        assert await ours.load_state("b") is None
        assert (await ours.load_state("c"))["status"] == "failed"

        await ours.save_state("d", build_state(status="completed", created_at=now))
        await ours.delete_state("c")

        flujo_d, flujo_c, flujo_list = await flujo_in_another_process(
            path, [("load_state", ("d",)), ("load_state", ("c",)), ("list_workflows", ())]
        )
        assert flujo_d["status"] == "completed"
        assert flujo_c is None
        assert_same_workflow_items_in_text_order(flujo_list, await ours.list_workflows())

        e_state = build_state(created_at=now + timedelta(seconds=1), pipeline_context={"e": 5})
        await ours.save_state("e", e_state)
        (flujo_e,) = await flujo_in_another_process(path, [("load_state", ("e",))])
        assert flujo_e["pipeline_context"] == {"e": 5}
        assert flujo_e["created_at"] == e_state["created_at"]
        # Still fully usable after the other process's connections came and went.
        assert sorted(w["run_id"] for w in await ours.list_workflows()) == ["a", "d", "e"]

    async with opened("flujo", path) as flujo:
        assert sorted(w["run_id"] for w in await flujo.list_workflows()) == ["a", "d", "e"]
    assert raw_rows(path, "PRAGMA integrity_check")[0][0] == "ok"


# --------------------------------------------------------------------------------------------
# Schema of a fresh file.


def _schema(path: Path) -> dict[str, Any]:
    conn = sqlite3.connect(path)
    try:
        tables = {}
        for table in TABLES:
            (sql,) = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            checks = re.findall(r"CHECK\s*\(((?:[^()]|\([^()]*\))*)\)", sql)
            tables[table] = {
                "columns": conn.execute(f"PRAGMA table_info({table})").fetchall(),
                "foreign_keys": sorted(
                    conn.execute(f"PRAGMA foreign_key_list({table})").fetchall()
                ),
                "checks": [" ".join(c.split()) for c in checks],
            }
        indexes = {
            name: (
                tbl,
                " ".join(sql.split()),
                conn.execute(f"PRAGMA index_xinfo({name})").fetchall(),
            )
            for name, tbl, sql in conn.execute(
                "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
            )
        }
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        all_tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    finally:
        conn.close()
    return {
        "tables": tables,
        "indexes": indexes,
        "journal_mode": journal_mode,
        "all_tables": all_tables,
    }


def assert_keeps_flujo_schema(flujo: dict[str, Any], ours: dict[str, Any]) -> None:
    """``ours`` holds every table, column (same position, type, NOT NULL, default and key),
    foreign key, CHECK and index of Flujo's layout ``flujo``, unchanged, and is in WAL mode. It
    may hold more: it must hold Flujo 0.6.11's five background columns on workflow_state (after
    Flujo's own) and its system_state, traces and evaluations tables."""
    for table, definition in flujo["tables"].items():
        flujo_columns = definition["columns"]
        our_columns = ours["tables"][table]["columns"]
        assert our_columns[: len(flujo_columns)] == flujo_columns, table
        assert ours["tables"][table]["foreign_keys"] == definition["foreign_keys"], table
        assert ours["tables"][table]["checks"] == definition["checks"], table
        if table == "workflow_state":
            added = {column[1] for column in our_columns[len(flujo_columns) :]}
            assert BACKGROUND_KEYS <= added, added
    for name, definition in flujo["indexes"].items():
        assert ours["indexes"].get(name) == definition, name
    assert set(TABLES_06) <= ours["all_tables"]
    assert ours["journal_mode"] == "wal"


def _flujo_rows(path: Path, flujo: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of Flujo's tables, as Flujo's columns (schema ``flujo``) hold them."""
    conn = sqlite3.connect(path)
    try:
        rows = {}
        for table, definition in flujo["tables"].items():
            columns = ", ".join(f'"{column[1]}"' for column in definition["columns"])
            rows[table] = conn.execute(f"SELECT {columns} FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()
    return rows


async def test_fresh_file_has_flujos_schema(tmp_path: Path) -> None:
    for side in SIDES:
        await save_all(side, tmp_path / f"{side}.db", {"r": build_state()})
    flujo = _schema(tmp_path / "flujo.db")
    ours = _schema(tmp_path / "ours.db")

    assert_keeps_flujo_schema(flujo, ours)
    assert flujo["tables"]["workflow_state"]["checks"] == [
        "status IN ('running', 'paused', 'completed', 'failed', 'cancelled')"
    ]
    # Every index Flujo creates exists in ours, identically; extra ones of ours are allowed.
    for name, definition in flujo["indexes"].items():
        assert ours["indexes"].get(name) == definition, name
    for documented in (
        "idx_workflow_state_status",
        "idx_workflow_state_created_at",
        "idx_workflow_state_pipeline_id",
    ):
        assert documented in ours["indexes"]
    assert ours["journal_mode"] == flujo["journal_mode"] == "wal"
    # The CHECK is enforced on our file too, for anyone writing it directly.
    conn = sqlite3.connect(tmp_path / "ours.db")
    try:
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            conn.execute("UPDATE workflow_state SET status = 'bogus' WHERE run_id = 'r'")
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# Legacy layouts (spec 5.1).

LEGACY_WITHOUT_NAME = """
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
INSERT INTO workflow_state VALUES
    ('legacy-1', 'old_pipeline', '0.3', 4, '{"customer": "acme", "n": [1, 2, 3]}',
     '{"ok": true}', 'paused', '2025-02-03T04:05:06.789000', '2025-02-03T04:15:00'),
    ('legacy-2', 'other_pipeline', '0.3', 0, '{}', NULL, 'failed',
     '2025-02-04T00:00:00+00:00', '2025-02-04T01:00:00+00:00');
"""

LEGACY_ID_ONLY = """
CREATE TABLE workflow_state (run_id TEXT PRIMARY KEY, pipeline_id TEXT);
INSERT INTO workflow_state VALUES ('legacy-1', 'old_pipeline'), ('legacy-2', 'other_pipeline');
"""


def _write_legacy(path: Path, script: str) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(script)
        conn.commit()
    finally:
        conn.close()


def _assert_migrated_in_place(path: Path, inode: int) -> None:
    assert path.stat().st_ino == inode
    assert sibling_names(path) == {path.name}
    columns = {r["name"] for r in raw_rows(path, "PRAGMA table_info(workflow_state)")}
    assert LOAD_STATE_KEYS <= columns


async def test_legacy_layout_without_pipeline_name_is_migrated_in_place(tmp_path: Path) -> None:
    ours_path = tmp_path / "ours" / "legacy.db"
    flujo_path = tmp_path / "flujo" / "legacy.db"
    for path in (ours_path, flujo_path):
        path.parent.mkdir()
        _write_legacy(path, LEGACY_WITHOUT_NAME)
    inode = ours_path.stat().st_ino

    ours_loaded = await load_all("ours", ours_path, ["legacy-1", "legacy-2"])
    # Flujo migrates this layout in place too: both must give the same answers.
    flujo_loaded = await load_all("flujo", flujo_path, ["legacy-1", "legacy-2"])

    _assert_migrated_in_place(ours_path, inode)
    for run_id in ("legacy-1", "legacy-2"):
        assert_same_loaded_state(flujo_loaded[run_id], ours_loaded[run_id], context=run_id)
    first = ours_loaded["legacy-1"]
    assert first["pipeline_name"] == "old_pipeline"
    assert first["pipeline_context"] == {"customer": "acme", "n": [1, 2, 3]}
    assert first["last_step_output"] == {"ok": True}
    assert first["step_history"] == []
    assert first["created_at"] == datetime(2025, 2, 3, 4, 5, 6, 789000)
    assert first["total_steps"] == 0

    # Flujo reads the file we migrated, and new writes from both sides coexist with old rows.
    async with opened("ours", ours_path) as ours:
        await ours.save_state("new-ours", build_state())
    async with opened("flujo", ours_path) as flujo:
        await flujo.save_state("new-flujo", build_state(status="completed"))
        from_flujo = {r: await flujo.load_state(r) for r in ("legacy-1", "legacy-2", "new-ours")}
    async with opened("ours", ours_path) as ours:
        for run_id, state in from_flujo.items():
            assert_same_loaded_state(state, await ours.load_state(run_id), context=run_id)
        assert len(await ours.list_workflows()) == 4
    _assert_migrated_in_place(ours_path, inode)


async def test_legacy_layout_with_only_run_id_and_pipeline_id_keeps_its_rows(
    tmp_path: Path,
) -> None:
    path = tmp_path / "legacy.db"
    _write_legacy(path, LEGACY_ID_ONLY)
    inode = path.stat().st_ino

    async with opened("ours", path) as ours:
        legacy = await ours.load_state("legacy-1")
        listed = await ours.list_workflows()
        await ours.save_state("new", build_state())
        new = await ours.load_state("new")

    _assert_migrated_in_place(path, inode)
    assert legacy is not None
    assert legacy["run_id"] == "legacy-1"
    assert legacy["pipeline_id"] == "old_pipeline"
    assert legacy["status"] in {"running", "paused", "completed", "failed", "cancelled"}
    assert isinstance(legacy["created_at"], datetime)
    assert isinstance(legacy["pipeline_context"], dict)
    assert sorted(w["run_id"] for w in listed) == ["legacy-1", "legacy-2"]
    assert new is not None and new["status"] == "running"

    # Flujo 0.4.35 now opens the file without moving it aside, and sees the same rows.
    async with opened("flujo", path) as flujo:
        from_flujo = {r: await flujo.load_state(r) for r in ("legacy-1", "legacy-2", "new")}
    _assert_migrated_in_place(path, inode)
    async with opened("ours", path) as ours:
        for run_id, state in from_flujo.items():
            assert state is not None, run_id
            assert_same_loaded_state(state, await ours.load_state(run_id), context=run_id)


async def test_flujo_file_stays_usable_by_flujo_after_we_open_it(tmp_path: Path) -> None:
    """We may add what we need to a Flujo file (0.6.11's background columns and tables), but
    never take anything away: every column, constraint and index Flujo created stays as it was,
    Flujo's rows are unchanged, and Flujo keeps using the file."""
    path = tmp_path / "wf.db"
    await save_all(
        "flujo",
        path,
        {
            "r": build_state(),
            "naive": build_state(
                status="failed",
                created_at=datetime(2024, 1, 2, 3, 4, 5),
                updated_at=datetime(2024, 1, 2, 3, 4, 6, 7),
                error_message="boom",
            ),
        },
    )
    before = _schema(path)
    rows_before = _flujo_rows(path, before)

    async with opened("ours", path) as ours:
        assert (await ours.load_state("r")) is not None
        assert len(await ours.list_workflows()) == 2

    after = _schema(path)
    assert_keeps_flujo_schema(before, after)
    assert _flujo_rows(path, before) == rows_before
    assert sibling_names(path) == {"wf.db"}

    async with opened("ours", path) as ours:
        await ours.save_state("ours", build_state(status="completed"))
    assert _schema(path) == after
    rows_after_write = _flujo_rows(path, before)
    assert [r for r in rows_after_write["workflow_state"] if r[0] != "ours"] == rows_before[
        "workflow_state"
    ]
    assert sibling_names(path) == {"wf.db"}
    async with opened("flujo", path) as flujo:
        await flujo.save_state("flujo-again", build_state(status="paused"))
        assert (await flujo.load_state("ours"))["status"] == "completed"
        assert (await flujo.load_state("naive"))["created_at"] == datetime(2024, 1, 2, 3, 4, 5)
        assert len(await flujo.list_workflows()) == 4
    assert sibling_names(path) == {"wf.db"}
