# The two set-up commands: `make up` starts the suite on the embedded model, `make test` runs the tests.
PY ?= python3
STAMP := .deps-installed

$(STAMP): pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: up test lint
up: $(STAMP)
	$(PY) -m services.cli build
	$(PY) -m services.cli up

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: $(STAMP) lint
	$(PY) -m services.cli build
	$(PY) -m pytest -q
