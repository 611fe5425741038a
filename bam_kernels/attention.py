"""``moa_attention``: soft mixture of attention over shared or per-expert KV, with autograd, on every backend.

Laid out like every op module: checks, the backend implementation, the custom op and its fake,
the backward op and its fake, autograd registration, the public function. The CPU path is in
``_torch/attention.py``, the Triton one in ``_triton/attention.py`` (kernels in
``_triton/attention_kernels.py``).

One difference from the other ops, on purpose: only the Triton path is the custom op. The torch
path is SDPA and plain differentiable torch ops, so autograd and torch.compile see through it; a
custom op around it would need a second, hand-written backward for no gain.
"""
from __future__ import annotations

import math
import numbers

import torch

from . import _checks, reference
from ._dispatch import autocast_to, backend_for, call_directly, needs_grad
from ._torch import attention as torch_path


def _check_moa_attention(q, k, v, mix, causal, scale, kv_lens, kv_start=None):
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
        from_q = f"B = {B}, E = {E}, Dh = {Dh}" if k.dim() == 5 else f"B = {B}, Dh = {Dh}"
        raise ValueError(f"k must have shape {expected} with {from_q} from q, got {tuple(k.shape)}")
    if Hkv < 1 or H % Hkv:
        raise ValueError(f"k has Hkv = {Hkv} KV heads, which must divide the H = {H} query heads per "
                         f"expert of q")
    _checks.shape("mix", mix, (B, T, E), "[B, T, E] from q")
    _checks.same_dtype({"q": q, "k": k, "v": v})
    named = {"q": q, "k": k, "v": v, "mix": mix}
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be a bool, got {causal!r}")
    if scale is not None and (not isinstance(scale, numbers.Real) or isinstance(scale, bool)
                              or not math.isfinite(scale)):
        raise ValueError(f"scale must be a finite float or None, got {scale!r}")
    if kv_lens is not None:
        _checks.tensor("kv_lens", kv_lens, ndim=1, floating=False)
        _checks.shape("kv_lens", kv_lens, (B,), "[B] from q")
        named["kv_lens"] = kv_lens
        if not kv_lens.is_cuda and B > 0:
            lo, hi = int(kv_lens.min()), int(kv_lens.max())
            if lo < 0 or hi > k.shape[1]:
                raise ValueError(f"kv_lens must hold valid key counts in [0, S = {k.shape[1]}], "
                                 f"got [{lo}, {hi}]")
    if kv_start is not None:
        _checks.tensor("kv_start", kv_start, ndim=1, floating=False)
        _checks.shape("kv_start", kv_start, (B,), "[B] from q")
        named["kv_start"] = kv_start
    _checks.same_device(named)
    if kv_start is not None and not kv_start.is_cuda and B > 0:
        # Each row's first valid key, at most its end: kv_lens[b] or S (read on the CPU only: no sync).
        end_B = torch.full((B,), k.shape[1]) if kv_lens is None else kv_lens.to(torch.int64)
        bad_B = (kv_start < 0) | (kv_start.to(torch.int64) > end_B)
        if bool(bad_B.any()):
            b = int(bad_B.nonzero()[0])
            raise ValueError(f"kv_start must hold each row's first valid key in [0, kv_len] (kv_lens[b], or "
                             f"S = {k.shape[1]}); row {b} has kv_start {int(kv_start[b])} and kv_len "
                             f"{int(end_B[b])}")


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _moa_attention_impl(q, k, v, mix, kv_lens, kv_start, causal: bool, scale: float, save: bool):
    """The Triton forward: (o, o before the mix, log-sum-exp); the last two are empty unless ``save``."""
    from ._triton import attention as triton_path  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
    o, o_unmixed, lse = triton_path.forward(q, k, v, mix, kv_lens, causal, scale, save, kv_start=kv_start)
    if not save:
        o_unmixed, lse = q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return o, o_unmixed, lse


@torch.library.custom_op("bam::moa_attention", mutates_args=())
def _moa_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor,
                      kv_lens: torch.Tensor | None, kv_start: torch.Tensor | None, causal: bool, scale: float,
                      save: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o, o before the mix, log-sum-exp); the last two are empty unless ``save``."""
    return _moa_attention_impl(q, k, v, mix, kv_lens, kv_start, causal, scale, save)


@_moa_attention_op.register_fake
def _(q, k, v, mix, kv_lens, kv_start, causal, scale, save):
    if not save:
        return torch.empty_like(q), q.new_empty(0), q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(q), q.new_empty(q.shape[:4], dtype=torch.float32)


@torch.library.custom_op("bam::moa_attention_backward", mutates_args=())
def _moa_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               mix: torch.Tensor, kv_lens: torch.Tensor | None, kv_start: torch.Tensor | None,
                               o_unmixed: torch.Tensor, lse: torch.Tensor, causal: bool,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dmix)."""
    from ._triton import attention as triton_path  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
    dq, dk, dv, dp_BTEH = triton_path.backward(do, q, k, v, mix, kv_lens, o_unmixed, lse, causal, scale,
                                               kv_start=kv_start)
    return dq, dk, dv, dp_BTEH.sum(-1).to(mix.dtype)


@_moa_attention_backward_op.register_fake
def _(do, q, k, v, mix, kv_lens, kv_start, o_unmixed, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(mix)


def _moa_attention_setup(ctx, inputs, output):
    q, k, v, mix, kv_lens, kv_start, ctx.causal, ctx.scale, _save = inputs
    _o, o_unmixed, lse = output
    # The saved-for-backward outputs get no gradient: no zero tensors materialised for them.
    ctx.mark_non_differentiable(o_unmixed, lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(q, k, v, mix, kv_lens, kv_start, o_unmixed, lse)


def _moa_attention_grad(ctx, do, _do_unmixed, _dlse):
    if do is None:
        return (None,) * 9
    q, k, v, mix, kv_lens, kv_start, o_unmixed, lse = ctx.saved_tensors
    dq, dk, dv, dmix = torch.ops.bam.moa_attention_backward(do.contiguous(), q, k, v, mix, kv_lens, kv_start,
                                                             o_unmixed, lse, ctx.causal, ctx.scale)
    need = ctx.needs_input_grad
    grads = tuple(g if needed else None for g, needed in zip((dq, dk, dv, dmix), need[:4]))
    return grads + (None,) * 5


torch.library.register_autograd("bam::moa_attention", _moa_attention_grad,
                                setup_context=_moa_attention_setup)


def moa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mix: torch.Tensor, causal: bool = True,
                  scale: float | None = None, kv_lens: torch.Tensor | None = None,
                  kv_start: torch.Tensor | None = None) -> torch.Tensor:
    """Soft mixture of attention: every expert's heads attend, each output scaled by its router weight.

    q [B, T, E, H, Dh]; k, v [B, S, Hkv, Dh] (shared KV: head h of every expert reads KV head
    ``h // (H/Hkv)``) or [B, S, E, Hkv, Dh] (expert KV: expert e reads its own); mix [B, T, E], any
    float dtype. Returns [B, T, E, H, Dh] in q's dtype:
    ``o[b,t,e,h] = mix[b,t,e] * softmax(q[b,t,e,h] . k^T * scale + mask) v``, scale defaulting to
    ``Dh ** -0.5``. kv_lens [B] (integer, optional) counts the valid keys of each row; keys past it
    are ignored whatever they hold (NaN, inf: a preallocated cache) and get zero gradients. Causal
    masking aligns the last query with the last valid key: query t sees key s iff
    s <= t + kv_lens[b] - T. kv_start [B] (integer, optional, on q's device) is each row's first
    valid key, for LEFT padding (Hugging Face batches prompts so): row b's valid keys are
    ``kv_start[b] <= s < kv_len[b]`` (kv_len[b] = kv_lens[b], or S), 0 <= kv_start[b] <= kv_len[b]
    (kv_start == kv_len: a row without keys). Keys below it are never read, on every backend,
    forward and backward: their values reach no output, and they get zero gradients. Causal
    alignment is unchanged (the last query with the last valid key); a query sees key s iff
    kv_start[b] <= s <= t + kv_len[b] - T. A query that sees no key gets zeros. Differentiable in q, k, v and
    mix; the Triton backward is deterministic. Inside an autocast region q, k and v run in its
    dtype, as scaled_dot_product_attention would. The Triton path is the custom op
    ``torch.ops.bam.moa_attention`` and the torch path plain torch ops, so torch.compile traces both.
    """
    q, k, v = autocast_to(q, k, v)
    _check_moa_attention(q, k, v, mix, causal, scale, kv_lens, kv_start)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = backend_for(q, k, v)
    if backend == "reference":
        return reference.moa_attention(q, k, v, mix, causal, scale, kv_lens, kv_start)
    if backend == "torch" or q.numel() == 0 or k.shape[1] == 0:
        return torch_path.forward(q, k, v, mix, causal, scale, kv_lens, kv_start)
    from ._triton.attention import MAX_HEAD_DIM  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"q has head dim {q.shape[-1]}; the triton backend supports up to {MAX_HEAD_DIM}")
    if kv_lens is not None:
        kv_lens = kv_lens.to(device=q.device, dtype=torch.int32).contiguous()
    if kv_start is not None:
        kv_start = kv_start.to(device=q.device, dtype=torch.int32).contiguous()
    q, k, v = _unit_stride(q), _unit_stride(k), _unit_stride(v)
    if call_directly(q, k, v, mix, kv_lens, kv_start):
        return _moa_attention_impl(q, k, v, mix, kv_lens, kv_start, causal, scale, False)[0]
    return _moa_attention_op(q, k, v, mix, kv_lens, kv_start, causal, scale, needs_grad(q, k, v, mix))[0]
