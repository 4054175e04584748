# bafm: every target sets up .venv first, so `make train` / `make test` work on a fresh clone.
SHELL := /bin/bash
PYTHON_BASE ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
EXP ?= experiments/digits.yaml
ARGS ?=
OUT ?=
RUNS ?= runs
BAFM = $(PY) -m bafm
OUT_ARG = $(if $(OUT),--out "$(OUT)",)

.DEFAULT_GOAL := help
.PHONY: help setup data backbone train eval-nfe-sweep optimize-grid edit test test-slow test-gpu tensorboard bench clean

help: ## Show this help
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'
	@echo "  Variables: EXP=experiments/<name>.yaml (default $(EXP)), ARGS=\"key=value ...\", OUT=<dir>"

# Re-installs only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $@

setup: $(VENV)/.installed ## Create .venv (Python 3.11) with torch and bafm in editable mode

data: setup ## Write latent shards for EXP (embedded default: scikit-learn digits)
	$(BAFM) data --config "$(EXP)" $(ARGS)

backbone: setup ## Train the embedded default's SiT backbone and digits classifier from scratch
	$(BAFM) backbone --config "$(EXP)" $(ARGS)

train: setup ## Train the SideNet for EXP (logs, checkpoints and the exported SideNet in runs/<name>/)
	$(BAFM) train --config "$(EXP)" $(ARGS)

eval-nfe-sweep: setup ## FID/IS/trajectory error per solver and NFE budget (OUT=<dir> to redirect)
	$(BAFM) eval-nfe-sweep --config "$(EXP)" $(OUT_ARG) $(ARGS)

optimize-grid: setup ## Search time grids per solver and NFE (JSON in the run folder runs/<name>/; OUT=<file.json> to redirect)
	$(BAFM) optimize-grid --config "$(EXP)" $(OUT_ARG) $(ARGS)

edit: setup ## Invert images and regenerate them under another class
	$(BAFM) edit --config "$(EXP)" $(OUT_ARG) $(ARGS)

test: setup ## Run the fast test suite (no slow/gpu tests)
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

test-slow: setup ## Run the slow tests (DDP, longer training)
	$(PY) -m pytest -q -m "slow and not gpu" $(ARGS)

test-gpu: setup ## Run the GPU tests (needs CUDA)
	$(PY) -m pytest -q -m gpu $(ARGS)

tensorboard: setup ## Serve runs/ with TensorBoard on localhost:6006 (says so when runs/ holds no logs yet)
	@if ! find "$(RUNS)" -name 'events.out.tfevents.*' -print -quit 2>/dev/null | grep -q .; then \
		echo "$(RUNS)/ holds no TensorBoard logs yet: run \`make train\` (or \`make eval-nfe-sweep\`) first." >&2; exit 2; fi
	$(VENV)/bin/tensorboard --logdir "$(RUNS)" --host localhost --port 6006

bench: setup ## Run the benchmarks under bench/ (JSON in bench/results/)
	$(PY) bench/run_all.py $(ARGS)

clean: ## Remove runs/ and caches (keeps .venv, data and checkpoints)
	rm -rf runs .pytest_cache
