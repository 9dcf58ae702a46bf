"""flujo-sqlite: a fast, safe, file-compatible SQLite state backend for Flujo.

>>> from flujo_sqlite import SQLiteBackend
>>> backend = SQLiteBackend("workflow_state.db")
"""

from __future__ import annotations

from ._native import __version__, register_serializer
from .backend import SQLiteBackend
from .config import load_backend_from_config
from .errors import (
    BackendClosedError,
    ConfigurationError,
    ConflictError,
    CorruptDatabaseError,
    DatabaseError,
    DatabaseLockedError,
    FlujoSQLiteError,
    InvalidStateError,
    InvalidTypeError,
    MissingKeyError,
    SerializationError,
)
from .recovery import RecoveryReport, recover

__all__ = [
    "BackendClosedError",
    "ConfigurationError",
    "ConflictError",
    "CorruptDatabaseError",
    "DatabaseError",
    "DatabaseLockedError",
    "FlujoSQLiteError",
    "InvalidStateError",
    "InvalidTypeError",
    "MissingKeyError",
    "RecoveryReport",
    "SQLiteBackend",
    "SerializationError",
    "__version__",
    "load_backend_from_config",
    "recover",
    "register_serializer",
]
