"""The Triton kernels do not depend on the order their programs run in.

The interpreter runs a grid's programs one after another in id order; a GPU runs them at once, in
any order. Two programs writing one element, or one reading what another writes in the same
launch, give results that depend on the order: here every op runs forward and backward twice,
the second time with every launch's programs in reverse id order, and the results must be
bitwise equal; the first run is also checked by the race detector of tests/support/sanitizer.py.
"""
import math

import pytest
import torch

import bam_kernels as bk
from tests.support import sanitizer
from bam_kernels._triton import attention as attention_kernels


@pytest.fixture
def reversed_programs(monkeypatch):
    """A switch: after ``enable()``, program (x, y, z) of every launch runs as (X-1-x, Y-1-y, Z-1-z)."""
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    ordered = builder.set_grid_idx

    def mirrored(x, y, z):
        nx, ny, nz = builder.grid_dim
        ordered(nx - 1 - x, ny - 1 - y, nz - 1 - z)

    class Switch:
        launches = 0

        def enable(self):
            def counting(x, y, z):
                if (x, y, z) == (0, 0, 0):
                    Switch.launches += 1
                mirrored(x, y, z)
            monkeypatch.setattr(builder, "set_grid_idx", counting)

    return Switch()


def run_twice(fn, switch):
    """fn() -> list of tensors, in id order then in reverse id order; both must be bitwise equal.
    The first run also goes through the race detector (tests/support/sanitizer.py): no program of a launch
    may store to an element another program of it stores to or loads."""
    with sanitizer.races():
        first = [t.clone() for t in fn()]
    switch.enable()
    second = fn()
    assert switch.launches > 0, "no Triton launch ran"
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def grads(out, leaves, seed=1):
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, leaves, dy)]


def test_the_switch_catches_a_write_race(reversed_programs):
    """Every program writes its id to one element: the last writer differs between the orders."""
    import triton
    import triton.language as tl

    @triton.jit
    def last_writer(out_ptr):
        tl.store(out_ptr, tl.program_id(0))

    def fn():
        out = torch.zeros(1, dtype=torch.int32)
        last_writer[(4,)](out)
        return int(out)

    assert fn() == 3
    reversed_programs.enable()
    assert fn() == 0 and reversed_programs.launches == 1


def test_grouped_mm(reversed_programs):
    x, w = torch.randn(70, 19, requires_grad=True), torch.randn(5, 37, 19, requires_grad=True)
    offs = torch.tensor([20, 20, 41, 60, 66], dtype=torch.int32)

    def fn():
        with bk.use_backend("triton"):
            return grads(bk.grouped_mm(x, w, offs), [x, w])

    run_twice(fn, reversed_programs)


def test_route_topk_and_moe_mlp(reversed_programs):
    T, D, Fh, E, k = 57, 21, 40, 5, 2
    logits = torch.randn(T, E, requires_grad=True)
    x = torch.randn(T, D, requires_grad=True)
    gate_up = (torch.randn(E, 2 * Fh, D) / math.sqrt(D)).requires_grad_()
    down = (torch.randn(E, D, Fh) / math.sqrt(Fh)).requires_grad_()

    def fn():
        with bk.use_backend("triton"):
            w, idx = bk.route_topk(logits, k)
            return grads(bk.moe_mlp(x, gate_up, down, w, idx), [logits, x, gate_up, down])

    run_twice(fn, reversed_programs)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,splits", [(40, 40, None, 1), (1, 600, [600, 300], 3)])
def test_moa_attention(reversed_programs, monkeypatch, expert_kv, T, S, kv_lens, splits):
    monkeypatch.setattr(attention_kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = [torch.randn(s, requires_grad=True) for s in ((B, T, E, H, Dh), kv_shape, kv_shape)]
    mix = torch.softmax(torch.randn(B, T, E), -1).requires_grad_()
    lens = None if kv_lens is None else torch.tensor(kv_lens)

    def fn():
        with bk.use_backend("triton"):
            return grads(bk.moa_attention(q, k, v, mix, kv_lens=lens), [q, k, v, mix])

    run_twice(fn, reversed_programs)
