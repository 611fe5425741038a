"""Every Triton kernel on inputs fenced by NaN: each input is a strided view into a larger buffer
that holds NaN before its first row, after its last and past the end of every row (a KV cache
view is exactly this: valid keys, then whatever the buffer holds). Under the interpreter an
unmasked load outside the tensor then reads NaN, which reaches the outputs and fails the
comparison, where it would read stray memory (or fault) on a GPU."""
import torch

NAN = float("nan")


def fenced(t: torch.Tensor, rows_pad: int = 3, cols_pad: int = 5) -> torch.Tensor:
    """A copy of ``t`` inside a NaN buffer, padded along the first and the last dimension."""
    buf = torch.full((t.shape[0] + 2 * rows_pad, *t.shape[1:-1], t.shape[-1] + cols_pad), NAN, dtype=t.dtype)
    view = buf[rows_pad:rows_pad + t.shape[0], ..., :t.shape[-1]]
    view.copy_(t)
    assert view.stride(-1) == 1
    return view


def grad_leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()
