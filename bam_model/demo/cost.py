"""What a model costs beyond what its config counts (``DenseConfig.active_parameters``,
``flops_per_token``, ``kv_cache_bytes_per_token``): its parameters, measured decoding time; and the
matching rules built on them (compute-matched steps, parameter-matched expert counts)."""
from __future__ import annotations

import math
import statistics
import time

import torch

from ..build import expected_shapes
from ..config import BamConfig, DenseConfig


def total_parameters(config: DenseConfig) -> int:
    """Every weight of the model (tied embeddings counted once)."""
    return sum(math.prod(shape) for shape in expected_shapes(config).values())


def compute_matched_steps(steps: int, reference: DenseConfig, config: DenseConfig, seq_len: int) -> int:
    """Training steps for ``config`` that cost what ``steps`` steps of ``reference`` cost (same
    batch), at most ``steps`` and at least 1."""
    ratio = reference.flops_per_token(seq_len) / config.flops_per_token(seq_len)
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
    target = reference.active_parameters()
    return min(range(2, num_experts + 1),
               key=lambda k: (abs(btx_config(seed, num_experts, k).active_parameters() - target), k))


@torch.inference_mode()
def decode_seconds(model, prompt_ids: torch.Tensor, n: int, now) -> float:
    """Seconds ``model`` takes for ``n`` greedy decoding steps after the prompt's prefill, which is not
    timed (``now`` reads the clock): bam's models through their ``KVCache`` (``decode_step``); anything
    else through its own ``decode_steps(prompt_ids, n, now)`` (bam-bench decode's transformers side)."""
    steps = getattr(model, "decode_steps", None)
    if steps is not None:
        return steps(prompt_ids, n, now)
    with torch.inference_mode():
        cache = model.new_cache(prompt_ids.shape[1] + n)
        token = model.decode_step(prompt_ids, cache).argmax(-1, keepdim=True)
        start = now()
        for _ in range(n):
            token = model.decode_step(token, cache).argmax(-1, keepdim=True)
        return now() - start


def decode_ms_per_token(models: dict, prompt_ids: torch.Tensor, new_tokens: int, rounds: int = 5,
                        rounds_ms: dict | None = None) -> dict:
    """Milliseconds per generated token of each model: ``new_tokens`` greedy decoding steps on the cache
    the prompt's prefill filled, the prefill itself not timed (``decode_seconds``), the median of
    ``rounds`` rounds, the models taking turns within each round. A model is one of bam's, or anything
    with ``eval()`` and ``decode_steps(prompt_ids, n, now)``; ``rounds_ms`` (a dict) receives each
    model's time of every round."""
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an int of at least 2, got {new_tokens!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int of at least 1, got {rounds!r}")
    times: dict[str, list[float]] = {name: [] for name in models}

    def now() -> float:     # CUDA runs asynchronously: wait for the device before reading the clock
        if prompt_ids.is_cuda:
            torch.cuda.synchronize(prompt_ids.device)
        return time.perf_counter()
    for model in models.values():   # a first call pays for allocation and kernel choice
        model.eval()
        decode_seconds(model, prompt_ids, 2, now)
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt_ids, new_tokens, now) / new_tokens * 1e3)
    if rounds_ms is not None:
        rounds_ms.update(times)
    return {name: statistics.median(ts) for name, ts in times.items()}
