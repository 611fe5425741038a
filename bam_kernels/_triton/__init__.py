"""The Triton paths of the ops, imported only when the triton backend runs: ``<op>.py`` is an op's
host code (``routing``, ``grouped_gemm``, ``moe``, ``attention``), ``<family>_kernels.py`` holds the
kernels of a large family, ``common.py`` the helpers every host module shares."""
from __future__ import annotations

import contextlib


def autotuners() -> list:
    """Every autotuned kernel launcher of the package."""
    from . import attention, grouped_gemm  # noqa: PLC0415 (every kernel module loads only when asked for)
    families = (grouped_gemm.group_gemm, grouped_gemm.group_wgrad, attention.fwd, attention.fwd_decode,
                attention.bwd_dkdv, attention.bwd_dq)
    return [tuner for family in families for tuner in family.values()]


@contextlib.contextmanager
def first_config_only():
    """Inside the block every autotuned kernel runs the first of its configs, untimed: one compile
    per kernel variant instead of one per config, for checks of correctness on a GPU (the test
    suite runs every config under the interpreter). Choices made inside are forgotten on exit."""
    saved = [(tuner, tuner.configs) for tuner in autotuners()]
    for tuner, configs in saved:
        tuner.configs = configs[:1]
        tuner.cache.clear()
    try:
        yield
    finally:
        for tuner, configs in saved:
            tuner.configs = configs
            tuner.cache.clear()
