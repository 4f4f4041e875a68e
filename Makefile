# `make test` and `make bench` work as the first command on a fresh machine: they create
# and fill .venv when it is missing. On a machine whose Python already has torch, helion
# and the project on its path, skip the venv with `make bench PY=python3 DEPS=`.
VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPS ?= $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: help install test bench bench-gemm bench-tp autotune autotune-tp restamp sass clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | expand -t 12

install: $(DEPS)  ## create .venv: TORCH_SPEC (torch==2.13.0, a CPU build), then the project

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

test: $(DEPS)  ## run the tests (CPU; a GPU also runs tests/test_gpu.py); ARGS go to pytest
	$(PY) -m pytest -q tests $(ARGS)

bench: $(DEPS)  ## eager vs torch.compile vs ours on this GPU -> perf/results/<device>.*; ARGS=--help
	$(PY) -m perf.bench $(ARGS)

bench-gemm: $(DEPS)  ## the scaled fp8 GEMM ops vs cuBLAS and the unfused path -> perf/results/<device>_gemm.*
	$(PY) -m perf.bench_gemm $(ARGS)

bench-tp: $(DEPS)  ## the all_reduce_ ops on every GPU of this host -> perf/results/<device>_x<W>.*; ARGS=--help
	$(PY) -m perf.bench_tp $(ARGS)

autotune: $(DEPS)  ## tune every op for this GPU -> configs/<device>/; ARGS=--help
	$(PY) -m helion_fusions.tools.autotune $(ARGS)

restamp: $(DEPS)  ## after a source edit: re-stamp stale configs, marking entries whose code changed (CPU); ARGS="--base REV"
	$(PY) -m helion_fusions.tools.restamp $(ARGS)

autotune-tp: $(DEPS)  ## tune the all_reduce_ ops on every GPU of this host -> configs/<device>/; ARGS=--help
	$(PY) -m helion_fusions.tools.autotune_tp $(ARGS)

sass: $(DEPS)  ## what a kernel compiles to, without a GPU; ARGS=--help
	$(PY) -m perf.sass $(ARGS)

clean:  ## remove .venv and build outputs
	rm -rf $(VENV) build *.egg-info
