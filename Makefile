SHELL := /bin/bash
# dspark_ops: `make test` and `make demo` work on a fresh machine.
#
#   make test                              venv + build + cuda-check + pytest
#   make test NO_VENV=1 PYTHON=python3     against an existing torch (GPU machine)
#   make demo                              speculative decoding on the embedded default model
#   make ops-demo                          the ops demo (verify_chunk on a realistic draft batch)
#   make bench                             microbenchmarks (JSON under bench/results/)
#   make cuda-check                        nvcc compile check of csrc/kernels/*.cuh
#   make test-emulated                     the op suites through the emulated CUDA kernels (tools/cuda_emu)
#   make test-emulated-asan                tests/test_cuda_emulated.py under AddressSanitizer (make test runs it)
#
# Settings: PYTHON (the interpreter; python3.11 for the venv), NO_VENV=1,
# TORCH_PIN (default torch==2.14.1, the CUDA 13.0 build on local disk),
# DSPARK_FORCE_CUDA (1: a CPU-only build is an error; 0: skip CUDA),
# TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX"), MAX_JOBS, PYTEST_ARGS,
# EMULATOR=0 (skip the emulated CUDA kernels: a GPU machine runs the real ones).

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

EMULATOR ?= 1
# The CUDA emulator's AddressSanitizer pass: python is not linked with libasan or libstdc++, so both are preloaded.
ASAN_LIB := $(shell g++ -print-file-name=libasan.so 2>/dev/null)
EMU_ASAN_ENV := CUEMU_ASAN=1 LD_PRELOAD="$(ASAN_LIB) $(shell g++ -print-file-name=libstdc++.so.6 2>/dev/null)" \
  ASAN_OPTIONS=detect_leaks=0:detect_container_overflow=0
EMU_SUITES := tests/test_verify_chunk.py tests/test_verify_tree.py tests/test_sample.py tests/test_markov_draft.py \
  tests/test_schedule_verify.py tests/test_kv_compact.py tests/test_verify_chunk_errors.py \
  tests/test_verify_tree_errors.py tests/test_workspace_checks.py
ifeq ($(EMULATOR),1)
EMU_IGNORE :=
else
EMU_IGNORE := --ignore=tests/test_cuda_emulated.py
endif

.PHONY: test demo ops-demo bench build cuda-check clean test-emulated test-emulated-asan

$(VENV)/.deps-installed: Makefile pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet "$(TORCH_PIN)" numpy scipy pytest ninja "setuptools>=77" wheel
	$(VENV)/bin/pip install --quiet transformers safetensors tqdm matplotlib  # optional extras: HF adapter tests, weights, demo, plots
	touch $@

ifeq ($(NO_VENV),1)
build: $(ENV_STAMP)
	$(PY) setup.py build_ext --inplace
else
# pip's editable build compiles everything again each time (~4 min on 2 cores), so the venv build is skipped
# while the sources, setup.py, pyproject.toml and the build settings are unchanged and the extension exists.
BUILD_STAMP := $(VENV)/.ext-built
BUILD_CONFIG := $(VENV)/.ext-config
BUILD_SETTINGS := $(DSPARK_FORCE_CUDA)|$(TORCH_CUDA_ARCH_LIST)|$(TORCH_PIN)
EXT_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml

build: $(ENV_STAMP)
	@ls dspark_ops/_C*.so >/dev/null 2>&1 || rm -f $(BUILD_STAMP)
	@echo '$(BUILD_SETTINGS)' | cmp -s - $(BUILD_CONFIG) || echo '$(BUILD_SETTINGS)' > $(BUILD_CONFIG)
	@$(MAKE) --no-print-directory $(BUILD_STAMP)

$(BUILD_STAMP): $(ENV_STAMP) $(BUILD_CONFIG) $(EXT_SOURCES)
	$(PY) -m pip install -v --no-build-isolation --no-deps -e . 2>&1 | grep -E "dspark_ops: building|error:|Error|Successfully installed" ; \
	  test $${PIPESTATUS[0]} -eq 0
	touch $@
endif

cuda-check: $(ENV_STAMP)
	$(PY) tools/cuda_check.py

# -s: an AddressSanitizer report ends the process, so pytest must not capture it. One schedule: bounds do
# not depend on it, and the pass costs a third.
EMU_ASAN_TEST = $(EMU_ASAN_ENV) $(PY) -m pytest -q -s -p no:logging -k "not sched1 and not sched2" $(PYTEST_ARGS) \
  tests/test_cuda_emulated.py

test: build cuda-check
	$(PY) -m pytest -q $(EMU_IGNORE) $(PYTEST_ARGS) tests
ifeq ($(EMULATOR),1)
	@if [ -f "$(ASAN_LIB)" ]; then echo '$(EMU_ASAN_TEST)'; $(EMU_ASAN_TEST); \
	else echo "make test: g++ has no libasan here: the emulator's AddressSanitizer pass is skipped"; fi
endif

test-emulated: build
	DSPARK_EMULATE_CUDA=1 $(PY) -m pytest -q -p no:logging $(PYTEST_ARGS) $(EMU_SUITES)

test-emulated-asan: build
	$(EMU_ASAN_TEST)

demo: build
	$(PY) -m dspark_ops demo

ops-demo: build
	$(PY) -m dspark_ops ops-demo

bench: build
	$(PY) -m bench --quick

clean:
	rm -rf build dspark_ops/_C*.so *.egg-info $(VENV)/.ext-built $(VENV)/.ext-config
