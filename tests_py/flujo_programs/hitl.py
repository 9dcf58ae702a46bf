"""(d) Human-in-the-loop: ``--phase start`` runs step ``before_review`` and pauses at the
``human_review`` step (Flujo's ``Step.human_in_the_loop``); ``--phase resume`` runs in another
process, rebuilds the paused ``PipelineResult`` from the persisted workflow state of ``--run-id``
(Flujo's own ``StateManager.load_workflow_state``, which calls ``backend.load_state``) and calls
``Flujo.resume_async(paused_result, human_input)``, which runs ``after_review``.
"""

from __future__ import annotations

import asyncio

import _common as c


def build_pipeline(log: str):
    from flujo import Pipeline, Step

    before = c.make_logging_step("before_review", log)
    review = Step.human_in_the_loop("human_review", message_for_user="Approve the draft?")
    after = c.make_logging_step("after_review", log)
    return Pipeline.from_step(before) >> review >> after


def _state_manager(backend):
    try:  # 0.6.x layout
        from flujo.application.core.state.state_manager import StateManager
    except ImportError:  # 0.4.x layout
        from flujo.application.core.state_manager import StateManager
    return StateManager(backend)


async def rehydrate(backend, run_id: str):
    from flujo.domain.models import PipelineResult

    (context, _last, _idx, _created, _name, _version, history) = await _state_manager(
        backend
    ).load_workflow_state(run_id)
    if context is None:
        raise SystemExit(f"no persisted state for run {run_id!r}")
    return PipelineResult(step_history=history, final_pipeline_context=context)


async def main() -> None:
    args = c.parse_args(
        [
            ("--phase", {"choices": ["start", "resume"], "required": True}),
            ("--input", {"default": "approved"}),
        ]
    )
    backend = c.backend_from_args(args)
    runner = c.make_runner(build_pipeline(args.log), backend, args.pipeline_name)
    try:
        if args.phase == "start":
            result = await c.run_to_result(runner, "draft", args.run_id)
        else:
            paused = await rehydrate(backend, args.run_id)
            result = await runner.resume_async(paused, args.input)
        c.emit(c.summarize(result, run_id=args.run_id, phase=args.phase))
    finally:
        await c.close_backend(backend)


if __name__ == "__main__":
    asyncio.run(main())
