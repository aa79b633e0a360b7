# One entry point for set-up, tests, the demo and benchmarks. Every target sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint bench-export bench-decode clean

setup: $(STAMP)

# torch==2.13.0 first: pip takes the CPU wheel kept on this machine's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build. torch is a test/dev dependency only.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,hub]'
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/dymoe demo

lint: setup
	$(BIN)/ruff check .

bench-export: setup
	$(BIN)/python benchmarks/export_throughput.py

bench-decode: setup
	$(BIN)/python benchmarks/decode_speed.py

clean:
	rm -rf build dist *.egg-info results .pytest_cache
