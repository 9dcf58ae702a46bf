"""Opt-in lost-update protection: ``save_state(..., expected_updated_at=...)``."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from flujo_sqlite import ConflictError, InvalidStateError, SQLiteBackend


def state(status: str, updated_at: datetime, step: int = 0) -> dict:
    created = datetime(2026, 1, 1, tzinfo=UTC)
    return {
        "pipeline_id": "p",
        "pipeline_name": "P",
        "pipeline_version": "1",
        "current_step_index": step,
        "pipeline_context": {"step": step},
        "status": status,
        "created_at": created,
        "updated_at": updated_at,
    }


async def test_two_workers_resuming_the_same_run_cannot_both_advance_it(tmp_path: Path) -> None:
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
        await backend.save_state("run", state("paused", t0))
        seen_by_a = await backend.load_state("run")
        seen_by_b = await backend.load_state("run")
        assert seen_by_a is not None and seen_by_b is not None
        await backend.save_state(
            "run",
            state("running", t0 + timedelta(seconds=1), step=1),
            expected_updated_at=seen_by_a["updated_at"],
        )
        with pytest.raises(ConflictError, match="changed by another writer") as lost:
            await backend.save_state(
                "run",
                state("running", t0 + timedelta(seconds=2), step=7),
                expected_updated_at=seen_by_b["updated_at"],
            )
        assert "reload" in str(lost.value).lower()
        final = await backend.load_state("run")
        assert final is not None and final["current_step_index"] == 1
        # The loser reloads and retries on the fresh view.
        await backend.save_state(
            "run",
            state("running", t0 + timedelta(seconds=3), step=2),
            expected_updated_at=final["updated_at"],
        )
        assert (await backend.load_state("run"))["current_step_index"] == 2


async def test_many_concurrent_conditional_saves_let_exactly_one_win(tmp_path: Path) -> None:
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
        await backend.save_state("run", state("paused", t0))
        seen = (await backend.load_state("run"))["updated_at"]
        outcomes = await asyncio.gather(
            *(
                backend.save_state(
                    "run",
                    state("running", t0 + timedelta(seconds=1 + i), step=i),
                    expected_updated_at=seen,
                )
                for i in range(1, 33)
            ),
            return_exceptions=True,
        )
        winners = [i for i, o in enumerate(outcomes, start=1) if o is None]
        assert len(winners) == 1, outcomes
        assert all(isinstance(o, ConflictError) for o in outcomes if o is not None)
        assert (await backend.load_state("run"))["current_step_index"] == winners[0]


async def test_a_write_by_another_program_is_detected(tmp_path: Path) -> None:
    db_path = tmp_path / "wf.db"
    t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
    async with SQLiteBackend(db_path) as backend:
        await backend.save_state("run", state("paused", t0))
        seen = (await backend.load_state("run"))["updated_at"]
    # Another program (here: Flujo's own spelling of a later time) updates the run.
    conn = sqlite3.connect(db_path)
    conn.execute("UPDATE workflow_state SET updated_at = '2026-01-01T12:00:05+00:00'")
    conn.commit()
    conn.close()
    async with SQLiteBackend(db_path) as backend:
        with pytest.raises(ConflictError):
            await backend.save_state(
                "run", state("running", t0 + timedelta(seconds=9)), expected_updated_at=seen
            )
        # Flujo's text for the instant it wrote matches our datetime for it.
        fresh = (await backend.load_state("run"))["updated_at"]
        await backend.save_state(
            "run", state("running", t0 + timedelta(seconds=9)), expected_updated_at=fresh
        )
        await backend.delete_state("run")
        with pytest.raises(ConflictError, match="absent"):
            await backend.save_state(
                "run", state("running", t0 + timedelta(seconds=10)), expected_updated_at=fresh
            )


async def test_a_conditional_save_that_keeps_updated_at_is_refused(tmp_path: Path) -> None:
    """The stored updated_at is the token: a save that kept it let a second worker holding the
    same token overwrite the first one's save without a ConflictError (the guide's states carry
    whole-second times, so two saves within a second share one)."""
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
        await backend.save_state("run", state("paused", t0))
        seen = (await backend.load_state("run"))["updated_at"]
        # The same instant, also when spelled as Flujo's text.
        for expected in (seen, "2026-01-01T12:00:00+00:00"):
            with pytest.raises(InvalidStateError, match="must give the state a new updated_at"):
                await backend.save_state(
                    "run", state("running", t0, step=1), expected_updated_at=expected
                )
        assert (await backend.load_state("run"))["current_step_index"] == 0
        await backend.save_state(
            "run",
            state("running", t0 + timedelta(microseconds=1), step=1),
            expected_updated_at=seen,
        )
        with pytest.raises(ConflictError):
            await backend.save_state(
                "run", state("running", t0 + timedelta(seconds=1), step=2), expected_updated_at=seen
            )
        assert (await backend.load_state("run"))["current_step_index"] == 1


async def test_a_naive_expected_time_against_an_aware_stored_one_says_so(tmp_path: Path) -> None:
    async with SQLiteBackend(tmp_path / "wf.db") as backend:
        t0 = datetime(2026, 1, 1, 12, tzinfo=UTC)
        await backend.save_state("run", state("paused", t0))
        with pytest.raises(InvalidStateError, match="only one of them has a UTC offset") as raised:
            await backend.save_state(
                "run",
                state("running", t0 + timedelta(seconds=1)),
                expected_updated_at=t0.replace(tzinfo=None),
            )
        assert "load_state" in str(raised.value)
        # A real difference is still a conflict.
        with pytest.raises(ConflictError):
            await backend.save_state(
                "run",
                state("running", t0 + timedelta(seconds=1)),
                expected_updated_at=datetime(2026, 1, 1, 11),
            )
        assert (await backend.load_state("run"))["status"] == "paused"
