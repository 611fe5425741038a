"""Evaluation windows: a split's tokens cut into windows that overlap by one token, so that every
token after the first is scored once; with a loss mask, only the windows that hold a target."""
from __future__ import annotations

import numpy as np
import torch


def check_int(name: str, value, minimum: int) -> None:
    """Refuse ``value`` unless it is an int (not a bool) of at least ``minimum``, naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def eval_window_count(n_tokens: int, seq_len: int, max_windows: int | None = None) -> int:
    """How many windows ``eval_windows`` cuts from ``n_tokens`` tokens (at most ``max_windows``)."""
    check_int("seq_len", seq_len, 2)
    n = (n_tokens - 1) // (seq_len - 1)
    if max_windows is not None:
        check_int("max_windows", max_windows, 1)
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"seq_len={seq_len} is longer than the {n_tokens} tokens to evaluate")
    return n


def scored_windows(n_tokens: int, mask: np.ndarray | None, seq_len: int, max_windows: int | None = None
                   ) -> np.ndarray:
    """The indices of the windows of ``eval_windows`` that are scored: all of them (at most
    ``max_windows``); with a loss ``mask`` (conversations), those holding a target after their first
    token, the first ``max_windows`` of them."""
    if mask is None:
        return np.arange(eval_window_count(n_tokens, seq_len, max_windows))
    n = eval_window_count(n_tokens, seq_len)
    step = seq_len - 1
    # A window w scores tokens w*step + 1 .. w*step + step: whether any is a target, from a running sum.
    ends = np.concatenate([[0], np.cumsum(np.asarray(mask[:n * step + 1], dtype=np.int64))])
    starts = np.arange(n) * step
    has = ends[starts + step + 1] - ends[starts + 1] > 0
    chosen = np.nonzero(has)[0]
    if not len(chosen):
        raise ValueError("no held-out window holds a token in the loss (the conversations' assistant turns)")
    return chosen[:max_windows] if max_windows is not None else chosen


def eval_rows(tok: np.ndarray, mask: np.ndarray | None, windows: np.ndarray, seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows ``windows`` (indices) of ``eval_windows(tok, seq_len)`` [len, seq_len] int64, and
    their labels: the same, with -100 where ``mask`` (the source's ``loss_mask``) leaves a token out
    of the loss. Read from ``tok`` (a memory map) a batch at a time."""
    idx = np.asarray(windows)[:, None] * (seq_len - 1) + np.arange(seq_len)[None, :]
    ids = torch.from_numpy(np.asarray(tok[idx]).astype(np.int64))
    labels = ids.clone()
    if mask is not None:
        labels[torch.from_numpy(np.asarray(mask[idx]) == 0)] = -100
    return ids, labels


def eval_windows(tok: np.ndarray, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """[N, seq_len] int64: consecutive windows from the start of ``tok``, overlapping by one token,
    so that every token after the first (up to the last full window) is predicted exactly once."""
    n = eval_window_count(len(tok), seq_len, max_windows)
    return eval_rows(tok, None, np.arange(n), seq_len)[0]
