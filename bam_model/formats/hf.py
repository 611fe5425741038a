"""Import of Hugging Face folders, read without transformers: the decoder families bam computes
(``FAMILIES``: Llama, Mistral, SmolLM; Qwen2 and Qwen2.5 with their query/key/value biases; Qwen3 with
its per-head query/key norm; OLMo 2 with its norms after the sublayers; SmolLM3 with its layers without
RoPE; Granite with its multipliers) as a ``DenseLM``, and Mixtral
as a ``BamLM`` with one attention per layer (its per-expert ``block_sparse_moe.experts.j.w1/w2/w3``
fused into our layout).
"""
from __future__ import annotations

import math

import torch

from ..build import build_model, check_layer_count, check_tensors
from ..config import BamConfig, DenseConfig
from ..model import CausalLM, DenseLM
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
    kind = "a finite positive number"
    return {"embedding_multiplier": _hf_value(hf, "embedding_multiplier", kind, 1.0),
            "residual_multiplier": _hf_value(hf, "residual_multiplier", kind, 1.0),
            "attention_scale": _hf_value(hf, "attention_multiplier", kind, None),
            "logits_scaling": _hf_value(hf, "logits_scaling", kind, 1.0)}


# Each family bam reads: what it adds to Llama's decoder, as bam's settings (``DenseConfig``), from its
# config.json.
FAMILIES = {
    "llama": lambda hf: {},
    "mistral": lambda hf: {},
    "qwen2": lambda hf: {"qkv_bias": True},   # Qwen2, Qwen2.5: biases on q, k and v (not on o)
    "qwen3": lambda hf: {"qk_norm": "head"},  # Qwen3: RMSNorm over each query and key head, before RoPE
    "olmo2": lambda hf: {"qk_norm": "projection", "block": "post-norm"},  # OLMo 2: norms after the sublayers
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
    return _hf_value(hf, "rope_theta", "a finite positive number", 10000.0)


def _first_id(value):
    return value[0] if isinstance(value, list) and value else value


def dense_config_from_hf(hf: dict, model_types: tuple = HF_MODEL_TYPES) -> DenseConfig:
    """Our ``DenseConfig`` for the ``config.json`` of a family bam reads (``FAMILIES``; the dense part
    of a Mixtral one); refuses what we do not model, and values of the wrong type naming their key."""
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise ValueError(f"Hugging Face model_type {model_type!r} is not supported; "
                         f"expected one of {model_types}")
    for key, what in (("attention_bias", "a bias on the attention's output projection"),
                      ("mlp_bias", "biases in the MLP")):
        if _hf_value(hf, key, "true or false", False):
            raise ValueError(f"{key}=true is not supported ({what}, which bam's experts do not carry)")
    if hf.get("clip_qkv") is not None:
        raise ValueError(f"clip_qkv={short_repr(hf['clip_qkv'])} is not supported (queries, keys and values "
                         "clipped to a range)")
    act = _hf_value(hf, "hidden_act", "a string", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU)")
    max_len = _hf_value(hf, "max_position_embeddings", "a positive int", 2048)
    window = _hf_value(hf, "sliding_window", "a positive int", None)
    if window is not None and _hf_value(hf, "use_sliding_window", "true or false", True):
        max_len = min(max_len, window)  # within the window, sliding attention is full attention
    n_heads = _hf_value(hf, "num_attention_heads", "a positive int")
    vocab = _hf_value(hf, "vocab_size", "a positive int")
    ids = {k: _first_id(hf.get(k)) for k in ("bos_token_id", "eos_token_id")}
    return DenseConfig(
        vocab_size=vocab, dim=_hf_value(hf, "hidden_size", "a positive int"),
        n_layers=_hf_value(hf, "num_hidden_layers", "a positive int"), n_heads=n_heads,
        n_kv_heads=_hf_value(hf, "num_key_value_heads", "a positive int", n_heads),
        ffn_dim=_hf_value(hf, "intermediate_size", "a positive int"),
        head_dim=_hf_value(hf, "head_dim", "a positive int", None), rope_theta=_rope_theta(hf),
        norm_eps=_hf_value(hf, "rms_norm_eps", "a finite positive number", 1e-6), max_seq_len=max_len,
        tie_embeddings=_hf_value(hf, "tie_word_embeddings", "true or false", False),
        **(FAMILIES[model_type](hf) if model_type in FAMILIES else {}),
        family=model_type if model_type in FAMILIES else None,
        **{k: v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab else None
           for k, v in ids.items()})


def mixtral_config(hf: dict) -> BamConfig:
    """Our ``BamConfig`` for a Hugging Face Mixtral ``config.json``: one attention per layer and
    top-k renormalised routing (BTX's kind)."""
    dense = dense_config_from_hf(hf, model_types=("mixtral",))
    return BamConfig(**dense.__dict__, num_experts=_hf_value(hf, "num_local_experts", "a positive int"),
                     top_k=_hf_value(hf, "num_experts_per_tok", "a positive int"), normalize=True,
                     attention="dense", method="btx",
                     load_balancing_alpha=_hf_value(hf, "router_aux_loss_coef", "a finite number >= 0", 0.01))


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


def load_mixtral_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> CausalLM:
    """A Hugging Face Mixtral folder (what ``export_mixtral`` writes, or a published Mixtral) as a
    ``BamLM`` with one attention per layer and top-k renormalised routing (BTX's kind).
    Per-expert ``block_sparse_moe.experts.j.w1/w2/w3`` keys are fused into our layout."""
    config = folder_config(path, mixtral_config)
    F, D = config.ffn_dim, config.dim
    want = {"w1": (F, D), "w3": (F, D), "w2": (D, F)}
    tensors = {}
    per_expert = {}
    # The per-expert names do not match ours before fusing: the headers are checked for the layer
    # count (so a config.json of too many layers is refused at once), the experts' shapes here
    # and every name and shape again by build_model.
    for name, t in folder_tensors(path, config, _hf_keeps(config), check=check_layer_count).items():
        key = name.replace(".block_sparse_moe.", ".mlp.")
        parts = key.split(".mlp.experts.")
        if len(parts) == 2 and parts[1].count(".") == 2:  # "j.w1.weight"
            j, w, _ = parts[1].split(".")
            if w not in want or not j.isdecimal():
                raise ValueError(f"checkpoint has unexpected tensor {name!r}")
            if tuple(t.shape) != want[w]:
                raise ValueError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want[w]}")
            per_expert[(parts[0], w, int(j))] = t
        else:
            tensors[key] = t
    E = config.num_experts
    for i in range(config.n_layers):
        p = f"model.layers.{i}"
        if (p, "w1", 0) not in per_expert:
            continue
        try:
            tensors[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([per_expert.pop((p, "w1", j)), per_expert.pop((p, "w3", j))]) for j in range(E)])
            tensors[f"{p}.mlp.experts.down_proj"] = torch.stack(
                [per_expert.pop((p, "w2", j)) for j in range(E)])
        except KeyError as e:
            layer, w, j = e.args[0]
            raise ValueError(f"checkpoint is missing tensor "
                             f"'{layer}.block_sparse_moe.experts.{j}.{w}.weight'") from None
    if per_expert:
        layer, w, j = next(iter(per_expert))
        raise ValueError(f"checkpoint has unexpected tensor "
                         f"'{layer}.block_sparse_moe.experts.{j}.{w}.weight'")
    return build_model(config, tensors, dtype, device)
