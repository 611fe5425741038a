"""Export to Hugging Face folders: a dense model as Llama, an FFN-only mixture (BTX, sparse
upcycling) as Mixtral with the per-expert keys of published Mixtral checkpoints.
"""
from __future__ import annotations

import json

import torch

from ..build import model_tensors
from ..config import BamConfig, DenseConfig
from ..model import CausalLM
from .folder import CONFIG, write_folder


def _hf_common(config: DenseConfig, dtype: torch.dtype) -> dict:
    """The ``config.json`` keys Llama and Mixtral share."""
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
        # transformers 5 reads dtype; 4.x and other readers torch_dtype.
        "dtype": dtype_name, "torch_dtype": dtype_name,
    }


def export_llama(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                 extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write a dense model as a Hugging Face Llama folder: our tensors already have Llama's names
    and layout, so ``LlamaForCausalLM.from_pretrained(path)`` gives the same logits. A parallel-block
    model has no Llama form and is refused. Atomic, like ``save_pretrained``."""
    config = model.config
    if isinstance(config, BamConfig):
        raise ValueError("export_llama needs a dense model; a BTX or sparse mixture exports as Mixtral")
    if config.block != "sequential":
        raise ValueError("Llama blocks are sequential; this model has block='parallel' (GPT-J style), "
                         "which no Hugging Face Llama-family class computes. Keep it in bam's format")
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_hf_common(config, model.dtype),
          "attention_bias": False, "mlp_bias": False}
    write_folder(path, {**(extra_files or {}), CONFIG: json.dumps(hf, indent=2) + "\n"}, model_tensors(model),
                 max_shard_bytes)


def export_hf(model: CausalLM, path: str, max_shard_bytes: int | None = None,
              extra_files: dict[str, str | bytes] | None = None) -> str:
    """Write ``model`` in the Hugging Face class that computes it: a dense model as Llama, a BTX or
    sparse mixture as Mixtral; returns the class name. A BAM mixture with attention experts has no
    Hugging Face class and is refused."""
    if isinstance(model.config, BamConfig):
        export_mixtral(model, path, max_shard_bytes, extra_files)
        return "MixtralForCausalLM"
    export_llama(model, path, max_shard_bytes, extra_files)
    return "LlamaForCausalLM"


def export_mixtral(model: CausalLM, path: str, max_shard_bytes: int | None = None,
                   extra_files: dict[str, str | bytes] | None = None) -> None:
    """Write an FFN-only mixture (BTX, sparse upcycling) as a Hugging Face Mixtral folder, with the
    per-expert keys of published Mixtral checkpoints (``block_sparse_moe.experts.j.w1/w2/w3``), so
    ``MixtralForCausalLM.from_pretrained(path)`` gives the same logits. Atomic, like ``save_pretrained``;
    ``extra_files`` (name -> contents, e.g. a tokenizer.json) go into the same folder.
    """
    config = model.config
    if not isinstance(config, BamConfig):
        raise ValueError("export_mixtral needs a mixture (BamConfig); a dense model exports as Llama "
                         "(export_llama)")
    if config.attention != "dense":
        raise ValueError(f"this mixture has attention experts (attention={config.attention!r}); Mixtral has "
                         "one attention per layer, so no Hugging Face class can hold it. Use save_pretrained")
    if config.block != "sequential":
        raise ValueError("Mixtral blocks are sequential; this mixture has block='parallel'")
    if not config.normalize and config.top_k != config.num_experts:
        raise ValueError(f"Mixtral renormalises its top-{config.top_k} router weights; this mixture does not "
                         "(ffn_routing 'paper'), so Mixtral would compute a different function")
    hf = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **_hf_common(config, model.dtype),
          "num_local_experts": config.num_experts, "num_experts_per_tok": config.top_k,
          "router_aux_loss_coef": config.load_balancing_alpha, "output_router_logits": False,
          "sliding_window": None}
    tensors = {}
    for key, t in model_tensors(model).items():
        if ".mlp." not in key:
            tensors[key] = t
            continue
        prefix, leaf = key.split(".mlp.")
        moe = f"{prefix}.block_sparse_moe"
        if leaf == "gate.weight":
            tensors[f"{moe}.gate.weight"] = t
        elif leaf == "experts.gate_up_proj":
            gate_EFD, up_EFD = t.chunk(2, dim=1)
            for j in range(config.num_experts):
                tensors[f"{moe}.experts.{j}.w1.weight"] = gate_EFD[j]
                tensors[f"{moe}.experts.{j}.w3.weight"] = up_EFD[j]
        elif leaf == "experts.down_proj":
            for j in range(config.num_experts):
                tensors[f"{moe}.experts.{j}.w2.weight"] = t[j]
        else:
            raise ValueError(f"tensor {key!r} has no place in a Mixtral checkpoint")
    write_folder(path, {**(extra_files or {}), CONFIG: json.dumps(hf, indent=2) + "\n"}, tensors,
                 max_shard_bytes)
