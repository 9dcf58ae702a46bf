"""Run a Flujo pipeline with flujo-sqlite as its state backend, then read back what it stored.

Needs Flujo installed beside flujo-sqlite (`pip install flujo` on Python 3.11/3.12 gives 0.4.35;
3.13 gives 0.6.x). Run: python examples/flujo_pipeline.py [DB_PATH]
(DB_PATH defaults to target/flujo_pipeline.db, relative to the current directory.)
Then browse the same file with Flujo's own CLI:
    FLUJO_STATE_URI=sqlite:////absolute/path/to/DB_PATH flujo lens list
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from flujo import Flujo, Pipeline, Step
from flujo_sqlite import SQLiteBackend


async def fetch(data: str) -> str:
    return f"{data} -> fetched"


async def clean(data: str) -> str:
    return f"{data} -> cleaned"


async def report(data: str) -> str:
    return f"{data} -> reported"


async def main(db_path: Path) -> None:
    pipeline = Pipeline.from_step(Step.from_callable(fetch, name="fetch"))
    pipeline = pipeline >> Step.from_callable(clean, name="clean")
    pipeline = pipeline >> Step.from_callable(report, name="report")

    run_id = f"demo-{uuid.uuid4().hex[:8]}"
    async with SQLiteBackend(db_path) as backend:
        runner = Flujo(pipeline, state_backend=backend, pipeline_name="daily_report")
        result = None
        async for item in runner.run_async("orders.csv", run_id=run_id):
            result = item
        print(f"run {run_id}: {[step.output for step in result.step_history][-1]}")

        state = await backend.load_state(run_id)
        print(f"  state:  {state['status']} at step {state['current_step_index']}")
        details = await backend.get_run_details(run_id)
        print(f"  run:    {details['pipeline_name']} {details['status']}")
        for step in await backend.list_run_steps(run_id):
            print(f"  step {step['step_index']}: {step['step_name']} {step['status']}")
        trace = await backend.get_trace(run_id)
        if trace is not None:
            print(f"  trace:  {trace['name']} with {len(trace['children'])} child spans")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1] if len(sys.argv) > 1 else "target/flujo_pipeline.db")))
