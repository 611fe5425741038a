"""Backend choice: the one place that decides between Triton, torch and the reference.

Order of precedence: an active ``use_backend(...)`` context, then the ``BAM_BACKEND`` environment
variable, then the default (``"triton"`` for CUDA tensors, ``"torch"`` otherwise).
"""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

BACKENDS = ("triton", "torch", "reference")

_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("bam_backend", default=None)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Force every bam op inside the ``with`` block onto one backend."""
    token = _forced.set(_check(name))
    try:
        yield
    finally:
        _forced.reset(token)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401, PLC0415 (probes whether triton is installed)
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result
def _asked_for() -> str:
    """The backend forced by a ``use_backend`` block or ``BAM_BACKEND``, else "" (a constant to
    torch.compile, which bakes the choice into the graph it traces)."""
    return _forced.get() or os.environ.get("BAM_BACKEND") or ""


def backend_for(*tensors: torch.Tensor) -> str:
    """The backend an op should run on for these input tensors."""
    name = _asked_for() or None
    on_cuda = any(t.is_cuda for t in tensors)
    if name is None:
        return "triton" if on_cuda and triton_available() else "torch"
    name = _check(name)
    if name == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' was asked for but triton is not installed")
        if not on_cuda and not interpreting():
            raise RuntimeError(
                "backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                "imported to run its kernels on the CPU")
    return name


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these inputs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def call_directly(*tensors: torch.Tensor | None) -> bool:
    """Whether an op may run its implementation without its registered custom op: in eager mode,
    with no gradient to record, on plain tensors with data and with no dispatch mode active. A custom op
    costs tens of microseconds of Python per call, which decoding pays for every op of every layer
    of every token; torch.compile, autograd, fake and other tensor subclasses still go through the
    op, so what they see is unchanged."""
    present = [t for t in tensors if t is not None]
    return (not needs_grad(*present) and not torch.compiler.is_compiling()
            and _get_current_dispatch_mode() is None
            and all(type(t) in _PLAIN and not t.is_meta for t in present))


def autocast_to(*tensors: torch.Tensor):
    """Inside an autocast region, the floating tensors cast to its dtype (as F.linear and SDPA
    would be run), else unchanged: the GEMM-like ops then run in bf16/fp16 on fp32 parameters, and
    gradients flow back through the casts."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    device_type = first.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors  # (meta tensors, for one, have no autocast)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)
