# The two entry points: `make test` (set up and run the test suite) and, later, `make demo`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this release is on the development and CI machines' disk; an open range would
# pull a multi-GB CUDA build. Override on a GPU machine: make test TORCH_SPEC='torch==2.11.0'.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python setup.py requirements.txt pyproject.toml
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e ".[test]"
	@touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest tests

lint: install
	$(BIN)/ruff check megamm tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
