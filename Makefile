# Every target creates .venv itself, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-full bench-capacity clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batchq demo

lint: $(STAMP)
	$(BIN)/ruff check batchq tests benchmarks
	$(BIN)/ruff format --check batchq tests benchmarks
	$(BIN)/mypy batchq

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-full: $(STAMP)
	$(BIN)/python benchmarks/run.py --full

# Issue 11's figures (a few minutes); ARGS=--full for the issue's sizes, 3 runs each.
bench-capacity: $(STAMP)
	$(BIN)/python benchmarks/capacity.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
