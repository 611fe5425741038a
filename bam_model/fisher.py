"""Diagonal Fisher information and Fisher-weighted merging of the parameters a mixture shares
(Matena & Raffel, "Merging Models with Fisher-Weighted Averaging"; Lawson & Qureshi, "Merging
Decision Transformers").

The Fisher of model i is the empirical diagonal Fisher over N sequences of its own domain:
``F_i = (1/N) sum_n (d nll_n / d theta)^2``, ``nll_n`` the mean next-token negative
log-likelihood of sequence n. Merged parameters are the element-wise weighted mean
``sum_i (F_i + e) theta_i / sum_i (F_i + e)``, with ``e = eps * mean(F)`` (the mean over every
model and element of that tensor): a model whose Fisher is zero on an element gets (up to ``eps``)
no weight there, an element where every Fisher is zero falls back to the plain mean, and equal
Fishers give the plain mean.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .data import DOMAINS, BatchStream
from .tokenizer import for_model

GENERAL_MIX = ",".join(DOMAINS)      # the data of a model that names no domain (the seed)


def fisher_sequences(data: str, *, num_sequences: int, seq_len: int, seed: int = 0,
                     tokenizer=None) -> torch.Tensor:
    """[num_sequences, seq_len] int64 token ids drawn from the train split of the ``data`` spec."""
    stream = BatchStream(data, "train", seq_len=seq_len, batch_size=num_sequences, seed=seed,
                         tokenizer=tokenizer)
    return next(stream).input_ids


def diagonal_fisher(model: nn.Module, data: str | torch.Tensor, *, num_sequences: int = 16,
                    seq_len: int = 128, seed: int = 0, tokenizer=None) -> dict[str, torch.Tensor]:
    """The empirical diagonal Fisher of ``model`` (its ``forward(input_ids, labels=...)`` returns
    ``.nll``, or ``.loss`` when it has no ``.nll``), one float32 CPU tensor per named parameter.

    data: a ``--data`` spec (``num_sequences`` windows of ``seq_len`` tokens are drawn from its
    train split with ``seed``, tokenized by ``tokenizer``, by default the model's own) or token
    ids [N, T] to use as they are. Each sequence's gradient is taken alone (batch of one), so the
    result is the mean of per-sequence squared gradients, not the square of a batch gradient.
    """
    if isinstance(data, str):
        tokenizer = for_model(model, tokenizer)
        ids_NT = fisher_sequences(data, num_sequences=num_sequences, seq_len=seq_len, seed=seed,
                                  tokenizer=tokenizer)
    elif isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.is_floating_point() or data.shape[0] < 1 or data.shape[1] < 2:
            raise ValueError(f"data must be integer token ids [N >= 1, T >= 2], got {data.dtype} "
                             f"{tuple(data.shape)}")
        ids_NT = data
    else:
        raise ValueError(f"data must be a data spec or a tensor of token ids, got {type(data).__name__}")
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters")
    params = [p for _, p in named]
    device = params[0].device
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]
    was_training = model.training
    model.eval()
    try:
        for ids_1T in ids_NT.split(1):
            ids_1T = ids_1T.to(device)
            out = model(ids_1T, labels=ids_1T)
            nll = getattr(out, "nll", None)
            nll = out.loss if nll is None else nll
            grads = torch.autograd.grad(nll, params, allow_unused=True)
            for acc, g in zip(sums, grads):
                if g is not None:
                    acc += g.float().square()
    finally:
        model.train(was_training)
    return {name: (acc / ids_NT.shape[0]).cpu() for (name, _), acc in zip(named, sums)}


def fisher_average(tensors: list[torch.Tensor], fishers: list[torch.Tensor],
                   eps: float = 1e-6) -> torch.Tensor:
    """``sum_i (F_i + e) theta_i / sum_i (F_i + e)`` element-wise in float64, ``e = eps * mean(F)``
    (plain mean where every Fisher is zero). tensors, fishers: one per model, all one shape."""
    if not tensors or len(tensors) != len(fishers):
        raise ValueError(f"tensors and fishers must be non-empty lists of one length, got {len(tensors)} and "
                         f"{len(fishers)}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    shape = tensors[0].shape
    for name, group in (("tensors", tensors), ("fishers", fishers)):
        for i, t in enumerate(group):
            if t.shape != shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, expected {tuple(shape)}")
    fisher = torch.stack([f.double().cpu() for f in fishers])  # [models, *shape], as is theta
    if not bool(torch.isfinite(fisher).all()) or bool((fisher < 0).any()):
        raise ValueError("fishers must be finite and >= 0")
    theta = torch.stack([t.double().cpu() for t in tensors])
    scale = fisher.mean()
    fisher = fisher + (eps * scale if scale > 0 else 1.0)
    return ((fisher * theta).sum(0) / fisher.sum(0)).to(tensors[0].device)


def model_fishers(models: list[nn.Module], fishers: list[dict] | None = None,
                  fisher_data: list[str] | None = None, progress: bool = False,
                  **kwargs) -> list[dict[str, torch.Tensor]]:
    """One Fisher per model: ``fishers`` as given (checked against the models), or computed by
    ``diagonal_fisher`` (``kwargs``) on ``fisher_data[i]``, by default each model's own
    ``config.domain`` and ``GENERAL_MIX`` for a model that names none (the seed)."""
    if fishers is not None:
        if fisher_data is not None:
            raise ValueError("give fishers or fisher_data, not both")
        if not isinstance(fishers, (list, tuple)) or len(fishers) != len(models):
            raise ValueError(f"fishers must be a list of {len(models)} dicts (seed first), "
                             f"got {fishers!r:.80}")
        for i, (f, m) in enumerate(zip(fishers, models)):
            if not isinstance(f, dict):
                raise ValueError(f"fishers[{i}] must be a dict of parameter name -> tensor, "
                                 f"got {type(f).__name__}")
            for name, p in m.named_parameters():
                if name not in f:
                    raise ValueError(f"fishers[{i}] has no entry for parameter {name!r}")
                if tuple(f[name].shape) != tuple(p.shape):
                    raise ValueError(f"fishers[{i}][{name!r}] has shape {tuple(f[name].shape)}, expected "
                                     f"{tuple(p.shape)}")
        return list(fishers)
    if fisher_data is None:
        fisher_data = [getattr(m.config, "domain", None) or GENERAL_MIX for m in models]
    if not isinstance(fisher_data, (list, tuple)) or len(fisher_data) != len(models) or not all(
            isinstance(d, (str, torch.Tensor)) for d in fisher_data):
        raise ValueError(f"fisher_data must be a list of {len(models)} data specs (seed first), "
                         f"got {fisher_data!r}")
    from tqdm.auto import tqdm  # noqa: PLC0415 (the model extra: bam_model imports without it)

    out = []
    pairs = tqdm(list(zip(models, fisher_data)), desc="fisher", disable=not progress)
    for i, (model, data) in enumerate(pairs):
        try:
            out.append(diagonal_fisher(model, data, **kwargs))
        except ValueError as e:
            raise ValueError(f"Fisher of model {i} ({'seed' if i == 0 else f'experts[{i - 1}]'}) on "
                             f"{data if isinstance(data, str) else 'token ids'!r}: {e}") from None
    return out
