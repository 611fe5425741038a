"""Hugging Face models of bam's dense and BAM checkpoints (remote code that travels in the folder).

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds these classes from
the folder's ``config.json`` and loads its ``model.safetensors`` unchanged: parameter names are
bam's, which are Llama's and Mixtral's (``model.layers.N.self_attn.q_proj``, ``mlp.gate``,
``mlp.experts.gate_up_proj``, ...). The file needs only torch and transformers; where bam's kernel
package is importable the experts and the mixture of attention run on it (fused, Triton on a GPU),
elsewhere on plain PyTorch with the same numbers, and a warning says once that
``pip install bam-moe`` makes it fast.

Generation works the Hugging Face way: any ``Cache`` (an expert-KV layer caches E x Hkv heads, a
shared-KV layer Hkv heads, the dense model's size), ``attention_mask`` with left padding and
``position_ids``. With ``labels`` the loss is the next-token cross-entropy plus the routers'
weighted load-balancing and z-losses, as bam's training computes it.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_bam import BamDenseConfig, BamMoeConfig

try:  # bam's fused kernels, when bam-moe is installed
    import bam_kernels as _bk
except ImportError:
    _bk = None

_WARNED = []
# bam_kernels releases before left padding (kv_start) run such batches on PyTorch's attention.
_TAKES_KV_START = _bk is not None and "kv_start" in inspect.signature(_bk.moa_attention).parameters
# transformers 5 names the output's cache `cache`, earlier releases `past_key_values` (bam is tested on 5).
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} \
    else "past_key_values"


def _kernels():
    """bam_kernels, or None (with a warning, once per process) when it is not installed."""
    if _bk is None and not _WARNED:
        _WARNED.append(True)
        warnings.warn("bam_kernels is not installed: this BAM model runs on plain PyTorch (same numbers, "
                      "slower); `pip install bam-moe` makes it fast", stacklevel=3)
    return _bk


# --- pieces shared by every layer ------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope(position_ids_BT: torch.Tensor, head_dim: int, theta: float, dtype):
    """cos, sin [B, T, Dh] of Llama's rotary embedding (angles in float32, then cast)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids_BT.device,
                                             dtype=torch.int64).float() / head_dim))
    angles = position_ids_BT.float()[..., None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x_BTHD, cos_BTD, sin_BTD):
    cos, sin = cos_BTD.to(x_BTHD.dtype).unsqueeze(-2), sin_BTD.to(x_BTHD.dtype).unsqueeze(-2)
    x1, x2 = x_BTHD.chunk(2, dim=-1)
    return x_BTHD * cos + torch.cat((-x2, x1), dim=-1) * sin


def router_logits(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Router logits, in float32 inside an autocast region (as bam computes them)."""
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            return F.linear(x.float(), router.weight.float())
    return router(x)


def key_mask(attention_mask: torch.Tensor | None, T: int, S: int, device) -> torch.Tensor | None:
    """Which keys each of T new queries may see among S keys (the last T are theirs), [B, 1, T, S]
    (True = attend): causal, query i sees keys j <= i + S - T, and only keys whose
    ``attention_mask`` [B, S] is 1. None when nothing is padded (plain causal attention)."""
    if attention_mask is None:
        return None
    valid_BS = attention_mask[:, -S:].bool()
    causal_TS = torch.arange(S, device=device)[None, :] <= torch.arange(T, device=device)[:, None] + (S - T)
    mask = causal_TS[None, None] & valid_BS[:, None, None, :]
    # A query that sees no key at all (a padding position) attends to every key instead of to none,
    # so that no NaN is made; its output is padding and nothing reads it.
    return mask | ~mask.any(-1, keepdim=True)


def left_padding_start(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Each row's first real key [B] (int32) when ``attention_mask`` [B, S] pads rows on the left
    only (zeros, then ones), the form bam's kernels take; None for another mask or no kernels that
    take it."""
    if attention_mask is None or _bk is None or not _TAKES_KV_START:
        return None
    start = (attention_mask.long().cumsum(-1) == 0).sum(-1)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not bool((attention_mask.bool() == (columns[None, :] >= start[:, None])).all()):
        return None
    return start.to(torch.int32)


def attend(q_BTHqDh, k_BSGDh, v_BSGDh, mask: torch.Tensor | None, n_kv_groups: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v on PyTorch: q [B, T, Hq, Dh], k, v [B, S, Hq/n_kv_groups, Dh];
    ``mask`` from ``key_mask`` (None: causal over all keys, the last query aligned with the last key)."""
    T, S = q_BTHqDh.shape[1], k_BSGDh.shape[1]
    causal = mask is None and T == S and T > 1
    if mask is None and T != S and T > 1:
        mask = (torch.arange(S, device=q_BTHqDh.device)[None, :]
                <= torch.arange(T, device=q_BTHqDh.device)[:, None] + (S - T))
    o = F.scaled_dot_product_attention(q_BTHqDh.transpose(1, 2), k_BSGDh.transpose(1, 2),
                                       v_BSGDh.transpose(1, 2), attn_mask=mask, is_causal=causal,
                                       enable_gqa=n_kv_groups > 1)
    return o.transpose(1, 2)


def cache_update(cache: Cache | None, layer_idx: int, k_BTGDh, v_BTGDh):
    """Append to a Hugging Face cache (which stores [B, heads, S, Dh]); the layer's whole k, v back
    as [B, S, heads, Dh]."""
    if cache is None:
        return k_BTGDh, v_BTGDh
    k, v = cache.update(k_BTGDh.transpose(1, 2), v_BTGDh.transpose(1, 2), layer_idx)
    return k.transpose(1, 2), v.transpose(1, 2)


# --- attention ---------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Grouped-query attention with RoPE (a dense model, and BTX / sparse mixtures)."""

    def __init__(self, config: BamDenseConfig, layer_idx: int):
        super().__init__()
        D, H, Hkv, Dh = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim)
        self.H, self.Hkv, self.Dh, self.theta, self.layer_idx = H, Hkv, Dh, config.rope_theta, layer_idx
        self.q_proj = nn.Linear(D, H * Dh, bias=False)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=False)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)

    def forward(self, x_BTD, position_ids_BT, mask, cache, kv_start=None):
        B, T, _ = x_BTD.shape
        cos, sin = rope(position_ids_BT, self.Dh, self.theta, x_BTD.dtype)
        q = apply_rope(self.q_proj(x_BTD).view(B, T, self.H, self.Dh), cos, sin)
        k = apply_rope(self.k_proj(x_BTD).view(B, T, self.Hkv, self.Dh), cos, sin)
        k, v = cache_update(cache, self.layer_idx, k, self.v_proj(x_BTD).view(B, T, self.Hkv, self.Dh))
        o = attend(q, k, v, mask, self.H // self.Hkv)
        return self.o_proj(o.reshape(B, T, self.H * self.Dh))


class MixtureOfAttention(nn.Module):
    """BAM's soft mixture of attention experts: ``y = sum_e softmax(router(x))_e * Attn_e(x)``.

    q_proj [E*H*Dh, D] and o_proj [D, E*H*Dh] stack the experts expert-major; k_proj, v_proj are
    [Hkv*Dh, D] shared by all experts (shared KV) or [E*Hkv*Dh, D]; router [E, D]."""

    def __init__(self, config: BamMoeConfig, layer_idx: int):
        super().__init__()
        D, H, Hkv, Dh = (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                         config.head_dim)
        E = config.num_local_experts
        self.E, self.H, self.Hkv, self.Dh, self.theta = E, H, Hkv, Dh, config.rope_theta
        self.shared_kv, self.top_k = config.attention == "shared-kv", config.attention_top_k
        self.layer_idx = layer_idx
        kv_out = Hkv * Dh if self.shared_kv else E * Hkv * Dh
        self.q_proj = nn.Linear(D, E * H * Dh, bias=False)
        self.k_proj = nn.Linear(D, kv_out, bias=False)
        self.v_proj = nn.Linear(D, kv_out, bias=False)
        self.o_proj = nn.Linear(E * H * Dh, D, bias=False)
        self.router = nn.Linear(D, E, bias=False)

    def mix(self, logits_BTE):
        probs = torch.softmax(logits_BTE.to(torch.promote_types(logits_BTE.dtype, torch.float32)), dim=-1)
        if self.top_k is None or self.top_k == self.E:
            return probs
        w, idx = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, idx, w / w.sum(-1, keepdim=True))

    def forward(self, x_BTD, position_ids_BT, mask, cache, kv_start=None):
        B, T, _ = x_BTD.shape
        E, H, Hkv, Dh = self.E, self.H, self.Hkv, self.Dh
        kv_heads = (Hkv,) if self.shared_kv else (E, Hkv)
        logits_BTE = router_logits(self.router, x_BTD)
        cos, sin = rope(position_ids_BT, Dh, self.theta, x_BTD.dtype)
        q = apply_rope(self.q_proj(x_BTD).view(B, T, E * H, Dh), cos, sin)
        k = apply_rope(self.k_proj(x_BTD).view(B, T, -1, Dh), cos, sin)
        k, v = cache_update(cache, self.layer_idx, k, self.v_proj(x_BTD).view(B, T, -1, Dh))
        S = k.shape[1]
        mix_BTE = self.mix(logits_BTE)
        bk = _kernels()
        if bk is not None and (mask is None or kv_start is not None):
            # bam's kernels: causal, the padding of a left-padded batch given as each row's first key
            padded = {} if kv_start is None else {"kv_start": kv_start}
            o = bk.moa_attention(q.view(B, T, E, H, Dh), k.view(B, S, *kv_heads, Dh),
                                 v.view(B, S, *kv_heads, Dh), mix_BTE, causal=True, **padded)
        else:  # any other mask: PyTorch's attention
            if self.shared_kv:  # every expert reads the same Hkv heads
                k, v = (t[:, :, None].expand(B, S, E, Hkv, Dh).reshape(B, S, E * Hkv, Dh) for t in (k, v))
            o = attend(q, k, v, mask, H // Hkv).view(B, T, E, H, Dh)
            o = (o * mix_BTE[..., None, None]).to(q.dtype)
        self.last_router_logits = logits_BTE.reshape(B * T, E)
        return self.o_proj(o.reshape(B, T, E * H * Dh))


# --- feed-forward ------------------------------------------------------------------------------------

class MLP(nn.Module):
    def __init__(self, config: BamDenseConfig):
        super().__init__()
        D, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F_, bias=False)
        self.up_proj = nn.Linear(D, F_, bias=False)
        self.down_proj = nn.Linear(F_, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts in Mixtral's fused layout: gate_up_proj [E, 2F, D] (gate rows first),
    down_proj [E, D, F]."""

    def __init__(self, config: BamMoeConfig):
        super().__init__()
        E, D, F_ = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * F_, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, F_))

    def forward(self, x_TD, weights_Tk, experts_Tk):
        bk = _kernels()
        if bk is not None:
            return bk.moe_mlp(x_TD, self.gate_up_proj, self.down_proj, weights_Tk, experts_Tk)
        out = torch.zeros_like(x_TD)
        for e in experts_Tk.unique().tolist():
            t, s = (experts_Tk == e).nonzero(as_tuple=True)
            gate, up = F.linear(x_TD[t], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e]) * weights_Tk[t, s, None].to(x_TD.dtype)
            out = out.index_add(0, t, y)
        return out


class SparseMoE(nn.Module):
    """Top-k softmax router over SwiGLU experts (Mixtral's keys: ``gate.weight``, ``experts.*``)."""

    def __init__(self, config: BamMoeConfig):
        super().__init__()
        self.E, self.k = config.num_local_experts, config.num_experts_per_tok
        self.normalize, self.straight_through = config.norm_topk_prob, config.straight_through
        self.gate = nn.Linear(config.hidden_size, self.E, bias=False)
        self.experts = Experts(config)

    def route(self, logits_TE):
        bk = _kernels()
        normalize = self.normalize and not self.straight_through
        if bk is not None:
            w, idx = bk.route_topk(logits_TE, self.k, normalize=normalize)
        else:
            probs = torch.softmax(logits_TE.float(), dim=-1)
            w, idx = probs.topk(self.k, dim=-1)
            if normalize:
                w = w / w.sum(-1, keepdim=True)
        if self.straight_through:  # the renormalised weights forward, the probabilities' gradient
            kept = w.detach()
            w = kept / kept.sum(-1, keepdim=True) + (w - kept)
        return w, idx

    def forward(self, x):
        x_TD = x.reshape(-1, x.shape[-1])
        logits_TE = router_logits(self.gate, x_TD)
        w_Tk, idx_Tk = self.route(logits_TE)
        self.last_routed = (logits_TE, idx_Tk)
        return self.experts(x_TD, w_Tk, idx_Tk).reshape(x.shape)


def load_balancing_loss(logits_TE, experts_Tk):
    """Switch's ``E * sum_i f_i P_i``."""
    E = logits_TE.shape[-1]
    probs = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    counts = torch.zeros(E, device=experts_Tk.device, dtype=torch.int64)
    counts.scatter_add_(0, experts_Tk.reshape(-1), torch.ones_like(experts_Tk.reshape(-1)))
    return E * (counts.float() / max(experts_Tk.numel(), 1) * probs.mean(dim=0)).sum()


# --- the model ---------------------------------------------------------------------------------------

class DecoderLayer(nn.Module):
    def __init__(self, config: BamDenseConfig, layer_idx: int):
        super().__init__()
        self.parallel = config.block == "parallel"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if not self.parallel:
            self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # By name: the config's class may come from another copy of configuration_bam.py.
        moe = config.model_type == BamMoeConfig.model_type
        attention_experts = moe and config.attention != "dense"
        attention = MixtureOfAttention if attention_experts else Attention
        self.self_attn = attention(config, layer_idx)
        self.mlp = SparseMoE(config) if moe else MLP(config)

    def forward(self, x, position_ids, mask, cache, kv_start=None):
        n = self.input_layernorm(x)
        a = self.self_attn(n, position_ids, mask, cache, kv_start)
        if self.parallel:
            return x + a + self.mlp(n)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h))


class BamPreTrainedModel(PreTrainedModel):
    config_class = BamDenseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Experts):
            D, F_ = module.down_proj.shape[1], module.down_proj.shape[2]
            nn.init.uniform_(module.gate_up_proj, -D ** -0.5, D ** -0.5)
            nn.init.uniform_(module.down_proj, -F_ ** -0.5, F_ ** -0.5)


class BamModel(BamPreTrainedModel):
    def __init__(self, config: BamDenseConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value


def _new_cache(config) -> Cache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


class BamForCausalLM(BamPreTrainedModel, GenerationMixin):
    """A dense bam model as a Hugging Face causal LM (``model_type`` ``bam-dense``); the mixtures
    are ``BamMoeForCausalLM``."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: BamDenseConfig):
        super().__init__(config)
        self.model = BamModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, output_router_logits=None,
                num_items_in_batch=None, past_key_values=None, **kwargs):
        """input_ids [B, T] (or inputs_embeds [B, T, D]) -> logits [B, T, V]; ``labels`` [B, T] are
        the input ids (shifted inside; -100 is left out of the loss)."""
        cache = past_key_values if cache is None else cache
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{type(self).__name__} runs with transformers' DynamicCache (generate's "
                             f"default), not {type(cache).__name__}: caches of a fixed length "
                             "(cache_implementation='static') are not supported")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be [batch, keys] with 1 for a real token, got shape "
                             f"{tuple(attention_mask.shape)}")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = _new_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count the real tokens only
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=x.device)[None].expand(B, T)
        # What the layers see, made once per forward: the [B, 1, T, S] mask over this step's keys (None
        # when nothing is padded) and, for a left-padded batch, each row's first key for the kernels.
        padding = attention_mask if attention_mask is not None and not bool(attention_mask.all()) else None
        S = past + T
        mask = key_mask(padding, T, S, x.device)
        kv_start = left_padding_start(padding[:, -S:]) if padding is not None else None
        for layer in self.model.layers:
            x = layer(x, position_ids, mask, cache, kv_start)
        x = self.model.norm(x)
        keep = slice(None)
        if isinstance(logits_to_keep, int) and logits_to_keep:
            keep = slice(-logits_to_keep, None)
        logits = self.lm_head(x[:, keep])
        loss = aux_loss = None
        routed = [layer.mlp.last_routed for layer in self.model.layers if isinstance(layer.mlp, SparseMoE)]
        if routed and (labels is not None or output_router_logits or self.config.output_router_logits):
            real = padding[:, -T:].reshape(-1).bool() if padding is not None else None
            aux_loss = self._aux_loss(routed, real)
        if labels is not None:
            loss = self._nll(logits, labels, num_items_in_batch)
            if aux_loss is not None:
                loss = loss + aux_loss.to(loss.dtype)
        out = {"loss": loss, "aux_loss": aux_loss, "logits": logits, _CACHE_FIELD: cache}
        if output_router_logits or getattr(self.config, "output_router_logits", False):
            out["router_logits"] = tuple(r[0] for r in routed)
        return MoeCausalLMOutputWithPast(**out)

    def _aux_loss(self, routed, real=None):
        """The routers' weighted load-balancing and z-losses, over the real tokens only (``real``
        [B*T] marks them; padding does not count, as in bam's training, which has none)."""
        if real is not None:
            routed = [(logits[real], idx[real]) for logits, idx in routed]
        c = self.config
        lb = sum(load_balancing_loss(logits, idx) for logits, idx in routed)
        z = sum(torch.logsumexp(logits.float(), dim=-1).square().mean() for logits, _ in routed)
        return c.router_aux_loss_coef * lb + c.router_z_loss_coef * z

    @staticmethod
    def _nll(logits_BTV, labels_BT, num_items_in_batch=None):
        targets = F.pad(labels_BT[:, 1:], (0, 1), value=-100).to(logits_BTV.device)
        if num_items_in_batch is None:
            return F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        total = F.cross_entropy(logits_BTV.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                reduction="sum")
        return total / num_items_in_batch


class BamMoeForCausalLM(BamForCausalLM):
    """A BAM, BTX or sparse mixture as a Hugging Face causal LM (``model_type`` ``bam-moe``)."""

    config_class = BamMoeConfig
