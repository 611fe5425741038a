"""Checks shared by the tests that run the Triton kernels in unusual conditions (NaN-fenced inputs,
GPU tile configs): the op on the triton backend against the float64 reference, forward and every
gradient."""
import torch

import bam_kernels as bk
from bam_kernels import reference

BF16 = torch.bfloat16
BF16_TOL = 1e-2  # the convention's bf16 tolerance (relative), for the kernels' bf16 tests


def bf16_leaves(*tensors):
    return [t.to(BF16).requires_grad_() for t in tensors]


def rel(out: torch.Tensor, ref: torch.Tensor, floor_rms: float = 0.0) -> float:
    """|out - ref| / |ref| in float64, after checking that ``out`` is finite. ``floor_rms`` keeps a
    reference near zero (dq with a single key) from blowing the ratio up: |ref| is taken as at least
    ``floor_rms`` per element, root-mean-square."""
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all(), ("a NaN or inf reached the output (a load outside a tensor, or an "
                                       "unwritten element)")
    floor = max(floor_rms * max(ref.numel(), 1) ** 0.5, 1e-30)
    return ((out - ref).norm() / ref.norm().clamp_min(floor)).item()


def routed_moe_matches_reference(leaves, values, k: int, dy_ours: torch.Tensor, dy: torch.Tensor, tol=1e-5):
    """route_topk + moe_mlp on the triton backend, forward and backward, on ``leaves`` (logits, x,
    gate_up_proj, down_proj: leaf tensors in any layout) against the reference on ``values`` (the
    same numbers). ``dy_ours`` is the output gradient given to ours (``dy`` in any layout)."""
    with bk.use_backend("triton"):
        w, idx = bk.route_topk(leaves[0], k)
        y = bk.moe_mlp(leaves[1], leaves[2], leaves[3], w, idx)
    y.backward(dy_ours)
    refs = [t.detach().double().requires_grad_() for t in values]
    rw, ridx = reference.route_topk(refs[0], k)
    assert torch.equal(idx, ridx)
    ry = reference.moe_mlp(refs[1], refs[2], refs[3], rw, ridx)
    ry.backward(dy.double())
    assert rel(y, ry) < tol
    for name, a, b in zip(("logits", "x", "gate_up_proj", "down_proj"), leaves, refs):
        assert rel(a.grad, b.grad) < tol, name


def grouped_mm_matches_reference(x, w, offs, dy_ours: torch.Tensor, dy: torch.Tensor, tol=1e-5, label=""):
    """grouped_mm on the triton backend, forward and backward, on the leaves ``x``, ``w`` (any
    layout) against the reference on the same numbers. Returns our output."""
    with bk.use_backend("triton"):
        y = bk.grouped_mm(x, w, offs)
    y.backward(dy_ours)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = reference.grouped_mm(x64, w64, offs)
    ref.backward(dy.double())
    assert rel(y, ref) < tol, label
    assert rel(x.grad, x64.grad) < tol and rel(w.grad, w64.grad) < tol, label
    return y


def moa_matches_reference(leaves, values, kv_lens, do_ours: torch.Tensor, do: torch.Tensor, tol=1e-5,
                          label="", kv_start=None):
    """moa_attention (causal) on the triton backend, forward and backward, on ``leaves`` (q, k, v,
    mix: leaf tensors in any layout) against the reference on ``values`` (the same numbers; NaN in
    them, as past a cache's valid keys or below kv_start, read as 0). Returns our output."""
    with bk.use_backend("triton"):
        o = bk.moa_attention(*leaves, causal=True, kv_lens=kv_lens, kv_start=kv_start)
    o.backward(do_ours)
    refs = [torch.nan_to_num(t.detach().double(), nan=0.0).requires_grad_() for t in values]
    ro = reference.moa_attention(*refs, True, None, kv_lens, kv_start)
    ro.backward(do.double())
    assert rel(o, ro) < tol, label
    for name, a, b in zip(("q", "k", "v", "mix"), leaves, refs):
        assert rel(a.grad, b.grad) < tol, f"{label} d{name}"
    return o
