"""Make the Triton interpreter's bf16 arithmetic what a GPU does, so that the kernels' bf16 paths
can be tested on the CPU. Two fixes (triton 3.6 and 3.9 alike):

- Dots. The interpreter keeps bf16 values as their uint16 bit patterns and its ``create_dot``
  hands those to ``np.matmul`` as integers: garbage. Widening a bf16 operand to float32 is exact
  (the same bits, shifted), and a GPU's bf16 MMA forms exact products and accumulates them in
  float32, so the patched dot computes what the hardware does up to the order of the additions.
- Rounding. Its float32 -> bf16 cast truncates (round toward zero: half the values off by one
  ulp, twice the error), where a GPU rounds to nearest even; the patched cast rounds to nearest
  even, as ``torch.Tensor.to(torch.bfloat16)`` does.
"""
from __future__ import annotations

import numpy as np

_installed = False


def _widen(handle, tl):
    if handle.dtype.scalar == tl.bfloat16:
        return (np.asarray(handle.data).astype(np.uint32) << 16).view(np.float32)
    return handle.data


def _to_bf16_bits(data) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), rounded to nearest even; NaN stays NaN."""
    bits = np.asarray(data, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(np.asarray(data, dtype=np.float32))
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def install() -> bool:
    """Patch ``InterpreterBuilder.create_dot`` and ``cast_impl``; False where this Triton's
    interpreter differs."""
    global _installed
    if _installed:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter as it
        dot, cast = it.InterpreterBuilder.create_dot, it.InterpreterBuilder.cast_impl
    except (ImportError, AttributeError):
        return False

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return it.TensorHandle(_to_bf16_bits(src.data), dst_type.scalar)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, *args, **kwargs):
        if tl.bfloat16 not in (a.dtype.scalar, b.dtype.scalar):
            return dot(self, a, b, d, *args, **kwargs)
        out = np.matmul(_widen(a, tl), _widen(b, tl), dtype=np.float32).astype(d.data.dtype) + d.data
        return it.TensorHandle(out, d.dtype.scalar)

    it.InterpreterBuilder.create_dot = create_dot
    it.InterpreterBuilder.cast_impl = cast_impl
    _installed = True
    return True
