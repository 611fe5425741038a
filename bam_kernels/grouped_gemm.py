"""``grouped_mm``: rows grouped by expert times each expert's weight, with autograd, on every backend.

Laid out like every op module: checks, the backend implementation, the custom op and its fake,
the backward op and its fake, autograd registration, the public function. The CPU path is in
``_torch/grouped_gemm.py``, the Triton one in ``_triton/grouped_gemm.py``.
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import autocast_to, backend_for, call_directly
from ._torch import grouped_gemm as torch_path


def _check_grouped_mm(x, w, offs):
    _checks.tensor("x", x, ndim=2, floating=True)
    _checks.tensor("w", w, ndim=3, floating=True)
    _checks.tensor("offs", offs, ndim=1, floating=False)
    E, N, K = w.shape
    if x.shape[1] != K:
        raise ValueError(f"x must have shape [M, K] with K = w.shape[2] = {K}, got {tuple(x.shape)}")
    if offs.shape[0] != E:
        raise ValueError(f"offs must have shape [E] with E = w.shape[0] = {E}, got {tuple(offs.shape)}")
    _checks.same_dtype({"x": x, "w": w})
    _checks.same_device({"x": x, "w": w, "offs": offs})
    if not offs.is_cuda and E > 0:
        bad = (offs < 0) | (offs > x.shape[0])
        if E > 1:
            bad[1:] |= offs[1:] < offs[:-1]
        if bool(bad.any()):
            raise ValueError(f"offs must be non-decreasing row ends in [0, M={x.shape[0]}], "
                             f"got {offs.tolist()}")


def _grouped_mm_impl(x, w, offs, backend: str):
    if backend == "triton":
        from ._triton import grouped_gemm as triton_path  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
        return triton_path.grouped_mm_forward(x, w, offs)
    return torch_path.forward(x, w, offs)


@torch.library.custom_op("bam::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str) -> torch.Tensor:
    return _grouped_mm_impl(x, w, offs, backend)


@_grouped_mm_op.register_fake
def _(x, w, offs, backend):
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("bam::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward_op(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor,
                            need_dx: bool, need_dw: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); a gradient not asked for comes back as an empty tensor."""
    if backend == "triton":
        from ._triton import grouped_gemm as triton_path  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
        return triton_path.grouped_mm_backward(dy, x, w, offs, need_dx, need_dw)
    return torch_path.backward(dy, x, w, offs, need_dx, need_dw)


@_grouped_mm_backward_op.register_fake
def _(dy, x, w, offs, need_dx, need_dw, backend):
    return (x.new_empty(x.shape) if need_dx else x.new_empty(0),
            w.new_empty(w.shape) if need_dw else w.new_empty(0))


def _grouped_mm_setup(ctx, inputs, output):
    x, w, offs, ctx.backend = inputs
    ctx.save_for_backward(x, w, offs)


def _grouped_mm_grad(ctx, dy):
    x, w, offs = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.bam.grouped_mm_backward(dy.contiguous(), x, w, offs, need_dx, need_dw, ctx.backend)
    return (dx if need_dx else None), (dw if need_dw else None), None, None


torch.library.register_autograd("bam::grouped_mm", _grouped_mm_grad, setup_context=_grouped_mm_setup)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` grouped by expert, times each expert's weight.

    x [M, K] with the rows of expert e at ``offs[e-1]:offs[e]``; w [E, N, K]; offs [E] integer
    cumulative row ends. Returns [M, N] with ``y[rows of e] = x[rows of e] @ w[e].T``; rows past
    ``offs[-1]`` are zero. Differentiable in x and w; an expert without rows gets a zero gradient.
    Inside an autocast region x and w run in its dtype, as F.linear would.
    Registered as ``torch.ops.bam.grouped_mm``, so ``torch.compile`` sees one op; the backward
    runs on the backend the forward ran on.
    """
    x, w = autocast_to(x, w)
    _check_grouped_mm(x, w, offs)
    backend = backend_for(x, w)
    if backend == "reference":
        return reference.grouped_mm(x, w, offs)
    if call_directly(x, w, offs):
        return _grouped_mm_impl(x, w, offs, backend)
    return _grouped_mm_op(x, w, offs, backend)
