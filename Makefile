# The one entry point for building, trying and testing flujo-sqlite. `make help` lists the targets.
# Everything Python runs in ./.venv (created on first use); the extension is built once per source
# change, in release mode, into target/wheels and installed from there.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
PIP := $(VENV_PYTHON) -m pip --quiet --disable-pip-version-check --no-input
WHEEL_DIR := target/wheels

TEST_DEPS := pytest pytest-asyncio pytest-timeout hypothesis pydantic uvloop
# Flujo's own backend, for the compatibility tests and the benchmark ratios. typer is pinned
# because newer releases removed an option Flujo's `flujo` command uses at start-up.
FLUJO_DEPS := flujo==0.4.35 sqlvalidator typer==0.24.1
BUILD_DEPS := maturin>=1.7,<2

# Flujo 0.6.11 needs Python 3.13 (here under pyenv) and the opentelemetry 1.38 line; it gets a
# venv of its own that shares our abi3 wheel. Without a 3.13 interpreter its tests skip.
PYTHON313 ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.13*/bin/python3.13) $(shell command -v python3.13))
VENV06 := .venv-flujo06
FLUJO06_DEPS := flujo==0.6.11 "opentelemetry-api>=1.38,<1.39" "opentelemetry-sdk>=1.38,<1.39" typer==0.24.1
FLUJO06_STAMP := $(VENV06)/.stamp-flujo06

# Stamps live inside the venv, so deleting .venv resets them all.
VENV_STAMP := $(VENV)/.stamp-venv
INSTALL_STAMP := $(VENV)/.stamp-installed-wheel
TEST_DEPS_STAMP := $(VENV)/.stamp-test-deps
LINT_DEPS_STAMP := $(VENV)/.stamp-lint-deps

# Directories are listed too: adding or deleting a file changes their mtime.
PACKAGE_SOURCES := Cargo.toml Cargo.lock .cargo/config.toml pyproject.toml README.md \
	$(shell find src python -not -name '*.pyc' -not -path '*/__pycache__*' 2>/dev/null)

.PHONY: help demo test test-rust test-python install flujo06 bench lint stubtest clean

help: ## Show this help
	@echo "flujo-sqlite: a Rust-core SQLite state backend for Flujo"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

demo: install ## Build and install into .venv, then run examples/quickstart.py
	$(VENV_PYTHON) examples/quickstart.py target/quickstart_workflows.db

test: test-rust test-python ## Everything: cargo test, then the pytest suite against the release wheel

test-rust: ## Rust core tests (no Python needed)
	cargo test

test-python: install $(TEST_DEPS_STAMP) flujo06 ## pytest suite (tests_py) against the installed wheel
	@# pytest exits 5 when it collected nothing; that is a failure here, not a pass.
	FLUJO04_PYTHON=$(abspath $(VENV_PYTHON)) \
	FLUJO06_PYTHON=$(if $(PYTHON313),$(abspath $(VENV06))/bin/python) \
	$(VENV_PYTHON) -m pytest tests_py -q || { status=$$?; \
		if [ $$status -eq 5 ]; then echo "error: pytest collected no tests" >&2; fi; exit $$status; }

install: $(INSTALL_STAMP) ## Build the release wheel into target/wheels and install it into .venv

bench: install $(TEST_DEPS_STAMP) ## Benchmark against Flujo's own backend (BENCH_ARGS=--quick: 1 min)
	@if [ ! -f benchmarks/bench.py ]; then echo "error: benchmarks/bench.py does not exist yet" >&2; exit 1; fi
	$(VENV_PYTHON) benchmarks/bench.py $(BENCH_ARGS)

lint: $(LINT_DEPS_STAMP) stubtest ## cargo fmt --check, clippy -D warnings, ruff, stub check
	cargo fmt --all --check
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests_py examples $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check python tests_py examples $(wildcard benchmarks)

stubtest: install $(LINT_DEPS_STAMP) ## Check _native.pyi against the built extension
	$(VENV_PYTHON) -m mypy.stubtest flujo_sqlite._native

clean: ## Remove .venv, built wheels and demo databases (keeps cargo's build cache)
	rm -rf $(VENV) $(VENV06) $(WHEEL_DIR) target/quickstart_workflows.db*

$(VENV_STAMP):
	@test -n "$(PYTHON)" || { echo "error: no python3 found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is older than 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(BUILD_DEPS)"
	@touch $@

# Built once per change of any package source; --force-reinstall because the version number
# does not change between builds.
$(INSTALL_STAMP): $(VENV_STAMP) $(PACKAGE_SOURCES)
	rm -f $(WHEEL_DIR)/flujo_sqlite-*.whl
	$(VENV)/bin/maturin build --release --quiet --out $(WHEEL_DIR) --interpreter $(VENV_PYTHON)
	$(PIP) install --force-reinstall --no-deps $(WHEEL_DIR)/flujo_sqlite-*.whl
	@touch $@

flujo06: $(if $(PYTHON313),$(FLUJO06_STAMP)) ## Python 3.13 venv with Flujo 0.6.11 and our wheel

$(FLUJO06_STAMP): $(INSTALL_STAMP) Makefile
	test -x $(VENV06)/bin/python || $(PYTHON313) -m venv $(VENV06)
	$(VENV06)/bin/python -m pip --quiet --disable-pip-version-check --no-input install $(FLUJO06_DEPS)
	$(VENV06)/bin/python -m pip --quiet --disable-pip-version-check --no-input install \
		--force-reinstall --no-deps $(WHEEL_DIR)/flujo_sqlite-*.whl
	@touch $@

$(TEST_DEPS_STAMP): $(VENV_STAMP) Makefile
	$(PIP) install $(TEST_DEPS) $(FLUJO_DEPS)
	@touch $@

$(LINT_DEPS_STAMP): $(VENV_STAMP) Makefile
	$(PIP) install ruff mypy
	@touch $@
