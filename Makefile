# evalq developer commands. `make test` and `make demo` work as the first command on a
# fresh clone: both install the virtual environment first when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

.PHONY: install test test-fast chaos lint format typecheck demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[worker,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest

test-fast: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m "not slow and not chaos"

chaos: $(STAMP)
	$(OFFLINE) $(BIN)/python -m pytest -m chaos -s

lint: $(STAMP)
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples

format: $(STAMP)
	$(BIN)/ruff format src tests examples
	$(BIN)/ruff check --fix src tests examples

typecheck: $(STAMP)
	$(BIN)/mypy src

demo: $(STAMP)
	$(OFFLINE) bash scripts/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
