"""Host side of the soft mixture-of-attention: tile configs, autotuners, and the launches of the
forward and backward kernels (``attention_kernels.py``, where the algorithm is described)."""
from __future__ import annotations

import torch
import triton

from .._dispatch import interpreting
from .attention_kernels import _bwd_dkdv, _bwd_dq, _bwd_pre, _combine, _fwd
from .common import or_placeholder, precision, size_bucket

__all__ = ["MAX_HEAD_DIM", "backward", "forward", "num_splits"]

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256

# Allocator of every kernel output; the tests swap in one that fills with NaN, so that an element a
# kernel fails to write shows up.
empty = torch.empty

# ---------------------------------------------------------------------------------------------
# Launch configuration

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
    return [_cfg(128, 64, 8, 3), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 3), _cfg(64, 64, 8, 2),
            _cfg(64, 32, 4, 3)]


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


_KEY = ["T_KEY", "S_KEY", "E", "Gq", "HEAD_DIM", "CAUSAL", "HAS_KVLEN", "HAS_KVSTART", "SAVE"]
_BWD_KEY = ["T_KEY", "S_KEY", "E", "Gq", "HEAD_DIM", "CAUSAL", "HAS_KVLEN", "HAS_KVSTART"]


def _autotuned(fn, configs, key) -> dict:
    """{fp32: autotuned fn}: one autotuner per tile family."""
    return {fp32: triton.autotune(configs=configs(fp32), key=key)(fn) for fp32 in (False, True)}


# Every output of these kernels is a plain store, so autotuning's reruns are harmless.
fwd = _autotuned(_fwd, _fwd_configs, _KEY)
fwd_decode = _autotuned(_fwd, _decode_configs, _KEY)
bwd_dkdv = _autotuned(_bwd_dkdv, _dkdv_configs, _BWD_KEY)
bwd_dq = _autotuned(_bwd_dq, _dq_configs, _BWD_KEY)

SPLIT_GRANULE = 256  # keys: every chunk of a split forward is a multiple of this


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


def _sizes(q, k, v, mix, kv_lens, kv_start, causal: bool) -> dict:
    """The launch arguments every kernel but ``_bwd_pre`` shares: sizes, strides, autotune keys and
    meta. Shared KV ([B, S, Hkv, Dh]) reads with an expert stride of 0."""
    B, T, E, H, Dh = q.shape
    expert_kv = k.dim() == 5
    Hkv = k.shape[-2]
    R = H // Hkv
    sk, sv = k.stride(), v.stride()
    kv_strides = (dict(stride_kb=sk[0], stride_ks=sk[1], stride_ke=sk[2], stride_kh=sk[3],
                       stride_vb=sv[0], stride_vs=sv[1], stride_ve=sv[2], stride_vh=sv[3]) if expert_kv else
                  dict(stride_kb=sk[0], stride_ks=sk[1], stride_ke=0, stride_kh=sk[2],
                       stride_vb=sv[0], stride_vs=sv[1], stride_ve=0, stride_vh=sv[2]))
    return dict(B=B, T=T, S=k.shape[1], E=E, H=H, Hkv=Hkv, G=E * Hkv if expert_kv else Hkv,
                Gq=R if expert_kv else E * R, R=R,
                stride_qb=q.stride(0), stride_qt=q.stride(1), stride_qe=q.stride(2), stride_qh=q.stride(3),
                **kv_strides, stride_mb=mix.stride(0), stride_mt=mix.stride(1), stride_me=mix.stride(2),
                T_KEY=size_bucket(T), S_KEY=size_bucket(k.shape[1]),
                HEAD_DIM=Dh, CAUSAL=causal, HAS_KVLEN=kv_lens is not None,
                HAS_KVSTART=kv_start is not None, PRECISION=precision(q.dtype),
                BLOCK_D=max(16, triton.next_power_of_2(Dh)))


def forward(q, k, v, mix, kv_lens, causal: bool, scale: float, save: bool, splits: int | None = None,
            kv_start=None):
    """Returns (o, o_unmixed, lse); the last two only when ``save`` (else None).

    q [B,T,E,H,Dh], k/v [B,S,Hkv,Dh] or [B,S,E,Hkv,Dh] with unit stride on Dh; mix [B,T,E] any float
    dtype and strides; kv_lens and kv_start (each row's first valid key) int32 [B] or None.
    ``splits`` overrides the key-chunk count; the chunks split each row's keys from its kv_start.
    """
    a = _sizes(q, k, v, mix, kv_lens, kv_start, causal)
    B, T, S, G, Gq, Dh = a["B"], a["T"], a["S"], a["G"], a["Gq"], a["HEAD_DIM"]
    rows = T * Gq
    o = empty(q.shape, device=q.device, dtype=q.dtype)
    ou = empty(q.shape, device=q.device, dtype=q.dtype) if save else None
    lse = empty(q.shape[:4], device=q.device, dtype=torch.float32) if save else None
    if splits is None:
        splits = num_splits(B, G, rows, S, q.device)
    at = lambda t: or_placeholder(t, q.device)
    tune = fwd if splits <= 1 else fwd_decode
    if splits <= 1:
        grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * B * G,)
        tune[q.dtype == torch.float32][grid](
            q_ptr=q, k_ptr=k, v_ptr=v, mix_ptr=mix, kvlen_ptr=at(kv_lens), kvstart_ptr=at(kv_start), o_ptr=o,
            ou_ptr=at(ou), lse_ptr=at(lse), wso_ptr=at(None), wsl_ptr=at(None),
            chunk=S, qk_scale=scale * LOG2E, SPLIT=False, SAVE=save, **a)
        return o, ou, lse
    chunk = triton.cdiv(triton.cdiv(S, splits), SPLIT_GRANULE) * SPLIT_GRANULE
    splits = triton.cdiv(S, chunk)
    ws_o = empty((splits, B * G, rows, Dh), device=q.device, dtype=torch.float32)
    ws_lse = empty((splits, B * G, rows), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * B * G * splits,)
    tune[q.dtype == torch.float32][grid](
        q_ptr=q, k_ptr=k, v_ptr=v, mix_ptr=mix, kvlen_ptr=at(kv_lens), kvstart_ptr=at(kv_start),
        o_ptr=at(None), ou_ptr=at(None),
        lse_ptr=at(None), wso_ptr=ws_o, wsl_ptr=ws_lse,
        chunk=chunk, qk_scale=scale * LOG2E, SPLIT=True, SAVE=save, **a)
    block_m = 16 if interpreting() else 32
    _combine[(triton.cdiv(rows, block_m) * B * G,)](
        wso_ptr=ws_o, wsl_ptr=ws_lse, mix_ptr=mix, o_ptr=o, ou_ptr=at(ou), lse_ptr=at(lse),
        B=B, T=T, E=a["E"], H=a["H"], Hkv=a["Hkv"], G=G, Gq=Gq, R=a["R"], num_splits=splits,
        stride_mb=mix.stride(0), stride_mt=mix.stride(1), stride_me=mix.stride(2),
        HEAD_DIM=Dh, SAVE=save, BLOCK_M=block_m, BLOCK_D=a["BLOCK_D"])
    return o, ou, lse


def backward(do, q, k, v, mix, kv_lens, ou, lse, causal: bool, scale: float, kv_start=None):
    """Returns (dq, dk, dv, dp) with dp [B,T,E,H] fp32 = rowsum(dO * O_unmixed), whose sum over H is
    d(mix). dq is contiguous like q; dk, dv contiguous like k, v (zeros outside [kv_start, kv_len))."""
    a = _sizes(q, k, v, mix, kv_lens, kv_start, causal)
    B, T, S, G, Gq = a["B"], a["T"], a["S"], a["G"], a["Gq"]
    do = do.contiguous()
    n_rows = q.shape[0] * q.shape[1] * q.shape[2] * q.shape[3]
    dp = empty(q.shape[:4], device=q.device, dtype=torch.float32)
    block_r = 16 if interpreting() else 64
    _bwd_pre[(triton.cdiv(n_rows, block_r),)](do_ptr=do, ou_ptr=ou, dp_ptr=dp, n_rows=n_rows,
                                              HEAD_DIM=a["HEAD_DIM"], BLOCK_R=block_r, BLOCK_D=a["BLOCK_D"])
    dq = empty(q.shape, device=q.device, dtype=q.dtype)
    dk = empty(k.shape, device=k.device, dtype=k.dtype)
    dv = empty(v.shape, device=v.device, dtype=v.dtype)
    common = dict(q_ptr=q, k_ptr=k, v_ptr=v, mix_ptr=mix, kvlen_ptr=or_placeholder(kv_lens, q.device),
                  kvstart_ptr=or_placeholder(kv_start, q.device),
                  do_ptr=do, lse_ptr=lse, dp_ptr=dp, sm_scale=scale, qk_scale=scale * LOG2E, **a)
    grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * G,)
    bwd_dkdv[q.dtype == torch.float32][grid](dk_ptr=dk, dv_ptr=dv, **common)
    grid = lambda meta: (triton.cdiv(T * Gq, meta["BLOCK_M"]) * B * G,)
    bwd_dq[q.dtype == torch.float32][grid](dq_ptr=dq, **common)
    return dq, dk, dv, dp
