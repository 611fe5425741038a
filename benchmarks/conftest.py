"""The pytest-benchmark suite: each public op against its einsum baseline, its reference definition
and bam-bench's peers, on the cases of bam_bench/cases.py (docs/benchmarks.md).

    pytest benchmarks --benchmark-only                   # on CUDA when present, else the CPU
    pytest benchmarks --benchmark-only --bench-device cpu

Only a run that names this folder loads this file: ``pytest`` alone collects tests/ (setup.cfg).
"""
from __future__ import annotations

import time

import pytest
import torch

from bam_bench.cases import device_kind
from bam_bench.runner import device_name, environment

# do_bench's method on CUDA: every timed call starts with a cold L2 (50 MB on an H100/H200) ...
L2_FLUSH_BYTES = 256 << 20
# ... and after a warm-up of about this long.
CUDA_WARMUP_S = 0.025
MAX_ROUNDS = 1000


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None, choices=("cpu", "cuda"),
                     help="device to time on, and whose case list to collect (default: cuda when available)")


def bench_device(config) -> str:
    return config.getoption("bench_device") or ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.hookimpl(tryfirst=True)  # before pytest-benchmark reads its options (its hook runs last)
def pytest_configure(config):
    # setup.cfg's addopts disable pytest-benchmark for the test suite; naming this folder asks for
    # the benchmarks. --benchmark-disable typed on the command line still calls each one once.
    if "--benchmark-disable" not in config.invocation_params.args:
        config.option.benchmark_enable = True
    torch.backends.cuda.matmul.allow_tf32 = False  # as bam-bench: fp32 means fp32


def pytest_benchmark_update_machine_info(config, machine_info):
    """The device timed and the versions of torch, triton and bam go into every saved run."""
    machine_info["bam_bench"] = environment(bench_device(config))


@pytest.fixture(scope="session")
def device(pytestconfig) -> str:
    return bench_device(pytestconfig)


@pytest.fixture(scope="session")
def dtype(device):
    return torch.bfloat16 if device_kind(device) == "cuda" else torch.float32


@pytest.fixture
def bench(benchmark, device, pytestconfig):
    """``bench(fn, group=..., flops=... or nbytes=..., **info)`` times ``fn()`` under pytest-benchmark.

    On the CPU with its calibrated rounds (a block of calls per round when one call is short, as
    Timer's blocked_autorange does). On CUDA every round is synchronised and starts from a flushed
    L2, after a warm-up (compiles, autotuning): triton's do_bench method. ``extra_info`` gets
    ``info``, the device, the op's FLOPs or bytes, and TFLOP/s or GB/s at the median. On CUDA a
    provider that runs out of memory is skipped.
    """
    def run(fn, *, group: str, flops: float | None = None, nbytes: float | None = None, **info):
        benchmark.group = group
        benchmark.extra_info.update(info, device=device, device_name=device_name(device))
        if flops is not None:
            benchmark.extra_info["flops"] = flops
        if nbytes is not None:
            benchmark.extra_info["bytes"] = nbytes
        if device_kind(device) == "cuda":
            try:
                _cuda_rounds(benchmark, fn, pytestconfig)
            except torch.OutOfMemoryError as err:  # an einsum baseline at the largest sizes
                torch.cuda.empty_cache()
                pytest.skip(f"out of memory: {str(err).splitlines()[0][:160]}")
        else:
            benchmark(fn)  # its calibration call is the warm-up
        if benchmark.stats is not None:  # None under --benchmark-disable
            median_s = benchmark.stats.stats.median
            if flops is not None:
                benchmark.extra_info["tflops"] = flops / median_s / 1e12
            if nbytes is not None:
                benchmark.extra_info["gbps"] = nbytes / median_s / 1e9

    return run


def _cuda_rounds(benchmark, fn, config) -> None:
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def cold_l2():
        flush.zero_()
        torch.cuda.synchronize()

    def call():
        fn()
        torch.cuda.synchronize()

    call()  # compiles and autotuning: outside the timing
    cold_l2()
    start = time.perf_counter()
    call()
    per_call_s = max(time.perf_counter() - start, 1e-6)
    rounds = int(max(config.getoption("benchmark_min_rounds"),
                     min(MAX_ROUNDS, float(config.getoption("benchmark_max_time")) / per_call_s)))
    benchmark.pedantic(call, setup=cold_l2, rounds=rounds, iterations=1,
                       warmup_rounds=min(rounds, max(1, int(CUDA_WARMUP_S / per_call_s))))
