"""The compiled core of flujo-sqlite. Private: use the ``flujo_sqlite`` package instead."""

from collections.abc import Awaitable, Callable
from datetime import datetime
from os import PathLike
from typing import Any, final

__all__ = [
    "CompletionPort",
    "NativeBackend",
    "__version__",
    "decode_json",
    "encode_json",
    "honor_flujo_serializers",
    "recover",
    "register_serializer",
    "wait_for_dropped_backends",
]

__version__: str

@final
class CompletionPort:
    """Resolves the futures of one event loop; the shim creates one per loop and registers
    ``loop.add_reader(port.fileno(), port.drain)``."""

    def __new__(cls) -> CompletionPort: ...
    def caller_gone(self, call: object) -> None:
        """Tells the engine that nobody waits for ``call`` (an awaitable a method returned)."""
    def fileno(self) -> int: ...
    def drain(self) -> None: ...

@final
class NativeBackend:
    """Each method queues a request and returns an awaitable of its result: an asyncio future,
    or a coroutine when the result was ready at once."""

    def __new__(
        cls,
        path: str | PathLike[str],
        *,
        durability: str,
        lock_timeout: float,
        readers: int = 2,
        fresh_layout: str = "flujo-0.6",
        after: NativeBackend | None = None,
    ) -> NativeBackend: ...
    @property
    def has_connected(self) -> bool: ...
    def save_state(
        self,
        port: CompletionPort,
        run_id: str,
        state: dict[str, Any],
        expected_updated_at: datetime | str | None = None,
    ) -> Awaitable[None]: ...
    def load_state(self, port: CompletionPort, run_id: str) -> Awaitable[dict[str, Any] | None]: ...
    def delete_state(self, port: CompletionPort, run_id: str) -> Awaitable[None]: ...
    def list_states(
        self, port: CompletionPort, status: str | None = None
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def list_workflows(
        self,
        port: CompletionPort,
        status: str | None = None,
        pipeline_id: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def get_workflow_stats(self, port: CompletionPort) -> Awaitable[dict[str, Any]]: ...
    def get_failed_workflows(
        self, port: CompletionPort, hours_back: float
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def cleanup_old_workflows(self, port: CompletionPort, days_old: float) -> Awaitable[int]: ...
    def get_workflow_stats_blocking(self) -> dict[str, Any]: ...
    def save_run_start(self, port: CompletionPort, run_data: dict[str, Any]) -> Awaitable[None]: ...
    def save_step_result(
        self, port: CompletionPort, step_data: dict[str, Any]
    ) -> Awaitable[None]: ...
    def save_run_end(
        self, port: CompletionPort, run_id: str, end_data: dict[str, Any]
    ) -> Awaitable[None]: ...
    def get_run_details(
        self, port: CompletionPort, run_id: str
    ) -> Awaitable[dict[str, Any] | None]: ...
    def list_run_steps(
        self, port: CompletionPort, run_id: str
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def list_runs(
        self,
        port: CompletionPort,
        status: str | None = None,
        pipeline_name: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
        metadata_filter: dict[str, Any] | None = None,
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def delete_run(self, port: CompletionPort, run_id: str) -> Awaitable[None]: ...
    def save_trace(
        self, port: CompletionPort, run_id: str, trace: dict[str, Any]
    ) -> Awaitable[None]: ...
    def save_spans(
        self, port: CompletionPort, run_id: str, spans: list[dict[str, Any]]
    ) -> Awaitable[None]: ...
    def get_trace(self, port: CompletionPort, run_id: str) -> Awaitable[dict[str, Any] | None]: ...
    def get_spans(
        self,
        port: CompletionPort,
        run_id: str,
        status: str | None = None,
        name: str | None = None,
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def get_span_statistics(
        self,
        port: CompletionPort,
        pipeline_name: str | None = None,
        time_range: tuple[float, float] | None = None,
    ) -> Awaitable[dict[str, Any]]: ...
    def set_system_state(
        self, port: CompletionPort, key: str, value: dict[str, Any]
    ) -> Awaitable[None]: ...
    def get_system_state(
        self, port: CompletionPort, key: str
    ) -> Awaitable[dict[str, Any] | None]: ...
    def persist_evaluation(
        self,
        port: CompletionPort,
        run_id: str,
        score: float,
        feedback: str | None = None,
        step_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Awaitable[None]: ...
    def list_evaluations(
        self, port: CompletionPort, limit: int | None = None, run_id: str | None = None
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def list_background_tasks(
        self,
        port: CompletionPort,
        parent_run_id: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def get_failed_background_tasks(
        self, port: CompletionPort, parent_run_id: str | None, hours_back: float
    ) -> Awaitable[list[dict[str, Any]]]: ...
    def cleanup_stale_background_tasks(
        self, port: CompletionPort, stale_hours: float
    ) -> Awaitable[int]: ...
    def close(self, port: CompletionPort) -> Awaitable[None]: ...
    def close_blocking(self) -> None: ...

def wait_for_dropped_backends() -> None:
    """Wait until every backend dropped without ``close()`` has finished its queued writes; a
    Ctrl-C (``KeyboardInterrupt``) ends the wait, not the closing."""

def register_serializer(type_: type, function: Callable[[Any], Any]) -> None:
    """Store instances of ``type_`` (and its subclasses) as ``function(obj)``, encoded again."""

def honor_flujo_serializers(lookup: Callable[[Any], Callable[[Any], Any] | None]) -> None:
    """Makes the encoder ask ``lookup`` (Flujo's ``lookup_custom_serializer``) for a value none
    of ours serializes."""

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
