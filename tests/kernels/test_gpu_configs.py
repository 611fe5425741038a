"""The tile configurations a GPU will autotune over, run under the interpreter.

The rest of the suite runs each kernel with its small interpreter tile; a GPU runs the tiles of
``_gemm_configs``, ``_wgrad_configs`` and the attention ``_*_configs`` (and 32/64-row blocks for the
split merge and the backward preamble). A mask or an index that is right for 16-row tiles and wrong
for 128-row ones shows up only there, so here each op runs forward and backward with each GPU
config in turn (one config per autotuner: no trials; the tensor-core and the float32 families
alike, both run here in float32), on shapes that leave partial tiles at every edge, checked
against the float64 reference, for bounds and for races between programs (tests/support/sanitizer.py).
"""
import math

import pytest
import torch
import triton

import bam_kernels as bk
from tests.support import sanitizer
from bam_kernels import reference
from tests.support.oracle import grouped_mm_matches_reference, moa_matches_reference, rel, routed_moe_matches_reference
from bam_kernels._triton import attention as ak
from bam_kernels._triton import grouped_gemm as gg


def _gpu(module, fn, *args):
    """``fn(*args)`` as on a GPU: the config functions give the interpreter its own small tiles."""
    saved = module.interpreting
    module.interpreting = lambda: False
    try:
        return fn(*args)
    finally:
        module.interpreting = saved


EPILOGUES = (gg.PLAIN, gg.SWIGLU_FWD, gg.SWIGLU_BWD)
GEMM = {fma: ({ep: _gpu(gg, gg._gemm_configs, ep, fma) for ep in EPILOGUES}, _gpu(gg, gg._wgrad_configs, fma))
        for fma in (False, True)}
ATTENTION = {fp32: [_gpu(ak, f, fp32) for f in (ak._fwd_configs, ak._decode_configs, ak._dkdv_configs,
                                                  ak._dq_configs)] for fp32 in (False, True)}
# (family, i): the i-th config of every kernel of the family (wrapping around the shorter lists).
GEMM_CASES = [(fma, i) for fma, (gemm, wgrad) in GEMM.items()
              for i in range(max(len(wgrad), *map(len, gemm.values())))]
ATTENTION_CASES = [(fp32, i) for fp32, lists in ATTENTION.items() for i in range(max(map(len, lists)))]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _one_config_each(fn, configs, key, **kw):
    """{family: autotuner of ``configs`` with one config}: both families run the same tile."""
    tuner = triton.autotune(configs=configs, key=key, **kw)(fn)
    return {False: tuner, True: tuner}


@pytest.mark.parametrize("fma,i", GEMM_CASES)
def test_moe_ops_with_gpu_tiles(fma, i, monkeypatch):
    gemm, wgrad = GEMM[fma]
    monkeypatch.setattr(gg, "group_gemm", gg.make_autotuners(lambda ep, _: [gemm[ep][i % len(gemm[ep])]]))
    monkeypatch.setattr(gg, "group_wgrad", _one_config_each(gg._group_wgrad, [wgrad[i % len(wgrad)]],
                                                            ["N", "K", "GATHER_A", "GATHER_B", "SWIGLU_B"]))
    # 300 (token, slot) rows over 4 experts, one of them empty: several 128-row tiles, partial
    # tiles in every dimension (D 72, F 100 against 64- to 256-wide tiles).
    T, D, Fh, E, k = 150, 72, 100, 4, 2
    logits = torch.randn(T, E)
    logits[:, 3] = -30.0
    x, dy = torch.randn(T, D), torch.randn(T, D)
    gate_up, down = torch.randn(E, 2 * Fh, D) / math.sqrt(D), torch.randn(E, D, Fh) / math.sqrt(Fh)
    ours = _leaves(logits, x, gate_up, down)
    with sanitizer.races():
        routed_moe_matches_reference(ours, (logits, x, gate_up, down), k, dy, dy)
    assert torch.all(ours[2].grad[3] == 0) and torch.all(ours[3].grad[3] == 0)

    M, K, N = 300, 72, 130
    offs = torch.tensor([90, 90, 250, 290], dtype=torch.int32)  # an empty expert, 10 rows past the end
    g = torch.randn(M, N)
    with sanitizer.races():
        grouped_mm_matches_reference(*_leaves(torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K)), offs, g, g)


@pytest.mark.parametrize("fp32,i", ATTENTION_CASES)
@pytest.mark.parametrize("expert_kv", [False, True])
def test_moa_attention_with_gpu_tiles(fp32, i, expert_kv, monkeypatch):
    fwd, dec, dkdv, dq = ([cfgs[i % len(cfgs)]] for cfgs in ATTENTION[fp32])
    monkeypatch.setattr(ak, "fwd", _one_config_each(ak._fwd, fwd, ak._KEY))
    monkeypatch.setattr(ak, "fwd_decode", _one_config_each(ak._fwd, dec, ak._KEY))
    monkeypatch.setattr(ak, "bwd_dkdv", _one_config_each(ak._bwd_dkdv, dkdv, ak._BWD_KEY))
    monkeypatch.setattr(ak, "bwd_dq", _one_config_each(ak._bwd_dq, dq, ak._BWD_KEY))
    monkeypatch.setattr(ak, "interpreting", lambda: False)  # the GPU's merge and preamble blocks
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 64
    # Prefill (the last query tile partial), a few queries against a ragged cache, and a decoding
    # step whose keys are split over programs; smaller for the fp32 family's tiles of 16 and 32 rows.
    cases = (((40, 40, None, 1), (5, 150, [150, 70], 1), (1, 600, [600, 257], 3)) if fp32 else
             ((150, 150, None, 1), (5, 300, [300, 170], 1), (1, 700, [700, 257], 3)))
    for T, S, kv_lens, splits in cases:
        monkeypatch.setattr(ak, "num_splits", lambda *a, n=splits: n)
        kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
        q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
        mix, do = torch.softmax(torch.randn(B, T, E), -1), torch.randn(B, T, E, H, Dh)
        lens = None if kv_lens is None else torch.tensor(kv_lens)
        with sanitizer.races():
            moa_matches_reference(_leaves(q, k, v, mix), (q, k, v, mix), lens, do, do, label=f"T={T} S={S}")


def test_first_config_only_restricts_every_autotuner_and_restores_it(monkeypatch):
    """The GPU checks of bam-bench run each kernel on its first config only (one compile per
    variant); afterwards the full lists, and no remembered choice, are back."""
    from bam_kernels._triton import autotuners, first_config_only

    tuners = autotuners()
    assert len(tuners) == 6 + 2 + 4 * 2  # gemm (epilogue, fma), wgrad, 4 attention kernels x 2 families
    two = _gpu(gg, gg._gemm_configs, gg.PLAIN, False)[:2]
    monkeypatch.setattr(tuners[0], "configs", two)
    tuners[0].cache["stale"] = two[1]
    with first_config_only():
        assert all(len(t.configs) == 1 for t in tuners) and tuners[0].configs == two[:1]
        assert not tuners[0].cache
        x, w = torch.randn(40, 24), torch.randn(3, 20, 24)
        with bk.use_backend("triton"):
            y = bk.grouped_mm(x, w, torch.tensor([10, 25, 40], dtype=torch.int32))
        assert rel(y, reference.grouped_mm(x.double(), w.double(), torch.tensor([10, 25, 40]))) < 1e-5
    assert tuners[0].configs == two and not tuners[0].cache
