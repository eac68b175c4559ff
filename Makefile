# `make test` and `make demo` do all set-up themselves: create .venv, install pinned requirements.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
DEMO_WORKDIR ?= /tmp/ghostnetv2_demo

.PHONY: test demo install install-dev bench clean

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	-$(PY) -c 'import sys; from ghostnetv2_jax.kernels.build import main; sys.exit(main())'  # optional
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

test: $(VENV)/.dev
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

demo: $(VENV)/.runtime
	$(PY) -m ghostnetv2_jax train --config configs/demo.py --workdir $(DEMO_WORKDIR)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
