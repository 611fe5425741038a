"""The CPU (torch) path of ``grouped_mm``, and the grouped matmul the torch MoE path is built on:
``torch._grouped_mm`` where this torch has it for the device and dtype, else a loop over experts."""
from __future__ import annotations

import torch


def segments(offs_E: torch.Tensor, empty: bool = False):
    """(expert, first row, end row) of every expert with rows (``empty``: of every expert) from
    cumulative row ends."""
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start or empty:
            yield e, start, end
        start = end


_native_gmm: dict = {}


def gmm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """Per-expert matmuls over row groups, in one call.

    b [E, K, N]: rows ``offs[e-1]:offs[e]`` of a [M, K] times b[e] -> [M, N].
    b [M, N] (2-D): a [K, M] with its columns grouped -> [E, K, N], ``a[:, rows] @ b[rows]``.
    Rows past ``offs[-1]`` give zeros; an expert without rows gives zeros. torch._grouped_mm where
    this torch has it for the device and dtype (one parallel region instead of one per expert,
    which matters on a busy CPU), else a loop over the experts.
    """
    # What torch._grouped_mm refuses is remembered per device, dtype and alignment: it needs 16-byte
    # aligned strides, so one odd-sized call must not turn it off for the aligned calls after it.
    key = (a.device.type, a.dtype, _aligned16(a) and _aligned16(b))
    if _native_gmm.get(key, True) and hasattr(torch, "_grouped_mm"):
        try:
            out = torch._grouped_mm(a, b, offs_E)
            _native_gmm[key] = True
            return zero_tail(out, offs_E) if b.dim() == 3 else out
        except (RuntimeError, NotImplementedError):
            _native_gmm[key] = False
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[2])
        for e, lo, hi in segments(offs_E):
            torch.mm(a[lo:hi], b[e], out=out[lo:hi])
        return out
    out = a.new_zeros(offs_E.numel(), a.shape[0], b.shape[1])
    for e, lo, hi in segments(offs_E):
        torch.mm(a[:, lo:hi], b[lo:hi], out=out[e])
    return out


def _aligned16(t: torch.Tensor) -> bool:
    """Whether ``t`` starts on 16 bytes and every stride of a dimension longer than 1 (but a unit
    one) is a multiple of 16 bytes."""
    size = t.element_size()
    return t.data_ptr() % 16 == 0 and all(st == 1 or n == 1 or (st * size) % 16 == 0
                                          for st, n in zip(t.stride(), t.shape))


def zero_tail(t_M, offs_E):
    """Zero the rows past the last offset (none when every id was valid)."""
    end = int(offs_E[-1]) if offs_E.numel() else 0
    if end < t_M.shape[0]:
        t_M[end:].zero_()
    return t_M


def forward(x_MK, w_ENK, offs_E):
    """y [M, N]: rows of expert e of x times w[e]^T."""
    return gmm(x_MK, w_ENK.transpose(1, 2), offs_E.to(torch.int32))


def backward(dy_MN, x_MK, w_ENK, offs_E, need_dx: bool, need_dw: bool):
    """(dx, dw); a gradient not asked for comes back as an empty tensor."""
    offs_E = offs_E.to(torch.int32)
    dx_MK = gmm(dy_MN, w_ENK, offs_E) if need_dx else x_MK.new_empty(0)
    dw_ENK = gmm(dy_MN.T, x_MK, offs_E) if need_dw else w_ENK.new_empty(0)
    return dx_MK, dw_ENK
