# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs voco with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "voco needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -c constraints.txt -e '.[test]'
	@touch $@

# OPENBLAS_NUM_THREADS=1: numpy/scipy's OpenBLAS threads would otherwise compete with torch's for the cores.
# Two pytest workers, each test file on one of them (its module fixtures, e.g. one smoke run, made once).
test: venv
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

demo: venv
	$(BIN)/voco demo

clean:
	rm -rf $(VENV) runs demo_output .pytest_cache
