PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint bench clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .

bench:
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
