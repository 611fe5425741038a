"""Grouped expert GEMMs: rows sorted by expert times per-expert weights.

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

import torch
import triton
import triton.language as tl
import triton.testing

from .._dispatch import interpreting

PLAIN, SWIGLU_FWD, SWIGLU_BWD = 0, 1, 2


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
    a_ptr, w_ptr, c_ptr, offs_ptr, row_map_ptr, scale_ptr, pre_ptr, part_ptr,
    M, N, K, E, M_BUCKET,
    stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_cm, stride_cn, stride_pm, stride_qm,
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, SCATTER_C: tl.constexpr, SCALE: tl.constexpr,
    EPILOGUE: tl.constexpr, STORE_PRE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
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
    if EPILOGUE == 1:
        up_ptrs = w_ptrs + N * stride_wn
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_stop, BLOCK_K):
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if EPILOGUE == 1:
            wu = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc_up = tl.dot(a, wu, acc_up, input_precision=PRECISION)
            up_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    out_mask = row_ok[:, None] & col_ok[None, :]
    if SCALE:
        s = tl.load(scale_ptr + slot, mask=row_ok, other=0.0).to(tl.float32)
    if EPILOGUE == 1:
        if STORE_PRE:
            p_ptrs = pre_ptr + rows.to(tl.int64)[:, None] * stride_pm + cols[None, :]
            tl.store(p_ptrs, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
            tl.store(p_ptrs + N, acc_up.to(pre_ptr.dtype.element_ty), mask=out_mask)
        # Round the pre-activations as the backward will read them, so both see one function.
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(c_ptr.dtype.element_ty).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
    elif EPILOGUE == 2:
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
    if EPILOGUE != 2:
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
    a_ptr, b_ptr, dw_ptr, offs_ptr, row_map_ptr, scale_ptr,
    N, K,
    stride_am, stride_an, stride_bm, stride_bk, stride_de, stride_dn, stride_dk,
    A_DIV: tl.constexpr, GATHER_A: tl.constexpr, SCALE_A: tl.constexpr,
    B_DIV: tl.constexpr, GATHER_B: tl.constexpr, SWIGLU_B: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dW[e][n, k] = sum over rows r of expert e of A[r, n] * B[r, k].

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


# ---------------------------------------------------------------------------------------------
# Launch configuration

def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _gemm_configs(epilogue: int, fma: bool = False):
    """Tiles to autotune over: tensor-core tiles, or with ``fma`` (float32 without TF32, where a dot
    is FMA instructions) smaller ones: the tensor-core tiles compile there to kilobytes of register
    spills and take seconds each to build."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4})]
    cfg = lambda m, n, k, w, s: triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                                              num_warps=w, num_stages=s)
    if fma:
        if epilogue == PLAIN:
            return [cfg(128, 64, 32, 8, 3), cfg(64, 128, 32, 8, 3), cfg(64, 64, 32, 4, 3)]
        return [cfg(64, 64, 32, 8 if epilogue == SWIGLU_FWD else 4, 3), cfg(64, 32, 32, 4, 3), cfg(32, 64, 32, 4, 3)]
    if epilogue == SWIGLU_FWD:
        # Two fp32 accumulators (gate and up) per program: half the columns of the plain tiles.
        return [cfg(128, 128, 64, 8, 3), cfg(128, 64, 64, 8, 4), cfg(128, 64, 64, 4, 3), cfg(64, 64, 64, 4, 4)]
    if epilogue == SWIGLU_BWD:
        # The epilogue keeps gate, up and their sigmoid live beside the accumulator; 128-row tiles
        # take K in steps of 32, as with 64 the gathered A rows spill under triton 3.6.
        return [cfg(128, 64, 32, 8, 3), cfg(128, 64, 32, 8, 4), cfg(64, 128, 64, 8, 3), cfg(64, 64, 64, 4, 4)]
    return [cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 3), cfg(128, 128, 64, 4, 4), cfg(128, 64, 64, 4, 4),
            cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 4)]


def _wgrad_configs(fma: bool = False):
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16})]
    cfg = lambda n, k, r, w, s: triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_R": r}, num_warps=w, num_stages=s)
    if fma:
        return [cfg(128, 64, 32, 8, 3), cfg(64, 128, 32, 8, 3), cfg(64, 64, 32, 4, 3), cfg(32, 64, 32, 4, 3)]
    return [cfg(128, 128, 64, 8, 3), cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 3)]


def _m_bucket(M: int) -> int:
    return min(triton.next_power_of_2(max(M, 1)), 1 << 16)


# One autotuner per epilogue, each with configs that fit its register needs. Autotuning reruns
# the kernel; every output is a plain store except SWIGLU_BWD's per-tile partial sums, whose column
# count depends on BLOCK_N, so those are zeroed before each trial. (Only there: the other
# epilogues get a placeholder in part_ptr, which must not be zeroed.)
_KEY = ["N", "K", "E", "M_BUCKET", "GATHER_A", "SCATTER_C"]


def _autotune_bench(kernel_call, quantiles):
    # Shorter than triton's default trial (25 ms warm-up, 100 ms timed): a first call with new
    # shapes should cost seconds, not minutes, across all configs and kernels.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def make_autotuners(configs=_gemm_configs, do_bench=_autotune_bench) -> dict:
    """One autotuned ``_group_gemm`` per (epilogue, fma) (``do_bench`` for tests that drive autotuning)."""
    return {(ep, fma): triton.autotune(configs=configs(ep, fma), key=_KEY, do_bench=do_bench,
                                       reset_to_zero=["part_ptr"] if ep == SWIGLU_BWD else None)(_group_gemm)
            for ep in (PLAIN, SWIGLU_FWD, SWIGLU_BWD) for fma in (False, True)}


group_gemm = make_autotuners()
group_wgrad = {fma: triton.autotune(configs=_wgrad_configs(fma), key=["N", "K", "GATHER_A", "GATHER_B", "SWIGLU_B"],
                                    do_bench=_autotune_bench)(_group_wgrad) for fma in (False, True)}

MIN_BLOCK_N = 32
_placeholders: dict = {}


def _placeholder(device) -> torch.Tensor:
    """A tensor for pointer arguments a launch does not use; never one of the op's own tensors,
    so that nothing (an autotuner's reset hook, say) can touch real data through it."""
    if device not in _placeholders:
        _placeholders[device] = torch.zeros(16, device=device, dtype=torch.int32)
    return _placeholders[device]


def launch_gemm(a, w, w_strides, N: int, K: int, offs, c, *, row_map=None, a_div: int = 1,
                gather_a: bool = False, scatter_c: bool = False, scale=None, epilogue: int = PLAIN,
                pre=None, part=None):
    """C[rows of e] = A[rows] @ W[e]^T with W[e] read as [N, K] through ``w_strides`` (e, n, k).

    M (the number of sorted rows) is ``row_map.numel()`` when a row map is given, else ``a.shape[0]``.
    Under SWIGLU_FWD, W[e] holds 2N rows (gate then up) and C gets silu(gate) * up; ``pre``
    (optional) gets [gate | up]. Under SWIGLU_BWD, A @ W^T is d(act); ``pre`` is read, C gets
    d[gate | up] and ``part`` [M, >= cdiv(N, MIN_BLOCK_N)] the per-tile sums for d(scale).
    """
    M = row_map.numel() if row_map is not None else a.shape[0]
    E = offs.numel()
    if M == 0 or N == 0:
        return c
    dummy = _placeholder(offs.device)
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E + 1) * triton.cdiv(N, meta["BLOCK_N"]),)
    precision = _precision(a.dtype)
    group_gemm[epilogue, precision == "ieee"][grid](
        a, w, c, offs,
        row_map if row_map is not None else dummy, scale if scale is not None else dummy,
        pre if pre is not None else dummy, part if part is not None else dummy,
        M, N, K, E, _m_bucket(M),
        a.stride(0), a.stride(1), *w_strides, c.stride(0), c.stride(1),
        pre.stride(0) if pre is not None else 0, part.stride(0) if part is not None else 0,
        A_DIV=a_div, GATHER_A=gather_a, SCATTER_C=scatter_c, SCALE=scale is not None,
        EPILOGUE=epilogue, STORE_PRE=pre is not None and epilogue == SWIGLU_FWD,
        PRECISION=precision, BLOCK_G=triton.next_power_of_2(E + 2),
    )
    return c


def launch_wgrad(a, b, dw, dw_strides, N: int, K: int, offs, *, row_map=None, a_div: int = 1,
                 gather_a: bool = False, scale_a=None, b_div: int = 1, gather_b: bool = False,
                 swiglu_b: bool = False):
    """dW[e] [N, K] (written through ``dw_strides``) = sum over rows r of e of A[r, :N]^T B[r, :K]."""
    E = offs.numel()
    if E == 0 or N == 0 or K == 0:
        return dw
    dummy = _placeholder(offs.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), E)
    precision = _precision(a.dtype)
    group_wgrad[precision == "ieee"][grid](
        a, b, dw, offs,
        row_map if row_map is not None else dummy, scale_a if scale_a is not None else dummy,
        N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), *dw_strides,
        A_DIV=a_div, GATHER_A=gather_a, SCALE_A=scale_a is not None,
        B_DIV=b_div, GATHER_B=gather_b, SWIGLU_B=swiglu_b, PRECISION=precision,
    )
    return dw
