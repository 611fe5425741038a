"""Kernels of the grouped expert GEMMs: rows sorted by expert times per-expert weights.

Two kernels serve every product of the MoE FFN and of ``grouped_mm``:

* ``_group_gemm``: ``C[row] = A[row] @ W[e]^T`` over row tiles of each expert. Optional gather of
  A's rows and scatter of C's rows through one row map, a per-row scale, and three epilogues:
  plain, SwiGLU forward (two accumulators, gate and up) and SwiGLU backward.
* ``_group_wgrad``: ``dW[e] = A_e^T @ B_e`` summed over the rows of each expert, one program per
  output tile, so an expert without rows writes exact zeros and no float atomics are needed.

Groups come from ``offs`` (cumulative row ends, one per expert). Rows past ``offs[-1]`` form a
tail group whose output rows are written as zeros. Every program finds its group in-kernel from
``offs`` (a cumsum over the per-group tile counts), so the launch needs no host sync and the row
block size can be autotuned. Row and expert offsets are computed in int64.
"""
from __future__ import annotations

import triton
import triton.language as tl

# The epilogues of ``_group_gemm``: host code passes the ints, kernels compare with the constexprs.
PLAIN, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2
_SWIGLU_FWD = tl.constexpr(SWIGLU_FWD)
_SWIGLU_BWD = tl.constexpr(SWIGLU_BWD)


@triton.jit
def _find_tile(offs_ptr, pid_m, M, E, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """Group (0..E, E being the tail past offs[-1]), first row and end row of row tile pid_m."""
    g_idx = tl.arange(0, BLOCK_G)
    hi = tl.load(offs_ptr + g_idx, mask=g_idx < E, other=0)
    hi = tl.where(g_idx == E, M, hi)
    lo = tl.load(offs_ptr + g_idx - 1, mask=(g_idx >= 1) & (g_idx <= E), other=0)
    hi = tl.minimum(tl.maximum(hi, 0), M)
    lo = tl.minimum(tl.maximum(lo, 0), M)
    ntiles = tl.where(g_idx <= E, tl.maximum(hi - lo + BLOCK_M - 1, 0) // BLOCK_M, 0)
    cum = tl.cumsum(ntiles, axis=0)
    g = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
    pick = g_idx == g
    first_tile = tl.sum(tl.where(pick, cum - ntiles, 0), axis=0)
    start = tl.sum(tl.where(pick, lo, 0), axis=0) + (pid_m - first_tile) * BLOCK_M
    end = tl.sum(tl.where(pick, hi, 0), axis=0)
    return g, start, end


@triton.jit
def _group_gemm(
    # pointers
    a_ptr, w_ptr, c_ptr, offs_ptr, row_map_ptr, scale_ptr, pre_ptr, part_ptr,
    # sizes
    M, N, K, E, M_BUCKET,
    # strides
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_pm, stride_qm,
    # meta
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """One program computes one [BLOCK_M, BLOCK_N] tile of C: BLOCK_M sorted rows of one expert
    e (or of the tail past offs[-1], written as zeros) times columns of W[e]^T, then its epilogue.

    Over 80 lines on purpose: the main loop and the three epilogues share the accumulators, the
    row map and the masks, and Triton inlines helpers anyway; one body keeps what a program holds
    in registers readable in one place (and the sm_90 spill checks test exactly this body).
    """
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M) + E + 1
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Swizzle: GROUP_M row tiles share each weight column tile while it sits in L2.
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    g, start, end = _find_tile(offs_ptr, pid_m, M, E, BLOCK_M, BLOCK_G)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < end
    is_tail = g >= E
    k_stop = tl.where(is_tail, 0, K)
    e = tl.minimum(g, E - 1).to(tl.int64)

    if GATHER_A or SCATTER_C or SCALE:
        slot = tl.load(row_map_ptr + rows, mask=row_ok, other=0)
    if GATHER_A:
        a_rows = (slot // A_DIV).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    w_ptrs = w_ptr + e * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if EPILOGUE == _SWIGLU_FWD:
        up_ptrs = w_ptrs + N * stride_wn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if EPILOGUE == _SWIGLU_FWD:
            wu = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
            up_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    out_mask = row_ok[:, None] & col_ok[None, :]
    if SCALE:
        s = tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    if EPILOGUE == _SWIGLU_FWD:
        if STORE_PRE:
            p_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
            tl.store(p_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
            tl.store(p_ptrs + N, acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
        # Round the pre-activations as the backward will read them, so both see one function.
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
    elif EPILOGUE == _SWIGLU_BWD:
        # acc is d(act) before the routing weight; pre holds [gate | up] of these rows.
        p_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
        gate = tl.load(p_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        up = tl.load(p_ptrs + N, mask=out_mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        act = (silu * up).to(c_ptr.dtype.element_ty).to(tl.float32)
        # d(weight) of this row from this column tile; summed over tiles outside, deterministically.
        tl.store(part_ptr + rows.to(tl.int64) * stride_qm + pid_n, tl.sum(acc * act, axis=1), mask=row_ok)
        d_act = acc * s[:, None]
        d_up = d_act * silu
        d_gate = d_act * up * sig * (1.0 + gate * (1.0 - sig))
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, d_gate.to(c_ptr.dtype.element_ty), mask=out_mask)
        tl.store(c_ptrs + N * stride_cn, d_up.to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        out = acc
    if EPILOGUE != _SWIGLU_BWD:
        if SCALE:
            out = out * s[:, None]
        if SCATTER_C:
            c_rows = slot.to(tl.int64)
        else:
            c_rows = rows.to(tl.int64)
        c_ptrs = c_ptr + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, out.to(c_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _group_wgrad(
    # pointers
    a_ptr, b_ptr, dw_ptr, offs_ptr, row_map_ptr, scale_ptr,
    # sizes
    N, K,
    # strides
    stride_am, stride_an, stride_bm, stride_bk, stride_de, stride_dn, stride_dk,
    # meta
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, SCALE_A: tl.constexpr,
    B_DIV: tl.constexpr, GATHER_B: tl.constexpr, SWIGLU_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One program computes one [BLOCK_N, BLOCK_K] tile of dW[e] for expert e = program_id(1):
    dW[e][n, k] = sum over rows r of expert e of A[r, n] * B[r, k].

    With SWIGLU_B, B is computed from pre-activations: B[r, k] = silu(P[r, k]) * P[r, K + k].
    """
    pid = tl.program_id(0)
    e = tl.program_id(1)
    num_pid_k = tl.cdiv(K, BLOCK_K)
    pid_n = pid // num_pid_k
    pid_k = pid % num_pid_k
    start = tl.where(e == 0, 0, tl.load(offs_ptr + e - 1, mask=e > 0, other=0))
    end = tl.load(offs_ptr + e)
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = cols_n < N
    k_ok = cols_k < K
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        r_ok = rows < end
        if GATHER_A or GATHER_B or SCALE_A:
            slot = tl.load(row_map_ptr + rows, mask=r_ok, other=0)
        if GATHER_A:
            a_rows = (slot // A_DIV).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        if GATHER_B:
            b_rows = (slot // B_DIV).to(tl.int64)
        else:
            b_rows = rows.to(tl.int64)
        # A is loaded transposed, [N, R], so the dot needs no register transpose.
        a = tl.load(a_ptr + a_rows[None, :] * stride_am + cols_n[:, None] * stride_an,
                    mask=n_ok[:, None] & r_ok[None, :], other=0.0)
        if SCALE_A:
            s = tl.load(scale_ptr + slot, mask=r_ok, other=0.0).to(tl.float32)
            a = (a.to(tl.float32) * s[None, :]).to(a_ptr.dtype.element_ty)
        b_ptrs = b_ptr + b_rows[:, None] * stride_bm + cols_k[None, :] * stride_bk
        b_mask = r_ok[:, None] & k_ok[None, :]
        if SWIGLU_B:
            gate = tl.load(b_ptrs, mask=b_mask, other=0.0).to(tl.float32)
            up = tl.load(b_ptrs + K * stride_bk, mask=b_mask, other=0.0).to(tl.float32)
            b = (gate * tl.sigmoid(gate) * up).to(b_ptr.dtype.element_ty)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    d_ptrs = (dw_ptr + e.to(tl.int64) * stride_de + cols_n[:, None].to(tl.int64) * stride_dn
              + cols_k[None, :] * stride_dk)
    tl.store(d_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


