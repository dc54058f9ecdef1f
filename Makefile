# Two commands on a fresh machine: `make demo` (set up, run the quickstart) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TRITON_VENV ?= .venv-triton

.PHONY: setup demo test clean

# torch first and pinned: an unpinned torch (or one pulled in by a dependency) brings GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,serve]"
	touch $@

# The Triton server (inside nvidia-pytriton) pins numpy 1.x, so it lives in its own environment.
$(TRITON_VENV)/.installed: triton-env.txt
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet -r triton-env.txt
	touch $@

setup: $(VENV)/.installed $(TRITON_VENV)/.installed

demo: setup
	$(BIN)/deploykit optimize -c pipelines/quickstart.yaml

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
