"""The ops bam's layers compute with: top-k routing, the experts' SwiGLU, attention and the soft mixture
of attention. Each runs on bam_kernels (fused; Triton on a GPU) and, where bam_kernels cannot be
imported, on plain PyTorch with the same numbers.

bam_kernels ships with bam_model, so in the package the plain-PyTorch paths of ``route_topk`` and
``moe_mlp`` never run: they are there for the Hugging Face code of a model folder, which this module
is copied into (``bam_model/remote/generate.py``) and which runs where only torch and transformers
are installed. ``attend`` (and ``moa_attention`` under a mask that is not left padding) is PyTorch's
scaled-dot-product attention everywhere.
"""
from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn.functional as F

try:  # part of bam-moe; absent where only a model folder's remote code runs
    import bam_kernels as _bk
except ImportError:
    _bk = None

_WARNED = []
# bam_kernels releases before left padding (kv_start) run such batches on PyTorch's attention.
_TAKES_KV_START = _bk is not None and "kv_start" in inspect.signature(_bk.moa_attention).parameters


def kernels():
    """bam_kernels, or None (with a warning, once per process) where it is not installed."""
    if _bk is None and not _WARNED:
        _WARNED.append(True)
        warnings.warn("bam_kernels is not installed: this BAM model runs on plain PyTorch (same numbers, "
                      "slower); `pip install bam-moe` makes it fast", stacklevel=3)
    return _bk


def route_topk(logits_TE: torch.Tensor, top_k: int, normalize: bool):
    """Softmax over the experts, keep the ``top_k`` largest (weights [T, k] in float32 or wider,
    expert ids [T, k]); ``normalize`` rescales the kept weights to sum to 1."""
    bk = kernels()
    if bk is not None:
        return bk.route_topk(logits_TE, top_k, normalize=normalize)
    probs_TE = torch.softmax(logits_TE.to(torch.promote_types(logits_TE.dtype, torch.float32)), dim=-1)
    weights_Tk, experts_Tk = probs_TE.topk(top_k, dim=-1)
    if normalize:
        weights_Tk = weights_Tk / weights_Tk.sum(dim=-1, keepdim=True)
    return weights_Tk, experts_Tk


def moe_mlp(x_TD: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, weights_Tk: torch.Tensor,
            experts_Tk: torch.Tensor) -> torch.Tensor:
    """``y[t] = sum_s weights[t, s] * down[e] @ (silu(gate[e] @ x[t]) * up[e] @ x[t])``, e = experts[t, s]:
    x [T, D], gate_up_proj [E, 2F, D] (gate rows first), down_proj [E, D, F]."""
    bk = kernels()
    if bk is not None:
        return bk.moe_mlp(x_TD, gate_up_proj, down_proj, weights_Tk, experts_Tk)
    y_TD = torch.zeros_like(x_TD)
    for e in experts_Tk.unique().tolist():
        tokens, slots = (experts_Tk == e).nonzero(as_tuple=True)
        gate, up = F.linear(x_TD[tokens], gate_up_proj[e]).chunk(2, dim=-1)
        out = F.linear(F.silu(gate) * up, down_proj[e]) * weights_Tk[tokens, slots, None].to(x_TD.dtype)
        y_TD = y_TD.index_add(0, tokens, out)
    return y_TD


def attend(q_BTHqDh: torch.Tensor, k_BSGDh: torch.Tensor, v_BSGDh: torch.Tensor,
           mask: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` on PyTorch (scale: ``1/sqrt(Dh)`` when None): q [B, T, Hq, Dh],
    k and v [B, S, G, Dh] (query head i reads key head ``i // (Hq / G)``). ``mask`` [B, 1, T, S] (True:
    attend) or None: causal over every key, the last query aligned with the last key. Returns
    [B, T, Hq, Dh]."""
    T, S = q_BTHqDh.shape[1], k_BSGDh.shape[1]
    causal = mask is None and T == S and T > 1
    if mask is None and T != S and T > 1:
        mask = (torch.arange(S, device=q_BTHqDh.device)[None, :]
                <= torch.arange(T, device=q_BTHqDh.device)[:, None] + (S - T))
    o_BHqTDh = F.scaled_dot_product_attention(
        q_BTHqDh.transpose(1, 2), k_BSGDh.transpose(1, 2), v_BSGDh.transpose(1, 2), attn_mask=mask,
        is_causal=causal, scale=scale, enable_gqa=q_BTHqDh.shape[2] != k_BSGDh.shape[2])
    return o_BHqTDh.transpose(1, 2)


def moa_attention(q_BTEHDh: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix_BTE: torch.Tensor,
                  mask: torch.Tensor | None = None, kv_start: torch.Tensor | None = None,
                  scale: float | None = None) -> torch.Tensor:
    """Every expert's heads attend causally, each output scaled by its router weight: q [B, T, E, H, Dh];
    k, v [B, S, Hkv, Dh] (shared KV) or [B, S, E, Hkv, Dh] (expert KV); mix [B, T, E]. Returns
    [B, T, E, H, Dh] in q's dtype. A left-padded batch gives each row's first real key as ``kv_start``
    [B] (int32) and its ``mask`` ([B, 1, T, S], as ``attend`` takes it); bam_kernels takes the first,
    PyTorch's attention the second, and any other mask (``kv_start`` None) runs on PyTorch's. ``scale``:
    the softmax scale (``1/sqrt(Dh)`` when None)."""
    bk = kernels()
    if bk is not None and (mask is None or (kv_start is not None and _TAKES_KV_START)):
        padded = {} if kv_start is None else {"kv_start": kv_start}
        return bk.moa_attention(q_BTEHDh, k, v, mix_BTE, causal=True, scale=scale, **padded)
    B, T, E, H, Dh = q_BTEHDh.shape
    S, Hkv = k.shape[1], k.shape[-2]
    if k.dim() == 4:  # shared KV: every expert reads the same Hkv heads
        k, v = (t[:, :, None].expand(B, S, E, Hkv, Dh) for t in (k, v))
    o_BTHqDh = attend(q_BTEHDh.reshape(B, T, E * H, Dh), k.reshape(B, S, E * Hkv, Dh),
                      v.reshape(B, S, E * Hkv, Dh), mask, scale)
    return (o_BTHqDh.view(B, T, E, H, Dh) * mix_BTE[..., None, None]).to(q_BTEHDh.dtype)
