"""Soft mixture-of-attention: flash-attention forward and backward over stacked expert heads.

Every query head (expert e, head h) reads one KV head. Programs work on one KV head g of one batch
row and pack into their rows every (token t, query head) pair that reads g: with shared KV the
E * H/Hkv heads (e, g*R + r), with expert KV the R = H/Hkv heads (g // Hkv, (g % Hkv)*R + r). A key
tile is thus loaded once for all the heads that read it, which is what makes decoding against a
shared cache cheap. Packed row m is token ``m // Gq`` and head slot ``m % Gq``.

Kernels:
* ``_fwd``: online softmax over key tiles (fp32 accumulators, exp2), unmasked tiles first, then the
  tiles that need the causal or ``kv_lens`` mask. The epilogue scales by ``mix[b, t, e]`` and, when
  a backward follows, also keeps the unmixed output and the log2-domain log-sum-exp. With SPLIT it
  handles one chunk of the keys and writes fp32 partials that ``_combine`` merges (decoding:
  a few queries against a long cache still fill the GPU).
* ``_bwd_pre``: ``Dp = rowsum(dO * O_unmixed)``; d(mix) is its sum over heads.
* ``_bwd_dkdv``: one program per key tile; loops over every packed row, so the sum over the query
  heads that share a KV head needs no atomics. ``_bwd_dq``: one program per row tile. Both are
  deterministic; neither holds a T x S matrix.

Causal masking is aligned bottom-right: query t sees key s iff s < kv_len and s <= t + kv_len - T.
A query that sees no key outputs zeros (its saved log-sum-exp is +inf so that backward gives it P = 0).
Offsets that scale with the tensor sizes are computed in int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._dispatch import interpreting

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# Allocator of every kernel output; the tests swap in one that fills with NaN, so that an element a
# kernel fails to write shows up.
empty = torch.empty


@triton.jit
def _kv_len(kvlen_ptr, b, S, HAS_KVLEN: tl.constexpr):
    if HAS_KVLEN:
        n = tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), S)
    else:
        n = S
    return n


@triton.jit
def _rows(m0, g, Gq, R, Hkv, BLOCK_M: tl.constexpr):
    """Packed rows m0.. of KV head g -> (rows, token t, expert e, head h)."""
    rows = m0 + tl.arange(0, BLOCK_M)
    t = rows // Gq
    r = rows % Gq
    e = r // R + g // Hkv
    h = (g % Hkv) * R + r % R
    return rows, t, e, h


@triton.jit
def _row_index(b64, t, e, h, T, E, H):
    """Flat index of (b, t, e, h) in a contiguous [B, T, E, H] tensor, int64."""
    return ((b64 * T + t.to(tl.int64)) * E + e.to(tl.int64)) * H + h.to(tl.int64)


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, s_lo, s_hi, kv_len, t, shift, stride_ks, stride_vs,
               qk_scale, offs_d, d_ok, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    for s0 in range(s_lo, s_hi, BLOCK_N):
        keys = s0 + tl.arange(0, BLOCK_N)
        keys64 = keys.to(tl.int64)
        if MASKED:
            k_ok = keys < kv_len
            kT = tl.load(k_base + keys64[None, :] * stride_ks + offs_d[:, None],
                         mask=d_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            kT = tl.load(k_base + keys64[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        if MASKED:
            visible = k_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= t[:, None] + shift)
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_base + keys64[:, None] * stride_vs + offs_d[None, :],
                        mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + keys64[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _store_out(o_ptr, ou_ptr, lse_ptr, mix_ptr, out_u, lse, b64, t, e, h, row_ok, offs_d, d_ok,
               T, E, H, stride_mb, stride_mt, stride_me, HEAD_DIM: tl.constexpr, SAVE: tl.constexpr):
    idx = _row_index(b64, t, e, h, T, E, H)
    mix = tl.load(mix_ptr + b64 * stride_mb + t.to(tl.int64) * stride_mt + e.to(tl.int64) * stride_me,
                  mask=row_ok, other=0.0).to(tl.float32)
    ptrs = idx[:, None] * HEAD_DIM + offs_d[None, :]
    mask = row_ok[:, None] & d_ok[None, :]
    tl.store(o_ptr + ptrs, (out_u * mix[:, None]).to(o_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(ou_ptr + ptrs, out_u.to(ou_ptr.dtype.element_ty), mask=mask)
        tl.store(lse_ptr + idx, lse, mask=row_ok)


@triton.jit
def _fwd(
    q_ptr, k_ptr, v_ptr, mix_ptr, kvlen_ptr, o_ptr, ou_ptr, lse_ptr, wso_ptr, wsl_ptr,
    B, T, S, E, H, Hkv, G, Gq, R, chunk, qk_scale,
    stride_qb, stride_qt, stride_qe, stride_qh, stride_kb, stride_ks, stride_ke, stride_kh,
    stride_vb, stride_vs, stride_ve, stride_vh, stride_mb, stride_mt, stride_me,
    T_KEY, S_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, SPLIT: tl.constexpr,
    SAVE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One flat grid (CUDA caps the 2nd and 3rd grid dimensions at 65535): row tiles vary fastest,
    # so the programs that read one KV head run together and share it in L2.
    M_total = T * Gq
    n_m = tl.cdiv(M_total, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    pid_bg = (pid // n_m) % (B * G)
    split = pid // (n_m * B * G)
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    m0 = pid_m * BLOCK_M
    rows, t, e, h = _rows(m0, g, Gq, R, Hkv, BLOCK_M)
    row_ok = rows < M_total
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KVLEN)
    shift = kv_len - T

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = b64 * stride_qb + t.to(tl.int64) * stride_qt + e.to(tl.int64) * stride_qe + h.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + b64 * stride_kb + (g // Hkv).to(tl.int64) * stride_ke + (g % Hkv).to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + (g // Hkv).to(tl.int64) * stride_ve + (g % Hkv).to(tl.int64) * stride_vh

    # Keys [lo, full) are visible to every row of the tile; [full, hi) need the mask.
    lo = 0
    hi = kv_len
    full = kv_len
    if CAUSAL:
        t_first = m0 // Gq
        t_last = tl.minimum((m0 + BLOCK_M - 1) // Gq, T - 1)
        hi = tl.minimum(hi, t_last + shift + 1)
        full = tl.minimum(hi, t_first + shift + 1)
    if SPLIT:
        lo = split * chunk
        hi = tl.minimum(hi, lo + chunk)
        full = tl.minimum(full, hi)
    full = tl.maximum(full, lo)
    mid = lo + (full - lo) // BLOCK_N * BLOCK_N

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, lo, mid, kv_len, t, shift, stride_ks,
                               stride_vs, qk_scale, offs_d, d_ok, False, CAUSAL, BLOCK_N, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, k_base, v_base, mid, hi, kv_len, t, shift, stride_ks,
                               stride_vs, qk_scale, offs_d, d_ok, True, CAUSAL, BLOCK_N, PRECISION)

    seen = l_i > 0
    out_u = acc / tl.where(seen, l_i, 1.0)[:, None]
    if SPLIT:
        # Partial over this chunk of keys; an empty chunk has weight exp2(-inf) = 0 in _combine.
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        ws_rows = (split * B * G + pid_bg).to(tl.int64) * M_total + rows
        tl.store(wsl_ptr + ws_rows, lse, mask=row_ok)
        tl.store(wso_ptr + ws_rows[:, None] * HEAD_DIM + offs_d[None, :], out_u,
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
        _store_out(o_ptr, ou_ptr, lse_ptr, mix_ptr, out_u, lse, b64, t, e, h, row_ok, offs_d, d_ok,
                   T, E, H, stride_mb, stride_mt, stride_me, HEAD_DIM, SAVE)


@triton.jit
def _combine(
    wso_ptr, wsl_ptr, mix_ptr, o_ptr, ou_ptr, lse_ptr,
    B, T, E, H, Hkv, G, Gq, R, num_splits, stride_mb, stride_mt, stride_me,
    HEAD_DIM: tl.constexpr, SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the per-chunk partials of the split forward: weights exp2(lse_chunk - lse_max)."""
    M_total = T * Gq
    n_m = tl.cdiv(M_total, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_bg = tl.program_id(0) // n_m
    b = pid_bg // G
    g = pid_bg % G
    BG = B * G
    rows, t, e, h = _rows(pid_m * BLOCK_M, g, Gq, R, Hkv, BLOCK_M)
    row_ok = rows < M_total
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    for sp in range(0, num_splits):
        ws_rows = (sp * BG + pid_bg).to(tl.int64) * M_total + rows
        m = tl.maximum(m, tl.load(wsl_ptr + ws_rows, mask=row_ok, other=float("-inf")))
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for sp in range(0, num_splits):
        ws_rows = (sp * BG + pid_bg).to(tl.int64) * M_total + rows
        w = tl.math.exp2(tl.load(wsl_ptr + ws_rows, mask=row_ok, other=float("-inf")) - m_safe)
        part = tl.load(wso_ptr + ws_rows[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        l += w
        acc += w[:, None] * part
    seen = l > 0
    out_u = acc / tl.where(seen, l, 1.0)[:, None]
    lse = tl.where(seen, m_safe + tl.math.log2(tl.where(seen, l, 1.0)), float("inf"))
    _store_out(o_ptr, ou_ptr, lse_ptr, mix_ptr, out_u, lse, b.to(tl.int64), t, e, h, row_ok, offs_d, d_ok,
               T, E, H, stride_mb, stride_mt, stride_me, HEAD_DIM, SAVE)


@triton.jit
def _bwd_pre(do_ptr, ou_ptr, dp_ptr, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    ptrs = rows[:, None] * HEAD_DIM + offs_d[None, :]
    do = tl.load(do_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    ou = tl.load(ou_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dp_ptr + rows, tl.sum(do * ou, 1), mask=rows < n_rows)


@triton.jit
def _load_rows_bwd(q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m0, g, T, E, H, Hkv, Gq, R,
                   stride_qb, stride_qt, stride_qe, stride_qh, stride_mb, stride_mt, stride_me,
                   offs_d, d_ok, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """q, mix * dO (in q's dtype), lse and delta = mix * Dp for the packed rows m0.."""
    rows, t, e, h = _rows(m0, g, Gq, R, Hkv, BLOCK_M)
    row_ok = rows < T * Gq
    mask = row_ok[:, None] & d_ok[None, :]
    q_rows = b64 * stride_qb + t.to(tl.int64) * stride_qt + e.to(tl.int64) * stride_qe + h.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=mask, other=0.0)
    idx = _row_index(b64, t, e, h, T, E, H)
    mix = tl.load(mix_ptr + b64 * stride_mb + t.to(tl.int64) * stride_mt + e.to(tl.int64) * stride_me,
                  mask=row_ok, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = (do * mix[:, None]).to(q.dtype)
    # Padding rows get lse = +inf, hence P = 0.
    lse = tl.load(lse_ptr + idx, mask=row_ok, other=float("inf"))
    delta = mix * tl.load(dp_ptr + idx, mask=row_ok, other=0.0)
    return t, q, do, lse, delta


@triton.jit
def _dkdv_rows(dk, dv, k, v, q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m_lo, m_hi, g, keys, kv_len, shift,
               T, E, H, Hkv, Gq, R, qk_scale, stride_qb, stride_qt, stride_qe, stride_qh,
               stride_mb, stride_mt, stride_me, offs_d, d_ok,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               PRECISION: tl.constexpr):
    for m0 in range(m_lo, m_hi, BLOCK_M):
        t, q, do, lse, delta = _load_rows_bwd(q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m0, g, T, E, H,
                                              Hkv, Gq, R, stride_qb, stride_qt, stride_qe, stride_qh,
                                              stride_mb, stride_mt, stride_me, offs_d, d_ok, HEAD_DIM, BLOCK_M)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            visible = (keys < kv_len)[:, None]
            if CAUSAL:
                visible = visible & (keys[:, None] <= t[None, :] + shift)
            pT = tl.where(visible, pT, 0.0)
        dv = tl.dot(pT.to(q.dtype), do, dv, input_precision=PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv(
    q_ptr, k_ptr, v_ptr, mix_ptr, kvlen_ptr, do_ptr, lse_ptr, dp_ptr, dk_ptr, dv_ptr,
    B, T, S, E, H, Hkv, G, Gq, R, sm_scale, qk_scale,
    stride_qb, stride_qt, stride_qe, stride_qh, stride_kb, stride_ks, stride_ke, stride_kh,
    stride_vb, stride_vs, stride_ve, stride_vh, stride_mb, stride_mt, stride_me,
    T_KEY, S_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile of KV head g, written in the contiguous [B, S, G, Dh] layout."""
    n_n = tl.cdiv(S, BLOCK_N)
    pid_n = tl.program_id(0) % n_n
    pid_bg = tl.program_id(0) // n_n
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    M_total = T * Gq
    M_pad = tl.cdiv(M_total, BLOCK_M) * BLOCK_M
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KVLEN)
    shift = kv_len - T
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    keys64 = keys.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    kv_mask = (keys < kv_len)[:, None] & d_ok[None, :]
    k_base = k_ptr + b64 * stride_kb + (g // Hkv).to(tl.int64) * stride_ke + (g % Hkv).to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + (g // Hkv).to(tl.int64) * stride_ve + (g % Hkv).to(tl.int64) * stride_vh
    k = tl.load(k_base + keys64[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + keys64[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)

    # Rows [m_lo, m_mid) see part of the tile and need the mask; rows [m_mid, M_total) see all of it.
    if CAUSAL:
        m_lo = tl.maximum(n0 - shift, 0) * Gq // BLOCK_M * BLOCK_M
        m_mid = (tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - shift, 0) * Gq, M_total) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        m_lo = 0
        m_mid = 0
    m_mid = tl.where(n0 + BLOCK_N > kv_len, M_pad, m_mid)
    m_lo = tl.where(n0 >= kv_len, M_pad, m_lo)
    m_mid = tl.maximum(m_mid, m_lo)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dk, dv = _dkdv_rows(dk, dv, k, v, q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m_lo, m_mid, g, keys, kv_len,
                        shift, T, E, H, Hkv, Gq, R, qk_scale, stride_qb, stride_qt, stride_qe, stride_qh,
                        stride_mb, stride_mt, stride_me, offs_d, d_ok, True, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
    dk, dv = _dkdv_rows(dk, dv, k, v, q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m_mid, M_total, g, keys, kv_len,
                        shift, T, E, H, Hkv, Gq, R, qk_scale, stride_qb, stride_qt, stride_qe, stride_qh,
                        stride_mb, stride_mt, stride_me, offs_d, d_ok, False, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
    out = ((b64 * S + keys64) * G + g)[:, None] * HEAD_DIM + offs_d[None, :]
    out_mask = (keys < S)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, s_lo, s_hi, kv_len, t, shift, stride_ks, stride_vs,
              qk_scale, offs_d, d_ok, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr):
    for s0 in range(s_lo, s_hi, BLOCK_N):
        keys = s0 + tl.arange(0, BLOCK_N)
        keys64 = keys.to(tl.int64)
        if MASKED:
            mask = d_ok[:, None] & (keys < kv_len)[None, :]
        else:
            mask = d_ok[:, None]
        kT = tl.load(k_base + keys64[None, :] * stride_ks + offs_d[:, None], mask=mask, other=0.0)
        vT = tl.load(v_base + keys64[None, :] * stride_vs + offs_d[:, None], mask=mask, other=0.0)
        qk = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse[:, None])
        if MASKED:
            visible = (keys < kv_len)[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= t[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, vT, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(q.dtype), tl.trans(kT), dq, input_precision=PRECISION)
    return dq


@triton.jit
def _bwd_dq(
    q_ptr, k_ptr, v_ptr, mix_ptr, kvlen_ptr, do_ptr, lse_ptr, dp_ptr, dq_ptr,
    B, T, S, E, H, Hkv, G, Gq, R, sm_scale, qk_scale,
    stride_qb, stride_qt, stride_qe, stride_qh, stride_kb, stride_ks, stride_ke, stride_kh,
    stride_vb, stride_vs, stride_ve, stride_vh, stride_mb, stride_mt, stride_me,
    T_KEY, S_KEY,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ of one packed row tile, written in the contiguous [B, T, E, H, Dh] layout."""
    n_m = tl.cdiv(T * Gq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_bg = tl.program_id(0) // n_m
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    m0 = pid_m * BLOCK_M
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KVLEN)
    shift = kv_len - T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t, q, do, lse, delta = _load_rows_bwd(q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m0, g, T, E, H, Hkv,
                                          Gq, R, stride_qb, stride_qt, stride_qe, stride_qh,
                                          stride_mb, stride_mt, stride_me, offs_d, d_ok, HEAD_DIM, BLOCK_M)
    k_base = k_ptr + b64 * stride_kb + (g // Hkv).to(tl.int64) * stride_ke + (g % Hkv).to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + (g // Hkv).to(tl.int64) * stride_ve + (g % Hkv).to(tl.int64) * stride_vh
    hi = kv_len
    full = kv_len
    if CAUSAL:
        t_first = m0 // Gq
        t_last = tl.minimum((m0 + BLOCK_M - 1) // Gq, T - 1)
        hi = tl.minimum(hi, t_last + shift + 1)
        full = tl.minimum(hi, t_first + shift + 1)
    mid = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, 0, mid, kv_len, t, shift, stride_ks, stride_vs,
                   qk_scale, offs_d, d_ok, False, CAUSAL, BLOCK_N, PRECISION)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mid, hi, kv_len, t, shift, stride_ks, stride_vs,
                   qk_scale, offs_d, d_ok, True, CAUSAL, BLOCK_N, PRECISION)
    rows, t, e, h = _rows(m0, g, Gq, R, Hkv, BLOCK_M)
    idx = _row_index(b64, t, e, h, T, E, H)
    mask = (rows < T * Gq)[:, None] & d_ok[None, :]
    tl.store(dq_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration

def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _cfg(m: int, n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


# GPU tiles: those that compile for sm_90 (bf16, head dim 128) without register spills under both
# triton 3.6 and 3.9 (3.6's code needs more registers in dK/dV: 32-row tiles at 3 stages spill there).
# float32 operands take their own, smaller tiles (``fp32``), without spills with or without TF32 at
# head dims 64 and 128: with the 16-bit tiles their dots (FMA instructions without TF32) spilled
# tens of kilobytes and took seconds each to compile.
def _fwd_configs(fp32: bool = False):
    if interpreting():
        return [_cfg(16, 16, 4, 1)]
    if fp32:
        return [_cfg(16, 64, 8, 2), _cfg(16, 64, 4, 2)]
    return [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 3), _cfg(64, 64, 8, 2), _cfg(64, 32, 4, 3)]


def _decode_configs(fp32: bool = False):
    if interpreting():
        return [_cfg(16, 16, 4, 1)]
    if fp32:
        return [_cfg(16, 64, 4, 2)]
    return [_cfg(16, 128, 4, 3), _cfg(16, 64, 4, 4), _cfg(64, 128, 8, 3), _cfg(64, 64, 4, 4)]


def _dkdv_configs(fp32: bool = False):
    if interpreting():
        return [_cfg(16, 16, 4, 1)]
    if fp32:
        return [_cfg(16, 32, 8, 2), _cfg(16, 16, 4, 2)]
    return [_cfg(16, 128, 8, 2), _cfg(32, 64, 8, 2), _cfg(16, 64, 8, 3), _cfg(16, 64, 8, 2)]


def _dq_configs(fp32: bool = False):
    if interpreting():
        return [_cfg(16, 16, 4, 1)]
    if fp32:
        return [_cfg(16, 64, 4, 2), _cfg(16, 32, 4, 2), _cfg(32, 16, 4, 2)]
    return [_cfg(128, 64, 8, 2), _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 32, 4, 3)]


_KEY = ["T_KEY", "S_KEY", "E", "Gq", "HEAD_DIM", "CAUSAL", "HAS_KVLEN", "SAVE"]
_BWD_KEY = ["T_KEY", "S_KEY", "E", "Gq", "HEAD_DIM", "CAUSAL", "HAS_KVLEN"]


def _autotuned(fn, configs, key) -> dict:
    """{fp32: autotuned fn}: one autotuner per tile family."""
    return {fp32: triton.autotune(configs=configs(fp32), key=key)(fn) for fp32 in (False, True)}


# Every output of these kernels is a plain store, so autotuning's reruns are harmless.
fwd = _autotuned(_fwd, _fwd_configs, _KEY)
fwd_decode = _autotuned(_fwd, _decode_configs, _KEY)
bwd_dkdv = _autotuned(_bwd_dkdv, _dkdv_configs, _BWD_KEY)
bwd_dq = _autotuned(_bwd_dq, _dq_configs, _BWD_KEY)

SPLIT_GRANULE = 256  # keys: every chunk of a split forward is a multiple of this


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def num_splits(B: int, G: int, rows: int, S: int, device: torch.device) -> int:
    """Key chunks for the split forward: enough programs for ~4 per SM when the rows alone
    (a few decoding queries) would leave the GPU idle; 1 when they already fill it."""
    programs = B * G * triton.cdiv(rows, 64)
    want = triton.cdiv(4 * _sm_count(device), programs)
    return max(1, min(want, S // SPLIT_GRANULE, 64))


def _strides(q, k, v, mix, expert_kv: bool):
    sq = (q.stride(0), q.stride(1), q.stride(2), q.stride(3))
    if expert_kv:
        sk = (k.stride(0), k.stride(1), k.stride(2), k.stride(3))
        sv = (v.stride(0), v.stride(1), v.stride(2), v.stride(3))
    else:
        sk = (k.stride(0), k.stride(1), 0, k.stride(2))
        sv = (v.stride(0), v.stride(1), 0, v.stride(2))
    return (*sq, *sk, *sv, mix.stride(0), mix.stride(1), mix.stride(2))


def _dims(q, k, expert_kv: bool):
    B, T, E, H, Dh = q.shape
    S = k.shape[1]
    Hkv = k.shape[-2]
    R = H // Hkv
    G = E * Hkv if expert_kv else Hkv
    Gq = R if expert_kv else E * R
    return B, T, S, E, H, Hkv, G, Gq, R, Dh


def forward(q, k, v, mix, kv_lens, causal: bool, scale: float, save: bool, splits: int | None = None):
    """Returns (o, o_unmixed, lse); the last two only when ``save`` (else None).

    q [B,T,E,H,Dh], k/v [B,S,Hkv,Dh] or [B,S,E,Hkv,Dh] with unit stride on Dh; mix [B,T,E] any float
    dtype and strides; kv_lens int32 [B] or None. ``splits`` overrides the key-chunk count.
    """
    expert_kv = k.dim() == 5
    B, T, S, E, H, Hkv, G, Gq, R, Dh = _dims(q, k, expert_kv)
    rows = T * Gq
    o = empty(q.shape, device=q.device, dtype=q.dtype)
    ou = empty(q.shape, device=q.device, dtype=q.dtype) if save else None
    lse = empty((B, T, E, H), device=q.device, dtype=torch.float32) if save else None
    if splits is None:
        splits = num_splits(B, G, rows, S, q.device)
    dummy = o
    common = dict(HEAD_DIM=Dh, CAUSAL=causal, HAS_KVLEN=kv_lens is not None, SAVE=save,
                  PRECISION=_precision(q.dtype), BLOCK_D=max(16, triton.next_power_of_2(Dh)))
    args = (B, T, S, E, H, Hkv, G, Gq, R)
    strides = _strides(q, k, v, mix, expert_kv)
    kvl = kv_lens if kv_lens is not None else dummy
    if splits <= 1:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * B * G,)
        fwd[q.dtype == torch.float32][grid](q, k, v, mix, kvl, o, ou if save else dummy, lse if save else dummy, dummy, dummy,
                  *args, S, scale * LOG2E, *strides, _bucket(T), _bucket(S), SPLIT=False, **common)
        return o, ou, lse
    chunk = triton.cdiv(triton.cdiv(S, splits), SPLIT_GRANULE) * SPLIT_GRANULE
    splits = triton.cdiv(S, chunk)
    ws_o = empty((splits, B * G, rows, Dh), device=q.device, dtype=torch.float32)
    ws_lse = empty((splits, B * G, rows), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * B * G * splits,)
    fwd_decode[q.dtype == torch.float32][grid](q, k, v, mix, kvl, dummy, dummy, dummy, ws_o, ws_lse,
                     *args, chunk, scale * LOG2E, *strides, _bucket(T), _bucket(S), SPLIT=True, **common)
    block_m = 16 if interpreting() else 32
    _combine[(triton.cdiv(rows, block_m) * B * G,)](
        ws_o, ws_lse, mix, o, ou if save else dummy, lse if save else dummy,
        B, T, E, H, Hkv, G, Gq, R, splits, mix.stride(0), mix.stride(1), mix.stride(2),
        HEAD_DIM=Dh, SAVE=save, BLOCK_M=block_m, BLOCK_D=common["BLOCK_D"])
    return o, ou, lse


def backward(do, q, k, v, mix, kv_lens, ou, lse, causal: bool, scale: float):
    """Returns (dq, dk, dv, dp) with dp [B,T,E,H] fp32 = rowsum(dO * O_unmixed), whose sum over H is
    d(mix). dq is contiguous like q; dk, dv contiguous like k, v."""
    expert_kv = k.dim() == 5
    B, T, S, E, H, Hkv, G, Gq, R, Dh = _dims(q, k, expert_kv)
    do = do.contiguous()
    block_d = max(16, triton.next_power_of_2(Dh))
    n_rows = B * T * E * H
    dp = empty((B, T, E, H), device=q.device, dtype=torch.float32)
    block_r = 16 if interpreting() else 64
    _bwd_pre[(triton.cdiv(n_rows, block_r),)](do, ou, dp, n_rows, HEAD_DIM=Dh, BLOCK_R=block_r, BLOCK_D=block_d)
    dq = empty(q.shape, device=q.device, dtype=q.dtype)
    dk = empty(k.shape, device=k.device, dtype=k.dtype)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    kvl = kv_lens if kv_lens is not None else dq
    args = (B, T, S, E, H, Hkv, G, Gq, R, scale, scale * LOG2E, *_strides(q, k, v, mix, expert_kv),
            _bucket(T), _bucket(S))
    common = dict(HEAD_DIM=Dh, CAUSAL=causal, HAS_KVLEN=kv_lens is not None, PRECISION=_precision(q.dtype),
                  BLOCK_D=block_d)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * G,)
    bwd_dkdv[q.dtype == torch.float32][grid](q, k, v, mix, kvl, do, lse, dp, dk, dv, *args, **common)
    grid = lambda meta: (triton.cdiv(T * Gq, meta["BLOCK_M"]) * B * G,)
    bwd_dq[q.dtype == torch.float32][grid](q, k, v, mix, kvl, do, lse, dp, dq, *args, **common)
    return dq, dk, dv, dp
