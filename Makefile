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

.PHONY: install demo test test-fast
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/vaepipe demo

# Two pytest workers. Each runs whole test files (--dist loadfile; tests/conftest.py puts files that
# share a session fixture in one group and hands out the longest files first), so a module's trained
# runs and servers are made once. Most of a test's time is process start-up and waiting on Ray and
# MLflow, which two workers overlap. The multi-node cluster tests run beside them, in a pytest process
# of their own: Ray caches its auth token per process, so one process cannot talk to both that
# token-auth cluster and the suite's local Ray. Run alone they leave 30-50 % of the 2 cores idle
# (waiting on nodes to start, die and come back), which the other part fills. Their output is printed
# when both are done; either part failing fails the target. PYTEST_WORKERS=0 runs the first part in
# one process.
PYTEST_WORKERS ?= 2
CLUSTER_LOG := .cluster-tests.log
test: $(VENV)/.installed
	@$(PY) -m pytest -p no:cacheprovider tests/cluster > $(CLUSTER_LOG) 2>&1 & cluster=$$!; \
	trap 'kill $$cluster 2>/dev/null' INT TERM; \
	echo "tests/cluster: running beside the rest (pid $$cluster, output in $(CLUSTER_LOG), printed at the end)"; \
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --ignore=tests/cluster; main=$$?; \
	wait $$cluster; clust=$$?; \
	echo "---- tests/cluster (ran beside the above) ----"; cat $(CLUSTER_LOG); \
	test $$main -eq 0 && test $$clust -eq 0

# The inner loop: unit tests only, no cluster, server or trained run (tests/conftest.py marks those
# `stack` from their fixtures; end-to-end runs are marked `slow`). Not a substitute for `make test`.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not stack and not slow" --ignore=tests/cluster
