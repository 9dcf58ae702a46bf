"""Child for the several-processes test: one of N processes sharing one database file.

Usage: multi_writer.py DB_PATH WORKER_ID SAVES

Saves SAVES runs ``p<id>-<i>`` in concurrent batches, re-saves every 7th run at version 1, and
meanwhile reads: its own runs (which must load exactly), other processes' runs (absent or
exact), and listings. Any failure is printed with its traceback and the exit code is 1.
"""

from __future__ import annotations

import asyncio
import random
import sys
import traceback

from flujo_sqlite import SQLiteBackend
from state_factory import matches, state_for

BATCH = 25


def final_version(index: int) -> int:
    return 1 if index % 7 == 0 else 0


async def main() -> int:
    db_path, worker_id, saves = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    others = [w for w in range(4) if w != worker_id]
    rng = random.Random(worker_id)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 2
    pipeline_id = f"mp-{worker_id}"
    reads = 0
    async with SQLiteBackend(db_path) as backend:
        for start in range(0, saves, BATCH):
            indexes = range(start, min(start + BATCH, saves))
            await asyncio.gather(
                *(
                    backend.save_state(
                        f"p{worker_id}-{i}", state_for(f"p{worker_id}-{i}", 0, pipeline_id)
                    )
                    for i in indexes
                )
            )
            for i in indexes:
                if final_version(i):
                    run_id = f"p{worker_id}-{i}"
                    await backend.save_state(run_id, state_for(run_id, 1, pipeline_id))
            for i in rng.sample(indexes, 3):
                run_id = f"p{worker_id}-{i}"
                loaded = await backend.load_state(run_id)
                assert matches(loaded, run_id, final_version(i), pipeline_id), (run_id, loaded)
            other = rng.choice(others)
            other_index = rng.randrange(start + 1)
            run_id = f"p{other}-{other_index}"
            loaded = await backend.load_state(run_id)
            if loaded is not None:  # the other process may not have got there yet
                version = loaded["pipeline_context"]["version"]
                assert matches(loaded, run_id, version, f"mp-{other}"), (run_id, loaded)
            listed = await backend.list_workflows(pipeline_id=pipeline_id, limit=10)
            assert 1 <= len(listed) <= 10 and all(
                item["pipeline_id"] == pipeline_id for item in listed
            )
            await backend.get_workflow_stats()
            reads += 6
    print(f"done {saves} saves {reads} reads", flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except Exception:  # noqa: BLE001 - the parent reads the traceback from stderr
        traceback.print_exc()
        sys.exit(1)
