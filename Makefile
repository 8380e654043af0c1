# Two commands for a fresh machine: `make run` (terminal chat) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# llama.cpp (the local CPU model) is compiled for a portable target, never for this machine's CPU:
# empty means deploy/llama-wheel.sh's default (x86-64: AVX2, FMA, F16C, BMI2; no AVX-512, no AMX).
# Override for other CPUs, e.g. make run LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=OFF ...".
# The stamp is keyed by the flags, so changing them rebuilds (the wheel cache is keyed the same).
LLAMA_CMAKE_ARGS ?=
LLAMA_STAMP := $(VENV)/.llama-$(shell printf '%s' '$(LLAMA_CMAKE_ARGS)' | sha256sum | cut -c1-16)

.PHONY: run test check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip wheel

$(LLAMA_STAMP): deploy/llama-wheel.sh | $(BIN)/python
	rm -f $(VENV)/.llama-*
	PIP=$(BIN)/pip LLAMA_CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' bash deploy/llama-wheel.sh
	touch $@

# llama-cpp-python is installed first, so that pip finds it satisfied and never builds it natively.
$(STAMP): pyproject.toml $(LLAMA_STAMP)
	$(BIN)/pip install -e '.[test,local]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m bot chat

check: $(STAMP)
	$(BIN)/ruff check bot tests bench
	$(BIN)/ruff format --check bot tests bench
	$(BIN)/mypy
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site

test: check
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python bench/pipeline.py

clean:
	rm -rf $(VENV)
