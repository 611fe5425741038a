"""Import of Hugging Face MoE folders, read without transformers: Mixtral, Qwen2-MoE and Qwen3-MoE (what
bam's export writes, or a published checkpoint whose layers bam computes) as a ``BamLM`` with one
attention per layer (an FFN-only mixture, BTX's kind), their per-expert tensors fused into bam's layout.
"""
from __future__ import annotations

import torch

from ..build import build_model, check_layer_count
from ..config import BamConfig
from ..model import CausalLM
from .folder import folder_config, folder_model_type, folder_tensors
from .hf import _hf_keeps, _hf_names, _hf_value, dense_config_from_hf

# model_type -> the dense family it is made of, the folder's name of a layer's MoE block, and its
# names of each expert's gate, up and down projections
MOE_LAYOUTS = {"mixtral": (None, "block_sparse_moe", ("w1", "w3", "w2")),
               "qwen2_moe": ("qwen2", "mlp", ("gate_proj", "up_proj", "down_proj")),
               "qwen3_moe": ("qwen3", "mlp", ("gate_proj", "up_proj", "down_proj"))}


def moe_config(hf: dict) -> BamConfig:
    """Our ``BamConfig`` for a Mixtral, Qwen2-MoE or Qwen3-MoE ``config.json``: one attention per layer and
    top-k routing, renormalised (Mixtral) or as ``norm_topk_prob`` says (Qwen); what such a class has and
    bam's mixtures do not (a shared expert, dense MLP layers) is refused by its key."""
    model_type = hf.get("model_type")
    dense_family = MOE_LAYOUTS.get(model_type, (None,))[0]
    if model_type != "mixtral":
        if _hf_value(hf, "shared_expert_intermediate_size", "a finite number >= 0", 0):
            raise ValueError("shared_expert_intermediate_size > 0 is not supported (a shared expert beside "
                             "the routed ones, which bam's mixtures do not have)")
        if hf.get("mlp_only_layers") or _hf_value(hf, "decoder_sparse_step", "a positive int", 1) != 1:
            raise ValueError("mlp_only_layers / decoder_sparse_step > 1 are not supported (layers with a "
                             "dense MLP; every layer of bam's mixtures has experts)")
        ffn = _hf_value(hf, "moe_intermediate_size", "a positive int")
        hf = {**hf, "model_type": dense_family, "intermediate_size": ffn, "sliding_window": hf.get(
            "sliding_window") or None}
    dense = dense_config_from_hf(hf, model_types=(hf["model_type"],))
    if model_type == "qwen2_moe" and not _hf_value(hf, "qkv_bias", "true or false", True):
        dense = dense.replace(qkv_bias=False, family=None)  # Qwen2-MoE without biases: Llama's layers
    experts_key = "num_local_experts" if model_type == "mixtral" else "num_experts"
    normalize = True if model_type == "mixtral" else _hf_value(hf, "norm_topk_prob", "true or false", False)
    try:
        return BamConfig(**dense.__dict__, num_experts=_hf_value(hf, experts_key, "a positive int"),
                         top_k=_hf_value(hf, "num_experts_per_tok", "a positive int"), normalize=normalize,
                         attention="dense", method="btx", load_balancing_alpha=_hf_value(
                             hf, "router_aux_loss_coef", "a finite number >= 0", 0.01))
    except ValueError as e:
        raise _hf_names(e) from None


def mixtral_config(hf: dict) -> BamConfig:
    """``moe_config`` of a Mixtral ``config.json`` (which it refuses to be anything else)."""
    if hf.get("model_type") != "mixtral":
        raise ValueError(f"Hugging Face model_type {hf.get('model_type')!r} is not supported; expected "
                         "('mixtral',)")
    return moe_config(hf)


def load_moe_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> CausalLM:
    """A Hugging Face Mixtral, Qwen2-MoE or Qwen3-MoE folder (what bam's export writes, or a published
    checkpoint of layers bam computes) as a ``BamLM`` with one attention per layer. Per-expert tensors
    (``block_sparse_moe.experts.j.w1/w2/w3``, ``mlp.experts.j.gate_proj/up_proj/down_proj``) are fused into
    our layout; a Qwen2-MoE shared expert of size 0 (what bam writes) is left out."""
    config = folder_config(path, moe_config)
    _, block, (gate, up, down) = MOE_LAYOUTS[folder_model_type(path)]
    F, D = config.ffn_dim, config.dim
    want = {gate: (F, D), up: (F, D), down: (D, F)}
    tensors, per_expert = {}, {}
    # The per-expert names do not match ours before fusing: the headers are checked for the layer
    # count (so a config.json of too many layers is refused at once), the experts' shapes here
    # and every name and shape again by build_model.
    for name, t in folder_tensors(path, config, _hf_keeps(config), check=check_layer_count).items():
        key = name.replace(f".{block}.", ".mlp.")
        if ".mlp.shared_expert" in key and t.numel() == 0 or key.endswith(".mlp.shared_expert_gate.weight"):
            continue  # the empty shared expert bam's export writes; its gate then scales nothing
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
    _fuse_experts(config, per_expert, tensors, block, (gate, up, down))
    return build_model(config, tensors, dtype, device)


def _fuse_experts(config: BamConfig, per_expert: dict, tensors: dict, block: str, names: tuple) -> None:
    """The experts of every layer stacked into ``experts.gate_up_proj`` and ``experts.down_proj``."""
    gate, up, down = names
    for i in range(config.n_layers):
        p = f"model.layers.{i}"
        if (p, gate, 0) not in per_expert:
            continue
        try:
            tensors[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([per_expert.pop((p, gate, j)), per_expert.pop((p, up, j))])
                 for j in range(config.num_experts)])
            tensors[f"{p}.mlp.experts.down_proj"] = torch.stack(
                [per_expert.pop((p, down, j)) for j in range(config.num_experts)])
        except KeyError as e:
            layer, w, j = e.args[0]
            raise ValueError(f"checkpoint is missing tensor '{layer}.{block}.experts.{j}.{w}.weight'") \
                from None
    if per_expert:
        layer, w, j = next(iter(per_expert))
        raise ValueError(f"checkpoint has unexpected tensor '{layer}.{block}.experts.{j}.{w}.weight'")


def load_mixtral_folder(path: str, dtype: torch.dtype | None = torch.float32, device="cpu") -> CausalLM:
    """``load_moe_folder`` of a Mixtral folder."""
    return load_moe_folder(path, dtype, device)
