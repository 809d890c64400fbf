# sgdnoise: `make study` runs the study, `make test` the whole suite; both create .venv if missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Stage commands (`sgdnoise ...` in dvc.yaml) and tests find the venv's tools first.
export PATH := $(CURDIR)/$(BIN):$(PATH)
# torch and torchvision are pinned to the builds in these machines' local cache.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup study test lint format ui ui-screenshots dashboard bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

# Two pytest processes, one per core (most tests wait on subprocesses: 1.5x faster on 2
# cores); a file's tests stay together and in order (module fixtures are shared).
PYTEST_PARALLEL ?= -n 2 --dist loadfile

study: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/ruff check src analysis tests benchmarks
	$(BIN)/ruff format --check src analysis tests benchmarks
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL)

lint: $(STAMP)
	$(BIN)/ruff check src analysis tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src analysis tests benchmarks
	$(BIN)/ruff check --fix src analysis tests benchmarks

ui: $(STAMP)
	$(BIN)/sgdnoise ui

# After make study, with Chromium installed: docs/figures/ui_*.png, as the README shows them
ui-screenshots: $(STAMP)
	$(BIN)/python docs/ui_screenshots.py

# make dashboard STUDY=constant_epochs: optuna-dashboard over that study's trials
STUDY ?= constant_epochs
dashboard: $(STAMP)
	$(BIN)/sgdnoise dashboard $(STUDY)

bench: $(STAMP)
	$(BIN)/python benchmarks/step_time.py
	$(BIN)/python benchmarks/sweep_speed.py
	$(BIN)/python benchmarks/analysis_query.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
