"""Shared helpers for the end-to-end Flujo programs.

These programs are run as subprocesses by ``tests_py/test_flujo_runner.py`` with the interpreter of
the Flujo version under test (0.4.35 on CPython 3.11, 0.6.11 on CPython 3.13). Every program takes
``--backend ours|flujo`` and ``--db PATH`` so the same program runs against Flujo's own
``SQLiteBackend`` (the control) and against ``flujo_sqlite.SQLiteBackend``.

Each step appends one line ``<step name>`` to the ``--log`` file, so the parent can see exactly which
steps executed in which process. Programs print one JSON line prefixed with ``RESULT `` at the end.

Optional ``--spy PATH`` wraps the backend in a recorder that appends one JSON line per backend call
(method, arguments, return value) to PATH; used to document what each runner version calls.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import os
import sys
from importlib.metadata import version as _dist_version
from pathlib import Path
from typing import Any

FLUJO_VERSION = _dist_version("flujo")
FLUJO_06 = not FLUJO_VERSION.startswith("0.4.")


def parse_args(extra: list[tuple[str, dict[str, Any]]] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["ours", "flujo"], required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--log", required=True, help="file each step appends its name to")
    p.add_argument("--spy", default=None, help="append a JSON line per backend call here")
    p.add_argument("--pipeline-name", default="e2e_pipeline")
    for name, kw in extra or []:
        p.add_argument(name, **kw)
    return p.parse_args()


def make_backend(kind: str, db: str) -> Any:
    if kind == "ours":
        from flujo_sqlite import SQLiteBackend
    else:
        from flujo.state.backends.sqlite import SQLiteBackend
    return SQLiteBackend(Path(db))


def _jsonable(value: Any) -> Any:
    try:
        return json.loads(json.dumps(value, default=lambda o: f"<{type(o).__name__}> {o!r}"))
    except Exception:  # noqa: BLE001
        return repr(value)


def _shape(value: Any) -> Any:
    """Type shape of a value (dict keys -> type names), to document argument shapes."""
    if isinstance(value, dict):
        return {str(k): _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]] if value else []
    return type(value).__name__


class Spy:
    """Delegating wrapper that records every call the runner makes on the backend."""

    def __init__(self, inner: Any, path: str) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_path", path)

    def _record(self, name: str, args: tuple, kwargs: dict, result: Any, error: Any) -> None:
        entry = {
            "pid": os.getpid(),
            "method": name,
            "args": _jsonable(list(args)),
            "arg_shapes": [_shape(a) for a in args],
            "kwargs": _jsonable(kwargs),
            "result": _jsonable(result),
            "result_shape": _shape(result),
            "error": error,
        }
        with open(self._path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name.startswith("__") or not callable(attr):
            return attr
        spy = self
        if inspect.iscoroutinefunction(attr):

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                try:
                    result = await attr(*args, **kwargs)
                except BaseException as exc:
                    spy._record(name, args, kwargs, None, f"{type(exc).__name__}: {exc}")
                    raise
                spy._record(name, args, kwargs, result, None)
                return result

            return async_wrapper

        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                result = attr(*args, **kwargs)
            except BaseException as exc:
                spy._record(name, args, kwargs, None, f"{type(exc).__name__}: {exc}")
                raise
            spy._record(name, args, kwargs, result, None)
            return result

        return sync_wrapper


def backend_from_args(args: argparse.Namespace) -> Any:
    backend = make_backend(args.backend, args.db)
    if args.spy:
        return Spy(backend, args.spy)
    return backend


async def close_backend(backend: Any) -> None:
    """Close the backend (Flujo 0.6.11's pooled connection otherwise hangs interpreter exit)."""
    inner = getattr(backend, "_inner", backend)
    for name in ("close", "shutdown"):
        fn = getattr(inner, name, None)
        if fn is None:
            continue
        res = fn()
        if inspect.isawaitable(res):
            await res
        return


def make_logging_step(name: str, log: str, *, block: bool = False) -> Any:
    """A plain async callable step that appends its name to ``log`` (and blocks if asked)."""
    from flujo import Step

    async def fn(data: Any) -> Any:
        with open(log, "a", encoding="utf-8") as fh:  # noqa: ASYNC230
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if block:
            # The parent kills the process while this step is running.
            await asyncio.sleep(3600)
        return f"{data}|{name}"

    fn.__name__ = name
    return Step.from_callable(fn, name=name)


def make_runner(pipeline: Any, backend: Any, pipeline_name: str) -> Any:
    from flujo import Flujo

    return Flujo(pipeline, state_backend=backend, pipeline_name=pipeline_name)


async def run_to_result(runner: Any, data: Any, run_id: str) -> Any:
    result = None
    async for item in runner.run_async(data, run_id=run_id):
        result = item
    return result


async def run_and_report(pipeline: Any, backend: Any, args: argparse.Namespace) -> None:
    """Runs ``pipeline`` on ``"start"`` to its result, prints the summary, closes the backend."""
    runner = make_runner(pipeline, backend, args.pipeline_name)
    try:
        result = await run_to_result(runner, "start", args.run_id)
        emit(summarize(result, run_id=args.run_id))
    finally:
        await close_backend(backend)


def context_status(ctx: Any) -> Any:
    if ctx is None:
        return None
    status = getattr(ctx, "status", None)  # 0.6.x: a typed field
    if status is None or not isinstance(status, str):
        scratch = getattr(ctx, "scratchpad", None) or {}
        status = scratch.get("status")
    return status


def summarize(result: Any, **extra: Any) -> dict[str, Any]:
    ctx = getattr(result, "final_pipeline_context", None)
    history = list(getattr(result, "step_history", None) or [])
    return {
        "flujo_version": FLUJO_VERSION,
        "python": sys.version.split()[0],
        "status": context_status(ctx),
        "steps": [s.name for s in history],
        "success": [bool(s.success) for s in history],
        "last_output": _jsonable(history[-1].output) if history else None,
        **extra,
    }


def emit(summary: dict[str, Any]) -> None:
    print("RESULT " + json.dumps(summary), flush=True)
