PY := .venv/bin

.PHONY: setup lint typecheck test test-unit check up

setup:
	./scripts/setup.sh

lint:
	$(PY)/ruff check .
	$(PY)/ruff format --check .

typecheck:
	$(PY)/mypy

test-unit:
	$(PY)/pytest -m "not services"

test:
	$(PY)/pytest

check: lint typecheck test

up:
	$(PY)/journey up --simulate
