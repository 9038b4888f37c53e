# The two commands of the README: `make reproduce` and `make test`.
# Both create .venv, install requirements.txt and, where apt is available and
# the user is root, the Debian package with the offline Fashion-MNIST files.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TESTSTAMP := $(VENV)/.installed-test
FASHION := /usr/share/datasets/fashion-mnist
# two test processes, each test file in one (its module fixtures run once); the
# tests' small models leave a core idle, so two share 2 cores well
PYTEST_ARGS ?= -n 2 --dist loadfile
# papers at a time in `make reproduce` (reproduce all --jobs N)
JOBS ?= 2

.PHONY: setup data reproduce test lint bench clean

$(STAMP): requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

data:
	@if [ -d $(FASHION) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing dataset-fashion-mnist (Debian package)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist >/dev/null; \
	else \
		echo "note: $(FASHION) is missing; run 'sudo apt-get install dataset-fashion-mnist', or pass --data-dir, or let tensorflow-datasets download it"; \
	fi

$(TESTSTAMP): $(STAMP) requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $(TESTSTAMP)

setup: $(STAMP) data

reproduce: setup
	$(PY) -m reproduce all --preset quick --jobs $(JOBS)

test: setup $(TESTSTAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
