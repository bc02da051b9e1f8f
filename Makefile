# The two Quickstart commands are `make serve` and `make test`; both set up .venv first.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# Where no CUDA GPU is present, take torch's CPU build (on this project's machines it lies on
# disk); elsewhere the normal wheel. Override TORCH_SPEC / TORCH_INDEX_URL to choose another.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.4,<3' || echo 'torch==2.13.0')
TORCH_INDEX_URL ?=
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
	$(PIP) install "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(PIP) install -e ".[dev]"
	touch $@

install: $(BIN)/.installed

serve: install
	$(BIN)/bentoml serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: install
	$(BIN)/python -m pytest

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
