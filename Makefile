# make fit   : install (when needed), generate the embedded data, run the main VISOR job
# make test  : install (when needed), run the test suite
# The virtual environment is keyed by a hash of the dependency specification and of the lock
# (constraints.txt: the exact versions the README's figures were measured on), so a changed
# dependency or pin installs afresh. VENV_ROOT may point outside the clone (CI reuses one there).
SHELL := /bin/bash
PYTHON ?= python3
VENV_ROOT ?= .venv-cache
DEPS_HASH := $(shell { $(PYTHON) tools/requirements.py --dev; cat constraints.txt; } | sha256sum | cut -c1-16)
VENV := $(VENV_ROOT)/$(DEPS_HASH)
PY := $(VENV)/bin/python
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h') setup.py pyproject.toml
CONFIG ?= configs/visor.yaml

.PHONY: install fit test test-all build clean

$(VENV)/.installed: pyproject.toml tools/requirements.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) tools/requirements.py --dev > $(VENV)/requirements.txt
	$(PY) -m pip install -q setuptools wheel -r $(VENV)/requirements.txt -c constraints.txt
	touch $@

# Rebuilt whenever a C++/CUDA source changes, or the build kind does (FORCE_CUDA=1 adds the .cu sources).
BUILD_KIND := $(if $(filter 1,$(FORCE_CUDA)),cuda,cpu)
STAMP := src/_C.$(BUILD_KIND).stamp
$(STAMP): $(VENV)/.installed $(EXT_SOURCES)
	rm -f src/_C.*.stamp
	$(PY) setup.py -q build_ext --inplace
	$(PY) setup.py -q egg_info  # the project's metadata: lmms-eval finds the `visor` plugin's entry point
	touch $@

install: $(STAMP)

build: $(STAMP)

fit: install
	$(PY) -m src.cli fit --config $(CONFIG)

test: install
	$(PY) -m pytest -q --durations=15

test-all: install
	$(PY) -m pytest -q -m ''

clean:
	rm -rf build src/_C*.so src/_C.*.stamp
