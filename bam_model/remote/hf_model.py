"""Hugging Face models of bam's dense and BAM checkpoints (remote code that travels in the folder).

``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` builds these classes from
the folder's ``config.json`` and loads its ``model.safetensors`` unchanged: parameter names are
bam's, which are Llama's and Mixtral's (``model.layers.N.self_attn.q_proj``, ``mlp.gate``,
``mlp.experts.gate_up_proj``, ...). The layers are bam's own, copied into this file from bam's
modules (``ops``, ``rope``, ``layers``, ``blocks``). The file needs only torch and transformers; where
bam's kernel package is importable the experts and the mixture of attention run on it (fused, Triton
on a GPU), elsewhere on plain PyTorch with the same numbers, and a warning says once that
``pip install bam-moe`` makes it fast.

Generation works the Hugging Face way: any ``Cache`` (an expert-KV layer caches E x Hkv heads, a
shared-KV layer Hkv heads, the dense model's size), ``attention_mask`` with left padding and
``position_ids``. With ``labels`` the loss is the next-token cross-entropy plus the routers'
weighted load-balancing and z-losses, as bam's training computes it.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from ..blocks import Embedding, LMHead, RMSNorm, make_layer, next_token_nll, router_aux_loss
from ..layers import MoE, MoEExperts
from .hf_config import BamDenseConfig, BamMoeConfig

# transformers 5 names the output's cache `cache`, earlier releases `past_key_values` (bam is tested on 5).
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast)} \
    else "past_key_values"


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


def left_padding_start(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """Each row's first real key [B] (int32) when ``attention_mask`` [B, S] pads rows on the left
    only (zeros, then ones), the form bam's kernels take; None for any other mask."""
    start = (attention_mask.long().cumsum(-1) == 0).sum(-1)
    columns = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not bool((attention_mask.bool() == (columns[None, :] >= start[:, None])).all()):
        return None
    return start.to(torch.int32)


class CacheLayers:
    """A transformers ``Cache`` as bam's attention layers use a cache: ``length(layer_idx)`` and
    ``update(layer_idx, k, v)`` with k, v [B, T, *kv_heads, Dh] (transformers keeps [B, heads, S, Dh];
    an expert-KV layer's E x Hkv heads are stored as E*Hkv)."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def length(self, layer_idx: int) -> int:
        return self.cache.get_seq_length(layer_idx)

    def update(self, layer_idx: int, k_new: torch.Tensor, v_new: torch.Tensor):
        heads = k_new.shape[2:-1]
        k, v = self.cache.update(k_new.flatten(2, -2).transpose(1, 2), v_new.flatten(2, -2).transpose(1, 2),
                                 layer_idx)
        return k.transpose(1, 2).unflatten(2, heads), v.transpose(1, 2).unflatten(2, heads)


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
        elif isinstance(module, MoEExperts):
            module.reset_parameters()


class BamModel(BamPreTrainedModel):
    def __init__(self, config: BamDenseConfig):
        super().__init__(config)
        c = config.bam_config()
        self.embed_tokens = Embedding(c.vocab_size, c.dim, c.embedding_multiplier)
        self.layers = nn.ModuleList(make_layer(c, i) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps, c.norm_in_float32)
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
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, config.logits_scaling)
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
        cache = self._check_inputs(input_ids, inputs_embeds, attention_mask,
                                   past_key_values if cache is None else cache)
        embed = self.model.embed_tokens
        x = embed(input_ids) if inputs_embeds is None else inputs_embeds * embed.multiplier
        B, T = x.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = _new_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        window = getattr(self.config, "attention_window", None)
        if window is not None and past + T > self.config.max_position_embeddings:
            raise ValueError(f"{past + T} tokens is more than max_position_embeddings="
                             f"{self.config.max_position_embeddings}: this model was imported with a "
                             f"sliding window of {window} tokens, which bam computes as full attention "
                             "within it only")
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
        layer_cache = CacheLayers(cache) if cache is not None else None
        for layer in self.model.layers:
            x = layer(x, cache=layer_cache, position_ids=position_ids, mask=mask, kv_start=kv_start)
        x = self.model.norm(x)
        keep = isinstance(logits_to_keep, int) and logits_to_keep
        logits = self.lm_head(x[:, -logits_to_keep:] if keep else x)
        routed = [layer.mlp.routed for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        router_out = bool(output_router_logits or getattr(self.config, "output_router_logits", False))
        aux_loss = None
        if routed and (labels is not None or router_out):
            real = padding[:, -T:].reshape(-1).bool() if padding is not None else None
            aux_loss = self._aux_loss(routed, real)
        loss = None if labels is None else next_token_nll(logits, labels, num_items_in_batch)
        if loss is not None and aux_loss is not None:
            loss = loss + aux_loss.to(loss.dtype)
        out = {"loss": loss, "aux_loss": aux_loss, "logits": logits, _CACHE_FIELD: cache}
        if router_out:
            out["router_logits"] = tuple(logits_TE for logits_TE, _ in routed)
        return MoeCausalLMOutputWithPast(**out)

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask, cache):
        """``cache`` once the inputs are known to be what this model serves."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ValueError(f"{type(self).__name__} runs with transformers' DynamicCache (generate's "
                             f"default), not {type(cache).__name__}: caches of a fixed length "
                             "(cache_implementation='static') are not supported")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be [batch, keys] with 1 for a real token, got shape "
                             f"{tuple(attention_mask.shape)}")
        return cache

    def _aux_loss(self, routed, real=None):
        """The routers' weighted load-balancing and z-losses, over the real tokens only (``real``
        [B*T] marks them; padding does not count, as in bam's training, which has none)."""
        if real is not None:
            routed = [(logits_TE[real], experts_Tk[real]) for logits_TE, experts_Tk in routed]
        return router_aux_loss(routed, self.config.router_aux_loss_coef, self.config.router_z_loss_coef)


class BamMoeForCausalLM(BamForCausalLM):
    """A BAM, BTX or sparse mixture as a Hugging Face causal LM (``model_type`` ``bam-moe``)."""

    config_class = BamMoeConfig
