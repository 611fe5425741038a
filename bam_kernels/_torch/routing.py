"""The CPU (torch) path of ``route_topk``: softmax, top-k and the hand-written backward."""
from __future__ import annotations

import torch


def forward(logits_TE, k, normalize):
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    w_Tk, idx_Tk = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        w_Tk = w_Tk / w_Tk.sum(dim=-1, keepdim=True)
    return w_Tk, idx_Tk


def backward(logits_TE, w_Tk, idx_Tk, dw_Tk, normalize):
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    dw_Tk = dw_Tk.to(torch.float32)
    if normalize:
        # w_s = p_s / S with S the kept mass, so dL/dp_s = (dw_s - sum_r dw_r w_r) / S.
        kept_T1 = probs_TE.gather(1, idx_Tk).sum(1, keepdim=True)
        dw_Tk = (dw_Tk - (dw_Tk * w_Tk).sum(1, keepdim=True)) / kept_T1
    g_TE = torch.zeros_like(probs_TE).scatter_(1, idx_Tk, dw_Tk)
    return (probs_TE * (g_TE - (probs_TE * g_TE).sum(1, keepdim=True))).to(logits_TE.dtype)
