"""(e) Steps whose outputs Flujo's serializer stores in a way of its own: callables (stored as
their name) and a type registered with Flujo's ``register_custom_serializer``. Flujo's runner
saves each step's output; a backend that refuses such a value crashed the run (0.4.35) or lost
the step record (0.6.11, which logs the failure and goes on).
"""

from __future__ import annotations

import asyncio

import _common as c


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


async def main() -> None:
    args = c.parse_args()
    from flujo import Pipeline, Step
    from flujo.utils.serialization import register_custom_serializer

    register_custom_serializer(Money, lambda m: {"cents": m.cents, "currency": "USD"})

    async def pick_tools(data: object) -> dict[str, object]:
        return {"tools": [len, str.upper], "choice": "len", "for": data}

    async def quote(picked: dict[str, object]) -> dict[str, object]:
        return {"total": Money(999), "tool": picked["choice"]}

    backend = c.backend_from_args(args)
    pipeline = Pipeline.from_step(Step.from_callable(pick_tools, name="pick_tools")) >> (
        Step.from_callable(quote, name="quote")
    )
    await c.run_and_report(pipeline, backend, args)


if __name__ == "__main__":
    asyncio.run(main())
