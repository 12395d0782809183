# edgemoe — the two commands a newcomer types: `make demo` and `make test`. Each sets itself up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EDGEMOE := $(VENV)/bin/edgemoe
# pip's wheel cache keeps the compiled llama-cpp-python, so only the first install on a machine compiles.
PIP := $(PY) -m pip --disable-pip-version-check -q
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

.PHONY: setup demo test test-fast bench clean help

help:
	@echo "make demo       convert both fixtures, ask PT and Thinking the same question"
	@echo "make test       all tests, slow ones too (builds, emulation); what CI runs"
	@echo "make test-fast  tests not marked slow"
	@echo "make setup      create $(VENV) and install edgemoe with its dependencies"

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf build dist *.egg-info .pytest_cache
