# `make demo` and `make test` work on a fresh machine: they build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: venv demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/meshscale demo --overwrite  # a previous runs/demo is moved to runs/demo.old-N

lint: venv
	$(VENV)/bin/ruff check meshscale models tests benchmarks examples

test: venv lint
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

bench: venv
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) runs .pytest_cache
