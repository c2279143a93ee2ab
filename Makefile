# `make run` compares a JSAE with a traditional SAE pair on the bundled real data; `make test` runs the tests.
# Both create the virtual environment on first use.  torch is installed first and pinned to 2.13.0,
# so that no later requirement pulls another build.  Which build pip gets is the configured index's:
# stock PyPI serves the multi-GB CUDA wheel on Linux; for the CPU build there, create the environment
# with `make run TORCH_INDEX=https://download.pytorch.org/whl/cpu` (not the default: CI reaches only PyPI).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_INDEX ?=

.PHONY: run test evaluate bench docs clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0$(if $(TORCH_INDEX), --index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test,hf,plot,distributed,corpora]"
	touch $@

$(VENV)/.models: $(VENV)/.installed scripts/install_test_models.sh
	PYTHON=$(PY) bash scripts/install_test_models.sh
	touch $@

run: $(VENV)/.installed
	$(PY) -m sklearn_jsae

evaluate: $(VENV)/.installed
	$(PY) -m sklearn_jsae evaluate

test: $(VENV)/.installed $(VENV)/.models
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py

$(VENV)/.docs: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q -e ".[docs]"
	touch $@

# The site in docs/_build/html, warnings as errors.  sphinx-gallery runs every examples/plot_*.py
# (the SmolLM2 example needs the test models); an unchanged example is not run again.
docs: $(VENV)/.docs $(VENV)/.models
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf $(VENV) docs/_build docs/generated docs/auto_examples docs/sg_execution_times.rst
