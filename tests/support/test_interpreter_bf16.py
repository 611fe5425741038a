"""The Triton kernels in bf16, on the CPU: the interpreter's bf16 dots and its float32 -> bf16
(the harness itself: the interpreter's bf16 dots and float32 -> bf16 rounding are right)."""
import torch
import triton
import triton.language as tl

from tests import conftest

BF16 = torch.bfloat16


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
    specials = torch.tensor([float("inf"), -float("inf"), 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8])
    x = torch.cat([torch.randn(1020), specials])
    y = torch.empty(1024, dtype=BF16)
    _cast[(1,)](x, y, 1024)
    assert torch.equal(y, x.to(BF16))  # round to nearest, ties to even (the last two are ties)
