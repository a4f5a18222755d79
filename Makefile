# Every target creates .venv itself, so a fresh clone needs nothing but Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-floor lint redis-server chromium bench bench-full bench-capacity bench-capacity-sim bench-api bench-batch clean

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
	$(BIN)/mypy batchq tests/typing

# The Redis tests need a real redis-server: installed from the system's packages where
# missing, when running as root (CI). Elsewhere they are skipped, loudly; with CI=true they fail.
redis-server:
	@command -v redis-server >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq redis-server >/dev/null) || true
	@command -v redis-server >/dev/null || echo "redis-server not found: the Redis tests will be skipped (CI=true: they fail)"

# The view's tests drive a real browser: Debian's chromium, through Playwright's Python
# package (never `playwright install`). Installed like redis-server; skipped loudly without it.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || true
	@command -v chromium >/dev/null || echo "chromium not found: the browser tests will be skipped (CI=true: they fail)"

test: lint redis-server chromium
	$(BIN)/pytest -q

# The lowest versions pyproject.toml allows ("x>=1.2" becomes "x==1.2"), in a venv of their
# own, against the tests that touch each dependency: a floor that is declared is a floor
# that is tested. .ci/run runs it after `make test`.
FLOOR := .venv-floor
FLOOR_PINS = $(shell sed -n 's/^ *"\(aiohttp\|orjson\|click\|tqdm\|redis\|fastjsonschema\|pytest\|pytest-asyncio\|hypothesis\|jsonschema\)>=\([0-9.]*\)",*$$/\1==\2/p' pyproject.toml)

$(FLOOR)/.installed: pyproject.toml
	rm -rf $(FLOOR)
	$(PYTHON) -m venv $(FLOOR)
	$(FLOOR)/bin/pip install --quiet $(FLOOR_PINS)
	$(FLOOR)/bin/pip install --quiet --no-deps -e .
	touch $@

test-floor: $(FLOOR)/.installed
	$(FLOOR)/bin/pip list 2>/dev/null | grep -iE '^(aiohttp|orjson|click|tqdm|redis|fastjsonschema) '
	$(FLOOR)/bin/pytest -q -p no:cacheprovider tests/test_pipeline.py tests/test_faults.py \
		tests/test_mockserver.py tests/test_config.py tests/test_progress.py tests/test_api.py \
		tests/test_limits_store.py tests/test_batch.py tests/test_mock_batches.py \
		tests/test_answers.py

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-full: $(STAMP)
	$(BIN)/python benchmarks/run.py --full

# Issue 11's figures (a few minutes); ARGS=--full for the issue's sizes, 3 runs each.
bench-capacity: $(STAMP)
	$(BIN)/python benchmarks/capacity.py $(ARGS)

# Issue 21's matrix: --concurrency auto against simulated endpoints (~2 min of CPU, no sockets).
# ARGS=--details for a line per cell; --rows WORD, --slots 1,16 for part of it
# (ARGS='--rows "(gauges)"': the rows whose server publishes its load gauges, ~1 min).
bench-capacity-sim: $(STAMP)
	$(BIN)/python benchmarks/capacity_sim.py $(ARGS)

# Issue 14's figures: batchq.run against batchq run, and batchq export of a 1,000,000-line
# job (~2 minutes; appended to benchmarks/API.md). ARGS=--quick for a smoke run that prints.
bench-api: $(STAMP)
	$(BIN)/python benchmarks/api.py $(ARGS)

# Issue 20's figures: 1,000,000 lines through --via batch against the bare client, a crash
# matrix (SIGKILL at each step of the batch executor) and --via auto --deadline (8-12 minutes;
# written to benchmarks/BATCH.md). ARGS=--quick for a smoke run that prints.
bench-batch: $(STAMP)
	$(BIN)/python benchmarks/batch.py $(ARGS)

clean:
	rm -rf $(VENV) $(FLOOR) .pytest_cache .mypy_cache .ruff_cache
