"""The tile configurations a GPU will autotune over, run under the interpreter.

The rest of the suite runs each kernel with its small interpreter tile; a GPU runs the tiles of
``_gemm_configs``, ``_wgrad_configs`` and the attention ``_*_configs`` (and 32/64-row blocks for the
split merge and the backward preamble). A mask or an index that is right for 16-row tiles and wrong
for 128-row ones shows up only there, so the op tests run each op forward and backward with each GPU
config in turn (one config per autotuner: no trials; the tensor-core and the float32 families
alike, both run here in float32), on shapes that leave partial tiles at every edge, checked
against the float64 reference, for bounds and for races between programs (tests/support/sanitizer.py).
"""
import triton

from bam_kernels._triton import attention as ak
from bam_kernels._triton import grouped_gemm as gg


def gpu(module, fn, *args):
    """``fn(*args)`` as on a GPU: the config functions give the interpreter its own small tiles."""
    saved = module.interpreting
    module.interpreting = lambda: False
    try:
        return fn(*args)
    finally:
        module.interpreting = saved


EPILOGUES = (gg.PLAIN, gg.SWIGLU_FWD, gg.SWIGLU_BWD)
GEMM = {fma: ({ep: gpu(gg, gg._gemm_configs, ep, fma) for ep in EPILOGUES}, gpu(gg, gg._wgrad_configs, fma))
        for fma in (False, True)}
ATTENTION = {fp32: [gpu(ak, f, fp32) for f in (ak._fwd_configs, ak._decode_configs, ak._dkdv_configs,
                                                  ak._dq_configs)] for fp32 in (False, True)}
# (family, i): the i-th config of every kernel of the family (wrapping around the shorter lists).
GEMM_CASES = [(fma, i) for fma, (gemm, wgrad) in GEMM.items()
              for i in range(max(len(wgrad), *map(len, gemm.values())))]
ATTENTION_CASES = [(fp32, i) for fp32, lists in ATTENTION.items() for i in range(max(map(len, lists)))]


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def one_config_each(fn, configs, key, **kw):
    """{family: autotuner of ``configs`` with one config}: both families run the same tile."""
    tuner = triton.autotune(configs=configs, key=key, **kw)(fn)
    return {False: tuner, True: tuner}
