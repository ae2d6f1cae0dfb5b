# stkd-dist: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-long test-all lint format bench clean

install: $(STAMP)

# The venv is rebuilt only when pyproject.toml changes. torch is pinned to a CPU build (see README).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: install
	$(BIN)/stkd demo

# `make test` keeps under 30 minutes on 2 cores: the few end-to-end tests of several minutes each
# (marked `long`: killed and resumed pipelines, distills on a 2-node cluster or an S3 root, sweeps
# with killed and retried trials or PBT, the fleet autoscaling under load) run with
# `make test-long`, or everything with `make test-all`.
test: install lint
	$(BIN)/pytest -m "not long"

# The elastic-training test builds its own multi-node Ray cluster (ray.cluster_utils) and runs
# in a pytest process of its own: after the `stkd cluster local` tests in the same process its
# Ray Train controller is cancelled before it starts (process-wide Ray state, not yet understood).
ELASTIC := tests/train/test_elastic_ray.py

test-long: install
	$(BIN)/pytest -m long --deselect $(ELASTIC)
	$(BIN)/pytest -m long $(ELASTIC)

test-all: install lint
	$(BIN)/pytest --deselect $(ELASTIC)
	$(BIN)/pytest -m long $(ELASTIC)

# ruff (lint and format) on everything, mypy on the package (settings in pyproject.toml)
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
