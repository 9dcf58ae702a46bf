"""Child for the SIGKILL test: saves states as fast as it can until it is killed.

Usage: crash_writer.py DB_PATH DURABILITY GENERATION WORKERS

Prints ``ready`` once imported, waits for ``go`` on stdin, then runs WORKERS tasks that each
save new runs or re-save one of their own runs at the next version. Each acknowledged save is
reported as ``<run_id> <version>`` on stdout with a single write(2), *after* ``save_state``
returned, so every line the parent reads is a promise that the row is durable.

``FLUJO_SQLITE_HARNESS_EARLY_ACK=1`` acknowledges *before* awaiting instead: a lying backend,
to check that the parent test catches lost acknowledged writes (it fails at the first kill).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys

from flujo_sqlite import SQLiteBackend
from state_factory import state_for

EARLY_ACK = os.environ.get("FLUJO_SQLITE_HARNESS_EARLY_ACK") == "1"


async def worker(backend: SQLiteBackend, generation: int, index: int) -> None:
    rng = random.Random(generation * 1000 + index)
    versions: dict[str, int] = {}
    counter = 0
    pipeline_id = f"crash-g{generation}"
    while True:
        if versions and rng.random() < 0.3:
            run_id = rng.choice(list(versions))
            version = versions[run_id] + 1
        else:
            run_id = f"g{generation}-w{index}-{counter}"
            counter += 1
            version = 0
        if EARLY_ACK:  # harness self-check only: a lying backend, which the parent must catch
            os.write(1, f"{run_id} {version}\n".encode())
        await backend.save_state(run_id, state_for(run_id, version, pipeline_id))
        versions[run_id] = version
        if not EARLY_ACK:
            os.write(1, f"{run_id} {version}\n".encode())


async def main() -> None:
    db_path, durability, generation, workers = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
    )
    os.write(1, b"ready\n")
    if sys.stdin.readline().strip() != "go":
        return
    backend = SQLiteBackend(db_path, durability=durability)
    await asyncio.gather(*(worker(backend, generation, i) for i in range(workers)))


if __name__ == "__main__":
    asyncio.run(main())
