"""A bounds checker for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``), in the spirit
of compute-sanitizer's memcheck.

The interpreter runs a kernel's loads and stores on raw host addresses: a store one row past an
output lands silently in whatever the allocator put there (another test's tensor, a cached table),
and an unmasked load reads it. Neither shows up where it happens. Installed, every load and store
of a launch is checked, lane by lane (masked-off lanes excepted), against the memory spans of the
tensors passed to that launch; an access outside all of them raises ``OutOfBounds`` naming the
kernel, the access and the nearest tensor argument.

It wraps two methods of the interpreter (``InterpreterBuilder.create_masked_load`` and
``create_masked_store``) and the launcher (``GridExecutor.__call__``); ``install`` returns False,
and checks nothing, where a Triton version lacks them.
"""
from __future__ import annotations

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


_launches: list[tuple[str, list[tuple[int, int, str]]]] = []  # (kernel, [(lo, hi, argument)])
_installed = False


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """[lo, hi) bytes of the elements a strided view can address."""
    if t.numel() == 0:
        return None
    es = t.element_size()
    low = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s < 0)
    high = sum((n - 1) * s for n, s in zip(t.shape, t.stride()) if s > 0)
    return t.data_ptr() + low * es, t.data_ptr() + (high + 1) * es


def _tensor_args(names, values):
    for name, value in zip(names, values):
        if isinstance(value, torch.Tensor):
            yield name, value
        elif hasattr(value, "base") and isinstance(getattr(value, "base"), torch.Tensor):  # TensorWrapper
            yield name, value.base


def _check(kind: str, ptrs, mask, elem_bytes: int):
    if not _launches:
        return
    kernel, spans = _launches[-1]
    addr = np.asarray(ptrs.data).astype(np.uint64, copy=False).ravel()
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
        addr = addr[m]
    if addr.size == 0:
        return
    ok = np.zeros(addr.shape, dtype=bool)
    end = addr + np.uint64(elem_bytes)
    for lo, hi, _ in spans:
        ok |= (addr >= np.uint64(lo)) & (end <= np.uint64(hi))
    if ok.all():
        return
    bad = int(addr[~ok][0])
    lo, hi, name = min(spans, key=lambda s: min(abs(bad - s[0]), abs(bad - s[1])))
    raise OutOfBounds(f"{kernel}: {kind} of {int((~ok).sum())} lane(s) outside every tensor argument; the "
                      f"first at element offset {(bad - lo) // elem_bytes} of `{name}`, whose span is "
                      f"[0, {(hi - lo) // elem_bytes})")


def install() -> bool:
    """Turn the checks on for this process; False where this Triton's interpreter differs."""
    global _installed
    if _installed:
        return True
    try:
        from triton.runtime import interpreter as it
        builder, executor = it.InterpreterBuilder, it.GridExecutor
        load, store, call = builder.create_masked_load, builder.create_masked_store, executor.__call__
    except (ImportError, AttributeError):
        return False
    import inspect

    def create_masked_load(self, ptrs, mask, other, *args, **kwargs):
        _check("load", ptrs, mask, ptrs.get_element_ty().primitive_bitwidth // 8)
        return load(self, ptrs, mask, other, *args, **kwargs)

    def create_masked_store(self, ptrs, value, mask, *args, **kwargs):
        _check("store", ptrs, mask, ptrs.get_element_ty().primitive_bitwidth // 8)
        return store(self, ptrs, value, mask, *args, **kwargs)

    def launch(self, *args, **kwargs):
        names = inspect.getfullargspec(self.fn).args
        pairs = list(_tensor_args(names, args)) + list(_tensor_args(kwargs.keys(), kwargs.values()))
        spans = [(s[0], s[1], name) for name, t in pairs if (s := _span(t)) is not None]
        _launches.append((getattr(self.fn, "__name__", "kernel"), spans))
        try:
            return call(self, *args, **kwargs)
        finally:
            _launches.pop()

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    executor.__call__ = launch
    _installed = True
    return True
