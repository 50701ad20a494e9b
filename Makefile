# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

## The main job: CoOp few-shot on held-out classes of the embedded world, zero-shot vs tuned.
demo: $(STAMP)
	$(BIN)/vlprompt demo

## The whole test suite (slow end-to-end tests included).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 --durations=10

## Unit tests only.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not slow"

clean:
	rm -rf $(VENV) outputs .pytest_cache
