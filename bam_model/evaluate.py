"""Held-out perplexity and bits per byte per domain (``bam eval``; its handler is ``bam_model.cli.eval``).

The held-out tokens of each source are cut into consecutive windows overlapping by one token
(``data.eval_windows``), so each token after the first is scored once, given up to ``seq_len - 1``
tokens of context. ``loss`` is the mean negative log-likelihood in nats per token, ``ppl`` its
exponential, ``bpb`` the total NLL in bits over the UTF-8 bytes those tokens stand for (document
separators count as zero bytes), which compares models with different tokenizers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .config import check_seq_len
from .data import (
    DOMAINS,
    Source,
    eval_rows,
    eval_windows,
    parse_data_spec,
    scored_windows,
    token_arrays,
    token_byte_lengths,
    tokens,
)
from .tokenizer import for_model


def _sources(domains) -> list[Source]:
    if isinstance(domains, str):
        return [s for s, _ in parse_data_spec(domains)]
    if not isinstance(domains, Sequence) or not domains:
        raise ValueError(f"domains must be a data spec or a non-empty list of domains/paths, got {domains!r}")
    out = []
    for d in domains:
        if isinstance(d, Source):
            out.append(d)
        elif isinstance(d, str):
            spec = parse_data_spec(d)
            if len(spec) != 1:
                raise ValueError(f"domains: {d!r} is a mixture; list its parts instead")
            out.append(spec[0][0])
        else:
            raise ValueError(f"domains must hold names, paths or Sources, got {type(d).__name__}")
    return out


@torch.no_grad()
def evaluate(model: nn.Module, domains: str | Sequence[str | Source] = DOMAINS, *, seq_len: int = 256,
             batch_size: int = 8, max_windows: int | None = None, split: str = "heldout",
             tokenizer=None, progress: bool = False) -> dict:
    """Score ``model`` (forward(input_ids) returning ``.logits`` [B, T, V]) on each source's
    ``split``. Returns ``{name: {"loss", "ppl", "bpb", "tokens", "bytes"}, ...,
    "avg": {"loss", "ppl", "bpb"}}``, "avg" being the plain mean over the sources.

    In a torch.distributed process group every rank calls this: rank r scores batches r, r + W, ...
    of each source and the sums are added over the ranks, so W ranks share the work and all get
    the whole result. Every rank runs the same number of forward passes (a rank left without a
    batch in the last round runs one and discards it), as sharded and expert-parallel models need.
    ``progress`` shows a bar per source (rank 0)."""
    from tqdm.auto import tqdm  # noqa: PLC0415 (the model extra: bam_model imports without it)

    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    inner = distributed.unwrap(model)
    if isinstance(seq_len, int):      # its type and least value: eval_windows
        check_seq_len(seq_len, getattr(getattr(inner, "config", None), "max_seq_len", None))
    tokenizer = for_model(inner, tokenizer)
    byte_len = torch.from_numpy(token_byte_lengths(tokenizer))
    device = next(model.parameters()).device
    ctx = distributed.current()
    was_training = model.training
    model.eval()
    results = {}
    try:
        for source in _sources(domains):
            tok, mask = token_arrays(source, split, tokenizer)
            try:
                windows = scored_windows(len(tok), mask, seq_len, max_windows)
            except ValueError as e:
                raise ValueError(f"{source.name}: {e}") from None
            n_batches = -(-len(windows) // batch_size)
            rounds = -(-n_batches // ctx.world_size)
            # Summed on the device: no synchronisation per batch.
            nll = torch.zeros((), dtype=torch.float64, device=device)
            n_tok, n_bytes = 0, 0
            mine = range(ctx.rank, rounds * ctx.world_size, ctx.world_size)
            bar = progress and ctx.is_main
            for i in tqdm(mine, desc=f"eval {source.name}", unit="batch", disable=not bar, leave=False):
                b = min(i, n_batches - 1)     # windows are read from the memory map a batch at a time
                chunk, targets = eval_rows(tok, mask, windows[b * batch_size:(b + 1) * batch_size], seq_len)
                logits = _logits(model, chunk.to(device))
                if i >= n_batches:
                    continue  # the padding pass: collectives inside the model pair up across ranks
                part_nll, part_tok, part_bytes = _batch_sums(logits, chunk, targets[:, 1:], byte_len, device)
                nll += part_nll
                n_tok += part_tok
                n_bytes += part_bytes
            sums = torch.stack([nll.cpu(), torch.tensor(float(n_tok), dtype=torch.float64),
                                torch.tensor(float(n_bytes), dtype=torch.float64)])
            total_nll, n_tok, n_bytes = distributed.all_reduce_sum(sums).tolist()
            results[source.name] = _scores(total_nll, int(n_tok), int(n_bytes))
    finally:
        model.train(was_training)
    results["avg"] = {k: sum(r[k] for r in results.values()) / len(results) for k in ("loss", "ppl", "bpb")}
    return results


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of ``ids`` (on the model's device), under bf16 autocast on CUDA."""
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        return model(ids).logits


def _batch_sums(logits: torch.Tensor, chunk: torch.Tensor, targets: torch.Tensor, byte_len: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, int, int]:
    """A batch's summed NLL of ``targets`` [B, T - 1] (-100: not scored) under ``logits`` [B, T, V],
    left on ``device``; how many tokens were scored, and how many bytes of text they stand for."""
    # Shifted targets (the last position ignored) rather than sliced logits: no logits-sized copy.
    shifted = F.pad(targets.to(device), (0, 1), value=-100)
    nll = F.cross_entropy(logits.flatten(0, 1).float(), shifted.flatten(), ignore_index=-100, reduction="sum")
    scored = targets != -100     # all but a conversation's prompt turns
    return nll, int(scored.sum()), int(byte_len[chunk[:, 1:]][scored].sum())


def _scores(total_nll: float, n_tok: int, n_bytes: int) -> dict:
    """A source's loss (nats per token), perplexity and bits per byte from its summed NLL."""
    loss = total_nll / n_tok
    # exp overflows past a loss of ~709 nats (an untrained or diverged model): inf, not an error.
    return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf,
            "bpb": total_nll / math.log(2) / max(n_bytes, 1), "tokens": n_tok, "bytes": n_bytes}


@torch.no_grad()
def router_use(model: nn.Module, domains, seq_len: int, windows: int, batch_size: int, tokenizer) -> dict:
    """How a mixture's routers spend their weight: per router kind ("ffn", and "attention" for BAM),
    domain and layer, the mean router probability of each expert over ``windows`` held-out windows
    of ``seq_len`` tokens of each domain, and the mean normalised entropy of the per-token
    distributions (1: uniform, 0: one-hot)."""
    device = next(model.parameters()).device
    E = model.config.num_experts
    out = {}
    model.eval()
    for source in _sources(domains):
        ids = eval_windows(tokens(source, "heldout", tokenizer), seq_len, windows)
        sums: dict[str, list] = {}
        for chunk in ids.split(batch_size):
            for kind, layers in model(chunk.to(device)).router_logits.items():
                acc = sums.setdefault(kind, [[torch.zeros(E, dtype=torch.float64), 0.0, 0] for _ in layers])
                for slot, logits_TE in zip(acc, layers):
                    p_TE = torch.softmax(logits_TE.double().cpu(), dim=-1)
                    slot[0] += p_TE.sum(0)
                    slot[1] += float(-(p_TE * p_TE.clamp_min(1e-30).log()).sum(-1).sum() / math.log(E))
                    slot[2] += p_TE.shape[0]
        for kind, acc in sums.items():
            out.setdefault(kind, {})[source.name] = {"mean_prob": [(s / n).tolist() for s, _, n in acc],
                                                     "entropy": [h / n for _, h, n in acc]}
    return out
