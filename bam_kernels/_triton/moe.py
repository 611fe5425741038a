"""Host side of the fused MoE SwiGLU FFN on the grouped GEMM kernels (``grouped_gemm.py``):
two launches forward (gather + SwiGLU epilogue, then the down projection scattered to slot order),
four backward (d(act) with the SwiGLU backward epilogue, dx, and the two weight gradients)."""
from __future__ import annotations

import torch

from ..routing import routing_plan
from .grouped_gemm import MIN_BLOCK_N, SWIGLU_BWD, SWIGLU_FWD, launch_gemm, launch_wgrad


def forward(x_TD, gate_up_E2FD, down_EDF, weights_Tk, experts_Tk, save_pre: bool):
    """(y [T, D], pre-activations [M, 2F] (empty unless ``save_pre``), an empty placeholder for the
    torch path's expert outputs, sorted slots [M], expert offsets [E])."""
    T, D = x_TD.shape
    E, F2, _ = gate_up_E2FD.shape
    Fh = F2 // 2
    k = experts_Tk.shape[1]
    plan = routing_plan(experts_Tk, E)
    slots_M = plan.sorted_slots
    M = slots_M.numel()
    w_flat = weights_Tk.reshape(-1).to(torch.float32).contiguous()
    act_MF = torch.empty(M, Fh, device=x_TD.device, dtype=x_TD.dtype)
    pre_M2F = torch.empty(M if save_pre else 0, F2, device=x_TD.device, dtype=x_TD.dtype)
    launch_gemm(x_TD, gate_up_E2FD, plan.offsets, act_MF, row_map=slots_M, a_div=k, gather_a=True,
                epilogue=SWIGLU_FWD, pre=pre_M2F if save_pre else None)
    y_MD = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
    launch_gemm(act_MF, down_EDF, plan.offsets, y_MD, row_map=slots_M, scatter_c=True, scale=w_flat)
    # The k slots of a token are summed here, not with atomics in the kernel: deterministic.
    out_TD = y_MD.view(T, k, D).sum(1) if k > 1 else y_MD.view(T, D)
    return out_TD, pre_M2F, x_TD.new_empty(0, 0), slots_M, plan.offsets


def backward(dout_TD, x_TD, gate_up_E2FD, down_EDF, weights_Tk, pre_M2F, _y_MD, slots_M, offs_E):
    """(dx, d_gate_up_proj, d_down_proj, d_weights)."""
    T, D = x_TD.shape
    F2 = gate_up_E2FD.shape[1]
    Fh = F2 // 2
    k = weights_Tk.shape[1]
    M = slots_M.numel()
    w_flat = weights_Tk.reshape(-1).to(torch.float32).contiguous()
    d_pre_M2F = torch.empty(M, F2, device=x_TD.device, dtype=x_TD.dtype)
    part = torch.zeros(M, -(-Fh // MIN_BLOCK_N), device=x_TD.device, dtype=torch.float32)
    launch_gemm(dout_TD, down_EDF.transpose(1, 2), offs_E, d_pre_M2F, row_map=slots_M, a_div=k, gather_a=True,
                scale=w_flat, epilogue=SWIGLU_BWD, pre=pre_M2F, part=part)
    d_flat = torch.empty(M, device=x_TD.device, dtype=torch.float32)
    d_flat[slots_M] = part.sum(1)
    d_weights = d_flat.view(T, k).to(weights_Tk.dtype)
    dx_MD = torch.empty(M, D, device=x_TD.device, dtype=x_TD.dtype)
    launch_gemm(d_pre_M2F, gate_up_E2FD.transpose(1, 2), offs_E, dx_MD, row_map=slots_M, scatter_c=True)
    dx_TD = dx_MD.view(T, k, D).sum(1) if k > 1 else dx_MD.view(T, D)
    d_down = torch.empty(down_EDF.shape, device=down_EDF.device, dtype=down_EDF.dtype)
    launch_wgrad(dout_TD, pre_M2F, d_down, offs_E, row_map=slots_M, a_div=k, gather_a=True, scale_a=w_flat,
                 swiglu_b=True)
    d_gate_up = torch.empty(gate_up_E2FD.shape, device=gate_up_E2FD.device, dtype=gate_up_E2FD.dtype)
    launch_wgrad(d_pre_M2F, x_TD, d_gate_up, offs_E, row_map=slots_M, b_div=k, gather_b=True)
    return dx_TD, d_gate_up, d_down, d_weights
