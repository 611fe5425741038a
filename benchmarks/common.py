"""Timing and result helpers shared by the benchmark suites.

A suite is a module ``benchmarks.<name>`` with two generators:
``check(device)`` yields result lines of correctness checks on that device (a failed one starts
with ``FAIL``; one failed case does not stop the others) and ``run(device, quick)`` yields one row
per timed case and provider: ``case``, ``provider`` and either ``ms`` (with ``p20_ms``,
``p80_ms`` and, where it applies, ``tflops``, ``gbps`` or ``tokens_per_s``) or ``error``.
The runner saves after every line and row, so a run cut short keeps what it measured.
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
    return {"ms": statistics.median(times), "p20_ms": times[round(0.2 * (n - 1))],
            "p80_ms": times[round(0.8 * (n - 1))]}


def attempt(fn, device: str, quick: bool = False) -> dict:
    """``time_ms(fn)``, or ``{"error": ...}`` when ``fn`` raises: a peer without this dtype or size,
    an out-of-memory or a kernel that fails to build ends one row, not the whole run."""
    try:
        return time_ms(fn, device, quick)
    except Exception as err:  # noqa: BLE001 - recorded in the results, and printed
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        first = (str(err).strip().splitlines() or [""])[0][:200]
        return {"error": f"{type(err).__name__}: {first}"}


def rate(t: dict, name: str, amount: float) -> dict:
    """``{name: amount / seconds}`` for a timed row (amount per ms scaled by ``1e3``); nothing for a failed one."""
    return {name: amount / t["ms"] * 1e3} if "ms" in t else {}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> str:
    """One result line; it starts with ``FAIL`` when the relative error is over ``tol`` (or not finite)."""
    err = rel_err(out, ref)
    if not err <= tol:
        return f"FAIL {name}: relative error {err:.3e} > {tol:.1e}"
    return f"{name}: rel err {err:.2e} (tol {tol:.0e})"


def guarded(label: str, device: str, fn, *args, **kwargs) -> list[str]:
    """Run one check case; an exception (a kernel that fails to build, an out-of-memory) becomes one
    FAIL line, so that the cases after it still run."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - reported as a failed check
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        first = (str(err).strip().splitlines() or [""])[0][:300]
        return [f"FAIL {label}: {type(err).__name__}: {first}"]
