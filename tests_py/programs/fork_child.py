"""Forks after a backend is open, as ``multiprocessing``'s "fork" start method does.

Usage: fork_child.py DB_PATH

Before the fork the parent saves ``parent-before`` through a backend on DB_PATH and creates,
without using them, a second backend on DB_PATH and one on ``DB_PATH-preloaded.db`` (as a
pre-forking server's workers inherit one made at import). In the child, each way of reaching
DB_PATH, which the parent has open, must be refused: the inherited backend, the same backend
closed and used again, the unused one on the same file, and a new one. The unused backend on the
other file saves ``child``. Each outcome is printed as a line: "<what>: saved" or
"<what>: <ExceptionType>: <message>". The child exits normally, so that the interpreter's exit
hooks run with the parent's backends still in memory. The parent waits for the child (reporting
"child hung" after 60 s), saves ``parent-after`` through its backend and the preloaded one, and
closes them.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable

from flujo_sqlite import SQLiteBackend
from state_factory import state_for


def say(line: str) -> None:
    os.write(1, f"{line}\n".encode())


async def attempt(what: str, save: Callable[[], Awaitable[None]]) -> None:
    try:
        await asyncio.wait_for(save(), 20)
        say(f"{what}: saved")
    except Exception as error:  # noqa: BLE001 - the test reads which one
        say(f"{what}: {type(error).__name__}: {error}")


async def in_child(
    inherited: SQLiteBackend, unused: SQLiteBackend, preloaded: SQLiteBackend, db_path: str
) -> None:
    await attempt("inherited", lambda: inherited.save_state("inherited", state_for("x", 0)))
    await inherited.close()
    await attempt(
        "closed and used again", lambda: inherited.save_state("reopened", state_for("x", 0))
    )
    await attempt("unused, same file", lambda: unused.save_state("unused", state_for("x", 0)))
    own = SQLiteBackend(db_path)
    await attempt("new, same file", lambda: own.save_state("own", state_for("x", 0)))
    await own.close()
    await attempt(
        "unused, other file", lambda: preloaded.save_state("child", state_for("child", 0))
    )
    await preloaded.close()


def main() -> None:
    db_path = sys.argv[1]
    backend = SQLiteBackend(db_path)
    unused = SQLiteBackend(db_path)
    preloaded = SQLiteBackend(f"{db_path}-preloaded.db")
    asyncio.run(backend.save_state("parent-before", state_for("parent-before", 0)))
    pid = os.fork()
    if pid == 0:
        asyncio.run(in_child(backend, unused, preloaded, db_path))
        sys.exit(0)  # a normal exit: atexit hooks run, the inherited backends are dropped
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
