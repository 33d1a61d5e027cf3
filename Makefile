# One command to run the demo, one to run the tests. Both build .venv on first use:
# torch==2.13.0 first (the CPU build; an unpinned torch would pull a multi-GB CUDA build),
# then semiseg with its extras.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.semiseg-installed
TORCH_VERSION ?= 2.13.0
EXTRAS ?= text,test

.PHONY: demo test lint install clean-venv bench

# UTF-8 I/O whatever the machine's locale (torch.compile's inductor reads its templates with
# the default encoding and fails under LANG=C / POSIX).
export PYTHONUTF8 := 1

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/semiseg demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/python -m ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/inference.py

clean-venv:
	rm -rf $(VENV)
