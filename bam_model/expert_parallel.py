"""Expert parallelism for the MoE FFN: each of W ranks holds E / W experts, and the routed tokens
travel to their experts' rank and back with two all-to-alls.

    parallelize_experts(model)      # every nn.MoE -> ExpertParallelMoE, in place (a collective-free slice)
    ...train...
    gather_experts(model)           # back to full nn.MoE modules (a collective: every rank calls it)

Rank r keeps experts ``r*E/W .. (r+1)*E/W - 1`` under the ``MoE``'s own state-dict keys
(``gate.weight``, ``experts.gate_up_proj [E/W, 2F, D]``, ``experts.down_proj [E/W, D, F]``); the
router is replicated. ``gather_dim0`` rebuilds a full ``[E, ...]`` tensor from the ranks' slices,
which is how a full state dict (and a single-process checkpoint) is written from an
expert-parallel model (``bam_model.training.run_state.full_model_tensors``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

import bam_kernels as bk

from .layers import MoE, MoEExperts, RouterLosses, route, route_logits


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` on rows, differentiable: the backward sends the gradients back the
    way the rows came (the splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_in = grad_out.new_empty(sum(ctx.in_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Rows ``x[sum(in_splits[:j]) : sum(in_splits[:j+1])]`` go to rank j; returns the
    ``sum(out_splits)`` rows received, ordered by source rank. Differentiable in ``x``."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def gather_dim0(local: torch.Tensor, group=None, dst: int | None = None) -> torch.Tensor | None:
    """The full tensor from equal slices along dim 0, in rank order (a collective): on every
    rank, or with ``dst`` (a global rank) only there, the others getting None."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    if dst is None:
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts)
    mine = dist.get_rank() == dst
    dist.gather(local.contiguous(), parts if mine else None, dst=dst, group=group)
    return torch.cat(parts) if mine else None


def shard_dim0(full: torch.Tensor, group=None) -> torch.Tensor:
    """This rank's equal slice of ``full`` along dim 0 (no communication)."""
    world = dist.get_world_size(group)
    if full.shape[0] % world:
        raise ValueError(f"a tensor of shape {tuple(full.shape)} cannot be split evenly over {world} ranks")
    n = full.shape[0] // world
    rank = dist.get_rank(group)
    return full[rank * n:(rank + 1) * n]


class ExpertParallelMoE(RouterLosses, nn.Module):
    """An ``nn.MoE`` whose experts are spread over the ranks of ``group``.

    forward(x [..., D]) -> [..., D], the ``MoE``'s function of this rank's tokens. Each rank routes
    its own tokens, sorts the (token, slot) pairs by expert, and then:

    1. exchanges the per-expert row counts (all-to-all on a [W, E/W] tensor), so every rank
       knows how many rows it will receive from each rank for each of its experts;
    2. sends the rows to the ranks holding their experts (all-to-all);
    3. runs ``bam_kernels.moe_mlp`` over its local experts on what it received;
    4. sends the expert outputs back (all-to-all), where they are weighted by the router
       probabilities and summed into their tokens.

    Gradients flow back through both all-to-alls. The gradient a rank accumulates for its experts
    is therefore the sum over *all* ranks' losses; data-parallel training averages the other
    gradients over ranks, so these must be divided by the world size to match
    (``bam_model.distributed.prepare`` does it with a hook). The router's gradient is this rank's
    share and is averaged like any replicated parameter.

    After each forward, ``router_logits``, ``load_balancing_loss`` and ``z_loss`` of this rank's
    tokens, as ``MoE`` keeps them.
    """

    def __init__(self, moe: MoE, group=None):
        super().__init__()
        if not isinstance(moe, MoE):
            raise ValueError(f"moe must be a bam_model.nn.MoE, got {type(moe).__name__}")
        if not dist.is_initialized():
            raise ValueError("expert parallelism needs an initialised torch.distributed process group "
                             "(launch with torchrun)")
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        E = moe.num_experts
        if E % world:
            raise ValueError(f"num_experts={E} must be divisible by the world size {world} "
                             "for expert parallelism")
        self.group = group
        self.dim, self.ffn_dim, self.num_experts = moe.dim, moe.ffn_dim, E
        self.top_k, self.normalize, self.straight_through = moe.top_k, moe.normalize, moe.straight_through
        self.world_size, self.rank = world, rank
        self.num_local_experts = E // world
        self.gate = moe.gate
        full = moe.experts
        with torch.device("meta"):
            self.experts = MoEExperts(self.num_local_experts, self.dim, self.ffn_dim,
                                      dtype=full.gate_up_proj.dtype)
        self.experts.gate_up_proj = nn.Parameter(shard_dim0(full.gate_up_proj.detach(), group).clone())
        self.experts.down_proj = nn.Parameter(shard_dim0(full.down_proj.detach(), group).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension dim={self.dim}, got shape {tuple(x.shape)}")
        W, E_local = self.world_size, self.num_local_experts
        x_TD = x.reshape(-1, self.dim)
        logits_TE = route_logits(self.gate, x_TD)
        weights_Tk, experts_Tk = route(logits_TE, self.top_k, self.normalize, self.straight_through)
        plan = bk.routing_plan(experts_Tk, self.num_experts)
        tokens_M = plan.sorted_tokens

        # 1. counts: send_WL[j, l] rows go to local expert l of rank j; recv_WL[j, l] come from rank j.
        send_WL = plan.counts.to(torch.int64).view(W, E_local)
        recv_WL = torch.empty_like(send_WL)
        dist.all_to_all_single(recv_WL, send_WL, group=self.group)
        in_splits, out_splits = torch.stack([send_WL.sum(1), recv_WL.sum(1)]).tolist()  # one host sync

        # 2. rows to their experts' ranks (sorted by expert, hence grouped by destination rank).
        x_recv_RD = all_to_all(x_TD.index_select(0, tokens_M), out_splits, in_splits, self.group)

        # 3. the local experts; received rows are ordered (source rank, local expert).
        local_R = torch.arange(E_local, device=x.device).repeat(W)
        local_R = local_R.repeat_interleave(recv_WL.reshape(-1), output_size=sum(out_splits))
        ones_R1 = torch.ones(local_R.shape[0], 1, device=x.device, dtype=torch.float32)
        y_recv_RD = self.experts(x_recv_RD, ones_R1, local_R[:, None])

        # 4. outputs back, weighted and summed into their tokens (as moe_mlp does: x dtype, one index_add).
        y_MD = all_to_all(y_recv_RD, in_splits, out_splits, self.group)
        w_M = weights_Tk.reshape(-1)[plan.sorted_slots].to(x.dtype)
        out_TD = x_TD.new_zeros(x_TD.shape).index_add(0, tokens_M, y_MD * w_M[:, None])

        self._set_routed(logits_TE, experts_Tk)
        return out_TD.reshape(x.shape)

    def to_moe(self) -> MoE:
        """The full ``MoE`` (every expert), gathered from all ranks: a collective."""
        with torch.device("meta"):
            moe = MoE(self.dim, self.ffn_dim, self.num_experts, top_k=self.top_k, normalize=self.normalize,
                      dtype=self.experts.gate_up_proj.dtype, straight_through=self.straight_through)
        moe.gate = self.gate
        with torch.no_grad():
            gate_up = gather_dim0(self.experts.gate_up_proj.detach(), self.group)
            moe.experts.gate_up_proj = nn.Parameter(gate_up)
            moe.experts.down_proj = nn.Parameter(gather_dim0(self.experts.down_proj.detach(), self.group))
        return moe

    def extra_repr(self) -> str:
        first = self.rank * self.num_local_experts
        return (f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"local_experts={first}..{first + self.num_local_experts - 1}, "
                f"top_k={self.top_k}, normalize={self.normalize}, straight_through={self.straight_through}")


def _replace(model: nn.Module, kind: type, make) -> int:
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, make(module))
    return len(targets)


def parallelize_experts(model: nn.Module, group=None) -> nn.Module:
    """Replace every ``MoE`` inside ``model`` by an ``ExpertParallelMoE`` (in place; returns
    ``model``). Every rank must hold the same full weights before (e.g. loaded from one folder)."""
    if isinstance(model, MoE):
        raise ValueError("model is a bare MoE; wrap it with ExpertParallelMoE(model) instead")
    if not _replace(model, MoE, lambda m: ExpertParallelMoE(m, group)):
        raise ValueError(f"model ({type(model).__name__}) has no bam_model.nn.MoE layer to place "
                         "across ranks")
    return model


def gather_experts(model: nn.Module) -> nn.Module:
    """Replace every ``ExpertParallelMoE`` by its full ``MoE`` (in place; returns ``model``).
    A collective: every rank must call it."""
    _replace(model, ExpertParallelMoE, lambda m: m.to_moe())
    return model


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """FQN -> parameter of every rank-local expert weight (sharded along dim 0 over its group)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, ExpertParallelMoE):
            for pname, p in module.experts.named_parameters():
                out[f"{name}.experts.{pname}" if name else f"experts.{pname}"] = p
    return out
