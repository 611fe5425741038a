"""The tile configurations a GPU will autotune over, run under the interpreter.

The rest of the suite runs each kernel with its small interpreter tile; a GPU runs the tiles of
``_gemm_configs``, ``_wgrad_configs`` and the attention ``_*_configs`` (and 32/64-row blocks for the
split merge and the backward preamble). A mask or an index that is right for 16-row tiles and wrong
for 128-row ones shows up only there, so here each op runs forward and backward with each GPU
config in turn (one config per autotuner: no trials), on shapes that leave partial tiles at every
edge, checked against the float64 reference, for bounds and for races between programs
(tests/sanitizer.py).
"""
import math

import pytest
import torch
import triton

import bam_kernels as bk
import sanitizer
from bam_kernels import reference
from bam_kernels._triton import attention as ak
from bam_kernels._triton import grouped_gemm as gg


def _gpu_configs(module, monkeypatch, *fns):
    with monkeypatch.context() as m:
        m.setattr(module, "interpreting", lambda: False)
        return [fn() for fn in fns]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("i", range(6))
def test_moe_ops_with_gpu_tiles(i, monkeypatch):
    gemm, wgrad = _gpu_configs(gg, monkeypatch, lambda: {ep: gg._gemm_configs(ep) for ep in
                                                         (gg.PLAIN, gg.SWIGLU_FWD, gg.SWIGLU_BWD)},
                               gg._wgrad_configs)
    assert i < max(len(c) for c in gemm.values())
    monkeypatch.setattr(gg, "group_gemm", gg.make_autotuners(lambda ep: [gemm[ep][i % len(gemm[ep])]]))
    monkeypatch.setattr(gg, "group_wgrad", triton.autotune(configs=[wgrad[i % len(wgrad)]],
                                                           key=["N", "K", "GATHER_A", "GATHER_B", "SWIGLU_B"])
                        (gg._group_wgrad))
    # 300 (token, slot) rows over 4 experts, one of them empty: several 128-row tiles, partial
    # tiles in every dimension (D 72, F 100 against 64- to 256-wide tiles).
    T, D, Fh, E, k = 150, 72, 100, 4, 2
    logits = torch.randn(T, E)
    logits[:, 3] = -30.0
    x, dy = torch.randn(T, D), torch.randn(T, D)
    gate_up, down = torch.randn(E, 2 * Fh, D) / math.sqrt(D), torch.randn(E, D, Fh) / math.sqrt(Fh)
    ours = _leaves(logits, x, gate_up, down)
    with sanitizer.races(), bk.use_backend("triton"):
        w, idx = bk.route_topk(ours[0], k)
        y = bk.moe_mlp(ours[1], ours[2], ours[3], w, idx)
        y.backward(dy)
    refs = _leaves(*(t.double() for t in (logits, x, gate_up, down)))
    rw, ridx = reference.route_topk(refs[0], k)
    assert torch.equal(idx, ridx)
    ry = reference.moe_mlp(refs[1], refs[2], refs[3], rw, ridx)
    ry.backward(dy.double())
    assert rel(y, ry) < 1e-5
    for name, a, b in zip(("logits", "x", "gate_up_proj", "down_proj"), ours, refs):
        assert rel(a.grad, b.grad) < 1e-5, name
    assert torch.all(ours[2].grad[3] == 0) and torch.all(ours[3].grad[3] == 0)

    M, K, N = 300, 72, 130
    offs = torch.tensor([90, 90, 250, 290], dtype=torch.int32)  # an empty expert, 10 rows past the end
    xs, ws = _leaves(torch.randn(M, K), torch.randn(E, N, K) / math.sqrt(K))
    g = torch.randn(M, N)
    with sanitizer.races(), bk.use_backend("triton"):
        out = bk.grouped_mm(xs, ws, offs)
        out.backward(g)
    rx, rw_ = _leaves(xs.double(), ws.double())
    rout = reference.grouped_mm(rx, rw_, offs)
    rout.backward(g.double())
    assert rel(out, rout) < 1e-5 and rel(xs.grad, rx.grad) < 1e-5 and rel(ws.grad, rw_.grad) < 1e-5


@pytest.mark.parametrize("i", range(5))
@pytest.mark.parametrize("expert_kv", [False, True])
def test_moa_attention_with_gpu_tiles(i, expert_kv, monkeypatch):
    fwd, dec, dkdv, dq = _gpu_configs(ak, monkeypatch, ak._fwd_configs, ak._decode_configs, ak._dkdv_configs,
                                      ak._dq_configs)
    assert i < max(map(len, (fwd, dec, dkdv, dq)))
    pick = lambda cfgs: [cfgs[i % len(cfgs)]]
    monkeypatch.setattr(ak, "fwd", triton.autotune(configs=pick(fwd), key=ak._KEY)(ak._fwd))
    monkeypatch.setattr(ak, "fwd_decode", triton.autotune(configs=pick(dec), key=ak._KEY)(ak._fwd))
    monkeypatch.setattr(ak, "bwd_dkdv", triton.autotune(configs=pick(dkdv), key=ak._BWD_KEY)(ak._bwd_dkdv))
    monkeypatch.setattr(ak, "bwd_dq", triton.autotune(configs=pick(dq), key=ak._BWD_KEY)(ak._bwd_dq))
    monkeypatch.setattr(ak, "interpreting", lambda: False)  # the GPU's merge and preamble blocks
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 64
    # Prefill (every query tile partial at 128 rows), a few queries against a ragged cache, and a
    # decoding step whose keys are split over programs.
    for T, S, kv_lens, splits in ((150, 150, None, 1), (5, 300, [300, 170], 1), (1, 700, [700, 257], 3)):
        monkeypatch.setattr(ak, "num_splits", lambda *a, n=splits: n)
        kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
        q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
        mix, do = torch.softmax(torch.randn(B, T, E), -1), torch.randn(B, T, E, H, Dh)
        lens = None if kv_lens is None else torch.tensor(kv_lens)
        ours = _leaves(q, k, v, mix)
        with sanitizer.races(), bk.use_backend("triton"):
            o = bk.moa_attention(*ours, causal=True, kv_lens=lens)
            o.backward(do)
        refs = _leaves(*(t.double() for t in (q, k, v, mix)))
        ro = reference.moa_attention(*refs, True, None, lens)
        ro.backward(do.double())
        case = f"T={T} S={S}"
        assert rel(o, ro) < 1e-5, case
        for name, a, b in zip(("q", "k", "v", "mix"), ours, refs):
            assert rel(a.grad, b.grad) < 1e-5, f"{case}: d{name}"
