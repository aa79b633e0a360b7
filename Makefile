# One entry point for set-up, tests, the demo and benchmarks. Every target sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup test demo lint bench bench-export bench-export-qwen3 bench-decode bench-decode-profile bench-llama-cpp bench-expert-calls bench-quant bench-serve bench-trt bench-backbone clean calibrate

setup: $(STAMP)

# torch==2.13.0 first: pip takes the CPU wheel kept on this machine's disk; a bare `torch`
# requirement would pull a multi-GB CUDA build. torch is a test/dev dependency only.
# The editable install's one remaining notice ("Editable installation ... be careful with folders
# named like your package") is setuptools informing, not a problem of this project: it is filtered
# so that set-up prints nothing unless something is wrong.
$(STAMP): pyproject.toml
	@echo "set-up: $(VENV) with dymoe and its test tools (once, about a minute)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip
	@$(BIN)/pip install -q torch==2.13.0
	@PYTHONWARNINGS="ignore:Editable installation" $(BIN)/pip install -q -e '.[dev,hub,report,serve]'
	@touch $(STAMP)
	@echo "set-up: done"

test: setup
	$(BIN)/python -m pytest -q

demo: setup
	$(BIN)/dymoe demo

lint: setup
	$(BIN)/ruff check .

# the standard policy comparison on the demo model widened 64 times (realistic expert sizes, trained
# routing), budgets 10/15/25/50 %; JSON and plots land in results/ (not committed). About 40 minutes;
# --model demo or synthetic for the others (benchmarks/runtime_policies.py --help)
bench: setup
	$(BIN)/python benchmarks/runtime_policies.py --model widened

bench-export: setup
	$(BIN)/python benchmarks/export_throughput.py

# Qwen3-30B-A3B's exact shapes, 2 of its 48 layers (3.7 GB of bf16 to write once, 7.3 GB of bundle
# per run, under .cache/bench/), default export settings, workers 1 and 2, extrapolated to the
# whole model; with the per-stage profile (results/export_qwen3_30b_shape.json). About 15 minutes.
QWEN3_ARGS ?= --layers 2 --workers 1,2 --profile 3
bench-export-qwen3: setup
	$(BIN)/python benchmarks/export_qwen3_30b_shape.py $(QWEN3_ARGS)

bench-decode: setup
	$(BIN)/python benchmarks/decode_speed.py

# where a decode step's time goes at Qwen3-30B-A3B's shapes (2 layers exported, extrapolated to 48),
# against transformers on the same checkpoint
bench-decode-profile: setup
	test -f .cache/bench/bundle_qwen3_30b_shape/manifest.json || \
	    $(BIN)/python benchmarks/export_qwen3_30b_shape.py --layers 2 --workers 2 --keep
	$(BIN)/python benchmarks/decode_profile.py --transformers .cache/bench/qwen3_30b_a3b_l2

# all-resident decode against llama.cpp Q4_0 on the same Qwen3-30B-A3B-shaped model at 4 and 8 layers,
# extrapolated to 48 (results/llama_cpp_decode.json). The first run downloads llama.cpp's source (the
# llama-cpp-python sdist on PyPI vendors it) and builds it: about 40 minutes and 30 GB under .cache/bench
bench-llama-cpp: setup
	$(BIN)/python benchmarks/llama_cpp_decode.py --backbone int8,int4

# a layer's 8 routed experts as 8 ORT calls (dymoe) against one fused graph, 48 layers' worth so the
# weights come from memory (results/expert_calls.json; about 3 minutes)
bench-expert-calls: setup
	$(BIN)/python benchmarks/expert_calls.py

# dymoe serve under load on loopback: 16 clients x 4 requests, completed / 429 / p50 / p99
# (results/serve_load.json)
bench-serve: setup
	$(BIN)/python benchmarks/serve_load.py

# rtn / hqq / gptq: demo held-out perplexity per precision, expert errors, export time, and
# seconds + peak memory per expert at realistic shapes (results/quantizers.json)
bench-quant: setup
	$(BIN)/python benchmarks/quantizers.py

# TensorRT's symmetric fp16-scaled int4 against the portable asymmetric int4 and fp32: demo held-out
# perplexity on the CPU provider (results/trt_int4.json)
bench-trt: setup
	$(BIN)/python benchmarks/trt_int4.py

# The backbone at each --backbone-precision: demo perplexity / agreement / size (results/backbone_precision.json),
# then a Qwen3-30B-A3B-shaped backbone's size, resident memory, decode step and 16 GB plan
# (results/backbone_size.json; writes a 3.7 GB synthetic checkpoint under .cache/bench, 15-25 minutes)
bench-backbone: setup
	$(BIN)/python benchmarks/backbone_precision.py
	$(BIN)/python benchmarks/backbone_size.py

# Calibrate the shipped demo model (CI jobs; a few minutes at most on 2 cores): export it into
# .cache/ when that bundle is missing or older than the weights, then measure on its held-out text.
# calibration.json goes into the bundle, the report into results/calibration/.
DEMO_MODEL  ?= models/demo
DEMO_BUNDLE ?= .cache/calibrate/demo
CAL_DATA    ?= $(DEMO_MODEL)/heldout.txt
CAL_REPORT  ?= results/calibration
CAL_ARGS    ?=

calibrate: setup
	@test -f $(DEMO_MODEL)/config.json || { echo "no demo model in $(DEMO_MODEL) yet (scripts/train_demo_model.py trains it)"; exit 1; }
	@if [ ! -f $(DEMO_BUNDLE)/manifest.json ] || [ -n "$$(find $(DEMO_MODEL) -maxdepth 1 -newer $(DEMO_BUNDLE)/manifest.json \( -name '*.safetensors' -o -name '*.json' \))" ]; then \
		$(BIN)/dymoe export $(DEMO_MODEL) --out $(DEMO_BUNDLE) --force; fi
	$(BIN)/dymoe calibrate $(DEMO_BUNDLE) --data $(CAL_DATA) --report $(CAL_REPORT) $(CAL_ARGS)

clean:
	rm -rf build dist *.egg-info results .pytest_cache
