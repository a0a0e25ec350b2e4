# `make demo` and `make test` work on a fresh machine: they create .venv and install everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo clean

setup: $(STAMP)

# torch and torchvision are pinned by constraints.txt (they come from this machine's local disk).
$(STAMP): setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# The web demo's test drives Debian's chromium (nothing downloaded); installed when running as root.
TEST_STAMP := $(VENV)/.installed-test
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,index,demo]"
	if [ "$$(id -u)" = 0 ] && ! command -v chromedriver >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; fi
	touch $(TEST_STAMP)

test: $(TEST_STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) examples/demo.py --output_dir demo_output

clean:
	rm -rf demo_output .pytest_cache
