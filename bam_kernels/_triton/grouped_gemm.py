"""Host side of the grouped expert GEMMs: tile configs, autotuners, launches, and grouped_mm's
forward and backward. The kernels are in ``grouped_gemm_kernels.py``."""
from __future__ import annotations

import torch
import triton

from .._dispatch import interpreting
from .common import autotune_bench, or_placeholder, precision, size_bucket
from .grouped_gemm_kernels import PLAIN, SWIGLU_BWD, SWIGLU_FWD, _group_gemm, _group_wgrad

__all__ = ["MIN_BLOCK_N", "PLAIN", "SWIGLU_BWD", "SWIGLU_FWD", "grouped_mm_backward", "grouped_mm_forward",
           "launch_gemm", "launch_wgrad", "make_autotuners"]

# ---------------------------------------------------------------------------------------------
# Launch configuration

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
        return [cfg(64, 64, 32, 8 if epilogue == SWIGLU_FWD else 4, 3), cfg(64, 32, 32, 4, 3),
                cfg(32, 64, 32, 4, 3)]
    if epilogue == SWIGLU_FWD:
        # Two fp32 accumulators (gate and up) per program: half the columns of the plain tiles.
        return [cfg(128, 128, 64, 8, 3), cfg(128, 64, 64, 8, 4), cfg(128, 64, 64, 4, 3),
                cfg(64, 64, 64, 4, 4)]
    if epilogue == SWIGLU_BWD:
        # The epilogue keeps gate, up and their sigmoid live beside the accumulator; 128-row tiles
        # take K in steps of 32, as with 64 the gathered A rows spill under triton 3.6.
        return [cfg(128, 64, 32, 8, 3), cfg(128, 64, 32, 8, 4), cfg(64, 128, 64, 8, 3), cfg(64, 64, 64, 4, 4)]
    return [cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 3), cfg(128, 128, 64, 4, 4), cfg(128, 64, 64, 4, 4),
            cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 4)]


def _wgrad_configs(fma: bool = False):
    if interpreting():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32, "BLOCK_R": 16})]
    cfg = lambda n, k, r, w, s: triton.Config({"BLOCK_N": n, "BLOCK_K": k, "BLOCK_R": r},
                                              num_warps=w, num_stages=s)
    if fma:
        return [cfg(128, 64, 32, 8, 3), cfg(64, 128, 32, 8, 3), cfg(64, 64, 32, 4, 3), cfg(32, 64, 32, 4, 3)]
    return [cfg(128, 128, 64, 8, 3), cfg(128, 64, 64, 4, 4), cfg(64, 128, 64, 4, 4), cfg(64, 64, 64, 4, 3)]


# One autotuner per epilogue, each with configs that fit its register needs. Autotuning reruns
# the kernel; every output is a plain store except SWIGLU_BWD's per-tile partial sums, whose column
# count depends on BLOCK_N, so those are zeroed before each trial. (Only there: the other
# epilogues get a placeholder in part_ptr, which must not be zeroed.)
_KEY = ["N", "K", "E", "M_BUCKET", "GATHER_A", "SCATTER_C"]


def make_autotuners(configs=_gemm_configs, do_bench=autotune_bench) -> dict:
    """One autotuned ``_group_gemm`` per (epilogue, fma) (``do_bench`` for tests that drive autotuning)."""
    return {(ep, fma): triton.autotune(configs=configs(ep, fma), key=_KEY, do_bench=do_bench,
                                       reset_to_zero=["part_ptr"] if ep == SWIGLU_BWD else None)(_group_gemm)
            for ep in (PLAIN, SWIGLU_FWD, SWIGLU_BWD) for fma in (False, True)}


group_gemm = make_autotuners()
_WGRAD_KEY = ["N", "K", "GATHER_A", "GATHER_B", "SWIGLU_B"]
group_wgrad = {fma: triton.autotune(configs=_wgrad_configs(fma), key=_WGRAD_KEY,
                                    do_bench=autotune_bench)(_group_wgrad)
               for fma in (False, True)}

MIN_BLOCK_N = 32  # the narrowest column tile of any config: SWIGLU_BWD's ``part`` needs this many columns


# ---------------------------------------------------------------------------------------------
# Launches


def launch_gemm(a, w, offs, c, *, row_map=None, a_div: int = 1, gather_a: bool = False,
                scatter_c: bool = False, scale=None, epilogue: int = PLAIN, pre=None, part=None):
    """C[rows of e] = A[rows] @ W[e]^T, with ``w`` any [E, N, K] view (a transposed weight is
    passed as ``w.transpose(1, 2)``).

    M (the number of sorted rows) is ``row_map.numel()`` when a row map is given, else ``a.shape[0]``.
    Under SWIGLU_FWD, W[e] holds 2N rows (gate then up) and C gets silu(gate) * up; ``pre``
    (optional) gets [gate | up]. Under SWIGLU_BWD, A @ W^T is d(act); ``pre`` is read, C gets
    d[gate | up] and ``part`` [M, >= cdiv(N, MIN_BLOCK_N)] the per-tile sums for d(scale).
    """
    M = row_map.numel() if row_map is not None else a.shape[0]
    E, N, K = w.shape
    if epilogue == SWIGLU_FWD:
        N //= 2
    if M == 0 or N == 0:
        return c
    grid = lambda meta: ((triton.cdiv(M, meta["BLOCK_M"]) + E + 1) * triton.cdiv(N, meta["BLOCK_N"]),)
    dot_precision = precision(a.dtype)
    at = lambda t: or_placeholder(t, offs.device)
    group_gemm[epilogue, dot_precision == "ieee"][grid](
        a_ptr=a, w_ptr=w, c_ptr=c, offs_ptr=offs, row_map_ptr=at(row_map), scale_ptr=at(scale),
        pre_ptr=at(pre), part_ptr=at(part),
        M=M, N=N, K=K, E=E, M_BUCKET=size_bucket(M),
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_we=w.stride(0), stride_wn=w.stride(1), stride_wk=w.stride(2),
        stride_cm=c.stride(0), stride_cn=c.stride(1),
        stride_pm=pre.stride(0) if pre is not None else 0,
        stride_qm=part.stride(0) if part is not None else 0,
        A_DIV=a_div, GATHER_A=gather_a, SCATTER_C=scatter_c, SCALE=scale is not None,
        EPILOGUE=epilogue, STORE_PRE=pre is not None and epilogue == SWIGLU_FWD,
        PRECISION=dot_precision, BLOCK_G=triton.next_power_of_2(E + 2),
    )
    return c


def launch_wgrad(a, b, dw, offs, *, row_map=None, a_div: int = 1, gather_a: bool = False, scale_a=None,
                 b_div: int = 1, gather_b: bool = False, swiglu_b: bool = False):
    """dW[e] = sum over rows r of e of A[r, :N]^T B[r, :K], written into ``dw``, any [E, N, K] view."""
    E, N, K = dw.shape
    if E == 0 or N == 0 or K == 0:
        return dw
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]), E)
    dot_precision = precision(a.dtype)
    at = lambda t: or_placeholder(t, offs.device)
    group_wgrad[dot_precision == "ieee"][grid](
        a_ptr=a, b_ptr=b, dw_ptr=dw, offs_ptr=offs, row_map_ptr=at(row_map), scale_ptr=at(scale_a),
        N=N, K=K,
        stride_am=a.stride(0), stride_an=a.stride(1), stride_bm=b.stride(0), stride_bk=b.stride(1),
        stride_de=dw.stride(0), stride_dn=dw.stride(1), stride_dk=dw.stride(2),
        A_DIV=a_div, GATHER_A=gather_a, SCALE_A=scale_a is not None,
        B_DIV=b_div, GATHER_B=gather_b, SWIGLU_B=swiglu_b, PRECISION=dot_precision,
    )
    return dw


# ---------------------------------------------------------------------------------------------
# grouped_mm


def grouped_mm_forward(x_MK, w_ENK, offs_E):
    """y [M, N]: rows of expert e of x times w[e]^T."""
    y_MN = torch.empty(x_MK.shape[0], w_ENK.shape[1], device=x_MK.device, dtype=x_MK.dtype)
    return launch_gemm(x_MK, w_ENK, offs_E.to(torch.int32).contiguous(), y_MN)


def grouped_mm_backward(dy_MN, x_MK, w_ENK, offs_E, need_dx: bool, need_dw: bool):
    """(dx, dw); a gradient not asked for comes back as an empty tensor."""
    offs_E = offs_E.to(torch.int32).contiguous()
    dx_MK, dw_ENK = x_MK.new_empty(0), w_ENK.new_empty(0)
    if need_dx:
        dx_MK = launch_gemm(dy_MN, w_ENK.transpose(1, 2), offs_E,
                            torch.empty(x_MK.shape, device=x_MK.device, dtype=x_MK.dtype))
    if need_dw:
        dw_ENK = launch_wgrad(dy_MN, x_MK, torch.empty(w_ENK.shape, device=w_ENK.device, dtype=w_ENK.dtype),
                              offs_E)
    return dx_MK, dw_ENK
