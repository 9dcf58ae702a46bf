"""End to end: Flujo's own runner and ``flujo lens`` driving flujo-sqlite, for each Flujo version.

Every scenario runs a small standalone program from ``tests_py/flujo_programs/`` as a subprocess,
with the interpreter of the Flujo version under test:

* Flujo 0.4.35 on CPython 3.11: interpreter from ``FLUJO04_PYTHON``;
* Flujo 0.6.11 on CPython 3.13: interpreter from ``FLUJO06_PYTHON``.

Each venv needs that Flujo release and our (abi3) wheel installed; ``make test`` sets them up. A
version whose variable is unset, or whose interpreter does not exist, is skipped with a reason
naming the variable. Every scenario is parametrized over ``backend``: ``ours``
(``flujo_sqlite.SQLiteBackend``) and ``flujo`` (Flujo's own ``SQLiteBackend``): the latter is the
control that proves the programs and the assertions are right.

Scenarios: (a) a 4-step pipeline of plain async callables runs to completion and its workflow
state, run record, step records and trace are readable through the backend API and present as
rows; (b)+(c) the process is SIGKILLed while step 3 runs, and a new process resumes from the last
saved step without re-running steps 1-2; (d) a human-in-the-loop step pauses, another process
resumes it with the human's input; lens: ``flujo lens list/show/trace`` print what was written.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROGRAMS = Path(__file__).parent / "flujo_programs"
STEPS = ["step_one", "step_two", "step_three", "step_four"]
FINAL_OUTPUT = "start|step_one|step_two|step_three|step_four"
PIPELINE_NAME = "e2e_pipeline"
TIMEOUT = 180  # seconds per subprocess; 0.6.11's import alone takes a few seconds


@dataclass(frozen=True)
class FlujoEnv:
    version: str
    python: Path

    @property
    def flujo_cli(self) -> Path:
        return self.python.parent / "flujo"


VERSIONS = {
    "0.4.35": "FLUJO04_PYTHON",
    "0.6.11": "FLUJO06_PYTHON",
}


@pytest.fixture(params=list(VERSIONS), scope="module")
def flujo_env(request: pytest.FixtureRequest) -> FlujoEnv:
    version = request.param
    var = VERSIONS[version]
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is not set: no interpreter with Flujo {version} to run against")
    python = Path(value)
    if not python.exists():
        pytest.skip(f"{var}={value} does not exist: no interpreter with Flujo {version}")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('flujo'))"],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_clean_env(),
    )
    assert probe.returncode == 0, f"{var}={value} cannot report its flujo version: {probe.stderr}"
    assert probe.stdout.strip() == version, (
        f"{var}={value} has flujo {probe.stdout.strip()}, expected {version}"
    )
    return FlujoEnv(version, python)


@pytest.fixture(params=["ours", "flujo"])
def backend(request: pytest.FixtureRequest, flujo_env: FlujoEnv) -> str:
    if request.param == "ours":
        probe = subprocess.run(
            [str(flujo_env.python), "-c", "import flujo_sqlite"],
            check=False,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_clean_env(),
        )
        assert probe.returncode == 0, (
            f"flujo_sqlite is not importable by {flujo_env.python} (install the wheel into the "
            f"Flujo {flujo_env.version} venv): {probe.stderr.strip()[-500:]}"
        )
    return str(request.param)


# --------------------------------------------------------------------------------------------------
# helpers


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no inherited FLUJO_* settings (FLUJO_TEST_MODE would
    make 0.6.11's runner skip save_run_start/save_run_end), a wide terminal for rich tables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUJO_")}
    env.pop("PYTHONPATH", None)
    env["COLUMNS"] = "250"
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def _result(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise AssertionError(
        f"no RESULT line (exit {proc.returncode})\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-5000:]}"
    )


def _program_args(
    program: str, env: FlujoEnv, backend: str, db: Path, run_id: str, log: Path, *extra: str
) -> list[str]:
    return [
        str(env.python),
        str(PROGRAMS / program),
        "--backend",
        backend,
        "--db",
        str(db),
        "--run-id",
        run_id,
        "--log",
        str(log),
        "--pipeline-name",
        PIPELINE_NAME,
        *extra,
    ]


def _run_program(
    program: str, env: FlujoEnv, backend: str, db: Path, run_id: str, log: Path, *extra: str
) -> dict[str, Any]:
    proc = subprocess.run(
        _program_args(program, env, backend, db, run_id, log, *extra),
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=db.parent,
        env=_clean_env(),
    )
    assert proc.returncode == 0, (
        f"{program} failed (exit {proc.returncode})\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-5000:]}"
    )
    return _result(proc)


def _inspect(env: FlujoEnv, backend: str, db: Path, run_id: str) -> dict[str, Any]:
    """Read the run back through the backend's API (in the Flujo venv)."""
    proc = subprocess.run(
        [
            str(env.python),
            str(PROGRAMS / "inspect_db.py"),
            "--backend",
            backend,
            "--db",
            str(db),
            "--run-id",
            run_id,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=db.parent,
        env=_clean_env(),
    )
    assert proc.returncode == 0, f"inspect_db failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    data = _result(proc)
    for key, value in data.items():
        assert not (isinstance(value, dict) and "__error__" in value), (
            f"{key}: {value['__error__']}"
        )
    return data


def _log_lines(log: Path) -> list[str]:
    return log.read_text().split() if log.exists() else []


def _rows(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Query with the stdlib driver, read-only, so the check itself changes nothing."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def _trace_names(node: dict[str, Any]) -> list[str]:
    names = [node["name"]]
    for child in node.get("children") or []:
        names.extend(_trace_names(child))
    return names


def _sqlite_uri(db: Path) -> str:
    # sqlite:////abs/path is absolute in both versions: 0.6.11 documents four slashes for
    # absolute paths; 0.4.35 strips one of the two leading slashes of the parsed path.
    return "sqlite:///" + str(db.resolve())


_CLI_BROKEN: dict[Path, str] = {}


def _lens(env: FlujoEnv, db: Path, *args: str) -> str:
    """Run ``flujo lens ARGS`` against ``db`` (FLUJO_STATE_URI) and return stdout."""
    child_env = _clean_env(FLUJO_STATE_URI=_sqlite_uri(db))
    cmd = [str(env.flujo_cli), "lens", *args]
    if env.python in _CLI_BROKEN:
        cmd = [str(env.python), str(PROGRAMS / "lens_cli.py"), *args]
    proc = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=db.parent,
        env=child_env,
    )
    if (
        proc.returncode != 0
        and env.python not in _CLI_BROKEN
        and "click_type" in proc.stdout + proc.stderr
    ):
        # The console script cannot start: the venv's Typer removed Option(click_type=), which
        # Flujo's CLI module passes. Run the same lens commands through lens_app directly.
        _CLI_BROKEN[env.python] = "typer too new for this Flujo's CLI (Option(click_type=))"
        # (Not warnings.warn: the suite turns warnings into errors.)
        print(
            f"NOTE: {env.flujo_cli} cannot start ({_CLI_BROKEN[env.python]}); running the lens "
            "commands through flujo.cli.lens.lens_app instead. Pin typer==0.24.1 in the venv.",
            file=sys.stderr,
        )
        return _lens(env, db, *args)
    assert proc.returncode == 0, (
        f"flujo lens {' '.join(args)} failed (exit {proc.returncode})\n"
        f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


# --------------------------------------------------------------------------------------------------
# (a) a pipeline runs to completion


def test_pipeline_runs_to_completion(flujo_env: FlujoEnv, backend: str, tmp_path: Path) -> None:
    db, log, run_id = tmp_path / "state.db", tmp_path / "steps.log", "e2e-run-a"
    out = _run_program("run_pipeline.py", flujo_env, backend, db, run_id, log)

    assert out["flujo_version"] == flujo_env.version
    assert out["steps"] == STEPS and all(out["success"])
    assert out["last_output"] == FINAL_OUTPUT
    assert _log_lines(log) == STEPS

    api = _inspect(flujo_env, backend, db, run_id)

    state = api["load_state"]
    assert state is not None and state["run_id"] == run_id
    assert state["status"] == "completed"
    assert state["current_step_index"] == len(STEPS)
    assert state["last_step_output"] == FINAL_OUTPUT
    assert [s["name"] for s in state["step_history"]] == STEPS
    assert state["pipeline_context"]["run_id"] == run_id
    assert "__datetime__" in state["created_at"] and "__datetime__" in state["updated_at"]

    details = api["get_run_details"]
    assert details is not None and details["run_id"] == run_id
    assert details["pipeline_name"] == PIPELINE_NAME
    assert details["status"] == "completed"

    steps = api["list_run_steps"]
    assert [s["step_name"] for s in steps] == STEPS
    assert [s["step_index"] for s in steps] == [0, 1, 2, 3]
    assert {s["status"] for s in steps} == {"completed"}
    assert steps[-1]["output"] == FINAL_OUTPUT

    trace = api["get_trace"]
    assert trace is not None and trace["parent_span_id"] is None
    assert [c["name"] for c in trace["children"]] == STEPS
    assert {c["status"] for c in trace["children"]} == {"completed"}
    spans = api["get_spans"]
    assert sorted(s["name"] for s in spans) == sorted(_trace_names(trace))

    assert run_id in [r["run_id"] for r in api["list_runs"]]

    # The rows themselves, through the stdlib driver (column names common to both layouts).
    assert _rows(
        db, "SELECT status, current_step_index FROM workflow_state WHERE run_id=?", (run_id,)
    ) == [("completed", len(STEPS))]
    assert _rows(db, "SELECT pipeline_name, status FROM runs WHERE run_id=?", (run_id,)) == [
        (PIPELINE_NAME, "completed")
    ]
    assert [
        r[0]
        for r in _rows(
            db, "SELECT step_name FROM steps WHERE run_id=? ORDER BY step_index", (run_id,)
        )
    ] == STEPS
    span_names = [r[0] for r in _rows(db, "SELECT name FROM spans WHERE run_id=?", (run_id,))]
    assert set(STEPS) <= set(span_names) and len(span_names) == len(STEPS) + 1


def test_step_outputs_flujo_stores_its_own_way(
    flujo_env: FlujoEnv, backend: str, tmp_path: Path
) -> None:
    """(e) Callables and a type registered with Flujo's serializer, as step outputs."""
    db, log, run_id = tmp_path / "state.db", tmp_path / "steps.log", "e2e-odd"
    out = _run_program("odd_outputs.py", flujo_env, backend, db, run_id, log)
    assert out["steps"] == ["pick_tools", "quote"] and all(out["success"])

    api = _inspect(flujo_env, backend, db, run_id)
    assert api["load_state"]["status"] == "completed"
    assert api["load_state"]["last_step_output"] == {
        "total": {"cents": 999, "currency": "USD"},
        "tool": "len",
    }
    assert [(s["step_name"], s["output"]) for s in api["list_run_steps"]] == [
        ("pick_tools", {"tools": ["len", "upper"], "choice": "len", "for": "start"}),
        ("quote", {"total": {"cents": 999, "currency": "USD"}, "tool": "len"}),
    ]


# --------------------------------------------------------------------------------------------------
# (b) + (c) killed mid-pipeline, resumed in a new process


def test_killed_run_resumes_from_last_saved_step(
    flujo_env: FlujoEnv, backend: str, tmp_path: Path
) -> None:
    db, log, run_id = tmp_path / "state.db", tmp_path / "steps.log", "e2e-run-crash"
    proc = subprocess.Popen(
        _program_args("run_pipeline.py", flujo_env, backend, db, run_id, log, "--block-at", "3"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while "step_three" not in _log_lines(log):
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"program exited before step 3 (exit {proc.returncode}):\n{out}\n{err}")
            assert time.monotonic() < deadline, "step 3 never started"
            time.sleep(0.05)
        # Step 3 is running (it sleeps for an hour); steps 1-2 were persisted before it started.
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert _log_lines(log) == ["step_one", "step_two", "step_three"]

    # What survived the kill: the state saved after step 2.
    saved = _rows(
        db,
        "SELECT status, current_step_index, last_step_output FROM workflow_state WHERE run_id=?",
        (run_id,),
    )
    assert [(s, i, json.loads(o)) for s, i, o in saved] == [
        ("running", 2, "start|step_one|step_two")
    ]
    assert [
        r[0]
        for r in _rows(
            db, "SELECT step_name FROM steps WHERE run_id=? ORDER BY step_index", (run_id,)
        )
    ] == [
        "step_one",
        "step_two",
    ]

    # A new process with the same run id: Flujo loads the state and continues at step 3.
    log.write_text(log.read_text() + "RESUMED\n")
    out = _run_program("run_pipeline.py", flujo_env, backend, db, run_id, log)
    lines = _log_lines(log)
    after = lines[lines.index("RESUMED") + 1 :]
    assert after == ["step_three", "step_four"], f"steps run after resumption: {after}"
    assert out["steps"] == STEPS and out["last_output"] == FINAL_OUTPUT

    api = _inspect(flujo_env, backend, db, run_id)
    state = api["load_state"]
    assert state["status"] == "completed"
    assert state["last_step_output"] == FINAL_OUTPUT
    assert [s["name"] for s in state["step_history"]] == STEPS
    # Both runners count the restored history twice here (2 + 4): stored as given.
    assert state["current_step_index"] == 6
    assert api["get_run_details"]["status"] == "completed"
    step_names = [s["step_name"] for s in api["list_run_steps"]]
    assert step_names == STEPS, f"each step recorded once, in order: {step_names}"
    assert set(STEPS[2:]) <= {c["name"] for c in api["get_trace"]["children"]}


# --------------------------------------------------------------------------------------------------
# (d) human in the loop: pause in one process, resume in another


def test_hitl_pauses_and_resumes_in_another_process(
    flujo_env: FlujoEnv, backend: str, tmp_path: Path
) -> None:
    db, log, run_id = tmp_path / "state.db", tmp_path / "steps.log", "e2e-run-hitl"
    out = _run_program("hitl.py", flujo_env, backend, db, run_id, log, "--phase", "start")
    assert out["status"] == "paused"
    assert out["steps"] == ["before_review"]
    assert _log_lines(log) == ["before_review"]

    api = _inspect(flujo_env, backend, db, run_id)
    state = api["load_state"]
    assert state["status"] == "paused"
    assert state["current_step_index"] == 1
    assert state["last_step_output"] == "draft|before_review"
    assert [s["name"] for s in state["step_history"]] == ["before_review"]

    out = _run_program(
        "hitl.py", flujo_env, backend, db, run_id, log, "--phase", "resume", "--input", "ship-it"
    )
    assert out["status"] == "completed"
    assert out["steps"] == ["before_review", "human_review", "after_review"]
    assert out["last_output"] == "ship-it|after_review"
    assert _log_lines(log) == ["before_review", "after_review"]

    api = _inspect(flujo_env, backend, db, run_id)
    state = api["load_state"]
    assert state["status"] == "completed"
    assert state["last_step_output"] == "ship-it|after_review"
    assert [h["human_response"] for h in state["pipeline_context"]["hitl_history"]] == ["ship-it"]
    assert [s["step_name"] for s in api["list_run_steps"]] == ["before_review", "after_review"]
    assert api["get_run_details"]["status"] == "completed"


# --------------------------------------------------------------------------------------------------
# flujo lens on the file the backend wrote


def test_lens_reads_runs_written_by_backend(
    flujo_env: FlujoEnv, backend: str, tmp_path: Path
) -> None:
    db = tmp_path / "state.db"
    run_ids = ["e2e-lens-first", "e2e-lens-second"]
    for run_id in run_ids:
        _run_program("run_pipeline.py", flujo_env, backend, db, run_id, tmp_path / f"{run_id}.log")

    listed = _lens(flujo_env, db, "list")
    for run_id in run_ids:
        assert run_id in listed, listed
    assert PIPELINE_NAME in listed and "completed" in listed

    shown = _lens(flujo_env, db, "show", run_ids[0])
    assert run_ids[0] in shown and "completed" in shown, shown
    for name in STEPS:
        assert name in shown, shown

    traced = _lens(flujo_env, db, "trace", run_ids[1])
    for name in STEPS:
        assert name in traced, traced
    assert "No trace found" not in traced

    # lens must not have damaged the file: the runs are still there and readable.
    assert sorted(r[0] for r in _rows(db, "SELECT run_id FROM runs")) == sorted(run_ids)
    assert not list(tmp_path.glob("state.db.corrupt*")), "lens moved the database aside as corrupt"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
