# Two commands do everything on a fresh machine:
#   make run    create .venv, install the project, run the server on its defaults
#   make test   create .venv, install the project and its test tools, run ruff, mypy --strict,
#               the import contracts, the strict documentation build, then pytest
#   make docs   build the documentation site into site/ (make docs-serve: live on 127.0.0.1:8000)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Not -q: mkdocs --quiet also silences the warnings that --strict turns into a failure.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

.PHONY: run test lint docs docs-serve bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m app serve

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests bench docs
	$(VENV)/bin/ruff format --check app tests bench docs
	$(VENV)/bin/mypy --strict
	$(VENV)/bin/mypy --strict docs/hooks.py
	$(VENV)/bin/lint-imports
	$(MKDOCS) build --strict --site-dir site

docs: $(STAMP)
	$(MKDOCS) build --strict --site-dir site

docs-serve: $(STAMP)
	$(MKDOCS) serve --strict --dev-addr 127.0.0.1:8000

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/run.py --write-docs $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache site
	$(MAKE) -C bench clean
