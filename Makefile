# dltrain — every target creates .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch_xla pins its own torch, so the XLA tests get a venv of their own
XLA_VENV  := .venv-xla
XLA_STAMP := $(XLA_VENV)/.installed
XLA_PINS  := torch==2.9.0 torchvision==0.24.0 torch_xla==2.9.0

.PHONY: demo test test-fast test-xla lint format bench bench-tables gpu-prep clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## train the offline quickstart recipe
	$(BIN)/dltrain fit recipes/quickstart.yaml

# one worker per core; each test file stays in one worker, in order (pytest-xdist)
PARALLEL := -n auto --dist loadfile

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest $(PARALLEL)

$(XLA_STAMP): pyproject.toml
	test -x $(XLA_VENV)/bin/python || $(PYTHON) -m venv $(XLA_VENV)
	$(XLA_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(XLA_VENV)/bin/python -m pip install --quiet $(XLA_PINS)
	$(XLA_VENV)/bin/python -m pip install --quiet -e . pytest $(XLA_PINS)
	touch $(XLA_STAMP)

test-xla: $(XLA_STAMP)  ## the XLA tests: torch_xla on the CPU (PJRT_DEVICE=CPU)
	PJRT_DEVICE=CPU $(XLA_VENV)/bin/python -m pytest -m xla tests/system/test_xla.py

test-fast: $(STAMP)  ## skip the slow tests
	$(BIN)/python -m pytest $(PARALLEL) -m "not slow"

lint: $(STAMP)  ## ruff check + format check
	$(BIN)/ruff check dltrain tests bench
	$(BIN)/ruff format --check dltrain tests bench

bench: $(STAMP)  ## samples/s vs a hand-written loop, the CIFAR tutorial, Lightning; threads quiet and loaded
	$(BIN)/python bench/run.py
	$(BIN)/python bench/threads.py

bench-tables: $(STAMP)  ## table models vs HistGradientBoosting on tables that install offline
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python bench/tables.py

# What bench/gpu_check.sh needs on a lent GPU machine that its image lacks (carry both folders):
# dltrain's pure-Python dependencies and pytest as wheels for several Pythons, and the CIFAR-10
# JPEG archive (../shared does not travel)
gpu-prep: $(STAMP)  ## gpu_wheels/ and gpu_data/ for bench/gpu_check.sh
	mkdir -p gpu_data && cp ../shared/data/cifar10-train-jpeg.tar.gz gpu_data/
	for v in 3.10 3.11 3.12 3.13; do $(BIN)/python -m pip download --quiet --only-binary=:all: \
		--python-version $$v --platform manylinux2014_x86_64 --implementation cp \
		"pydantic>=2.5" "filelock>=3.12" pytest -d gpu_wheels || exit 1; done

format: $(STAMP)
	$(BIN)/ruff check --fix dltrain tests bench
	$(BIN)/ruff format dltrain tests bench

clean:
	rm -rf $(VENV) $(XLA_VENV) runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
