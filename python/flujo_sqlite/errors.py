"""Exceptions raised by flujo-sqlite.

Every exception derives from :class:`FlujoSQLiteError`, and also from the standard exception
that means the same thing, so existing ``except ValueError`` / ``except TypeError`` /
``except sqlite3.OperationalError`` clauses keep working when you switch from Flujo's backend.
"""

from __future__ import annotations

import sqlite3

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
    "SerializationError",
]


class FlujoSQLiteError(Exception):
    """Root of every error raised by flujo-sqlite."""


class InvalidStateError(FlujoSQLiteError, ValueError):
    """An argument or a state field has a value the store cannot accept. Nothing was written."""


class MissingKeyError(InvalidStateError, KeyError):
    """A state (or run or step record) lacks a key it needs. Also a ``KeyError``, which is
    what Flujo's backend raises there. Nothing was written."""

    # KeyError's own str() would show the message in quotes.
    __str__ = BaseException.__str__


class InvalidTypeError(InvalidStateError, TypeError):
    """An argument or a known state field has the wrong type (e.g. a ``run_id`` that is not a
    ``str``, a ``created_at`` that is not a datetime). Nothing was written."""


class SerializationError(FlujoSQLiteError, TypeError):
    """A value in the state cannot be stored as JSON. The message names where it sits, e.g.
    ``pipeline_context['model']``, and its type. Nothing was written; register a serializer
    with :func:`flujo_sqlite.register_serializer` to store such objects."""


class DatabaseError(FlujoSQLiteError, sqlite3.DatabaseError):
    """SQLite failed: a full disk, a read-only file, an unexpected layout, an I/O error."""


class DatabaseLockedError(DatabaseError, sqlite3.OperationalError):
    """Another connection kept the database locked for longer than we were willing to wait."""


class CorruptDatabaseError(DatabaseError):
    """The file is not a readable SQLite database. flujo-sqlite never moves or replaces it on
    its own; :func:`flujo_sqlite.recover` backs it up and rescues what it holds."""


class BackendClosedError(FlujoSQLiteError, RuntimeError):
    """The backend cannot serve this call: the call raced its ``close()`` (call again: a call
    after ``close()`` opens the file again), or this process was made by ``fork()`` from one
    whose backends were using SQLite (then every backend here refuses: start worker processes
    with multiprocessing's "spawn" or "forkserver" method, or fork before using any backend)."""


class ConfigurationError(FlujoSQLiteError, ValueError):
    """The configured state URI or ``flujo.toml`` cannot be used. The message says where the
    value came from and what to write instead."""


class ConflictError(FlujoSQLiteError):
    """A conditional ``save_state(..., expected_updated_at=...)`` found that another writer
    changed (or deleted) the run since you loaded it. Nothing was written: reload the state,
    reapply your change and save again."""
