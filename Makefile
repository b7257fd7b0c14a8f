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

test: $(STAMP)
	bash tests/browser/setup.sh
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/local.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis tests/artifacts
