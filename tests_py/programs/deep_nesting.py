"""Child for the deep-nesting cases: run where a stack overflow kills only this process.

Usage: deep_nesting.py DB_PATH DEPTH

Saves a sentinel, then tries each case and prints one JSON line per case:
``{"case": ..., "outcome": "ok" | "error", "classes": [MRO names], "message_length": n}``.
Last it checks the sentinel is unchanged and prints ``{"sentinel": "unchanged"}``.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from typing import Any

from flujo_sqlite import SQLiteBackend
from state_factory import expected_load, matches, state_for


def nested_lists(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def nested_dicts(depth: int) -> Any:
    value: Any = {}
    for _ in range(depth):
        value = {"k": value}
    return value


def nested_mixed(depth: int) -> Any:
    value: Any = None
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


def report(case: str, error: BaseException | None) -> None:
    if error is None:
        print(json.dumps({"case": case, "outcome": "ok"}), flush=True)
    else:
        print(
            json.dumps(
                {
                    "case": case,
                    "outcome": "error",
                    "classes": [cls.__name__ for cls in type(error).__mro__],
                    "message_length": len(str(error)),
                    "message": str(error)[:300],
                }
            ),
            flush=True,
        )


async def attempt(case: str, call: Any) -> None:
    try:
        await call()
    except Exception as error:  # noqa: BLE001 - reported to the parent
        report(case, error)
    else:
        report(case, None)


async def main() -> None:
    db_path, depth = sys.argv[1], int(sys.argv[2])
    async with SQLiteBackend(db_path) as backend:
        await backend.save_state("sentinel", state_for("sentinel", 3))
        await backend.save_state("victim", state_for("victim", 0))
        for field, build in (
            ("pipeline_context", nested_lists),
            ("pipeline_context", nested_dicts),
            ("last_step_output", nested_mixed),
            ("step_history", nested_lists),
        ):
            state = state_for("deep", 0)
            state[field] = build(depth)
            await attempt(
                f"save {field} {build.__name__}",
                lambda state=state: backend.save_state("deep", state),
            )
        await attempt("load after deep saves", lambda: backend.load_state("deep"))
    # Another program stored a deeply nested context; loading it must fail cleanly.
    conn = sqlite3.connect(db_path)
    conn.execute(
        "UPDATE workflow_state SET pipeline_context = ? WHERE run_id = 'victim'",
        ("[" * depth + "]" * depth,),
    )
    conn.commit()
    conn.close()
    async with SQLiteBackend(db_path) as backend:
        await attempt("load stored deep json", lambda: backend.load_state("victim"))
        await attempt("list after stored deep json", lambda: backend.list_workflows())
        sentinel = await backend.load_state("sentinel")
    unchanged = matches(sentinel, "sentinel", 3) and sentinel == {
        **sentinel,
        **expected_load("sentinel", 3),
    }
    print(json.dumps({"sentinel": "unchanged" if unchanged else repr(sentinel)[:500]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
