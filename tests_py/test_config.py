"""load_backend_from_config: FLUJO_STATE_URI, flujo.toml and the default, resolved as Flujo 0.6.11
does, minus 0.4.35's absolute '/flujo_ops.db' bug."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from flujo_sqlite.config import ConfigurationError, load_backend_from_config, resolve_db_path
from flujo_sqlite.errors import FlujoSQLiteError

#: Flujo 0.6.11's interpreter, which `make test` names (see the Makefile's FLUJO06_PYTHON).
FLUJO_06_PYTHON = Path(os.environ.get("FLUJO06_PYTHON") or "/nonexistent/flujo06/python")


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project root with a nested working directory `project/app/jobs`, and a clean environment."""
    if any((parent / "flujo.toml").exists() for parent in tmp_path.parents):
        pytest.skip("a flujo.toml above the temporary directory would be found by the search")
    for variable in (
        "FLUJO_STATE_URI",
        "FLUJO_CONFIG_PATH",
        "FLUJO_STATE_MODE",
        "FLUJO_EPHEMERAL_STATE",
        "FLUJO_TEST_MODE",
        "FLUJO_TEST_STATE_DIR",
    ):
        monkeypatch.delenv(variable, raising=False)
    root = tmp_path / "project"
    workdir = root / "app" / "jobs"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    return root


def workdir() -> Path:
    return Path.cwd()


def write_toml(directory: Path, text: str) -> Path:
    path = directory / "flujo.toml"
    path.write_text(text, encoding="utf-8")
    return path


# --- where the URI comes from -------------------------------------------------------------------


def test_default_is_flujo_ops_db_in_the_current_directory(project: Path) -> None:
    assert resolve_db_path() == workdir() / "flujo_ops.db"


def test_resolving_creates_nothing(project: Path) -> None:
    resolve_db_path()
    assert list(workdir().iterdir()) == []


@pytest.mark.parametrize(
    ("uri", "relative"),
    [
        ("sqlite:///rel.db", "rel.db"),
        ("sqlite:///data/rel.db", "data/rel.db"),
        ("sqlite://rel.db", "rel.db"),
        ("sqlite:rel.db", "rel.db"),
        ("sqlite:///./rel.db", "rel.db"),
        ("sqlite:///../rel.db", "../rel.db"),
        ("SQLITE:///upper.db", "upper.db"),
        ("sqlite3:///three.db", "three.db"),
        ("  sqlite:///padded.db \n", "padded.db"),
        ("sqlite:///my%20db.db", "my%20db.db"),  # taken literally, as Flujo does
        ("sqlite:///~/tilde.db", "~/tilde.db"),  # no home expansion, as Flujo does
    ],
)
def test_env_uri_relative_to_current_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch, uri: str, relative: str
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", uri)
    assert resolve_db_path() == Path(os.path.normpath(workdir() / relative))


def test_env_uri_with_four_slashes_is_absolute(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "elsewhere" / "abs.db"
    monkeypatch.setenv("FLUJO_STATE_URI", f"sqlite:///{target}")  # '/' + '/tmp/...'
    assert str(f"sqlite:///{target}").startswith("sqlite:////")
    assert resolve_db_path() == target


def test_env_wins_over_flujo_toml_and_config_path(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(workdir(), 'state_uri = "sqlite:///from_toml.db"\n')
    monkeypatch.setenv("FLUJO_CONFIG_PATH", str(project / "missing.toml"))
    monkeypatch.setenv("FLUJO_STATE_URI", "sqlite:///from_env.db")
    assert resolve_db_path() == workdir() / "from_env.db"


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_env_uri_is_ignored(
    project: Path, monkeypatch: pytest.MonkeyPatch, blank: str
) -> None:
    write_toml(project, 'state_uri = "sqlite:///from_toml.db"\n')
    monkeypatch.setenv("FLUJO_STATE_URI", blank)
    assert resolve_db_path() == project / "from_toml.db"


def test_toml_in_current_directory(project: Path) -> None:
    write_toml(workdir(), 'state_uri = "sqlite:///t.db"\n')
    assert resolve_db_path() == workdir() / "t.db"


def test_toml_in_an_ancestor_is_relative_to_its_own_directory(project: Path) -> None:
    write_toml(project, 'state_uri = "sqlite:///state/t.db"\n')
    assert resolve_db_path() == project / "state" / "t.db"


def test_nearest_toml_wins(project: Path) -> None:
    write_toml(project, 'state_uri = "sqlite:///outer.db"\n')
    write_toml(project / "app", 'state_uri = "sqlite:///inner.db"\n')
    assert resolve_db_path() == project / "app" / "inner.db"


def test_toml_absolute_uri(project: Path, tmp_path: Path) -> None:
    target = tmp_path / "abs" / "ops.db"
    write_toml(project, f'state_uri = "sqlite:///{target}"\n')
    assert resolve_db_path() == target


def test_toml_without_state_uri_defaults_next_to_the_toml(project: Path) -> None:
    # Only the top-level key counts; Flujo ignores a state_uri inside [settings] too.
    write_toml(project, '[settings]\nstate_uri = "sqlite:///nested.db"\n')
    assert resolve_db_path() == project / "flujo_ops.db"


def test_config_path_env_names_the_file(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_dir = project / "config"
    config_dir.mkdir()
    config = config_dir / "custom-name.toml"
    config.write_text('state_uri = "sqlite:///c.db"\n', encoding="utf-8")
    write_toml(workdir(), 'state_uri = "sqlite:///ignored.db"\n')
    monkeypatch.setenv("FLUJO_CONFIG_PATH", str(config))
    assert resolve_db_path() == config_dir / "c.db"


def test_relative_config_path_is_relative_to_current_directory(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_toml(project, 'state_uri = "sqlite:///c.db"\n')
    monkeypatch.setenv("FLUJO_CONFIG_PATH", "../../flujo.toml")
    assert resolve_db_path() == project / "c.db"


def test_blank_config_path_means_search(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_toml(project, 'state_uri = "sqlite:///searched.db"\n')
    monkeypatch.setenv("FLUJO_CONFIG_PATH", "")
    assert resolve_db_path() == project / "searched.db"


# --- what is refused, and how -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing.toml", "."])
def test_config_path_that_is_not_a_file(
    project: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv("FLUJO_CONFIG_PATH", str(project / name))
    with pytest.raises(ConfigurationError, match="FLUJO_CONFIG_PATH"):
        resolve_db_path()


def test_invalid_toml_names_the_file(project: Path) -> None:
    config = write_toml(project, "state_uri = \n")
    with pytest.raises(ConfigurationError, match="not valid TOML") as caught:
        resolve_db_path()
    assert str(config) in str(caught.value)


def test_non_string_state_uri(project: Path) -> None:
    write_toml(project, "state_uri = 5\n")
    with pytest.raises(ConfigurationError, match="must be a string"):
        resolve_db_path()


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("postgresql://user:hunter2@db.example/flujo", "serves only SQLite"),
        # Unencoded "@" and "/" in a password must not let part of it through.
        ("postgresql://user:hun@ter2@db.example/flujo", "user:\\*\\*\\*@db.example"),
        ("postgresql://user:hun/ter2@db.example/flujo", "user:\\*\\*\\*@db.example"),
        ("postgres://db.example/flujo", "serves only SQLite"),
        ("memory://", "in-memory state store"),
        ("memory", "in-memory state store"),
        ("Mem://", "in-memory state store"),
        ("inmemory://", "in-memory state store"),
        ("file:ops.db", "serves only SQLite"),
        ("ops.db", "write 'sqlite:///ops.db'"),
        ("/var/lib/flujo/ops.db", "write 'sqlite:////var/lib/flujo/ops.db'"),
        ("sqlite:///ops.db?mode=ro", "query strings"),
        ("sqlite:///ops.db#main", "query strings"),
        ("sqlite:", "names no file"),
        ("sqlite://", "names no file"),
        ("sqlite:///", "names no file"),
        ("sqlite:///:memory:", "in-memory"),
    ],
)
def test_unusable_uris_raise_a_value_error_that_says_what_to_do(
    project: Path, monkeypatch: pytest.MonkeyPatch, uri: str, message: str
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", uri)
    with pytest.raises(ConfigurationError, match=message) as caught:
        load_backend_from_config()
    error = caught.value
    assert isinstance(error, ValueError)
    assert isinstance(error, FlujoSQLiteError)
    assert "FLUJO_STATE_URI" in str(error)
    assert "ter2" not in str(error)
    assert list(workdir().iterdir()) == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLUJO_STATE_MODE", "memory"),
        ("FLUJO_STATE_MODE", "Ephemeral"),
        ("FLUJO_EPHEMERAL_STATE", "1"),
        ("FLUJO_EPHEMERAL_STATE", "on"),
    ],
)
def test_asking_flujo_for_its_in_memory_store_is_refused_not_turned_into_a_file(
    project: Path, monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("FLUJO_STATE_URI", "sqlite:///ops.db")
    with pytest.raises(ConfigurationError, match=f"{variable} .*in-memory state store"):
        load_backend_from_config()
    assert list(workdir().iterdir()) == []


def test_flujos_test_mode_puts_the_default_file_in_its_state_dir(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As Flujo 0.6.11 does: over flujo.toml, under FLUJO_STATE_URI, only with the mode on.
    write_toml(workdir(), 'state_uri = "sqlite:///from-toml.db"\n')
    monkeypatch.setenv("FLUJO_TEST_STATE_DIR", "isolated")
    assert resolve_db_path() == workdir() / "from-toml.db"
    monkeypatch.setenv("FLUJO_TEST_MODE", "1")
    assert resolve_db_path() == workdir() / "isolated" / "flujo_ops.db"
    monkeypatch.setenv("FLUJO_STATE_URI", "sqlite:///env.db")
    assert resolve_db_path() == workdir() / "env.db"


def test_a_sqlalchemy_driver_suffix_names_the_same_file(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLUJO_STATE_URI", "sqlite+aiosqlite:///ops.db")
    assert resolve_db_path() == workdir() / "ops.db"


def test_empty_state_uri_in_toml(project: Path) -> None:
    write_toml(project, 'state_uri = ""\n')
    with pytest.raises(ConfigurationError, match="is empty"):
        resolve_db_path()


def test_error_from_toml_names_the_file(project: Path) -> None:
    config = write_toml(project, 'state_uri = "postgresql://db.example/flujo"\n')
    with pytest.raises(ConfigurationError) as caught:
        resolve_db_path()
    assert f"state_uri in {config}" in str(caught.value)


# --- the backend it returns ---------------------------------------------------------------------


async def test_returns_a_backend_on_the_resolved_path(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flujo_sqlite import SQLiteBackend
    from flujo_sqlite import load_backend_from_config as exported

    write_toml(project, 'state_uri = "sqlite:///state/ops.db"\n')
    backend = exported()
    try:
        assert isinstance(backend, SQLiteBackend)
        assert backend.db_path == project / "state" / "ops.db"
    finally:
        await backend.close()


async def test_default_backend_is_usable(project: Path) -> None:
    backend = load_backend_from_config()
    try:
        assert backend.db_path == workdir() / "flujo_ops.db"
        assert await backend.load_state("no-such-run") is None
    finally:
        await backend.close()


# --- agreement with Flujo 0.6.11 (runs only where its reference virtualenv exists) ---------------

_FLUJO_PROBE = """
import json, logging, warnings
logging.disable(logging.CRITICAL)
warnings.simplefilter("ignore")
from flujo.cli.config import load_backend_from_config
print(json.dumps(str(load_backend_from_config().db_path)))
"""


@pytest.mark.flujo_compat
@pytest.mark.skipif(
    not FLUJO_06_PYTHON.exists(), reason="FLUJO06_PYTHON names no interpreter with Flujo 0.6.11"
)
@pytest.mark.parametrize(
    ("env_uri", "toml_dir", "toml_text"),
    [
        (None, None, None),
        ("sqlite:///rel.db", None, None),
        ("sqlite://rel.db", None, None),
        ("sqlite:///../up.db", None, None),
        ("sqlite:////{tmp}/abs.db", None, None),
        (None, "project", 'state_uri = "sqlite:///t.db"\n'),
        (None, "project", 'state_uri = "sqlite://data/t.db"\n'),
        (None, "project", "[settings]\n"),
        (None, "workdir", 'state_uri = "sqlite:////{tmp}/abs.db"\n'),
        ("sqlite:///env.db", "project", 'state_uri = "sqlite:///t.db"\n'),
        ("sqlite+aiosqlite:///driver.db", None, None),
        ("sqlite:///link/../beside-the-target.db", None, None),
    ],
)
def test_agrees_with_flujo_0_6_11(
    project: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    env_uri: str | None,
    toml_dir: str | None,
    toml_text: str | None,
) -> None:
    tmp = str(tmp_path).lstrip("/")
    (project / "real" / "deep").mkdir(parents=True)
    (workdir() / "link").symlink_to(project / "real" / "deep")  # '..' after it leaves 'real'
    if toml_dir is not None:
        directory = project if toml_dir == "project" else workdir()
        write_toml(directory, toml_text.replace("{tmp}", tmp))
    if env_uri is not None:
        monkeypatch.setenv("FLUJO_STATE_URI", env_uri.replace("{tmp}", tmp))
    ours = resolve_db_path()

    completed = subprocess.run(
        [str(FLUJO_06_PYTHON), "-c", _FLUJO_PROBE],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
            "PYTHONWARNINGS": "ignore",
        },
        stdin=subprocess.DEVNULL,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    flujo_path = Path(json.loads(completed.stdout.strip().splitlines()[-1]))
    assert ours == flujo_path
