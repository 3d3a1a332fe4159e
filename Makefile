# Entry points (README): `make reproduce` and `make test`, each from a fresh machine with only
# Python 3.11 + pip. Both create .venv, install the pinned requirements (torch 2.13.0 CPU; nothing
# may pull CUDA or torchvision) and the package, then run the chain or the tests.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
RUN    ?= runs/tiny

.PHONY: setup setup-dev reproduce test test-fast lab clean-runs help

help:
	@echo "make reproduce   set up .venv and run the whole chain on $(CONFIG) into $(RUN)/"
	@echo "make test        set up .venv (with test tools) and run every test"
	@echo "make test-fast   unit tests only"
	@echo "make lab         open JupyterLab on notebooks/"

$(VENV)/.runtime-installed: requirements.txt pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade-strategy only-if-needed -r requirements.txt
	$(PY) -m pip install --no-deps -e .
	$(PY) -m sparsemm_utils.envcheck
	touch $@

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m sparsemm_utils.envcheck
	touch $@

setup: $(VENV)/.runtime-installed
setup-dev: $(VENV)/.dev-installed

reproduce: setup
	$(PY) -m sparsemm_utils.pipeline --config $(CONFIG) --run-dir $(RUN)

test: setup-dev
	$(PY) -m pytest -q

test-fast: setup-dev
	$(PY) -m pytest -q tests/unit

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
