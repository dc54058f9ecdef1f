# Two commands on a fresh machine: `make demo` (set up, run the quickstart) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
TRITON_VENV ?= .venv-triton
PERF_VENV ?= .venv-perf

.PHONY: setup prometheus demo test clean

# torch first and pinned: an unpinned torch (or one pulled in by a dependency) brings GBs of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,serve,openvino]"
	touch $@

# The Triton server (inside nvidia-pytriton) pins numpy 1.x, so it lives in its own environment.
$(TRITON_VENV)/.installed: triton-env.txt
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install --quiet -r triton-env.txt
	touch $@

# perf_analyzer is the binary inside tritonclient 2.51.0, which pins numpy<2: it gets an environment of its own.
# It loads libb64.so.0d, which nvidia-pytriton bundles under a hashed name: copied here under the name it asks for.
$(PERF_VENV)/.installed: perf-env.txt $(TRITON_VENV)/.installed
	$(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(PERF_VENV)/bin/python -m pip install --quiet -r perf-env.txt
	mkdir -p $(PERF_VENV)/deploykit-libs
	cp $(TRITON_VENV)/lib/python3*/site-packages/nvidia_pytriton.libs/libb64-*.so.0d $(PERF_VENV)/deploykit-libs/libb64.so.0d
	touch $@

# Prometheus and promtool for the alerting tests (tests/test_alerting.py): Debian's package, when we are root with
# apt-get; otherwise one line says those tests skip. Never fails setup. The package may start its service: a
# prometheus left listening on its default port 9090 is stopped, since tests bind their own ports.
prometheus:
	@if command -v promtool >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    prometheus; } >/dev/null 2>&1 || echo "prometheus: apt-get install failed; the alerting tests will be skipped"; \
	  pids=$$(ss -ltnpH 'sport = :9090' 2>/dev/null | grep -o '"prometheus",pid=[0-9]*' | cut -d= -f2); \
	  [ -z "$$pids" ] || kill $$pids; \
	else echo "prometheus: promtool not found and cannot apt-get install it (needs root); the alerting tests will be skipped"; fi

setup: $(VENV)/.installed $(TRITON_VENV)/.installed $(PERF_VENV)/.installed prometheus

demo: setup
	$(BIN)/deploykit optimize -c pipelines/quickstart.yaml

# Three pytest processes side by side: tests/parallel.sh says which and why.
test: setup
	@bash tests/parallel.sh $(BIN)/python

clean:
	rm -rf runs .pytest_cache
