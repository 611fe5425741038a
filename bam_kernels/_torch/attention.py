"""The CPU (torch) path of ``moa_attention``: SDPA over the experts' stacked query heads, then
the mix. Plain differentiable torch ops, so autograd and torch.compile see through it."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def stacked_heads(q, k, v):
    """Stack the experts' query heads so that SDPA's GQA mapping (query head i reads KV head
    i // (Hq / Hkv)) is the MoA one: order (Hkv, E, R) with shared KV, (E, Hkv, R) with expert KV."""
    B, T, E, H, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[-2]
    q6 = q.reshape(B, T, E, Hkv, H // Hkv, Dh)
    if k.dim() == 5:
        q_BHqTD = q6.permute(0, 2, 3, 4, 1, 5).reshape(B, E * H, T, Dh)
        k_BGSD = k.permute(0, 2, 3, 1, 4).reshape(B, E * Hkv, S, Dh)
        v_BGSD = v.permute(0, 2, 3, 1, 4).reshape(B, E * Hkv, S, Dh)
    else:
        q_BHqTD = q6.permute(0, 3, 2, 4, 1, 5).reshape(B, E * H, T, Dh)
        k_BGSD, v_BGSD = k.transpose(1, 2), v.transpose(1, 2)
    return q_BHqTD, k_BGSD, v_BGSD


def unstack_heads(o_BHqTD, q_shape, Hkv: int, expert_kv: bool):
    B, T, E, H, Dh = q_shape
    if expert_kv:
        return o_BHqTD.view(B, E, Hkv, H // Hkv, T, Dh).permute(0, 4, 1, 2, 3, 5).reshape(B, T, E, H, Dh)
    return o_BHqTD.view(B, Hkv, E, H // Hkv, T, Dh).permute(0, 4, 2, 1, 3, 5).reshape(B, T, E, H, Dh)


def forward(q, k, v, mix, causal, scale, kv_lens, kv_start=None):
    """The torch path. Keys past kv_lens or below kv_start (left padding) may hold anything (a
    preallocated cache: NaN, inf), and a mask alone would still multiply their zero probabilities
    by them. On the CPU, where reading the lengths costs no sync, each run of rows of one
    (kv_start, length) attends over its valid keys only: views, so nothing outside them is read or
    copied, and a ragged batch takes the no-mask paths (decoding 4 rows of 300 to 1024 keys:
    0.55-0.6x the time of one masked call over the cache, measured on 2 shared cores). The causal
    alignment (the last query with the last valid key) is that of the view, so no mask is needed
    for kv_start either. On CUDA those keys are zeroed (a select: no host sync), then masked."""
    if kv_lens is None and kv_start is None:
        return _sdpa(q, k, v, mix, causal, scale, None)
    S = k.shape[1]
    kv_len_B = (torch.full((q.shape[0],), S, device=q.device) if kv_lens is None
                else kv_lens.to(device=q.device, dtype=torch.int64).clamp(0, S))
    kv_start_B = (torch.zeros_like(kv_len_B) if kv_start is None
                  else torch.minimum(kv_start.to(device=q.device, dtype=torch.int64).clamp_min(0), kv_len_B))
    if q.is_cuda or q.shape[0] == 0:
        keys_S = torch.arange(S, device=k.device)
        valid_BS = (keys_S >= kv_start_B[:, None]) & (keys_S < kv_len_B[:, None])
        valid = valid_BS.view(*valid_BS.shape, *[1] * (k.dim() - 2))
        return _sdpa(q, torch.where(valid, k, 0), torch.where(valid, v, 0), mix, causal, scale, kv_len_B,
                     kv_start_B)
    spans = list(zip(kv_start_B.tolist(), kv_len_B.tolist()))
    runs = [(span, len(list(rows))) for span, rows in itertools.groupby(spans)]
    sizes = [size for _, size in runs]
    # split, not slices: its backward concatenates the runs' gradients (a slice's would
    # materialise a gradient of the whole input per run).
    chunks = zip(q.split(sizes), k.split(sizes), v.split(sizes), mix.split(sizes))
    return torch.cat([_sdpa(q_r, k_r[:, s:n], v_r[:, s:n], mix_r, causal, scale, None)
                      for ((s, n), _), (q_r, k_r, v_r, mix_r) in zip(runs, chunks)])


def _sdpa(q, k, v, mix, causal, scale, kv_len_B, kv_start_B=None):
    """SDPA over the stacked heads, then the mix; kv_len_B [B] int64 (optional) masks the keys
    past each row's length, kv_start_B [B] int64 (optional, with kv_len_B) those below each row's
    first valid key; the masked keys must hold finite values. When every query of a row sees the
    same keys (decoding one token, or no causal mask) the query heads that share a KV head are
    packed into the rows of one attention over that KV head: one matrix product instead of
    E*H/Hkv matvecs."""
    B, T, E, H, Dh = q.shape
    S = k.shape[1]
    q_BHqTD, k_BGSD, v_BGSD = stacked_heads(q, k, v)
    mix_BTE = mix.to(q.dtype)
    mask_B1TS = None
    # One query per row with every key valid sees them all, causal or not: no mask to build.
    if kv_len_B is not None or (causal and S != T and not (T == 1 and S > 0)):
        keys_S = torch.arange(S, device=q.device)
        kv_len_B = torch.full((B,), S, device=q.device) if kv_len_B is None else kv_len_B
        visible_BTS = keys_S[None, None, :] < kv_len_B[:, None, None]
        if kv_start_B is not None:
            visible_BTS = visible_BTS & (keys_S[None, None, :] >= kv_start_B[:, None, None])
        if causal:
            queries_T = torch.arange(T, device=q.device)
            # the last key each query sees
            last_BT1 = queries_T[None, :, None] + (kv_len_B - T)[:, None, None]
            visible_BTS = visible_BTS & (keys_S[None, None, :] <= last_BT1)
        visible_BTS = visible_BTS.expand(B, T, S)
        any_BT = visible_BTS.any(-1)
        # A query without keys attends to all of them (finite) and its output is zeroed through the mix.
        mask_B1TS = (visible_BTS | ~any_BT[..., None])[:, None]
        mix_BTE = mix_BTE * any_BT[..., None].to(q.dtype)
    if not causal or T == 1:
        G = k_BGSD.shape[1]
        mask = None if mask_B1TS is None else mask_B1TS[:, :, :1]
        o_BGMD = F.scaled_dot_product_attention(q_BHqTD.reshape(B, G, -1, Dh), k_BGSD, v_BGSD, attn_mask=mask,
                                                scale=scale)
        o_BHqTD = o_BGMD.reshape(q_BHqTD.shape)
    else:
        o_BHqTD = F.scaled_dot_product_attention(q_BHqTD, k_BGSD, v_BGSD, attn_mask=mask_B1TS,
                                                is_causal=mask_B1TS is None, scale=scale, enable_gqa=True)
    o_BTEHD = unstack_heads(o_BHqTD, q.shape, k.shape[-2], k.dim() == 5)
    return o_BTEHD * mix_BTE[..., None, None]
