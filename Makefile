SHELL := /bin/bash
# dspark_ops: `make test` and `make demo` work on a fresh machine.
#
#   make test                              venv + build + cuda-check + pytest
#   make test NO_VENV=1 PYTHON=python3     against an existing torch (GPU machine)
#   make demo                              speculative decoding on the embedded default model
#   make ops-demo                          the ops demo (verify_chunk on a realistic draft batch)
#   make bench                             microbenchmarks (JSON under bench/results/)
#   make cuda-check                        nvcc compile check of csrc/kernels/*.cuh
#
# Settings: PYTHON (the interpreter; python3.11 for the venv), NO_VENV=1,
# TORCH_PIN (default torch==2.14.1, the CUDA 13.0 build on local disk),
# DSPARK_FORCE_CUDA (1: a CPU-only build is an error; 0: skip CUDA),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), MAX_JOBS, PYTEST_ARGS.

NO_VENV ?= 0
TORCH_PIN ?= torch==2.14.1
PYTEST_ARGS ?=
VENV := .venv

ifeq ($(NO_VENV),1)
PYTHON ?= python3
PY := $(PYTHON)
ENV_STAMP :=
# Without a venv the extension is built in place and used from the tree.
export PYTHONPATH := $(CURDIR):$(PYTHONPATH)
else
PYTHON ?= python3.11
PY := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.deps-installed
endif

.PHONY: test demo ops-demo bench build cuda-check clean

$(VENV)/.deps-installed: Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_PIN)" numpy scipy pytest ninja "setuptools>=64" wheel
	$(VENV)/bin/pip install --quiet transformers safetensors tqdm matplotlib  # optional extras: HF adapter tests, weights, demo, plots
	touch $@

build: $(ENV_STAMP)
ifeq ($(NO_VENV),1)
	$(PY) setup.py build_ext --inplace
else
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | grep -E "dspark_ops: building|error:|Error|Successfully installed" ; \
	  test $${PIPESTATUS[0]} -eq 0
endif

cuda-check: $(ENV_STAMP)
	$(PY) tools/cuda_check.py

test: build cuda-check
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

demo: build
	$(PY) -m dspark_ops demo

ops-demo: build
	$(PY) -m dspark_ops ops-demo

bench: build
	$(PY) -m bench --quick

clean:
	rm -rf build dspark_ops/_C*.so *.egg-info
