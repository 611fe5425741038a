"""The public path of bam's drop-in modules (``from bam_model.nn import MoE, MixtureOfAttention``).

They live in ``bam_model/layers.py`` (``KVCache`` in ``bam_model/cache.py``) now: a module named
``nn`` shadowed ``torch.nn`` in files that import both. This shim keeps the path in DESIGN.md and
users' code working.
"""
from .cache import KVCache
from .layers import (
    MixtureOfAttention,
    MoE,
    MoEExperts,
    RouterLosses,
    load_balancing_loss,
    route,
    route_logits,
    router_z_loss,
)

__all__ = ["KVCache", "MixtureOfAttention", "MoE", "MoEExperts", "RouterLosses", "load_balancing_loss",
           "route", "route_logits", "router_z_loss"]
