"""Soft mixture-of-attention over shared or per-expert KV, with autograd, on every backend."""
from __future__ import annotations

import itertools
import numbers

import torch
import torch.nn.functional as F

from . import _checks, reference
from ._dispatch import autocast_to, backend_for, call_directly, needs_grad


def _check_moa(q, k, v, mix, causal, scale, kv_lens):
    _checks.tensor("q", q, ndim=5, floating=True)
    _checks.tensor("k", k, floating=True)
    if k.dim() not in (4, 5):
        raise ValueError(f"k must have shape [B, S, Hkv, Dh] (shared KV) or [B, S, E, Hkv, Dh] (expert KV), "
                         f"got {tuple(k.shape)}")
    _checks.tensor("v", v, floating=True)
    _checks.shape("v", v, tuple(k.shape), "like k")
    _checks.tensor("mix", mix, ndim=3, floating=True)
    B, T, E, H, Dh = q.shape
    if min(E, H, Dh) < 1:
        raise ValueError(f"q must have shape [B, T, E, H, Dh] with E, H, Dh >= 1, got {tuple(q.shape)}")
    Hkv = k.shape[-2]
    expected = "[B, S, E, Hkv, Dh]" if k.dim() == 5 else "[B, S, Hkv, Dh]"
    if k.shape[0] != B or k.shape[-1] != Dh or (k.dim() == 5 and k.shape[2] != E):
        raise ValueError(f"k must have shape {expected} with B = {B}, "
                         f"{'E = ' + str(E) + ', ' if k.dim() == 5 else ''}Dh = {Dh} from q, got {tuple(k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k has Hkv = {Hkv} KV heads, which must divide the H = {H} query heads per expert of q")
    _checks.shape("mix", mix, (B, T, E), "[B, T, E] from q")
    _checks.same_dtype({"q": q, "k": k, "v": v})
    named = {"q": q, "k": k, "v": v, "mix": mix}
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)):
        raise ValueError(f"scale must be a float or None, got {scale!r}")
    if kv_lens is not None:
        _checks.tensor("kv_lens", kv_lens, ndim=1, floating=False)
        _checks.shape("kv_lens", kv_lens, (B,), "[B] from q")
        named["kv_lens"] = kv_lens
        if not kv_lens.is_cuda and B > 0:
            lo, hi = int(kv_lens.min()), int(kv_lens.max())
            if lo < 0 or hi > k.shape[1]:
                raise ValueError(f"kv_lens must hold valid key counts in [0, S = {k.shape[1]}], got [{lo}, {hi}]")
    _checks.same_device(named)


def _stacked_heads(q, k, v):
    """Stack the experts' query heads so that SDPA's GQA mapping (query head i reads KV head
    i // (Hq / Hkv)) is the MoA one: order (Hkv, E, R) with shared KV, (E, Hkv, R) with expert KV."""
    B, T, E, H, Dh = q.shape
    S, Hkv = k.shape[1], k.shape[-2]
    q6 = q.reshape(B, T, E, Hkv, H // Hkv, Dh)
    if k.dim() == 5:
        q_BNTD = q6.permute(0, 2, 3, 4, 1, 5).reshape(B, E * H, T, Dh)
        k_BGSD = k.permute(0, 2, 3, 1, 4).reshape(B, E * Hkv, S, Dh)
        v_BGSD = v.permute(0, 2, 3, 1, 4).reshape(B, E * Hkv, S, Dh)
    else:
        q_BNTD = q6.permute(0, 3, 2, 4, 1, 5).reshape(B, E * H, T, Dh)
        k_BGSD, v_BGSD = k.transpose(1, 2), v.transpose(1, 2)
    return q_BNTD, k_BGSD, v_BGSD


def _unstack_heads(o_BNTD, q_shape, Hkv: int, expert_kv: bool):
    B, T, E, H, Dh = q_shape
    if expert_kv:
        return o_BNTD.view(B, E, Hkv, H // Hkv, T, Dh).permute(0, 4, 1, 2, 3, 5).reshape(B, T, E, H, Dh)
    return o_BNTD.view(B, Hkv, E, H // Hkv, T, Dh).permute(0, 4, 2, 1, 3, 5).reshape(B, T, E, H, Dh)


def _moa_torch(q, k, v, mix, causal, scale, kv_lens):
    """The torch path. Keys past kv_lens may hold anything (a preallocated cache: NaN, inf), and a
    mask alone would still multiply their zero probabilities by them. On the CPU, where reading
    the lengths costs no sync, each run of rows of one length attends over its valid keys only:
    views, so nothing past kv_lens is read or copied, and a ragged batch takes the no-mask paths
    (decoding 4 rows of 300 to 1024 keys: 0.55-0.6x the time of one masked call over the cache,
    measured on 2 shared cores). On CUDA those keys are zeroed (a select: no host sync), then
    masked."""
    if kv_lens is None:
        return _moa_sdpa(q, k, v, mix, causal, scale, None)
    kv_len_B = kv_lens.to(device=q.device, dtype=torch.int64).clamp(0, k.shape[1])
    if q.is_cuda or q.shape[0] == 0:
        valid_BS = torch.arange(k.shape[1], device=k.device) < kv_len_B[:, None]
        valid = valid_BS.view(*valid_BS.shape, *[1] * (k.dim() - 2))
        return _moa_sdpa(q, torch.where(valid, k, 0), torch.where(valid, v, 0), mix, causal, scale, kv_len_B)
    runs = [(n, len(list(rows))) for n, rows in itertools.groupby(kv_len_B.tolist())]
    sizes = [size for _, size in runs]
    # split, not slices: its backward concatenates the runs' gradients (a slice's would
    # materialise a gradient of the whole input per run).
    chunks = zip(q.split(sizes), k.split(sizes), v.split(sizes), mix.split(sizes))
    return torch.cat([_moa_sdpa(q_r, k_r[:, :n], v_r[:, :n], mix_r, causal, scale, None)
                      for (n, _), (q_r, k_r, v_r, mix_r) in zip(runs, chunks)])


def _moa_sdpa(q, k, v, mix, causal, scale, kv_len_B):
    """SDPA over the stacked heads, then the mix; kv_len_B [B] int64 (optional) masks the keys
    past each row's length, which must hold finite values. When every query of a row sees the
    same keys (decoding one token, or no causal mask) the query heads that share a KV head are
    packed into the rows of one attention over that KV head: one matrix product instead of
    E*H/Hkv matvecs."""
    B, T, E, H, Dh = q.shape
    S = k.shape[1]
    q_BNTD, k_BGSD, v_BGSD = _stacked_heads(q, k, v)
    mix_BTE = mix.to(q.dtype)
    mask_B1TS = None
    # One query per row with every key valid sees them all, causal or not: no mask to build.
    if kv_len_B is not None or (causal and S != T and not (T == 1 and S > 0)):
        keys_S = torch.arange(S, device=q.device)
        kv_len_B = torch.full((B,), S, device=q.device) if kv_len_B is None else kv_len_B
        visible_BTS = keys_S[None, None, :] < kv_len_B[:, None, None]
        if causal:
            queries_T = torch.arange(T, device=q.device)
            visible_BTS = visible_BTS & (keys_S[None, None, :] <= queries_T[None, :, None] + (kv_len_B - T)[:, None, None])
        visible_BTS = visible_BTS.expand(B, T, S)
        any_BT = visible_BTS.any(-1)
        # A query without keys attends to all of them (finite) and its output is zeroed through the mix.
        mask_B1TS = (visible_BTS | ~any_BT[..., None])[:, None]
        mix_BTE = mix_BTE * any_BT[..., None].to(q.dtype)
    if not causal or T == 1:
        G = k_BGSD.shape[1]
        mask = None if mask_B1TS is None else mask_B1TS[:, :, :1]
        o_BGMD = F.scaled_dot_product_attention(q_BNTD.reshape(B, G, -1, Dh), k_BGSD, v_BGSD, attn_mask=mask,
                                                scale=scale)
        o_BNTD = o_BGMD.reshape(q_BNTD.shape)
    else:
        o_BNTD = F.scaled_dot_product_attention(q_BNTD, k_BGSD, v_BGSD, attn_mask=mask_B1TS,
                                                is_causal=mask_B1TS is None, scale=scale, enable_gqa=True)
    o_BTEHD = _unstack_heads(o_BNTD, q.shape, k.shape[-2], k.dim() == 5)
    return o_BTEHD * mix_BTE[..., None, None]


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("bam::moa_attention", mutates_args=())
def _moa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor,
                kv_lens: torch.Tensor | None, causal: bool, scale: float,
                save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o before the mix, log-sum-exp); the last two are empty unless ``save``."""
    from ._triton import attention as kernels
    o, o_unmixed, lse = kernels.forward(q, k, v, mix, kv_lens, causal, scale, save)
    if not save:
        o_unmixed, lse = q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return o, o_unmixed, lse


@_moa_triton.register_fake
def _(q, k, v, mix, kv_lens, causal, scale, save):
    if not save:
        return torch.empty_like(q), q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(q.shape[:4], dtype=torch.float32)


@torch.library.custom_op("bam::moa_attention_backward", mutates_args=())
def _moa_triton_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor,
                         kv_lens: torch.Tensor | None, o_unmixed: torch.Tensor, lse: torch.Tensor, causal: bool,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmix)."""
    from ._triton import attention as kernels
    dq, dk, dv, dp_BTEH = kernels.backward(do, q, k, v, mix, kv_lens, o_unmixed, lse, causal, scale)
    return dq, dk, dv, dp_BTEH.sum(-1).to(mix.dtype)


@_moa_triton_backward.register_fake
def _(do, q, k, v, mix, kv_lens, o_unmixed, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix)


def _moa_setup(ctx, inputs, output):
    q, k, v, mix, kv_lens, ctx.causal, ctx.scale, _save = inputs
    _o, o_unmixed, lse = output
    # The saved-for-backward outputs get no gradient: no zero tensors materialised for them.
    ctx.mark_non_differentiable(o_unmixed, lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, mix, kv_lens, o_unmixed, lse)


def _moa_grad(ctx, do, _do_unmixed, _dlse):
    if do is None:
        return (None,) * 8
    q, k, v, mix, kv_lens, o_unmixed, lse = ctx.saved_tensors
    dq, dk, dv, dmix = torch.ops.bam.moa_attention_backward(do.contiguous(), q, k, v, mix, kv_lens, o_unmixed, lse,
                                                             ctx.causal, ctx.scale)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, dmix if need[3] else None,
            None, None, None, None)


torch.library.register_autograd("bam::moa_attention", _moa_grad, setup_context=_moa_setup)


def moa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor, causal: bool = True,
                  scale: float | None = None, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Soft mixture of attention: every expert's heads attend, each output scaled by its router weight.

    q [B, T, E, H, Dh]; k, v [B, S, Hkv, Dh] (shared KV: head h of every expert reads KV head
    ``h // (H/Hkv)``) or [B, S, E, Hkv, Dh] (expert KV: expert e reads its own); mix [B, T, E], any
    float dtype. Returns [B, T, E, H, Dh] in q's dtype:
    ``o[b,t,e,h] = mix[b,t,e] * softmax(q[b,t,e,h] . k^T * scale + mask) v``, scale defaulting to
    ``Dh ** -0.5``. kv_lens [B] (integer, optional) counts the valid keys of each row; keys past it
    are ignored whatever they hold (NaN, inf: a preallocated cache) and get zero gradients. Causal masking aligns the last query with the last valid key: query t sees key s
    iff s <= t + kv_lens[b] - T. A query that sees no key gets zeros. Differentiable in q, k, v and
    mix; the Triton backward is deterministic. Inside an autocast region q, k and v run in its
    dtype, as scaled_dot_product_attention would. The Triton path is the custom op
    ``torch.ops.bam.moa_attention`` and the torch path plain torch ops, so torch.compile traces both.
    """
    q, k, v = autocast_to(q, k, v)
    _check_moa(q, k, v, mix, causal, scale, kv_lens)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backend_for(q, k, v)
    if backend == "reference":
        return reference.moa_attention(q, k, v, mix, causal, scale, kv_lens)
    if backend == "torch" or q.numel() == 0 or k.shape[1] == 0:
        return _moa_torch(q, k, v, mix, causal, scale, kv_lens)
    from ._triton.attention import MAX_HEAD_DIM
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {q.shape[-1]}; the triton backend supports up to {MAX_HEAD_DIM}")
    if kv_lens is not None:
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if call_directly(q, k, v, mix, kv_lens):
        from ._triton import attention as kernels
        return kernels.forward(q, k, v, mix, kv_lens, causal, scale, False)[0]
    return _moa_triton(q, k, v, mix, kv_lens, causal, scale, needs_grad(q, k, v, mix))[0]
