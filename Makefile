# Set-up is part of every target: a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint image clean

demo: $(STAMP)
	$(VENV)/bin/chorus demo

test: lint $(STAMP) image
	$(VENV)/bin/python -m pytest

# The Docker engine, a base image and the Chorus image, for the compose tests (docker/prepare.sh).
image:
	bash docker/prepare.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy orchestrator combiner
	$(VENV)/bin/lint-imports

# torch==2.13.0 is the CPU build on this machine's disk; a bare "torch" would pull CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip uninstall --quiet --yes chorus 2>/dev/null || true  # its name before chorus-ensembles
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .chorus orchestrator/examples/digits/models
