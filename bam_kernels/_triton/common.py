"""Helpers every Triton host module shares: the dot precision, the size bucket of autotune keys,
the placeholder for unused pointer arguments, and the autotuner's trial timer."""
from __future__ import annotations

import torch
import triton
import triton.testing


def precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' dots: exact float32 ("ieee") unless TF32 is allowed."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def size_bucket(n: int) -> int:
    """A size as an autotune key: the next power of two, capped, so that nearby sizes share a choice."""
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16)


_placeholders: dict = {}


def placeholder(device) -> torch.Tensor:
    """A tensor for pointer arguments a launch does not use; never one of the op's own tensors,
    so that nothing (an autotuner's reset hook, say) can touch real data through it."""
    if device not in _placeholders:
        _placeholders[device] = torch.zeros(16, device=device, dtype=torch.int32)
    return _placeholders[device]


def or_placeholder(t: torch.Tensor | None, device) -> torch.Tensor:
    """``t``, or the placeholder when the launch has no such tensor."""
    return placeholder(device) if t is None else t


def autotune_bench(kernel_call, quantiles):
    """Shorter than triton's default trial (25 ms warm-up, 100 ms timed): a first call with new
    shapes should cost seconds, not minutes, across all configs and kernels."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)
