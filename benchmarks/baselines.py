"""The plain formulations users write before they reach for a kernel library: the "einsum"
baselines of the pytest-benchmark suite, in the inputs' own dtype (no float64, no loops).

MoE: every expert on every token through ``torch.einsum``, then the dense routing mask (E/k times
the FLOPs of a sparse layer: what the kernels save). MoA: einsum scores, the causal mask, softmax,
einsum with the values, then the mix. Checked against ``bam_kernels.reference`` in
tests/bench/test_bench_baselines.py. Shapes as in bam_kernels (T tokens, D model dim, F expert hidden,
E experts, K top-k slots, B batch, S keys, H query heads, G KV heads, R = H // G, Dh head dim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def route_topk(logits_TE, k: int, normalize: bool = False):
    """Softmax in float32, top-k, renormalised over the k with ``normalize``: w [T, K], idx [T, K].
    Nothing here to contract: this is also what ``reference.route_topk`` computes."""
    w_TK, idx_TK = torch.softmax(logits_TE.float(), -1).topk(k, -1)
    if normalize:
        w_TK = w_TK / w_TK.sum(-1, keepdim=True)
    return w_TK, idx_TK


def grouped_mm(x_MK, w_ENK, offs_E):
    """Every expert's weight on every row, then each row keeps its own expert's product (rows past
    ``offs[-1]`` keep none): [M, K] x [E, N, K] -> [M, N]."""
    M, E = x_MK.shape[0], w_ENK.shape[0]
    rows_M = torch.arange(M, device=x_MK.device)
    # Row m belongs to the first expert whose cumulative end is past m; E (no expert) past the last.
    expert_M = torch.searchsorted(offs_E.to(torch.int64), rows_M, right=True)
    mask_ME = F.one_hot(expert_M, E + 1)[:, :E].to(x_MK.dtype)
    return torch.einsum("men,me->mn", torch.einsum("mk,enk->men", x_MK, w_ENK), mask_ME)


def moe_mlp(x_TD, gate_up_E2FD, down_EDF, w_TK, idx_TK):
    """Every SwiGLU expert on every token, weighted by the dense routing mask and summed over the
    experts: x [T, D], gate_up [E, 2F, D] (gate rows first), down [E, D, F] -> [T, D]."""
    gate_TEF, up_TEF = torch.einsum("td,efd->tef", x_TD, gate_up_E2FD).chunk(2, -1)
    y_TED = torch.einsum("tef,edf->ted", F.silu(gate_TEF) * up_TEF, down_EDF)
    mask_TE = torch.zeros(idx_TK.shape[0], gate_up_E2FD.shape[0], device=w_TK.device, dtype=w_TK.dtype)
    mask_TE = mask_TE.scatter_add(1, idx_TK, w_TK)
    return torch.einsum("ted,te->td", y_TED, mask_TE.to(y_TED.dtype))


def moa_attention(q_BTEHD, k, v, mix_BTE, causal: bool = True):
    """Soft mixture of attention: ``mix[b,t,e] * softmax(q k^T / sqrt(Dh) + mask) v`` per expert e.

    k, v [B, S, G, Dh] shared by the experts or [B, S, E, G, Dh] one set per expert; query head h
    reads KV head ``h // R``, so the H query heads split as (G, R). Causal aligns the last query with
    the last key (query t sees keys s <= t + S - T); needs T <= S.
    """
    B, T, E, H, Dh = q_BTEHD.shape
    S, G = k.shape[1], k.shape[-2]
    q_BTEGRD = q_BTEHD.reshape(B, T, E, G, H // G, Dh)
    kv = "bsgd" if k.dim() == 4 else "bsegd"
    scores = torch.einsum(f"btegrd,{kv}->begrts", q_BTEGRD, k) * Dh ** -0.5
    if causal:
        visible_TS = torch.ones(T, S, dtype=torch.bool, device=q_BTEHD.device).tril(S - T)
        scores = scores.masked_fill(~visible_TS, float("-inf"))
    o_BTEGRD = torch.einsum(f"begrts,{kv}->btegrd", torch.softmax(scores, -1), v)
    return o_BTEGRD.reshape(B, T, E, H, Dh) * mix_BTE.to(q_BTEHD.dtype)[..., None, None]
