# The two set-up commands: `make demo` and `make test`. Each creates .venv when it is
# missing and installs what it needs; TORCH_SPEC picks the PyTorch build
# (default: the CPU build; e.g. `make test TORCH_SPEC=torch==2.14.1` for CUDA).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vaeguard-installed
PLUGINS := $(wildcard plugins/*/pyproject.toml)

.PHONY: demo test test-all lint format bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(PLUGINS) | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[all]" $(foreach p,$(PLUGINS),-e $(dir $(p)))
	@echo "$(TORCH_SPEC)" > $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vaeguard demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" --doctest-modules vaeguard tests plugins

test-all: $(STAMP)
	$(PY) -m pytest -q --doctest-modules vaeguard tests plugins

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) benchmarks/adbench.py --jobs 2
	$(PY) benchmarks/timeseries.py
	$(PY) benchmarks/images.py

clean-venv:
	rm -rf $(VENV)
