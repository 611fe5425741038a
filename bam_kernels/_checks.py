"""Argument checks shared by the ops: each failure is a ValueError naming the argument."""
from __future__ import annotations

import torch


def tensor(name: str, t, ndim: int | None = None, floating: bool | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if floating is True and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if floating is False and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")


def shape(name: str, t: torch.Tensor, expected: tuple, described: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {described} = {tuple(expected)}, got {tuple(t.shape)}")


def _same(attribute: str, says: tuple[str, str], names_tensors: dict) -> None:
    """Every tensor's ``attribute`` equals the first's; ``says``: how the message puts the two."""
    items = list(names_tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if getattr(t, attribute) != getattr(first, attribute):
            raise ValueError(f"{name} {says[0]} {getattr(t, attribute)} but {first_name} {says[1]} "
                             f"{getattr(first, attribute)}; they must match")


def same_dtype(names_tensors: dict) -> None:
    _same("dtype", ("has dtype", "has"), names_tensors)


def same_device(names_tensors: dict) -> None:
    _same("device", ("is on", "is on"), names_tensors)


def expert_ids(name: str, idx: torch.Tensor, num_experts: int) -> None:
    """Range check. It reads the values, so on CUDA it syncs: done only on the CPU or when asked."""
    if idx.numel() == 0:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= num_experts:
        raise ValueError(f"{name} holds expert ids in [{lo}, {hi}], expected each in [0, {num_experts - 1}]")


def finite_rows(name: str, t: torch.Tensor) -> None:
    """Each row of t [T, E >= 1] needs a finite maximum: no NaN, no +inf, not -inf throughout
    (-inf alone masks an entry out). It reads the values, so on CUDA it syncs."""
    bad_T = ~torch.isfinite(t.amax(1))
    if bool(bad_T.any()):
        raise ValueError(f"{name} are not finite in row {int(bad_T.nonzero()[0])} "
                         f"({int(bad_T.sum())} of {t.shape[0]} rows): a row may not hold NaN or +inf, "
                         f"nor -inf throughout (-inf masks an entry out)")
