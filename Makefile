# sqlproxy — `make demo` runs the proxy on an embedded PostgreSQL; `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help demo test lint typecheck unit integration bench sysdeps clean

help:
	@echo "make demo   - set up, start an embedded PostgreSQL with the demo schema, run the proxy"
	@echo "make test   - set up, then ruff, mypy and the whole pytest suite on real servers"
	@echo "make bench  - benchmarks against direct PostgreSQL (and PgBouncer where relevant)"

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "sqlproxy needs Python 3.11 or newer")'
	@[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $@

sysdeps:
	@bash scripts/sysdeps.sh

demo: sysdeps $(STAMP)
	$(BIN)/sqlproxy demo

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

test: sysdeps $(STAMP) lint typecheck
	$(BIN)/pytest -q -p no:cacheprovider

bench: sysdeps $(STAMP)
	bash bench/run.sh

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache
