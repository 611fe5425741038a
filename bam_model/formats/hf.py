"""Import of Hugging Face folders, read without transformers: the decoder families bam computes
(``FAMILIES``: Llama, Mistral, SmolLM; Qwen2 and Qwen2.5 with their query/key/value biases; Qwen3 with
its per-head query/key norm; OLMo 2 with its norms after the sublayers; SmolLM3 with its layers without
RoPE; Granite with its multipliers) as a ``DenseLM``, and Mixtral
as a ``BamLM`` with one attention per layer (its per-expert ``block_sparse_moe.experts.j.w1/w2/w3``
fused into our layout).
"""
from __future__ import annotations

import math
import re

import torch

from ..build import build_model, check_tensors
from ..config import HF_KEYS, DenseConfig
from ..model import DenseLM
from ..options import short_repr
from .folder import folder_config, folder_tensors


def _nope_layers(hf: dict) -> dict:
    """SmolLM3: ``no_rope_layers`` holds 1 for a layer with RoPE, 0 for one without."""
    flags = hf.get("no_rope_layers")
    layers = _hf_value(hf, "num_hidden_layers", "a positive int")
    if not (isinstance(flags, list) and len(flags) == layers and all(f in (0, 1) for f in flags)):
        raise ValueError(f"key 'no_rope_layers' must be a list of {layers} flags (0 or 1), got "
                         f"{short_repr(flags)}")
    return {"nope_layers": [i for i, f in enumerate(flags) if not f]}


def _multipliers(hf: dict) -> dict:
    """Granite's multipliers on the embeddings, the residual branches, the attention scores and the logits."""
    kind, scale = "a finite positive number", _defaults(hf)["attention_multiplier"]
    return {"embedding_multiplier": _hf_value(hf, "embedding_multiplier", kind, 1.0),
            "residual_multiplier": _hf_value(hf, "residual_multiplier", kind, 1.0),
            "attention_scale": _hf_value(hf, "attention_multiplier", kind, scale),
            "logits_scaling": _hf_value(hf, "logits_scaling", kind, 1.0)}


# Each family bam reads: what it adds to Llama's decoder, as bam's settings (``DenseConfig``), from its
# config.json.
FAMILIES = {
    "llama": lambda hf: {},
    "mistral": lambda hf: {},
    "qwen2": lambda hf: {"qkv_bias": True},   # Qwen2, Qwen2.5: biases on q, k and v (not on o)
    "qwen3": lambda hf: {"qk_norm": "head"},  # Qwen3: RMSNorm over each query and key head, before RoPE
    # OLMo 2: norms after the sublayers, scaled in float32
    "olmo2": lambda hf: {"qk_norm": "projection", "block": "post-norm", "norm_in_float32": True},
    "smollm3": _nope_layers,                  # SmolLM3: every 4th layer without RoPE
    "granite": _multipliers,
    "phi3": lambda hf: {},                    # Phi-3: Llama's computation, q/k/v and gate/up fused (below)
}
HF_MODEL_TYPES = tuple(FAMILIES)
_REQUIRED = object()
_HF_KINDS = {  # what a config.json value must be -> its test
    "a positive int": lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
    "a finite positive number": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                           and math.isfinite(v) and v > 0),
    "a finite number >= 0": lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool)
                                       and math.isfinite(v) and v >= 0),
    "true or false": lambda v: isinstance(v, bool),
    "a string": lambda v: isinstance(v, str),
    "an object": lambda v: isinstance(v, dict),
}


def _hf_value(hf: dict, key: str, kind: str, default=_REQUIRED):
    """``hf[key]``, or ``default`` when it is absent or null; a ValueError naming the key unless
    the value is ``kind`` (a key of ``_HF_KINDS``)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"key {key!r} is missing; expected {kind}")
        return default
    if not _HF_KINDS[kind](value):
        raise ValueError(f"key {key!r} must be {kind}, got {short_repr(value)}")
    return value


def _rope_theta(hf: dict) -> float:
    params = _hf_value(hf, "rope_parameters", "an object", {})
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor={short_repr(partial)} is not supported (RoPE on part of "
                         "each head, as in Phi-4-mini); only RoPE over the whole head is")
    if scaling is not None or rope_type != "default":
        raise ValueError(f"RoPE scaling ({short_repr(scaling or params)}) is not supported; only plain RoPE "
                         "is")
    if "rope_theta" in params:
        return _hf_value(params, "rope_theta", "a finite positive number")
    return _hf_value(hf, "rope_theta", "a finite positive number", _defaults(hf)["rope_theta"])


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


# Each class's defaults for the keys that change the function, where a config.json leaves one out
# (transformers 4 saved only what differed from them); the rest default as Llama's do.
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
                  "max_position_embeddings": 2048, "sliding_window": None, "use_sliding_window": True}
FAMILY_DEFAULTS = {
    "mistral": {"sliding_window": 4096, "max_position_embeddings": 131072},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 131072},
    "qwen2": {"use_sliding_window": False, "max_position_embeddings": 32768},
    "qwen3": {"use_sliding_window": False, "max_position_embeddings": 32768},
    "olmo2": {"rms_norm_eps": 1e-5},
    "smollm3": {"rope_theta": 2e6, "tie_word_embeddings": True, "use_sliding_window": False,
                "max_position_embeddings": 32768},
    "granite": {"attention_multiplier": 1.0},
    "phi3": {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096},
}


def _defaults(hf: dict) -> dict:
    return {**LLAMA_DEFAULTS, **FAMILY_DEFAULTS.get(hf.get("model_type"), {})}


def _sliding(hf: dict, n_layers: int) -> dict:
    """``max_seq_len``, and the window and the layers that use it where the model slides its attention:
    within the window sliding attention is full attention, so bam computes full attention and keeps
    inputs to the window (``max_seq_len``); export writes the window back."""
    defaults = _defaults(hf)
    max_len = _hf_value(hf, "max_position_embeddings", "a positive int", defaults["max_position_embeddings"])
    window = _hf_value(hf, "sliding_window", "a positive int", defaults["sliding_window"])
    used = _hf_value(hf, "use_sliding_window", "true or false", defaults["use_sliding_window"])
    if window is None or not used:
        return {"max_seq_len": max_len}
    types = hf.get("layer_types")
    if isinstance(types, list) and len(types) == n_layers:
        layers = [i for i, kind in enumerate(types) if kind == "sliding_attention"]
    elif "max_window_layers" in hf:  # Qwen2's rule: the layers from max_window_layers on slide
        first = _hf_value(hf, "max_window_layers", "a finite number >= 0")
        layers = [i for i in range(n_layers) if i >= first]
    else:
        layers = list(range(n_layers))
    if not layers:
        return {"max_seq_len": max_len}
    return {"max_seq_len": min(max_len, window), "attention_window": window, "window_layers": layers}


def _hf_names(e: ValueError) -> ValueError:
    """``e``, its setting names spelled as config.json spells them."""
    names, got, value = str(e).partition(", got ")
    for name, key in HF_KEYS.items():
        names = re.sub(rf"\b{name}\b", key, names)
    return ValueError(names + got + value)


def dense_config_from_hf(hf: dict, model_types: tuple = HF_MODEL_TYPES) -> DenseConfig:
    """Our ``DenseConfig`` for the ``config.json`` of a family bam reads (``FAMILIES``; the dense part
    of a Mixtral one); refuses what we do not model, and values of the wrong type naming their key. A
    key left out takes its family class's default."""
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; "
                         f"expected one of {model_types}")
    _refuse_unsupported(hf)
    defaults = _defaults(hf)
    n_heads = _hf_value(hf, "num_attention_heads", "a positive int")
    n_layers = _hf_value(hf, "num_hidden_layers", "a positive int")
    vocab = _hf_value(hf, "vocab_size", "a positive int")
    ids = {k: _first_id(hf.get(k)) for k in ("bos_token_id", "eos_token_id")}
    try:
        return DenseConfig(
            vocab_size=vocab, dim=_hf_value(hf, "hidden_size", "a positive int"), n_layers=n_layers,
            n_heads=n_heads, n_kv_heads=_hf_value(hf, "num_key_value_heads", "a positive int", n_heads),
            ffn_dim=_hf_value(hf, "intermediate_size", "a positive int"),
            head_dim=_hf_value(hf, "head_dim", "a positive int", None), rope_theta=_rope_theta(hf),
            norm_eps=_hf_value(hf, "rms_norm_eps", "a finite positive number", defaults["rms_norm_eps"]),
            tie_embeddings=_hf_value(hf, "tie_word_embeddings", "true or false",
                                     defaults["tie_word_embeddings"]),
            **_sliding(hf, n_layers), **(FAMILIES[model_type](hf) if model_type in FAMILIES else {}),
            family=model_type if model_type in FAMILIES else None,
            **{k: v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab else None
               for k, v in ids.items()})
    except ValueError as e:
        raise _hf_names(e) from None


def _refuse_unsupported(hf: dict) -> None:
    """What changes the function and bam does not carry, refused by its key."""
    for key, what in (("attention_bias", "a bias on the attention's output projection"),
                      ("mlp_bias", "biases in the MLP")):
        if _hf_value(hf, key, "true or false", False):
            raise ValueError(f"{key}=true is not supported ({what}, which bam's experts do not carry)")
    act = _hf_value(hf, "hidden_act", "a string", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")


def _hf_keeps(config: DenseConfig):
    """Which tensors of a Hugging Face folder the model takes: old checkpoints store RoPE's inverse
    frequencies (recomputed from rope_theta), and some a tied LM head."""
    return lambda name: not (name.endswith("rotary_emb.inv_freq")
                             or config.tie_embeddings and name == "lm_head.weight")


# Fused projections (Phi-3) -> the parts bam keeps, in order, and each part's rows.
_FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                        "self_attn.v_proj.weight"),
          "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def _part_rows(config: DenseConfig, fused: str) -> tuple[int, ...]:
    if fused.startswith("self_attn."):
        return config.n_heads * config.dh, config.n_kv_heads * config.dh, config.n_kv_heads * config.dh
    return config.ffn_dim, config.ffn_dim


def unfuse(config: DenseConfig, items: dict) -> dict:
    """Name -> tensor (or shape) with fused projections split into bam's parts; a fused tensor of
    another number of rows is left whole (the check then names it)."""
    out = {}
    for name, value in items.items():
        layer, _, leaf = name.partition(".layers.")
        index, _, rest = leaf.partition(".")
        rows = _part_rows(config, rest) if rest in _FUSED else None
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        if rows is None or shape[0] != sum(rows):
            out[name] = value
            continue
        parts = value.split(rows) if isinstance(value, torch.Tensor) else [(r, *shape[1:]) for r in rows]
        out.update({f"{layer}.layers.{index}.{part}": p for part, p in zip(_FUSED[rest], parts)})
    return out


def fuse(config: DenseConfig, tensors: dict) -> dict:
    """``unfuse`` undone: bam's q/k/v and gate/up tensors as Phi-3's fused ones."""
    out = dict(tensors)
    for i in range(config.n_layers):
        for fused, parts in _FUSED.items():
            names = [f"model.layers.{i}.{part}" for part in parts]
            out[f"model.layers.{i}.{fused}"] = torch.cat([out.pop(n) for n in names])
    return out


def load_hf_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> DenseLM:
    """A Hugging Face folder of a family bam reads (config.json + safetensors, sharded or not)."""
    config = folder_config(path, dense_config_from_hf)

    def check(config, shapes, config_name, weights_name):  # names and shapes as bam keeps them
        check_tensors(config, unfuse(config, shapes), config_name, weights_name)

    tensors = folder_tensors(path, config, _hf_keeps(config), check=check)
    return build_model(config, unfuse(config, tensors), dtype, device)
