"""Child that saves and leaves without closing its backend.

Usage: exit_without_close.py DB_PATH MODE COUNT

MODE ``awaited``: awaits COUNT saves (printing each acknowledged run id), then returns from
``asyncio.run`` without ``close()``. MODE ``pending``: acknowledges COUNT saves, then starts
COUNT more without awaiting them and returns at once, leaving them queued. MODE ``sys_exit``:
like ``awaited`` but leaves through ``sys.exit(0)`` from inside the coroutine. The interpreter
must still exit promptly with code 0.
"""

from __future__ import annotations

import asyncio
import os
import sys

from flujo_sqlite import SQLiteBackend
from state_factory import state_for


async def main() -> None:
    db_path, mode, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    backend = SQLiteBackend(db_path)
    for i in range(count):
        run_id = f"exit-{mode}-{i}"
        await backend.save_state(run_id, state_for(run_id, 0))
        os.write(1, f"{run_id}\n".encode())
    if mode == "pending":
        for i in range(count, 2 * count):
            run_id = f"exit-{mode}-{i}"
            asyncio.ensure_future(backend.save_state(run_id, state_for(run_id, 0)))
        await asyncio.sleep(0)
    elif mode == "sys_exit":
        sys.exit(0)


if __name__ == "__main__":
    asyncio.run(main())
