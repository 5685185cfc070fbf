PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint bench gpu-check clean

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -c constraints.txt -e '.[dev,export-test]'

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check .

bench:
	$(BIN)/python benchmarks/run_all.py

# On a CUDA machine (see the header of benchmarks/gpu_check.sh): tests -m cuda and the GPU sweep.
GPU_OUT ?= gpu-check
gpu-check:
	bash benchmarks/gpu_check.sh $(GPU_OUT)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
