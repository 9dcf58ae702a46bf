"""The public ``SQLiteBackend``: a thin asyncio face over the Rust engine in ``_native``.

Every coroutine validates and converts its arguments at once (raising before anything is
queued), hands the work to the engine's threads and awaits a future that the engine resolves
through the event loop's completion port. No SQLite work happens on the event loop or with the
GIL held.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.metadata
import logging
import os
import re
import sys
import threading
import weakref
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any, Literal, Self, TypeVar

from ._native import (
    CompletionPort,
    NativeBackend,
    honor_flujo_serializers,
    wait_for_dropped_backends,
)
from .config import hide_password
from .errors import DatabaseError, InvalidStateError, InvalidTypeError

if TYPE_CHECKING:
    # Type checkers see Flujo's interface as the base too, so `Flujo(..., state_backend=ours)`
    # type-checks; without Flujo installed the base is `Any`.
    from flujo.state.backends.base import (  # type: ignore[import-not-found, unused-ignore]
        StateBackend as _Base,
    )

    from .recovery import RecoveryReport
else:
    try:  # Subclass Flujo's interface when Flujo is installed, so isinstance checks hold.
        from flujo.state.backends.base import StateBackend as _Base
    except ImportError:
        _Base = object

try:  # Types registered with Flujo's own register_custom_serializer are stored as in Flujo.
    from flujo.utils.serialization import (  # type: ignore[import-not-found, unused-ignore]
        lookup_custom_serializer,
    )
except ImportError:
    pass
else:
    honor_flujo_serializers(lookup_custom_serializer)

__all__ = ["SQLiteBackend"]

_T = TypeVar("_T")

# One completion port per event loop: engine threads post finished work to it and the loop
# resolves the futures in batches (see src/python/completion.rs). The loop keeps its port alive
# (the port's drain is its reader callback); here both are held weakly, as the port holds the
# futures waiting on it and they hold their loop: held strongly here, a loop closed or dropped
# with calls in flight could never be freed.
_PORTS: weakref.WeakKeyDictionary[
    asyncio.AbstractEventLoop, weakref.ReferenceType[CompletionPort]
] = weakref.WeakKeyDictionary()
# Every engine still in use or closing, whichever backend it belongs to, so that exit finds
# them all.
_OPEN_ENGINES: weakref.WeakSet[NativeBackend] = weakref.WeakSet()
_BACKENDS: weakref.WeakSet[SQLiteBackend] = weakref.WeakSet()
_REOPENING = threading.RLock()


_MAKING_PORTS = threading.Lock()


def _port() -> CompletionPort:
    loop = asyncio.get_running_loop()
    known = _PORTS.get(loop)
    port = known() if known is not None else None
    if port is None:
        with _MAKING_PORTS:  # threads running loops of their own make theirs at once
            known = _PORTS.get(loop)
            port = known() if known is not None else None
            if port is None:
                port = CompletionPort()
                loop.add_reader(port.fileno(), port.drain)
                _PORTS[loop] = weakref.ref(port)
    return port


async def _call(method: Callable[..., Awaitable[_T]], *args: Any) -> _T:
    """Awaits ``method(port, *args)``, a call of the engine. A caller that stops waiting (a
    cancelled or timed-out task, Ctrl-C) tells the engine, which then skips a read that has not
    begun (nobody could see its answer) and stops a cleanup after its current batch."""
    port = _port()
    call = method(port, *args)
    try:
        return await call
    except asyncio.CancelledError:
        port.caller_gone(call)
        raise


# Path spellings that only a shell or a URI parser understands; as a file path each one would
# quietly create a folder named "~", "$HOME" or "sqlite:" in the working directory. Names that
# merely start with those characters ("~backup", "$data" with no such variable) are left alone.
# A scheme of two letters or more, so that "C://x" stays a path. pathlib collapses the "//" of
# a URI made into a Path; there only the schemes of databases and files are taken for one,
# since "data:/x.db" may well be a folder named "data:".
_SQLITE_SCHEMES = r"sqlite3?(\+aiosqlite)?"
_SQLITE_SCHEME = re.compile(rf"(?i)^{_SQLITE_SCHEMES}$")
_URI = re.compile(r"(?i)^([a-z][a-z0-9+.-]+)://")
_URI_IN_A_PATH = re.compile(
    rf"(?i)^({_SQLITE_SCHEMES}|postgres(ql)?(\+[a-z0-9]+)?|mysql(\+[a-z0-9]+)?|file|memory):/"
)
_HOME = re.compile(r"^~($|/)")
_VARIABLE = re.compile(r"^\$(\{)?([A-Za-z_][A-Za-z0-9_]*)(?(1)\})")


def _file_path(value: object, what: str) -> Path:
    """``value`` as a ``Path``, or a clear error for what cannot name a file."""
    if not isinstance(value, str | os.PathLike):
        raise InvalidTypeError(f"{what} must be a str or a path, got {type(value).__name__}")
    text = os.fspath(value)
    if not isinstance(text, str):
        raise InvalidTypeError(f"{what} must be a str or a path, got bytes")
    if "\0" in text:
        raise InvalidStateError(f"{what} must not contain a NUL character")
    if not text:
        raise InvalidStateError(f"{what} is empty: give the database file's path")
    uri = (_URI_IN_A_PATH if isinstance(value, PurePath) else _URI).match(text)
    if uri and _SQLITE_SCHEME.match(uri.group(1)):
        raise InvalidStateError(
            f"{what} {hide_password(text)!r} is a URI, not a file path: pass the file's path "
            "itself, or put "
            "the URI in FLUJO_STATE_URI and call flujo_sqlite.load_backend_from_config()"
        )
    if uri:
        raise InvalidStateError(
            f"{what} {hide_password(text)!r} is a {uri.group(1)}:// URI, not a file path: "
            "SQLiteBackend keeps "
            "its data in a local SQLite file, so pass that file's path"
        )
    variable = _VARIABLE.match(text)
    if _HOME.match(text) or (variable and variable.group(2) in os.environ):
        raise InvalidStateError(
            f"{what} {text!r} starts with {text.split('/')[0]!r}, which only a shell expands: "
            "pass os.path.expanduser() / os.path.expandvars() of it"
        )
    return Path(text)


def _make_folder(path: Path) -> None:
    """Creates the folder of the database ``path`` if needed, or says why it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file, not a folder" if blocker else error.strerror or str(error)
        raise DatabaseError(
            f"cannot create the folder {path.parent} for the database {path}: {reason}"
        ) from error


def _installed_flujo_layout(python: tuple[int, int] = sys.version_info[:2]) -> str:
    """New files get the layout of the Flujo release installed beside us, so that Flujo itself,
    `flujo lens` included, can open them. With none, that of the release `pip install flujo`
    would bring on this interpreter: 0.6 needs Python 3.13, and 0.4 moves a 0.6 file aside as
    corrupt (0.6 reads a 0.4 file)."""
    try:
        version = importlib.metadata.version("flujo")
    except importlib.metadata.PackageNotFoundError:
        return "flujo-0.6" if python >= (3, 13) else "flujo-0.4"
    major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    return "flujo-0.4" if major_minor < (0, 6) else "flujo-0.6"


@atexit.register
def _close_open_backends() -> None:
    # Acknowledged writes are already durable; this lets queued ones finish and threads stop.
    # Through the backends, so that one used again by a later exit hook opens its file again.
    # Queued writes may wait up to lock_timeout for another process's lock: Ctrl-C ends that.
    try:
        SQLiteBackend.shutdown_all()
        for engine in list(_OPEN_ENGINES):  # those of backends already collected
            engine.close_blocking()
        wait_for_dropped_backends()
    except KeyboardInterrupt:
        logging.getLogger(__name__).warning(
            "interrupted while closing at exit: writes still queued, which no caller had been "
            "told were stored, may not be; every acknowledged write is"
        )


def _start_afresh_in_a_forked_child() -> None:
    """A backend created before ``fork()`` but not used yet holds no connection state that the
    child could inherit (its engine opens the file on the first call), so in the child it opens
    an engine of its own on first use, as a backend made at import by a pre-forking server
    (gunicorn ``--preload``, Celery) needs. One already used refuses work in the child, and if
    any backend of the parent had a file open at the fork, every engine of the child refuses
    (see ``src/sqlite/open_files.rs``)."""
    global _REOPENING, _MAKING_PORTS
    # Another thread of the parent may have held them.
    _REOPENING = threading.RLock()
    _MAKING_PORTS = threading.Lock()
    for backend in list(_BACKENDS):
        native = backend._native
        if isinstance(native, NativeBackend) and not native.has_connected:
            _OPEN_ENGINES.discard(native)
            backend._native = _ReopenOnUse(backend, native)


os.register_at_fork(after_in_child=_start_afresh_in_a_forked_child)


class _ReopenOnUse:
    """Stands in for the engine of a closed (or closing) backend. Flujo's backend opens its
    file again on the next call after ``close()``, and code written for it relies on that (a
    fixture that closes a shared backend, two ``async with`` blocks on one instance): so does
    ours. The new engine serves nothing before the closing one has done its queued work, so a
    call never overtakes one made before the ``close()``."""

    __slots__ = ("_backend", "closing")

    def __init__(self, backend: SQLiteBackend, closing: NativeBackend) -> None:
        self._backend = backend
        self.closing = closing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend._reopen(self), name)


class SQLiteBackend(_Base):
    """Durable workflow state in a SQLite file, file-compatible with Flujo's own backend.

    ``durability="full"`` (the default) fsyncs every commit, like Flujo 0.4.35 (Flujo 0.6.11
    runs SQLite at ``synchronous=NORMAL``); ``"normal"`` survives
    a crash of the process but may lose the last commits on power loss. ``lock_timeout`` is how
    long a call waits for another process's lock before raising ``DatabaseLockedError``.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        *,
        durability: Literal["full", "normal"] = "full",
        lock_timeout: float = 30.0,
    ) -> None:
        path = _file_path(db_path, "db_path")
        if str(path) == ":memory:":
            raise InvalidStateError(
                "SQLiteBackend needs a file path; in-memory databases are not supported "
                "(use a file in a temporary directory, e.g. pytest's tmp_path)"
            )
        _make_folder(path)
        self.db_path = path
        self._engine_options: dict[str, Any] = {
            "durability": durability,
            "lock_timeout": lock_timeout,
            "fresh_layout": _installed_flujo_layout(),
        }
        self._native: NativeBackend | _ReopenOnUse = self._open_engine()
        _BACKENDS.add(self)

    def _reopen(self, closed: _ReopenOnUse) -> NativeBackend:
        """The engine that replaces ``closed``, opened once however many threads ask at once."""
        with _REOPENING:
            current = self._native
            if current is not closed:
                return current if isinstance(current, NativeBackend) else self._reopen(current)
            return self._open_engine(after=closed.closing)

    def _open_engine(self, after: NativeBackend | None = None) -> NativeBackend:
        engine = NativeBackend(os.fspath(self.db_path), after=after, **self._engine_options)
        _OPEN_ENGINES.add(engine)
        self._native = engine
        return engine

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.db_path)!r})"

    # Workflow state (the user guide's API).

    async def save_state(
        self,
        run_id: str,
        state: dict[str, Any],
        *,
        expected_updated_at: datetime | str | None = None,
    ) -> None:
        """Insert or replace the whole state of ``run_id``.

        With ``expected_updated_at`` (the ``updated_at`` you loaded), the save happens only if
        nobody changed the run since: otherwise ``ConflictError`` is raised and nothing is
        written, so two workers resuming the same run cannot both advance it.
        """
        await _call(self._native.save_state, run_id, state, expected_updated_at)

    async def load_state(self, run_id: str) -> dict[str, Any] | None:
        """The saved state of ``run_id``, or ``None``. ``created_at``/``updated_at`` are datetimes
        (aware exactly when saved aware); the rest is plain JSON data.
        """
        return await _call(self._native.load_state, run_id)

    async def delete_state(self, run_id: str) -> None:
        """Delete the state of ``run_id`` (its run history is kept; see ``delete_run``). An unknown
        id is a no-op.
        """
        await _call(self._native.delete_state, run_id)

    async def list_states(self, status: str | None = None) -> list[dict[str, Any]]:
        """``run_id``, ``status``, ``created_at`` and ``updated_at`` of every state, newest first."""
        return await _call(self._native.list_states, status)

    async def list_workflows(
        self,
        status: str | None = None,
        pipeline_id: str | None = None,
        limit: int | None = None,
        offset: int | None = 0,
    ) -> list[dict[str, Any]]:
        """Run summaries without payloads, newest first; ``""`` filters mean no filter. A
        ``limit`` of ``None`` or below 0 means no limit; ``offset`` must be ``None`` or ``>= 0``.
        """
        return await _call(self._native.list_workflows, status, pipeline_id, limit, offset)

    async def get_workflow_stats(self) -> dict[str, Any]:
        """Totals, counts by status, runs created in the last 24 hours, the average execution time."""
        return await _call(self._native.get_workflow_stats)

    def get_workflow_stats_sync(self) -> dict[str, Any]:
        """``get_workflow_stats`` for synchronous code (waits without holding the GIL)."""
        return self._native.get_workflow_stats_blocking()

    async def get_failed_workflows(self, hours_back: float = 24) -> list[dict[str, Any]]:
        """Failed runs updated in the last ``hours_back`` hours (an exact instant comparison),
        newest first.
        """
        return await _call(self._native.get_failed_workflows, hours_back)

    async def cleanup_old_workflows(self, days_old: float = 30) -> int:
        """Delete states created more than ``days_old`` days ago (fractions allowed); returns how
        many. Runs in short batches so other calls are never held up for long.
        """
        return await _call(self._native.cleanup_old_workflows, days_old)

    # Run history, written by Flujo's runner and read by `flujo lens`.

    async def save_run_start(self, run_data: dict[str, Any]) -> None:
        """Record that a run started (Flujo's runner calls this). A second call updates the run in
        place and keeps its steps and spans.
        """
        await _call(self._native.save_run_start, run_data)

    async def save_step_result(self, step_data: dict[str, Any]) -> None:
        """Record one step's result; a run not recorded yet gets a placeholder."""
        await _call(self._native.save_step_result, step_data)

    async def save_run_end(self, run_id: str, end_data: dict[str, Any]) -> None:
        """Record that a run finished; an unknown run is a no-op."""
        await _call(self._native.save_run_end, run_id, end_data)

    async def get_run_details(self, run_id: str) -> dict[str, Any] | None:
        """The run record, with the keys of both Flujo releases, or ``None``."""
        return await _call(self._native.get_run_details, run_id)

    async def list_run_steps(self, run_id: str) -> list[dict[str, Any]]:
        """The run's step records in step order."""
        return await _call(self._native.list_run_steps, run_id)

    async def list_runs(
        self,
        status: str | None = None,
        pipeline_name: str | None = None,
        limit: int | None = None,
        offset: int | None = 0,
        metadata_filter: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Run records newest first; ``metadata_filter`` keeps runs whose state metadata contains it
        (matched in SQL, before paging).
        """
        return await _call(
            self._native.list_runs, status, pipeline_name, limit, offset, metadata_filter
        )

    async def delete_run(self, run_id: str) -> None:
        """Delete the run record with its steps, spans, trace and evaluations (not its state)."""
        await _call(self._native.delete_run, run_id)

    # Traces and spans.

    async def save_trace(self, run_id: str, trace: dict[str, Any]) -> None:
        """Replace the run's spans with this trace tree; an empty trace changes nothing."""
        await _call(self._native.save_trace, run_id, trace)

    async def save_spans(self, run_id: str, spans: list[dict[str, Any]]) -> None:
        """Append spans (a flat list) to the run."""
        await _call(self._native.save_spans, run_id, spans)

    async def get_trace(self, run_id: str) -> dict[str, Any] | None:
        """The run's spans as a tree (the root span with nested ``children``), or ``None``."""
        return await _call(self._native.get_trace, run_id)

    async def get_spans(
        self, run_id: str, status: str | None = None, name: str | None = None
    ) -> list[dict[str, Any]]:
        """The run's spans, flat, in start order, optionally filtered by status and name."""
        return await _call(self._native.get_spans, run_id, status, name)

    async def get_span_statistics(
        self,
        pipeline_name: str | None = None,
        time_range: tuple[float, float] | None = None,
    ) -> dict[str, Any]:
        """Counts by name and status and average durations of finished spans."""
        return await _call(self._native.get_span_statistics, pipeline_name, time_range)

    # System state, evaluations and background tasks (Flujo 0.6.11).

    async def set_system_state(self, key: str, value: dict[str, Any]) -> None:
        """Store a JSON value under ``key``."""
        await _call(self._native.set_system_state, key, value)

    async def get_system_state(self, key: str) -> dict[str, Any] | None:
        """``{key, value, updated_at}`` for ``key``, or ``None``."""
        return await _call(self._native.get_system_state, key)

    async def persist_evaluation(
        self,
        run_id: str,
        score: float,
        feedback: str | None = None,
        step_name: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Record an evaluation score for a run."""
        await _call(self._native.persist_evaluation, run_id, score, feedback, step_name, metadata)

    async def list_evaluations(
        self, limit: int | None = 20, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Evaluations, newest first, optionally of one run; a ``limit`` of ``None`` or below 0
        lists them all."""
        return await _call(self._native.list_evaluations, limit, run_id)

    async def list_background_tasks(
        self,
        parent_run_id: str | None = None,
        status: str | None = None,
        limit: int | None = None,
        offset: int | None = 0,
    ) -> list[dict[str, Any]]:
        """States flagged as background tasks, most recently updated first."""
        return await _call(self._native.list_background_tasks, parent_run_id, status, limit, offset)

    async def get_failed_background_tasks(
        self, parent_run_id: str | None = None, hours_back: float = 24
    ) -> list[dict[str, Any]]:
        """Failed background tasks updated in the last ``hours_back`` hours."""
        return await _call(self._native.get_failed_background_tasks, parent_run_id, hours_back)

    async def cleanup_stale_background_tasks(self, stale_hours: float = 24) -> int:
        """Mark running background tasks not updated for ``stale_hours`` as failed; returns how
        many.
        """
        return await _call(self._native.cleanup_stale_background_tasks, stale_hours)

    # Lifecycle.

    async def close(self) -> None:
        """Finish queued work and release the file. Idempotent. A later call opens the file
        again, as with Flujo's backend."""
        await self._engine_to_close().close(_port())

    def close_sync(self) -> None:
        """:meth:`close` for synchronous code (Flujo 0.6's name); waits without the GIL, and a
        Ctrl-C ends the wait (the close goes on)."""
        self._engine_to_close().close_blocking()

    def _engine_to_close(self) -> NativeBackend:
        """The engine a close waits for: the open one, which later calls will not use, or the
        one a close already under way is closing."""
        with _REOPENING:
            engine = self._native
            if isinstance(engine, _ReopenOnUse):
                return engine.closing
            self._native = _ReopenOnUse(self, engine)
            return engine

    @classmethod
    def shutdown_all(cls) -> None:
        """Closes every backend of this process, from synchronous code (Flujo 0.6's name;
        the interpreter's exit does the same)."""
        for backend in list(_BACKENDS):
            backend.close_sync()

    async def shutdown(self) -> None:
        """Flujo's name for :meth:`close`."""
        await self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: object, exc_val: object, exc_tb: object) -> None:
        await self.close()

    # Recovery of a damaged file (an explicit request; nothing else here moves a file).

    @staticmethod
    async def recover(
        db_path: str | os.PathLike[str], *, backup_path: str | os.PathLike[str] | None = None
    ) -> RecoveryReport:
        """:func:`flujo_sqlite.recover`: back up a damaged file and rebuild it from every
        readable row. No backend may have the file open."""
        from .recovery import recover  # recovery imports this module

        return await recover(db_path, backup_path=backup_path)
