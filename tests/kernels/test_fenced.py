"""Every Triton kernel on inputs fenced by NaN: each input is a strided view into a larger buffer
that holds NaN before its first row, after its last and past the end of every row (a KV cache
view is exactly this: valid keys, then whatever the buffer holds). Under the interpreter an
unmasked load outside the tensor then reads NaN, which reaches the outputs and fails the
comparison, where it would read stray memory (or fault) on a GPU."""
import math

import pytest
import torch

from bam_kernels._triton import attention as attention_kernels
from tests.support.oracle import grouped_mm_matches_reference, moa_matches_reference, routed_moe_matches_reference

NAN = float("nan")


def fenced(t: torch.Tensor, rows_pad: int = 3, cols_pad: int = 5) -> torch.Tensor:
    """A copy of ``t`` inside a NaN buffer, padded along the first and the last dimension."""
    buf = torch.full((t.shape[0] + 2 * rows_pad, *t.shape[1:-1], t.shape[-1] + cols_pad), NAN, dtype=t.dtype)
    view = buf[rows_pad:rows_pad + t.shape[0], ..., :t.shape[-1]]
    view.copy_(t)
    assert view.stride(-1) == 1
    return view


def grad_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def test_grouped_mm_fenced():
    M, K, N, E = 45, 19, 37, 4
    offs = torch.tensor([10, 10, 31, 40], dtype=torch.int32)  # an empty expert, 5 rows past the end
    x, w = torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K)
    dy = torch.randn(M, N)
    grouped_mm_matches_reference(grad_leaf(fenced(x)), grad_leaf(fenced(w)), offs, fenced(dy), dy)


@pytest.mark.parametrize("T,E,k", [(1, 4, 2), (37, 5, 2), (70, 3, 1)])
def test_route_topk_and_moe_mlp_fenced(T, E, k):
    D, Fh = 21, 27
    logits = torch.randn(T, E)
    x = torch.randn(T, D)
    gate_up, down = torch.randn(E, 2 * Fh, D) / math.sqrt(D), torch.randn(E, D, Fh) / math.sqrt(Fh)
    dy = torch.randn(T, D)
    leaves = [grad_leaf(fenced(t)) for t in (logits, x, gate_up, down)]
    routed_moe_matches_reference(leaves, (logits, x, gate_up, down), k, fenced(dy), dy)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,splits", [
    (33, 33, None, 1),            # prefill, causal
    (5, 70, [70, 23], 1),         # a few queries against a ragged cache
    (1, 600, [600, 257], 3),      # decoding, split-KV path
])
def test_moa_attention_fenced(expert_kv, T, S, kv_lens, splits, monkeypatch):
    monkeypatch.setattr(attention_kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
    mix = torch.softmax(torch.randn(B, T, E), -1)
    do = torch.randn(B, T, E, H, Dh)
    lens = None if kv_lens is None else torch.tensor(kv_lens)
    if lens is not None:  # keys past a row's length: NaN too, as in a cache buffer
        for b, n in enumerate(kv_lens):
            k[b, n:], v[b, n:] = NAN, NAN
    leaves = [grad_leaf(fenced(t)) for t in (q, k, v, mix)]
    moa_matches_reference(leaves, (q, k, v, mix), lens, fenced(do), do)
    for name, leaf in zip(("k", "v"), leaves[1:3]):
        if lens is not None:  # keys past the length: zero gradient
            for bb, n in enumerate(kv_lens):
                assert torch.all(leaf.grad[bb, n:] == 0), name
