"""Hugging Face configurations of bam's models, as written in every model folder bam saves.

This file travels inside the folder (``auto_map`` in ``config.json`` names it), so it imports nothing
but transformers: ``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` works where bam is
not installed. Key names are Hugging Face's where the concept is theirs (``hidden_size``,
``num_hidden_layers``, ``num_experts_per_tok``, ``router_aux_loss_coef``, ...), bam's own otherwise
(``block``, ``attention``, ``attention_top_k``, ``straight_through``, ``method``, ...).
"""
from __future__ import annotations

from transformers import PretrainedConfig

BLOCKS = ("sequential", "parallel")
ATTENTION_KINDS = ("expert-kv", "shared-kv", "dense")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_int(name: str, value) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class BamDenseConfig(PretrainedConfig):
    """A Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention); ``block`` is
    ``"sequential"`` (Llama) or ``"parallel"`` (GPT-J: attention and FFN read one norm)."""

    model_type = "bam-dense"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 32000, hidden_size: int = 512, intermediate_size: int = 1376,
                 num_hidden_layers: int = 4, num_attention_heads: int = 8,
                 num_key_value_heads: int | None = None,
                 head_dim: int | None = None, rope_theta: float = 10000.0, rms_norm_eps: float = 1e-5,
                 max_position_embeddings: int = 2048, tie_word_embeddings: bool = False,
                 block: str = "sequential", domain: str | None = None, hidden_act: str = "silu",
                 use_cache: bool = True, **kwargs):
        self.vocab_size, self.hidden_size, self.intermediate_size = vocab_size, hidden_size, intermediate_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.rope_theta, self.rms_norm_eps = float(rope_theta), float(rms_norm_eps)
        self.max_position_embeddings, self.block, self.domain = max_position_embeddings, block, domain
        self.hidden_act, self.use_cache = hidden_act, use_cache
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
        if hidden_act != "silu":
            raise ValueError(f"hidden_act must be 'silu' (SwiGLU), got {hidden_act!r}")
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class BamMoeConfig(BamDenseConfig):
    """A mixture upcycled from dense models: ``num_local_experts`` SwiGLU experts in every layer,
    routed top-``num_experts_per_tok`` (``norm_topk_prob``: weights renormalised over the kept ones;
    ``straight_through``: renormalised forward, the plain probabilities' gradient), and attention
    experts when ``attention`` is ``"expert-kv"`` or ``"shared-kv"`` (soft routing over every expert,
    or the top ``attention_top_k``). The loss adds ``router_aux_loss_coef`` times the load-balancing
    loss and ``router_z_loss_coef`` times the router z-loss of every layer."""

    model_type = "bam-moe"
    attribute_map = {"num_experts": "num_local_experts"}

    def __init__(self, num_local_experts: int = 2, num_experts_per_tok: int = 1, norm_topk_prob: bool = False,
                 straight_through: bool = False, attention: str = "expert-kv",
                 attention_top_k: int | None = None,
                 router_aux_loss_coef: float = 0.01, router_z_loss_coef: float = 0.001, method: str = "bam",
                 expert_domains: list | None = None, output_router_logits: bool = False, **kwargs):
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.norm_topk_prob, self.straight_through = norm_topk_prob, straight_through
        self.attention, self.attention_top_k = attention, attention_top_k
        self.router_aux_loss_coef = float(router_aux_loss_coef)
        self.router_z_loss_coef = float(router_z_loss_coef)
        self.method = method
        self.expert_domains = list(expert_domains) if expert_domains else []
        self.output_router_logits = output_router_logits
        _positive_int("num_local_experts", num_local_experts)
        if not _is_int(num_experts_per_tok) or not 1 <= num_experts_per_tok <= num_local_experts:
            raise ValueError("num_experts_per_tok must be an int in [1, num_local_experts="
                             f"{num_local_experts}], "
                             f"got {num_experts_per_tok!r}")
        if attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
        if attention_top_k is not None and not (_is_int(attention_top_k)
                                                and 1 <= attention_top_k <= num_local_experts):
            raise ValueError(f"attention_top_k must be None or in [1, {num_local_experts}], "
                             f"got {attention_top_k!r}")
        if straight_through and not norm_topk_prob:
            raise ValueError("straight_through=True needs norm_topk_prob=True "
                             "(it keeps the renormalised forward)")
        super().__init__(**kwargs)
