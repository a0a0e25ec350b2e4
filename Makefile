# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test docs demo clean compat mutate

setup: $(STAMP)

# constraints.txt pins every dependency to the tested set (torch and torchvision come from this
# machine's local disk).
$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The web demo's test drives Debian's chromium (nothing downloaded); installed when running as root.
TEST_STAMP := $(VENV)/.installed-test
# transformers' common model tests ship in its sdist, not its wheel: that of the installed version is
# fetched through pip into $(VENV)/transformers-tests/<version> (tests/modeling/test_transformers_common.py).
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,docs,index,demo,tracking,bench]"
	$(PY) tests/fetch_transformers_tests.py
	if [ "$$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi
	touch $(TEST_STAMP)

# Two workers, one test file each at a time (--dist loadfile keeps a file's module fixtures in one
# worker): the suite is mostly one busy core at a time, so on CI's 2 cores this cuts its time by a third
# (14:07 -> 8:41 measured on a fresh clone, 2026-12-07).
PYTEST_WORKERS ?= 2
# The documentation site first (seconds): --strict fails on a broken link, anchor or API reference.
# The suite then runs every example of README.md and docs/ (tests/test_docs_examples.py).
# NO_MKDOCS_2_WARNING: Material for MkDocs prints a banner about MkDocs 2.0 on every build.
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs
test: $(TEST_STAMP)
	$(MKDOCS) build --strict --quiet --site-dir $(VENV)/site
	$(PY) tests/fetch_transformers_tests.py >/dev/null  # nothing to do unless transformers changed
	HF_HUB_OFFLINE=1 $(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# The documentation site (mkdocs.yml, docs/), served at http://127.0.0.1:8000 and rebuilt on every
# change of the pages, ARCHITECTURE.md, benchmarks/RESULTS.md or modeling_barlow's docstrings.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,docs]"
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(MKDOCS) serve

# Drift check: the newest release of every dependency within setup.py's ranges (only torch and
# torchvision held, from local disk; no constraints.txt) in a separate venv, the whole suite with
# transformers' common tests of that version, and benchmarks/results/compat.json from its junit xml.
COMPAT := .venv-compat
compat:
	rm -rf $(COMPAT) && $(PYTHON) -m venv $(COMPAT)
	$(COMPAT)/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(COMPAT)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev,docs,index,demo,tracking,bench]"
	$(COMPAT)/bin/python tests/fetch_transformers_tests.py
	-HF_HUB_OFFLINE=1 $(COMPAT)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -q -p no:cacheprovider --junitxml=$(COMPAT)/junit.xml
	$(COMPAT)/bin/python benchmarks/compat.py --junit $(COMPAT)/junit.xml --output benchmarks/results/compat.json

# Mutation testing, apart from `make test`: mutmut edits the code one small change at a time and runs
# the fast in-process tests that guard each module (benchmarks/mutation.py lists them); counts and the
# surviving mutants, each explained, go to benchmarks/results/mutation.json. CPU heavy: minutes per
# module. `make mutate MODULES="barlow_cli store"` runs some.
MUTATION_STAMP := $(VENV)/.installed-mutation
$(MUTATION_STAMP): $(TEST_STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,mutation]"
	touch $(MUTATION_STAMP)

mutate: $(MUTATION_STAMP)
	HF_HUB_OFFLINE=1 nice -n 10 $(PY) benchmarks/mutation.py $(MODULES)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --output_dir demo_output

clean:
	rm -rf demo_output .pytest_cache $(COMPAT) .mutation
