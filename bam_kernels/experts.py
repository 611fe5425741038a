"""Kept for the import path ``bam_kernels.experts``; the ops live in their own modules now:
``grouped_mm`` in ``bam_kernels/grouped_gemm.py``, ``moe_mlp`` in ``bam_kernels/moe.py`` (their CPU
paths in ``_torch/``, their Triton paths in ``_triton/``)."""
from .grouped_gemm import grouped_mm
from .moe import moe_mlp

__all__ = ["grouped_mm", "moe_mlp"]
