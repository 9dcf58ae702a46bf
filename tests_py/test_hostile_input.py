"""Hostile input: every call either round-trips exactly or fails with a clear exception.

A "clear exception" is a :class:`FlujoSQLiteError` that is also the stdlib class a caller would
catch (``ValueError`` for a bad value, ``TypeError`` for a bad type), with a message of
reasonable length. Nothing may crash the interpreter, and no case may change a row that was
already stored: each test saves a sentinel run first and checks, through the API and then
byte for byte in the file, that it is unchanged afterwards (see the ``hostile`` fixture).

Flujo's own backend validates nothing (spec 6.4): ``None`` run ids become NULL keys, and
unserializable values turn into placeholder strings or raw ``TypeError``s.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from conftest import REQUIRED_KEYS, same
from flujo_sqlite import SQLiteBackend
from flujo_sqlite.errors import FlujoSQLiteError

PROGRAMS = Path(__file__).parent / "programs"

SENTINEL = "sentinel"
#: Clear messages name the problem; they do not echo a 1 MB argument back.
MAX_MESSAGE = 2_000


def base_state(**overrides: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    state: dict[str, Any] = {
        "pipeline_id": "hostile",
        "pipeline_name": "Hostile input",
        "pipeline_version": "1.0",
        "current_step_index": 1,
        "pipeline_context": {"k": "v"},
        "last_step_output": {"out": 1},
        "step_history": [{"step": 0}],
        "status": "running",
        "created_at": now - timedelta(minutes=1),
        "updated_at": now,
        "total_steps": 3,
        "error_message": None,
        "execution_time_ms": 12,
        "memory_usage_mb": 1.5,
    }
    state.update(overrides)
    return state


SENTINEL_STATE = base_state(
    pipeline_id="sentinel-pipeline",
    pipeline_name="Sentinel",
    status="failed",
    pipeline_context={"precious": ["data", 1, 2.5, None, True], "nested": {"a": {"b": "c"}}},
    created_at=datetime.now(UTC) - timedelta(hours=1),
    error_message="kept",
)


def raw_row(path: Path, run_id: str) -> tuple[Any, ...] | None:
    conn = sqlite3.connect(str(path))
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return conn.execute("SELECT * FROM workflow_state WHERE run_id = ?", (run_id,)).fetchone()
    finally:
        conn.close()


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    """A backend whose file holds a sentinel run; afterwards the sentinel must be unchanged,
    through the API and byte for byte in the file, and the backend must still work."""
    db_path = tmp_path / "hostile.db"
    async with SQLiteBackend(db_path) as seeding:
        await seeding.save_state(SENTINEL, SENTINEL_STATE)
        loaded_before = await seeding.load_state(SENTINEL)
    row_before = raw_row(db_path, SENTINEL)  # no backend of ours has the file open here
    assert row_before is not None
    backend = SQLiteBackend(db_path)
    try:
        yield backend
        assert await backend.load_state(SENTINEL) == loaded_before
        await backend.save_state("after-case", base_state())
        assert (await backend.load_state("after-case")) is not None
    finally:
        await backend.close()
    assert raw_row(db_path, SENTINEL) == row_before


async def round_trip(
    backend: SQLiteBackend, run_id: str, state: dict[str, Any], **expected: Any
) -> None:
    """Saves ``state`` and checks the loaded fields; ``expected`` overrides what should come
    back where the stored form differs from the saved one (e.g. JSON's string keys)."""
    await backend.save_state(run_id, state)
    loaded = await backend.load_state(run_id)
    assert loaded is not None, f"{run_id!r} did not load"
    assert same(loaded["run_id"], run_id)
    want = {**state, **expected}
    for key in ("pipeline_context", "last_step_output", "step_history"):
        assert same(loaded[key], want[key]), f"{key}: {loaded[key]!r:.300} != {want[key]!r:.300}"
    for key in (
        "pipeline_id",
        "pipeline_name",
        "status",
        "error_message",
        "current_step_index",
        "total_steps",
    ):
        assert same(loaded[key], want[key]), key
    assert loaded["pipeline_version"] == str(want["pipeline_version"])
    assert loaded["created_at"] == want["created_at"] and loaded["updated_at"] == want["updated_at"]
    assert isinstance(loaded["created_at"], datetime)


async def clear_error(
    call: Callable[[], Awaitable[Any]],
    *stdlib: type[BaseException],
    within: type[FlujoSQLiteError] = FlujoSQLiteError,
) -> FlujoSQLiteError:
    """Awaits ``call()`` and checks it raised a clear exception: a ``within`` (by default any
    FlujoSQLiteError) that is also one of ``stdlib``, with a message of reasonable length."""
    raised: BaseException | None = None
    try:
        result = await asyncio.wait_for(call(), 60)
    except BaseException as error:  # noqa: BLE001 - judged below, outside the handler
        raised = error
    # Judged outside the except block so a failure does not chain a 20 MB message.
    if raised is None:
        raise AssertionError(f"no exception; returned {result!r:.300}")
    message = str(raised)
    described = f"{type(raised).__mro__}: {message[:300]!r} ({len(message)} characters)"
    assert isinstance(raised, FlujoSQLiteError), f"not a FlujoSQLiteError: {described}"
    assert isinstance(raised, within), f"not a {within.__name__}: {described}"
    assert isinstance(raised, stdlib), f"none of {stdlib}: {described}"
    assert 0 < len(message) <= MAX_MESSAGE, f"message too long: {described}"
    return raised


async def result_or_clear_error(
    call: Callable[[], Awaitable[Any]], check: Callable[[Any], bool], *stdlib: type[BaseException]
) -> None:
    """For arguments Flujo accepted with a meaning (``limit=-1`` is "no limit"): either that
    meaning (``check(result)``) or a clear exception."""
    raised: BaseException | None = None
    try:
        result = await asyncio.wait_for(call(), 60)
    except BaseException as error:  # noqa: BLE001 - judged below, outside the handler
        raised = error
    if raised is None:
        assert check(result), f"unexpected result {result!r:.500}"
        return
    message = str(raised)
    described = f"{type(raised).__mro__}: {message[:300]!r} ({len(message)} characters)"
    assert isinstance(raised, FlujoSQLiteError), f"not a FlujoSQLiteError: {described}"
    assert isinstance(raised, stdlib), f"none of {stdlib}: {described}"
    assert 0 < len(message) <= MAX_MESSAGE, f"message too long: {described}"


# --------------------------------------------------------------------------------------------
# Hostile objects
# --------------------------------------------------------------------------------------------


class RaisingEq:
    def __eq__(self, other: object) -> bool:
        raise RuntimeError("__eq__ exploded")

    __hash__ = object.__hash__


class RaisingHash:
    def __hash__(self) -> int:
        raise RuntimeError("__hash__ exploded")


class RaisingModelDump:
    def model_dump(self, *args: Any, **kwargs: Any) -> Any:
        raise ValueError("model_dump exploded")


class RaisingRepr:
    def __repr__(self) -> str:
        raise RuntimeError("__repr__ exploded")

    __str__ = __repr__


class Plain:
    pass


def cycle_list() -> list[Any]:
    value: list[Any] = [1]
    value.append(value)
    return value


def cycle_dict() -> dict[str, Any]:
    value: dict[str, Any] = {"a": 1}
    value["self"] = {"inner": value}
    return value


def nested(depth: int) -> Any:
    value: Any = {"leaf": True}
    for level in range(depth):
        value = {f"l{level}": value} if level % 2 else [value]
    return value


INJECTIONS = (
    "'; DROP TABLE workflow_state; --",
    "x' OR '1'='1",
    '" OR 1=1 --',
    "1; DELETE FROM workflow_state WHERE 1=1",
    "') UNION SELECT run_id, status, created_at, updated_at FROM workflow_state --",
    "%",
    "_",
    "*",
    "\\",
    "?",
    ":run_id",
    "$1",
    "NULL",
)

LATIN1 = "".join(chr(i) for i in range(1, 256))
BIG = 20 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[SQLiteBackend], Awaitable[None]]


CASES: list[Case] = []


def case(
    name: str,
) -> Callable[
    [Callable[[SQLiteBackend], Awaitable[None]]], Callable[[SQLiteBackend], Awaitable[None]]
]:
    def register(
        function: Callable[[SQLiteBackend], Awaitable[None]],
    ) -> Callable[[SQLiteBackend], Awaitable[None]]:
        CASES.append(Case(name, function))
        return function

    return register


# --- size ----------------------------------------------------------------------------------


@case("20 MB string in pipeline_context")
async def _(b: SQLiteBackend) -> None:
    text = ("0123456789abcdef\u00e9\U0001f600" * (BIG // 18 + 1))[:BIG]
    await round_trip(b, "big-string", base_state(pipeline_context={"text": text}))


@case("20 MB state spread over context, output and history")
async def _(b: SQLiteBackend) -> None:
    chunk = "x" * 1000
    state = base_state(
        pipeline_context={f"key{i}": [chunk, i] for i in range(10_000)},
        last_step_output=[chunk] * 5_000,
        step_history=[{"step": i, "data": chunk} for i in range(5_000)],
    )
    await round_trip(b, "big-state", state)


@case("1 MB run_id")
async def _(b: SQLiteBackend) -> None:
    await round_trip(b, "r" * 1_000_000, base_state())


@case("empty run_id")
async def _(b: SQLiteBackend) -> None:
    await round_trip(b, "", base_state())


@case("70 levels of nesting (Flujo 0.4.35 keeps them)")
async def _(b: SQLiteBackend) -> None:
    await round_trip(b, "nested-70", base_state(pipeline_context=nested(70)))


# --- NUL, surrogates, unusual text -----------------------------------------------------------


@case("NUL in context keys and values")
async def _(b: SQLiteBackend) -> None:
    await round_trip(
        b, "nul-context", base_state(pipeline_context={"a\x00b": "c\x00d", "\x00": ["\x00\x00"]})
    )


@case("NUL in run_id")
async def _(b: SQLiteBackend) -> None:
    run_id = "run\x00id\x00"
    await round_trip(b, run_id, base_state())
    assert await b.load_state("run") is None, "the run id was cut at the NUL"
    assert run_id in [item["run_id"] for item in await b.list_workflows()]


@case("NUL in text fields")
async def _(b: SQLiteBackend) -> None:
    state = base_state(
        pipeline_id="p\x00id",
        pipeline_name="n\x00ame",
        pipeline_version="1\x002",
        error_message="e\x00",
    )
    await round_trip(b, "nul-fields", state)
    listed = await b.list_workflows(pipeline_id="p\x00id")
    assert [item["run_id"] for item in listed] == ["nul-fields"]
    assert await b.list_workflows(pipeline_id="p") == []


@case("lone surrogate in a context value")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("s", base_state(pipeline_context={"k": "a\ud800b"})),
        ValueError,
        TypeError,
    )
    assert await b.load_state("s") is None


@case("lone surrogate in a context key")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("s", base_state(pipeline_context={"\udfff": 1})), ValueError, TypeError
    )


@case("lone surrogate in step_history")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("s", base_state(step_history=["\ud83d"])), ValueError, TypeError
    )


@case("lone surrogate in run_id, for every method")
async def _(b: SQLiteBackend) -> None:
    await clear_error(lambda: b.save_state("r\ud800", base_state()), ValueError)
    await clear_error(lambda: b.load_state("r\ud800"), ValueError)
    await clear_error(lambda: b.delete_state("r\ud800"), ValueError)


@case("lone surrogate in pipeline_name and in a filter")
async def _(b: SQLiteBackend) -> None:
    await clear_error(lambda: b.save_state("s", base_state(pipeline_name="\udc80")), ValueError)
    await clear_error(lambda: b.list_workflows(pipeline_id="\udc80"), ValueError)


@case("every Latin-1 character, emoji, RTL and combining text, 1000-character keys")
async def _(b: SQLiteBackend) -> None:
    context = {
        LATIN1: LATIN1,
        "k" * 1000: "\U0001f600\u200f\u05e9\u05dc\u05d5\u05dd e\u0301 \u2028\u2029\ufeff",
        "\U0010ffff": "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    }
    await round_trip(
        b, "unicode \U0001f600 \u05e9", base_state(pipeline_context=context, pipeline_name=LATIN1)
    )


# --- keys, cycles, special numbers -----------------------------------------------------------


@case("int, None, bool and float keys are stored as Flujo stores them: str() of the key")
async def _(b: SQLiteBackend) -> None:
    context = {1: "int", None: "none", False: "bool", 2.5: "float", "s": {3: [4]}}
    expected = {"1": "int", "None": "none", "False": "bool", "2.5": "float", "s": {"3": [4]}}
    await round_trip(b, "keys", base_state(pipeline_context=context), pipeline_context=expected)


@case("tuple key")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("t", base_state(pipeline_context={(1, 2): "x"})), TypeError
    )
    assert await b.load_state("t") is None


@case("object key")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("t", base_state(pipeline_context={Plain(): "x"})), TypeError
    )


@case("list containing itself")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("c", base_state(pipeline_context={"c": cycle_list()})),
        ValueError,
        TypeError,
    )
    assert await b.load_state("c") is None


@case("dict containing itself, in last_step_output")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("c", base_state(last_step_output=cycle_dict())), ValueError, TypeError
    )


@case("cycle in step_history")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("c", base_state(step_history=cycle_list())), ValueError, TypeError
    )


@case("the same object twice is not a cycle")
async def _(b: SQLiteBackend) -> None:
    shared = {"x": [1, 2]}
    await round_trip(
        b,
        "shared",
        base_state(pipeline_context={"a": shared, "b": shared}),
        pipeline_context={"a": {"x": [1, 2]}, "b": {"x": [1, 2]}},
    )


@case("NaN and infinities in the context become strings, as in Flujo")
async def _(b: SQLiteBackend) -> None:
    context = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "list": [math.nan, 1.5]}
    expected = {"nan": "nan", "inf": "inf", "ninf": "-inf", "list": ["nan", 1.5]}
    await round_trip(b, "nan", base_state(pipeline_context=context), pipeline_context=expected)


@case("NaN and infinity in memory_usage_mb")
async def _(b: SQLiteBackend) -> None:
    for value in (math.nan, math.inf, -math.inf):
        await clear_error(
            lambda value=value: b.save_state("m", base_state(memory_usage_mb=value)), ValueError
        )
    assert await b.load_state("m") is None


@case("2**200 in the context round-trips exactly")
async def _(b: SQLiteBackend) -> None:
    context = {"big": 2**200, "neg": -(2**200), "edge": [2**63, 2**64, -(2**63) - 1]}
    await round_trip(b, "bigint", base_state(pipeline_context=context))


@case("2**200 in integer columns")
async def _(b: SQLiteBackend) -> None:
    for key in ("current_step_index", "total_steps", "execution_time_ms"):
        await clear_error(
            lambda key=key: b.save_state("i", base_state(**{key: 2**200})), ValueError
        )


@case("-0.0, tiny and huge floats")
async def _(b: SQLiteBackend) -> None:
    context = {"z": -0.0, "tiny": 5e-324, "huge": 1.7976931348623157e308, "third": 1 / 3, "e": 1e-7}
    await round_trip(b, "floats", base_state(pipeline_context=context))


# --- objects that misbehave ------------------------------------------------------------------


@case("object whose __eq__ raises")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("o", base_state(pipeline_context={"o": RaisingEq()})), TypeError
    )


@case("object whose __hash__ raises, as a key")
async def _(b: SQLiteBackend) -> None:
    context: dict[Any, Any] = {}
    with pytest.raises(RuntimeError):
        context[RaisingHash()] = 1  # cannot even be a key: the case is the value instead
    await clear_error(
        lambda: b.save_state("o", base_state(pipeline_context=[RaisingHash()])), TypeError
    )


@case("object whose model_dump raises")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("o", base_state(pipeline_context={"m": RaisingModelDump()})),
        ValueError,
        TypeError,
    )


@case("object whose __repr__ raises, in the context and as run_id")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("o", base_state(pipeline_context={"r": RaisingRepr()})), TypeError
    )
    await clear_error(lambda: b.save_state(RaisingRepr(), base_state()), TypeError)  # type: ignore[arg-type]


@case("dict subclasses come back as plain dicts")
async def _(b: SQLiteBackend) -> None:
    context = collections.OrderedDict(b=1, a=2)
    counts = collections.defaultdict(list, {"x": [1]})
    await round_trip(
        b,
        "subclasses",
        base_state(pipeline_context=context, last_step_output=counts),
        pipeline_context={"b": 1, "a": 2},
        last_step_output={"x": [1]},
    )


@case("tuples become lists")
async def _(b: SQLiteBackend) -> None:
    await round_trip(
        b,
        "tuples",
        base_state(pipeline_context={"t": (1, (2, 3))}),
        pipeline_context={"t": [1, [2, 3]]},
    )


# --- SQL injection ---------------------------------------------------------------------------


@case("SQL injection in run_id")
async def _(b: SQLiteBackend) -> None:
    for text in INJECTIONS:
        await round_trip(b, text, base_state())
    listed = {item["run_id"] for item in await b.list_workflows()}
    assert set(INJECTIONS) <= listed
    for text in INJECTIONS:
        await b.delete_state(text)
        assert await b.load_state(text) is None


@case("SQL injection in every text field of the state")
async def _(b: SQLiteBackend) -> None:
    for index, text in enumerate(INJECTIONS):
        state = base_state(
            pipeline_id=text,
            pipeline_name=text,
            pipeline_version=text,
            error_message=text,
            pipeline_context={text: text},
        )
        await round_trip(b, f"inj-{index}", state)


@case("SQL injection in the status and pipeline_id filters")
async def _(b: SQLiteBackend) -> None:
    for text in INJECTIONS:
        assert await b.list_states(status=text) == []
        assert await b.list_workflows(status=text) == []
        assert await b.list_workflows(pipeline_id=text) == []
        assert await b.list_workflows(status="failed", pipeline_id=text, limit=5) == []
    assert [item["run_id"] for item in await b.list_workflows(pipeline_id="sentinel-pipeline")] == [
        SENTINEL
    ]


@case("SQL injection as status in a state")
async def _(b: SQLiteBackend) -> None:
    await clear_error(
        lambda: b.save_state("s", base_state(status="running' OR '1'='1")), ValueError
    )


# --- wrong types -----------------------------------------------------------------------------


@case("run_id None, int, float, bytes, list for save, load and delete")
async def _(b: SQLiteBackend) -> None:
    for run_id in (None, 5, 1.5, b"run", ["run"], ("run",)):
        await clear_error(lambda run_id=run_id: b.save_state(run_id, base_state()), TypeError)  # type: ignore[arg-type]
        await clear_error(lambda run_id=run_id: b.load_state(run_id), TypeError)  # type: ignore[arg-type]
        await clear_error(lambda run_id=run_id: b.delete_state(run_id), TypeError)  # type: ignore[arg-type]


@case("1 MB bytes as run_id: the message does not echo it")
async def _(b: SQLiteBackend) -> None:
    await clear_error(lambda: b.save_state(b"x" * 1_000_000, base_state()), TypeError)  # type: ignore[arg-type]


@case("state that is a list, None, a string or a mapping proxy")
async def _(b: SQLiteBackend) -> None:
    import types

    for state in ([("pipeline_id", "p")], None, "state", 5, types.MappingProxyType(base_state())):
        await clear_error(lambda state=state: b.save_state("w", state), TypeError)  # type: ignore[arg-type]
    assert await b.load_state("w") is None


@case("missing required keys")
async def _(b: SQLiteBackend) -> None:
    for key in REQUIRED_KEYS:
        state = base_state()
        del state[key]
        error = await clear_error(lambda state=state: b.save_state("w", state), ValueError)
        assert key in str(error)


@case("unknown status")
async def _(b: SQLiteBackend) -> None:
    for status in ("RUNNING", "done", "", " running"):
        await clear_error(
            lambda status=status: b.save_state("w", base_state(status=status)), ValueError
        )


@case("wrong types in state fields")
async def _(b: SQLiteBackend) -> None:
    bad = {
        "pipeline_id": [None, 5, b"p"],
        "pipeline_name": [None, 5],
        "pipeline_version": [None, 1.5, b"1"],
        "current_step_index": ["3", 1.5, True, None],
        "status": [None, 1, b"running"],
        "created_at": [1700000000, None, b"2024-01-01"],
        "updated_at": [1.5, None],
        "total_steps": ["5", 2.5],
        "error_message": [5, b"e"],
        "execution_time_ms": [1.5, "12"],
        "memory_usage_mb": ["45", b"1"],
    }
    for key, values in bad.items():
        for value in values:
            try:
                error = await clear_error(
                    lambda key=key, value=value: b.save_state("w", base_state(**{key: value})),
                    TypeError,
                )
            except AssertionError as failure:
                raise AssertionError(f"state[{key!r}] = {value!r}: {failure}") from None
            assert key in str(error), str(error)
    for key in ("created_at", "updated_at"):  # text is read as ISO 8601, as Flujo 0.6.11 stores it
        for text in (
            "yesterday",
            "",
            "2024-13-01",
            "2024-01-01T00:00:00'; DROP TABLE workflow_state; --",
        ):
            error = await clear_error(
                lambda key=key, text=text: b.save_state("w", base_state(**{key: text})), ValueError
            )
            assert key in str(error), str(error)
    assert await b.load_state("w") is None


@case("created_at that cannot be expressed in UTC")
async def _(b: SQLiteBackend) -> None:
    edge = datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14)))
    state = base_state(created_at=edge, updated_at=edge)
    try:
        await b.save_state("edge", state)
    except FlujoSQLiteError as error:
        assert isinstance(error, ValueError), repr(error)
    except BaseException as error:
        raise AssertionError(f"not a FlujoSQLiteError: {error!r}") from error
    else:
        loaded = await b.load_state("edge")
        assert loaded is not None and loaded["created_at"] == edge


@case("extreme but valid datetimes, naive and aware, and dates")
async def _(b: SQLiteBackend) -> None:
    naive_min = datetime(1, 1, 1, 0, 0, 0, 1)
    aware_max = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    offset = datetime(2024, 2, 29, 12, 0, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    await round_trip(b, "naive-min", base_state(created_at=naive_min, updated_at=naive_min))
    await round_trip(b, "aware-max", base_state(created_at=aware_max, updated_at=offset))
    await b.save_state("date", base_state(created_at=date(2024, 1, 2), updated_at=date(2024, 1, 3)))
    loaded = await b.load_state("date")
    assert loaded is not None and loaded["created_at"] == datetime(2024, 1, 2)


@case("extra keys, including a different run_id inside the state, are ignored")
async def _(b: SQLiteBackend) -> None:
    state = base_state(run_id=SENTINEL, unknown="x", **{"'; DROP TABLE workflow_state; --": 1})
    await b.save_state("extra", state)
    loaded = await b.load_state("extra")
    assert loaded is not None and loaded["run_id"] == "extra"


@case("filters of the wrong type")
async def _(b: SQLiteBackend) -> None:
    for value in (5, b"failed", ["failed"], 1.5):
        await clear_error(lambda value=value: b.list_states(status=value), TypeError)  # type: ignore[arg-type]
        await clear_error(lambda value=value: b.list_workflows(status=value), TypeError)  # type: ignore[arg-type]
        await clear_error(lambda value=value: b.list_workflows(pipeline_id=value), TypeError)  # type: ignore[arg-type]


@case("limit and offset of the wrong type")
async def _(b: SQLiteBackend) -> None:
    for value in ("10", 1.5, b"1", [1]):
        await clear_error(lambda value=value: b.list_workflows(limit=value), TypeError)  # type: ignore[arg-type]
        await clear_error(lambda value=value: b.list_workflows(limit=5, offset=value), TypeError)  # type: ignore[arg-type]


@case("limit True, limit -1, offset -1, limit 2**70, offset 2**70")
async def _(b: SQLiteBackend) -> None:
    everything = await b.list_workflows()
    await result_or_clear_error(
        lambda: b.list_workflows(limit=True), lambda r: r == everything[:1], TypeError
    )
    # Flujo: -1 means "no limit".
    await result_or_clear_error(
        lambda: b.list_workflows(limit=-1), lambda r: r == everything, ValueError
    )
    await clear_error(lambda: b.list_workflows(limit=5, offset=-1), ValueError)
    await result_or_clear_error(
        lambda: b.list_workflows(limit=2**70), lambda r: r == everything, ValueError
    )
    await result_or_clear_error(
        lambda: b.list_workflows(limit=5, offset=2**70), lambda r: r == [], ValueError
    )
    assert await b.list_workflows(limit=0) == []


def failed_workflows_look_right(result: Any) -> bool:
    return isinstance(result, list) and all(item["status"] == "failed" for item in result)


@case("hours_back: strings, negative, NaN, infinities, None, bool, huge")
async def _(b: SQLiteBackend) -> None:
    for value in ("24", "abc", None, b"1", True, [24]):
        await clear_error(lambda value=value: b.get_failed_workflows(hours_back=value), TypeError)  # type: ignore[arg-type]
    for value in (-1, -0.5, math.nan, -math.inf):
        await result_or_clear_error(
            lambda value=value: b.get_failed_workflows(hours_back=value),
            lambda r: r == [],
            ValueError,
        )
    for value in (math.inf, 1e308, 2**70, 10**400):
        await result_or_clear_error(
            lambda value=value: b.get_failed_workflows(hours_back=value),
            failed_workflows_look_right,
            ValueError,
        )
    assert [item["run_id"] for item in await b.get_failed_workflows(hours_back=24)] == [SENTINEL]


@case("days_old: strings, negative, NaN, infinities, None, bool, huge; never deletes the sentinel")
async def _(b: SQLiteBackend) -> None:
    for value in ("30", "abc", None, b"1", True, [30]):
        await clear_error(lambda value=value: b.cleanup_old_workflows(days_old=value), TypeError)  # type: ignore[arg-type]
        assert await b.load_state(SENTINEL) is not None
    # A negative age would put the cutoff in the future and delete every run.
    for value in (-1, -0.001, -math.inf, math.nan, math.inf, 1e308, 2**70, 10**400):
        await result_or_clear_error(
            lambda value=value: b.cleanup_old_workflows(days_old=value),
            lambda r: r == 0,
            ValueError,
        )
        assert await b.load_state(SENTINEL) is not None, f"days_old={value!r} deleted the sentinel"


@case("constructor options of the wrong type or value")
async def _(b: SQLiteBackend) -> None:
    path = b.db_path

    async def construct(**options: Any) -> None:
        other = SQLiteBackend(path, **options)
        await other.close()

    for durability in ("fast", "FULL", "", None, 1):
        await clear_error(
            lambda durability=durability: construct(durability=durability), ValueError, TypeError
        )

    async def construct_at(db_path: Any) -> None:
        other = SQLiteBackend(db_path)
        await other.close()

    for db_path in (123, None, b"wf.db"):
        await clear_error(lambda db_path=db_path: construct_at(db_path), TypeError)
    await clear_error(lambda: construct_at(f"{path}\0x"), ValueError)
    for lock_timeout in (-1, math.nan, "1", None, 1e20, 10**400):
        await clear_error(
            lambda lock_timeout=lock_timeout: construct(lock_timeout=lock_timeout),
            ValueError,
            TypeError,
        )


@case("numbers too large for a float: memory_usage_mb and an evaluation's score")
async def _(b: SQLiteBackend) -> None:
    await clear_error(lambda: b.save_state("o", base_state(memory_usage_mb=10**400)), ValueError)
    await clear_error(lambda: b.persist_evaluation(SENTINEL, 10**400), ValueError)
    assert await b.load_state("o") is None
    assert await b.list_evaluations() == []


@case("time_range: a list works like a tuple; other shapes and types are refused")
async def _(b: SQLiteBackend) -> None:
    as_tuple = await b.get_span_statistics(time_range=(0.0, 2e9))
    assert await b.get_span_statistics(time_range=[0.0, 2e9]) == as_tuple  # type: ignore[arg-type]
    for value in ("ab", 5, {"a": 1, "b": 2}):
        await clear_error(lambda value=value: b.get_span_statistics(time_range=value), TypeError)  # type: ignore[arg-type]
    for value in ((1.0,), (1.0, 2.0, 3.0), (0.0, math.nan)):
        await clear_error(lambda value=value: b.get_span_statistics(time_range=value), ValueError)  # type: ignore[arg-type]
    await clear_error(lambda: b.get_span_statistics(time_range=("0", "1")), TypeError)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------


def test_there_are_at_least_40_cases() -> None:
    assert len(CASES) >= 40, len(CASES)
    assert len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("hostile_case", CASES, ids=[c.name for c in CASES])
async def test_hostile_input(hostile: SQLiteBackend, hostile_case: Case) -> None:
    await hostile_case.run(hostile)


def reports_of_child(program: str, *args: str) -> list[dict[str, Any]]:
    """Runs ``programs/<program>``, which must exit cleanly, and returns its JSON lines."""
    done = subprocess.run(
        [sys.executable, str(PROGRAMS / program), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"the child died (code {done.returncode}):\n{done.stderr[-3000:]}"
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_deep_nesting_fails_cleanly_in_a_child_process(tmp_path: Path) -> None:
    """100,000 levels of lists and dicts, saved in each JSON field and stored by another
    program. Run in a child so a stack overflow is reported instead of killing pytest."""
    reports = reports_of_child("deep_nesting.py", str(tmp_path / "deep.db"), "100000")
    outcomes = {r["case"]: r for r in reports if "case" in r}
    assert len(outcomes) == 7, reports
    for name, outcome in outcomes.items():
        if name.startswith("save"):
            assert outcome["outcome"] == "error", name
            assert {"FlujoSQLiteError"} <= set(outcome["classes"]), outcome
            assert {"SerializationError", "InvalidStateError"} & set(outcome["classes"]), outcome
            assert outcome["message_length"] <= MAX_MESSAGE, outcome
    assert outcomes["load after deep saves"]["outcome"] == "ok"
    stored = outcomes["load stored deep json"]
    assert stored["outcome"] == "error" and "FlujoSQLiteError" in stored["classes"], stored
    assert outcomes["list after stored deep json"]["outcome"] == "ok"
    assert reports[-1] == {"sentinel": "unchanged"}, reports[-1]


def test_a_state_bigger_than_the_memory_left_raises_and_the_process_goes_on(
    tmp_path: Path,
) -> None:
    """Under a limit on the address space, saving or loading a 100 MB state used to abort the
    whole process (Rust's allocator does, where Python raises ``MemoryError``)."""
    reports = reports_of_child("out_of_memory.py", str(tmp_path / "big.db"))
    outcomes = {r["case"]: r["raised"] for r in reports if "case" in r}
    for case in ("save", "save bytes", "save escapes"):
        assert outcomes[case] is not None and "MemoryError" in outcomes[case], outcomes
    # SQLite may run out first while it gathers the row; then it says "out of memory" itself.
    assert outcomes["load"] is not None, outcomes
    assert {"MemoryError", "DatabaseError"} & set(outcomes["load"]), outcomes
    assert reports[-1] == {"after": "ok"}, reports


async def test_hostile_rows_written_by_other_programs_fail_cleanly(tmp_path: Path) -> None:
    """Rows another program wrote with malformed JSON or timestamps: loading them raises a
    clear FlujoSQLiteError (or, for a timestamp, returns the stored text), and every other row,
    and every listing, still works."""
    db_path = tmp_path / "rows.db"
    async with SQLiteBackend(db_path) as backend:
        await backend.save_state(SENTINEL, SENTINEL_STATE)
        for run_id in ("bad-json", "bad-output", "bad-created", "empty-created"):
            await backend.save_state(run_id, base_state())
        sentinel_before = await backend.load_state(SENTINEL)
    conn = sqlite3.connect(str(db_path))
    conn.execute(
        "UPDATE workflow_state SET pipeline_context = '{not json' WHERE run_id = 'bad-json'"
    )
    conn.execute("UPDATE workflow_state SET last_step_output = '[1, 2' WHERE run_id = 'bad-output'")
    conn.execute("UPDATE workflow_state SET created_at = 'yesterday' WHERE run_id = 'bad-created'")
    conn.execute("UPDATE workflow_state SET created_at = '' WHERE run_id = 'empty-created'")
    conn.commit()
    conn.close()
    async with SQLiteBackend(db_path) as backend:
        for run_id in ("bad-json", "bad-output"):
            error = await clear_error(
                lambda run_id=run_id: backend.load_state(run_id),
                ValueError,
                TypeError,
                sqlite3.DatabaseError,
            )
            # A clear message says which row and column to repair.
            assert run_id in str(error), f"the message should name the run: {error}"
        for run_id, text in (("bad-created", "yesterday"), ("empty-created", "")):
            # Flujo 0.4.35 raises ValueError here; handing back the stored text (as Flujo 0.6.11
            # does for system state) keeps the row readable. Either is acceptable; a wrong
            # datetime or an unrelated exception is not.
            try:
                loaded = await backend.load_state(run_id)
            except FlujoSQLiteError as error:
                assert isinstance(error, ValueError | sqlite3.DatabaseError), repr(error)
            else:
                assert loaded is not None and loaded["created_at"] == text, loaded
        assert await backend.load_state(SENTINEL) == sentinel_before
        listed = await backend.list_workflows()
        assert {item["run_id"] for item in listed} >= {SENTINEL, "bad-json", "bad-output"}
        await backend.get_workflow_stats()
        await backend.list_states()


async def test_a_metadata_filter_changed_while_it_is_read_is_no_panic(tmp_path: Path) -> None:
    """Encoding a filter value runs Python code (a dataclass's fields), where another thread can
    take the GIL and add a key: the dict changed size under the iterator, and a PanicException,
    which ``except Exception`` does not catch, came out of ``list_runs`` (most calls of 300)."""
    import threading

    @dataclass
    class Tag:
        x: int = 1

    flt: dict[str, Any] = {f"k{i}": Tag() for i in range(50)}
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            flt[f"extra{i}"] = 1
            i += 1
            if i % 1000 == 0:
                for j in range(i - 1000, i):
                    del flt[f"extra{j}"]

    interval = sys.getswitchinterval()
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        await backend.save_run_start({"run_id": "r1"})
        sys.setswitchinterval(1e-6)
        churner = threading.Thread(target=churn)
        churner.start()
        try:
            for _ in range(300):
                with contextlib.suppress(FlujoSQLiteError):  # a clear error is fine
                    await backend.list_runs(metadata_filter=flt)
        finally:
            stop.set()
            churner.join()
            sys.setswitchinterval(interval)
        assert [run["run_id"] for run in await backend.list_runs()] == ["r1"]


async def test_a_nan_span_time_skips_that_span_not_the_call(tmp_path: Path) -> None:
    """SQLite stores NaN as NULL, which the NOT NULL ``start_time`` refused: the whole
    ``save_spans`` failed and its valid spans were lost. It is skipped like a text time. A NaN
    end is stored as no end (an unfinished span), as Flujo stores it."""
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        await backend.save_spans(
            "r",
            [
                {"span_id": "good", "name": "g", "start_time": 1.0},
                {"span_id": "bad", "name": "b", "start_time": math.nan},
                {"span_id": "bad-end", "name": "b", "start_time": 1.0, "end_time": math.nan},
            ],
        )
        spans = {span["span_id"]: span for span in await backend.get_spans("r")}
        assert sorted(spans) == ["bad-end", "good"]
        assert spans["bad-end"]["end_time"] is None


async def test_values_other_programs_store_in_text_columns_read_as_their_text(
    tmp_path: Path,
) -> None:
    """A span name stored as bytes failed ``get_span_statistics`` for every span; numbers
    written into text columns count and load as their text."""
    db_path = tmp_path / "wf.db"
    async with SQLiteBackend(db_path) as backend:
        await backend.save_trace(
            "r1",
            {"span_id": "s1", "name": "step", "start_time": 1.0, "end_time": 2.0, "status": "ok"},
        )
        await backend.save_state("numeric-status", base_state())
    conn = sqlite3.connect(db_path)  # no backend has the file open
    try:
        conn.execute("UPDATE spans SET name = ? WHERE span_id = 's1'", (b"step",))
        # A table of our own making has TEXT affinity; another program's may have none.
        conn.execute("CREATE TABLE loose (v)")
        conn.execute("INSERT INTO loose VALUES (-1), (2.5)")
        conn.execute("PRAGMA ignore_check_constraints = ON")
        conn.execute(
            "UPDATE workflow_state SET status = (SELECT v FROM loose WHERE v = 2.5), "
            "pipeline_context = (SELECT v FROM loose WHERE v = 2.5) + 0.5 "
            "WHERE run_id = 'numeric-status'"
        )
        stored = conn.execute(
            "SELECT typeof(status), typeof(pipeline_context) FROM workflow_state "
            "WHERE run_id = 'numeric-status'"
        ).fetchone()
        conn.commit()
    finally:
        conn.close()
    async with SQLiteBackend(db_path) as backend:
        stats = await backend.get_span_statistics()
        assert stats["by_name"] == {"step": 1}
        counts = (await backend.get_workflow_stats())["status_counts"]
        loaded = await backend.load_state("numeric-status")
    assert loaded is not None
    # Our columns' TEXT affinity turns numbers into text on the way in; numbers kept as such
    # (in another program's untyped columns) are covered by the Rust test of `sql_text`.
    assert stored == ("text", "text")
    assert counts.get("2.5") == 1, counts
    assert loaded["pipeline_context"] == 3.0 and isinstance(loaded["pipeline_context"], float)


async def test_logging_that_raises_fails_the_call_and_nothing_else(tmp_path: Path) -> None:
    """A logging handler whose filter raises (or a Ctrl-C landing in one): the exception was
    left pending on the thread, so a trace with two roots never came back (its future done,
    its task never woken) and a span list with a bad time raised an unrelated SystemError."""
    import logging

    class Refusing(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            raise RuntimeError("this filter refuses " + record.getMessage()[:20])

    import io

    handler = logging.StreamHandler(io.StringIO())
    handler.addFilter(Refusing())
    logger = logging.getLogger("flujo_sqlite")
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        await backend.save_spans(
            "t", [{"span_id": "a", "name": "a", "start_time": 1.0}, {"span_id": "b", "name": "b"}]
        )
        logger.addHandler(handler)
        try:
            with pytest.raises(RuntimeError, match="this filter refuses trace has 2 root"):
                await asyncio.wait_for(backend.get_trace("t"), 30)
            with pytest.raises(RuntimeError, match="this filter refuses span skipped"):
                await asyncio.wait_for(
                    backend.save_spans("t", [{"span_id": "c", "name": "c", "start_time": "x"}]), 30
                )
        finally:
            logger.removeHandler(handler)
        await backend.save_state("after", base_state())
        assert await backend.load_state("after") is not None
        assert (await backend.get_trace("t")) is not None


def test_deep_values_on_a_thread_with_a_small_stack_fail_clearly() -> None:
    """1000 levels of nesting take ~450 KB of stack, more than a thread started after
    ``threading.stack_size(256 * 1024)`` has: saving or loading such a value there crashed the
    process (SIGSEGV). It is refused instead, with the usual error, in a child process; and a
    thread with a tiny stack (64 KiB) still saves and loads shallow values."""
    program = """
import asyncio, os, sys, tempfile, threading
from datetime import UTC, datetime
from flujo_sqlite import SQLiteBackend
from flujo_sqlite.errors import SerializationError

deep = {}
level = deep
for _ in range(990):
    level["a"] = {}
    level = level["a"]
now = datetime.now(UTC)
state = {"pipeline_id": "p", "pipeline_name": "p", "pipeline_version": "1",
         "current_step_index": 0, "pipeline_context": deep, "status": "running",
         "created_at": now, "updated_at": now}
path = os.path.join(tempfile.mkdtemp(), "wf.db")

async def save_on_the_main_thread():
    async with SQLiteBackend(path) as backend:
        await backend.save_state("deep", state)

async def use_on_a_small_stack():
    async with SQLiteBackend(path) as backend:
        try:
            await backend.save_state("again", state)
        except SerializationError as error:
            print("save refused:", "nested" in str(error))
        try:
            await backend.load_state("deep")
        except Exception as error:
            print("load refused:", type(error).__name__, "nested" in str(error))
        await backend.save_state("shallow", {**state, "pipeline_context": {}})
        print("then works:", (await backend.load_state("shallow")) is not None)

async def shallow_on_a_tiny_stack():
    async with SQLiteBackend(path) as backend:
        await backend.save_state("tiny", {**state, "pipeline_context": {"a": {"b": [1]}}})
        loaded = await backend.load_state("tiny")
        print("tiny stack works:", loaded["pipeline_context"] == {"a": {"b": [1]}})

asyncio.run(save_on_the_main_thread())
for size, work in ((256, use_on_a_small_stack), (64, shallow_on_a_tiny_stack)):
    threading.stack_size(size * 1024)
    worker = threading.Thread(target=lambda work=work: asyncio.run(work()))
    worker.start()
    worker.join()
"""
    done = subprocess.run(
        [sys.executable, "-c", program], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines() == [
        "save refused: True",
        "load refused: DatabaseError True",
        "then works: True",
        "tiny stack works: True",
    ], done.stdout + done.stderr


async def test_a_metadata_filter_of_a_thousand_values_is_matched(tmp_path: Path) -> None:
    """Each value of the filter is a condition; ANDed in one chain, 334 of them made SQLite
    refuse the query ("Expression tree is too large")."""
    metadata = {f"k{i}": i for i in range(1000)}
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        await backend.save_state("r", base_state(metadata=metadata))
        await backend.save_run_start({"run_id": "r"})
        matched = await backend.list_runs(metadata_filter=metadata)
        assert [run["run_id"] for run in matched] == ["r"]
        assert await backend.list_runs(metadata_filter={**metadata, "k999": -1}) == []
