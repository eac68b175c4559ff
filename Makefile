# `make test` and `make demo` do all set-up themselves: create .venv, install pinned requirements.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PYTEST_WORKERS ?= 2
DEMO_WORKDIR ?= /tmp/ghostnetv2_demo
# The newest JAX line needs Python >= 3.12: pyenv's, else python3.12 on PATH.
PYTHON_LATEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV_LATEST   ?= .venv-latest

.PHONY: test test-latest demo install install-dev bench clean notebook-weights

$(VENV)/.runtime: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	-$(PY) -c 'import sys; from ghostnetv2_jax.kernels.build import main; sys.exit(main())'  # optional
	-$(PY) -m ghostnetv2_jax.data.native  # optional: the input pipeline's native ops
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

test: $(VENV)/.dev
	$(PY) -m pytest -n $(PYTEST_WORKERS) tests

# The newest JAX / Flax / optax / orbax (requirements-latest.txt) on Python 3.12: every test that
# does not need torch (marked `torch`), then the non-editable install check on the same versions.
$(VENV_LATEST)/.installed: requirements-latest.txt pyproject.toml
	test -x $(VENV_LATEST)/bin/python || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(VENV_LATEST)/bin/python -m pip install -q -r requirements-latest.txt setuptools
	$(VENV_LATEST)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

test-latest: $(VENV_LATEST)/.installed
	$(VENV_LATEST)/bin/python -m pytest -n $(PYTEST_WORKERS) -m "not torch" tests
	PYTHON=$(PYTHON_LATEST) CHECK_INSTALL_CONSTRAINTS=$(CURDIR)/requirements-latest.txt bash .ci/check_install.sh

demo: $(VENV)/.runtime
	$(PY) -m ghostnetv2_jax train --config configs/demo.py --workdir $(DEMO_WORKDIR)

# notebooks/03's trained network: configs/spread_digits.py as committed (about 3 minutes on 2 cores), its
# last step as a Flax variables file (2.7 MB, committed).
NOTEBOOK_WEIGHTS_WORKDIR ?= /tmp/ghostnetv2_spread_digits
notebook-weights: $(VENV)/.runtime
	$(PY) -m ghostnetv2_jax train --config configs/spread_digits.py --workdir $(NOTEBOOK_WEIGHTS_WORKDIR)
	$(PY) -m ghostnetv2_jax convert --src $(NOTEBOOK_WEIGHTS_WORKDIR) --dst notebooks/weights/spread_digits_dfc.safetensors

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache build *.egg-info
