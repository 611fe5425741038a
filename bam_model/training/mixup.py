"""Attention-guided weight mixup (``bam train --mixup``): each weight of the model is trained as

    W = a * W_task + (1 - a) * W_base,    a = sigmoid(logit)

where ``W_base`` is frozen (the model's own starting weights, or ``--mixup-base``), ``W_task`` is
the model's parameter (it starts equal to ``W_base``, so the run starts at the seed whatever ``a``
is) and ``a`` is learned, one per weight element, per output row or per tensor. ``W_task`` and
``a`` are trained by first-order bi-level optimisation on two parts of the training documents
(``data.split_train``): a step of ``W_task`` on a batch of the "task" part with ``a`` held, then a
step of ``a`` on a batch of the "mixup" part with ``W_task`` held. ``a`` thereby picks which parts
of the model move, from data the weights were not fitted to.

``WeightMixup`` wraps a model without changing it: its forward mixes every weight with one fused
elementwise op (``torch.lerp``) and runs the model on the mixed weights (``torch.func.
functional_call``), so it works with any module; the model's state stays ``W_task``.
``materialize()`` writes the mixed weights into the model at the end, which is then a plain model
of its own kind. With ``a`` at 1 the forward is the model's own, bitwise (``lerp`` returns its end
point exactly), and with ``a`` at 0 it is the base's.
"""
from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call

from .. import files
from ..data import TRAIN_PARTS

GRANULARITIES = ("element", "row", "tensor")
MODES = TRAIN_PARTS      # which part of the training data a step reads names what it trains


def alpha_shape(shape: torch.Size, granularity: str) -> tuple[int, ...]:
    """The shape of the mixing coefficients of a weight of ``shape``: the weight's own ("element");
    one per output feature ("row": a matrix ``[out, in]`` or expert stack ``[E, out, in]`` gets
    ``[..., out, 1]``, a vector (a norm's gain) one per entry); or one for the tensor, broadcast."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "element" or (granularity == "row" and len(shape) == 1):
        return tuple(shape)
    if granularity == "row":
        return (*shape[:-1], 1)
    return (1,) * len(shape)


def logit(a: float) -> float:
    """The logit whose sigmoid is ``a`` (+-inf at 1 and 0, whose sigmoid is exact)."""
    if a <= 0:
        return -math.inf
    if a >= 1:
        return math.inf
    return math.log(a / (1 - a))


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors (names, dtypes, shapes and bytes): tells a resumed run whether its
    base is the one the run started from."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()


def _mix(base: torch.Tensor, task: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``a * task + (1 - a) * base`` in one fused op, in float32 for weights of a narrower type (a
    bf16 coefficient would move only in steps of 2**-8) and returned in the weights' own type."""
    if task.dtype == a.dtype:
        return torch.lerp(base, task, a)
    return torch.lerp(base.float(), task.float(), a.float()).to(task.dtype)


def trainable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's floating-point parameters that require grad, each once (a tied weight under its
    first name, as ``functional_call`` wants it)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad and p.is_floating_point()}


class WeightMixup(nn.Module):
    """``model`` trained by weight mixup against ``base`` (name -> tensor, the frozen weights, kept
    as they are: do not change them; by default a copy of the model's own). Its parameters are the
    model's (``W_task``, under ``model.<name>``) and the logits of the mixing coefficients
    (``logits.<i>``, in the order of ``names``). ``mode`` "task" holds the coefficients (gradients
    reach ``W_task`` only), "mixup" holds ``W_task`` (gradients reach the logits only).
    ``learn_alpha=False`` freezes the coefficients at ``init``. The frozen base is kept out of the
    state dict (checkpoints hold ``W_task`` and the logits) and out of DDP's buffer broadcast."""

    def __init__(self, model: nn.Module, base: dict[str, torch.Tensor] | None = None, *,
                 granularity: str = "tensor", init: float = 0.5, learn_alpha: bool = True):
        super().__init__()
        if not (isinstance(init, (int, float)) and not isinstance(init, bool) and 0 <= init <= 1):
            raise ValueError(f"init must be a number in [0, 1], got {init!r}")
        if learn_alpha and init in (0, 1):
            raise ValueError(f"init={init} holds the mixing coefficients fixed (the sigmoid has no gradient "
                             "there); give an init inside (0, 1), or learn_alpha=False (--mixup-lr 0)")
        self.model = model
        weights = trainable_weights(model)
        if not weights:
            raise ValueError("model has no trainable floating-point parameters to mix")
        own = base is None
        if own:
            base = {name: p.detach() for name, p in weights.items()}
        missing = sorted(set(weights) - set(base))
        if missing:
            raise ValueError(f"the mixup base lacks {len(missing)} of the model's weights, e.g. "
                             f"{missing[:3]}")
        self.names = list(weights)
        self.granularity = granularity
        self.mode = "task"
        # Plain attributes, not buffers: not saved, not broadcast by DDP, moved only with the model's
        # weights (``_apply``). A given base is used as it is (not copied) unless it is the model's own
        # storage or of another dtype or device: one copy of the base in memory, never more.
        storages = {p.untyped_storage().data_ptr() for p in weights.values()}
        self.base: list[torch.Tensor] = []
        for name, p in weights.items():
            b = base[name]
            if tuple(b.shape) != tuple(p.shape):
                raise ValueError(f"mixup base weight {name!r} has shape {tuple(b.shape)}, the model "
                                 f"{tuple(p.shape)}")
            aliased = own or b.untyped_storage().data_ptr() in storages
            self.base.append(b.detach().to(device=p.device, dtype=p.dtype, copy=aliased))
        self.logits = nn.ParameterList(
            nn.Parameter(torch.full(alpha_shape(p.shape, granularity), logit(init), device=p.device,
                                    dtype=torch.float32), requires_grad=learn_alpha)
            for p in weights.values())

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.base = [fn(b) for b in self.base]
        return self

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def alphas(self) -> dict[str, torch.Tensor]:
        """name -> the mixing coefficients of that weight (detached)."""
        return {n: torch.sigmoid(lg.detach()) for n, lg in zip(self.names, self.logits)}

    def mixed(self) -> dict[str, torch.Tensor]:
        """name -> the mixed weight, with gradients as ``mode`` says."""
        weights = trainable_weights(self.model)
        out = {}
        for name, b, lg in zip(self.names, self.base, self.logits):
            task = weights[name]
            a = torch.sigmoid(lg)
            if self.mode == "task":
                a = a.detach()
            else:
                task = task.detach()
            out[name] = _mix(b, task, a)
        return out

    def forward(self, *args, **kwargs):
        return functional_call(self.model, self.mixed(), args, kwargs)

    @torch.no_grad()
    def materialize(self) -> nn.Module:
        """Write the mixed weights into the model (in place; ``W_task`` is gone) and return it."""
        weights = trainable_weights(self.model)
        for name, m in self.mixed().items():
            weights[name].copy_(m)
        return self.model

    @torch.no_grad()
    def mean_alpha(self) -> float:
        """The coefficients' mean, each weighted by the elements it covers: the share of ``W_task``
        in the model (one synchronisation)."""
        total = sum(torch.sigmoid(lg).float().mean() * b.numel() for b, lg in zip(self.base, self.logits))
        return float(total) / sum(b.numel() for b in self.base)

    @torch.no_grad()
    def summary(self) -> dict[str, dict[str, float]]:
        """name -> {"mean", "min", "max"} of that weight's coefficients, plus "all": ``mean_alpha``."""
        out = {}
        for name, a in self.alphas().items():
            mean, low, high = torch.stack([a.mean(), a.min(), a.max()]).tolist()
            out[name] = {"mean": mean, "min": low, "max": high}
        out["all"] = {"mean": self.mean_alpha()}
        return out


ALPHA_JSON, ALPHA_PLOT = "mixup-alpha.json", "mixup-alpha.png"
_LAYER = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)")


def write_alpha_report(mixup: WeightMixup, out: Path) -> None:
    """``out/mixup-alpha.json`` (per weight: mean, min and max of its coefficients, and "all") and
    ``out/mixup-alpha.png`` (a heatmap: layers down, weights across, the mean coefficient in each
    cell; 1 means the weight moved as far as its task copy, 0 that it stayed the base's)."""
    summary = mixup.summary()
    files.write_json_atomic(out / ALPHA_JSON, {"granularity": mixup.granularity, "weights": summary})
    plot_alpha({name: s["mean"] for name, s in summary.items() if name != "all"}, out / ALPHA_PLOT,
               title=f"weight mixup: mean coefficient a per weight ({mixup.granularity}; all "
                     f"{summary['all']['mean']:.3f})")


def plot_alpha(means: dict[str, float], path: Path, title: str) -> None:
    """Heatmap of per-weight mean coefficients: one row per decoder layer, one column per weight
    name within a layer, and a last row for the weights outside the layers (embeddings, final norm)."""
    import matplotlib  # noqa: PLC0415 (start-up: matplotlib for the report's chart only)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (start-up: matplotlib for the report's chart only)

    layers: dict[int, dict[str, float]] = {}
    other: dict[str, float] = {}
    for name, mean in means.items():
        m = _LAYER.fullmatch(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2).removesuffix(".weight")] = mean
        else:
            other[name.removesuffix(".weight")] = mean
    columns = list(dict.fromkeys(k for row in layers.values() for k in row))
    rows = sorted(layers)
    grid = np.full((len(rows) + (1 if other else 0), max(len(columns), len(other), 1)), np.nan)
    for r, layer in enumerate(rows):
        for c, key in enumerate(columns):
            grid[r, c] = layers[layer].get(key, np.nan)
    if other:
        grid[-1, :len(other)] = list(other.values())
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * grid.shape[1], 1.2 + 0.28 * grid.shape[0]))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    other_names = list(other)
    for (y, x), v in np.ndenumerate(grid):
        if np.isnan(v):
            continue
        label = f"{other_names[x]}\n{v:.2f}" if other and y == grid.shape[0] - 1 else f"{v:.2f}"
        if grid.size <= 400 or label != f"{v:.2f}":
            ax.text(x, y, label, ha="center", va="center", fontsize=5 if "\n" in label else 6,
                    color="black" if v > 0.6 else "white")
    ax.set_xticks(range(len(columns)), columns, rotation=45, ha="right", fontsize=7)
    labels = [f"layer {layer}" for layer in rows] + (["outside the layers"] if other else [])
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    files.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
