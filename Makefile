# edgemoe — the two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EDGEMOE := $(VENV)/bin/edgemoe
PIP := $(PY) -m pip --disable-pip-version-check -q
# llama.cpp is compiled once per machine, by `edgemoe build` (cached in ~/.cache/edgemoe/builds): the Python
# binding is installed without its own copy (LLAMA_BUILD=OFF) and loads that build's libllama.
LLAMA_CPP_PYTHON := $(shell sed -n 's/.*"\(llama-cpp-python==[0-9.]*\)".*/\1/p' pyproject.toml)
# The venv's tools first (edgemoe, and cmake/ninja where the machine has none) for setup and the tests alike.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo test test-fast lint format bench clean help

help:
	@echo "make demo       convert both fixtures, ask PT and Thinking the same question"
	@echo "make test       all tests, slow ones too (builds, emulation); what CI runs"
	@echo "make test-fast  ruff (format and lint), then the tests not marked slow"
	@echo "make format     let ruff format and fix the code"
	@echo "make setup      create $(VENV) and install edgemoe with its dependencies"

# The binding skips pip's wheel cache: a library-less wheel must not be reused by other projects' installs.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	CMAKE_ARGS="-DLLAMA_BUILD=OFF" $(PIP) install --no-cache-dir '$(LLAMA_CPP_PYTHON)'
	$(PIP) install -e '.[test]'
	# edgemoe build drives CMake + Ninja; a machine without them gets PyPI's into the venv.
	command -v cmake >/dev/null && command -v ninja >/dev/null || $(PIP) install cmake ninja
	touch $@

# Idempotent: after the first time `edgemoe build` is a cache hit and returns at once.
# EDGEMOE_BUILD_ARGS passes options to it, e.g. EDGEMOE_BUILD_ARGS="--kleidiai-src DIR" on an offline board.
setup: $(VENV)/.installed
	$(EDGEMOE) build --target native $(EDGEMOE_BUILD_ARGS)

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup lint
	$(PY) -m pytest -q -m "not slow"

# ruff: the formatter and the linter, one line length (pyproject.toml); `make format` rewrites what --check finds
lint: $(VENV)/.installed
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build dist *.egg-info .pytest_cache
