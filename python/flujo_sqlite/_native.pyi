"""The compiled core of flujo-sqlite. Private: use the ``flujo_sqlite`` package instead."""

from asyncio import Future
from collections.abc import Callable
from datetime import datetime
from os import PathLike
from typing import Any, final

@final
class CompletionPort:
    """Resolves the futures of one event loop; the shim creates one per loop and registers
    ``loop.add_reader(port.fileno(), port.drain)``."""

    def __new__(cls) -> CompletionPort: ...
    def fileno(self) -> int: ...
    def drain(self) -> None: ...

@final
class NativeBackend:
    def __new__(
        cls,
        path: str | PathLike[str],
        *,
        durability: str,
        lock_timeout: float,
        readers: int = 2,
        fresh_layout: str = "flujo-0.6",
    ) -> NativeBackend: ...
    @property
    def path(self) -> str: ...
    def save_state(
        self,
        port: CompletionPort,
        run_id: str,
        state: dict[str, Any],
        expected_updated_at: datetime | str | None = None,
    ) -> Future[None]: ...
    def load_state(self, port: CompletionPort, run_id: str) -> Future[dict[str, Any] | None]: ...
    def delete_state(self, port: CompletionPort, run_id: str) -> Future[None]: ...
    def list_states(
        self, port: CompletionPort, status: str | None = None
    ) -> Future[list[dict[str, Any]]]: ...
    def list_workflows(
        self,
        port: CompletionPort,
        status: str | None = None,
        pipeline_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Future[list[dict[str, Any]]]: ...
    def get_workflow_stats(self, port: CompletionPort) -> Future[dict[str, Any]]: ...
    def get_failed_workflows(
        self, port: CompletionPort, hours_back: float
    ) -> Future[list[dict[str, Any]]]: ...
    def cleanup_old_workflows(self, port: CompletionPort, days_old: float) -> Future[int]: ...
    def close(self, port: CompletionPort) -> Future[None]: ...
    def close_blocking(self) -> None: ...

def register_serializer(type_: type, function: Callable[[Any], Any]) -> None:
    """Store instances of ``type_`` (and its subclasses) as ``function(obj)``, encoded again."""

def encode_json(value: Any, path: str = "value") -> str:
    """The JSON text ``save_state`` would store for ``value``."""

def decode_json(text: str) -> Any:
    """Python objects for stored JSON text, as ``load_state`` returns them."""

def recover(
    path: str | PathLike[str],
    *,
    backup_path: str | PathLike[str] | None = None,
    fresh_layout: str = "flujo-0.6",
) -> dict[str, Any]:
    """Blocking ``flujo_sqlite.recover`` (the GIL is released while it works): back up ``path``,
    rebuild it from every readable row, and return the report."""
