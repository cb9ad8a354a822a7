# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv on first use and installs voco with the pinned versions of constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# nnunetv2's requirements but timm (see the venv target)
NNUNET_DEPS := acvl-utils batchgenerators batchgeneratorsv2 blosc2 einops graphviz imagecodecs matplotlib nibabel numpy \
	pandas requests scikit-image scikit-learn scipy seaborn SimpleITK tifffile tqdm yacs

.PHONY: demo test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "voco needs Python 3.11 or newer; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq -c constraints.txt -e '.[test]'
	# nnU-Net (the ResEnc backbone, the export's tests) without timm: timm pulls torchvision, which has no CPU build,
	# and a CUDA torchvision beside the CPU torch breaks `import transformers`; only nnU-Net's Primus needs timm.
	$(BIN)/python -m pip install -qq -c constraints.txt --no-deps nnunetv2 dynamic-network-architectures
	$(BIN)/python -m pip install -qq -c constraints.txt $(NNUNET_DEPS)
	@touch $@

# OPENBLAS_NUM_THREADS=1: numpy/scipy's OpenBLAS threads would otherwise compete with torch's for the cores.
# Two pytest workers, each test file on one of them (its module fixtures, e.g. one smoke run, made once).
test: venv
	OPENBLAS_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

demo: venv
	$(BIN)/voco demo

clean:
	rm -rf $(VENV) runs demo_output .pytest_cache
