#!/usr/bin/env python3
"""Side-by-side benchmark: Flujo 0.4.35's SQLite state backend vs flujo-sqlite.

Run ``python benchmarks/bench.py`` (or ``make bench``) from a virtualenv that holds
``flujo==0.4.35``, ``sqlvalidator`` and this package; see ``benchmarks/README.md``.

Every measurement runs in its own child process (one backend, one scenario, one repetition), so
``ru_maxrss`` is that backend's peak RSS for that scenario and nothing leaks between backends.
Repetitions are interleaved (Flujo, ours, ours, Flujo, ...) so slow drifts of a noisy machine hit
both sides alike; the table shows medians over repetitions and ratios of those medians. Only the
ratios are meant to be quoted: absolute numbers move +-20% between runs on shared machines.

Nothing here asserts on timings; the script fails only when a backend raises or the two backends
disagree on what a query returned (reported, not fatal).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from array import array
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

CONCURRENCY = 64
TICK_S = 0.001
SEED = 20240501

# --------------------------------------------------------------------------------------------
# Realistic data
# --------------------------------------------------------------------------------------------

_WORDS = [
    "customer",
    "account",
    "billing",
    "invoice",
    "refund",
    "subscription",
    "plan",
    "upgrade",
    "downgrade",
    "error",
    "timeout",
    "request",
    "response",
    "payload",
    "token",
    "model",
    "prompt",
    "context",
    "summary",
    "resolution",
    "ticket",
    "escalation",
    "priority",
    "agent",
    "review",
    "approve",
    "reject",
    "retry",
    "policy",
    "document",
    "section",
    "clause",
    "contract",
    "renewal",
    "delivery",
    "shipment",
    "tracking",
    "address",
    "payment",
    "card",
    "declined",
    "fraud",
    "check",
    "verify",
    "identity",
    "email",
    "password",
    "reset",
    "login",
    "session",
    "device",
    "browser",
    "mobile",
    "desktop",
    "latency",
    "region",
    "cluster",
    "deploy",
    "release",
    "version",
    "feature",
    "flag",
    "rollout",
    "experiment",
    "metric",
    "dashboard",
    "alert",
    "incident",
    "postmortem",
]

PIPELINES = [
    "customer-support-triage",
    "invoice-extraction",
    "contract-review",
    "lead-enrichment",
    "code-review-assistant",
    "doc-qa-rag",
    "email-drafting",
    "fraud-screening",
    "meeting-summarizer",
    "sql-generator",
    "translation-batch",
    "resume-screening",
    "churn-analysis",
    "kyc-verification",
    "product-tagging",
    "news-digest",
    "claims-processing",
    "log-anomaly-triage",
    "survey-coding",
    "compliance-audit",
]
# Zipf-like popularity: the first pipelines hold most runs.
PIPELINE_WEIGHTS = [1.0 / (k + 1) ** 0.8 for k in range(len(PIPELINES))]
STATUSES = ["completed", "failed", "running", "paused", "cancelled"]
STATUS_WEIGHTS = [0.70, 0.12, 0.08, 0.05, 0.05]
ERRORS = [
    "TimeoutError: step 'call_model' exceeded 30.0s",
    "ValidationError: 1 validation error for TriageResult\nconfidence\n  Input should be <= 1",
    "RateLimitError: 429 Too Many Requests (retry after 20s)",
    "UsageLimitExceededError: cost limit of $0.50 exceeded",
    "ConnectionError: upstream tool 'crm_lookup' unreachable",
]
STEP_NAMES = ["load_input", "retrieve", "call_model", "validate", "postprocess", "persist"]


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n_words))


def make_context(rng: random.Random, step: int = 0) -> dict[str, Any]:
    """A nested pipeline context of about 2 KB of JSON, shaped like a typical Flujo context."""
    return {
        "initial_prompt": _text(rng, 30),
        "user": {
            "id": f"user-{rng.randrange(100_000):06d}",
            "tier": rng.choice(["free", "pro", "enterprise"]),
            "locale": rng.choice(["en-US", "de-DE", "fr-FR", "ja-JP"]),
            "preferences": {"tone": rng.choice(["formal", "friendly"]), "max_tokens": 512},
        },
        "ticket": {
            "id": f"T-{rng.randrange(10**7):07d}",
            "subject": _text(rng, 8),
            "body": _text(rng, 60),
            "tags": rng.sample(_WORDS, 4),
            "priority": rng.randint(1, 4),
        },
        "retrieval": {
            "query": _text(rng, 10),
            "documents": [
                {
                    "doc_id": f"kb-{rng.randrange(10**5)}",
                    "score": round(rng.random(), 4),
                    "snippet": _text(rng, 14),
                }
                for _ in range(3)
            ],
        },
        "scratchpad": {
            "plan": [_text(rng, 6) for _ in range(3)],
            "step": step,
            "notes": None,
        },
        "metrics": {
            "tokens_in": rng.randint(200, 4000),
            "tokens_out": rng.randint(50, 800),
            "cost_usd": round(rng.random() / 20, 5),
            "model": rng.choice(["openai:gpt-4o-mini", "anthropic:claude-3-5-haiku"]),
        },
        "flags": {"pii_redacted": rng.random() < 0.5, "human_review": rng.random() < 0.1},
    }


def make_step_history(rng: random.Random, n_steps: int) -> list[dict[str, Any]]:
    return [
        {
            "name": STEP_NAMES[k % len(STEP_NAMES)],
            "output": _text(rng, 12),
            "success": True,
            "attempts": 1 + (rng.random() < 0.1),
            "latency_s": round(rng.random() * 3, 4),
            "token_counts": rng.randint(0, 1500),
            "cost_usd": round(rng.random() / 100, 6),
            "feedback": None,
            "metadata_": {},
        }
        for k in range(n_steps)
    ]


def make_state(
    rng: random.Random,
    *,
    status: str = "running",
    created_at: datetime | None = None,
    updated_at: datetime | None = None,
    pipeline: str | None = None,
) -> dict[str, Any]:
    now = datetime.now(UTC)
    pipeline = pipeline or rng.choices(PIPELINES, PIPELINE_WEIGHTS)[0]
    total = rng.randint(3, 6)
    step = total if status == "completed" else rng.randint(0, total - 1)
    return {
        "pipeline_id": pipeline,
        "pipeline_name": pipeline.replace("-", "_"),
        "pipeline_version": f"1.{rng.randint(0, 9)}.0",
        "current_step_index": step,
        "pipeline_context": make_context(rng, step),
        "last_step_output": {"answer": _text(rng, 25), "confidence": round(rng.random(), 3)},
        "step_history": make_step_history(rng, min(step, 4)),
        "status": status,
        "created_at": created_at or now,
        "updated_at": updated_at or created_at or now,
        "total_steps": total,
        "error_message": rng.choice(ERRORS) if status == "failed" else None,
        "execution_time_ms": rng.randint(300, 120_000) if status != "running" else None,
        "memory_usage_mb": round(40 + rng.random() * 200, 2),
    }


def _ts(dt: datetime) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S+00:00")


# --------------------------------------------------------------------------------------------
# Building the N-run file (once per run, identically for both backends)
# --------------------------------------------------------------------------------------------


def build_db(path: Path, n_rows: int, seed: int = SEED) -> dict[str, Any]:
    """Let Flujo's backend lay out an empty file, then bulk-insert ``n_rows`` runs with sqlite3.

    Timestamps are ISO text ``YYYY-MM-DD HH:MM:SS+00:00`` spread uniformly over the last 60 days
    (so about half are older than 30 days and ~1/60 of the failures fall in the last 24 h), rows
    inserted oldest first as a live system would have written them."""
    from flujo.state.backends.sqlite import SQLiteBackend as FlujoBackend

    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    rng = random.Random(seed)

    async def init() -> None:
        backend = FlujoBackend(path)
        await backend.save_state("layout-probe", make_state(rng))
        await backend.close()

    asyncio.run(init())
    now = datetime.now(UTC).replace(microsecond=0)
    ages = sorted((rng.random() * 60 for _ in range(n_rows)), reverse=True)  # days, oldest first
    run_ids = [uuid.UUID(int=rng.getrandbits(128), version=4).hex for _ in range(n_rows)]

    def rows():
        for age, run_id in zip(ages, run_ids):
            status = rng.choices(STATUSES, STATUS_WEIGHTS)[0]
            created = now - timedelta(days=age)
            updated = min(now, created + timedelta(seconds=rng.randint(1, 1800)))
            s = make_state(rng, status=status, created_at=created, updated_at=updated)
            yield (
                run_id,
                s["pipeline_id"],
                s["pipeline_name"],
                s["pipeline_version"],
                s["current_step_index"],
                json.dumps(s["pipeline_context"]),
                json.dumps(s["last_step_output"]),
                json.dumps(s["step_history"]),
                status,
                _ts(created),
                _ts(updated),
                s["total_steps"],
                s["error_message"],
                s["execution_time_ms"],
                s["memory_usage_mb"],
            )

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("DELETE FROM workflow_state")
    conn.executemany(
        "INSERT INTO workflow_state (run_id, pipeline_id, pipeline_name, pipeline_version,"
        " current_step_index, pipeline_context, last_step_output, step_history, status,"
        " created_at, updated_at, total_steps, error_message, execution_time_ms,"
        " memory_usage_mb) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        rows(),
    )
    conn.execute("COMMIT")
    counts = dict(conn.execute("SELECT pipeline_id, COUNT(*) FROM workflow_state GROUP BY 1"))
    old = conn.execute(
        "SELECT COUNT(*) FROM workflow_state WHERE created_at < datetime('now', '-30 days')"
    ).fetchone()[0]
    failed_24h = conn.execute(
        "SELECT COUNT(*) FROM workflow_state WHERE status = 'failed'"
        " AND updated_at >= datetime('now', '-24 hours')"
    ).fetchone()[0]
    avg_ctx = conn.execute("SELECT AVG(LENGTH(pipeline_context)) FROM workflow_state").fetchone()[0]
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    # A pipeline with a few thousand runs (the third most popular), for the pipeline+offset query.
    pipeline_x = sorted(counts, key=counts.get, reverse=True)[min(2, len(counts) - 1)]
    sample = random.Random(seed + 1).sample(run_ids, min(5000, n_rows))
    return {
        "rows": n_rows,
        "pipeline_x": pipeline_x,
        "pipeline_x_rows": counts[pipeline_x],
        "older_than_30d": old,
        "failed_last_24h": failed_24h,
        "avg_context_bytes": round(avg_ctx),
        "file_mb": round(path.stat().st_size / 2**20, 1),
        "sample_ids": sample,
    }


# --------------------------------------------------------------------------------------------
# Child side: one backend, one scenario
# --------------------------------------------------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


class Latencies:
    """A uniform random sample (reservoir) of at most ``KEEP`` latencies, plus the exact count and
    maximum. A plain list would grow with the number of calls, so the faster backend would be
    charged megabytes of the harness's floats in its peak RSS (80,000 loads: ~2.5 MB); this keeps
    the harness's memory the same for both. Percentiles of 10,000 samples are exact to well under
    a percentile point, and exact whenever there were fewer calls."""

    KEEP = 10_000

    def __init__(self) -> None:
        self.sample = array("d")
        self.count = 0
        self.max = float("nan")
        self._rng = random.Random(SEED + 11)

    def append(self, value: float) -> None:
        self.count += 1
        if not value <= self.max:  # also true while max is still NaN
            self.max = value
        if len(self.sample) < self.KEEP:
            self.sample.append(value)
        else:
            slot = self._rng.randrange(self.count)
            if slot < self.KEEP:
                self.sample[slot] = value

    def __len__(self) -> int:
        return self.count


def _lat_summary(lats: Latencies) -> dict[str, float]:
    values = list(lats.sample)
    return {
        "p50_ms": _pct(values, 0.50) * 1e3,
        "p90_ms": _pct(values, 0.90) * 1e3,
        "p99_ms": _pct(values, 0.99) * 1e3,
        "max_ms": lats.max * 1e3,
    }


def _new_state(pool: list[dict[str, Any]], i: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    s = dict(pool[i % len(pool)])
    s["created_at"] = now
    s["updated_at"] = now
    return s


def _state_pool(n: int, status: str = "running") -> list[dict[str, Any]]:
    rng = random.Random(SEED + 7)
    return [make_state(rng, status=status) for _ in range(n)]


async def sc_seq_save(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    pool = _state_pool(256)
    lats = Latencies()
    i = 0
    start = time.perf_counter()
    deadline = start + spec["duration"]
    while True:
        run_id = uuid.uuid4().hex
        state = _new_state(pool, i)
        t = time.perf_counter()
        await b.save_state(run_id, state)
        end = time.perf_counter()
        lats.append(end - t)
        i += 1
        if end >= deadline and i >= spec["min_ops"]:
            break
    return {"ops": i, "wall_s": end - start, **_lat_summary(lats)}


async def sc_conc_update(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    pool = _state_pool(CONCURRENCY)
    run_ids = [uuid.uuid4().hex for _ in range(CONCURRENCY)]
    states = [_new_state(pool, k) for k in range(CONCURRENCY)]
    for run_id, state in zip(run_ids, states):  # create the runs outside timing
        await b.save_state(run_id, state)
    lats = Latencies()
    start = time.perf_counter()
    deadline = start + spec["duration"]

    async def worker(run_id: str, state: dict[str, Any]) -> int:
        n = 0
        ctx = state["pipeline_context"]
        while True:
            n += 1
            state = dict(state)
            state["current_step_index"] = n % (state["total_steps"] + 1)
            state["pipeline_context"] = {**ctx, "scratchpad": {**ctx["scratchpad"], "step": n}}
            state["updated_at"] = datetime.now(UTC)
            t = time.perf_counter()
            await b.save_state(run_id, state)
            end = time.perf_counter()
            lats.append(end - t)
            if end >= deadline and n * CONCURRENCY >= spec["min_ops"]:
                return n

    counts = await asyncio.gather(*(worker(r, s) for r, s in zip(run_ids, states)))
    wall = time.perf_counter() - start
    # Each task must read back its own last write.
    for run_id, n in zip(run_ids, counts):
        got = await b.load_state(run_id)
        if got is None or got["pipeline_context"]["scratchpad"]["step"] != n:
            raise AssertionError(f"run {run_id}: lost update (expected step {n}, got {got})")
    return {"ops": sum(counts), "wall_s": wall, **_lat_summary(lats)}


async def sc_seq_load(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    ids = list(spec["sample_ids"])
    random.Random(SEED + 3).shuffle(ids)
    lats = Latencies()
    i = 0
    start = time.perf_counter()
    deadline = start + spec["duration"]
    while True:
        t = time.perf_counter()
        state = await b.load_state(ids[i % len(ids)])
        end = time.perf_counter()
        lats.append(end - t)
        if state is None:
            raise AssertionError(f"load_state({ids[i % len(ids)]!r}) returned None")
        i += 1
        if end >= deadline and i >= spec["min_ops"]:
            break
    return {"ops": i, "wall_s": end - start, **_lat_summary(lats)}


async def sc_conc_load(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    ids = list(spec["sample_ids"])
    lats = Latencies()
    start = time.perf_counter()
    deadline = start + spec["duration"]

    async def worker(k: int) -> int:
        rng = random.Random(SEED + 100 + k)
        n = 0
        while True:
            t = time.perf_counter()
            state = await b.load_state(rng.choice(ids))
            end = time.perf_counter()
            lats.append(end - t)
            n += 1
            if state is None:
                raise AssertionError("load_state returned None for an existing run")
            if end >= deadline and n * CONCURRENCY >= spec["min_ops"]:
                return n

    counts = await asyncio.gather(*(worker(k) for k in range(CONCURRENCY)))
    return {"ops": sum(counts), "wall_s": time.perf_counter() - start, **_lat_summary(lats)}


def _admin_queries(pipeline_x: str) -> dict[str, Callable[[Any], Any]]:
    return {
        "list_failed": lambda b: b.list_workflows(status="failed", limit=50),
        "list_pipeline_offset": lambda b: b.list_workflows(
            pipeline_id=pipeline_x, limit=50, offset=100
        ),
        "stats": lambda b: b.get_workflow_stats(),
        "failed_24h": lambda b: b.get_failed_workflows(24),
    }


def _digest(name: str, result: Any) -> Any:
    if name == "stats":
        r = dict(result)
        r["average_execution_time_ms"] = round(float(r["average_execution_time_ms"] or 0), 3)
        return r
    # (run_id, sort key): the queries order by created_at / updated_at only, so rows with equal
    # timestamps may legitimately come back in a different order.
    key = "updated_at" if name == "failed_24h" else "created_at"
    return [[row["run_id"], str(row[key])] for row in result]


def _compare_lists(fd: list[list[str]], od: list[list[str]]) -> str:
    f_ids, o_ids = [r[0] for r in fd], [r[0] for r in od]
    if f_ids == o_ids:
        return f"same result ({len(fd)} rows)"
    common = set(f_ids) & set(o_ids)
    only = [r for r in fd if r[0] not in common] + [r for r in od if r[0] not in common]
    f_keys = [r[1] for r in fd if r[0] in common]
    o_keys = [r[1] for r in od if r[0] in common]
    moved = sum(
        a != b for a, b in zip([i for i in f_ids if i in common], [i for i in o_ids if i in common])
    )
    parts = [f"Flujo {len(fd)} rows, ours {len(od)} rows, {len(common)} in both"]
    if only:
        parts.append(
            f"in one only: {', '.join(f'{r[0][:8]}@{r[1]}' for r in only[:4])}"
            + (" ..." if len(only) > 4 else "")
            + " (expected only at the time-window boundary)"
        )
    if f_keys != o_keys:
        parts.append("common rows in a DIFFERENT sort-key order")
    elif moved:
        parts.append(
            f"{moved} rows with equal sort keys in a different order (ties; unordered in Flujo)"
        )
    return "; ".join(parts)


async def sc_admin(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, call in _admin_queries(spec["pipeline_x"]).items():
        first = await call(b)  # warm-up outside timing
        lats = Latencies()
        start = time.perf_counter()
        deadline = start + spec["duration"]
        while True:
            t = time.perf_counter()
            await call(b)
            end = time.perf_counter()
            lats.append(end - t)
            if end >= deadline and len(lats) >= spec["min_admin_ops"]:
                break
        out[name] = {
            "ops": len(lats),
            "wall_s": end - start,
            "digest": _digest(name, first),
            **_lat_summary(lats),
        }
    return out


async def sc_cleanup(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    t = time.perf_counter()
    deleted = await b.cleanup_old_workflows(30)
    dt = time.perf_counter() - t
    remaining = (await b.get_workflow_stats())["total_workflows"]
    # Ours copies the WAL back into the file on a background thread after a cleanup, and
    # close() waits for it: timing close() shows that work too.
    t = time.perf_counter()
    await b.close()
    close_s = time.perf_counter() - t
    return {
        "ops": 1,
        "wall_s": dt,
        "seconds": dt,
        "close_s": close_s,
        "deleted": deleted,
        "remaining": remaining,
    }


async def sc_cleanup_busy(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """cleanup_old_workflows(30) while the application goes on using the backend: a save every
    5 ms, a load every 2 ms and a 1 ms ticker. Reports how long each had to wait meanwhile."""
    pool = _state_pool(64)
    ids = spec["sample_ids"]
    stop = asyncio.Event()
    window: list[float] = []  # [start, end] of the cleanup
    samples: dict[str, list[tuple[float, float]]] = {"save": [], "load": [], "tick": []}
    errors: list[str] = []

    async def repeat(kind: str, pause: float, call: Callable[[int], Any]) -> None:
        i = 0
        while not stop.is_set():
            t = time.perf_counter()
            try:
                await call(i)
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                errors.append(f"{kind}: {type(e).__name__}: {e}")
            samples[kind].append((t, time.perf_counter() - t))
            i += 1
            await asyncio.sleep(pause)

    async def tick() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            samples["tick"].append((t, time.perf_counter() - t - TICK_S))

    tasks = [
        asyncio.create_task(
            repeat("save", 0.005, lambda i: b.save_state(uuid.uuid4().hex, _new_state(pool, i)))
        ),
        asyncio.create_task(repeat("load", 0.002, lambda i: b.load_state(ids[i % len(ids)]))),
        asyncio.create_task(tick()),
    ]
    await asyncio.sleep(0.2)
    window.append(time.perf_counter())
    deleted = await b.cleanup_old_workflows(30)
    window.append(time.perf_counter())
    stop.set()
    await asyncio.gather(*tasks)

    def during(kind: str) -> list[float]:
        return [lat for t, lat in samples[kind] if window[0] <= t <= window[1]]

    saves, loads, ticks = during("save"), during("load"), during("tick")
    return {
        "ops": 1,
        "wall_s": window[1] - window[0],
        "seconds": window[1] - window[0],
        "deleted": deleted,
        "saves": len(saves),
        "save_p99_ms": _pct(saves, 0.99) * 1e3,
        "save_max_ms": max(saves, default=float("nan")) * 1e3,
        "loads": len(loads),
        "load_p99_ms": _pct(loads, 0.99) * 1e3,
        "load_max_ms": max(loads, default=float("nan")) * 1e3,
        "tick_max_ms": max(ticks, default=float("nan")) * 1e3,
        "errors": errors[:5],
        "error_count": len(errors),
    }


async def sc_ticker(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    async def tick(stop: asyncio.Event, lateness: list[float]) -> None:
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(TICK_S)
            lateness.append(time.perf_counter() - t - TICK_S)

    # Idle baseline: the same ticker with nothing else running.
    idle: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(tick(stop, idle))
    await asyncio.sleep(spec["idle_s"])
    stop.set()
    await task

    pool = _state_pool(256)
    busy: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(tick(stop, busy))
    await asyncio.sleep(0)
    n = 0
    start = time.perf_counter()
    deadline = start + spec["duration"]
    while time.perf_counter() < deadline or n < spec["min_ops"]:
        await b.save_state(uuid.uuid4().hex, _new_state(pool, n))
        n += 1
    wall = time.perf_counter() - start
    stop.set()
    await task
    return {
        "ops": n,
        "wall_s": wall,
        "ticks": len(busy),
        "tick_p99_ms": _pct(busy, 0.99) * 1e3,
        "tick_max_ms": max(busy) * 1e3,
        "idle_tick_p99_ms": _pct(idle, 0.99) * 1e3,
        "idle_tick_max_ms": max(idle) * 1e3,
    }


async def sc_curve(b: Any, spec: dict[str, Any]) -> dict[str, Any]:
    return await sc_admin(b, spec)


SCENARIOS: dict[str, Callable[[Any, dict[str, Any]], Any]] = {
    "seq_save": sc_seq_save,
    "conc_update": sc_conc_update,
    "seq_load": sc_seq_load,
    "conc_load": sc_conc_load,
    "admin": sc_admin,
    "cleanup": sc_cleanup,
    "cleanup_busy": sc_cleanup_busy,
    "ticker": sc_ticker,
    "curve": sc_curve,
}


async def child_main(spec: dict[str, Any]) -> dict[str, Any]:
    rss_start = _rss_mb()
    t_import = time.perf_counter()
    if spec["backend"] == "flujo":
        from flujo.state.backends.sqlite import SQLiteBackend

        kwargs: dict[str, Any] = {}
    else:
        from flujo_sqlite import SQLiteBackend

        kwargs = {"durability": spec["durability"]} if spec.get("durability") else {}
    import_s = time.perf_counter() - t_import
    rss_import = _rss_mb()
    t = time.perf_counter()
    backend = SQLiteBackend(Path(spec["db"]), **kwargs)
    await backend.load_state("warm-up-no-such-run")  # first call: schema check, our indexes
    open_s = time.perf_counter() - t
    rss_open = _rss_mb()
    try:
        result = await SCENARIOS[spec["scenario"]](backend, spec)
    finally:
        await backend.close()
    if spec.get("reopen"):
        t = time.perf_counter()
        again = SQLiteBackend(Path(spec["db"]), **kwargs)
        await again.load_state("warm-up-no-such-run")
        result["reopen_s"] = time.perf_counter() - t
        await again.close()
    result.update(
        import_s=import_s,
        open_s=open_s,
        rss_start_mb=rss_start,
        rss_import_mb=rss_import,
        rss_open_mb=rss_open,
        rss_peak_mb=_rss_mb(),
    )
    return result


def run_as_child(spec_path: str, out_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    try:
        if spec["scenario"] == "build":
            result = build_db(Path(spec["db"]), spec["rows"])
        else:
            result = asyncio.run(child_main(spec))
        payload = {"ok": True, "result": result}
    except BaseException as exc:  # noqa: BLE001 -- the parent reports every failure
        payload = {
            "ok": False,
            "error": f"{type(exc).__name__}: {exc}",
            "tb": traceback.format_exc(),
        }
    Path(out_path).write_text(json.dumps(payload))


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


class Runner:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.errors: list[str] = []
        self.t0 = time.perf_counter()

    def log(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    def child(self, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any] | None:
        out = self.workdir / f"result-{uuid.uuid4().hex}.json"
        spec_file = self.workdir / f"spec-{uuid.uuid4().hex}.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [self.args.python, os.path.abspath(__file__), "--child", str(spec_file), str(out)]
        env = dict(os.environ, PYTHONHASHSEED="0")
        try:
            proc = subprocess.run(
                cmd, check=False, capture_output=True, text=True, timeout=timeout, env=env
            )
        except subprocess.TimeoutExpired:
            self.errors.append(
                f"{spec['scenario']}/{spec.get('backend')}: timed out after {timeout}s"
            )
            return None
        finally:
            spec_file.unlink(missing_ok=True)
        if not out.exists():
            tail = (proc.stderr or "").strip().splitlines()[-15:]
            self.errors.append(
                f"{spec['scenario']}/{spec.get('backend')}: child exited {proc.returncode} "
                "without a result:\n    " + "\n    ".join(tail)
            )
            return None
        payload = json.loads(out.read_text())
        out.unlink()
        if not payload["ok"]:
            self.errors.append(
                f"{spec['scenario']}/{spec.get('backend')}: {payload['error']}\n{payload['tb']}"
            )
            return None
        return payload["result"]

    def build(self, rows: int) -> tuple[Path, dict[str, Any]]:
        path = self.workdir / f"base-{rows}.db"
        self.log(f"building the {rows:,}-run file with Flujo's layout + sqlite3 bulk insert ...")
        t = time.perf_counter()
        meta = self.child({"scenario": "build", "db": str(path), "rows": rows, "backend": "flujo"})
        if meta is None:
            raise SystemExit("could not build the database file:\n" + "\n".join(self.errors))
        meta["build_s"] = time.perf_counter() - t
        self.log(
            f"  built in {meta['build_s']:.1f}s: {meta['file_mb']} MB, "
            f"avg context {meta['avg_context_bytes']} B, {meta['older_than_30d']:,} older than 30 days, "
            f"{meta['failed_last_24h']} failed in last 24h, pipeline_x={meta['pipeline_x']} "
            f"({meta['pipeline_x_rows']:,} runs)"
        )
        return path, meta

    def copy_of(self, base: Path | None, tag: str) -> Path:
        dst = self.workdir / f"run-{tag}-{uuid.uuid4().hex[:8]}.db"
        if base is not None:
            shutil.copyfile(base, dst)
        return dst

    @staticmethod
    def remove(path: Path) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)


VARIANTS = {  # variant -> (backend, durability)
    "flujo": ("flujo", None),
    "ours": ("ours", None),
    "ours_normal": ("ours", "normal"),
}


def main_parent(args: argparse.Namespace) -> int:
    quick = args.quick
    duration = args.duration or (0.4 if quick else 2.0)
    reps = args.reps or (2 if quick else 3)
    rows = args.rows or (10_000 if quick else 100_000)
    curve_sizes = [] if args.no_curve else ([10_000] if quick else [10_000, 100_000])
    if args.curve_1m:
        curve_sizes.append(1_000_000)
    common = {
        "duration": duration,
        "min_ops": 20 if quick else 50,
        "min_admin_ops": 3,
        "idle_s": 0.3 if quick else 1.0,
    }

    workdir = Path(tempfile.mkdtemp(prefix="flujo-sqlite-bench-", dir=args.workdir))
    runner = Runner(args, workdir)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    curve: dict[int, list[dict[str, Any]]] = {}
    try:
        base, meta = runner.build(rows)
        file_scenarios = {"seq_load", "conc_load", "admin", "cleanup", "cleanup_busy"}
        plan = [
            ("seq_save", ["flujo", "ours", "ours_normal"]),
            ("conc_update", ["flujo", "ours"]),
            ("seq_load", ["flujo", "ours"]),
            ("conc_load", ["flujo", "ours"]),
            ("admin", ["flujo", "ours"]),
            ("cleanup", ["flujo", "ours"]),
            ("cleanup_busy", ["flujo", "ours"]),
            ("ticker", ["flujo", "ours", "ours_normal"]),
        ]
        if args.only:
            plan = [p for p in plan if p[0] in args.only.split(",")]
        for rep in range(reps):
            for scenario, variants in plan:
                order = variants if rep % 2 == 0 else list(reversed(variants))
                for variant in order:
                    backend, durability = VARIANTS[variant]
                    db = runner.copy_of(base if scenario in file_scenarios else None, variant)
                    spec = dict(
                        common,
                        scenario=scenario,
                        backend=backend,
                        durability=durability,
                        db=str(db),
                        pipeline_x=meta["pipeline_x"],
                        sample_ids=meta["sample_ids"]
                        if scenario in ("seq_load", "conc_load", "cleanup_busy")
                        else [],
                        reopen=scenario == "admin",
                    )
                    res = runner.child(spec)
                    runner.remove(db)
                    status = "ERROR" if res is None else _short(scenario, res)
                    runner.log(f"rep {rep + 1}/{reps} {scenario:<12} {variant:<12} {status}")
                    if res is not None:
                        results.setdefault(scenario, {}).setdefault(variant, []).append(res)

        for size in curve_sizes:
            if size == rows:
                cbase, cmeta = base, meta
            else:
                cbase, cmeta = runner.build(size)
            for rep in range(reps):
                db = runner.copy_of(cbase, f"curve{size}")
                spec = dict(
                    common,
                    scenario="curve",
                    backend="ours",
                    durability=None,
                    db=str(db),
                    pipeline_x=cmeta["pipeline_x"],
                    sample_ids=[],
                    reopen=False,
                )
                res = runner.child(spec)
                runner.remove(db)
                runner.log(
                    f"curve {size:>9,} rep {rep + 1}/{reps} {'ERROR' if res is None else 'ok'}"
                )
                if res is not None:
                    res["rows"] = size
                    res["build_s"] = cmeta["build_s"]
                    curve.setdefault(size, []).append(res)
            if cbase != base:
                runner.remove(cbase)
    finally:
        total = time.perf_counter() - runner.t0
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    report = render(args, meta, results, curve, runner.errors, total, duration, reps)
    print(report)
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                {
                    "meta": {k: v for k, v in meta.items() if k != "sample_ids"},
                    "results": results,
                    "curve": curve,
                    "errors": runner.errors,
                },
                indent=1,
                default=str,
            )
        )
    return 1 if runner.errors else 0


def _short(scenario: str, res: dict[str, Any]) -> str:
    if scenario == "admin":
        return " ".join(
            f"{k}={v['ops'] / v['wall_s']:.1f}/s" for k, v in res.items() if isinstance(v, dict)
        )
    if scenario == "cleanup":
        return f"{res['seconds']:.2f}s deleted={res['deleted']} close={res['close_s']:.2f}s"
    if scenario == "cleanup_busy":
        return (
            f"{res['seconds']:.2f}s deleted={res['deleted']} save max={res['save_max_ms']:.1f}ms"
            f" load max={res['load_max_ms']:.1f}ms tick max={res['tick_max_ms']:.1f}ms"
            f" errors={res['error_count']}"
        )
    if scenario == "ticker":
        return f"{res['ops'] / res['wall_s']:.0f} saves/s tick p99={res['tick_p99_ms']:.2f}ms max={res['tick_max_ms']:.2f}ms"
    return f"{res['ops'] / res['wall_s']:.0f} ops/s p99={res['p99_ms']:.2f}ms rss={res['rss_peak_mb']:.0f}MB"


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _med(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else float("nan")


def _fmt(v: float, digits: int | None = None) -> str:
    if math.isnan(v):
        return "-"
    if digits is None:
        digits = 0 if abs(v) >= 100 else 1 if abs(v) >= 10 else 2 if abs(v) >= 1 else 3
    return f"{v:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "-"
    r = a / b
    return f"{r:,.0f}x" if r >= 100 else f"{r:,.1f}x" if r >= 10 else f"{r:.2f}x"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
            )
            + " |"
        )

    sep = (
        "|"
        + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])


def machine_info() -> str:
    cpu = "?"
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                cpu = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import importlib.metadata as md

        flujo_v = md.version("flujo")
        ours_v = md.version("flujo-sqlite")
    except Exception:  # noqa: BLE001
        flujo_v = ours_v = "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"machine: {cpu}, {os.cpu_count()} vCPU, {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}; Python {platform.python_version()}, stdlib sqlite3 "
        f"{sqlite3.sqlite_version}; flujo {flujo_v}, flujo-sqlite {ours_v}"
    )


def render(
    args: argparse.Namespace,
    meta: dict[str, Any],
    results: dict[str, dict[str, list[dict[str, Any]]]],
    curve: dict[int, list[dict[str, Any]]],
    errors: list[str],
    total_s: float,
    duration: float,
    reps: int,
) -> str:
    out: list[str] = []
    out.append("flujo-sqlite vs Flujo 0.4.35 SQLiteBackend" + ("  (--quick)" if args.quick else ""))
    out.append(machine_info())
    out.append(
        f"data: {meta['rows']:,} runs, {meta['file_mb']} MB, avg pipeline_context "
        f"{meta['avg_context_bytes']} B; {reps} repetitions x {duration:g}s per measurement, "
        f"medians shown; each backend/scenario/repetition in its own process; total {total_s:.0f}s"
    )
    out.append(
        "ratios compare medians measured in this run; absolute numbers vary +-20% run to run"
    )
    out.append("")

    def get(scenario: str, variant: str) -> list[dict[str, Any]]:
        return results.get(scenario, {}).get(variant, [])

    def thr(rs: list[dict[str, Any]], key: str | None = None) -> float:
        rs = [r[key] if key else r for r in rs]
        return _med([r["ops"] / r["wall_s"] for r in rs])

    def lat(rs: list[dict[str, Any]], field: str, key: str | None = None) -> float:
        return _med([(r[key] if key else r)[field] for r in rs])

    headers = [
        "scenario",
        "Flujo ops/s",
        "ours ops/s",
        "ours/Flujo",
        "Flujo p50 / p99 ms",
        "ours p50 / p99 ms",
        "p99 ours/Flujo",
        "peak RSS MB Flujo / ours",
    ]
    rows: list[list[str]] = []

    def add(
        label: str,
        f: list[dict[str, Any]],
        o: list[dict[str, Any]],
        key: str | None = None,
        rss: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None,
    ) -> None:
        ft, ot = thr(f, key), thr(o, key)
        fp50, fp99 = lat(f, "p50_ms", key), lat(f, "p99_ms", key)
        op50, op99 = lat(o, "p50_ms", key), lat(o, "p99_ms", key)
        rf, ro = rss if rss else (f, o)
        rows.append(
            [
                label,
                _fmt(ft),
                _fmt(ot),
                _ratio(ot, ft),
                f"{_fmt(fp50)} / {_fmt(fp99)}",
                f"{_fmt(op50)} / {_fmt(op99)}",
                _ratio(op99, fp99),
                f"{_fmt(_med([r['rss_peak_mb'] for r in rf]), 0)} / {_fmt(_med([r['rss_peak_mb'] for r in ro]), 0)}",
            ]
        )

    add("sequential save_state, new runs", get("seq_save", "flujo"), get("seq_save", "ours"))
    add(
        "  ours durability='normal' (vs Flujo)",
        get("seq_save", "flujo"),
        get("seq_save", "ours_normal"),
    )
    add(
        f"{CONCURRENCY} tasks updating own runs",
        get("conc_update", "flujo"),
        get("conc_update", "ours"),
    )
    add(
        f"sequential load_state ({meta['rows']:,}-run file)",
        get("seq_load", "flujo"),
        get("seq_load", "ours"),
    )
    add(
        f"{CONCURRENCY}-way concurrent load_state",
        get("conc_load", "flujo"),
        get("conc_load", "ours"),
    )
    admin_labels = {
        "list_failed": "list_workflows(status='failed', limit=50)",
        "list_pipeline_offset": "list_workflows(pipeline_id=X, limit=50, offset=100)",
        "stats": "get_workflow_stats()",
        "failed_24h": "get_failed_workflows(24)",
    }
    fa, oa = get("admin", "flujo"), get("admin", "ours")
    for key, label in admin_labels.items():
        add(label, fa, oa, key=key, rss=(fa, oa))
    out.append(
        "Throughput and latency (ops/s: higher is better, ratio > 1 = ours faster; "
        "latency ratio < 1 = ours faster)"
    )
    out.append(_table(headers, rows))
    out.append("")

    # One-shot timings
    rows = []
    fc, oc = get("cleanup", "flujo"), get("cleanup", "ours")
    fs, os_ = _med([r["seconds"] for r in fc]), _med([r["seconds"] for r in oc])
    deleted = sorted({r["deleted"] for r in fc + oc})
    rows.append(
        [
            f"cleanup_old_workflows(30) on {meta['rows']:,} runs (deleted {', '.join(f'{d:,}' for d in deleted)})",
            _fmt(fs, 2),
            _fmt(os_, 3),
            _ratio(os_, fs),
        ]
    )
    fcl = _med([r["seconds"] + r["close_s"] for r in fc if "close_s" in r])
    ocl = _med([r["seconds"] + r["close_s"] for r in oc if "close_s" in r])
    rows.append(
        [
            "  the same, then close() (ours waits there for its background checkpoint)",
            _fmt(fcl, 2),
            _fmt(ocl, 3),
            _ratio(ocl, fcl),
        ]
    )
    fo = _med([r["open_s"] for r in fa])
    oo = _med([r["open_s"] for r in oa])
    rows.append(
        [
            f"first open + first call on the {meta['rows']:,}-run file (ours builds its indexes)",
            _fmt(fo, 3),
            _fmt(oo, 3),
            _ratio(oo, fo),
        ]
    )
    fr = _med([r.get("reopen_s", float("nan")) for r in fa])
    orr = _med([r.get("reopen_s", float("nan")) for r in oa])
    rows.append(["re-open + first call, same file", _fmt(fr, 3), _fmt(orr, 3), _ratio(orr, fr)])
    fe = _med([r["open_s"] for r in get("seq_save", "flujo")])
    oe = _med([r["open_s"] for r in get("seq_save", "ours")])
    rows.append(["open + first call on a new empty file", _fmt(fe, 3), _fmt(oe, 3), _ratio(oe, fe)])
    fi_s = _med([r["import_s"] for v in results.values() for r in v.get("flujo", [])])
    oi_s = _med([r["import_s"] for v in results.values() for r in v.get("ours", [])])
    rows.append(
        [
            "import of the backend's module (warm disk cache)",
            _fmt(fi_s, 3),
            _fmt(oi_s, 3),
            _ratio(oi_s, fi_s),
        ]
    )
    out.append("One-shot timings (seconds; ratio < 1 = ours faster)")
    out.append(_table(["operation", "Flujo s", "ours s", "ours/Flujo"], rows))
    out.append("")

    fb, ob = get("cleanup_busy", "flujo"), get("cleanup_busy", "ours")
    if fb or ob:
        rows = []
        for label, rs in (("Flujo", fb), ("ours", ob)):
            rows.append(
                [
                    label,
                    _fmt(_med([r["seconds"] for r in rs]), 2),
                    f"{_fmt(_med([r['saves'] for r in rs]))}",
                    f"{_fmt(lat(rs, 'save_p99_ms'))} / {_fmt(lat(rs, 'save_max_ms'))}",
                    f"{_fmt(lat(rs, 'load_p99_ms'))} / {_fmt(lat(rs, 'load_max_ms'))}",
                    _fmt(lat(rs, "tick_max_ms")),
                    str(sum(r["error_count"] for r in rs)),
                ]
            )
        out.append(
            "Cleanup while the application goes on: cleanup_old_workflows(30) with a save every "
            "5 ms, a load every 2 ms and a 1 ms ticker running (waits measured during the cleanup)"
        )
        out.append(
            _table(
                [
                    "backend",
                    "cleanup s",
                    "saves meanwhile",
                    "save p99 / max ms",
                    "load p99 / max ms",
                    "tick max lateness ms",
                    "errors",
                ],
                rows,
            )
        )
        for r in fb + ob:
            for e in r["errors"]:
                out.append(f"  error: {e}")
        out.append("")

    # Ticker
    ft, ot = get("ticker", "flujo"), get("ticker", "ours")
    rows = []
    for label, rs in (
        ("Flujo", ft),
        ("ours", ot),
        ("ours durability='normal'", get("ticker", "ours_normal")),
    ):
        rows.append(
            [
                label,
                _fmt(thr(rs)),
                f"{_fmt(lat(rs, 'tick_p99_ms'))} / {_fmt(lat(rs, 'tick_max_ms'))}",
                f"{_fmt(lat(rs, 'idle_tick_p99_ms'))} / {_fmt(lat(rs, 'idle_tick_max_ms'))}",
            ]
        )
    rows.append(
        [
            "ours/Flujo",
            _ratio(thr(ot), thr(ft)),
            f"{_ratio(lat(ot, 'tick_p99_ms'), lat(ft, 'tick_p99_ms'))} / {_ratio(lat(ot, 'tick_max_ms'), lat(ft, 'tick_max_ms'))}",
            "",
        ]
    )
    out.append(
        f"Event-loop wake-up delay: a {TICK_S * 1e3:g} ms asyncio ticker while one task saves flat out"
    )
    out.append(
        _table(["backend", "saves/s", "tick lateness p99 / max ms", "idle p99 / max ms"], rows)
    )
    out.append("")

    # Peak RSS
    def peak(variant: str, field: str) -> float:
        vals = [
            _med([r[field] for r in v.get(variant, [])]) for v in results.values() if v.get(variant)
        ]
        vals = [x for x in vals if not math.isnan(x)]
        return max(vals) if vals else float("nan")

    fp, op = peak("flujo", "rss_peak_mb"), peak("ours", "rss_peak_mb")
    fi, oi = peak("flujo", "rss_import_mb"), peak("ours", "rss_import_mb")
    out.append(
        "Peak RSS (max over scenarios of the per-scenario median; 'after import' = interpreter "
        "+ the backend's package, before opening a file)"
    )
    out.append(
        _table(
            ["backend", "peak RSS MB", "after import MB", "peak - import MB"],
            [
                ["Flujo", _fmt(fp, 0), _fmt(fi, 0), _fmt(fp - fi, 0)],
                ["ours", _fmt(op, 0), _fmt(oi, 0), _fmt(op - oi, 0)],
                ["ours/Flujo", _ratio(op, fp), _ratio(oi, fi), _ratio(op - oi, fp - fi)],
            ],
        )
    )
    out.append("")

    # Curve
    if curve:
        rows = []
        for size in sorted(curve):
            rs = curve[size]
            row = [f"{size:,}"]
            for key in admin_labels:
                row.append(f"{_fmt(lat(rs, 'p50_ms', key))} / {_fmt(lat(rs, 'p99_ms', key))}")
            row.append(_fmt(_med([r["open_s"] for r in rs]), 2))
            rows.append(row)
        out.append(
            "Curve, ours only: admin-query latency p50 / p99 ms by file size "
            "(first-open column: one-time index build + first call, s)"
        )
        out.append(
            _table(
                [
                    "runs",
                    "list failed",
                    "list pipeline+offset",
                    "stats",
                    "failed 24h",
                    "first open s",
                ],
                rows,
            )
        )
        out.append("")

    # Cross-checks: did both backends return the same thing?
    checks: list[str] = []
    if fa and oa:
        for key, label in admin_labels.items():
            fd, od = fa[0][key]["digest"], oa[0][key]["digest"]
            if isinstance(fd, list) and isinstance(od, list):
                checks.append(f"  {label}: {_compare_lists(fd, od)}")
            elif fd == od:
                checks.append(f"  {label}: same values")
            elif isinstance(fd, dict) and isinstance(od, dict) and all(k in od for k in fd):
                extra = sorted(set(od) - set(fd))
                diff = {k: (fd[k], od[k]) for k in fd if fd[k] != od[k]}
                note = f"ours adds keys {extra}; " if extra else ""
                if not diff:
                    checks.append(f"  {label}: same values for Flujo's keys ({note.rstrip('; ')})")
                else:
                    checks.append(
                        f"  {label}: {note}differs in {diff} (Flujo, ours)"
                        + (
                            " (recent_workflows_24h moves with the clock)"
                            if set(diff) == {"recent_workflows_24h"}
                            else ""
                        )
                    )
            else:
                checks.append(f"  {label}: DIFFERS: Flujo {fd} / ours {od}")
    if fc and oc:
        fd = sorted({r["deleted"] for r in fc})
        od = sorted({r["deleted"] for r in oc})
        same = "same" if fd == od else "DIFFERS"
        checks.append(
            f"  cleanup_old_workflows(30) deleted: Flujo {fd}, ours {od} ({same}; "
            f"the 30-day boundary moves between processes, off-by-a-few is expected)"
        )
    if checks:
        out.append(
            "Cross-checks (first repetition; admin queries run minutes apart, so a run on a "
            "24h/30d boundary may differ):"
        )
        out.extend(checks)
        out.append("")
    if errors:
        out.append(f"ERRORS ({len(errors)}):")
        out.extend("  " + e.replace("\n", "\n  ") for e in errors)
    return "\n".join(out)


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "--child":
        run_as_child(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="~1 minute smoke run: 10k-run file, short measurements, 2 reps",
    )
    p.add_argument("--reps", type=int, help="repetitions per measurement (default 3, quick 2)")
    p.add_argument("--duration", type=float, help="seconds per timed loop (default 2.0, quick 0.4)")
    p.add_argument(
        "--rows", type=int, help="runs in the admin/load/cleanup file (default 100000, quick 10000)"
    )
    p.add_argument("--no-curve", action="store_true", help="skip the ours-only size curve")
    p.add_argument(
        "--curve-1m",
        action="store_true",
        help="add 1,000,000 runs to the curve (builds a ~4 GB file, several minutes)",
    )
    p.add_argument(
        "--only",
        help="comma-separated scenarios: seq_save,conc_update,seq_load,conc_load,admin,cleanup,"
        "cleanup_busy,ticker",
    )
    p.add_argument(
        "--python",
        default=sys.executable,
        help="interpreter for the child processes (default: this one)",
    )
    p.add_argument(
        "--workdir", help="where to put the temporary database files (default: system temp dir)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--json-out", help="also write all raw measurements to this JSON file")
    p.add_argument(
        "--build-only",
        metavar="PATH",
        help="only write the --rows-run file to PATH, print its metadata as JSON, and exit",
    )
    args = p.parse_args()
    if args.build_only:
        meta = build_db(Path(args.build_only), args.rows or 100_000)
        meta["sample_ids"] = meta["sample_ids"][:20]
        print(json.dumps(meta, indent=1))
        return 0
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
