"""Deterministic workflow states for the child-process tests.

A child program saves ``state_for(run_id, version)``; the parent test, which never sees what the
child sent, recomputes it from the run id and version alone and compares ``load_state`` with
``expected_load``. Sizes vary (a few bytes to ~30 KB of context) so saves span several pages and
the WAL reaches checkpoints during a kill test.
"""

from __future__ import annotations

import hashlib
import random
from datetime import UTC, datetime, timedelta
from typing import Any

BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
STATUSES = ("running", "paused", "completed", "failed", "cancelled")
_BLOB_SIZES = (16, 300, 2_000, 6_000)


def _rng(run_id: str, version: int) -> random.Random:
    digest = hashlib.sha256(f"{run_id}\x1f{version}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def state_for(run_id: str, version: int, pipeline_id: str = "reliability") -> dict[str, Any]:
    """The state saved for ``run_id`` at ``version``; every field depends on both."""
    rng = _rng(run_id, version)
    size = 30_000 if rng.random() < 0.04 else rng.choice(_BLOB_SIZES)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 é😀"
    blob = "".join(rng.choice(alphabet) for _ in range(size // 8)) * 8
    created = BASE_TIME + timedelta(
        seconds=rng.randrange(10_000_000), microseconds=rng.randrange(1, 10**6)
    )
    return {
        "pipeline_id": pipeline_id,
        "pipeline_name": f"pipeline {run_id} v{version}",
        "pipeline_version": f"{version}.{rng.randrange(100)}",
        "current_step_index": version * 10 + rng.randrange(10),
        "pipeline_context": {
            "run": run_id,
            "version": version,
            "blob": blob,
            "numbers": [rng.randrange(-(2**40), 2**40) for _ in range(rng.randrange(1, 20))],
            "ratio": rng.random(),
            "flags": {"a": rng.random() < 0.5, "b": None},
        },
        "last_step_output": {"version": version, "out": rng.random()},
        "step_history": [{"step": i, "ok": True} for i in range(version % 5)],
        "status": STATUSES[(version + rng.randrange(5)) % 5],
        "created_at": created,
        "updated_at": created + timedelta(seconds=version),
        "total_steps": 7 + version,
        "error_message": None if rng.random() < 0.5 else f"error {run_id}/{version}",
        "execution_time_ms": rng.randrange(10**9),
        "memory_usage_mb": round(rng.random() * 1000, 3),
    }


def expected_load(run_id: str, version: int, pipeline_id: str = "reliability") -> dict[str, Any]:
    """What ``load_state(run_id)`` returns after ``save_state(run_id, state_for(...))``."""
    loaded = dict(state_for(run_id, version, pipeline_id))
    loaded["run_id"] = run_id
    return loaded


def loaded_version(loaded: dict[str, Any]) -> int:
    return int(loaded["pipeline_context"]["version"])


def matches(
    loaded: dict[str, Any] | None, run_id: str, version: int, pipeline_id: str = "reliability"
) -> bool:
    """True when ``loaded`` is exactly the saved content (extra keys a layout adds are ignored)."""
    if loaded is None:
        return False
    expected = expected_load(run_id, version, pipeline_id)
    return {key: loaded.get(key, KeyError) for key in expected} == expected
