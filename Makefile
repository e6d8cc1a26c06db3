# One-command workflows. `make serve` and `make test` set everything up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup assets serve test test-fast bench train-cpu evaluate clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: on this CPU machine pip takes the local CPU build, never a multi-GB CUDA one.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(BIN)/hellaswag-fetch-assets

# The same entrypoint script the Docker image runs.
serve: assets
	PATH="$(CURDIR)/$(BIN):$$PATH" APP_HOST=$(HOST) APP_PORT=$(PORT) docker/entrypoint.sh serve

# Exit code 5 means "no tests collected": not a failure for a filtered run.
test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

test-fast: setup
	$(BIN)/python -m pytest -m "not real_model and not slow" $(PYTEST_ARGS)

evaluate: assets
	$(BIN)/hellaswag-evaluate

bench: assets
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) .pytest_cache
