"""The decoder's blocks: RMSNorm, grouped-query attention, the SwiGLU MLP, the decoder layer (sequential
or parallel) and the one function that builds a layer from a config, dense or mixture; the
next-token loss and the routers' auxiliary loss.

bam's models (``bam_model.model``) and the Hugging Face code of every model folder
(``bam_model/remote``, generated from this module and the ones it imports) are both made of these.

Every attention layer takes ``forward(x [B, T, D], cache=None, position_ids=None, mask=None,
kv_start=None)``. ``cache``: anything with ``length(layer_idx)`` and ``update(layer_idx, k, v)``
(``bam_model.layers.KVCache``; the remote code adapts transformers' caches to it); positions follow
its length unless ``position_ids`` [B, T] say otherwise. ``mask`` [B, 1, T, S] (True: attend) and
``kv_start`` [B] come with a left-padded batch (the remote code's ``attention_mask``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import BamConfig, DenseConfig
from .layers import MixtureOfAttention, MoE, load_balancing_loss, router_z_loss
from .norms import RMSNorm, heads
from .ops import attend
from .rope import apply_rope, rope_for


class Attention(nn.Module):
    """Grouped-query attention with RoPE: q_proj [H*Dh, D], k_proj/v_proj [Hkv*Dh, D], o_proj [D, H*Dh]
    (a dense model, and the one attention of a BTX or sparse mixture); with ``qkv_bias`` the query, key
    and value projections have biases, with ``qk_norm`` queries and keys an RMSNorm (``q_norm``,
    ``k_norm``: weight [Dh] over each head, or [H*Dh] and [Hkv*Dh] over the whole projection);
    ``rope=False``: no rotary embedding (SmolLM3's NoPE layers); ``scale``: the softmax scale
    (``1/sqrt(Dh)`` when None)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope_theta: float,
                 layer_idx: int = 0, qkv_bias: bool = False, qk_norm: str | None = None,
                 norm_eps: float = 1e-5, rope: bool = True, scale: float | None = None,
                 norm_in_float32: bool = False):
        super().__init__()
        if qk_norm not in (None, "head", "projection"):
            raise ValueError(f"qk_norm must be None, 'head' or 'projection', got {qk_norm!r}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta, self.qk_norm, self.rope, self.scale = rope_theta, qk_norm, rope, scale
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=False)
        if qk_norm is not None:
            per_head = qk_norm == "head"
            self.q_norm = RMSNorm(head_dim if per_head else n_heads * head_dim, norm_eps, norm_in_float32)
            self.k_norm = RMSNorm(head_dim if per_head else n_kv_heads * head_dim, norm_eps, norm_in_float32)

    def forward(self, x_BTD: torch.Tensor, cache=None, position_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, kv_start: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, Hkv, Dh = self.n_heads, self.n_kv_heads, self.head_dim
        if self.rope:
            past = cache.length(self.layer_idx) if cache is not None else 0
            cos, sin = rope_for(position_ids, past, T, Dh, self.rope_theta, x_BTD.dtype, x_BTD.device)
        q_BTHDh = heads(self.q_proj(x_BTD), 1, H, Dh, getattr(self, "q_norm", None), self.qk_norm)[:, :, 0]
        k_BTGDh = heads(self.k_proj(x_BTD), 1, Hkv, Dh, getattr(self, "k_norm", None), self.qk_norm)[:, :, 0]
        if self.rope:
            q_BTHDh, k_BTGDh = apply_rope(q_BTHDh, cos, sin), apply_rope(k_BTGDh, cos, sin)
        v_BTGDh = self.v_proj(x_BTD).view(B, T, Hkv, Dh)
        if cache is not None:
            k_BTGDh, v_BTGDh = cache.update(self.layer_idx, k_BTGDh, v_BTGDh)
        o_BTHDh = attend(q_BTHDh, k_BTGDh, v_BTGDh, mask, self.scale)
        return self.o_proj(o_BTHDh.reshape(B, T, H * Dh))


class MLP(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Sequential (Llama): ``h = x + Attn(n1(x)); y = h + FFN(n2(h))``.
    Parallel (GPT-J): ``y = x + Attn(n(x)) + FFN(n(x))``, one norm.
    Post-norm (OLMo 2): ``h = x + n1(Attn(x)); y = h + n2(FFN(h))``, norms on the sublayers' outputs
    (``post_attention_layernorm``, ``post_feedforward_layernorm``). Each sublayer's output is multiplied
    by ``residual_multiplier`` before it is added (Granite; 1 elsewhere)."""

    def __init__(self, config: DenseConfig, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.block, self.residual_multiplier = config.block, config.residual_multiplier
        if self.block != "post-norm":
            self.input_layernorm = RMSNorm(config.dim, config.norm_eps, config.norm_in_float32)
        self.self_attn = self_attn
        if self.block != "parallel":
            self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps, config.norm_in_float32)
        if self.block == "post-norm":
            self.post_feedforward_layernorm = RMSNorm(config.dim, config.norm_eps, config.norm_in_float32)
        self.mlp = mlp

    def forward(self, x_BTD, cache=None, position_ids=None, mask=None, kv_start=None):
        at = dict(cache=cache, position_ids=position_ids, mask=mask, kv_start=kv_start)
        m = self.residual_multiplier
        scaled = (lambda y: y) if m == 1 else (lambda y: y * m)
        if self.block == "post-norm":
            h_BTD = x_BTD + scaled(self.post_attention_layernorm(self.self_attn(x_BTD, **at)))
            return h_BTD + scaled(self.post_feedforward_layernorm(self.mlp(h_BTD)))
        n_BTD = self.input_layernorm(x_BTD)
        a_BTD = self.self_attn(n_BTD, **at)
        if self.block == "parallel":
            return x_BTD + scaled(a_BTD) + scaled(self.mlp(n_BTD))
        h_BTD = x_BTD + scaled(a_BTD)
        return h_BTD + scaled(self.mlp(self.post_attention_layernorm(h_BTD)))


class Embedding(nn.Embedding):
    """The token embedding, times ``multiplier`` (Granite's embedding multiplier; 1 elsewhere)."""

    def __init__(self, vocab_size: int, dim: int, multiplier: float = 1.0):
        super().__init__(vocab_size, dim)
        self.multiplier = multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = super().forward(ids)
        return x if self.multiplier == 1 else x * self.multiplier


class LMHead(nn.Linear):
    """The LM head, its logits divided by ``logits_scaling`` (Granite's; 1 elsewhere)."""

    def __init__(self, dim: int, vocab_size: int, logits_scaling: float = 1.0):
        super().__init__(dim, vocab_size, bias=False)
        self.logits_scaling = logits_scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = super().forward(x)
        return logits if self.logits_scaling == 1 else logits / self.logits_scaling


def make_layer(c: DenseConfig, layer_idx: int) -> DecoderLayer:
    """Decoder layer ``layer_idx`` of a dense model (a ``DenseConfig``) or of a mixture (a ``BamConfig``:
    a ``MoE`` FFN, and a ``MixtureOfAttention`` unless its attention is ``"dense"``)."""
    # By model_type, not isinstance: the remote code's config may come from another copy of its file.
    family = dict(qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, norm_eps=c.norm_eps,
                  norm_in_float32=c.norm_in_float32, rope=layer_idx not in c.nope_layers,
                  scale=c.attention_scale)
    if c.model_type != BamConfig.model_type:
        attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.dh, c.rope_theta, layer_idx, **family)
        return DecoderLayer(c, attn, MLP(c.dim, c.ffn_dim))
    if c.attention == "dense":
        attn = Attention(c.dim, c.n_heads, c.n_kv_heads, c.dh, c.rope_theta, layer_idx, **family)
    else:
        attn = MixtureOfAttention(c.dim, c.n_heads, c.n_kv_heads, c.num_experts,
                                  shared_kv=c.attention == "shared-kv", head_dim=c.dh,
                                  rope_theta=c.rope_theta, top_k=c.attention_top_k, layer_idx=layer_idx,
                                  **family)
    moe = MoE(c.dim, c.ffn_dim, c.num_experts, top_k=c.top_k, normalize=c.normalize,
              straight_through=c.straight_through)
    return DecoderLayer(c, attn, moe)


def next_token_nll(logits_BTV: torch.Tensor, labels_BT: torch.Tensor,
                   num_items_in_batch: int | torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token negative log-likelihood: ``labels`` are the input ids themselves (shifted here);
    -100 marks a position left out. The mean is over ``num_items_in_batch`` targets when given (what
    transformers' Trainer passes under gradient accumulation), else over this batch's; a batch without
    any target gives 0 (with zero gradients), not NaN."""
    # Labels shifted left (the last position ignored) rather than the logits shifted right: slicing
    # [B, T, V] logits costs a copy and, in the backward, a zero-filled logits-sized gradient.
    targets_BT = F.pad(labels_BT[:, 1:], (0, 1), value=-100).to(logits_BTV.device)
    total = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets_BT.flatten(), ignore_index=-100,
                            reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (targets_BT != -100).sum().clamp_min(1)
    return total / num_items_in_batch


def router_aux_loss(routed, load_balancing_alpha: float, z_loss_beta: float) -> torch.Tensor:
    """``alpha * sum L_lb + beta * sum L_z`` over the FFN routers of every layer: ``routed`` lists each
    layer's (router logits [T, E], expert ids [T, k])."""
    lb = sum(load_balancing_loss(logits_TE, experts_Tk) for logits_TE, experts_Tk in routed)
    z = sum(router_z_loss(logits_TE) for logits_TE, _ in routed)
    return load_balancing_alpha * lb + z_loss_beta * z
