# make test: create .venv if missing, install the requirements, run the test suite.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup test bench

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_strategies.py --skip-imagenet
