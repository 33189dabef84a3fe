# `make train`: set everything up and pre-train with Montage on the embedded dataset (short CPU run).
# `make test`:  set everything up and run the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATA := data/embedded

.PHONY: setup system-deps venv data train test lint

setup: system-deps venv data

system-deps:
	@scripts/install_system_deps.sh

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	touch $@

data: venv system-deps
	$(BIN)/python -m tools.embedded --out $(DATA)

train: setup
	$(BIN)/python train.py --method montage $(ARGS)

test: setup
	@scripts/run_tests.sh $(ARGS)

lint: venv
	$(BIN)/ruff check .
