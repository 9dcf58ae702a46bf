"""Open the backend that Flujo's configuration names.

The rules match Flujo 0.6.11 (``flujo.cli.config.load_backend_from_config``), so a project that
works with Flujo's backend finds the same database file with ours:

1. ``FLUJO_STATE_URI`` from the environment, when set and not blank. Relative paths are relative
   to the current directory.
2. Otherwise, in Flujo's test mode (``FLUJO_TEST_MODE=1``) with ``FLUJO_TEST_STATE_DIR`` set,
   ``flujo_ops.db`` in that folder.
3. Otherwise a ``flujo.toml``: the file named by ``FLUJO_CONFIG_PATH`` (it must exist), or else the
   first ``flujo.toml`` found in the current directory or one of its parents. Its top-level
   ``state_uri`` is used; relative paths are relative to the directory that holds the file.
4. Otherwise ``sqlite:///flujo_ops.db``, relative to the config file's directory when one was found
   and to the current directory when not.

URI forms (as in Flujo 0.6.11 and SQLAlchemy):

* ``sqlite:///ops.db`` and ``sqlite:///data/ops.db``: relative (not ``/ops.db``, which is what
  Flujo 0.4.35 made of it);
* ``sqlite:////var/lib/app/ops.db``: absolute;
* ``sqlite://ops.db``: relative too. ``sqlite3:`` and ``sqlite+<driver>:`` (SQLAlchemy's
  ``sqlite+aiosqlite:``) are accepted as synonyms of ``sqlite:``.

The path is taken literally: no percent-decoding and no ``~`` expansion, as in Flujo; symbolic
links are followed before ``..`` is applied, as in Flujo. We refuse, with a
:class:`ConfigurationError` that says what to write instead, what Flujo would silently misread or
what this package cannot serve: non-SQLite schemes (``postgresql://``), plain paths without a
scheme, query strings or fragments (``?mode=ro``, which Flujo drops), an empty path and
``:memory:`` (which Flujo turns into a file named ``:memory:``), and every way of asking Flujo for
its in-memory store (``FLUJO_STATE_MODE=memory`` or ``ephemeral``, ``FLUJO_EPHEMERAL_STATE=1``,
``memory://`` and its spellings), which would otherwise quietly become a file.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .backend import SQLiteBackend

__all__ = ["ConfigurationError", "load_backend_from_config", "resolve_db_path"]

DEFAULT_STATE_URI = "sqlite:///flujo_ops.db"
CONFIG_FILE_NAME = "flujo.toml"
STATE_URI_ENV = "FLUJO_STATE_URI"
CONFIG_PATH_ENV = "FLUJO_CONFIG_PATH"
STATE_MODE_ENV = "FLUJO_STATE_MODE"
EPHEMERAL_ENV = "FLUJO_EPHEMERAL_STATE"
TEST_MODE_ENV = "FLUJO_TEST_MODE"
TEST_STATE_DIR_ENV = "FLUJO_TEST_STATE_DIR"

# What makes Flujo 0.6.11's loader return its in-memory store instead of a file.
_IN_MEMORY_MODES = ("memory", "ephemeral")
_TRUE_WORDS = ("1", "true", "yes", "on")
_IN_MEMORY_URIS = ("memory", "memory://", "mem://", "inmemory://")

_SQLITE_SCHEMES = ("sqlite", "sqlite3")
# A URI scheme per RFC 3986; one letter is a Windows drive (C:\...), not a scheme.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
# Up to the last "@": a password may hold "@" or "/" that its writer did not percent-encode, and
# hiding a little of the host too is better than showing part of the password. One slash after
# the scheme is enough: pathlib turns "postgres://..." made into a path into "postgres:/...".
_PASSWORD_IN_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*:/+[^/:@]*:).*@", re.DOTALL)


@dataclass(frozen=True)
class _StateURI:
    uri: str
    base_dir: Path  # what relative paths are relative to
    origin: str  # for messages: where the URI came from


def load_backend_from_config() -> SQLiteBackend:
    """Return a :class:`~flujo_sqlite.SQLiteBackend` for the database Flujo's configuration names.

    Drop-in for ``flujo.cli.config.load_backend_from_config`` when the state URI is a SQLite one;
    see the module documentation for the lookup order and the URI forms. Raises
    :class:`ConfigurationError` (a ``ValueError``) for anything else.
    """
    db_path = resolve_db_path()
    from .backend import SQLiteBackend  # deferred: keeps this module importable on its own

    return SQLiteBackend(db_path)


def resolve_db_path() -> Path:
    """Return the absolute database path that the configuration names, without opening it."""
    state_uri = _find_state_uri()
    return _sqlite_path_from_uri(state_uri.uri, state_uri.base_dir, state_uri.origin)


def _find_state_uri() -> _StateURI:
    if os.environ.get(STATE_MODE_ENV, "").strip().lower() in _IN_MEMORY_MODES:
        _refuse_in_memory(f"the {STATE_MODE_ENV} environment variable")
    if os.environ.get(EPHEMERAL_ENV, "").strip().lower() in _TRUE_WORDS:
        _refuse_in_memory(f"the {EPHEMERAL_ENV} environment variable")
    env_uri = os.environ.get(STATE_URI_ENV, "").strip()
    if env_uri:
        return _StateURI(env_uri, Path.cwd(), f"the {STATE_URI_ENV} environment variable")

    test_dir = os.environ.get(TEST_STATE_DIR_ENV, "").strip()
    if test_dir and os.environ.get(TEST_MODE_ENV, "").strip().lower() in _TRUE_WORDS:
        return _StateURI(
            DEFAULT_STATE_URI,
            Path.cwd() / test_dir,
            f"the default in {TEST_STATE_DIR_ENV} ({TEST_MODE_ENV} is set)",
        )

    config_file = _find_config_file()
    if config_file is None:
        return _StateURI(DEFAULT_STATE_URI, Path.cwd(), "the default")

    try:
        with config_file.open("rb") as handle:
            config = tomllib.load(handle)
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(f"{config_file} is not valid TOML: {error}") from error
    except OSError as error:
        raise ConfigurationError(f"cannot read {config_file}: {error}") from error

    base_dir = config_file.parent
    if "state_uri" not in config:
        return _StateURI(
            DEFAULT_STATE_URI, base_dir, f"the default (no state_uri in {config_file})"
        )
    state_uri = config["state_uri"]
    if not isinstance(state_uri, str):
        raise ConfigurationError(
            f'state_uri in {config_file} must be a string such as "sqlite:///flujo_ops.db", '
            f"not {type(state_uri).__name__} {state_uri!r}"
        )
    return _StateURI(state_uri.strip(), base_dir, f"state_uri in {config_file}")


def _find_config_file() -> Path | None:
    explicit = os.environ.get(CONFIG_PATH_ENV, "").strip()
    if explicit:
        path = Path(explicit).resolve()
        if not path.is_file():
            raise ConfigurationError(
                f"{CONFIG_PATH_ENV} names {path}, which is not an existing file; "
                f"point it at your {CONFIG_FILE_NAME} or unset it"
            )
        return path
    directory = Path.cwd()
    for candidate_dir in (directory, *directory.parents):
        candidate = candidate_dir / CONFIG_FILE_NAME
        if candidate.is_file():
            return candidate
    return None


def _refuse_in_memory(origin: str) -> NoReturn:
    raise ConfigurationError(
        f"{origin} asks Flujo for its in-memory state store, which keeps nothing once the "
        "process ends; flujo-sqlite keeps state in a SQLite file. Unset it to use the file the "
        f"configuration names (by default sqlite:///flujo_ops.db), or keep using Flujo's own "
        "flujo.cli.config.load_backend_from_config() for in-memory state."
    )


def _sqlite_path_from_uri(uri: str, base_dir: Path, origin: str) -> Path:
    if uri.lower() in _IN_MEMORY_URIS:
        _refuse_in_memory(origin)
    if not uri:
        raise ConfigurationError(
            f"{origin} is empty. Write a SQLite URI such as 'sqlite:///flujo_ops.db', "
            "or remove it to get that default."
        )
    shown = hide_password(uri)
    scheme_match = _SCHEME.match(uri)
    if scheme_match is None:
        raise ConfigurationError(
            f"{origin} is {shown!r}, which is not a URI. flujo-sqlite reads SQLite URIs, as "
            f"Flujo does: write 'sqlite:///{uri}' for this file."
        )
    scheme = scheme_match.group(1).lower()
    if scheme not in _SQLITE_SCHEMES and not scheme.startswith("sqlite+"):
        raise ConfigurationError(
            f"{origin} is {shown!r}, but flujo-sqlite serves only SQLite state URIs "
            "('sqlite:///relative.db' or 'sqlite:////absolute/path.db'). "
            f"For a {scheme}:// store keep using Flujo's own "
            "flujo.cli.config.load_backend_from_config(); to use flujo-sqlite, set "
            f"{STATE_URI_ENV} or state_uri to a SQLite URI."
        )

    rest = uri[scheme_match.end() :]
    if "?" in rest or "#" in rest:
        raise ConfigurationError(
            f"{origin} is {shown!r}: query strings and fragments are not supported (Flujo drops "
            "them without a word, so options such as '?mode=ro' would never apply). "
            "Remove everything from the '?' or '#' on."
        )
    # 'sqlite://' introduces an (empty) authority, and the one slash after it separates it from
    # the path, so 'sqlite:///ops.db' names 'ops.db' and 'sqlite:////srv/ops.db' names '/srv/ops.db'.
    rest = rest.removeprefix("//")
    rest = rest.removeprefix("/")
    if not rest:
        raise ConfigurationError(
            f"{origin} is {shown!r}, which names no file. "
            "Use 'sqlite:///file.db' or 'sqlite:////absolute/path/file.db'."
        )
    if rest == ":memory:":
        raise ConfigurationError(
            f"{origin} is {shown!r}: in-memory SQLite databases are not supported (each "
            "connection would see its own empty database). Use a file, e.g. one in a "
            "temporary directory."
        )
    return (base_dir / rest).resolve()


def hide_password(uri: str) -> str:
    """``uri`` with the password of its user info, if any, replaced by ``***``."""
    return _PASSWORD_IN_URI.sub(r"\1***@", uri)
