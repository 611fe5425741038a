"""The einsum baselines of the pytest-benchmark suite (benchmarks/baselines.py) compute what
bam_kernels.reference defines: outputs and every gradient, float64, odd sizes."""
import pytest
import torch

from bam_kernels import reference
from benchmarks import baselines


def _leaves(*ts):
    return [t.double().requires_grad_() for t in ts]


def _same(out, ref, leaves, ref_leaves, dy):
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dy)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)


@pytest.mark.parametrize("T,E,k,normalize", [(33, 7, 1, False), (33, 7, 3, True), (5, 4, 4, True)])
def test_route_topk(T, E, k, normalize):
    logits = _leaves(torch.randn(T, E))
    ref_logits = _leaves(logits[0].detach())
    w, idx = baselines.route_topk(*logits, k, normalize)
    rw, ridx = reference.route_topk(*ref_logits, k, normalize)
    assert torch.equal(idx, ridx)
    # The baseline computes in float32, as users write it; the reference keeps float64.
    torch.testing.assert_close(w.double(), rw, rtol=1e-6, atol=1e-7)
    dw = torch.randn(T, k, dtype=torch.float64)
    (g,), (rg,) = torch.autograd.grad(w, logits, dw.float()), torch.autograd.grad(rw, ref_logits, dw)
    torch.testing.assert_close(g, rg, rtol=1e-5, atol=1e-6)


def test_grouped_mm_with_an_empty_expert_and_rows_past_the_last_offset():
    M, K, N = 37, 13, 9
    offs = torch.tensor([5, 5, 20, 30], dtype=torch.int32)  # expert 1 has no rows; rows 30..36 none
    x, w = _leaves(torch.randn(M, K), torch.randn(4, N, K))
    rx, rw = _leaves(x.detach(), w.detach())
    _same(baselines.grouped_mm(x, w, offs), reference.grouped_mm(rx, rw, offs), [x, w], [rx, rw],
          torch.randn(M, N, dtype=torch.float64))


@pytest.mark.parametrize("E,k", [(5, 1), (5, 2), (3, 3)])
def test_moe_mlp(E, k):
    T, D, Fh = 33, 7, 11
    w, idx = reference.route_topk(torch.randn(T, E), k)
    gate_up, down = torch.randn(E, 2 * Fh, D) / D ** 0.5, torch.randn(E, D, Fh) / Fh ** 0.5
    leaves = _leaves(torch.randn(T, D), gate_up, down, w)
    ref_leaves = _leaves(*[t.detach() for t in leaves])
    _same(baselines.moe_mlp(*leaves, idx), reference.moe_mlp(*ref_leaves, idx), leaves, ref_leaves,
          torch.randn(T, D, dtype=torch.float64))


@pytest.mark.parametrize("B,T,S,E,H,Hkv,expert_kv,causal", [
    (2, 7, 7, 3, 4, 2, False, True),   # GQA, shared KV, prefill
    (2, 5, 11, 3, 6, 3, True, True),   # expert KV, queries at the end of a longer cache
    (1, 1, 13, 2, 4, 1, False, False),  # decoding one token, multi-query
    (2, 4, 9, 2, 2, 2, True, False),
])
def test_moa_attention(B, T, S, E, H, Hkv, expert_kv, causal):
    Dh = 5
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    leaves = _leaves(torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape),
                     torch.softmax(torch.randn(B, T, E), -1))
    ref_leaves = _leaves(*[t.detach() for t in leaves])
    _same(baselines.moa_attention(*leaves, causal), reference.moa_attention(*ref_leaves, causal), leaves,
          ref_leaves, torch.randn(B, T, E, H, Dh, dtype=torch.float64))
