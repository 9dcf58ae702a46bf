"""Child for the out-of-memory cases: run where a limit on the address space hits only it.

Usage: out_of_memory.py DB_PATH

Saves and loads 100 MB states (text, bytes, and 40 MB of text that JSON escapes to 240 MB)
under a limit that leaves this process ~40 MB more than it has, and prints one JSON line per
case: ``{"case": ..., "raised": [MRO names] | null}``. Last, with the limit lifted, it loads a run saved before and prints ``{"after": "ok"}``. A
process the allocator aborted prints neither.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from typing import Any

from flujo_sqlite import SQLiteBackend
from state_factory import matches, state_for

MB = 1 << 20


def address_space_in_use() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


async def outcome(call: Any) -> list[str] | None:
    try:
        await call
    except BaseException as error:  # noqa: BLE001 - reported to the parent
        return [cls.__name__ for cls in type(error).__mro__]
    return None


async def main(path: str) -> None:
    backend = SQLiteBackend(path)
    await backend.save_state("small", state_for("small", 0))
    big = {**state_for("big", 0), "pipeline_context": {"blob": "x" * (100 * MB)}}
    await backend.save_state("stored-big", big)
    blob = bytes(100 * MB)  # stored as base64, a third longer
    escapes = "\x01" * (40 * MB)  # each character stored as six: \u0001
    await backend.load_state("small")  # a reader thread and its connection exist
    unlimited = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space_in_use() + 40 * MB, unlimited[1]))
    try:
        cases = {
            "save": backend.save_state("big", big),
            "save bytes": backend.save_state("big", {**big, "pipeline_context": {"b": blob}}),
            "save escapes": backend.save_state("big", {**big, "pipeline_context": {"e": escapes}}),
            "load": backend.load_state("stored-big"),
        }
        for case, call in cases.items():
            print(json.dumps({"case": case, "raised": await outcome(call)}), flush=True)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, unlimited)
    assert matches(await backend.load_state("small"), "small", 0)
    assert await backend.load_state("big") is None
    await backend.close()
    print(json.dumps({"after": "ok"}), flush=True)


asyncio.run(main(sys.argv[1]))
