# Two commands on a fresh machine: `make serve` and `make test`. Each sets up its own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch is pinned here (and in CI); the GPU image installs the CUDA build instead.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve test test-fast lint format bench-train bench-serve clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

serve: install
	$(BIN)/fpn-serve --model-dir checkpoints --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench-train: install
	$(BIN)/python bench/training_step.py --out bench/results/training_step_cpu.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info

bench-serve: install
	bench/serve_bench.sh --duration 5 --rounds 5
