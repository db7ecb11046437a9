# The two commands of the README: `make demo` (the main job) and `make test` (the suite CI runs).
# Both create the virtual environment and install the project on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint typecheck unit bench protos clean

$(STAMP): pyproject.toml setup.py $(wildcard src/kvindex/_native_c/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/kvindex demo $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests tools benchmarks
	$(BIN)/ruff format --check src tests tools benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

# make bench NAME=score [ARGS=...]: one benchmark of benchmarks/ (see benchmarks/RESULTS.md)
bench: $(STAMP)
	@test -n "$(NAME)" || { echo "usage: make bench NAME=<one of: $$(ls benchmarks | sed -n 's/\.py$$//p' | grep -v __init__ | tr '\n' ' ')> [ARGS=...]"; exit 2; }
	$(BIN)/python -m benchmarks.$(NAME) $(ARGS)

protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
