"""Kernels of the soft mixture-of-attention: flash-attention forward and backward over stacked
expert heads (the host side is ``attention.py``).

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

Causal masking is aligned bottom-right: query t sees key s iff kv_start <= s < kv_len and
s <= t + kv_len - T (kv_start: left padding, 0 by default). The key loops of the forward and of dQ
start at kv_start itself (tiles are not aligned to multiples of BLOCK_N: a key's row is its own
contiguous load), so no key below it is read; dK/dV programs own aligned key tiles and mask them.
A query that sees no key outputs zeros (its saved log-sum-exp is +inf so that backward gives it P = 0).
Offsets that scale with the tensor sizes are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _kv_len(kvlen_ptr, b, S, HAS_KVLEN: tl.constexpr):
    if HAS_KVLEN:
        n = tl.minimum(tl.maximum(tl.load(kvlen_ptr + b).to(tl.int32), 0), S)
    else:
        n = S
    return n


@triton.jit
def _kv_start(kvstart_ptr, b, kv_len, HAS_KVSTART: tl.constexpr):
    """Row b's first valid key (left padding), clamped to [0, kv_len]; 0 without kv_start."""
    if HAS_KVSTART:
        n = tl.minimum(tl.maximum(tl.load(kvstart_ptr + b).to(tl.int32), 0), kv_len)
    else:
        n = 0
    return n


@triton.jit
def _kv_bases(k_ptr, v_ptr, b64, g, Hkv, stride_kb, stride_ke, stride_kh, stride_vb, stride_ve, stride_vh):
    """Where KV head ``g`` (expert g // Hkv, head g % Hkv; one expert when KV is shared) of batch
    row ``b64`` starts in k and in v."""
    e64 = (g // Hkv).to(tl.int64)
    h64 = (g % Hkv).to(tl.int64)
    return (k_ptr + b64 * stride_kb + e64 * stride_ke + h64 * stride_kh,
            v_ptr + b64 * stride_vb + e64 * stride_ve + h64 * stride_vh)


@triton.jit
def _visible_keys(m0, Gq, T, shift, kv_len, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """(hi, full) for the tile of rows m0 .. m0 + BLOCK_M - 1: some row sees the keys below hi, every
    row sees those below full (causal: query t sees keys up to t + shift, shift = kv_len - T)."""
    hi = kv_len
    full = kv_len
    if CAUSAL:
        t_first = m0 // Gq
        t_last = tl.minimum((m0 + BLOCK_M - 1) // Gq, T - 1)
        hi = tl.minimum(hi, t_last + shift + 1)
        full = tl.minimum(hi, t_first + shift + 1)
    return hi, full


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
            kT = tl.load(k_base + keys64[None, :] * stride_ks + offs_d[:, None], mask=d_ok[:, None],
                         other=0.0)
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
    # pointers
    q_ptr, k_ptr, v_ptr, mix_ptr, kvlen_ptr, kvstart_ptr, o_ptr, ou_ptr, lse_ptr, wso_ptr, wsl_ptr,
    # sizes and scalars
    B, T, S, E, H, Hkv, G, Gq, R, chunk, qk_scale,
    # strides
    stride_qb, stride_qt, stride_qe, stride_qh, stride_kb, stride_ks, stride_ke, stride_kh,
    stride_vb, stride_vs, stride_ve, stride_vh, stride_mb, stride_mt, stride_me,
    # autotune keys (size buckets)
    T_KEY, S_KEY,
    # meta
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KVSTART: tl.constexpr,
    SPLIT: tl.constexpr,
    SAVE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program computes BLOCK_M packed rows (token, query head) of KV head g of batch row b:
    their attention output over the keys (with SPLIT, over one chunk of them, as fp32 partials).

    Just over 80 lines, kept whole: the key-range bounds, the two tile loops and the epilogue are
    one program's control flow (the loops and the epilogue are already helpers)."""
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
    kv_start = _kv_start(kvstart_ptr, b, kv_len, HAS_KVSTART)
    shift = kv_len - T

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_rows = (b64 * stride_qb + t.to(tl.int64) * stride_qt + e.to(tl.int64) * stride_qe
              + h.to(tl.int64) * stride_qh)
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base, v_base = _kv_bases(k_ptr, v_ptr, b64, g, Hkv, stride_kb, stride_ke, stride_kh, stride_vb,
                               stride_ve, stride_vh)

    # Keys [lo, full) are visible to every row of the tile; [full, hi) need the mask. The tiles start
    # at the row's first valid key (left padding: kv_start), so no key below it is read and none of
    # them needs a mask; a chunk of the split forward is a chunk of the valid keys.
    lo = kv_start
    hi, full = _visible_keys(m0, Gq, T, shift, kv_len, BLOCK_M, CAUSAL)
    if SPLIT:
        lo = kv_start + split * chunk
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
    # pointers
    wso_ptr, wsl_ptr, mix_ptr, o_ptr, ou_ptr, lse_ptr,
    # sizes
    B, T, E, H, Hkv, G, Gq, R, num_splits,
    # strides
    stride_mb, stride_mt, stride_me,
    # meta
    HEAD_DIM: tl.constexpr, SAVE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program merges the per-chunk partials of the split forward for BLOCK_M packed rows of one
    KV head: weights exp2(lse_chunk - lse_max)."""
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
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for sp in range(0, num_splits):
        ws_rows = (sp * BG + pid_bg).to(tl.int64) * M_total + rows
        w = tl.math.exp2(tl.load(wsl_ptr + ws_rows, mask=row_ok, other=float("-inf")) - m_safe)
        part = tl.load(wso_ptr + ws_rows[:, None] * HEAD_DIM + offs_d[None, :],
                       mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        total += w
        acc += w[:, None] * part
    seen = total > 0
    out_u = acc / tl.where(seen, total, 1.0)[:, None]
    lse = tl.where(seen, m_safe + tl.math.log2(tl.where(seen, total, 1.0)), float("inf"))
    _store_out(o_ptr, ou_ptr, lse_ptr, mix_ptr, out_u, lse, b.to(tl.int64), t, e, h, row_ok, offs_d, d_ok,
               T, E, H, stride_mb, stride_mt, stride_me, HEAD_DIM, SAVE)


@triton.jit
def _bwd_pre(
    do_ptr, ou_ptr, dp_ptr,  # pointers
    n_rows,  # sizes
    HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,  # meta
):
    """One program computes Dp = rowsum(dO * O_unmixed) of BLOCK_R (b, t, e, h) rows."""
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
    q_rows = (b64 * stride_qb + t.to(tl.int64) * stride_qt + e.to(tl.int64) * stride_qe
              + h.to(tl.int64) * stride_qh)
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
def _dkdv_rows(dk, dv, k, v, q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m_lo, m_hi, g, keys, key_ok, shift,
               T, E, H, Hkv, Gq, R, qk_scale, stride_qb, stride_qt, stride_qe, stride_qh,
               stride_mb, stride_mt, stride_me, offs_d, d_ok,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
               PRECISION: tl.constexpr):
    for m0 in range(m_lo, m_hi, BLOCK_M):
        t, q, do, lse, delta = _load_rows_bwd(q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m0, g, T, E, H,
                                              Hkv, Gq, R, stride_qb, stride_qt, stride_qe, stride_qh,
                                              stride_mb, stride_mt, stride_me, offs_d, d_ok, HEAD_DIM,
                                              BLOCK_M)
        qkT = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        pT = tl.math.exp2(qkT - lse[None, :])
        if MASKED:
            visible = key_ok[:, None]
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
    # pointers
    q_ptr, k_ptr, v_ptr, mix_ptr, kvlen_ptr, kvstart_ptr, do_ptr, lse_ptr, dp_ptr, dk_ptr, dv_ptr,
    # sizes and scalars
    B, T, S, E, H, Hkv, G, Gq, R, sm_scale, qk_scale,
    # strides
    stride_qb, stride_qt, stride_qe, stride_qh, stride_kb, stride_ks, stride_ke, stride_kh,
    stride_vb, stride_vs, stride_ve, stride_vh, stride_mb, stride_mt, stride_me,
    # autotune keys (size buckets)
    T_KEY, S_KEY,
    # meta
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KVSTART: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program computes dK, dV of one key tile of KV head g of batch row b, written in the
    contiguous [B, S, G, Dh] layout."""
    n_n = tl.cdiv(S, BLOCK_N)
    pid_n = tl.program_id(0) % n_n
    pid_bg = tl.program_id(0) // n_n
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    M_total = T * Gq
    M_pad = tl.cdiv(M_total, BLOCK_M) * BLOCK_M
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KVLEN)
    kv_start = _kv_start(kvstart_ptr, b, kv_len, HAS_KVSTART)
    shift = kv_len - T
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    keys64 = keys.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Keys below kv_start (left padding) and past kv_len are never read; their dK, dV are zeros.
    key_ok = (keys >= kv_start) & (keys < kv_len)
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k_base, v_base = _kv_bases(k_ptr, v_ptr, b64, g, Hkv, stride_kb, stride_ke, stride_kh, stride_vb,
                               stride_ve, stride_vh)
    k = tl.load(k_base + keys64[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + keys64[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)

    # Rows [m_lo, m_mid) see part of the tile and need the mask; rows [m_mid, M_total) see all of it.
    # A tile without a valid key runs no rows; one that holds kv_start masks every row.
    n_first = tl.maximum(n0, kv_start)
    if CAUSAL:
        m_lo = tl.maximum(n_first - shift, 0) * Gq // BLOCK_M * BLOCK_M
        m_end = tl.minimum(tl.maximum(n0 + BLOCK_N - 1 - shift, 0) * Gq, M_total)
        m_mid = (m_end + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    else:
        m_lo = 0
        m_mid = 0
    m_mid = tl.where((n0 + BLOCK_N > kv_len) | (n0 < kv_start), M_pad, m_mid)
    m_lo = tl.where(n_first >= kv_len, M_pad, m_lo)
    m_mid = tl.maximum(m_mid, m_lo)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dk, dv = _dkdv_rows(dk, dv, k, v, q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m_lo, m_mid, g, keys,
                        key_ok, shift, T, E, H, Hkv, Gq, R, qk_scale,
                        stride_qb, stride_qt, stride_qe, stride_qh, stride_mb, stride_mt, stride_me,
                        offs_d, d_ok, True, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
    dk, dv = _dkdv_rows(dk, dv, k, v, q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m_mid, M_total, g, keys,
                        key_ok, shift, T, E, H, Hkv, Gq, R, qk_scale,
                        stride_qb, stride_qt, stride_qe, stride_qh, stride_mb, stride_mt, stride_me,
                        offs_d, d_ok, False, CAUSAL, HEAD_DIM, BLOCK_M, PRECISION)
    out = ((b64 * S + keys64) * G + g)[:, None] * HEAD_DIM + offs_d[None, :]
    out_mask = (keys < S)[:, None] & d_ok[None, :]
    tl.store(dk_ptr + out, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, s0, kv_len, t, shift, stride_ks, stride_vs, qk_scale,
             offs_d, d_ok, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
             PRECISION: tl.constexpr):
    """dQ += the contribution of the key tile s0.. (a key loop's body)."""
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
    return tl.dot(ds.to(q.dtype), tl.trans(kT), dq, input_precision=PRECISION)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, s_lo, s_hi, kv_len, t, shift, stride_ks, stride_vs,
              qk_scale, offs_d, d_ok, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
              PRECISION: tl.constexpr, COUNTED: tl.constexpr):
    # With kv_start (COUNTED) the loop counts tiles from 0: ``range(s_lo, s_hi, BLOCK_N)`` from a
    # loaded s_lo made ptxas spill 16-32 bytes in two float32 configs (sm_90, tf32), and the counted
    # loop without kv_start spilled 8 in another; each form is kept where it compiles without spills.
    if COUNTED:
        for i in range(0, tl.cdiv(s_hi - s_lo, BLOCK_N)):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, s_lo + i * BLOCK_N, kv_len, t, shift,
                          stride_ks, stride_vs, qk_scale, offs_d, d_ok, MASKED, CAUSAL, BLOCK_N, PRECISION)
    else:
        for s0 in range(s_lo, s_hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, s0, kv_len, t, shift, stride_ks, stride_vs,
                          qk_scale, offs_d, d_ok, MASKED, CAUSAL, BLOCK_N, PRECISION)
    return dq


@triton.jit
def _bwd_dq(
    # pointers
    q_ptr, k_ptr, v_ptr, mix_ptr, kvlen_ptr, kvstart_ptr, do_ptr, lse_ptr, dp_ptr, dq_ptr,
    # sizes and scalars
    B, T, S, E, H, Hkv, G, Gq, R, sm_scale, qk_scale,
    # strides
    stride_qb, stride_qt, stride_qe, stride_qh, stride_kb, stride_ks, stride_ke, stride_kh,
    stride_vb, stride_vs, stride_ve, stride_vh, stride_mb, stride_mt, stride_me,
    # autotune keys (size buckets)
    T_KEY, S_KEY,
    # meta
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KVSTART: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program computes dQ of one packed row tile of KV head g of batch row b, written in the
    contiguous [B, T, E, H, Dh] layout."""
    n_m = tl.cdiv(T * Gq, BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_bg = tl.program_id(0) // n_m
    b = pid_bg // G
    g = pid_bg % G
    b64 = b.to(tl.int64)
    m0 = pid_m * BLOCK_M
    kv_len = _kv_len(kvlen_ptr, b, S, HAS_KVLEN)
    kv_start = _kv_start(kvstart_ptr, b, kv_len, HAS_KVSTART)
    shift = kv_len - T
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    t, q, do, lse, delta = _load_rows_bwd(q_ptr, do_ptr, mix_ptr, lse_ptr, dp_ptr, b64, m0, g, T, E, H, Hkv,
                                          Gq, R, stride_qb, stride_qt, stride_qe, stride_qh,
                                          stride_mb, stride_mt, stride_me, offs_d, d_ok, HEAD_DIM, BLOCK_M)
    k_base, v_base = _kv_bases(k_ptr, v_ptr, b64, g, Hkv, stride_kb, stride_ke, stride_kh, stride_vb,
                               stride_ve, stride_vh)
    hi, full = _visible_keys(m0, Gq, T, shift, kv_len, BLOCK_M, CAUSAL)
    # As in the forward, the tiles start at the first valid key: none below it is read.
    lo = kv_start
    mid = lo + (tl.maximum(full, lo) - lo) // BLOCK_N * BLOCK_N
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, lo, mid, kv_len, t, shift, stride_ks, stride_vs,
                   qk_scale, offs_d, d_ok, False, CAUSAL, BLOCK_N, PRECISION, HAS_KVSTART)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, mid, hi, kv_len, t, shift, stride_ks, stride_vs,
                   qk_scale, offs_d, d_ok, True, CAUSAL, BLOCK_N, PRECISION, HAS_KVSTART)
    rows, t, e, h = _rows(m0, g, Gq, R, Hkv, BLOCK_M)
    idx = _row_index(b64, t, e, h, T, E, H)
    mask = (rows < T * Gq)[:, None] & d_ok[None, :]
    tl.store(dq_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], (dq * sm_scale).to(dq_ptr.dtype.element_ty),
             mask=mask)
