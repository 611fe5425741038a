"""pytest-benchmark: route_topk, grouped_mm, moe_mlp and the MoE layer, forward and forward+backward,
on every MoE case of bam_bench/cases.py at each of its token counts.

Providers (the test id ends with the provider; the group names op, mode and case):
  bam               the op on the device's default backend (triton on CUDA, torch on CPU)
  einsum            the plain formulation (baselines.py): every expert on every token, then the mask
  reference         bam_kernels.reference (loops over the experts), in the same dtype
  torch-grouped_mm  torch._grouped_mm: the op itself (grouped_mm) or the experts written on it
moe_layer (router + experts, bam_model.nn.MoE) is timed against bam-bench moe's peers, which are
layers: transformers' Mixtral block (hf-eager, hf-grouped_mm) and the torch-grouped_mm layer.
"""
from __future__ import annotations

import functools

import pytest
import torch

import bam_kernels as bk
from bam_bench import cases, moe
from bam_kernels import reference

from . import baselines
from .conftest import bench_device

PROVIDERS = {
    "route_topk": ("bam", "einsum"),  # the plain formulation is the reference itself
    "grouped_mm": ("bam", "einsum", "reference", "torch-grouped_mm"),
    "moe_mlp": ("bam", "einsum", "reference", "torch-grouped_mm"),
    "moe_layer": ("bam", "hf-eager", "hf-grouped_mm", "torch-grouped_mm"),
}


def pytest_generate_tests(metafunc):
    """Every (case, tokens, mode, provider) of the device's case list, case by case, so that the
    inputs built for one case serve all its rows. The case goes in by name (saved runs keep the
    parameters as JSON) and the ``case`` fixture looks it up."""
    op = metafunc.function.__name__[len("test_"):]
    kind = cases.device_kind(bench_device(metafunc.config))
    metafunc.parametrize("case,T,mode,provider", [
        pytest.param(c.name, T, mode, p, id=f"{c.id(T)}-{mode}-{p}")
        for c in cases.MOE[kind] for T in cases.MOE_TOKENS[kind] for mode in cases.MODES
        for p in PROVIDERS[op]], indirect=["case"])


@pytest.fixture
def case(request) -> cases.MoECase:
    kind = cases.device_kind(bench_device(request.config))
    return next(c for c in cases.MOE[kind] if c.name == request.param)


@functools.lru_cache(maxsize=1)
def _layer(case: cases.MoECase, device: str, dtype):
    """The case's MoE layer and its peers, built once for all the rows of the case."""
    return moe.layer_providers(moe.new_moe(case, device, dtype), device)


@functools.lru_cache(maxsize=1)
def _inputs(case: cases.MoECase, T: int, device: str, dtype):
    """Tokens, the layer's weights and its routing of them: what the ops take; and gradients of
    the outputs: dy [T, D], dw [T, K] (routing weights are float32), drows [T*K, 2F]."""
    layer = moe.new_moe(case, device, dtype)
    g = torch.Generator(device="cpu").manual_seed(T)
    x = torch.randn(T, case.D, generator=g).to(device=device, dtype=dtype)
    with torch.no_grad():
        logits = layer.gate(x)
        w, idx = bk.route_topk(logits, case.k, normalize=case.normalize)
    plan = bk.routing_plan(idx, case.E)
    gate_up, down = layer.experts.gate_up_proj.detach(), layer.experts.down_proj.detach()
    dy, dw = torch.randn(T, case.D, generator=g), torch.randn(T, case.k, generator=g)
    drows = torch.randn(T * case.k, 2 * case.F, generator=g)
    return {"x": x, "logits": logits, "w": w, "idx": idx, "gate_up": gate_up, "down": down,
            "rows": x[plan.sorted_tokens], "offs": plan.offsets, "dy": dy.to(device=device, dtype=dtype),
            "dw": dw.to(device), "drows": drows.to(device=device, dtype=dtype)}


def _step(fn, args: list, differentiable: list[bool], mode: str, dout):
    """``fn(*args)`` without autograd, or forward+backward from ``dout`` to the differentiable
    arguments (with autograd.grad: no .grad accumulation inside the timing)."""
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                fn(*args)

        return fwd
    args = [a.detach().clone().requires_grad_() if d else a for a, d in zip(args, differentiable)]
    leaves = [a for a, d in zip(args, differentiable) if d]

    def fwd_bwd():
        torch.autograd.grad(fn(*args), leaves, dout)

    return fwd_bwd


def _info(case: cases.MoECase, T: int, mode: str, provider: str, op: str, dtype) -> dict:
    return {"op": op, "case": case.label(T, mode), "mode": mode, "provider": provider,
            "dtype": str(dtype).replace("torch.", ""), "T": T, "D": case.D, "F": case.F, "E": case.E,
            "k": case.k, "normalize": case.normalize}


def _group(op: str, case: cases.MoECase, T: int, mode: str) -> str:
    return f"{op} {mode}: {case.label(T)}"


def test_route_topk(bench, device, dtype, case, T, mode, provider):
    fn = {"bam": bk.route_topk, "einsum": baselines.route_topk}[provider]
    i = _inputs(case, T, device, dtype)
    logits, k, normalize = i["logits"], case.k, case.normalize
    step = _step(lambda lg: fn(lg, k, normalize)[0], [logits], [True], mode, i["dw"])
    # Read logits, write weights (float32) and ids (int64); the backward reads them and dw again
    # and writes dlogits.
    logits_bytes = logits.numel() * logits.element_size()
    fwd_bytes = logits_bytes + T * case.k * (4 + 8)
    nbytes = fwd_bytes if mode == "fwd" else 2 * fwd_bytes + T * case.k * 4 + logits_bytes
    bench(step, group=_group("route_topk", case, T, mode), nbytes=nbytes,
          **_info(case, T, mode, provider, "route_topk", dtype))


def test_grouped_mm(bench, device, dtype, case, T, mode, provider):
    """The first GEMM of the experts: the routed rows, grouped by expert, times gate_up [E, 2F, D]."""
    fn = {"bam": bk.grouped_mm, "einsum": baselines.grouped_mm, "reference": reference.grouped_mm,
          "torch-grouped_mm": lambda x, w, offs: torch._grouped_mm(x, w.transpose(1, 2), offs)}[provider]
    i = _inputs(case, T, device, dtype)
    step = _step(fn, [i["rows"], i["gate_up"], i["offs"]], [True, True, False], mode, i["drows"])
    flops = 2 * T * case.k * case.D * 2 * case.F * (3 if mode == "fwd+bwd" else 1)
    bench(step, group=_group("grouped_mm", case, T, mode), flops=flops,
          **_info(case, T, mode, provider, "grouped_mm", dtype))


def test_moe_mlp(bench, device, dtype, case, T, mode, provider):
    fn = {"bam": bk.moe_mlp, "einsum": baselines.moe_mlp, "reference": reference.moe_mlp,
          "torch-grouped_mm": moe.grouped_mm_experts}[provider]
    i = _inputs(case, T, device, dtype)
    args = [i["x"], i["gate_up"], i["down"], i["w"], i["idx"]]
    step = _step(fn, args, [True, True, True, True, False], mode, i["dy"])
    flops = moe.flops(T, case.D, case.F, case.k) * (3 if mode == "fwd+bwd" else 1)
    bench(step, group=_group("moe_mlp", case, T, mode), flops=flops,
          **_info(case, T, mode, provider, "moe_mlp", dtype))


def test_moe_layer(bench, device, dtype, case, T, mode, provider):
    """Router + experts as a module, against the layers bam-bench times."""
    layer = _layer(case, device, dtype).get(provider)
    if layer is None:
        pytest.skip(f"{provider} is not available here (see bam-bench moe's output)")
    i = _inputs(case, T, device, dtype)
    step = moe.layer_step(layer, i["x"][None], i["dy"][None], mode)
    flops = moe.flops(T, case.D, case.F, case.k) * (3 if mode == "fwd+bwd" else 1)
    bench(step, group=_group("moe_layer", case, T, mode), flops=flops,
          **_info(case, T, mode, provider, "moe_layer", dtype))

