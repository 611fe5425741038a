"""Rotary position embedding in Hugging Face Llama's convention (rotate_half: the first and second
halves of each head are the two coordinates of a pair), so that HF q/k weights work unpermuted."""
from __future__ import annotations

import torch


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                 dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [..., T] integer -> (cos, sin), each [..., T, head_dim] in ``dtype``.

    Angles are computed in float32 as HF does (float64 when ``dtype`` is float64), then cast.
    """
    if positions.is_floating_point() or positions.is_complex():
        raise ValueError(f"positions must be an integer tensor, got dtype {positions.dtype}")
    if not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even int, got {head_dim!r}")
    device = positions.device if device is None else device
    work = torch.float64 if dtype == torch.float64 else torch.float32
    exponent_P = torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).to(work) / head_dim
    inv_freq_P = 1.0 / (theta ** exponent_P)
    angles_TP = positions.to(device=device, dtype=work)[..., None] * inv_freq_P
    angles_TDh = torch.cat((angles_TP, angles_TP), dim=-1)
    return angles_TDh.cos().to(dtype), angles_TDh.sin().to(dtype)


_TABLES: dict = {}


def rope_cos_sin_range(start: int, length: int, head_dim: int, theta: float = 10000.0,
                       dtype: torch.dtype = torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_cos_sin`` of positions ``start .. start + length - 1``, each [length, head_dim], sliced
    from a table kept per (device, head_dim, theta) that grows by doubling: the layers of a model,
    and every decoding step, share it instead of computing the angles again (a dozen small
    kernels per layer per token). Under torch.compile the angles are computed in the graph."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if torch.compiler.is_compiling():
        positions = torch.arange(start, start + length, device=device)
        return rope_cos_sin(positions, head_dim, theta, dtype, device)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    key = (device, head_dim, float(theta), work)
    end = start + length
    table = _TABLES.get(key)
    if table is None or table[0].shape[0] < end:
        n = max(end, 2 * (table[0].shape[0] if table is not None else 0), 256)
        # A plain tensor whatever the caller's mode: one made under inference_mode could not be
        # saved for a later training step's backward.
        with torch.inference_mode(False), torch.no_grad():
            table = _TABLES[key] = rope_cos_sin(torch.arange(n, device=device), head_dim, theta, work, device)
    return table[0][start:end].to(dtype), table[1][start:end].to(dtype)


def rope_for(position_ids: torch.Tensor | None, start: int, length: int, head_dim: int, theta: float,
             dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) for an attention layer: of ``position_ids`` when given, else of the positions
    ``start ..`` that follow its cache, from the shared table."""
    if position_ids is None:
        return rope_cos_sin_range(start, length, head_dim, theta, dtype, device)
    return rope_cos_sin(position_ids, head_dim, theta, dtype, device)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., T, heads, Dh]; cos, sin [..., T, Dh] from ``rope_cos_sin`` (leading dims broadcast).

    Returns x rotated, in x's dtype (cos and sin are cast to it first, as HF does).
    """
    if x.dim() < 3:
        raise ValueError(f"x must be [..., T, heads, Dh], got shape {tuple(x.shape)}")
    if cos.shape != sin.shape or cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[-3]:
        raise ValueError(f"cos and sin must be [..., T={x.shape[-3]}, Dh={x.shape[-1]}], "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    cos_T1Dh = cos.to(x.dtype).unsqueeze(-2)
    sin_T1Dh = sin.to(x.dtype).unsqueeze(-2)
    return x * cos_T1Dh + rotate_half(x) * sin_T1Dh
