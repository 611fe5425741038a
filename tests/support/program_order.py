"""The Triton kernels do not depend on the order their programs run in.

The interpreter runs a grid's programs one after another in id order; a GPU runs them at once, in
any order. Two programs writing one element, or one reading what another writes in the same
launch, give results that depend on the order: here every op runs forward and backward twice,
the second time with every launch's programs in reverse id order, and the results must be
bitwise equal; the first run is also checked by the race detector of tests/support/sanitizer.py.


Tests take the ``reversed_programs`` fixture (made visible by tests/kernels/conftest.py and
tests/support/conftest.py) and check their ops with ``run_twice``.
"""
import pytest
import torch

from tests.support import sanitizer


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
