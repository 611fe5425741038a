"""pytest-benchmark: moa_attention, prefill (causal, forward and forward+backward) and decode (one
query over a KV cache), on every MoA case of bam_bench/cases.py.

Providers (the test id ends with the provider; the group names op, mode and case):
  bam        bk.moa_attention on the device's default backend
  einsum     the plain formulation (baselines.py): einsum scores, mask, softmax, einsum values, mix
  reference  bam_kernels.reference.moa_attention, in the same dtype
  sdpa+mix   PyTorch's SDPA on the stacked E*H query heads, then the mix (bam-bench's peer)
  flash+mix  flash-attention on the stacked heads, then the mix (CUDA, where flash_attn imports)
"""
from __future__ import annotations

import pytest
import torch

from bam_bench import cases, moa

from . import baselines
from .conftest import bench_device

PROVIDERS = {"cpu": ("bam", "einsum", "reference", "sdpa+mix"),
             "cuda": ("bam", "einsum", "reference", "sdpa+mix", "flash+mix")}


def pytest_generate_tests(metafunc):
    """The case goes in by name (saved runs keep the parameters as JSON); the ``case`` fixture
    looks it up."""
    kind = cases.device_kind(bench_device(metafunc.config))
    decode = metafunc.function.__name__ == "test_moa_decode"
    listed = cases.MOA_DECODE[kind] if decode else cases.MOA_TRAIN[kind]
    modes = ("fwd",) if decode else cases.MODES
    metafunc.parametrize("case,mode,provider", [
        pytest.param(c.name, mode, p, id=f"{c.id}-{p}" if decode else f"{c.id}-{mode}-{p}")
        for c in listed for mode in modes for p in PROVIDERS[kind]], indirect=["case"])


@pytest.fixture
def case(request) -> cases.MoACase:
    kind = cases.device_kind(bench_device(request.config))
    return next(c for c in cases.MOA_TRAIN[kind] + cases.MOA_DECODE[kind] if c.name == request.param)


def _fn(provider: str, device: str):
    if provider == "einsum":
        return baselines.moa_attention
    fn = moa.providers(device).get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not available here")
    return fn


def _info(case: cases.MoACase, mode: str, provider: str, op: str, dtype) -> dict:
    return {"op": op, "case": case.label(mode), "mode": mode, "provider": provider,
            "dtype": str(dtype).replace("torch.", ""), "B": case.B, "T": case.T, "S": case.S, "E": case.E,
            "H": case.H, "Hkv": case.Hkv, "Dh": case.Dh, "kv": "expert" if case.expert_kv else "shared"}


def test_moa_prefill(bench, device, dtype, case, mode, provider):
    fn = _fn(provider, device)
    q, k, v, mix = moa.case_inputs(case, dtype, device, grad=mode == "fwd+bwd")
    g = torch.Generator(device="cpu").manual_seed(1)
    do = torch.randn(q.shape, generator=g).to(device=device, dtype=dtype)
    step = moa.attention_step(fn, q, k, v, mix, do, mode)
    bench(step, group=f"moa_attention prefill {mode}: {case.label()}", flops=moa.train_flops(case, mode),
          **_info(case, mode, provider, "moa_attention prefill", dtype))


def test_moa_decode(bench, device, dtype, case, mode, provider):
    fn = _fn(provider, device)
    q, k, v, mix = moa.case_inputs(case, dtype, device)
    bench(moa.decode_step(fn, q, k, v, mix), group=f"moa_attention decode: {case.label()}",
          nbytes=moa.kv_bytes(k), **_info(case, mode, provider, "moa_attention decode", dtype))
