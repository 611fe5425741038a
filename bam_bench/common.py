"""Timing and result helpers shared by the benchmark suites.

A suite is a module ``bam_bench.<name>`` with two generators:
``check(device)`` yields result lines of correctness checks on that device (a failed one starts
with ``FAIL``; one failed case does not stop the others) and ``run(device, quick)`` yields one row
per timed case and provider: ``case``, ``provider`` and either ``ms`` (with ``p20_ms``,
``p80_ms`` and, where it applies, ``tflops``, ``gbps`` or ``tokens_per_s``) or ``error``.
The runner saves after every line and row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import statistics

import torch
from torch.utils.benchmark import Timer


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def quantiles(times_ms: list[float]) -> dict:
    """A row's timing from its rounds: the median (``ms``) and the 20th and 80th percentiles."""
    times = sorted(times_ms)
    n = len(times)
    return {"ms": statistics.median(times), "p20_ms": times[round(0.2 * (n - 1))],
            "p80_ms": times[round(0.8 * (n - 1))]}


def _error(err: Exception, device: str) -> dict:
    if device.startswith("cuda"):
        try:  # free what a failed (out-of-memory) call left; a broken context raises again here
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except RuntimeError:
            pass
    first = (str(err).strip().splitlines() or [""])[0][:200]
    return {"error": f"{type(err).__name__}: {first}"}


def time_group(steps: dict, device: str, quick: bool = False) -> dict:
    """Time the providers of one case side by side: ``{name: {"ms", "p20_ms", "p80_ms"}}``, or
    ``{name: {"error": ...}}`` for one that raises (a peer without this dtype or size, an
    out-of-memory, a kernel that fails to build), so that one failure ends one row, not the run.

    On CUDA each runs under triton's ``do_bench``. On the CPU every provider is warmed up first,
    then they are timed in interleaved rounds (torch's Timer, a block of calls per provider per
    round): the first provider timed in a fresh process was measured up to 20% slower than the
    same code timed second (the C allocator's heap still growing), and load from other work on a
    shared machine drifts; interleaving puts both on every provider alike.
    """
    out, live = {}, {}
    for name, fn in steps.items():
        try:
            fn()  # warm-up: compiles, autotuning, first allocations
            live[name] = fn
        except Exception as err:  # recorded in the results
            out[name] = _error(err, device)
    if device.startswith("cuda"):
        import triton.testing  # noqa: PLC0415 (triton: CUDA runs only)
        for name, fn in live.items():
            try:
                q = triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                            quantiles=[0.5, 0.2, 0.8])
                out[name] = {"ms": q[0], "p20_ms": q[1], "p80_ms": q[2]}
            except Exception as err:
                out[name] = _error(err, device)
        return {name: out[name] for name in steps}
    budget_s = 0.3 if quick else 1.0  # per provider
    timers, per_call = {}, {}
    for name, fn in live.items():
        # Timer runs on one thread unless told otherwise; time on all the threads torch would use.
        timers[name] = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        per_call[name] = max(timers[name].timeit(1).mean, 1e-6)
    rounds = max(3, min(10, int(budget_s / max(per_call.values(), default=budget_s))))
    times = {name: [] for name in live}
    for _ in range(rounds):
        for name, timer in timers.items():
            n = max(1, int(budget_s / rounds / per_call[name]))
            times[name].append(timer.timeit(n).mean * 1e3)
    out.update({name: quantiles(t) for name, t in times.items()})
    return {name: out[name] for name in steps}


def attempt(fn, device: str, quick: bool = False) -> dict:
    """One provider alone: its timing, or ``{"error": ...}`` when ``fn`` raises."""
    return time_group({"fn": fn}, device, quick)["fn"]


def rate(t: dict, name: str, amount: float) -> dict:
    """``{name: amount / seconds}`` for a timed row (amount per ms scaled by ``1e3``); nothing for a
    failed one."""
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


def agreement(ours, peer, peer_name: str, tol: float) -> str:
    """``ours`` and ``peer`` each give [output, *gradients] for the same inputs; run once after the
    timing (on a GPU: with the configs the autotuner chose there, which the checks before the
    timings did not run), the largest relative error between them, starting with FAIL over ``tol``."""
    err = max(rel_err(a, b) for a, b in zip(ours(), peer()))
    return f"{'FAIL ' if not err <= tol else ''}{err:.1e} vs {peer_name}"


def guarded(label: str, device: str, fn, *args, **kwargs) -> list[str]:
    """Run one check case; an exception (a kernel that fails to build, an out-of-memory) becomes one
    FAIL line, so that the cases after it still run."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # reported as a failed check
        return [f"FAIL {label}: {_error(err, device)['error']}"]
