"""Run ``flujo lens <args>`` through Flujo's own lens Typer app (``flujo.cli.lens.lens_app``).

Used by the tests only when the installed ``flujo`` console script cannot start at all because
the venv's Typer is newer than the Flujo release supports (Typer 0.29 removed ``Option(click_type=)``,
which both Flujo 0.4.35 and 0.6.11 pass at import/registration time). The lens commands themselves
are the same code either way.
"""

import sys

from flujo.cli.lens import lens_app

if __name__ == "__main__":
    sys.argv[0] = "flujo lens"
    lens_app()
