"""Plain-PyTorch definitions of every op: the ground truth the fast paths are checked against.

They compute in the dtype they are given (the tests give float64) and are written for clarity,
not speed: one loop over experts, no fusion.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route_topk(logits_TE: torch.Tensor, k: int, normalize: bool = False):
    """Softmax over all experts, keep the k largest; with ``normalize`` rescale them to sum to 1.

    Returns weights [T, k] (float32 or wider) and expert ids [T, k] int64, largest first.
    """
    probs_TE = torch.softmax(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1)
    w_TK, idx_TK = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return w_TK, idx_TK


def grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of x times ``w[e]^T``; rows past ``offs[-1]`` give zeros."""
    y_MN = x_MK.new_zeros(x_MK.shape[0], w_ENK.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            y_MN[start:end] = x_MK[start:end] @ w_ENK[e].T
        start = end
    return y_MN


def expert_mlp(x_ND: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: ``down @ (silu(gate @ x) * (up @ x))``, gate rows first in gate_up."""
    gate_NF, up_NF = (x_ND @ gate_up_2FD.T).chunk(2, dim=-1)
    return (F.silu(gate_NF) * up_NF) @ down_DF.T


def moe_mlp(x_TD, gate_up_proj_E2FD, down_proj_EDF, weights_TK, experts_TK) -> torch.Tensor:
    """Mixture of SwiGLU experts: ``y[t] = sum_s weights[t,s] * expert_{experts[t,s]}(x[t])``."""
    y_TD = torch.zeros_like(x_TD)
    w_TK = weights_TK.to(x_TD.dtype)
    for e in range(gate_up_proj_E2FD.shape[0]):
        tok, slot = torch.nonzero(experts_TK == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        out = expert_mlp(x_TD[tok], gate_up_proj_E2FD[e], down_proj_EDF[e])
        y_TD = y_TD.index_add(0, tok, out * w_TK[tok, slot, None])
    return y_TD
