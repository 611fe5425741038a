"""Dense and BAM causal language models (Llama family), with a KV cache and sampling.

Parameter names follow Hugging Face's ``LlamaForCausalLM`` (``model.embed_tokens``,
``model.layers.N.self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, ``model.norm``,
``lm_head``), so Llama-family checkpoints map one to one. A BAM layer keeps the names:
``self_attn`` is a ``MixtureOfAttention`` (or a plain attention for BTX / sparse upcycling) and
``mlp`` a ``MoE`` whose keys are transformers' Mixtral ones (``mlp.gate.weight``,
``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``). Shape suffixes (``x_BTD``) follow the
legend at the top of ``bam_model.layers``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .blocks import Embedding, LMHead, RMSNorm, make_layer, next_token_nll, router_aux_loss
from .cache import KVCache
from .config import BamConfig, DenseConfig


@dataclass
class CausalLMOutput:
    """logits [B, T, V]; nll: mean next-token negative log-likelihood (with labels);
    loss = nll + aux_loss; aux_loss: the weighted router losses (BAM models; None for dense);
    router_logits: {"ffn": per-layer [B*T, E], "attention": per-layer router logits} (None for dense)."""
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router_logits: dict | None = None


class Decoder(nn.Module):
    def __init__(self, config: DenseConfig, layers: list[nn.Module]):
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.dim, config.embedding_multiplier)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.dim, config.norm_eps, config.norm_in_float32)


class CausalLM(nn.Module):
    """Shared body of the dense and BAM models: embeddings, decoder layers (``blocks.make_layer``),
    final norm, LM head, loss, KV cache and sampling."""

    config_class = DenseConfig
    # The ``tokenizers.Tokenizer`` the model was trained with (set by the loaders, passed on by
    # branch, upcycle and training, written by save_pretrained); None for a model built from a
    # config alone. Not a parameter: an object the model carries.
    tokenizer = None
    # The chat template (Jinja) that came with the tokenizer (a GGUF's, a Hugging Face folder's), carried
    # like it and written into tokenizer_config.json, so an instruct model keeps its chat format.
    chat_template: str | None = None
    # What writes a model folder (``formats.bam.save_pretrained``), set there when bam_model is imported:
    # the model knows no file format, and the formats, which build models, import this module.
    _writer = None

    def __init__(self, config: DenseConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise ValueError(f"{type(self).__name__} needs a {self.config_class.__name__}, "
                             f"got {type(config).__name__}")
        self.config = config
        self.model = Decoder(config, [make_layer(config, i) for i in range(config.n_layers)])
        self.lm_head = LMHead(config.dim, config.vocab_size, config.logits_scaling)
        self.apply(self._init_weights)
        self.tie_weights()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head when the config says so."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def _aux(self):
        return None, None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache=None,
                position_ids: torch.Tensor | None = None) -> CausalLMOutput:
        """input_ids [B, T] -> logits [B, T, V]. ``labels`` [B, T] are the input ids themselves (the
        model shifts them, as Hugging Face does); -100 marks positions left out of the loss.
        ``cache`` (from ``new_cache``) is extended in place."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [batch, tokens], got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            raise ValueError(f"labels must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")
        if input_ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than max_seq_len="
                             f"{self.config.max_seq_len}")
        n_layers = len(self.model.layers)
        if cache is not None and (not isinstance(cache, KVCache) or cache.num_layers != n_layers):
            raise ValueError(f"cache must be a KVCache of {n_layers} layers (see new_cache), "
                             f"got {cache!r}")
        logits_BTV = self.lm_head(self.model.norm(self._hidden(input_ids, cache, position_ids)))
        aux_loss, router_logits = self._aux()
        nll = loss = None
        if labels is not None:
            nll = next_token_nll(logits_BTV, labels)
            loss = nll if aux_loss is None else nll + aux_loss
        return CausalLMOutput(logits=logits_BTV, loss=loss, nll=nll, aux_loss=aux_loss,
                              router_logits=router_logits)

    def _hidden(self, input_ids_BT, cache=None, position_ids=None) -> torch.Tensor:
        x_BTD = self.model.embed_tokens(input_ids_BT)
        for layer in self.model.layers:
            x_BTD = layer(x_BTD, cache=cache, position_ids=position_ids)
        return x_BTD

    def decode_step(self, ids_BT: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One step of generation: ``ids`` [B, T] appended to ``cache``, the last position's logits
        [B, V] in float32 back (no router losses: decoding needs none)."""
        return self.lm_head(self.model.norm(self._hidden(ids_BT, cache)[:, -1])).float()

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """An empty KV cache for every layer; ``max_len`` allocates it once for that many tokens."""
        return KVCache(len(self.model.layers), max_length=max_len)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``input_ids`` [B, T] by up to ``max_new_tokens`` tokens with a KV cache.

        ``temperature=0`` is greedy; otherwise sample from ``softmax(logits / temperature)`` cut to
        the smallest set of tokens whose probability reaches ``top_p`` (nucleus sampling). A row that
        produced ``eos_token_id`` keeps producing it; generation stops when every row has.
        Returns [B, T + generated].
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
                or not 0 <= temperature < math.inf):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        B, T = input_ids.shape
        if T + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len="
                             f"{self.config.max_seq_len}")
        cache = self.new_cache(T + max_new_tokens)
        out = [input_ids]
        done_B = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        step_ids = input_ids
        for _ in range(max_new_tokens):
            logits_BV = self.decode_step(step_ids, cache)
            next_B = sample(logits_BV, temperature, top_p, generator)
            if eos_token_id is not None:
                next_B = torch.where(done_B, torch.full_like(next_B, eos_token_id), next_B)
                done_B |= next_B == eos_token_id
            step_ids = next_B[:, None]
            out.append(step_ids)
            if eos_token_id is not None and bool(done_B.all()):
                break
        return torch.cat(out, dim=1)

    def save_pretrained(self, path: str, max_shard_bytes: int | None = None,
                        extra_files: dict[str, str | bytes] | None = None,
                        dtype: torch.dtype | None = None) -> None:
        """Write ``config.json``, safetensors weights (in ``dtype``, by default their own), the
        tokenizer and ``extra_files`` (name -> contents) to the folder ``path``, atomically."""
        CausalLM._writer(self, path, max_shard_bytes=max_shard_bytes, extra_files=extra_files, dtype=dtype)


def sample(logits_BV: torch.Tensor, temperature: float, top_p: float,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B]: greedy at temperature 0, else nucleus sampling at ``top_p``."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    # In float64, shifted by the row's largest logit: a tiny temperature (1e-300 is 0 in float32) then
    # gives 0 / t = 0 for the top token and -inf for the others, never inf - inf = NaN.
    logits_BV = logits_BV.double()
    probs_BV = torch.softmax((logits_BV - logits_BV.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    if top_p < 1:
        sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        # Keep a token while the mass before it is under top_p, and the first token always (a top_p
        # below float32's smallest value would otherwise keep none).
        keep_BV = (sorted_BV.cumsum(dim=-1) - sorted_BV) < top_p
        keep_BV[:, 0] = True
        sorted_BV = sorted_BV * keep_BV
        probs_BV = torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
    return torch.multinomial(probs_BV, 1, generator=generator)[:, 0]


class DenseLM(CausalLM):
    """A dense Llama-family causal LM (see ``DenseConfig``)."""

    config_class = DenseConfig

    def __init__(self, config: DenseConfig):
        if isinstance(config, BamConfig):
            raise ValueError("DenseLM needs a DenseConfig, got a BamConfig; use BamLM")
        super().__init__(config)


class BamLM(CausalLM):
    """A mixture built from dense models (see ``BamConfig``): every layer has a ``MoE`` FFN and
    either a ``MixtureOfAttention`` (BAM) or one plain attention (BTX, sparse upcycling)."""

    config_class = BamConfig

    def _aux(self):
        c = self.config
        aux_loss = router_aux_loss([layer.mlp.routed for layer in self.model.layers], c.load_balancing_alpha,
                                   c.z_loss_beta)
        router_logits = {"ffn": tuple(layer.mlp.router_logits for layer in self.model.layers)}
        if c.attention != "dense":
            router_logits["attention"] = tuple(layer.self_attn.router_logits for layer in self.model.layers)
        return aux_loss, router_logits
