# `make demo` and `make test` bootstrap everything they need and are idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
# cbn's C++ kernels are compiled once into the virtual environment (make clean removes them).
export TORCH_EXTENSIONS_DIR := $(CURDIR)/$(VENV)/torch_extensions

.PHONY: demo test venv data clean

$(STAMP): pyproject.toml constraints.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# setup.py compiles the C++ kernels against the environment's torch: install it first, then cbn
	# without build isolation (which would compile against a second copy of torch).
	$(PIP) install -q -c constraints.txt setuptools torch
	$(PIP) install -q --no-build-isolation -c constraints.txt -e '.[experiments,test]'
	$(PY) -m cbn build-kernels || echo 'cbn: continuing with the Python implementation'
	touch $(STAMP)

venv: $(STAMP)

data:
	@test -f $(FASHION_MNIST) || { \
	  echo "Installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

test: venv data
	OMP_NUM_THREADS=1 $(PY) -m pytest tests

demo: venv data
	$(PY) -m cbn demo

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info src/cbn/_kernels*.so src/cbn/_kernels.sha256
