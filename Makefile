# The two commands: `make demo` and `make test`. Both install what is missing first.
PYTHON ?= python3
BIN := .venv/bin

.PHONY: bootstrap test demo lint typecheck unit clean

bootstrap:
	@PYTHON=$(PYTHON) bash scripts/bootstrap.sh

lint: bootstrap
	$(BIN)/ruff check .

typecheck: bootstrap
	$(BIN)/mypy drflow agents tasks flows orchestrator

test: bootstrap
	$(BIN)/ruff check .
	$(BIN)/mypy drflow agents tasks flows orchestrator
	$(BIN)/lint-imports
	$(BIN)/pytest

demo: bootstrap
	$(BIN)/python -m lab.demo

clean:
	rm -rf .venv .cache .pytest_cache .mypy_cache .ruff_cache
