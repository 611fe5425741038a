"""A training run's settings, also the flags of ``bam train``: its hyper-parameters (``TrainConfig``,
which a resumed run must repeat) and where and how it runs (``RunOptions``); the learning-rate
schedule and the optimizer."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..config import DTYPES, dtype_option
from ..distributed import STRATEGIES
from ..options import INT, NUMBER, int_at_least, number_in, option, seed_check, validate
from .mixup import GRANULARITIES

AT_LEAST_0, AT_LEAST_1 = int_at_least(0), int_at_least(1)
FRACTION = number_in(0, 1)
NON_NEGATIVE = number_in(0, math.inf)


@dataclass
class TrainConfig:
    """Hyper-parameters of one run. ``batch_size`` is sequences per optimizer step, split into
    ``grad_accum`` micro-batches; ``warmup=None`` means ``min(100, steps // 10)``;
    ``eval_every``/``save_every`` 0 mean at the end only; ``eval_windows`` caps the held-out
    windows per source in periodic evaluation."""
    steps: int = option(help="optimizer steps", kind=INT, check=AT_LEAST_1)
    batch_size: int = option(16, help="sequences per optimizer step", kind=INT, check=AT_LEAST_1)
    seq_len: int = option(256, help="tokens per training sequence", kind=INT, check=int_at_least(2))
    lr: float = option(3e-4, help="peak learning rate", kind=NUMBER,
                       check=number_in(0, math.inf, above_low=True))
    min_lr_ratio: float = option(0.1, help="final lr / peak lr", kind=NUMBER, check=FRACTION)
    warmup: int | None = option(None, help="warm-up steps (default min(100, steps/10))", kind=INT)
    weight_decay: float = option(0.1, help="AdamW weight decay of matrices and embeddings", kind=NUMBER,
                                 check=NON_NEGATIVE)
    beta1: float = option(0.9, help="AdamW beta1", kind=NUMBER, check=FRACTION, cli=False)
    beta2: float = option(0.95, help="AdamW beta2", kind=NUMBER, check=FRACTION, cli=False)
    grad_clip: float = option(1.0, help="max gradient norm (0: off)", kind=NUMBER, check=NON_NEGATIVE)
    grad_accum: int = option(1, help="micro-batches per step", kind=INT, check=AT_LEAST_1)
    seed: int = option(0, help="seed of the data order and dropout (at most 2**62)", kind=INT,
                       check=seed_check)
    log_every: int = option(10, help="steps between metrics records", kind=INT, check=AT_LEAST_1)
    eval_every: int = option(0, help="0: at the end only", kind=INT, check=AT_LEAST_0)
    eval_windows: int = option(32, help="held-out windows per source", kind=INT, check=AT_LEAST_1)
    save_every: int = option(0, help="checkpoint period (0: at the end only)", kind=INT, check=AT_LEAST_0)
    keep_checkpoints: int = option(1, help="checkpoints kept (each holds the model and its optimizer state "
                                   "in float32)", kind=INT, check=AT_LEAST_1)
    mixup: bool = option(
        False, help="train by attention-guided weight mixup: every weight is a * W_task + (1 - a) * W_base "
        "with W_base frozen (the model's starting weights, or --mixup-base); W_task and the mixing "
        "coefficients a train by turns on two parts of the training documents; model/ holds the mixed "
        "weights")
    mixup_granularity: str = option(
        "tensor", help="with --mixup: one coefficient per weight element, per output row (a norm's gain: per "
        "entry) or per tensor", choices=GRANULARITIES)
    mixup_init: float = option(
        0.5, help="with --mixup: starting value of every coefficient, in [0, 1] (0 and 1 only with "
        "--mixup-lr 0)", kind=NUMBER, check=FRACTION)
    mixup_lr: float = option(
        1e-2, help="with --mixup: peak learning rate of the coefficients' logits (Adam, no weight decay, the "
        "run's warm-up and decay); 0 holds them at --mixup-init", kind=NUMBER, check=NON_NEGATIVE)
    mixup_split: float | None = option(
        None, help="with --mixup: share of each source's training documents (by characters, chosen by a hash "
        "of their text) the coefficients' steps read; the weights' steps read the rest (default 0.2; 0 with "
        "--mixup-lr 0)", kind=NUMBER, check=number_in(0, 0.9))
    mixup_every: int = option(1, help="with --mixup: weight steps per step of the coefficients", kind=INT,
                              check=AT_LEAST_1)

    def __post_init__(self):
        validate(self)
        if self.warmup is not None and (not isinstance(self.warmup, int) or isinstance(self.warmup, bool)
                                        or not 0 <= self.warmup <= self.steps):
            raise ValueError(f"warmup must be None or an int in [0, steps={self.steps}], "
                             f"got {self.warmup!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum}")
        if not self.mixup:
            # A weight-mixup setting in a plain run would do nothing, then bar resuming without it.
            given = [f.name for f in dataclasses.fields(self)
                     if f.name.startswith("mixup_") and getattr(self, f.name) != f.default]
            if given:
                raise ValueError(f"{given[0]}={getattr(self, given[0])!r} is a setting of weight-mixup "
                                 "training: add mixup=True (--mixup), or leave it out")
        else:
            learned = self.mixup_lr > 0
            if learned and self.mixup_init in (0, 1):
                raise ValueError(f"mixup_init={self.mixup_init} holds the coefficients where the sigmoid has "
                                 "no gradient; give an init inside (0, 1), or mixup_lr=0 to hold them there")
            if learned and self.mixup_split == 0:
                raise ValueError("mixup_split=0 leaves no documents for the coefficients' steps; give a "
                                 "share above 0, or mixup_lr=0 to hold the coefficients")
            if not learned and self.mixup_split:
                raise ValueError(f"mixup_split={self.mixup_split} with mixup_lr=0: the coefficients are "
                                 "held, so no documents need keeping for them; leave mixup_split out (or 0)")

    @property
    def mixup_fraction(self) -> float:
        """The share of training documents the coefficients' steps read (0 when they are held)."""
        if self.mixup_split is not None:
            return self.mixup_split
        return 0.2 if self.mixup_lr > 0 else 0.0

    @property
    def warmup_steps(self) -> int:
        return min(100, self.steps // 10) if self.warmup is None else self.warmup


@dataclass(kw_only=True)
class RunOptions:
    """What a run trains on, where it writes and how it runs, beside its hyper-parameters: the data
    spec, the run folder ``out`` (checked, claimed and locked by ``run_folder.open_run``), the
    strategy under torchrun (every rank runs with the same options), the dtype of the final
    ``out/model`` and the base of weight mixup. ``cli.train.TrainRun`` adds what ``bam train``
    needs besides (the model's folder, the device, the progress lines)."""
    data: str = option(help="domain (code, math, legal, drama, scripture), mixture 'code:0.5,math:0.5', or "
                       "text path")
    out: str | os.PathLike = option(help="run folder: metrics.jsonl, checkpoints/, model/")
    resume: bool = option(False, help="continue the run in --out from its newest intact checkpoint, with the "
                          "same settings (only --log-every, --eval-every, --eval-windows, --save-every and "
                          "--keep-checkpoints may change); a fresh run when --out holds none")
    overwrite: bool = option(False, help="start afresh in an --out that holds an earlier run, removing that "
                             "run's files")
    strategy: str = option("ddp", help="under torchrun: ddp replicates the model on every rank, fsdp shards "
                           "parameters, gradients and optimizer state over the ranks", choices=STRATEGIES)
    expert_parallel: bool = option(False, help="under torchrun (ddp): spread each MoE layer's experts over "
                                   "the ranks, tokens exchanged with all-to-all; the number of experts must "
                                   "divide by the world size")
    dtype: str | None = dtype_option(None, help="dtype of the final model/ (default: the training dtype, "
                                     "float32); bfloat16 halves its size. Checkpoints keep float32 weights "
                                     "and optimizer state, which resuming needs")
    # From Python also a model or a dict of its weights (name -> tensor), used as they are.
    mixup_base: str | os.PathLike | nn.Module | dict | None = option(
        None, help="with --mixup: the model folder whose weights are the frozen W_base (default: MODEL's "
        "own); same weight names and shapes as MODEL. W_task starts as MODEL: the run starts at a * MODEL + "
        "(1 - a) * BASE")

    def __post_init__(self):
        validate(self)

    @property
    def save_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype] if self.dtype is not None else None


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay."""
    warmup = cfg.warmup_steps
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def mixup_lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of the mixing coefficients at step ``step``: the run's schedule, peak ``mixup_lr``."""
    return lr_at(step, cfg) * cfg.mixup_lr / cfg.lr


def make_optimizer(model: nn.Module, cfg: TrainConfig, skip: Collection[int] = ()) -> torch.optim.AdamW:
    """AdamW over the model's trainable parameters (but those whose ``id`` is in ``skip``); matrices
    and embeddings decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in skip]
    if not params:
        raise ValueError("model has no trainable parameters")
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
