"""``moe_mlp``: the fused mixture of SwiGLU experts for routed tokens, with autograd, on every backend.

Laid out like every op module: checks, the backend implementation, the custom op and its fake,
the backward op and its fake, autograd registration, the public function. The CPU path is in
``_torch/moe.py``, the Triton one in ``_triton/moe.py`` (on the grouped GEMM kernels).
"""
from __future__ import annotations

import torch

from . import _checks, reference
from ._dispatch import autocast_to, backend_for, call_directly, needs_grad
from ._torch import moe as torch_path


def _check_moe_mlp(x, gate_up_proj, down_proj, weights, experts):
    _checks.tensor("x", x, ndim=2, floating=True)
    _checks.tensor("gate_up_proj", gate_up_proj, ndim=3, floating=True)
    _checks.tensor("down_proj", down_proj, ndim=3, floating=True)
    _checks.tensor("weights", weights, ndim=2, floating=True)
    _checks.tensor("experts", experts, ndim=2, floating=False)
    T, D = x.shape
    E, F2, D2 = gate_up_proj.shape
    if F2 % 2:
        raise ValueError(f"gate_up_proj must have shape [E, 2F, D] (gate rows, then up rows), "
                         f"got {tuple(gate_up_proj.shape)}")
    Fh = F2 // 2
    _checks.shape("gate_up_proj", gate_up_proj, (E, 2 * Fh, D), "[E, 2F, D] with D = x.shape[1]")
    _checks.shape("down_proj", down_proj, (E, D, Fh), "[E, D, F] with E, F from gate_up_proj")
    if experts.shape[0] != T or experts.shape[1] < 1:
        raise ValueError(f"experts must have shape [T, k] with T = x.shape[0] = {T} and k >= 1, "
                         f"got {tuple(experts.shape)}")
    _checks.shape("weights", weights, tuple(experts.shape), "[T, k] like experts")
    _checks.same_dtype({"x": x, "gate_up_proj": gate_up_proj, "down_proj": down_proj})
    _checks.same_device({"x": x, "gate_up_proj": gate_up_proj, "down_proj": down_proj,
                         "weights": weights, "experts": experts})


def _triton_path():
    from ._triton import moe  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
    return moe


def _moe_mlp_impl(x, gate_up_proj, down_proj, weights, experts, save_pre: bool, backend: str):
    if backend != "triton" and not save_pre and experts.numel() <= torch_path.FEW_SLOTS:
        y = torch_path.forward_few(x, gate_up_proj, down_proj, weights, experts)
        return (y, x.new_empty(0, gate_up_proj.shape[1]), x.new_empty(0, x.shape[1]),
                experts.new_empty(0, dtype=torch.int64), experts.new_empty(0, dtype=torch.int32))
    fwd = _triton_path().forward if backend == "triton" else torch_path.forward
    y, pre, y_rows, slots, offs = fwd(x, gate_up_proj, down_proj, weights, experts, save_pre)
    if not save_pre:  # only the backward reads these
        slots, offs = slots.new_empty(0), offs.new_empty(0)
    return y, pre, y_rows, slots, offs


@torch.library.custom_op("bam::moe_mlp", mutates_args=())
def _moe_mlp_op(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights: torch.Tensor,
                experts: torch.Tensor, save_pre: bool,
                backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, then for the backward: the [gate | up] pre-activations and, on the torch path, the
    unweighted expert outputs, each empty unless ``save_pre``; sorted slots; expert offsets)."""
    y, pre, y_rows, slots, offs = _moe_mlp_impl(x, gate_up_proj, down_proj, weights, experts, save_pre,
                                                backend)
    # Custom ops may not return views of one another's storage or of inputs.
    own = lambda t: t.clone() if t._base is not None else t
    return own(y), own(pre), own(y_rows), slots, offs


@_moe_mlp_op.register_fake
def _(x, gate_up_proj, down_proj, weights, experts, save_pre, backend):
    M = experts.numel() if save_pre else 0
    y_rows = x.new_empty(M, x.shape[1]) if backend != "triton" else x.new_empty(0, 0)
    return (x.new_empty(x.shape), x.new_empty(M, gate_up_proj.shape[1]), y_rows,
            experts.new_empty(M, dtype=torch.int64),
            experts.new_empty(gate_up_proj.shape[0] if save_pre else 0, dtype=torch.int32))


@torch.library.custom_op("bam::moe_mlp_backward", mutates_args=())
def _moe_mlp_backward_op(dout: torch.Tensor, x: torch.Tensor, gate_up_proj: torch.Tensor,
                         down_proj: torch.Tensor, weights: torch.Tensor, pre: torch.Tensor,
                         y_rows: torch.Tensor, slots: torch.Tensor, offs: torch.Tensor,
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, d_gate_up_proj, d_down_proj, d_weights)."""
    bwd = _triton_path().backward if backend == "triton" else torch_path.backward
    dx, dgu, dd, dw = bwd(dout.contiguous(), x, gate_up_proj, down_proj, weights, pre, y_rows, slots, offs)
    return dx.contiguous() if dx._base is not None else dx, dgu, dd, dw


@_moe_mlp_backward_op.register_fake
def _(dout, x, gate_up_proj, down_proj, weights, pre, y_rows, slots, offs, backend):
    return x.new_empty(x.shape), gate_up_proj.new_empty(gate_up_proj.shape), \
        down_proj.new_empty(down_proj.shape), weights.new_empty(weights.shape)


def _moe_mlp_setup(ctx, inputs, output):
    x, gate_up_proj, down_proj, weights, _experts, _save_pre, ctx.backend = inputs
    _y, pre, y_rows, slots, offs = output
    # The saved-for-backward outputs get no gradient: no zero tensors materialised for them.
    ctx.mark_non_differentiable(pre, y_rows, slots, offs)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, gate_up_proj, down_proj, weights, pre, y_rows, slots, offs)


def _moe_mlp_grad(ctx, dy, _dpre, _dy_rows, _dslots, _doffs):
    if dy is None:
        return (None,) * 7
    grads = torch.ops.bam.moe_mlp_backward(dy, *ctx.saved_tensors, ctx.backend)
    return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:4])) + (None, None, None)


torch.library.register_autograd("bam::moe_mlp", _moe_mlp_grad, setup_context=_moe_mlp_setup)


def moe_mlp(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
            weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Mixture of SwiGLU experts for routed tokens.

    x [T, D]; gate_up_proj [E, 2F, D] (gate rows first); down_proj [E, D, F]; weights [T, k]
    (any float dtype) and experts [T, k] (integer ids) from the router. Returns [T, D]:
    ``y[t] = sum_s weights[t, s] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t])``, e = experts[t, s].
    Differentiable in x, both weight tensors and weights. Duplicate ids in one token each count.
    Inside an autocast region x and both weight tensors run in its dtype, as F.linear would.
    Registered as ``torch.ops.bam.moe_mlp``, so ``torch.compile`` sees one op; the backward runs
    on the backend the forward ran on.
    """
    x, gate_up_proj, down_proj = autocast_to(x, gate_up_proj, down_proj)
    _check_moe_mlp(x, gate_up_proj, down_proj, weights, experts)
    backend = backend_for(x, gate_up_proj, down_proj)
    if backend == "reference":
        _checks.expert_ids("experts", experts, gate_up_proj.shape[0])
        return reference.moe_mlp(x, gate_up_proj, down_proj, weights, experts)
    if call_directly(x, gate_up_proj, down_proj, weights, experts):
        return _moe_mlp_impl(x, gate_up_proj, down_proj, weights, experts, False, backend)[0]
    save_pre = needs_grad(x, gate_up_proj, down_proj, weights)
    return _moe_mlp_op(x, gate_up_proj, down_proj, weights, experts, save_pre, backend)[0]
