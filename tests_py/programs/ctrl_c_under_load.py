"""Ctrl-C at a random moment while 64 loads of large states are in flight.

Usage: ctrl_c_under_load.py DB_PATH ROUNDS

Each round runs the loads under ``loop.run_until_complete`` (Python's default SIGINT handler,
which raises KeyboardInterrupt wherever the loop happens to be), has another process send one
SIGINT, then cleans up the way ``asyncio.run`` does: cancels every task left and waits for
them. A task whose future was resolved but never woken would make that wait last forever;
then ``stranded in round N`` is printed and the program stops. Otherwise it prints ``ok`` and
the number of rounds the signal reached the program (CPython loses one that lands in a weakref
callback, so it can be fewer than all).
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time

from flujo_sqlite import SQLiteBackend
from state_factory import state_for

BIG = {"rows": [{"k": j, "v": "x" * 20} for j in range(3000)]}


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
    interrupted = 0
    for round_number in range(rounds):
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
        except KeyboardInterrupt:
            interrupted += 1
        try:
            sender.wait()
            time.sleep(0.01)  # the signal's handler, if still pending, runs by then
        except KeyboardInterrupt:
            pass  # on a loaded machine the signal can come after the loads are all done
        left = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in left:
            t.cancel()
        cleanup = asyncio.gather(*left, return_exceptions=True)
        stop = loop.call_later(10, loop.stop)
        while not cleanup.done():
            try:
                loop.run_until_complete(cleanup)
            except RuntimeError:  # stopped before the cleanup finished
                print(f"stranded in round {round_number}", flush=True)
                os._exit(1)
            except KeyboardInterrupt:
                # A task that woke to the interrupt raised it again (so it was not stranded):
                # the gather that is this round's task re-raises what one of its loads got.
                continue
        stop.cancel()
    backend.close_sync()
    print(f"ok {interrupted}", flush=True)


if __name__ == "__main__":
    main()
