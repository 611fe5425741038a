"""RMSNorm (Llama's) and its per-expert form, and the query/key norm of the families that have one.

Shape suffixes: the legend of ``bam_model.layers``.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x)`` over the last dimension, in float32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_in_float32: bool) -> torch.Tensor:
    """``weight * x / rms(x)`` in x's dtype: the normalised value rounded to it, then scaled (Llama), or
    scaled in float32 and rounded once (``weight_in_float32``: OLMo 2)."""
    if weight_in_float32:
        return (weight * rms_normalize(x, eps)).to(x.dtype)
    return weight * rms_normalize(x, eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (weight [n]): Llama's (normalise in float32, cast back, then scale), or with
    ``weight_in_float32`` OLMo 2's (scale in float32, then cast)."""

    def __init__(self, dim: int, eps: float = 1e-5, weight_in_float32: bool = False):
        super().__init__()
        self.eps, self.weight_in_float32 = eps, weight_in_float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.weight_in_float32)


class ExpertRMSNorm(nn.Module):
    """One RMSNorm per expert (weight [E, n]): x [..., E, k, n] is normalised over n and scaled by its
    expert's weights (the query and key norms of attention experts)."""

    def __init__(self, num_experts: int, dim: int, eps: float = 1e-5, weight_in_float32: bool = False):
        super().__init__()
        self.eps, self.weight_in_float32 = eps, weight_in_float32
        self.weight = nn.Parameter(torch.ones(num_experts, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight[:, None, :], self.eps, self.weight_in_float32)


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
