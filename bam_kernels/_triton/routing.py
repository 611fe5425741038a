"""Fused softmax + top-k routing, forward and backward, one row block per program."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

FP32_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _softmax_rows(logits_ptr, T, E, stride_t, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Softmax in fp32 over the E logits of this program's BLOCK_T rows. The logits are not
    checked here (on a GPU that would cost a host sync), so a non-finite row still gives finite
    probabilities: NaN reads as -inf, then every logit is clamped to the finite fp32 range, so
    +inf logits share the row and a row of -inf is uniform."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols[None, :] < E)
    x = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :], mask=mask,
                other=-float("inf")).to(tl.float32)
    x = tl.where(x == x, x, -float("inf"))
    x = tl.minimum(tl.maximum(x, -FP32_MAX), FP32_MAX)
    x = tl.where(row_ok[:, None], x, 0.0)  # rows past T: finite values, never stored
    x = x - tl.max(x, axis=1)[:, None]
    num = tl.where(cols[None, :] < E, tl.exp(x), 0.0)
    p = num / tl.sum(num, axis=1)[:, None]
    return rows, cols, row_ok, mask, p


@triton.jit
def _route_topk_fwd(
    logits_ptr, w_ptr, idx_ptr,  # pointers
    T, E,  # sizes
    stride_t,  # strides
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,  # meta
    BLOCK_K: tl.constexpr,
):
    """One program routes BLOCK_T tokens: softmax over their E logits, then the TOP_K largest
    (weights and expert ids), optionally renormalised."""
    rows, cols, row_ok, mask, p = _softmax_rows(logits_ptr, T, E, stride_t, BLOCK_T, BLOCK_E)
    # Taken experts are marked -1 so a later pass cannot pick them again (p >= 0 otherwise).
    live = tl.where(mask, p, -1.0)
    slots = tl.arange(0, BLOCK_K)
    w = tl.zeros((BLOCK_T, BLOCK_K), tl.float32)
    idx = tl.zeros((BLOCK_T, BLOCK_K), tl.int32)
    for s in tl.static_range(TOP_K):
        best = tl.max(live, axis=1)
        # Lowest index among equal maxima, as a stable top-k would choose.
        arg = tl.min(tl.where(live == best[:, None], cols[None, :], BLOCK_E), axis=1)
        w = tl.where(slots[None, :] == s, best[:, None], w)
        idx = tl.where(slots[None, :] == s, arg[:, None], idx)
        live = tl.where(cols[None, :] == arg[:, None], -2.0, live)
    if NORMALIZE:
        w = w / tl.sum(w, axis=1)[:, None]
    out = rows.to(tl.int64)[:, None] * TOP_K + slots[None, :]
    out_mask = row_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(w_ptr + out, w, mask=out_mask)
    tl.store(idx_ptr + out, idx.to(tl.int64), mask=out_mask)


@triton.jit
def _route_topk_bwd(
    logits_ptr, w_ptr, idx_ptr, dw_ptr, dlogits_ptr,  # pointers
    T, E,  # sizes
    stride_t, stride_dt,  # strides
    TOP_K: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,  # meta
):
    """One program computes d(logits) of BLOCK_T tokens from d(weights) of their TOP_K slots,
    recomputing the softmax."""
    rows, cols, row_ok, mask, p = _softmax_rows(logits_ptr, T, E, stride_t, BLOCK_T, BLOCK_E)
    out = rows.to(tl.int64) * TOP_K
    # With renormalisation w_s = p_s / S, so dL/dp_s = (dw_s - sum_r dw_r w_r) / S.
    shift = tl.zeros((BLOCK_T,), tl.float32)
    total = tl.zeros((BLOCK_T,), tl.float32)
    if NORMALIZE:
        for s in tl.static_range(TOP_K):
            idx = tl.load(idx_ptr + out + s, mask=row_ok, other=0)
            dw = tl.load(dw_ptr + out + s, mask=row_ok, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + out + s, mask=row_ok, other=0.0)
            shift += dw * w
            total += tl.sum(tl.where(cols[None, :] == idx[:, None], p, 0.0), axis=1)
    g = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
    for s in tl.static_range(TOP_K):
        idx = tl.load(idx_ptr + out + s, mask=row_ok, other=0)
        dw = tl.load(dw_ptr + out + s, mask=row_ok, other=0.0).to(tl.float32)
        if NORMALIZE:
            dw = (dw - shift) / total
        g += tl.where(cols[None, :] == idx[:, None], dw[:, None], 0.0)
    dx = p * (g - tl.sum(p * g, axis=1)[:, None])
    tl.store(dlogits_ptr + rows.to(tl.int64)[:, None] * stride_dt + cols[None, :],
             dx.to(dlogits_ptr.dtype.element_ty), mask=mask)


def _blocks(E: int):
    block_e = triton.next_power_of_2(E)
    block_t = max(1, min(64, 2048 // block_e))  # <= 16 values per thread per tile at 4 warps
    return block_t, block_e


def forward(logits_TE: torch.Tensor, k: int, normalize: bool):
    T, E = logits_TE.shape
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    w_Tk = torch.empty(T, k, device=logits_TE.device, dtype=torch.float32)
    idx_Tk = torch.empty(T, k, device=logits_TE.device, dtype=torch.int64)
    block_t, block_e = _blocks(E)
    if T > 0:
        _route_topk_fwd[(triton.cdiv(T, block_t),)](
            logits_ptr=logits_TE, w_ptr=w_Tk, idx_ptr=idx_Tk, T=T, E=E, stride_t=logits_TE.stride(0),
            TOP_K=k, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(k))
    return w_Tk, idx_Tk


def backward(logits_TE, w_Tk, idx_Tk, dw_Tk, normalize: bool):
    T, E = logits_TE.shape
    k = idx_Tk.shape[1]
    logits_TE = logits_TE if logits_TE.stride(1) == 1 else logits_TE.contiguous()
    dlogits_TE = torch.empty_like(logits_TE)
    block_t, block_e = _blocks(E)
    if T > 0:
        _route_topk_bwd[(triton.cdiv(T, block_t),)](
            logits_ptr=logits_TE, w_ptr=w_Tk, idx_ptr=idx_Tk, dw_ptr=dw_Tk.contiguous(),
            dlogits_ptr=dlogits_TE,
            T=T, E=E, stride_t=logits_TE.stride(0), stride_dt=dlogits_TE.stride(0),
            TOP_K=k, NORMALIZE=normalize, BLOCK_T=block_t, BLOCK_E=block_e)
    return dlogits_TE
