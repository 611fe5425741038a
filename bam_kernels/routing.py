"""``route_topk`` (softmax + top-k routing, with autograd, on every backend) and the routing plan
(the (token, slot) pairs sorted by expert).

Laid out like every op module: checks, the backend implementation, the custom op and its fake,
the backward op and its fake, autograd registration, the public function. The CPU path is in
``_torch/routing.py``, the Triton one in ``_triton/routing.py``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import _checks, reference
from ._dispatch import backend_for, call_directly
from ._torch import routing as torch_path


def _check_route_topk(logits, k):
    _checks.tensor("logits", logits, ndim=2, floating=True)
    E = logits.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, E={E}] (E = logits.shape[1]), got {k!r}")


def _checks_enabled() -> bool:
    return os.environ.get("BAM_CHECK", "0") not in ("", "0")


def _check_finite(logits, backend):
    """Non-finite router logits raise where reading them costs no host sync (CPU tensors, except
    on the triton backend, which runs them as a GPU would), and anywhere with ``BAM_CHECK=1``."""
    if _checks_enabled() or (not logits.is_cuda and backend != "triton"):
        _checks.finite_rows("logits", logits)


def _as_the_kernel_reads(logits):
    """Unchecked logits as the Triton kernel reads them: NaN as -inf, then clamped to the finite
    float32 range (computed in float32 or wider)."""
    big = torch.finfo(torch.float32).max
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return wide.nan_to_num(nan=-big).clamp(-big, big)


def _route_topk_impl(logits, k, normalize, backend):
    _check_finite(logits, backend)
    if backend == "triton":
        from ._triton import routing as triton_path  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
        return triton_path.forward(logits, k, normalize)
    return torch_path.forward(logits, k, normalize)


@torch.library.custom_op("bam::route_topk", mutates_args=())
def _route_topk_op(logits: torch.Tensor, k: int, normalize: bool,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _route_topk_impl(logits, k, normalize, backend)


@_route_topk_op.register_fake
def _(logits, k, normalize, backend):
    T = logits.shape[0]
    return logits.new_empty(T, k, dtype=torch.float32), logits.new_empty(T, k, dtype=torch.int64)


@torch.library.custom_op("bam::route_topk_backward", mutates_args=())
def _route_topk_backward_op(logits: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, dw: torch.Tensor,
                            normalize: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from ._triton import routing as triton_path  # noqa: PLC0415 (the Triton path on first use: triton loads only where a kernel runs)
        return triton_path.backward(logits, w, idx, dw, normalize)
    return torch_path.backward(logits, w, idx, dw, normalize)


@_route_topk_backward_op.register_fake
def _(logits, w, idx, dw, normalize, backend):
    return torch.empty_like(logits)


def _route_topk_setup(ctx, inputs, output):
    logits, _k, ctx.normalize, ctx.backend = inputs
    w, idx = output
    ctx.mark_non_differentiable(idx)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, w, idx)


def _route_topk_grad(ctx, dw, _didx):
    if dw is None:
        return None, None, None, None
    logits, w, idx = ctx.saved_tensors
    return torch.ops.bam.route_topk_backward(logits, w, idx, dw.contiguous(), ctx.normalize, ctx.backend), \
        None, None, None


torch.library.register_autograd("bam::route_topk", _route_topk_grad, setup_context=_route_topk_setup)


def route_topk(logits: torch.Tensor, k: int, normalize: bool = False):
    """Softmax over all experts, then the top k.

    logits [T, E] (any float dtype) -> weights [T, k] float32 and expert ids [T, k] int64, largest
    first. ``normalize=False`` is BAM's routing (the kept probabilities as they are);
    ``normalize=True`` rescales the k to sum to 1 (Mixtral, BTX). Differentiable in ``logits``.
    Registered as ``torch.ops.bam.route_topk``.

    -inf masks an expert out of a row. A row holding NaN or +inf, or -inf throughout, raises a
    ValueError where reading the logits costs no host sync: CPU tensors on the torch and
    reference backends, and any tensor with the environment variable ``BAM_CHECK=1``. Elsewhere
    (CUDA, and the triton backend, which runs CPU tensors as a GPU would) such a row still routes
    in range with finite weights: NaN reads as -inf, then the logits are clamped to the finite
    float32 range, so +inf logits share the row's probability and a row of -inf (or NaN) is
    uniform (the kernel takes the lowest ids among ties).
    """
    _check_route_topk(logits, k)
    backend = backend_for(logits)
    if backend != "triton" and logits.is_cuda and not _checks_enabled():
        logits = _as_the_kernel_reads(logits)
    if backend == "reference":
        _check_finite(logits, backend)
        w_Tk, idx_Tk = reference.route_topk(logits, k, normalize)
        return w_Tk.to(torch.promote_types(w_Tk.dtype, torch.float32)), idx_Tk
    if call_directly(logits):
        return _route_topk_impl(logits, k, normalize, backend)
    return _route_topk_op(logits, k, normalize, backend)


@dataclass
class RoutingPlan:
    """(token, slot) pairs sorted by expert, stably, so rows of one expert keep token order.

    sorted_slots [T*k] int64: flat slot ``token * k + slot`` of each sorted row.
    sorted_experts [T*k] int64: the expert of each sorted row.
    offsets [E] int32: cumulative row ends (rows of expert e are ``offsets[e-1]:offsets[e]``).
    """
    sorted_slots: torch.Tensor
    sorted_experts: torch.Tensor
    offsets: torch.Tensor
    num_tokens: int
    k: int
    num_experts: int

    @property
    def sorted_tokens(self) -> torch.Tensor:
        return self.sorted_slots // self.k

    @property
    def counts(self) -> torch.Tensor:
        return torch.diff(self.offsets, prepend=self.offsets.new_zeros(1))


def routing_plan(experts: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sort the (token, slot) pairs of ``experts [T, k]`` by expert without a host sync.

    Ids are range-checked on the CPU; on CUDA the check would sync, so it runs only with the
    environment variable ``BAM_CHECK=1``. Unchecked out-of-range ids sort past the last offset and
    their slots contribute nothing.
    """
    _checks.tensor("experts", experts, ndim=2, floating=False)
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    check_expert_ids(experts, num_experts)
    T, k = experts.shape
    flat = experts.reshape(-1).to(torch.int64)
    flat = torch.where((flat < 0) | (flat >= num_experts), num_experts, flat)
    sorted_experts, sorted_slots = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=flat.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_experts, bounds, right=True).to(torch.int32)
    return RoutingPlan(sorted_slots, sorted_experts, offsets, T, k, num_experts)


def check_expert_ids(experts: torch.Tensor, num_experts: int) -> None:
    """The range check of expert ids where it costs no host sync: always on the CPU, on CUDA only
    with ``BAM_CHECK=1``."""
    if not experts.is_cuda or _checks_enabled():
        _checks.expert_ids("experts", experts, num_experts)
