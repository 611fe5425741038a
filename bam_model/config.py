"""Model configurations: a dense Llama-family decoder and its BAM / BTX / sparse-upcycled mixture.

Both are plain dataclasses that validate themselves on construction and round-trip through JSON
(``to_dict`` / ``config_from_dict``; the ``model_type`` key says which class to build). On disk the
keys are Hugging Face's where the setting is theirs (``hidden_size``, ``num_experts_per_tok``, ...;
``HF_KEYS``), so that one ``config.json`` serves bam and transformers (``bam_model/remote``).
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field

import torch

from .options import (
    is_int,
    option,
    positive_float,
    positive_int,
    short_repr,
)

BLOCKS = ("sequential", "parallel", "post-norm")
QK_NORMS = ("head", "projection")
ATTENTION_KINDS = ("expert-kv", "shared-kv", "dense")
METHODS = ("bam", "btx", "sparse")


# The weight dtypes the command line accepts, by name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = tuple(sorted(DTYPES))


def dtype_option(default: str | None, help: str):
    """A ``--dtype`` (and recipe key) of the weights: float32, bfloat16 or float16 (declared here, by
    the dtypes, for every command and the training run's options)."""
    return option(default, help=help, choices=DTYPE_CHOICES, what=" or ".join(DTYPE_CHOICES),
                  accepts=lambda v: isinstance(v, str) and v in DTYPES)


def check_seq_len(seq_len: int, context: int | None, flag: str | None = None) -> None:
    """Refuse windows of ``seq_len`` tokens longer than a model's ``context`` (its max_seq_len; None:
    unknown, not checked). ``flag``: the command-line flag to name (MODEL's context, read from its
    config before any work), else the API's argument."""
    if context is None or seq_len <= context:
        return
    if flag is not None:
        raise ValueError(f"{flag} {seq_len} is longer than MODEL's context ({context} tokens, its "
                         f"max_seq_len); give {flag} {context} or less")
    raise ValueError(f"seq_len={seq_len} is longer than the model's context (max_seq_len={context})")


def _optional_token(name: str, value, vocab_size: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                              or not 0 <= value < vocab_size):
        raise ValueError(f"{name} must be None or an int in [0, vocab_size={vocab_size}), "
                         f"got {short_repr(value)}")


@dataclass
class DenseConfig:
    """A Llama-family decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention.

    ``block="sequential"`` is Llama's ``h = x + Attn(n1(x)); y = h + FFN(n2(h))``;
    ``block="parallel"`` is GPT-J's ``y = x + Attn(n(x)) + FFN(n(x))`` with one norm;
    ``block="post-norm"`` is OLMo 2's ``h = x + n1(Attn(x)); y = h + n2(FFN(h))``, norms on the
    sublayers' outputs.
    ``head_dim=None`` means ``dim // n_heads`` (and is stored as that number). ``domain`` names what a
    branched copy trains on.

    What other families add, as settings: ``qkv_bias`` (biases on the query, key and value projections:
    Qwen2); ``qk_norm`` (an RMSNorm on queries and keys before RoPE, over each head -- ``"head"``:
    Qwen3, Gemma 3 -- or over the whole projection -- ``"projection"``: OLMo 2); ``nope_layers`` (the
    layers whose attention has no RoPE: SmolLM3); Granite's multipliers: ``embedding_multiplier`` (on
    the embeddings), ``residual_multiplier`` (on each sublayer's output before it is added),
    ``attention_scale`` (the softmax scale, None: ``1/sqrt(head_dim)``) and ``logits_scaling`` (the
    logits are divided by it); ``norm_in_float32`` (OLMo 2's norms scale in float32 and round once; Llama's
    round the normalised value, then scale: the same in float32, a rounding apart in bf16).
    ``family``: the Hugging Face ``model_type`` the model was imported from
    (a label, like ``domain``: export writes the model back as that family where its settings allow).
    ``attention_window`` and ``window_layers``: the window of the layers that slide their attention in
    the model imported (Mistral, Phi-3, some Qwen2; transformers' ``sliding_window``): bam computes full
    attention, the same within the window, and keeps ``max_seq_len`` to it; export writes them back.
    """
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    block: str = "sequential"
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    domain: str | None = None
    qkv_bias: bool = False
    qk_norm: str | None = None
    nope_layers: list[int] = field(default_factory=list)
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_scale: float | None = None
    logits_scaling: float = 1.0
    norm_in_float32: bool = False
    family: str | None = None
    attention_window: int | None = None
    window_layers: list[int] = field(default_factory=list)

    model_type = "bam-dense"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            positive_int(name, getattr(self, name))
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; "
                                 "set head_dim explicitly")
            # Stored as the number it stands for, as Hugging Face configs do: a config read back
            # from a folder either wrote equals the one written.
            self.head_dim = self.dim // self.n_heads
        else:
            positive_int("head_dim", self.head_dim)
        if self.dh % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.dh}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        positive_float("rope_theta", self.rope_theta)
        positive_float("norm_eps", self.norm_eps)
        for name in ("tie_embeddings", "qkv_bias", "norm_in_float32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {short_repr(getattr(self, name))}")
        if self.qk_norm is not None and self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be None or one of {QK_NORMS}, got {short_repr(self.qk_norm)}")
        self._check_sliding()
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling"):
            positive_float(name, getattr(self, name))
        if self.attention_scale is not None:
            positive_float("attention_scale", self.attention_scale)
        if self.block not in BLOCKS:
            raise ValueError(f"block must be one of {BLOCKS}, got {short_repr(self.block)}")
        _optional_token("bos_token_id", self.bos_token_id, self.vocab_size)
        _optional_token("eos_token_id", self.eos_token_id, self.vocab_size)
        for name in ("domain", "family"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be None or a str, got {short_repr(getattr(self, name))}")

    def _check_sliding(self) -> None:
        for name in ("nope_layers", "window_layers"):
            layers = getattr(self, name)
            if not (isinstance(layers, list) and all(is_int(i) and 0 <= i < self.n_layers for i in layers)
                    and layers == sorted(set(layers))):
                raise ValueError(f"{name} must be a sorted list of distinct layer indexes in [0, n_layers="
                                 f"{self.n_layers}), got {short_repr(layers)}")
        if self.attention_window is None:
            if self.window_layers:
                raise ValueError("window_layers needs an attention_window")
            return
        positive_int("attention_window", self.attention_window)
        if not self.window_layers:
            raise ValueError("attention_window needs the window_layers that use it")
        if self.max_seq_len > self.attention_window:
            raise ValueError(f"max_seq_len={self.max_seq_len} is longer than attention_window="
                             f"{self.attention_window}: bam computes full attention, which equals sliding "
                             "attention within the window only")

    @property
    def dh(self) -> int:
        """The head dimension (``head_dim``, which construction sets when it is given as None)."""
        return self.head_dim

    def to_dict(self) -> dict:
        """The config as ``config.json`` holds it: Hugging Face's key names where they exist."""
        return {"model_type": self.model_type,
                **{HF_KEYS.get(k, k): v for k, v in dataclasses.asdict(self).items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    # --- cost: what one token costs this model (the demo's FLOPs model and compute matching) ---------

    def experts_used(self) -> tuple[int, int, int, int]:
        """(attention experts, K/V sets, FFN experts, router rows) one token goes through."""
        return 1, 1, 1, 0

    def active_parameters(self) -> int:
        """Weights one token is multiplied by: every attention expert's query and output projections,
        each K/V set, the top-k FFN experts, the routers and the LM head (norms and the embedding lookup
        left out)."""
        D, H, Hkv, Dh, F = self.dim, self.n_heads, self.n_kv_heads, self.dh, self.ffn_dim
        attn_experts, kv_sets, ffn_experts, router_rows = self.experts_used()
        layer = (attn_experts * 2 * D * H * Dh + kv_sets * 2 * D * Hkv * Dh + ffn_experts * 3 * D * F
                 + router_rows * D)
        return self.n_layers * layer + D * self.vocab_size

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of a window of ``seq_len`` tokens: 2 per multiply-add of every
        projection a token goes through (``active_parameters``) plus causal attention over the mean
        context ``(seq_len + 1) / 2`` in every attention expert. Training costs three times this."""
        context = (seq_len + 1) / 2
        scores = self.experts_used()[0] * 4 * self.n_heads * self.dh * context
        return 2 * self.active_parameters() + self.n_layers * scores

    def kv_cache_bytes_per_token(self, itemsize: int = 2) -> int:
        """KV cache a generated token adds (``itemsize`` bytes per value: 2 for bf16)."""
        return self.n_layers * self.experts_used()[1] * 2 * self.n_kv_heads * self.dh * itemsize

    def architecture(self) -> dict:
        """The settings two models must share to be mixed (everything but names and token ids)."""
        return {k: getattr(self, k) for k in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads",
                                              "ffn_dim", "dh", "rope_theta", "norm_eps", "tie_embeddings",
                                              "block", "qkv_bias", "qk_norm", "nope_layers",
                                              "embedding_multiplier", "residual_multiplier",
                                              "attention_scale", "logits_scaling", "norm_in_float32")}


@dataclass
class BamConfig(DenseConfig):
    """A mixture built from dense models: FFN experts in every layer, and attention experts when
    ``attention`` is ``"expert-kv"`` or ``"shared-kv"`` (``"dense"``: one ordinary attention).

    FFN router: softmax over all ``num_experts``, keep ``top_k``; ``normalize`` rescales the kept
    weights to sum to 1 (BTX, Mixtral) or leaves them (BAM). ``attention_top_k=None`` is BAM's soft
    attention routing over every expert. Loss = NLL + sum over layers of
    ``load_balancing_alpha * L_lb + z_loss_beta * L_z`` on the FFN routers.
    ``method`` and ``expert_domains`` record how the mixture was made.
    """
    num_experts: int = 2
    top_k: int = 1
    normalize: bool = False
    straight_through: bool = False
    attention: str = "expert-kv"
    attention_top_k: int | None = None
    load_balancing_alpha: float = 0.01
    z_loss_beta: float = 0.001
    method: str = "bam"
    expert_domains: list[str | None] = field(default_factory=list)

    model_type = "bam-moe"

    def __post_init__(self):
        super().__post_init__()
        positive_int("num_experts", self.num_experts)
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={self.num_experts}], "
                             f"got {short_repr(self.top_k)}")
        for name in ("normalize", "straight_through"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {short_repr(getattr(self, name))}")
        if self.straight_through and not self.normalize:
            raise ValueError("straight_through=True needs normalize=True (it keeps the renormalised forward)")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {short_repr(self.attention)}")
        if self.attention_top_k is not None:
            if self.attention == "dense":
                raise ValueError("attention_top_k applies to attention experts; attention is 'dense'")
            if (not isinstance(self.attention_top_k, int) or isinstance(self.attention_top_k, bool)
                    or not 1 <= self.attention_top_k <= self.num_experts):
                raise ValueError(f"attention_top_k must be None or an int in [1, num_experts="
                                 f"{self.num_experts}], got {short_repr(self.attention_top_k)}")
        for name in ("load_balancing_alpha", "z_loss_beta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {short_repr(value)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {short_repr(self.method)}")
        if not isinstance(self.expert_domains, list) or (
                self.expert_domains and len(self.expert_domains) != self.num_experts):
            raise ValueError(f"expert_domains must be a list of num_experts={self.num_experts} names "
                             f"(or empty), got {short_repr(self.expert_domains)}")

    def experts_used(self) -> tuple[int, int, int, int]:
        """bam computes every attention expert, also with ``attention_top_k`` (the others get weight 0)."""
        if self.attention == "dense":
            return 1, 1, self.top_k, self.num_experts
        kv_sets = 1 if self.attention == "shared-kv" else self.num_experts
        return self.num_experts, kv_sets, self.top_k, 2 * self.num_experts

    def dense(self) -> DenseConfig:
        """The dense config of one expert (what a single dense model of this mixture looks like)."""
        fields = {f.name for f in dataclasses.fields(DenseConfig)}
        return DenseConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in fields})


CONFIG_CLASSES = {DenseConfig.model_type: DenseConfig, BamConfig.model_type: BamConfig}

# Field -> the key config.json stores it under: Hugging Face's name for the same setting (Llama's,
# Mixtral's). ``top_k`` in particular must not be a config key: it is a generation setting there.
HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
           "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
           "max_seq_len": "max_position_embeddings", "tie_embeddings": "tie_word_embeddings",
           "num_experts": "num_local_experts", "top_k": "num_experts_per_tok", "normalize": "norm_topk_prob",
           "load_balancing_alpha": "router_aux_loss_coef", "z_loss_beta": "router_z_loss_coef"}
# Keys transformers writes or reads that carry nothing a bam config holds (the model classes, its
# version, generation and output switches). "hidden_act" is checked: bam's experts are SwiGLU.
HF_ONLY_KEYS = {"architectures", "auto_map", "transformers_version", "torch_dtype", "dtype", "use_cache",
                "output_router_logits", "hidden_act", "pad_token_id", "_name_or_path"}


FIELD_OF_HF_KEY = {v: k for k, v in HF_KEYS.items()}


def _field_names(d: dict) -> dict:
    """``d`` with Hugging Face key names turned into field names and transformers' own keys dropped."""
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError("hidden_act must be 'silu' (bam models are SwiGLU), "
                         f"got {short_repr(d['hidden_act'])}")
    return {FIELD_OF_HF_KEY.get(key, key): value for key, value in d.items()
            if key != "model_type" and key not in HF_ONLY_KEYS}


def config_from_dict(d: dict) -> DenseConfig:
    """Build the config a ``to_dict`` produced; unknown keys (a field under its own name where the
    file spells it as Hugging Face does, too) are an error, not silently dropped."""
    if not isinstance(d, dict):
        raise ValueError(f"config must be a dict, got {type(d).__name__}")
    model_type = d.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_CLASSES:
        raise ValueError(f"config model_type must be one of {tuple(CONFIG_CLASSES)}, "
                         f"got {short_repr(model_type)}")
    cls = CONFIG_CLASSES[model_type]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(key for key in d if key not in HF_ONLY_KEYS and key != "model_type"
                     and (key in HF_KEYS or FIELD_OF_HF_KEY.get(key, key) not in known))
    if unknown:  # as the file spells them
        raise ValueError(f"unknown {model_type} config keys: {unknown}")
    body = _field_names(d)
    missing = sorted(HF_KEYS.get(f.name, f.name) for f in dataclasses.fields(cls)
                     if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                     and f.name not in body)
    if missing:
        raise ValueError(f"{model_type} config is missing required keys: {missing}")
    try:
        return cls(**body)
    except ValueError as e:
        # The settings the message names, spelled as in the file; the values it quotes (after
        # "got") are the file's own and stay as they are.
        names, got, value = str(e).partition(", got ")
        for name, key in HF_KEYS.items():
            names = re.sub(rf"\b{name}\b", key, names)
        raise ValueError(names + got + value) from None
