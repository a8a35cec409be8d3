# The README's two commands: `make serve` and `make test` (which lints first, so CI does too).
# `make serve` installs what serving needs; `make test` (and lint, bench) add the test extra.
# The Dockerfile runs the serving install commands (tests/test_deploy.py keeps the two in step).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is a CPU wheel on local disk here; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/default.yaml

.PHONY: install install-test serve lint test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --no-cache-dir "$(TORCH_SPEC)"
	$(PY) -m pip install --no-cache-dir -e .
	touch $@

# The test extra (pytest, linters, selenium, benchmark plotting) on top of the serving install.
install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --no-cache-dir -e ".[test]"
	touch $@

serve: install
	$(VENV)/bin/dgserve --config $(CONFIG)

# ruff and mypy read their settings from pyproject.toml; mypy checks server/, sampler/ and bench/.
lint: install-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install-test lint
	$(PY) -m pytest -q

bench: install-test
	$(VENV)/bin/dgserve bench --config $(CONFIG) --prompts bench/prompts.jsonl --max-tokens 128 --json bench/results.json --plot bench/results.png

clean:
	rm -rf $(VENV)
