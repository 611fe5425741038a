"""The Triton kernels in bf16, on the CPU: the interpreter's bf16 dots and its float32 -> bf16
rounding are made what a GPU does by tests/support/interpreter_bf16.py (conftest installs it), so every op
runs here in the dtype a GPU trains in, forward and every gradient against the float64 reference
on the same bf16 numbers, under the convention's bf16 tolerance (1e-2 relative). Errors seen:
1.6e-3 to 3.4e-3, as the torch path's (with the interpreter's own truncating cast, attention
gradients were at 9e-3)."""
import math

import pytest
import torch
import triton
import triton.language as tl

from tests import conftest
from bam_kernels._triton import attention as attention_kernels
from tests.support.oracle import grouped_mm_matches_reference, moa_matches_reference, routed_moe_matches_reference

BF16 = torch.bfloat16
TOL = 1e-2


@triton.jit
def _dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    m, n, k = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + m[:, None] * K + k[None, :])
    b = tl.load(b_ptr + k[:, None] * N + n[None, :])
    tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b))


@triton.jit
def _cast(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def test_bf16_dots_and_rounding_are_right_under_the_interpreter():
    assert conftest.BF16_DOTS
    a, b = torch.randn(16, 32).to(BF16), torch.randn(32, 16).to(BF16)
    c = torch.empty(16, 16)
    _dot[(1,)](a, b, c, 16, 16, 32)
    torch.testing.assert_close(c, a.double().mm(b.double()).float(), rtol=1e-6, atol=1e-6)
    x = torch.cat([torch.randn(1020), torch.tensor([float("inf"), -float("inf"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])])
    y = torch.empty(1024, dtype=BF16)
    _cast[(1,)](x, y, 1024)
    assert torch.equal(y, x.to(BF16))  # round to nearest, ties to even (the last two are ties)


def _bf16_leaves(*tensors):
    return [t.to(BF16).requires_grad_() for t in tensors]


def test_grouped_mm_bf16():
    M, K, N, E = 45, 19, 37, 4
    offs = torch.tensor([10, 10, 31, 40], dtype=torch.int32)
    x, w = _bf16_leaves(torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K))
    dy = torch.randn(M, N).to(BF16)
    y = grouped_mm_matches_reference(x, w, offs, dy, dy, tol=TOL)
    assert y.dtype == BF16


@pytest.mark.parametrize("T,E,k", [(37, 5, 2), (70, 3, 1), (9, 4, 4)])
def test_route_topk_and_moe_mlp_bf16(T, E, k):
    D, Fh = 21, 27
    # Distinct logits: bf16 has 8 bits of mantissa, and a tie would let the top-k pick either.
    logits = (torch.randperm(T * E).view(T, E) / 8.0).to(BF16)
    x, dy = torch.randn(T, D).to(BF16), torch.randn(T, D).to(BF16)
    gate_up = (torch.randn(E, 2 * Fh, D) / math.sqrt(D)).to(BF16)
    down = (torch.randn(E, D, Fh) / math.sqrt(Fh)).to(BF16)
    values = (logits, x, gate_up, down)
    routed_moe_matches_reference([t.clone().requires_grad_() for t in values], values, k, dy, dy, tol=TOL)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,splits", [(33, 33, None, 1), (5, 70, [70, 23], 1), (1, 600, [600, 257], 3)])
def test_moa_attention_bf16(expert_kv, T, S, kv_lens, splits, monkeypatch):
    monkeypatch.setattr(attention_kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = _bf16_leaves(torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape))
    mix = torch.softmax(torch.randn(B, T, E), -1).requires_grad_()
    do = torch.randn(B, T, E, H, Dh).to(BF16)
    lens = None if kv_lens is None else torch.tensor(kv_lens)
    o = moa_matches_reference([q, k, v, mix], (q, k, v, mix), lens, do, do, tol=TOL)
    assert o.dtype == BF16
