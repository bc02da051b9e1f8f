# The two Quickstart commands are `make serve` and `make test`; both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Where no CUDA GPU is present (no nvidia-smi), take torch's CPU build from PyTorch's CPU wheel
# index: PyPI's Linux wheel is the CUDA build, several GB. Where that index cannot be reached
# (within TORCH_INDEX_TIMEOUT seconds, no retry), torch comes from the default index. See
# docs/install.md. Override TORCH_SPEC / TORCH_INDEX_URL to choose another (TORCH_INDEX_URL= : none).
HAS_NVIDIA_SMI := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
TORCH_SPEC ?= $(if $(HAS_NVIDIA_SMI),torch>=2.4$(,)<3,torch==2.13.0)
TORCH_INDEX_URL ?= $(if $(HAS_NVIDIA_SMI),,https://download.pytorch.org/whl/cpu)
TORCH_INDEX_TIMEOUT ?= 10
, := ,
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
# `make serve` keeps the server on this machine (127.0.0.1), as AUTOMATIC1111 and ComfyUI do; plain
# `bentoml serve` binds every interface (0.0.0.0). `make serve HOST=0.0.0.0` shares it (A1111's --listen):
# see docs/security.md for what else sharing needs. PORT picks another port.
HOST ?= 127.0.0.1
PORT ?=

.PHONY: install serve test mutate lint format clean

$(BIN)/.installed: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(if $(TORCH_INDEX_URL),$(PIP) install --no-deps --index-url $(TORCH_INDEX_URL) \
		--timeout $(TORCH_INDEX_TIMEOUT) --retries 0 "$(TORCH_SPEC)" \
		|| echo "torch: not found at $(TORCH_INDEX_URL); installing torch from the default index")
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/bentoml serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

# Two pytest workers (pytest-xdist), each test module whole on one of them, so that a module's server starts
# once: most of a test's time is one core starting torch or a `bentoml serve`. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

# Break the code on purpose, one curated way at a time, and check the tests notice (issue #14).
mutate: install
	$(BIN)/python tests/mutation_check.py $(MUTATE_FLAGS)

# ruff: the style check CI runs (lint), and the fixer (format).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV)
