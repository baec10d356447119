# The two commands of the README: `make serve` and `make test`. Both install what is missing first.
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install install-dev serve test lint bench model

install:
	scripts/install.sh --cpu

install-dev:
	scripts/install.sh --cpu --dev --system-tools

model: install
	$(VENV)/bin/prosocial model prepare

serve: install
	$(VENV)/bin/prosocial serve $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

test: install-dev lint
	$(VENV)/bin/prosocial model prepare
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -rs --durations=25 $(ARGS)

bench: install-dev
	$(PY) -m bench.serving
