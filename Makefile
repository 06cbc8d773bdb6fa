# authsvc: `make run` serves on 127.0.0.1:50051, `make test` runs the whole suite
# (`make test-fast`: the unit and integration tiers, for the edit-run loop).
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-fast test-system lint fmt docs proto check-proto load bench freshness soak clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e ./clients/python -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/authsvc serve

# Every tier, one test at a time (what CI runs).
test: $(STAMP)
	$(PY) -m pytest

# The unit and integration tiers on TEST_WORKERS processes (pytest-xdist; each has its own
# embedded PostgreSQL). The system tier (processes, load, soak, Node, fuzzing, timing,
# large tables) is left to `make test` and `make test-system`. Tiers: tests/conftest.py.
TEST_WORKERS ?= 2
test-fast: $(STAMP)
	$(PY) -m pytest -m "not system" -n $(TEST_WORKERS)

test-system: $(STAMP)
	$(PY) -m pytest -m system

LINTED := service tests scripts clients/python examples/python/orders_service.py

lint: $(STAMP) check-proto
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/mypy
	cd protos && ../$(VENV)/bin/buf lint

fmt: $(STAMP)
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# Regenerate the configuration table in docs/operations.md from the declarations in
# service/settings.py (tests/test_settings.py compares).
docs: $(STAMP)
	$(PY) -m service.settings_table --write docs/operations.md

# Regenerate clients/python/authsvc_client/gen/ from protos/ (the output is committed).
proto: $(STAMP)
	$(PY) scripts/gen_protos.py

# Fails if clients/python/authsvc_client/gen/ does not match protos/ (also run as a test).
check-proto: $(STAMP)
	$(PY) -m pytest -q tests/test_generated_code.py

# The mixed scenario against AUTH_TARGET, or against a server started for the run.
# Tune with LOAD_ARGS, e.g. make load LOAD_ARGS="--scenario validate --duration 30".
LOAD_ARGS ?=
load: $(STAMP)
	$(VENV)/bin/authsvc load --scenario mixed $(if $(AUTH_TARGET),--target $(AUTH_TARGET)) $(LOAD_ARGS)

# Every figure against one server in one run, as ratios to baselines (about 3 minutes);
# rewrites the figures section of docs/performance.md (command, date, machine, figures).
bench: $(STAMP)
	$(VENV)/bin/authsvc bench --write-docs docs/performance.md

# bench's freshness rows alone: Revoke on one replica to refusal by a LocalValidator on
# another, steady and while that replica's listener is cut (issue 10; about 40 s).
freshness: $(STAMP)
	$(PY) -m service.loadtest.freshness

# The mixed load for SOAK_SECONDS (default 180) with scripted faults: PostgreSQL restarted
# twice, a worker killed, a reuse attack every second; then the invariants. Loopback only.
SOAK_SECONDS ?= 180
soak: $(STAMP)
	$(PY) -m service.loadtest.soak --duration $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .authsvc .pytest_cache .mypy_cache .ruff_cache
