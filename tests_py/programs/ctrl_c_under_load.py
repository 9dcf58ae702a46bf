"""Ctrl-C at a random moment while 64 loads of large states are in flight.

Usage: ctrl_c_under_load.py DB_PATH ROUNDS

Each round runs the loads under ``loop.run_until_complete`` (Python's default SIGINT handler,
which raises KeyboardInterrupt wherever the loop happens to be), has another process send one
SIGINT, then cleans up the way ``asyncio.run`` does: cancels every task left and waits for
them. A task whose future was resolved but never woken would make that wait last forever.

asyncio itself drops a wake-up when the interrupt lands in its own pure-Python scheduling (the
loop's ``_run_once`` between taking a handle and running it, or ``call_soon`` under a task's
own step): the same rounds with no flujo-sqlite at all stranded a task in 2 of 810. So a
stranded round fails only if the interrupt was raised while flujo-sqlite's code was on the
stack (the port's drain, or the shim); then ``stranded in round N`` and the traceback are
printed and the program stops. A round asyncio stranded on its own is set aside.

At the end it prints ``ok``, the number of rounds the signal reached the program (CPython
loses one that lands in a weakref callback, so it can be fewer than all), the number whose
interrupt landed in flujo-sqlite's code, and the number asyncio stranded on its own.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
import traceback

import flujo_sqlite
from flujo_sqlite import SQLiteBackend
from state_factory import state_for

BIG = {"rows": [{"k": j, "v": "x" * 20} for j in range(3000)]}
PACKAGE_DIR = os.path.dirname(flujo_sqlite.__file__)


def raised_in_flujo_sqlite(interrupt: BaseException | None) -> bool:
    """Whether flujo-sqlite's code was on the stack where ``interrupt`` was raised: a frame of
    the shim, or a loop callback that is the port's drain (compiled, so it has no frame of its
    own). An interrupt nobody saw counts too: a strand without one is unexplained."""
    if interrupt is None:
        return True
    for frame, _ in traceback.walk_tb(interrupt.__traceback__):
        if frame.f_code.co_filename.startswith(PACKAGE_DIR):
            return True
        handle = frame.f_locals.get("self")
        if frame.f_code.co_name == "_run" and isinstance(handle, asyncio.Handle):
            owner = getattr(handle._callback, "__self__", None)
            if type(owner).__module__.startswith("flujo_sqlite"):
                return True
    return False


def main() -> None:
    db_path, rounds = sys.argv[1], int(sys.argv[2])
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    backend = SQLiteBackend(db_path, durability="normal")

    async def setup() -> None:
        for i in range(64):
            await backend.save_state(f"r{i}", {**state_for(f"r{i}", 0), "pipeline_context": BIG})

    async def load_all_again_and_again() -> None:
        # Bounded: CPython itself swallows a KeyboardInterrupt that lands in a weakref callback
        # (asyncio's task set has them), and the round must end then too.
        for _ in range(100):
            await asyncio.gather(*(backend.load_state(f"r{i}") for i in range(64)))

    loop.run_until_complete(setup())
    interrupted = in_flujo_sqlite = stranded_by_asyncio = 0
    set_aside: set[asyncio.Task[None]] = set()
    for round_number in range(rounds):
        interrupt: KeyboardInterrupt | None = None
        task = loop.create_task(load_all_again_and_again())
        delay = random.uniform(0.02, 0.08)
        sender = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"import os, time; time.sleep({delay}); os.kill({os.getpid()}, 2)",
            ]
        )
        try:
            loop.run_until_complete(task)
        except KeyboardInterrupt as raised:
            interrupted += 1
            interrupt = raised
            in_flujo_sqlite += raised_in_flujo_sqlite(raised)
        try:
            sender.wait()
            time.sleep(0.01)  # the signal's handler, if still pending, runs by then
        except KeyboardInterrupt:
            pass  # on a loaded machine the signal can come after the loads are all done
        left = [t for t in asyncio.all_tasks(loop) if not t.done() and t not in set_aside]
        for t in left:
            t.cancel()
        cleanup = asyncio.gather(*left, return_exceptions=True)
        stop = loop.call_later(10, loop.stop)
        while not cleanup.done():
            try:
                loop.run_until_complete(cleanup)
            except RuntimeError:  # stopped before the cleanup finished
                if raised_in_flujo_sqlite(interrupt):
                    print(f"stranded in round {round_number}", flush=True)
                    if interrupt is not None:
                        traceback.print_exception(interrupt, file=sys.stdout)
                    os._exit(1)
                stranded_by_asyncio += 1
                set_aside.update(t for t in left if not t.done())
                break
            except KeyboardInterrupt:
                # A task that woke to the interrupt raised it again (so it was not stranded):
                # the gather that is this round's task re-raises what one of its loads got.
                continue
        stop.cancel()
    backend.close_sync()
    print(f"ok {interrupted} {in_flujo_sqlite} {stranded_by_asyncio}", flush=True)


if __name__ == "__main__":
    main()
