"""How a way of training plugs into the loop (``loop.py``) without a branch there: an ``Extension``
is called at fixed points of every run, each hook doing nothing unless the extension defines it.
Weight mixup (``mixup.MixupExtension``) is one; ``loop.extensions_for`` makes the run's extensions
from its settings, and a new one is a subclass and a line there.

The points, in the order a run meets them:

    data_part      the share of the training documents the model's own steps read
    setup          the module the loop trains in the model's place (its own data streams opened)
    ddp_ignored    parameters DDP leaves alone, param_groups the optimizer groups it steps itself
    restore        on resume, its entry of the checkpoint's ``trainer.json``
    before_step    each optimizer step, after the loop has set the learning rate
    after_step     each optimizer step, after the step (the gradients zeroed)
    log            each metrics record, before the evaluation is added
    state          each checkpoint: its entry of ``trainer.json`` (under ``name``)
    finish         the end: the model written to ``model/``, and its own reports

What an extension may use of the loop (``loop.Loop``): ``step`` (the steps taken), ``cfg``, ``ctx``
(rank and world size), ``opt``, ``out`` (the run folder), ``forward_backward(stream, sync)`` and
``kept()`` (the checkpoint a failing run leaves, in words). A loss that is not finite raises
``LossNotFinite``.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch.nn as nn

from ..data import BatchStream

if TYPE_CHECKING:
    from .loop import Loop


class LossNotFinite(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


class Extension:
    """A part of a training run beyond the plain loop; every hook defaults to doing nothing."""

    name = ""     # its entry in a checkpoint's trainer.json

    def data_part(self) -> tuple[str, float] | None:
        """The part (name, fraction; ``data.split_train``) of each source's training documents that
        the model's own steps read; None: all of them."""
        return None

    def setup(self, model: nn.Module, stream: BatchStream,
              open_stream: Callable[[tuple[str, float]], BatchStream]) -> nn.Module:
        """The module the loop trains in ``model``'s place (before it is wrapped for its strategy).
        ``stream`` is the data of the model's own steps; ``open_stream(part)`` opens another stream of
        the run's training data, on ``part``."""
        return model

    def ddp_ignored(self) -> tuple[str, ...]:
        """Names (in the module ``setup`` returned) of parameters DDP leaves alone: the extension
        reduces their gradients itself."""
        return ()

    def param_groups(self) -> list[dict]:
        """Optimizer groups of parameters the extension steps itself, each with a "name": kept out of
        the model's groups and out of the gradient clipping."""
        return []

    def restore(self, entry: dict | None, checkpoint: Path) -> None:
        """Resuming from ``checkpoint``: its ``trainer.json`` entry ``name`` (None where it has none),
        before the model and optimizer are restored; raise a ValueError to refuse the resume."""

    def before_step(self, loop: Loop) -> None:
        """Before optimizer step ``loop.step + 1``, its learning rate set in every group."""

    def after_step(self, loop: Loop) -> None:
        """After optimizer step ``loop.step + 1`` (``loop.step`` not yet counted up)."""

    def log(self, record: dict, evaluating: bool) -> None:
        """Add to the metrics ``record`` (``evaluating``: the record of an evaluation step)."""

    def state(self) -> dict | None:
        """The entry ``name`` of every checkpoint's ``trainer.json`` (JSON-able; None: none)."""
        return None

    def finish(self, model: nn.Module, out: Path) -> nn.Module:
        """At the end of the run (every rank): the model to write to ``out/model`` in ``model``'s
        place; reports of its own go into ``out`` (from rank 0)."""
        return model
