"""Read back one run through a backend's query API and print it as one JSON line (``RESULT ...``).

Calls, in order: ``load_state``, ``get_run_details``, ``list_run_steps``, ``get_trace``,
``get_spans`` and ``list_runs`` (whichever the backend has), with the exact argument forms Flujo's
runner and ``flujo lens`` use. Datetimes are printed as ``{"__datetime__": isoformat}``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import _common as c


def _enc(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return {"__datetime__": value.isoformat()}
    if isinstance(value, dict):
        return {str(k): _enc(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_enc(v) for v in value]
    return value


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--backend", choices=["ours", "flujo"], required=True)
    p.add_argument("--db", required=True)
    p.add_argument("--run-id", required=True)
    args = p.parse_args()
    backend = c.make_backend(args.backend, str(Path(args.db)))
    out: dict[str, Any] = {"flujo_version": c.FLUJO_VERSION, "backend": type(backend).__module__}
    calls = [
        ("load_state", lambda: backend.load_state(args.run_id)),
        ("get_run_details", lambda: backend.get_run_details(args.run_id)),
        ("list_run_steps", lambda: backend.list_run_steps(args.run_id)),
        ("get_trace", lambda: backend.get_trace(args.run_id)),
        ("get_spans", lambda: backend.get_spans(args.run_id, status=None, name=None)),
        ("list_runs", lambda: backend.list_runs(status=None, pipeline_name=None, limit=50)),
    ]
    try:
        for name, call in calls:
            try:
                out[name] = _enc(await call())
            except Exception as exc:  # noqa: BLE001 reported, asserted on by the test
                out[name] = {"__error__": f"{type(exc).__name__}: {exc}"}
    finally:
        await c.close_backend(backend)
    c.emit(out)


if __name__ == "__main__":
    asyncio.run(main())
