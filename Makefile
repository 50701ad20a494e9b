# Everything a fresh machine needs: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast gpu gpu-smoke install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/vlprompt --cache-help  # the LightningCLI commands' --help, instant from now on
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

## The GPU check: the `gpu` test tier and the speed/memory benchmarks on CUDA, written to
## outputs/gpu-report/gpu_report.{json,md} (about 6 minutes on one 80 GB GPU).
gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu_report.py

## The same command on the CPU at tiny sizes (the test suite runs it, so it cannot rot).
gpu-smoke: $(STAMP)
	$(BIN)/python benchmarks/gpu_report.py --smoke

clean:
	rm -rf $(VENV) outputs .pytest_cache
