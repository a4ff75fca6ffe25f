# Two commands do everything on a fresh machine:
#   make run    create .venv-compiled, install the project as a wheel (compiled), run the server
#               on its defaults (make run-pure: the editable pure-Python install in .venv)
#   make test   create .venv, install the project and its test tools, run ruff, mypy --strict,
#               the import contracts, the strict documentation build, then pytest on the pure
#               (editable) build, then the integration and system suites on the compiled build
#               (.venv-compiled: `pip install .`, the hot modules compiled by mypyc; see setup.py)
#   make docs   build the documentation site into site/ (make docs-serve: live on 127.0.0.1:8000)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The compiled build: a wheel install, rebuilt when any source changes.
CVENV  ?= .venv-compiled
CSTAMP := $(CVENV)/.installed
SOURCES := $(shell find app -name '*.py') setup.py
# Not -q: mkdocs --quiet also silences the warnings that --strict turns into a failure.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

.PHONY: run run-pure test test-pure test-compiled lint docs docs-serve bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

$(CSTAMP): pyproject.toml $(SOURCES)
	$(PYTHON) -m venv $(CVENV)
	$(CVENV)/bin/python -m pip install --quiet --upgrade pip
	$(CVENV)/bin/python -m pip install --quiet '.[test]'
	touch $(CSTAMP)

# The shipped build: compiled (pure Python where no C compiler is found); PYTHONSAFEPATH keeps
# the source tree off sys.path, and .env here is still read.  run-pure: the editable install.
run: $(CSTAMP)
	PYTHONSAFEPATH=1 $(CVENV)/bin/python -m app serve

run-pure: $(STAMP)
	$(PY) -m app serve

lint: $(STAMP)
	$(VENV)/bin/ruff check app tests bench docs setup.py
	$(VENV)/bin/ruff format --check app tests bench docs setup.py
	$(VENV)/bin/mypy --strict
	$(VENV)/bin/mypy --strict docs/hooks.py
	$(VENV)/bin/lint-imports
	$(MKDOCS) build --strict --site-dir site

docs: $(STAMP)
	$(MKDOCS) build --strict --site-dir site

docs-serve: $(STAMP)
	$(MKDOCS) serve --strict --dev-addr 127.0.0.1:8000

test: lint test-pure test-compiled

test-pure: $(STAMP)
	ZEN_EXPECT_BUILD=pure $(PY) -m pytest $(PYTEST_ARGS)

# The installed compiled package must win over the source tree: PYTHONSAFEPATH keeps the working
# directory off sys.path (here and in every `python -m app` the tests start), and `-p app` imports
# the package before pytest puts the repository (tests/'s parent) on sys.path for `tests.*`.
# tests/integration/test_build_loaded.py fails if the pure build ran instead.
test-compiled: $(CSTAMP)
	ZEN_EXPECT_BUILD=compiled PYTHONSAFEPATH=1 $(CVENV)/bin/pytest -p app -p no:cacheprovider \
		tests/integration tests/system $(PYTEST_ARGS)

bench: $(STAMP) $(CSTAMP)
	$(PY) bench/run.py --write-docs $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CVENV) build .mypy_cache .pytest_cache .ruff_cache site
	$(MAKE) -C bench clean
