# Mercato: every task a newcomer or CI needs. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY ?= $(VENV)/bin/python
export PYTHONPATH := $(CURDIR)
export MLFLOW_DISABLE_TELEMETRY := true
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1
BUF := node_modules/.bin/buf

.PHONY: help setup demo up down test test-fast mutation protos protos-check lint bench bench-profile bench-ranking bench-retrieval bench-load bench-hotpath bench-catalog bench-quality bench-demo-seeds clean k8s-validate image

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-16s %s\n", $$1, $$2}'

setup: $(VENV)/.installed $(BUF) ## Create .venv and install Mercato with its dev tools (pinned)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3.11 -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --silent
	touch $@

demo: setup ## Set up, then run the whole system and show real answers
	$(PY) -m mercato.cli demo

up: setup ## Start the four services and keep them running (Ctrl-C stops them)
	$(PY) -m mercato.cli up

down: ## Stop services started by `make up` in the background
	$(PY) -m mercato.cli down

test: setup protos-check lint ## Set up, check generated code and lint, run the whole test suite
	$(PY) -m pytest -q --durations=15

test-fast: ## Before every commit: the tests that start no service process and train no model (-m "not slow")
	$(PY) -m pytest -q -m "not slow" --durations=5

MODULES ?=
mutation: setup ## Mutation testing (mutmut), one module after the other, niced; writes docs/testing.md (MODULES="offer-policy" for one)
	env -u PYTHONPATH $(PY) -m tools.mutation $(MODULES)

protos: ## Regenerate the Python stubs in mercato/v1 from protos/
	PYTHON=$(PY) ./scripts/gen_protos.sh

protos-check: ## Fail when the committed stubs differ from freshly generated ones
	PYTHON=$(PY) ./scripts/check_protos.sh

lint: setup ## ruff, mypy and buf lint
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	cd protos && ../$(BUF) lint

# Kubernetes version the manifests are validated against (kubernetes-validate's schemas).
K8S_VERSION ?= 1.32.0

# Needs kubectl (its built-in kustomize) on the PATH or in $(VENV)/bin; see docs/operations.md.
k8s-validate: $(if $(wildcard $(PY)),,setup) ## Render every k8s overlay, validate it strictly against K8S_VERSION, run our checks
	$(PY) -m tools.k8s_check --kubernetes-version $(K8S_VERSION)

# Needs podman, runc and mmdebstrap (Debian packages; .ci/run installs them).
image: setup ## Build the image with podman on an mmdebstrap Debian base, run each service with a gRPC health check
	PY=$(PY) ./scripts/image.sh

bench: setup bench-profile bench-ranking bench-retrieval bench-load bench-quality ## Run all benchmarks (writes bench/results/*.json and *.md)

bench-profile: setup ## Profile service: GetProfile p50/p99 and server CPU per call on both servers (asyncio, sync), TrackEvents events/s, both backends (ARGS="--customers 10000" for a quick run)
	$(PY) bench/profile_bench.py $(ARGS)

bench-ranking: setup ## Rank latency and offer policy vs fixed policies (bench/results/ranking.*)
	$(PY) bench/ranking.py

bench-retrieval: setup ## Retrieve p50/p99 over gRPC vs in-process, Recall@100 at 10k/100k/1M items (ARGS="--sizes 10000" for a quick run)
	$(PY) bench/retrieval_bench.py $(ARGS)

bench-index: setup ## Index choice by catalogue size: chosen index, Recall@100, ms/query vs exact (bench/results/index_choice.*)
	$(PY) bench/index_choice.py $(ARGS)

bench-load: setup ## Gateway load with all four services, 100k and 1M items (ARGS="--quick" for a smoke run)
	$(PY) bench/load.py $(ARGS)

bench-hotpath: setup ## In-process stage timings of Retrieve and Rank on trained models (bench/results/hotpath.*)
	$(PY) bench/hotpath.py $(ARGS)

bench-catalog: setup ## Idle CPU of keeping ranking's item table fresh, change feed vs full reload, 100k items (bench/results/catalog_refresh.*)
	$(PY) bench/catalog_refresh.py $(ARGS)

# Data sets run as QUALITY_JOBS processes at once (1 thread each; ML-1M first), then combined.
QUALITY_JOBS ?= 2
bench-quality: setup ## Two-tower vs popularity/ALS/EASE and the served list on ML-1M, Online Retail and synthetic (bench/results/quality.*)
	$(PY) bench/quality.py --jobs $(QUALITY_JOBS) $(ARGS)

bench-demo-seeds: setup ## The demo's shop on dev data seeds 1-6: two-tower vs ALS/EASE (bench/results/demo_seeds.*)
	$(PY) bench/demo_seeds.py $(ARGS)

clean: ## Remove local state (.mercato) and caches
	rm -rf .mercato .pytest_cache .mypy_cache .ruff_cache
