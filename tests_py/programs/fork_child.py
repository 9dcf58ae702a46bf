"""Forks after a backend is open, as ``multiprocessing``'s "fork" start method does.

Usage: fork_child.py DB_PATH

The child first uses the inherited backend (printing the exception it raises, or "no error"),
closes it and saves ``reopened`` through it, then opens a backend of its own and saves ``child``
with it, then saves ``child`` through a second backend, on ``DB_PATH-preloaded.db``, that the
parent created but had not used before the fork (as a pre-forking server's workers do), and
exits normally, so that the interpreter's exit hooks run in the child with the parent's
backends still in memory. The parent waits for the child (reporting "child hung" after 60 s),
saves ``parent-after`` through both backends, and closes them. Each line is printed as it
happens.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from flujo_sqlite import SQLiteBackend
from state_factory import state_for


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


async def in_child(inherited: SQLiteBackend, preloaded: SQLiteBackend, db_path: str) -> None:
    try:
        await asyncio.wait_for(inherited.save_state("inherited", state_for("inherited", 0)), 20)
        say("child inherited: no error")
    except Exception as error:  # noqa: BLE001 - the test reads which one
        say(f"child inherited: {type(error).__name__}: {error}")
    await inherited.close()
    # Closed in the child, it opens the file again for the child, as after any close().
    await asyncio.wait_for(inherited.save_state("reopened", state_for("reopened", 0)), 20)
    await inherited.close()
    say("child inherited, closed and used again: saved")
    own = SQLiteBackend(db_path)
    await own.save_state("child", state_for("child", 0))
    await own.close()
    say("child own backend: saved")
    await asyncio.wait_for(preloaded.save_state("child", state_for("child", 0)), 20)
    await preloaded.close()
    say("child preloaded backend: saved")


def main() -> None:
    db_path = sys.argv[1]
    backend = SQLiteBackend(db_path)
    preloaded = SQLiteBackend(f"{db_path}-preloaded.db")
    asyncio.run(backend.save_state("parent-before", state_for("parent-before", 0)))
    pid = os.fork()
    if pid == 0:
        asyncio.run(in_child(backend, preloaded, db_path))
        sys.exit(0)  # a normal exit: atexit hooks run, the inherited backend is dropped
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            say(f"child exit status {os.waitstatus_to_exitcode(status)}")
            break
        time.sleep(0.05)
    else:
        say("child hung")
        os.kill(pid, 9)
        os.waitpid(pid, 0)

    async def after() -> None:
        for used in (backend, preloaded):
            await used.save_state("parent-after", state_for("parent-after", 0))
            await used.close()

    asyncio.run(after())
    say("parent: done")


if __name__ == "__main__":
    main()
