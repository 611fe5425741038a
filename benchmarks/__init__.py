"""The pytest-benchmark suite (``pytest benchmarks --benchmark-only``): each op against its einsum
baseline (``baselines.py``), its reference and bam-bench's peers, on the cases of
``bam_bench/cases.py``; ``results/`` holds the current results of each machine. In the checkout
only: the installed benchmark runner is ``bam_bench`` (docs/benchmarks.md)."""
