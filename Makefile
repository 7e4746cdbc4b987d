# The two commands of the README. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: demo test lint bench study fuzz

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m expandfx demo

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check expandfx passes tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/param_counts.py
	$(PY) benchmarks/training_speed.py
	$(PY) benchmarks/complexity_s10.py
	$(PY) benchmarks/conformance.py

study: $(VENV)/.installed
	$(PY) benchmarks/accuracy_study.py

fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q tests/test_fuzz_networks.py \
		tests/test_roundtrip_property.py tests/test_collapsed.py
