"""Grouped expert GEMMs and the fused MoE SwiGLU FFN, with autograd, on every backend."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks, reference
from ._dispatch import backend_for
from .routing import RoutingPlan, routing_plan

# ---------------------------------------------------------------------------------------------
# grouped_mm


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
            raise ValueError(f"offs must be non-decreasing row ends in [0, M={x.shape[0]}], got {offs.tolist()}")


def _grouped_mm_torch(x_MK, w_ENK, offs_E):
    y_MN = x_MK.new_zeros(x_MK.shape[0], w_ENK.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            torch.mm(x_MK[start:end], w_ENK[e].T, out=y_MN[start:end])
        start = end
    return y_MN


class _GroupedMMTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, offs_E):
        ctx.save_for_backward(x_MK, w_ENK, offs_E)
        return _grouped_mm_torch(x_MK, w_ENK, offs_E)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_ENK, offs_E = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _grouped_mm_torch(dy_MN, w_ENK.transpose(1, 2), offs_E)
        if ctx.needs_input_grad[1]:
            dw = torch.zeros_like(w_ENK)
            start = 0
            for e, end in enumerate(offs_E.tolist()):
                if end > start:
                    torch.mm(dy_MN[start:end].T, x_MK[start:end], out=dw[e])
                start = end
        return dx, dw, None


class _GroupedMMTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_ENK, offs_E):
        from ._triton.grouped_gemm import launch_gemm
        offs_E = offs_E.to(torch.int32).contiguous()
        E, N, K = w_ENK.shape
        y_MN = torch.empty(x_MK.shape[0], N, device=x_MK.device, dtype=x_MK.dtype)
        launch_gemm(x_MK, w_ENK, w_ENK.stride(), N, K, offs_E, y_MN)
        ctx.save_for_backward(x_MK, w_ENK, offs_E)
        return y_MN

    @staticmethod
    def backward(ctx, dy_MN):
        from ._triton.grouped_gemm import launch_gemm, launch_wgrad
        x_MK, w_ENK, offs_E = ctx.saved_tensors
        E, N, K = w_ENK.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x_MK, memory_format=torch.contiguous_format)
            sw = w_ENK.stride()
            launch_gemm(dy_MN, w_ENK, (sw[0], sw[2], sw[1]), K, N, offs_E, dx)
        if ctx.needs_input_grad[1]:
            dw = torch.empty_like(w_ENK, memory_format=torch.contiguous_format)
            launch_wgrad(dy_MN, x_MK, dw, dw.stride(), N, K, offs_E)
        return dx, dw, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` grouped by expert, times each expert's weight.

    x [M, K] with the rows of expert e at ``offs[e-1]:offs[e]``; w [E, N, K]; offs [E] integer
    cumulative row ends. Returns [M, N] with ``y[rows of e] = x[rows of e] @ w[e].T``; rows past
    ``offs[-1]`` are zero. Differentiable in x and w; an expert without rows gets a zero gradient.
    """
    _check_grouped_mm(x, w, offs)
    backend = backend_for(x, w)
    if backend == "reference":
        return reference.grouped_mm(x, w, offs)
    if backend == "torch":
        return _GroupedMMTorch.apply(x, w, offs)
    return _GroupedMMTriton.apply(x, w, offs)


# ---------------------------------------------------------------------------------------------
# moe_mlp


def _check_moe_mlp(x, gate_up_proj, down_proj, weights, experts):
    _checks.tensor("x", x, ndim=2, floating=True)
    _checks.tensor("gate_up_proj", gate_up_proj, ndim=3, floating=True)
    _checks.tensor("down_proj", down_proj, ndim=3, floating=True)
    _checks.tensor("weights", weights, ndim=2, floating=True)
    _checks.tensor("experts", experts, ndim=2, floating=False)
    T, D = x.shape
    E, F2, D2 = gate_up_proj.shape
    if F2 % 2:
        raise ValueError(f"gate_up_proj must have shape [E, 2F, D] (gate rows, then up rows), got {tuple(gate_up_proj.shape)}")
    Fh = F2 // 2
    _checks.shape("gate_up_proj", gate_up_proj, (E, 2 * Fh, D), "[E, 2F, D] with D = x.shape[1]")
    _checks.shape("down_proj", down_proj, (E, D, Fh), "[E, D, F] with E, F from gate_up_proj")
    if experts.shape[0] != T or experts.shape[1] < 1:
        raise ValueError(f"experts must have shape [T, k] with T = x.shape[0] = {T} and k >= 1, got {tuple(experts.shape)}")
    _checks.shape("weights", weights, tuple(experts.shape), "[T, k] like experts")
    _checks.same_dtype({"x": x, "gate_up_proj": gate_up_proj, "down_proj": down_proj})
    _checks.same_device({"x": x, "gate_up_proj": gate_up_proj, "down_proj": down_proj,
                         "weights": weights, "experts": experts})


def _segments(plan: RoutingPlan):
    start = 0
    for e, end in enumerate(plan.offsets.tolist()):
        if end > start:
            yield e, start, end
        start = end


class _MoeMLPTorch(torch.autograd.Function):
    """CPU path: one gather, per-expert GEMMs on contiguous row blocks, a hand-written backward
    (autograd through ``w[e]`` would materialise a full-size zero gradient per expert)."""

    @staticmethod
    def forward(ctx, x_TD, gate_up_E2FD, down_EDF, weights_TK, experts_TK):
        T, D = x_TD.shape
        E, F2, _ = gate_up_E2FD.shape
        plan = routing_plan(experts_TK, E)
        tok = plan.sorted_tokens
        w_M = weights_TK.reshape(-1)[plan.sorted_slots].to(x_TD.dtype)
        xs_MD = x_TD.index_select(0, tok)
        pre_M2F = x_TD.new_empty(tok.numel(), F2)
        y_MD = x_TD.new_zeros(tok.numel(), D)
        for e, a, b in _segments(plan):
            torch.mm(xs_MD[a:b], gate_up_E2FD[e].T, out=pre_M2F[a:b])
            gate, up = pre_M2F[a:b].chunk(2, dim=1)
            torch.mm(F.silu(gate) * up, down_EDF[e].T, out=y_MD[a:b])
        y_MD.mul_(w_M[:, None])
        out_TD = x_TD.new_zeros(T, D).index_add_(0, tok, y_MD)
        ctx.save_for_backward(x_TD, gate_up_E2FD, down_EDF, weights_TK, pre_M2F)
        ctx.plan = plan
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD):
        x_TD, gate_up_E2FD, down_EDF, weights_TK, pre_M2F = ctx.saved_tensors
        plan = ctx.plan
        tok = plan.sorted_tokens
        w_M = weights_TK.reshape(-1)[plan.sorted_slots].to(x_TD.dtype)
        dy_MD = dout_TD.index_select(0, tok)
        xs_MD = x_TD.index_select(0, tok)
        dxs_MD = torch.zeros_like(xs_MD)
        d_pre_M2F = torch.empty_like(pre_M2F)
        dw_M = x_TD.new_zeros(tok.numel())
        d_gate_up = torch.zeros_like(gate_up_E2FD)
        d_down = torch.zeros_like(down_EDF)
        Fh = pre_M2F.shape[1] // 2
        for e, a, b in _segments(plan):
            gate, up = pre_M2F[a:b].chunk(2, dim=1)
            silu = F.silu(gate)
            act = silu * up
            d_act = dy_MD[a:b] @ down_EDF[e]
            dw_M[a:b] = (d_act * act).sum(1)
            torch.mm((dy_MD[a:b] * w_M[a:b, None]).T, act, out=d_down[e])
            d_act.mul_(w_M[a:b, None])
            d_pre = d_pre_M2F[a:b]
            torch.mul(d_act, silu, out=d_pre[:, Fh:])
            torch.ops.aten.silu_backward.grad_input(d_act.mul_(up), gate, grad_input=d_pre[:, :Fh])
            torch.mm(d_pre.T, xs_MD[a:b], out=d_gate_up[e])
            torch.mm(d_pre, gate_up_E2FD[e], out=dxs_MD[a:b])
        dx_TD = torch.zeros_like(x_TD).index_add_(0, tok, dxs_MD)
        d_weights = torch.zeros_like(weights_TK).view(-1)
        d_weights[plan.sorted_slots] = dw_M.to(weights_TK.dtype)
        return dx_TD, d_gate_up, d_down, d_weights.view_as(weights_TK), None


class _MoeMLPTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, gate_up_E2FD, down_EDF, weights_TK, experts_TK):
        from ._triton.grouped_gemm import SWIGLU_FWD, launch_gemm
        T, D = x_TD.shape
        E, F2, _ = gate_up_E2FD.shape
        Fh = F2 // 2
        k = experts_TK.shape[1]
        plan = routing_plan(experts_TK, E)
        slots = plan.sorted_slots
        M = slots.numel()
        w_flat = weights_TK.reshape(-1).to(torch.float32).contiguous()
        needs_grad = any(ctx.needs_input_grad[:4])
        act_MF = torch.empty(M, Fh, device=x_TD.device, dtype=x_TD.dtype)
        pre_M2F = torch.empty(M, F2, device=x_TD.device, dtype=x_TD.dtype) if needs_grad else None
        launch_gemm(x_TD, gate_up_E2FD, gate_up_E2FD.stride(), Fh, D, plan.offsets, act_MF,
                    row_map=slots, a_div=k, gather_a=True, epilogue=SWIGLU_FWD, pre=pre_M2F)
        y_MD = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
        launch_gemm(act_MF, down_EDF, down_EDF.stride(), D, Fh, plan.offsets, y_MD,
                    row_map=slots, scatter_c=True, scale=w_flat)
        ctx.save_for_backward(x_TD, gate_up_E2FD, down_EDF, weights_TK, w_flat, pre_M2F, slots, plan.offsets)
        ctx.k = k
        return y_MD.view(T, k, D).sum(1) if k > 1 else y_MD.view(T, D)

    @staticmethod
    def backward(ctx, dout_TD):
        from ._triton.grouped_gemm import MIN_BLOCK_N, SWIGLU_BWD, launch_gemm, launch_wgrad
        x_TD, gate_up_E2FD, down_EDF, weights_TK, w_flat, pre_M2F, slots, offs = ctx.saved_tensors
        k = ctx.k
        T, D = x_TD.shape
        E, F2, _ = gate_up_E2FD.shape
        Fh = F2 // 2
        M = slots.numel()
        dout_TD = dout_TD.contiguous()
        d_pre = torch.empty(M, F2, device=x_TD.device, dtype=x_TD.dtype)
        part = torch.zeros(M, -(-Fh // MIN_BLOCK_N), device=x_TD.device, dtype=torch.float32)
        sd = down_EDF.stride()
        launch_gemm(dout_TD, down_EDF, (sd[0], sd[2], sd[1]), Fh, D, offs, d_pre, row_map=slots, a_div=k,
                    gather_a=True, scale=w_flat, epilogue=SWIGLU_BWD, pre=pre_M2F, part=part)
        d_weights = None
        if ctx.needs_input_grad[3]:
            d_flat = torch.empty(M, device=x_TD.device, dtype=torch.float32)
            d_flat[slots] = part.sum(1)
            d_weights = d_flat.view(T, k).to(weights_TK.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            dx_MD = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
            sg = gate_up_E2FD.stride()
            launch_gemm(d_pre, gate_up_E2FD, (sg[0], sg[2], sg[1]), D, F2, offs, dx_MD,
                        row_map=slots, scatter_c=True)
            dx = dx_MD.view(T, k, D).sum(1) if k > 1 else dx_MD.view(T, D)
        d_down = d_gate_up = None
        if ctx.needs_input_grad[2]:
            d_down = torch.empty_like(down_EDF, memory_format=torch.contiguous_format)
            launch_wgrad(dout_TD, pre_M2F, d_down, d_down.stride(), D, Fh, offs, row_map=slots, a_div=k,
                         gather_a=True, scale_a=w_flat, swiglu_b=True)
        if ctx.needs_input_grad[1]:
            d_gate_up = torch.empty_like(gate_up_E2FD, memory_format=torch.contiguous_format)
            launch_wgrad(d_pre, x_TD, d_gate_up, d_gate_up.stride(), F2, D, offs, row_map=slots,
                         b_div=k, gather_b=True)
        return dx, d_gate_up, d_down, d_weights, None


def moe_mlp(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor,
            weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Mixture of SwiGLU experts for routed tokens.

    x [T, D]; gate_up_proj [E, 2F, D] (gate rows first); down_proj [E, D, F]; weights [T, k]
    (any float dtype) and experts [T, k] (integer ids) from the router. Returns [T, D]:
    ``y[t] = sum_s weights[t, s] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t])``, e = experts[t, s].
    Differentiable in x, both weight tensors and weights. Duplicate ids in one token each count.
    """
    _check_moe_mlp(x, gate_up_proj, down_proj, weights, experts)
    backend = backend_for(x, gate_up_proj, down_proj)
    if backend == "reference":
        _checks.expert_ids("experts", experts, gate_up_proj.shape[0])
        return reference.moe_mlp(x, gate_up_proj, down_proj, weights, experts)
    if backend == "torch":
        return _MoeMLPTorch.apply(x, gate_up_proj, down_proj, weights, experts)
    return _MoeMLPTriton.apply(x, gate_up_proj, down_proj, weights, experts)
