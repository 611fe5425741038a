"""``bam demo --ablations``: the paper's ablations rerun on the demo's own seed and experts.

- Parameter-matched BTX (the paper's Tables 4-5): BAM keeps every model's attention, so at the same
  number of models it has more parameters than BTX; BTX gets as many more FFN experts (copies of the
  seed's FFN) as bring it closest to BAM expert-KV's parameter count, routed top-1 and with the top-k
  that uses about as many parameters per token as BAM expert-KV.
- Attention routing (Table 6): BAM expert-KV with its attention experts routed top-1 and top-2
  (renormalised) against soft routing over all of them (the main table's ``bam-expert-kv``) and BTX.
- The seed trained on the mixtures' data as long as they are (``seed-continued``): how much of what
  the mixtures lose on the general domains the data alone costs a dense model.
- Inference cost (Table 7): parameters, parameters per token, forward FLOPs per token, KV cache per
  token and measured milliseconds per generated token of the seed, BTX and both BAM mixtures, on one
  machine in one run.

Every mixture is trained as the main table's are (same data, steps, learning rate and seeds).
"""
from __future__ import annotations

import torch

from ..config import BamConfig, DenseConfig
from ..data import eval_windows, parse_data_spec, tokens
from .config import DemoConfig, top1
from .cost import (
    active_matched_top_k,
    decode_ms_per_token,
    parameter_matched_experts,
    total_parameters,
)

ATTENTION_ROUTING = ("bam-expert-kv-attn-top1", "bam-expert-kv-attn-top2")
CONTINUED = "seed-continued"
COST_MODELS = ("seed", "btx", "bam-expert-kv", "bam-shared-kv")
DECODE_PROMPT_TOKENS, DECODE_ROUNDS = 16, 5   # the prompt: at most a quarter of the window


def bam_expert_kv_config(seed: DenseConfig, models: int) -> BamConfig:
    """The main table's BAM expert-KV mixture of ``models`` dense models of ``seed``'s architecture."""
    fields = {k: v for k, v in seed.__dict__.items() if k != "domain"}
    return BamConfig(**fields, num_experts=models, top_k=1, normalize=True, straight_through=True,
                     attention="expert-kv")


def parameter_matched(cfg: DemoConfig, seed: DenseConfig, models: int) -> dict[str, dict]:
    """The parameter-matched BTX mixtures: name -> upcycle arguments (top-k above 1 renormalised, as
    the main table's BTX at top-2)."""
    bam = bam_expert_kv_config(seed, models)
    n = parameter_matched_experts(seed, models, bam)
    k = active_matched_top_k(seed, n, bam)
    return {f"btx-{n}e-top1": dict(method="btx", num_experts=n, **top1(cfg)),
            f"btx-{n}e-top{k}": dict(method="btx", num_experts=n, top_k=k, ffn_routing="renormalized")}


def ablation_mixtures(cfg: DemoConfig, seed: DenseConfig, models: int) -> dict[str, dict]:
    """Every mixture the ablations train: name -> upcycle arguments."""
    attention = {name: dict(method="bam", attention="expert-kv", attention_top_k=k, **top1(cfg))
                 for k, name in enumerate(ATTENTION_ROUTING, start=1)}
    return {**parameter_matched(cfg, seed, models), **attention}


def groups(cfg: DemoConfig, seed: DenseConfig, models: int) -> dict[str, list[str]]:
    """Each ablation's title and the rows it compares (main-table rows among them)."""
    matched = list(parameter_matched(cfg, seed, models))
    return {"Parameter-matched BTX (the paper's Tables 4-5)": ["btx", *matched, "bam-expert-kv"],
            "Attention routing (the paper's Table 6)": ["btx", *ATTENTION_ROUTING, "bam-expert-kv"],
            "The seed trained on the mixtures' data (forgetting)": ["seed", CONTINUED, "sparse", "btx",
                                                                    "bam-expert-kv"]}


def inference_cost(models: dict, seq_len: int, tokenizer, device: torch.device) -> tuple[dict, dict]:
    """Table 7 for ``models`` (name -> trained model): the counted costs and the measured decoding
    time; and how decoding was measured."""
    prompt = eval_windows(tokens(parse_data_spec("code")[0][0], "heldout", tokenizer), seq_len, 1)
    prompt_tokens = max(1, min(DECODE_PROMPT_TOKENS, seq_len // 4))
    prompt = prompt[:, :prompt_tokens].to(device)
    new_tokens = seq_len - prompt_tokens
    ms = decode_ms_per_token(models, prompt, new_tokens, DECODE_ROUNDS)
    cost = {name: {"parameters": total_parameters(m.config),
                   "active_parameters": m.config.active_parameters(),
                   "flops_per_token": m.config.flops_per_token(seq_len),
                   "kv_cache_bytes_per_token": m.config.kv_cache_bytes_per_token(),
                   "decode_ms_per_token": ms[name]}
            for name, m in models.items()}
    return cost, {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "rounds": DECODE_ROUNDS,
                  "batch": 1}
