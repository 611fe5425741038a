"""RMSNorm (Llama's) and its per-expert form, and the query/key norm of the families that have one.

Shape suffixes: the legend of ``bam_model.layers``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dimension, computed in float32 and cast back to x's dtype."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """Llama's RMSNorm: normalise in float32, cast back, then scale (weight [n])."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * rms_normalize(x, self.eps)


class ExpertRMSNorm(nn.Module):
    """One RMSNorm per expert (weight [E, n]): x [..., E, k, n] is normalised over n and scaled by its
    expert's weights (the query and key norms of attention experts)."""

    def __init__(self, num_experts: int, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight[:, None, :] * rms_normalize(x, self.eps)


def heads(x_BTO: torch.Tensor, groups: int, heads_per_group: int, head_dim: int,
          norm: nn.Module | None = None, qk_norm: str | None = None) -> torch.Tensor:
    """A query or key projection [B, T, groups * heads * Dh] as [B, T, groups, heads, Dh] (groups: the
    experts, or 1), with its ``norm`` applied first where the family has one (``qk_norm``): over each
    head's Dh (``"head"``: Qwen3, Gemma 3) or over each group's whole projection (``"projection"``:
    OLMo 2)."""
    B, T = x_BTO.shape[:2]
    if qk_norm is None:
        return x_BTO.view(B, T, groups, heads_per_group, head_dim)
    n = head_dim if qk_norm == "head" else heads_per_group * head_dim
    return norm(x_BTO.view(B, T, groups, -1, n)).view(B, T, groups, heads_per_group, head_dim)
