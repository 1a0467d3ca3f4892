# Two commands on a fresh machine: `make train` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned and installed first, so nothing else pulls a CUDA build.
# On a GPU machine, install the CUDA build of the same version into $(VENV) before `make`.
TORCH ?= torch==2.13.0

.PHONY: install install-test train test test-slow lint clean

install: $(VENV)/.installed-train
install-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# What training needs: torch, then pixrun and its dependencies.
$(VENV)/.installed-train: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# What the tests and the linter need besides: the test extras (pytest, diffusers, wandb, ruff).
$(VENV)/.installed-test: $(VENV)/.installed-train
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

train: install
	$(BIN)/pixrun train --resume auto $(ARGS)

# The tests that fit in a few minutes; `make test-slow` runs the rest (multi-process, kill and restart tests).
test: install-test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: install-test
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
