"""bam-bench: bam's ops and models checked on a device, then timed against their references and
peers. ``bam-bench`` (or ``python -m bam_bench``) runs ``runner.main``; a suite is a module here
(``moe``, ``moa``, ``model``) whose cases come from ``cases`` (docs/benchmarks.md)."""
