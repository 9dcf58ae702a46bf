"""Forks while backends are in use, and again once they are closed, as ``multiprocessing``'s
"fork" start method and pre-forking servers do.

Usage: fork_child.py DB_PATH

The parent saves ``parent-before`` through a backend on DB_PATH and creates, without using it, a
backend on ``DB_PATH-preloaded.db``. It then forks a first child while its backend is open:
there every way of using flujo-sqlite must be refused, since SQLite does not survive fork() in
use (the inherited backend, the same backend closed and used again, the unused backend on the
other file, a new backend). The parent closes its backend and forks a second child: there the
unused backend on the other file saves ``child``, a new backend on DB_PATH saves ``child``, and
the parent's closed backend, used again, saves ``child-reopened``. Each outcome is printed as
"<child>/<what>: saved" or "<child>/<what>: <ExceptionType>: <message>". Each child exits
normally, so that the interpreter's exit hooks run with the parent's backends in memory. The
parent waits for each child (reporting "child hung" after 60 s), then saves ``parent-after``
through both backends and closes them.
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


async def while_in_use(used: SQLiteBackend, preloaded: SQLiteBackend, db_path: str) -> None:
    await attempt("busy/inherited", lambda: used.save_state("inherited", state_for("x", 0)))
    await used.close()
    await attempt("busy/closed and used again", lambda: used.save_state("x1", state_for("x", 0)))
    await attempt("busy/unused, other file", lambda: preloaded.save_state("x2", state_for("x", 0)))
    own = SQLiteBackend(db_path)
    await attempt("busy/new", lambda: own.save_state("x3", state_for("x", 0)))
    await own.close()


async def once_closed(closed: SQLiteBackend, preloaded: SQLiteBackend, db_path: str) -> None:
    await attempt(
        "idle/unused, other file", lambda: preloaded.save_state("child", state_for("child", 0))
    )
    await preloaded.close()
    own = SQLiteBackend(db_path)
    await attempt("idle/new", lambda: own.save_state("child", state_for("child", 0)))
    await own.close()
    await attempt(
        "idle/closed and used again",
        lambda: closed.save_state("child-reopened", state_for("child-reopened", 0)),
    )
    await closed.close()


def fork_and_wait(child: Callable[[], Awaitable[None]]) -> None:
    pid = os.fork()
    if pid == 0:
        asyncio.run(child())
        sys.exit(0)  # a normal exit: atexit hooks run, the inherited backends are dropped
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            say(f"child exit status {os.waitstatus_to_exitcode(status)}")
            return
        time.sleep(0.05)
    say("child hung")
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def main() -> None:
    db_path = sys.argv[1]
    backend = SQLiteBackend(db_path)
    preloaded = SQLiteBackend(f"{db_path}-preloaded.db")
    asyncio.run(backend.save_state("parent-before", state_for("parent-before", 0)))
    fork_and_wait(lambda: while_in_use(backend, preloaded, db_path))
    backend.close_sync()
    fork_and_wait(lambda: once_closed(backend, preloaded, db_path))

    async def after() -> None:
        for used in (backend, preloaded):
            await used.save_state("parent-after", state_for("parent-after", 0))
            await used.close()

    asyncio.run(after())
    say("parent: done")


if __name__ == "__main__":
    main()
