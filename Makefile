# dltrain — every target creates .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)  ## train the offline quickstart recipe
	$(BIN)/dltrain fit recipes/quickstart.yaml

test: $(STAMP)  ## the whole test suite
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## skip the slow tests
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)  ## ruff check + format check
	$(BIN)/ruff check dltrain tests bench
	$(BIN)/ruff format --check dltrain tests bench

bench: $(STAMP)  ## samples/s vs a hand-written loop, the CIFAR tutorial, Lightning (BENCH_SCALE=small|full)
	$(BIN)/python bench/run.py

format: $(STAMP)
	$(BIN)/ruff check --fix dltrain tests bench
	$(BIN)/ruff format dltrain tests bench

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
