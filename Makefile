# One-command set-up, tests, benchmarks and the main job. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CONSTRAINTS := constraints.txt

.PHONY: venv test bench train clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[dev,search,export]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) benchmarks/run_all.py

train: venv
	$(PY) -m resnetlab.cli.make_train

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
