"""Child whose exit waits for saves held up by another process's write lock.

Usage: exit_waiting_for_a_lock.py DB_PATH

Queues saves that cannot commit while the lock is held (their callers stop waiting), prints
``exiting`` and returns from ``asyncio.run``: the interpreter's exit then waits, up to the
backend's ``lock_timeout`` of 120 s, for those saves, until a Ctrl-C (SIGINT) ends the wait.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from flujo_sqlite import SQLiteBackend
from state_factory import state_for

# A child started in the background may inherit SIGINT ignored; this one must take Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)


async def main() -> None:
    backend = SQLiteBackend(Path(sys.argv[1]), lock_timeout=120)
    for i in range(5):
        run_id = f"held-{i}"
        try:
            await asyncio.wait_for(backend.save_state(run_id, state_for(run_id, 0)), 0.2)
        except TimeoutError:
            pass
    print("exiting", flush=True)


asyncio.run(main())
