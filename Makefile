# Set-up and main jobs. `make demo` and `make test` work on a fresh machine: each creates .venv
# in the repository root (torch pinned to the 2.13.0 CPU wheel) and installs the package into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo demo-quick test test-slow lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned: any other torch spec pulls gigabytes of CUDA packages.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[airshower]'
	touch $@

# the test extras include [dask]: the suite checks simulate(executor="dask") against the process pool
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[airshower,dask,test]' 'dask==2026.8.0' 'distributed==2026.8.0'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/fastshower demo --out demo-output

demo-quick: install
	$(BIN)/fastshower demo --quick --out demo-output-quick

test: install-test
	$(BIN)/python -m pytest -q

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow

lint: install-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/simulate_speed.py

clean:
	rm -rf $(VENV) demo-output demo-output-quick .pytest_cache .mypy_cache .ruff_cache
