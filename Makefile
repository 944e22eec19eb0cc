# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export TELEMETRY_DATABASE_URL ?= sqlite:///./data/telemetry.db

.PHONY: run test lint format install system-packages bench clean

run: $(STAMP)  ## serve the API on the embedded SQLite default (migrates first)
	$(BIN)/telemetry serve

test: $(STAMP) system-packages lint  ## linters and the whole suite, on every backend
	scripts/timescaledb-test-server.sh  # TimescaleDB on 127.0.0.1:5433 (reuses a running one)
	$(BIN)/pytest

system-packages:  ## Debian packages the tests need (scripts/debian-packages.txt)
	scripts/install-system-packages.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy api db analytics

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

bench: $(STAMP)  ## ingestion benchmark (see README)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
