# The two entry points: `make demo` (set up, then train a small vision-language model on CPU and show
# that it learned to see) and `make test` (set up and run the test suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this release is on the development and CI machines' disk; an open range would
# pull a multi-GB CUDA build. Override on a GPU machine: make test TORCH_SPEC='torch==2.11.0'.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean cuda-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py requirements.txt pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

# The layer contract first (pyproject.toml [tool.importlinter]): an upward import fails the run.
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests --durations=30

# About 9 minutes on 2 quiet CPU cores once installed; data, checkpoints and logs go to $(DEMO_OUT).
DEMO_OUT ?= demo_out
demo: install
	$(BIN)/python tools/demo.py --out $(DEMO_OUT)

# Compile every CUDA kernel for sm_80 and sm_90 (needs only nvcc; skipped without it).
cuda-check:
	bash tools/check_cuda_compile.sh

lint: install
	$(BIN)/ruff check megamm tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
