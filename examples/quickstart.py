"""A tour of flujo-sqlite: save, load, list, filter, page, inspect and clean up workflow runs.

    python examples/quickstart.py [DATABASE]

DATABASE defaults to ./quickstart_workflows.db. Running the tour again reuses the file: the same
run ids are saved again (a save replaces the whole row), so the output stays the same.
"""

from __future__ import annotations

import asyncio
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from flujo_sqlite import SQLiteBackend

STEPS = {
    "ingest-orders": ["fetch", "validate", "normalize", "load", "report"],
    "train-churn-model": ["extract", "featurize", "train", "evaluate", "publish", "notify"],
    "weekly-digest": ["collect", "summarize", "render", "send"],
}
PIPELINE_NAMES = {
    "ingest-orders": "Order ingestion",
    "train-churn-model": "Churn model training",
    "weekly-digest": "Weekly digest e-mail",
}

# (run id, pipeline, status, created this long ago, steps done, error message)
# fmt: off
RUNS: list[tuple[str, str, str, timedelta, int, str | None]] = [
    ("ingest-0412", "ingest-orders", "completed", timedelta(days=12), 5, None),
    ("ingest-0419", "ingest-orders", "failed", timedelta(days=5, hours=3), 3,
     "normalize: column 'currency' missing in orders_2024_06.csv"),
    ("ingest-0423", "ingest-orders", "completed", timedelta(days=1, hours=2), 5, None),
    ("ingest-0424", "ingest-orders", "running", timedelta(minutes=7), 2, None),
    ("churn-v7", "train-churn-model", "completed", timedelta(days=9), 6, None),
    ("churn-v8", "train-churn-model", "failed", timedelta(hours=20), 2,
     "train: CUDA out of memory (tried to allocate 2.00 GiB)"),
    ("churn-v9", "train-churn-model", "paused", timedelta(hours=3), 4, None),
    ("digest-w23", "weekly-digest", "completed", timedelta(days=8), 4, None),
    ("digest-w24", "weekly-digest", "cancelled", timedelta(days=1, hours=5), 1, None),
    ("digest-w25", "weekly-digest", "failed", timedelta(hours=1), 3,
     "send: SMTP 421 service not available"),
]
# fmt: on


def make_state(
    pipeline_id: str, status: str, age: timedelta, steps_done: int, error: str | None
) -> dict[str, Any]:
    now = datetime.now(UTC).replace(microsecond=0)
    created = now - age
    steps = STEPS[pipeline_id]
    history: list[dict[str, Any]] = [
        {"step": name, "status": "completed", "duration_ms": 400 + 150 * index}
        for index, name in enumerate(steps[:steps_done])
    ]
    if status == "failed":
        history.append({"step": steps[steps_done], "status": "failed", "error": error})
    duration_ms = sum(entry.get("duration_ms", 0) for entry in history)
    return {
        "pipeline_id": pipeline_id,
        "pipeline_name": PIPELINE_NAMES[pipeline_id],
        "pipeline_version": "2.3.0",
        "current_step_index": steps_done,
        "pipeline_context": {"triggered_by": "scheduler", "rows_seen": 1200 * steps_done},
        "last_step_output": history[-1] if history else None,
        "step_history": history,
        "status": status,
        "created_at": created,
        # A run is last touched when it finished or failed, about as long as it ran.
        "updated_at": min(created + timedelta(milliseconds=duration_ms), now),
        "total_steps": len(steps),
        "error_message": error,
        "execution_time_ms": duration_ms if status != "running" else None,
        "memory_usage_mb": round(48.0 + 11.5 * steps_done, 1),
    }


def when(value: datetime | str) -> str:
    """'3 h ago' style text for a datetime, or the ISO text the listing methods return."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.tzinfo is None:  # naive values are UTC by convention
        moment = moment.replace(tzinfo=UTC)
    age = datetime.now(UTC) - moment
    if age < timedelta(hours=1):
        return f"{int(age.total_seconds() // 60)} min ago"
    if age < timedelta(days=2):
        return f"{int(age.total_seconds() // 3600)} h ago"
    return f"{age.days} days ago"


def heading(text: str) -> None:
    print(f"\n{text}\n{'-' * len(text)}")


def table(rows: list[dict[str, Any]]) -> None:
    if not rows:
        print("  (none)")
        return
    print(f"  {'RUN':<12} {'PIPELINE':<18} {'STATUS':<10} {'STEP':>5}  CREATED")
    for row in rows:
        step = f"{row['current_step_index']}/{row['total_steps']}"
        print(
            f"  {row['run_id']:<12} {row['pipeline_id']:<18} {row['status']:<10} {step:>5}  "
            f"{when(row['created_at'])}"
        )


async def main(db_path: Path) -> None:
    print(f"flujo-sqlite quickstart, database: {db_path}")

    async with SQLiteBackend(db_path) as backend:
        for run_id, pipeline_id, status, age, steps_done, error in RUNS:
            await backend.save_state(
                run_id, make_state(pipeline_id, status, age, steps_done, error)
            )
        print(f"Saved {len(RUNS)} runs of {len(STEPS)} pipelines.")

        heading("Load one run")
        state = await backend.load_state("churn-v9")
        assert state is not None
        print(
            f"  {state['pipeline_name']} v{state['pipeline_version']}: {state['status']}, "
            f"step {state['current_step_index']} of {state['total_steps']}"
        )
        print(f"  context: {state['pipeline_context']}")
        print(f"  last step: {state['last_step_output']}")
        print(f"  created {when(state['created_at'])} ({state['created_at']:%Y-%m-%d %H:%M} UTC)")

        heading("All runs, newest first")
        table(await backend.list_workflows())

        heading("Filtered: status='failed'")
        table(await backend.list_workflows(status="failed"))

        heading("Filtered: pipeline_id='weekly-digest'")
        table(await backend.list_workflows(pipeline_id="weekly-digest"))

        heading("Paging, 4 runs per page")
        page_size, offset, page = 4, 0, 1
        while rows := await backend.list_workflows(limit=page_size, offset=offset):
            print(f"  page {page}: {', '.join(row['run_id'] for row in rows)}")
            offset, page = offset + page_size, page + 1

        heading("Statistics")
        stats = await backend.get_workflow_stats()
        print(f"  total runs:           {stats['total_workflows']}")
        counts = ", ".join(f"{status} {n}" for status, n in sorted(stats["status_counts"].items()))
        print(f"  by status:            {counts}")
        print(f"  created in last 24 h: {stats['recent_workflows_24h']}")
        print(f"  average run time:     {stats['average_execution_time_ms']:.0f} ms")

        heading("Failed in the last 24 hours")
        for run in await backend.get_failed_workflows(hours_back=24):
            print(f"  {run['run_id']} ({run['pipeline_name']}), {when(run['updated_at'])}")
            print(f"    {run['error_message']}")

        heading("Cleanup")
        deleted = await backend.cleanup_old_workflows(days_old=7)
        remaining = len(await backend.list_workflows())
        print(f"  removed {deleted} runs created more than 7 days ago; {remaining} remain")

        await backend.delete_state("digest-w24")
        gone = await backend.load_state("digest-w24")
        print(f"  deleted digest-w24 by hand; load_state now returns {gone}")

    print("\nClosed. Open the file with any SQLite tool, e.g.:")
    print(f'  sqlite3 {db_path} "SELECT run_id, status, created_at FROM workflow_state"')


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart_workflows.db")))
