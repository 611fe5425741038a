"""Timing and result helpers shared by the benchmark suites.

A suite is a module ``benchmarks.<name>`` with two functions:
``check(device) -> list[str]`` (correctness on that device, one line per check; raises on failure)
and ``run(device, quick) -> list[dict]`` (one row per timed case and provider; each row has at
least ``suite``, ``case``, ``provider``, ``ms`` and, where it applies, ``tflops`` or ``gbps``).
"""
from __future__ import annotations

import statistics

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn, device: str, quick: bool = False) -> dict:
    """Median, p20 and p80 of ``fn()`` in milliseconds on ``device``."""
    if device.startswith("cuda"):
        import triton.testing
        q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                    quantiles=[0.5, 0.2, 0.8])
        return {"ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
    from torch.utils.benchmark import Timer
    fn()  # warm-up
    # Timer runs on one thread unless told otherwise; time on all the threads torch would use.
    m = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=0.3 if quick else 1.0)
    times = sorted(t * 1e3 for t in m.times)  # per call (raw_times are whole blocks of calls)
    n = len(times)
    return {"ms": statistics.median(times), "p20_ms": times[int(0.2 * (n - 1))], "p80_ms": times[int(0.8 * (n - 1))]}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> str:
    err = rel_err(out, ref)
    if not err <= tol:
        raise AssertionError(f"{name}: relative error {err:.3e} > {tol:.1e}")
    return f"{name}: rel err {err:.2e} (tol {tol:.0e})"
