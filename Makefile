# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv (once) and install the project with exact pins from constraints.txt; re-running
# them reinstalls only when pyproject.toml or constraints.txt changed.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m modal_magic.demo
	$(PY) -m tests.notebook_runner notebooks/quickstart.ipynb

test: $(STAMP)
	bash tests/browser/setup.sh
	$(PY) -m pytest $(PYTEST_ARGS)

# The benchmark compares with pandarallel and mapply, which need pandas 2.3 (not 3.x): it has a
# venv of its own, pinned in bench/requirements-peers.txt.
BENCH_VENV ?= .venv-bench
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS ?=

$(BENCH_STAMP): bench/requirements-peers.txt pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install --quiet --upgrade pip
	$(BENCH_PY) -m pip install --quiet --no-deps -r bench/requirements-peers.txt
	$(BENCH_PY) -m pip install --quiet --no-deps -e .
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) $(STAMP)
	$(BENCH_PY) bench/local.py $(BENCH_ARGS)
	$(PY) bench/modal.py
	$(PY) bench/llm.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache .hypothesis tests/artifacts
