"""What a model costs: parameters, the parameters a token uses, forward FLOPs per token, KV cache,
measured decoding time; and the matching rules built on them (compute-matched steps,
parameter-matched expert counts)."""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..build import expected_shapes
from ..config import BamConfig, DenseConfig


def _experts(config: DenseConfig) -> tuple[int, int, int, int]:
    """(attention experts, K/V sets, FFN experts a token uses, router rows) of ``config``. bam computes
    every attention expert, also with ``attention_top_k`` (the others get weight 0)."""
    if not isinstance(config, BamConfig):
        return 1, 1, 1, 0
    if config.attention == "dense":
        return 1, 1, config.top_k, config.num_experts
    kv_sets = 1 if config.attention == "shared-kv" else config.num_experts
    return config.num_experts, kv_sets, config.top_k, 2 * config.num_experts


def active_parameters(config: DenseConfig) -> int:
    """Weights one token is multiplied by: every attention expert's query and output projections,
    each K/V set, the top-k FFN experts, the routers and the LM head (norms and the embedding lookup
    left out)."""
    D, H, Hkv, Dh, F = config.dim, config.n_heads, config.n_kv_heads, config.dh, config.ffn_dim
    attn_experts, kv_sets, ffn_experts, router_rows = _experts(config)
    layer = (attn_experts * 2 * D * H * Dh + kv_sets * 2 * D * Hkv * Dh + ffn_experts * 3 * D * F
             + router_rows * D)
    return config.n_layers * layer + D * config.vocab_size


def total_parameters(config: DenseConfig) -> int:
    """Every weight of the model (tied embeddings counted once)."""
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def flops_per_token(config: DenseConfig, seq_len: int) -> float:
    """Forward FLOPs per token of a training window of ``seq_len`` tokens: 2 per multiply-add of
    every projection a token goes through (``active_parameters``) plus causal attention over the mean
    context ``(seq_len + 1) / 2`` in every attention expert. Training costs three times this (the
    backward pass is twice the forward)."""
    attn_experts = _experts(config)[0]
    context = (seq_len + 1) / 2
    scores = attn_experts * 4 * config.n_heads * config.dh * context
    return 2 * active_parameters(config) + config.n_layers * scores


def kv_cache_bytes_per_token(config: DenseConfig, itemsize: int = 2) -> int:
    """KV cache a generated token adds (``itemsize`` bytes per value: 2 for bf16)."""
    kv_sets = _experts(config)[1]
    return config.n_layers * kv_sets * 2 * config.n_kv_heads * config.dh * itemsize


def compute_matched_steps(steps: int, reference: DenseConfig, config: DenseConfig, seq_len: int) -> int:
    """Training steps for ``config`` that cost what ``steps`` steps of ``reference`` cost (same
    batch), at most ``steps`` and at least 1."""
    ratio = flops_per_token(reference, seq_len) / flops_per_token(config, seq_len)
    return max(1, min(steps, int(steps * ratio)))


def btx_config(seed: DenseConfig, num_experts: int, top_k: int) -> BamConfig:
    """A BTX mixture of ``seed``'s architecture (for counting; its routing does not matter here)."""
    fields = {k: v for k, v in seed.__dict__.items() if k != "domain"}
    return BamConfig(**fields, num_experts=num_experts, top_k=top_k, normalize=True, attention="dense",
                     method="btx")


def parameter_matched_experts(seed: DenseConfig, models: int, reference: BamConfig) -> int:
    """The number of FFN experts (more than ``models``, one per dense model) that brings a BTX mixture
    of ``seed`` closest to ``reference``'s parameter count (the paper's parameter-matched BTX: the
    attention experts BAM keeps are paid for with more FFN experts)."""
    target = total_parameters(reference)
    counts = range(models + 1, 8 * models + 1)   # at least one more: ``models`` experts is BTX itself
    return min(counts, key=lambda n: (abs(total_parameters(btx_config(seed, n, 1)) - target), n))


def active_matched_top_k(seed: DenseConfig, num_experts: int, reference: BamConfig) -> int:
    """The FFN top-k (2 or more) with which a BTX of ``num_experts`` experts uses about as many
    parameters per token as ``reference``."""
    target = active_parameters(reference)
    return min(range(2, num_experts + 1),
               key=lambda k: (abs(active_parameters(btx_config(seed, num_experts, k)) - target), k))


@torch.inference_mode()
def decode_ms_per_token(models: dict, prompt_ids: torch.Tensor, new_tokens: int, rounds: int = 5) -> dict:
    """Milliseconds per generated token of each model (greedy, KV cache, the prompt's prefill left
    out: the time of ``new_tokens`` tokens less that of one, over ``new_tokens - 1``), the median of
    ``rounds`` rounds, the models taking turns within each round."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2, got {new_tokens}")
    times: dict[str, list[float]] = {name: [] for name in models}

    def now() -> float:     # CUDA runs asynchronously: wait for the device before reading the clock
        if prompt_ids.is_cuda:
            torch.cuda.synchronize(prompt_ids.device)
        return time.perf_counter()
    for model in models.values():   # a first call pays for allocation and kernel choice
        model.eval()
        model.generate(prompt_ids, 2)
    for _ in range(rounds):
        for name, model in models.items():
            t0 = now()
            model.generate(prompt_ids, 1)
            t1 = now()
            model.generate(prompt_ids, new_tokens)
            t2 = now()
            times[name].append(((t2 - t1) - (t1 - t0)) / (new_tokens - 1) * 1e3)
    return {name: statistics.median(ts) for name, ts in times.items()}
