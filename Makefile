# `make test` and `make bench` work as the first command on a fresh machine: they create
# and fill .venv when it is missing. On a machine whose Python already has torch, helion
# and the project on its path, skip the venv with `make bench PY=python3 DEPS=`.
VENV ?= .venv
PY ?= $(VENV)/bin/python
DEPS ?= $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
ARGS ?=

.PHONY: install test bench autotune sass clean

install: $(DEPS)

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(VENV)/bin/python -m pip install -q -e ".[test]"
	touch $@

test: $(DEPS)
	$(PY) -m pytest -q tests $(ARGS)

bench: $(DEPS)
	$(PY) -m perf.bench $(ARGS)

autotune: $(DEPS)
	$(PY) -m helion_fusions.tools.autotune $(ARGS)

sass: $(DEPS)
	$(PY) -m perf.sass $(ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
