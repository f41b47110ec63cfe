# The README's two set-up commands: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
# The official Ditto JavaScript client for tests/clients (pinned by its package-lock.json).
JS_CLIENT = tests/clients/js
JS_STAMP  = $(JS_CLIENT)/node_modules/.installed

.PHONY: run test lint typecheck check bench clean

# pip's own lines show what it fetches and builds; the first install takes about 3 minutes.
$(STAMP): pyproject.toml
	@echo "Installing twinstore into $(VENV) (first time: about 3 minutes; later only what changed)..."
	@start=$$(date +%s); \
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || exit 1; \
	$(BIN)/python -m pip install --quiet --upgrade pip || exit 1; \
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]' \
		|| { echo "installing twinstore failed (see pip's message above)" >&2; exit 1; }; \
	echo "Installed twinstore into $(VENV) in $$(( $$(date +%s) - start )) s."
	@touch $(STAMP)

# Without npm the JS client tests skip themselves, except in CI (CI set), where both fail
# (tests/conftest.py require(): in CI a missing tool, data set or service fails, never skips).
$(JS_STAMP): $(JS_CLIENT)/package.json $(JS_CLIENT)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(JS_CLIENT) && npm ci --no-audit --no-fund && touch node_modules/.installed; \
	elif [ -n "$$CI" ]; then \
		echo "npm is required to install the Ditto JS client for tests/clients" >&2; exit 1; \
	else \
		echo "npm not found: tests/clients will skip the Ditto JS client" >&2; \
	fi

## run: install into .venv and serve on http://127.0.0.1:8080 (embedded PostgreSQL + NATS unless configured)
run: $(STAMP)
	$(BIN)/twinstore serve $(ARGS)

## test: lint, type-check and run the whole test suite (machine services if TWINSTORE_TEST_* are set, else embedded)
# Two processes (TEST_WORKERS), each running whole test files (module fixtures, one live server per
# file, stay as they are): about half the time of one process on 2 cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(STAMP) $(JS_STAMP) lint typecheck
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -q -rsx --durations=15 $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check twinstore policies tests bench adapters examples

typecheck: $(STAMP)
	$(BIN)/mypy

## bench: benchmarks (bench/api.py and bench/policy_cost.py need wrk: apt-get install wrk); results go to BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python bench/journal.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/metrics.py
	$(BIN)/python bench/policy_cost.py
	$(BIN)/python bench/search.py
	$(BIN)/python bench/fanout.py
	$(BIN)/python bench/history.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/adapter_mqtt.py
	$(BIN)/python bench/adapter_opcua.py
	$(BIN)/python bench/anomaly_live.py
	$(BIN)/python bench/footprint.py

clean:
	rm -rf $(VENV) build *.egg-info $(JS_CLIENT)/node_modules
