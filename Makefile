# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv, install torch 2.13.0 (the CPU wheel this machine has on disk; GPU hosts install
# the CUDA build first) and then vaepipe with its dev extras.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(WHEELS) torch==2.13.0
	$(PY) -m pip install -q $(WHEELS) -c constraints.txt -e '.[dev]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vaepipe demo

# Two pytest workers. Each runs whole test files (--dist loadfile; tests/conftest.py puts files that
# share a session fixture in one group), so a module's trained runs and servers are made
# once. Most of a test's time is process start-up and waiting on Ray and MLflow, which two workers
# overlap. The multi-node cluster tests run in a pytest process of their own: Ray caches its auth
# token per process, so one process cannot talk to both that token-auth cluster and the suite's local
# Ray. PYTEST_WORKERS=0 runs the first part in one process.
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --ignore=tests/cluster
	$(PY) -m pytest tests/cluster
