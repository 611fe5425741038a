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
    w_Tk, idx_Tk = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        w_Tk = w_Tk / w_Tk.sum(dim=-1, keepdim=True)
    return w_Tk, idx_Tk


def grouped_mm(x_MK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of x times ``w[e]^T``; rows past ``offs[-1]`` give zeros."""
    y_MN = x_MK.new_zeros(x_MK.shape[0], w_ENK.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            y_MN[start:end] = x_MK[start:end] @ w_ENK[e].T
        start = end
    return y_MN


def expert_mlp(x_MD: torch.Tensor, gate_up_2FD: torch.Tensor, down_DF: torch.Tensor) -> torch.Tensor:
    """One SwiGLU expert: ``down @ (silu(gate @ x) * (up @ x))``, gate rows first in gate_up."""
    gate_MF, up_MF = (x_MD @ gate_up_2FD.T).chunk(2, dim=-1)
    return (F.silu(gate_MF) * up_MF) @ down_DF.T


def moe_mlp(x_TD, gate_up_proj_E2FD, down_proj_EDF, weights_Tk, experts_Tk) -> torch.Tensor:
    """Mixture of SwiGLU experts: ``y[t] = sum_s weights[t,s] * expert_{experts[t,s]}(x[t])``."""
    y_TD = torch.zeros_like(x_TD)
    w_Tk = weights_Tk.to(x_TD.dtype)
    for e in range(gate_up_proj_E2FD.shape[0]):
        tok, slot = torch.nonzero(experts_Tk == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        out = expert_mlp(x_TD[tok], gate_up_proj_E2FD[e], down_proj_EDF[e])
        y_TD = y_TD.index_add(0, tok, out * w_Tk[tok, slot, None])
    return y_TD


def moa_attention(q_BTEHD, k, v, mix_BTE, causal: bool = True, scale: float | None = None, kv_lens_B=None,
                  kv_start_B=None):
    """Soft mixture of attention: ``o[b,t,e,h] = mix[b,t,e] * softmax(q k^T * scale + mask) v``.

    k, v [B,S,Hkv,Dh] (shared by the experts) or [B,S,E,Hkv,Dh] (one set per expert); head h reads
    KV head ``h // (H // Hkv)``. Query t sees key s iff kv_start[b] <= s < kv_lens[b] and, when
    causal, s <= t + kv_lens[b] - T (kv_lens defaults to S, kv_start, the first valid key of a
    left-padded row, to 0). A query that sees no key gets zeros.
    """
    B, T, E, H, Dh = q_BTEHD.shape
    S, Hkv = k.shape[1], k.shape[-2]
    kv_len_B = torch.full((B,), S) if kv_lens_B is None else kv_lens_B.cpu().clamp(0, S)
    kv_start_B = (torch.zeros(B, dtype=torch.int64) if kv_start_B is None
                  else torch.minimum(kv_start_B.cpu().to(torch.int64).clamp_min(0), kv_len_B))
    keys_S, queries_T = torch.arange(S), torch.arange(T)
    in_row_BS = (keys_S[None, :] >= kv_start_B[:, None]) & (keys_S[None, :] < kv_len_B[:, None])
    # Keys outside [kv_start, kv_lens) may hold anything (NaN, inf: a preallocated cache, padding). A
    # mask alone would still multiply their zero probabilities by them, so they are zeroed, and their
    # gradient is exactly 0.
    valid_BS = in_row_BS.to(k.device).view(B, S, *[1] * (k.dim() - 2))
    k, v = torch.where(valid_BS, k, 0), torch.where(valid_BS, v, 0)
    if k.dim() == 4:
        k, v = k[:, :, None].expand(B, S, E, Hkv, Dh), v[:, :, None].expand(B, S, E, Hkv, Dh)
    k_BSEHD = k.repeat_interleave(H // Hkv, dim=3)
    v_BSEHD = v.repeat_interleave(H // Hkv, dim=3)
    scale = Dh ** -0.5 if scale is None else scale
    scores_BEHTS = torch.einsum("btehd,bsehd->behts", q_BTEHD, k_BSEHD) * scale
    visible_BTS = in_row_BS[:, None, :]
    if causal:
        last_BT1 = queries_T[None, :, None] + (kv_len_B - T)[:, None, None]  # the last key each query sees
        visible_BTS = visible_BTS & (keys_S[None, None, :] <= last_BT1)
    visible_BTS = visible_BTS.expand(B, T, S)
    any_BT = visible_BTS.any(-1)
    # A query without keys takes a softmax over all of them (finite, so its backward is too), then 0.
    visible_BTS = (visible_BTS | ~any_BT[..., None]).to(q_BTEHD.device)
    p_BEHTS = torch.softmax(scores_BEHTS.masked_fill(~visible_BTS[:, None, None], float("-inf")), dim=-1)
    o_BTEHD = torch.einsum("behts,bsehd->btehd", p_BEHTS, v_BSEHD)
    keep_BTE = mix_BTE.to(o_BTEHD.dtype) * any_BT.to(device=q_BTEHD.device, dtype=o_BTEHD.dtype)[..., None]
    return o_BTEHD * keep_BTE[..., None, None]
