"""Top-k routing and the routing plan (the (token, slot) pairs sorted by expert)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _checks, reference
from ._dispatch import backend_for


class _RouteTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, k, normalize):
        from ._triton.routing import route_topk_fwd
        w_TK, idx_TK = route_topk_fwd(logits_TE, k, normalize)
        ctx.save_for_backward(logits_TE, w_TK, idx_TK)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(idx_TK)
        return w_TK, idx_TK

    @staticmethod
    def backward(ctx, dw_TK, _didx):
        from ._triton.routing import route_topk_bwd
        logits_TE, w_TK, idx_TK = ctx.saved_tensors
        return route_topk_bwd(logits_TE, w_TK, idx_TK, dw_TK, ctx.normalize), None, None


def _route_topk_torch(logits_TE, k, normalize):
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    w_TK, idx_TK = torch.topk(probs_TE, k, dim=-1)
    if normalize:
        w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
    return w_TK, idx_TK


def route_topk(logits: torch.Tensor, k: int, normalize: bool = False):
    """Softmax over all experts, then the top k.

    logits [T, E] (any float dtype) -> weights [T, k] float32 and expert ids [T, k] int64, largest
    first. ``normalize=False`` is BAM's routing (the kept probabilities as they are);
    ``normalize=True`` rescales the k to sum to 1 (Mixtral, BTX). Differentiable in ``logits``.
    """
    _checks.tensor("logits", logits, ndim=2, floating=True)
    E = logits.shape[1]
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, E={E}] (E = logits.shape[1]), got {k!r}")
    backend = backend_for(logits)
    if backend == "reference":
        w_TK, idx_TK = reference.route_topk(logits, k, normalize)
        return w_TK.to(torch.promote_types(w_TK.dtype, torch.float32)), idx_TK
    if backend == "torch":
        return _route_topk_torch(logits, k, normalize)
    return _RouteTopK.apply(logits, k, normalize)


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
    if not experts.is_cuda or _checks_enabled():
        _checks.expert_ids("experts", experts, num_experts)
    T, k = experts.shape
    flat = experts.reshape(-1).to(torch.int64)
    flat = torch.where((flat < 0) | (flat >= num_experts), num_experts, flat)
    sorted_experts, sorted_slots = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts, device=flat.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_experts, bounds, right=True).to(torch.int32)
    return RoutingPlan(sorted_slots, sorted_experts, offsets, T, k, num_experts)


def _checks_enabled() -> bool:
    import os
    return os.environ.get("BAM_CHECK", "0") not in ("", "0")
