"""(a) Run a 4-step pipeline of plain async callables to completion with the given backend.

With ``--block-at N`` the Nth step (1-based) records itself in the log and then sleeps, so the
parent can SIGKILL the process after step N-1 was persisted (program (b)). The same program with
the same ``--run-id`` and without ``--block-at`` is the resumption (program (c)): Flujo's runner
loads the persisted state for that run id and continues from ``current_step_index``.
"""

from __future__ import annotations

import asyncio

import _common as c

STEP_NAMES = ["step_one", "step_two", "step_three", "step_four"]


async def main() -> None:
    args = c.parse_args([("--block-at", {"type": int, "default": 0})])
    from flujo import Pipeline

    backend = c.backend_from_args(args)
    steps = [
        c.make_logging_step(name, args.log, block=(i + 1 == args.block_at))
        for i, name in enumerate(STEP_NAMES)
    ]
    pipeline = Pipeline.from_step(steps[0])
    for step in steps[1:]:
        pipeline = pipeline >> step
    await c.run_and_report(pipeline, backend, args)


if __name__ == "__main__":
    asyncio.run(main())
