"""Weight mixup in a training run (``cfg.mixup``): the loop's extension (``extension.py``) that
trains a ``WeightMixup`` (``mixup.py``). Each optimizer step is a step of the task weights on the
task part of the training documents, then (every ``mixup_every`` steps) a step of the mixing
coefficients on the other part; at the end the model holds the mixed weights, and the run folder
the coefficients' report (``mixup-alpha.json`` and ``.png``).

A checkpoint's ``trainer.json`` holds its ``mixup`` entry: the base's digest (a resume must start
from the same base), the position of the coefficients' data stream and the loss of their latest
step (records carry it until the next one, so a resumed run logs what the uninterrupted one logs).
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .. import distributed
from ..data import BatchStream
from ..formats import from_pretrained
from .config import RunOptions, TrainConfig, mixup_lr_at
from .extension import Extension, LossNotFinite
from .mixup import WeightMixup, tensors_digest, trainable_weights, write_alpha_report

GROUP = "mixup"    # the name of the coefficients' optimizer group


def for_run(cfg: TrainConfig, options: RunOptions, model: nn.Module) -> MixupExtension | None:
    """The run's weight mixup (None without ``cfg.mixup``) against ``options.mixup_base`` (a model
    folder, read onto ``model``'s device; a model; or a dict of its weights); refuses a base without
    ``cfg.mixup``, and the strategies that would shard the weights it keeps whole."""
    base, expert_parallel = options.mixup_base, options.expert_parallel
    if base is not None and not cfg.mixup:
        raise ValueError("mixup_base (--mixup-base) is for weight-mixup training: add --mixup")
    if not cfg.mixup:
        return None
    if options.strategy != "ddp" or expert_parallel:
        raise ValueError("--mixup trains in one process or under torchrun with --strategy ddp; "
                         f"{'--expert-parallel' if expert_parallel else '--strategy fsdp'} would shard the "
                         "weights the mixup keeps whole (its frozen base and coefficients)")
    if isinstance(base, (str, os.PathLike)):
        base = from_pretrained(str(base), device=next(model.parameters()).device)
    return MixupExtension(cfg, base)


class MixupExtension(Extension):
    """Weight mixup of one run against ``base`` (a model with the same weights' names and shapes, or
    a dict of its tensors; None: the model's own weights as they are at ``setup``: resume from the
    same starting model)."""
    name = "mixup"

    def __init__(self, cfg: TrainConfig, base: nn.Module | dict[str, torch.Tensor] | None):
        if isinstance(base, nn.Module):              # its weights alone are kept: the module goes
            base = {name: p.detach() for name, p in trainable_weights(base).items()}
        self.cfg, self.base = cfg, base
        self.fraction = cfg.mixup_fraction           # 0: the coefficients are held, no data kept for them
        self.mixup: WeightMixup | None = None
        self.stream: BatchStream | None = None
        self.base_digest: str | None = None
        self.loss: float | None = None               # of the coefficients' latest step

    def data_part(self) -> tuple[str, float] | None:
        return ("task", self.fraction) if self.fraction else None

    def setup(self, model, stream, open_stream):
        if self.fraction:
            self.stream = open_stream(("mixup", self.fraction))
        cfg = self.cfg
        self.mixup = WeightMixup(model, self.base, granularity=cfg.mixup_granularity, init=cfg.mixup_init,
                                 learn_alpha=cfg.mixup_lr > 0)
        self.base = None                             # held by the WeightMixup from now on
        if self.stream is not None and distributed.current().is_main:
            self._say_parts(stream)
        self.base_digest = tensors_digest(dict(zip(self.mixup.names, self.mixup.base)))
        return self.mixup

    def _say_parts(self, task_stream: BatchStream) -> None:
        """Tell how many tokens each part of the data holds (a document split can miss its share when
        a source has few, long documents)."""
        task, mixup = (sum(len(t) for t in s.tokens) for s in (task_stream, self.stream))
        print(f"train: weight mixup: the weights train on {task:,} tokens, the coefficients on {mixup:,} "
              f"({mixup / (task + mixup):.0%} of the training tokens; --mixup-split {self.fraction:g})",
              file=sys.stderr, flush=True)

    def ddp_ignored(self) -> tuple[str, ...]:
        return tuple(f"logits.{i}" for i in range(len(self.mixup.logits)))

    def param_groups(self) -> list[dict]:
        if self.stream is None:
            return []
        return [{"params": list(self.mixup.logits), "lr": self.cfg.mixup_lr, "weight_decay": 0.0,
                 "name": GROUP}]

    def restore(self, entry, checkpoint):
        """Refuse another base than the run's own (every rank hashes its own base, so every rank
        refuses); continue the coefficients' data stream and their last logged loss."""
        entry = entry or {}
        if entry.get("base_digest") != self.base_digest:
            run = str(checkpoint.parent.parent)
            raise ValueError(f"--resume: the mixup base differs from the one the run in {run!r} started from "
                             "(their SHA-256 digests differ); resume from the same MODEL and --mixup-base")
        if self.stream is not None:
            self.stream.load_state_dict(entry["data"])
            self.loss = entry.get("loss")

    def before_step(self, loop):
        for group in loop.opt.param_groups:
            if group.get("name") == GROUP:
                group["lr"] = mixup_lr_at(loop.step, self.cfg)

    def after_step(self, loop):
        if self.stream is not None and (loop.step + 1) % self.cfg.mixup_every == 0:
            self._coefficients_step(loop)

    def _coefficients_step(self, loop) -> None:
        """One step of the mixing coefficients on the next batch of the mixup part, the task weights
        held (DDP leaves the coefficients alone: their gradients are averaged here, in one message)."""
        self.mixup.set_mode("mixup")
        try:
            means = loop.forward_backward(self.stream, sync=False)
        finally:
            self.mixup.set_mode("task")
        if not math.isfinite(means["loss"]):
            raise LossNotFinite(f"the loss on the mixup part is {means['loss']} at step {loop.step + 1}, "
                                f"after that step's weight update ({loop.kept()}); try a lower --mixup-lr "
                                f"(now {self.cfg.mixup_lr:g})")
        grads = [p.grad for p in self.mixup.logits if p.grad is not None]
        if loop.ctx.world_size > 1 and grads:
            flat = distributed.all_reduce_mean(torch.cat([g.flatten() for g in grads]))
            for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(part.view_as(g))
        loop.opt.step()
        loop.opt.zero_grad(set_to_none=True)
        self.loss = means.get("nll", means["loss"])      # the router losses left out, if any

    def log(self, record, evaluating):
        record["alpha"] = self.mixup.mean_alpha()
        if self.loss is not None:
            record["mixup_loss"] = self.loss
        if evaluating:
            record["alpha_by_weight"] = {name: a.mean().item() for name, a in self.mixup.alphas().items()}

    def state(self) -> dict:
        entry = {"base_digest": self.base_digest}
        if self.stream is not None:
            entry["data"] = self.stream.state_dict()
            entry["loss"] = self.loss
        return entry

    def finish(self, model: nn.Module, out: Path) -> nn.Module:
        if distributed.current().is_main:
            write_alpha_report(self.mixup, out)
        return self.mixup.materialize()
