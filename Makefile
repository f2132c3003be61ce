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

# The multi-node cluster tests run in a pytest process of their own: Ray caches its auth token per
# process, so one process cannot talk to both that token-auth cluster and the suite's local Ray.
test: $(VENV)/.installed
	$(PY) -m pytest --ignore=tests/cluster
	$(PY) -m pytest tests/cluster
