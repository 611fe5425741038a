"""grouped_mm on every backend against the float64 reference, and the Triton kernels under the
harness's conditions: bf16 on the interpreter, NaN-fenced inputs, reversed program order."""
import math

import pytest
import torch

import bam_kernels as bk
from bam_kernels import reference
from tests.support.fenced import fenced, grad_leaf
from tests.support.inputs import make_moe, random_offsets, run_moe
from tests.support.oracle import BF16, BF16_TOL, bf16_leaves, grouped_mm_matches_reference, rel
from tests.support.program_order import grads, run_twice

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}


GMM_CASES = [  # M, K, N, E, empty experts, tail rows past offs[-1]
    (1, 19, 37, 1, (), 0),
    (7, 19, 37, 3, (1,), 0),
    (33, 24, 13, 4, (0, 3), 5),
    (257, 37, 29, 16, (2, 5, 11), 0),
    (127, 16, 48, 5, (), 9),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N,E,empty,tail", GMM_CASES)
def test_grouped_mm_matches_reference(poison, backend, dtype, M, K, N, E, empty, tail):
    offs = random_offsets(M, E, empty, tail)
    x = torch.randn(M, K).to(dtype).requires_grad_()
    w = (torch.randn(E, N, K) / math.sqrt(K)).to(dtype).requires_grad_()
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = reference.grouped_mm(x64, w64, offs)
    with bk.use_backend(backend):
        y = bk.grouped_mm(x, w, offs)
    assert y.shape == (M, N) and y.dtype == dtype
    assert rel(y, ref) < TOL[dtype]
    if tail:
        assert torch.all(y[-tail:] == 0)
    dy = torch.randn(M, N, dtype=torch.float64)
    ref.backward(dy)
    y.backward(dy.to(dtype))
    assert rel(x.grad, x64.grad) < TOL[dtype]
    assert rel(w.grad, w64.grad) < TOL[dtype]
    for e in empty:
        assert torch.all(w.grad[e] == 0), f"expert {e} has no rows: its weight gradient must be exactly 0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_transposed_weight_view(backend):
    """A non-contiguous weight (a transposed view, as torch._grouped_mm's callers pass) works."""
    offs = random_offsets(40, 3)
    x = torch.randn(40, 20)
    w = torch.randn(3, 20, 12).transpose(1, 2)  # [E, N=12, K=20], strided
    with bk.use_backend(backend):
        y = bk.grouped_mm(x, w, offs)
    assert rel(y, reference.grouped_mm(x.double(), w.double(), offs)) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_mm_backward_is_deterministic(backend):
    offs = random_offsets(97, 6, empty=(2,))
    x = torch.randn(97, 24, requires_grad=True)
    w = torch.randn(6, 40, 24, requires_grad=True)
    dy = torch.randn(97, 40)
    grads = []
    for _ in range(2):
        x.grad = w.grad = None
        with bk.use_backend(backend):
            bk.grouped_mm(x, w, offs).backward(dy)
        grads.append((x.grad.clone(), w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_grouped_mm_bad_input():
    x, w = torch.randn(10, 8), torch.randn(3, 5, 8)
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        bk.grouped_mm(x, w, torch.tensor([4, 2, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="offs must be non-decreasing"):
        bk.grouped_mm(x, w, torch.tensor([4, 6, 11], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"offs must have shape \[E\]"):
        bk.grouped_mm(x, w, torch.tensor([4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must have shape \[M, K\]"):
        bk.grouped_mm(torch.randn(10, 7), w, torch.tensor([4, 6, 10]))
    with pytest.raises(ValueError, match="w has dtype"):
        bk.grouped_mm(x, w.half(), torch.tensor([4, 6, 10]))
    with pytest.raises(ValueError, match="offs must be an integer tensor"):
        bk.grouped_mm(x, w, torch.tensor([4.0, 6.0, 10.0]))
    with pytest.raises(ValueError, match="w must have 3 dimensions"):
        bk.grouped_mm(x, w[0], torch.tensor([4, 6, 10]))


# ---------------------------------------------------------------------------------------------
# The CPU path without torch._grouped_mm


@pytest.mark.parametrize("op", ["grouped_mm", "moe_mlp"])
def test_torch_path_without_native_grouped_mm(monkeypatch, op):
    """The CPU path's per-expert loop, used where torch._grouped_mm is missing or refuses a dtype."""
    from bam_kernels._torch import grouped_gemm as torch_gemm
    refused = {("cpu", torch.float32, aligned): False for aligned in (True, False)}
    monkeypatch.setattr(torch_gemm, "_native_gmm", dict(refused))
    if op == "grouped_mm":
        offs = random_offsets(57, 5, empty=(1,), tail=4)
        x = torch.randn(57, 19, requires_grad=True)
        w = torch.randn(5, 23, 19, requires_grad=True)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        with bk.use_backend("torch"):
            y = bk.grouped_mm(x, w, offs)
        ref = reference.grouped_mm(x64, w64, offs)
        dy = torch.randn(57, 23, dtype=torch.float64)
        y.backward(dy.float())
        ref.backward(dy)
        pairs = [(y, ref), (x.grad, x64.grad), (w.grad, w64.grad)]
        assert torch.all(w.grad[1] == 0) and torch.all(y[-4:] == 0)
    else:
        inputs = make_moe(33, 19, 23, 6, 2, empty=(3,))
        leaves = [t.requires_grad_() for t in inputs[:4]] + [inputs[4]]
        leaves64 = [t.detach().double().requires_grad_() for t in inputs[:4]] + [inputs[4]]
        y = run_moe("torch", leaves)
        ref = reference.moe_mlp(*leaves64)
        dy = torch.randn(33, 19, dtype=torch.float64)
        y.backward(dy.float())
        ref.backward(dy)
        pairs = [(y, ref)] + [(a.grad, b.grad) for a, b in zip(leaves[:4], leaves64[:4])]
    for a, b in pairs:
        assert rel(a, b) < 1e-5
    assert torch_gemm._native_gmm == refused


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_a_refused_misaligned_call_does_not_turn_off_native_grouped_mm(monkeypatch):
    """torch._grouped_mm needs 16-byte strides: an odd-sized call falls back to the loop, and the
    aligned calls after it still use the native op."""
    from bam_kernels._torch import grouped_gemm as torch_gemm
    monkeypatch.setattr(torch_gemm, "_native_gmm", {})
    offs = torch.tensor([3, 9, 12], dtype=torch.int32)
    with bk.use_backend("torch"):
        odd = bk.grouped_mm(torch.randn(12, 19), torch.randn(3, 5, 19), offs)
        even = bk.grouped_mm(torch.randn(12, 16), torch.randn(3, 8, 16), offs)
    assert odd.shape == (12, 5) and even.shape == (12, 8)
    assert torch_gemm._native_gmm.get(("cpu", torch.float32, False)) is False    # refused, remembered apart
    assert torch_gemm._native_gmm.get(("cpu", torch.float32, True)) is True


# ---------------------------------------------------------------------------------------------
# Triton kernels in bf16 (tests/support/interpreter_bf16.py), NaN-fenced (tests/support/fenced.py),
# in reversed program order (tests/support/program_order.py)


def test_grouped_mm_bf16():
    M, K, N, E = 45, 19, 37, 4
    offs = torch.tensor([10, 10, 31, 40], dtype=torch.int32)
    x, w = bf16_leaves(torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K))
    dy = torch.randn(M, N).to(BF16)
    y = grouped_mm_matches_reference(x, w, offs, dy, dy, tol=BF16_TOL)
    assert y.dtype == BF16


def test_grouped_mm_fenced():
    M, K, N, E = 45, 19, 37, 4
    offs = torch.tensor([10, 10, 31, 40], dtype=torch.int32)  # an empty expert, 5 rows past the end
    x, w = torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K)
    dy = torch.randn(M, N)
    grouped_mm_matches_reference(grad_leaf(fenced(x)), grad_leaf(fenced(w)), offs, fenced(dy), dy)


def test_grouped_mm_in_any_program_order(reversed_programs):
    x, w = torch.randn(70, 19, requires_grad=True), torch.randn(5, 37, 19, requires_grad=True)
    offs = torch.tensor([20, 20, 41, 60, 66], dtype=torch.int32)

    def fn():
        with bk.use_backend("triton"):
            return grads(bk.grouped_mm(x, w, offs), [x, w])

    run_twice(fn, reversed_programs)
