# Quick start: `make run`. Whole test suite: `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
NODE := node_modules/.installed
TOKEN := contracts/build/TestUSDC.json

.PHONY: run test lint setup clean

run: $(RUNTIME) $(TOKEN)
	$(PY) manage.py quickstart

test: $(DEV) $(TOKEN)
	$(PY) -m pytest

lint: $(DEV)
	$(VENV)/bin/ruff check .

setup: $(DEV) $(TOKEN)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUNTIME): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV): requirements.txt requirements-dev.txt $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@

$(NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TOKEN): contracts/TestUSDC.sol contracts/compile.js $(NODE)
	node contracts/compile.js

clean:
	rm -rf $(VENV) node_modules contracts/build var
