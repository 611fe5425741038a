"""Drop-in torch.nn modules built on bam_kernels: the MoE FFN (and, beside it, the attention
experts). Modules know nothing of Triton: every op goes through the bam_kernels dispatcher."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

import bam_kernels as bk


def load_balancing_loss(router_logits_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch load-balancing loss ``E * sum_i f_i * P_i``.

    f_i: fraction of the routed (token, slot) pairs sent to expert i (not differentiable);
    P_i: mean router probability of expert i over the tokens.
    """
    E = router_logits_TE.shape[-1]
    probs_TE = torch.softmax(router_logits_TE, dim=-1, dtype=torch.float32)
    counts_E = torch.zeros(E, device=experts_TK.device, dtype=torch.int64)
    counts_E.scatter_add_(0, experts_TK.reshape(-1), torch.ones_like(experts_TK.reshape(-1)))
    f_E = counts_E.to(torch.float32) / max(experts_TK.numel(), 1)
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def router_z_loss(router_logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_j logits_tj)^2``."""
    return torch.logsumexp(router_logits_TE.float(), dim=-1).square().mean()


class MoEExperts(nn.Module):
    """E SwiGLU experts in Hugging Face's fused layout: gate_up_proj [E, 2F, D] (gate rows first),
    down_proj [E, D, F]."""

    def __init__(self, num_experts: int, dim: int, ffn_dim: int, device=None, dtype=None):
        super().__init__()
        self.num_experts, self.dim, self.ffn_dim = num_experts, dim, ffn_dim
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * ffn_dim, dim, device=device, dtype=dtype))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, ffn_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert initialised as nn.Linear would be (uniform, bound 1/sqrt(fan_in)).
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(self.ffn_dim), 1 / math.sqrt(self.ffn_dim))

    def forward(self, x_TD, weights_TK, experts_TK):
        return bk.moe_mlp(x_TD, self.gate_up_proj, self.down_proj, weights_TK, experts_TK)


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts with a top-k softmax router.

    ``normalize=False`` keeps the top-k probabilities as they are (BAM); ``normalize=True``
    rescales them to sum to 1 (Mixtral, BTX). State-dict keys and shapes are those of
    transformers' ``MixtralSparseMoeBlock``: ``gate.weight [E, D]``,
    ``experts.gate_up_proj [E, 2F, D]``, ``experts.down_proj [E, D, F]``.

    After each forward: ``router_logits`` [tokens, E], ``load_balancing_loss`` and ``z_loss``
    (scalars, differentiable) for the model to collect.
    """

    def __init__(self, dim: int, ffn_dim: int, num_experts: int, top_k: int = 1, normalize: bool = False,
                 device=None, dtype=None):
        super().__init__()
        for name, value in (("dim", dim), ("ffn_dim", ffn_dim), ("num_experts", num_experts)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        self.dim, self.ffn_dim, self.num_experts = dim, ffn_dim, num_experts
        self.top_k, self.normalize = top_k, normalize
        self.gate = nn.Linear(dim, num_experts, bias=False, device=device, dtype=dtype)
        self.experts = MoEExperts(num_experts, dim, ffn_dim, device=device, dtype=dtype)
        self.router_logits = None
        self.load_balancing_loss = None
        self.z_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension dim={self.dim}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        logits_TE = self.gate(x_TD)
        weights_TK, experts_TK = bk.route_topk(logits_TE, self.top_k, normalize=self.normalize)
        y_TD = self.experts(x_TD, weights_TK, experts_TK)
        self.router_logits = logits_TE
        self.load_balancing_loss = load_balancing_loss(logits_TE, experts_TK)
        self.z_loss = router_z_loss(logits_TE)
        return y_TD.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, ffn_dim={self.ffn_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, normalize={self.normalize}")
