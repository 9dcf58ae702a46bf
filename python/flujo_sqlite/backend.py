"""The public ``SQLiteBackend``: a thin asyncio face over the Rust engine in ``_native``."""

from __future__ import annotations

import asyncio
import atexit
import os
import weakref
from pathlib import Path
from typing import Any, Literal

from ._native import CompletionPort, NativeBackend
from .errors import InvalidStateError

__all__ = ["SQLiteBackend"]

# One completion port per event loop: engine threads post finished work to it and the loop
# resolves the futures in batches (see src/python/completion.rs).
_PORTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CompletionPort] = (
    weakref.WeakKeyDictionary()
)
_OPEN_BACKENDS: weakref.WeakSet[SQLiteBackend] = weakref.WeakSet()


def _port() -> CompletionPort:
    loop = asyncio.get_running_loop()
    port = _PORTS.get(loop)
    if port is None:
        port = CompletionPort()
        loop.add_reader(port.fileno(), port.drain)
        _PORTS[loop] = port
    return port


@atexit.register
def _close_open_backends() -> None:
    # Acknowledged writes are already durable; this lets queued ones finish and threads stop.
    for backend in list(_OPEN_BACKENDS):
        backend._native.close_blocking()


class SQLiteBackend:
    """Durable workflow state in a SQLite file, file-compatible with Flujo's own backend."""

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        durability: Literal["full", "normal"] = "full",
        lock_timeout: float = 30.0,
    ) -> None:
        path = Path(db_path)
        if str(path) == ":memory:":
            raise InvalidStateError(
                "SQLiteBackend needs a file path; in-memory databases are not supported "
                "(use a file in a temporary directory, e.g. pytest's tmp_path)"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db_path = path
        self._native = NativeBackend(
            os.fspath(path), durability=durability, lock_timeout=lock_timeout
        )
        _OPEN_BACKENDS.add(self)

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.db_path)!r})"

    async def save_state(self, run_id: str, state: dict[str, Any]) -> None:
        await self._native.save_state(_port(), run_id, state)

    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        return await self._native.load_state(_port(), run_id)

    async def delete_state(self, run_id: str) -> None:
        await self._native.delete_state(_port(), run_id)

    async def list_states(self, status: str | None = None) -> list[dict[str, Any]]:
        return await self._native.list_states(_port(), status)

    async def list_workflows(
        self,
        status: str | None = None,
        pipeline_id: str | None = None,
        limit: int | None = None,
        offset: int = 0,
    ) -> list[dict[str, Any]]:
        return await self._native.list_workflows(_port(), status, pipeline_id, limit, offset)

    async def get_workflow_stats(self) -> dict[str, Any]:
        return await self._native.get_workflow_stats(_port())

    async def get_failed_workflows(self, hours_back: float = 24) -> list[dict[str, Any]]:
        return await self._native.get_failed_workflows(_port(), hours_back)

    async def cleanup_old_workflows(self, days_old: float = 30) -> int:
        return await self._native.cleanup_old_workflows(_port(), days_old)

    async def close(self) -> None:
        await self._native.close(_port())
        _OPEN_BACKENDS.discard(self)

    async def shutdown(self) -> None:
        await self.close()

    async def __aenter__(self) -> SQLiteBackend:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
