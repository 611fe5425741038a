"""bam_kernels: functional MoE and mixture-of-attention ops with Triton, torch and reference backends.

    import bam_kernels as bk
    w, idx = bk.route_topk(logits, k)
    y = bk.moe_mlp(x, gate_up_proj, down_proj, w, idx)
"""
from ._dispatch import BACKENDS, backend_for, use_backend
from .attention import moa_attention
from .experts import grouped_mm, moe_mlp
from .routing import RoutingPlan, route_topk, routing_plan

__version__ = "0.1.0"

__all__ = ["BACKENDS", "RoutingPlan", "backend_for", "grouped_mm", "moa_attention", "moe_mlp", "route_topk",
           "routing_plan", "use_backend", "__version__"]
