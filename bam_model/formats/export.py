"""Export to Hugging Face folders, in the class of the family whose computation the model's settings are
(the family it was imported from where that one computes them): a dense model as Llama, Mistral,
Phi-3, Qwen2, Qwen3, OLMo 2, SmolLM3 or Granite; an FFN-only mixture (BTX, sparse upcycling) as the
matching MoE class where transformers has one: Mixtral, Qwen2-MoE or Qwen3-MoE, with the per-expert
keys of published checkpoints. A BAM mixture with attention experts has no Hugging Face
class (its own folder format carries them, with remote code).
"""
from __future__ import annotations

import json

import torch

from ..build import model_tensors
from ..config import BamConfig, DenseConfig
from ..model import CausalLM
from .folder import CONFIG, write_folder
from .hf import fuse

# The features that tell the families apart, and each dense family's; the MoE family of its mixtures.
_LLAMA = {"block": "sequential", "qkv_bias": False, "qk_norm": None, "norm_in_float32": False, "nope": False,
          "multipliers": False}
DENSE_FAMILIES = {"llama": _LLAMA, "mistral": _LLAMA, "phi3": _LLAMA, "qwen2": {**_LLAMA, "qkv_bias": True},
                  "qwen3": {**_LLAMA, "qk_norm": "head"},
                  "olmo2": {**_LLAMA, "block": "post-norm", "qk_norm": "projection", "norm_in_float32": True},
                  "smollm3": {**_LLAMA, "nope": True}, "granite": {**_LLAMA, "multipliers": True}}
MOE_FAMILIES = {"llama": "mixtral", "mistral": "mixtral", "phi3": "mixtral", "qwen2": "qwen2_moe",
                "qwen3": "qwen3_moe"}
CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
           "olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM", "granite": "GraniteForCausalLM",
           "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
           "qwen3_moe": "Qwen3MoeForCausalLM"}


def _features(config: DenseConfig) -> dict:
    multipliers = (config.embedding_multiplier, config.residual_multiplier, config.attention_scale,
                   config.logits_scaling)
    return {"block": config.block, "qkv_bias": config.qkv_bias, "qk_norm": config.qk_norm,
            "norm_in_float32": config.norm_in_float32,
            "nope": bool(config.nope_layers), "multipliers": multipliers != (1.0, 1.0, None, 1.0)}


def family_of(config: DenseConfig) -> str:
    """The Hugging Face family (``model_type``) that computes a model of ``config``; a ValueError that
    says why where none does."""
    if config.block == "parallel":
        raise ValueError("this model has block='parallel' (GPT-J style), which no Llama-family class "
                         "computes. Keep it in bam's format")
    features = _features(config)
    dense = config.family if DENSE_FAMILIES.get(config.family) == features else \
        next((name for name, spec in DENSE_FAMILIES.items() if spec == features), None)
    if dense is None:
        raise ValueError(f"no Hugging Face family has these features together ({features}); keep the model "
                         "in bam's format")
    if config.attention_window is not None and dense not in WINDOWED:
        raise ValueError(f"{CLASSES[dense]} has no sliding window, which this model was imported with "
                         f"(sliding_window={config.attention_window}); keep it in bam's format")
    if not isinstance(config, BamConfig):
        return dense
    if config.attention != "dense":
        raise ValueError(f"this mixture has attention experts (attention={config.attention!r}); Hugging "
                         "Face's MoE classes have one attention per layer, so none can hold it. Use "
                         "save_pretrained")
    moe = MOE_FAMILIES.get(dense)
    if moe is None:
        raise ValueError(f"transformers has no MoE class of the {dense} family (none computes its "
                         "layers); keep the mixture in bam's format, which transformers loads with "
                         "trust_remote_code=True")
    if moe == "mixtral" and not config.normalize and config.top_k != config.num_experts:
        # Mixtral renormalises its top-k router weights; Qwen2-MoE keeps them as they are when asked
        # (norm_topk_prob=false), and computes a Llama-family layer without biases just as well.
        return "qwen2_moe"
    return moe


def _hf_common(config: DenseConfig, dtype: torch.dtype) -> dict:
    """The ``config.json`` keys every family shares."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "vocab_size": config.vocab_size, "hidden_size": config.dim, "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads, "head_dim": config.dh, "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings, "attention_dropout": 0.0,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
        # bam keeps no padding token; a family's default one can lie outside a small vocabulary
        "pad_token_id": None,
        # transformers 5 reads dtype; 4.x and other readers torch_dtype.
        "dtype": dtype_name, "torch_dtype": dtype_name,
    }


# The families whose classes slide attention over a window (in every layer, or in those layer_types say)
WINDOWED = {"mistral", "phi3", "mixtral", "qwen2", "qwen3", "smollm3", "qwen2_moe", "qwen3_moe"}


def _window_keys(config: DenseConfig) -> dict:
    """The sliding window a model was imported with, as Qwen's and SmolLM3's classes take it."""
    if config.attention_window is None:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": config.n_layers}
    return {"use_sliding_window": True, "sliding_window": config.attention_window,
            "max_window_layers": config.window_layers[0],
            "layer_types": ["sliding_attention" if i in config.window_layers else "full_attention"
                            for i in range(config.n_layers)]}


def _family_keys(family: str, config: DenseConfig) -> dict:
    """What ``family``'s config.json adds to the common keys."""
    no_window = _window_keys(config)
    window = {"sliding_window": config.attention_window}
    keys = {"llama": {"attention_bias": False, "mlp_bias": False}, "mistral": window,
            "phi3": window, "qwen2": no_window,
            "qwen3": {"attention_bias": False, **no_window},
            "olmo2": {"attention_bias": False},
            "smollm3": {"attention_bias": False, "mlp_bias": False, **no_window,
                        "no_rope_layers": [int(i not in config.nope_layers) for i in range(config.n_layers)]},
            "granite": {"attention_bias": False, "mlp_bias": False,
                        "embedding_multiplier": config.embedding_multiplier,
                        "residual_multiplier": config.residual_multiplier,
                        "attention_multiplier": config.attention_scale or config.dh ** -0.5,
                        "logits_scaling": config.logits_scaling}}.get(family, {})
    if not isinstance(config, BamConfig):
        return keys
    moe = {"num_experts_per_tok": config.top_k, "router_aux_loss_coef": config.load_balancing_alpha,
           "output_router_logits": False}
    if family == "mixtral":
        return {**moe, "num_local_experts": config.num_experts, **window}
    qwen = {**moe, **no_window, "num_experts": config.num_experts, "moe_intermediate_size": config.ffn_dim,
            "norm_topk_prob": config.normalize, "decoder_sparse_step": 1, "mlp_only_layers": []}
    if family == "qwen2_moe":  # its class always has a shared expert: one of size 0 adds nothing
        return {**qwen, "qkv_bias": config.qkv_bias, "shared_expert_intermediate_size": 0}
    return {**qwen, "attention_bias": False}


def _expert_tensors(family: str, config: BamConfig, prefix: str, leaf: str, t: torch.Tensor) -> dict:
    """A mixture's ``{prefix}.mlp.{leaf}`` tensor under ``family``'s per-expert names."""
    E = config.num_experts
    moe, (w1, w3, w2) = ((f"{prefix}.block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral" else
                         (f"{prefix}.mlp", ("gate_proj", "up_proj", "down_proj")))
    if leaf == "gate.weight":
        out = {f"{moe}.gate.weight": t}
        if family == "qwen2_moe":
            D = config.dim
            out.update({f"{moe}.shared_expert.gate_proj.weight": t.new_zeros(0, D),
                        f"{moe}.shared_expert.up_proj.weight": t.new_zeros(0, D),
                        f"{moe}.shared_expert.down_proj.weight": t.new_zeros(D, 0),
                        f"{moe}.shared_expert_gate.weight": t.new_zeros(1, D)})
        return out
    if leaf == "experts.gate_up_proj":
        gate_EFD, up_EFD = t.chunk(2, dim=1)
        return {**{f"{moe}.experts.{j}.{w1}.weight": gate_EFD[j] for j in range(E)},
                **{f"{moe}.experts.{j}.{w3}.weight": up_EFD[j] for j in range(E)}}
    if leaf == "experts.down_proj":
        return {f"{moe}.experts.{j}.{w2}.weight": t[j] for j in range(E)}
    raise ValueError(f"tensor {prefix}.mlp.{leaf} has no place in a {CLASSES[family]} checkpoint")


def export_family(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                  extra_files: dict[str, str | bytes] | None = None) -> str:
    """Write ``model`` as a Hugging Face folder of the class that computes it (``family_of``), with the
    same logits in transformers; returns the class name. Atomic, like ``save_pretrained``;
    ``extra_files`` (name -> contents, e.g. a tokenizer.json) go into the same folder."""
    config = model.config
    family = family_of(config)
    hf = {"architectures": [CLASSES[family]], "model_type": family, **_hf_common(config, model.dtype),
          **_family_keys(family, config)}
    tensors = {}
    for key, t in model_tensors(model).items():
        if isinstance(config, BamConfig) and ".mlp." in key:
            tensors.update(_expert_tensors(family, config, *key.split(".mlp."), t))
        else:
            tensors[key] = t
    if family == "phi3":  # its q/k/v and gate/up projections are one tensor each
        tensors = fuse(config, tensors)
    write_folder(path, {**(extra_files or {}), CONFIG: json.dumps(hf, indent=2) + "\n"}, tensors,
                 max_shard_bytes)
    return CLASSES[family]


def export_llama(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                 extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write a dense Llama-family model as a Hugging Face Llama folder (``export_family`` for the others)."""
    if isinstance(model.config, BamConfig):
        raise ValueError("export_llama needs a dense model; a BTX or sparse mixture exports with export_hf")
    family = family_of(model.config)
    if family != "llama":
        raise ValueError(f"this model computes as {CLASSES[family]}, not Llama: use export_hf")
    export_family(model, path, max_shard_bytes, extra_files)


def export_mixtral(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                   extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write an FFN-only mixture (BTX, sparse upcycling) of a Llama-family model as a Hugging Face
    Mixtral folder, with the per-expert keys of published Mixtral checkpoints
    (``block_sparse_moe.experts.j.w1/w2/w3``), so ``MixtralForCausalLM.from_pretrained(path)`` gives the
    same logits (``export_family`` for the other families' MoE classes)."""
    if not isinstance(model.config, BamConfig):
        raise ValueError("export_mixtral needs a mixture (BamConfig); a dense model exports with export_hf")
    config = model.config
    family = family_of(config)
    if family == "qwen2_moe" and not config.qkv_bias and not config.normalize:
        raise ValueError(f"Mixtral renormalises its top-{config.top_k} router weights; this mixture does not "
                         "(ffn_routing 'paper'), so Mixtral would compute a different function: export_hf "
                         "writes it as Qwen2-MoE, which keeps them as they are")
    if family != "mixtral":
        raise ValueError(f"this mixture computes as {CLASSES[family]}, not Mixtral: use export_hf")
    export_family(model, path, max_shard_bytes, extra_files)


def export_hf(model: CausalLM, path: str, max_shard_bytes: int | None = None,
              extra_files: dict[str, str | bytes] | None = None) -> str:
    """Write ``model`` in the Hugging Face class that computes it (``export_family``); returns the
    class name. A BAM mixture with attention experts has no Hugging Face class and is refused."""
    return export_family(model, path, max_shard_bytes, extra_files)
