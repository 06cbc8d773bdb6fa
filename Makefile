# authsvc: `make run` serves on 127.0.0.1:50051, `make test` runs the whole suite.
# Both create .venv on first use and install the project into it.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint fmt proto check-proto bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

run: $(STAMP)
	$(VENV)/bin/authsvc serve

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP) check-proto
	$(VENV)/bin/ruff check service tests scripts
	$(VENV)/bin/ruff format --check service tests scripts
	$(VENV)/bin/mypy
	cd protos && ../$(VENV)/bin/buf lint

fmt: $(STAMP)
	$(VENV)/bin/ruff format service tests scripts
	$(VENV)/bin/ruff check --fix service tests scripts

# Regenerate service/gen/ from protos/ (the output is committed).
proto: $(STAMP)
	$(PY) scripts/gen_protos.py

# Fails if service/gen/ does not match protos/ (also run as a test).
check-proto: $(STAMP)
	$(PY) -m pytest -q tests/test_generated_code.py

clean:
	rm -rf $(VENV) .authsvc .pytest_cache .mypy_cache .ruff_cache
