"""bam_kernels: functional MoE and mixture-of-attention ops with Triton, torch and reference backends.

    import bam_kernels as bk
    w, idx = bk.route_topk(logits, k)
    y = bk.moe_mlp(x, gate_up_proj, down_proj, w, idx)

Layout: one public module per op (``routing``, ``grouped_gemm``, ``moe``, ``attention``), its CPU
path in ``_torch/<same name>.py``, its Triton path in ``_triton/<same name>.py``, and the float64
definitions of all four in ``reference.py`` (docs/architecture.md, docs/kernels.md).

Shape suffixes: a tensor named ``x_TD`` has shape [T, D]; letters of a flattened dimension are
written together (``out_TkD`` is [T*k, D]).

    T    tokens (queries in attention)          k    routing slots per token (top-k)
    E    experts                                D    model (hidden) width
    F    expert FFN width (gate_up is 2F rows)  M    rows of a grouped GEMM: (token, slot) pairs
    N    output columns of a GEMM               K    reduction (inner) dimension of a GEMM
    B    batch rows                             S    keys (KV length)
    H    query heads per expert                 Hkv  KV heads
    Hq   stacked query heads (E * H)            G    KV heads as stacked for SDPA (Hkv or E * Hkv)
    Dh   head dimension

``K`` is only ever the GEMM reduction dimension; the top-k count is ``k`` (``TOP_K`` in kernels).
"""
from ._dispatch import BACKENDS, backend_for, use_backend
from .attention import moa_attention
from .grouped_gemm import grouped_mm
from .moe import moe_mlp
from .routing import RoutingPlan, route_topk, routing_plan

__version__ = "0.1.0"

__all__ = ["BACKENDS", "RoutingPlan", "backend_for", "grouped_mm", "moa_attention", "moe_mlp", "route_topk",
           "routing_plan", "use_backend", "__version__"]
