"""Inputs the op tests share: grouped-GEMM row offsets and routed MoE problems."""
import math

import torch

import bam_kernels as bk


def random_offsets(M, E, empty=(), tail=0):
    """Cumulative row ends for E experts over M - tail rows, experts in ``empty`` getting none."""
    live = [e for e in range(E) if e not in empty]
    counts = torch.zeros(E, dtype=torch.int64)
    if live:
        picks = torch.randint(0, len(live), (M - tail,))
        counts[live] = torch.bincount(picks, minlength=len(live))
    return torch.cumsum(counts, 0).to(torch.int32)


def make_moe(T, D, F, E, k, dtype=torch.float32, duplicates=False, empty=()):
    live = torch.tensor([e for e in range(E) if e not in empty])
    if duplicates:
        experts = live[torch.randint(0, len(live), (T, k))]
    else:
        experts = torch.stack([live[torch.randperm(len(live))[:k]] for _ in range(T)]) if T else \
            torch.empty(0, k, dtype=torch.int64)
    x = torch.randn(T, D)
    gate_up = torch.randn(E, 2 * F, D) / math.sqrt(D)
    down = torch.randn(E, D, F) / math.sqrt(F)
    weights = torch.rand(T, k) + 0.1
    return [t.to(dtype) for t in (x, gate_up, down)] + [weights, experts]


def run_moe(backend, inputs):
    with bk.use_backend(backend):
        return bk.moe_mlp(*inputs)
