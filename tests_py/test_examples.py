"""The README's runnable examples work as written: the quick start (the main job) and the Flujo
pipeline example under each Flujo release."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(python: str, script: str, db_path: Path) -> str:
    # Flujo's test mode skips run records; keep the examples' environment like a user's.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUJO_")}
    done = subprocess.run(
        [python, str(EXAMPLES / script), str(db_path)],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_quickstart_saves_loads_lists_and_cleans_up(tmp_path: Path) -> None:
    db_path = tmp_path / "quickstart.db"
    out = run_example(sys.executable, "quickstart.py", db_path)
    assert db_path.exists()
    for heading in ("Saved 10 runs", "Load one run", "Statistics", "Failed in the last", "Cleanup"):
        assert heading.lower() in out.lower(), f"{heading!r} missing from:\n{out}"


@pytest.mark.parametrize("variable", ["FLUJO04_PYTHON", "FLUJO06_PYTHON"])
def test_flujo_pipeline_example_runs_under_each_flujo_release(
    variable: str, tmp_path: Path
) -> None:
    python = os.environ.get(variable)
    if not python or not Path(python).exists():
        pytest.skip(f"{variable} names no interpreter with that Flujo release (make test sets it)")
    out = run_example(python, "flujo_pipeline.py", tmp_path / "pipeline.db")
    assert "fetched -> cleaned -> reported" in out
    assert "state:  completed" in out
    for step in ("fetch", "clean", "report"):
        assert f": {step} completed" in out
    assert "with 3 child spans" in out
