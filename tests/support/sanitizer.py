"""A bounds checker for Triton kernels run by the interpreter (``TRITON_INTERPRET=1``), in the spirit
of compute-sanitizer's memcheck.

The interpreter runs a kernel's loads and stores on raw host addresses: a store one row past an
output lands silently in whatever the allocator put there (another test's tensor, a cached table),
and an unmasked load reads it. Neither shows up where it happens. Installed, every load and store
of a launch is checked, lane by lane (masked-off lanes excepted), against the memory spans of the
tensors passed to that launch; an access outside all of them raises ``OutOfBounds`` naming the
kernel, the access and the nearest tensor argument.

Inside ``with races():`` it is also a race detector: a GPU runs a launch's programs at once, so
two programs storing to one element, or one program loading an element another stores to in the
same launch, give results that depend on timing. Each launch's stores and loads are recorded
with the program that made them and checked when the launch ends (``Race``). Atomics would be
exempt; these kernels use none.

It wraps two methods of the interpreter (``InterpreterBuilder.create_masked_load`` and
``create_masked_store``) and the launcher (``GridExecutor.__call__``); ``install`` returns False,
and checks nothing, where a Triton version lacks them.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch


class OutOfBounds(AssertionError):
    pass


class Race(AssertionError):
    pass


class _Launch:
    def __init__(self, kernel: str, spans: list[tuple[int, int, str]], record: bool):
        self.kernel, self.spans, self.record = kernel, spans, record
        self.stores: list[tuple[np.ndarray, int]] = []  # (byte addresses, program)
        self.loads: list[tuple[np.ndarray, int]] = []


_launches: list[_Launch] = []
_installed = False
_race_depth = 0


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
        elif hasattr(value, "base") and isinstance(value.base, torch.Tensor):  # TensorWrapper
            yield name, value.base


def _program() -> int:
    from triton.runtime.interpreter import interpreter_builder as b
    (x, y, z), (nx, ny, _) = b.grid_idx, b.grid_dim
    return x + nx * (y + ny * z)


def _check(kind: str, ptrs, mask, elem_bytes: int):
    if not _launches:
        return
    launch = _launches[-1]
    addr = np.asarray(ptrs.data).astype(np.uint64, copy=False).ravel()
    if mask is not None:
        m = np.broadcast_to(np.asarray(mask.data, dtype=bool), np.shape(ptrs.data)).ravel()
        addr = addr[m]
    if addr.size == 0:
        return
    if launch.record:
        (launch.stores if kind == "store" else launch.loads).append((addr.copy(), _program()))
    ok = np.zeros(addr.shape, dtype=bool)
    end = addr + np.uint64(elem_bytes)
    for lo, hi, _ in launch.spans:
        ok |= (addr >= np.uint64(lo)) & (end <= np.uint64(hi))
    if ok.all():
        return
    bad = int(addr[~ok][0])
    lo, hi, name = min(launch.spans, key=lambda s: min(abs(bad - s[0]), abs(bad - s[1])))
    raise OutOfBounds(f"{launch.kernel}: {kind} of {int((~ok).sum())} lane(s) outside every tensor argument; "
                      f"the first at element offset {(bad - lo) // elem_bytes} of `{name}`, whose span is "
                      f"[0, {(hi - lo) // elem_bytes})")


def _flat(records):
    addr = np.concatenate([a for a, _ in records])
    prog = np.concatenate([np.full(a.shape, p, dtype=np.int64) for a, p in records])
    return addr, prog


def _where(launch: _Launch, address: int) -> str:
    for lo, hi, name in launch.spans:
        if lo <= address < hi:
            return f"byte {address - lo} of `{name}`"
    return f"address {address:#x}"


def _check_races(launch: _Launch) -> None:
    if not launch.stores:
        return
    addr, prog = _flat(launch.stores)
    order = np.lexsort((prog, addr))
    addr, prog = addr[order], prog[order]
    clash = (addr[1:] == addr[:-1]) & (prog[1:] != prog[:-1])
    if clash.any():
        i = int(np.argmax(clash))
        raise Race(f"{launch.kernel}: programs {prog[i]} and {prog[i + 1]} both store to "
                   f"{_where(launch, int(addr[i]))} ({int(clash.sum())} such stores in the launch)")
    if not launch.loads:
        return
    stored, first = np.unique(addr, return_index=True)
    writer = prog[first]
    l_addr, l_prog = _flat(launch.loads)
    at = np.minimum(np.searchsorted(stored, l_addr), stored.size - 1)
    cross = (stored[at] == l_addr) & (writer[at] != l_prog)
    if cross.any():
        i = int(np.argmax(cross))
        raise Race(f"{launch.kernel}: program {l_prog[i]} loads {_where(launch, int(l_addr[i]))}, "
                   f"which program {writer[at[i]]} stores to in the same launch "
                   f"({int(cross.sum())} such loads)")


@contextlib.contextmanager
def races():
    """Inside this block every launch is also checked for races between its programs."""
    global _race_depth
    _race_depth += 1
    try:
        yield
    finally:
        _race_depth -= 1


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
        launch = _Launch(getattr(self.fn, "__name__", "kernel"), spans, _race_depth > 0)
        _launches.append(launch)
        try:
            result = call(self, *args, **kwargs)
        finally:
            _launches.pop()
        if launch.record:
            _check_races(launch)
        return result

    builder.create_masked_load = create_masked_load
    builder.create_masked_store = create_masked_store
    executor.__call__ = launch
    _installed = True
    return True
