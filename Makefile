# evalq developer commands. `make test` and `make demo` work as the first command on a
# fresh clone: both install the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install browser k8s-check test test-fast chaos bench bench-smoke client-check lint format typecheck docs demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[worker,dev]'
	touch $(STAMP)

# Debian's chromium, which the dashboard's browser tests drive with Playwright (never a
# browser Playwright downloads). Quick when it is there already; installing it needs root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }
	@chromium --version 2>/dev/null

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest

test-fast: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m "not slow and not chaos"

chaos: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m chaos -s

lint: $(STAMP)
	$(BIN)/ruff check src tests examples bench
	$(BIN)/ruff format --check src tests examples bench

format: $(STAMP)
	$(BIN)/ruff format src tests examples bench
	$(BIN)/ruff check --fix src tests examples bench

typecheck: $(STAMP)
	$(BIN)/mypy src

bench: $(STAMP)
	$(OFFLINE) $(BIN)/python bench/run.py

# A short run that checks the harness works; it never fails on a timing.
bench-smoke: $(STAMP)
	$(OFFLINE) $(BIN)/python bench/run.py --quick --output $(or $(BENCH_OUT),/tmp/evalq-bench-smoke.md)

# Install the built wheel without extras into a fresh venv, as a user does, and use it against a
# queue run from .venv: no torch, typed (mypy --strict), the CLI's client commands (about a minute).
# The Kubernetes manifests, rendered and checked without a cluster.
k8s-check: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -q tests/test_kubernetes.py

client-check: $(STAMP)
	bash scripts/client-install-check.sh

# README's configuration table is generated from the settings Structs (tests/test_config.py checks it).
docs: $(STAMP)
	$(BIN)/python scripts/settings_table.py README.md

demo: $(STAMP)
	$(OFFLINE) bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
