# The README's two set-up commands: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: run test lint typecheck check bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: install into .venv and serve on http://127.0.0.1:8080 (embedded PostgreSQL + NATS unless configured)
run: $(STAMP)
	$(BIN)/twinstore serve $(ARGS)

## test: lint, type-check and run the whole test suite (machine services if TWINSTORE_TEST_* are set, else embedded)
test: $(STAMP) lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check twinstore policies tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## bench: benchmarks (bench/api.py and bench/policies.py need wrk: apt-get install wrk); results go to BENCHMARKS.md
bench: $(STAMP)
	$(BIN)/python bench/journal.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/policies.py

clean:
	rm -rf $(VENV) build *.egg-info
