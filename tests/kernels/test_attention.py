import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import bam_kernels as bk
from bam_kernels import reference
from bam_kernels._triton import attention as kernels
from tests.support import gpu_tiles, oracle, sanitizer
from tests.support.fenced import NAN, fenced, grad_leaf
from tests.support.oracle import BF16, BF16_TOL, bf16_leaves, moa_matches_reference
from tests.support.program_order import grads, run_twice

BACKENDS = ["torch", "triton"]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2}
GARBAGE = 100.0  # scale of the values past kv_lens: large, finite


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels, "empty", lambda shape, **kw: torch.full(shape, float("nan"), **kw))


def rel(out, ref):
    """A reference near zero (dq with one key) is compared at RMS 1e-2."""
    return oracle.rel(out, ref, floor_rms=1e-2)


def make_inputs(B, T, S, E, H, Hkv, Dh, expert_kv, dtype, kv_lens=None, mix_dtype=torch.float32):
    q = torch.randn(B, T, E, H, Dh, dtype=dtype)
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    k, v = torch.randn(kv_shape, dtype=dtype), torch.randn(kv_shape, dtype=dtype)
    if kv_lens is not None:
        kv_lens = torch.tensor(kv_lens)
        for b, n in enumerate(kv_lens.tolist()):
            k[b, n:] = torch.randn_like(k[b, n:]) * GARBAGE
            v[b, n:] = torch.randn_like(v[b, n:]) * GARBAGE
    mix = torch.softmax(torch.randn(B, T, E), -1).to(mix_dtype)
    return q, k, v, mix, kv_lens


def run_with_grads(backend, q, k, v, mix, causal, kv_lens, do, scale=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, mix)]
    with bk.use_backend(backend):
        o = bk.moa_attention(*leaves, causal=causal, scale=scale, kv_lens=kv_lens)
    grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
    return o, grads


def reference_with_grads(q, k, v, mix, causal, kv_lens, do, scale=None):
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, mix)]
    o = reference.moa_attention(*leaves, causal, scale, kv_lens)
    return o, torch.autograd.grad(o, leaves, do.double())


# B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens
CASES = [
    (1, 1, 1, 1, 1, 1, 16, True, False, None),
    (2, 17, 17, 2, 4, 2, 16, True, False, None),
    (1, 17, 40, 4, 2, 1, 64, True, True, None),
    (2, 7, 33, 2, 3, 1, 16, False, False, None),
    (1, 127, 127, 1, 2, 1, 16, True, False, None),
    (2, 5, 37, 4, 4, 2, 16, True, True, [37, 20]),
    (3, 4, 19, 2, 2, 1, 64, True, False, [2, 19, 0]),
    (2, 6, 21, 2, 4, 2, 16, False, True, [9, 1]),
    (1, 9, 12, 2, 2, 2, 24, True, True, None),
    (1, 1, 600, 4, 4, 2, 64, True, False, [515]),
]
SLOW_CASES = [
    (1, 300, 300, 2, 2, 1, 16, True, False, None),
    (2, 127, 150, 2, 2, 2, 64, True, True, [150, 140]),
]


def _id(case):
    B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens = case
    mask, kv = "causal" if causal else "full", "expert" if expert_kv else "shared"
    return (f"B{B}T{T}S{S}E{E}H{H}kv{Hkv}d{Dh}-{mask}-{kv}"
            + ("-ragged" if kv_lens else ""))


def check_against_reference(backend, case, dtype):
    B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens = case
    q, k, v, mix, kv_lens = make_inputs(B, T, S, E, H, Hkv, Dh, expert_kv, dtype, kv_lens)
    do = torch.randn(B, T, E, H, Dh)
    o_ref, g_ref = reference_with_grads(q, k, v, mix, causal, kv_lens, do)
    o, grads = run_with_grads(backend, q, k, v, mix, causal, kv_lens, do)
    assert o.dtype == dtype and o.shape == (B, T, E, H, Dh)
    for name, out, ref in zip(("out", "dq", "dk", "dv", "dmix"), (o, *grads), (o_ref, *g_ref)):
        assert out.shape == ref.shape
        err = rel(out, ref)
        assert err < TOL[dtype], f"{name}: relative error {err:.2e}"
    if kv_lens is not None:
        # Keys past kv_lens influence nothing: exactly zero gradient.
        for b, n in enumerate(kv_lens.tolist()):
            assert (grads[1][b, n:] == 0).all() and (grads[2][b, n:] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32(backend, case):
    check_against_reference(backend, case, torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_CASES, ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp32_long(backend, case):
    check_against_reference(backend, case, torch.float32)


@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[5], CASES[6]], ids=_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_fp16(backend, case):
    check_against_reference(backend, case, torch.float16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_scale_and_mix_in_fp16(backend):
    q, k, v, mix, _ = make_inputs(2, 5, 9, 2, 2, 1, 16, False, torch.float16, mix_dtype=torch.float16)
    do = torch.randn(2, 5, 2, 2, 16)
    o_ref, g_ref = reference_with_grads(q, k, v, mix, True, None, do, scale=0.3)
    o, grads = run_with_grads(backend, q, k, v, mix, True, None, do, scale=0.3)
    assert o.dtype == torch.float16 and grads[3].dtype == torch.float16
    assert rel(o, o_ref) < 1e-2 and all(rel(a, b) < 1e-2 for a, b in zip(grads, g_ref))


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_head_reads_its_kv_head(backend, expert_kv):
    """KV head g holds the constant value g + 1, so an output names the KV head it read."""
    B, T, S, E, H, Hkv, Dh = 1, 3, 5, 3, 4, 2, 16
    q, k, v, _, _ = make_inputs(B, T, S, E, H, Hkv, Dh, expert_kv, torch.float32)
    G = E * Hkv if expert_kv else Hkv
    v = (torch.arange(G, dtype=torch.float32) + 1).view(*v.shape[2:-1], 1).expand(v.shape).contiguous()
    mix = torch.ones(B, T, E)
    with bk.use_backend(backend):
        o = bk.moa_attention(q, k, v, mix)
    e_idx = torch.arange(E).view(E, 1)
    h_idx = torch.arange(H).view(1, H)
    g = h_idx // (H // Hkv) + e_idx * (Hkv if expert_kv else 0)
    want = (g + 1).to(torch.float32).view(1, 1, E, H, 1).expand(o.shape)
    torch.testing.assert_close(o, want)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_mix_is_single_expert_attention(backend, expert_kv):
    B, T, S, E, H, Hkv, Dh = 2, 6, 9, 3, 4, 2, 16
    q, k, v, _, _ = make_inputs(B, T, S, E, H, Hkv, Dh, expert_kv, torch.float32)
    chosen = torch.randint(0, E, (B, T))
    mix = F.one_hot(chosen, E).float()
    with bk.use_backend(backend):
        o = bk.moa_attention(q, k, v, mix)
    # Plain GQA attention of expert e (SDPA with a bottom-right causal mask), per expert.
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)
    for e in range(E):
        ke = k[:, :, e] if expert_kv else k
        ve = v[:, :, e] if expert_kv else v
        att = F.scaled_dot_product_attention(q[:, :, e].transpose(1, 2), ke.transpose(1, 2),
                                             ve.transpose(1, 2),
                                             attn_mask=mask, enable_gqa=True).transpose(1, 2)
        sel = chosen == e
        torch.testing.assert_close(o[:, :, e][sel], att[sel], rtol=1e-5, atol=1e-5)
        assert (o[:, :, e][~sel] == 0).all()


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_from_a_ragged_cache_equals_the_full_forward(backend, expert_kv):
    """Rows hold prompts of different lengths in one cache buffer with garbage past each; decoding
    one query at a time with kv_lens must give the full causal forward of each row."""
    B, E, H, Hkv, Dh, steps, capacity = 3, 2, 4, 2, 16, 4, 24
    prompts = [5, 1, 12]
    q, k, v, mix, _ = make_inputs(B, capacity, capacity, E, H, Hkv, Dh, expert_kv, torch.float32,
                                  kv_lens=[p + steps for p in prompts])
    with bk.use_backend(backend):
        full = [bk.moa_attention(q[b:b + 1, :p + steps], k[b:b + 1, :p + steps], v[b:b + 1, :p + steps],
                                 mix[b:b + 1, :p + steps])[0] for b, p in enumerate(prompts)]
        for j in range(steps):
            pos = torch.tensor([p + j for p in prompts])
            rows = torch.arange(B)
            o = bk.moa_attention(q[rows, pos][:, None], k, v, mix[rows, pos][:, None], kv_lens=pos + 1)
            for b in range(B):
                torch.testing.assert_close(o[b, 0], full[b][pos[b]], rtol=1e-5, atol=1e-5)


def filled_past(t, kv_lens, value):
    """A copy of ``t`` [B, S, ...] holding ``value`` at every key past kv_lens[b]."""
    t = t.clone()
    for b, n in enumerate(kv_lens.tolist()):
        t[b, n:] = value
    return t


# B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens
TAIL_CASES = [
    (3, 1, 64, 2, 2, 1, 16, True, False, [64, 23, 0]),  # decoding; a full row, an empty one
    (2, 1, 40, 2, 4, 2, 16, False, True, [17, 17]),     # decoding, one length: the tail only
    (2, 3, 48, 2, 2, 1, 16, True, True, [2, 37]),       # a few queries against a long cache
    (2, 9, 9, 2, 4, 2, 16, True, False, [9, 5]),        # prefill: queries 0-3 of row 1 see nothing
    (2, 5, 11, 2, 2, 2, 16, False, True, [11, 0]),
]


def tail_filled_against_reference(backend, q, k, v, mix, causal, kv_lens, fill, tol):
    """Run ``backend`` with the cache past ``kv_lens`` filled with ``fill``; check the output and every
    gradient against the float64 reference on a zero tail (relative error under ``tol``)."""
    do = torch.randn(*q.shape)
    o_ref, g_ref = reference_with_grads(q, filled_past(k, kv_lens, 0.0), filled_past(v, kv_lens, 0.0), mix,
                                        causal, kv_lens, do)
    o, grads = run_with_grads(backend, q, filled_past(k, kv_lens, fill), filled_past(v, kv_lens, fill), mix,
                              causal, kv_lens, do)
    for name, out, ref in zip(("out", "dq", "dk", "dv", "dmix"), (o, *grads), (o_ref, *g_ref)):
        assert rel(out, ref) < tol, name
    return o, grads


@pytest.mark.parametrize("case", TAIL_CASES, ids=_id)
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), 3e38], ids=["nan", "inf", "3e38"])
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_keys_past_kv_lens_influence_nothing(backend, fill, case):
    """A preallocated cache may hold anything past kv_lens: the output and every gradient are the
    float64 reference's on a zero tail, the tail's gradients are exactly 0, and a query that sees
    no key gets zeros, forward and backward."""
    B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens = case
    q, k, v, mix, kv_lens = make_inputs(B, T, S, E, H, Hkv, Dh, expert_kv, torch.float32, kv_lens)
    o, grads = tail_filled_against_reference(backend, q, k, v, mix, causal, kv_lens, fill, 1e-5)
    t_T = torch.arange(T)
    for b, n in enumerate(kv_lens.tolist()):
        assert (grads[1][b, n:] == 0).all() and (grads[2][b, n:] == 0).all()
        blind_T = (t_T + n - T < 0) if causal else torch.full((T,), n == 0)
        for t in blind_T.nonzero().view(-1).tolist():
            assert (o[b, t] == 0).all() and (grads[0][b, t] == 0).all() and (grads[3][b, t] == 0).all()


@pytest.mark.parametrize("fill", [65504.0, float("inf")], ids=["max", "inf"])
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_keys_past_kv_lens_influence_nothing_fp16(backend, fill):
    B, T, S, E, H, Hkv, Dh = 2, 3, 33, 2, 2, 1, 16
    q, k, v, mix, kv_lens = make_inputs(B, T, S, E, H, Hkv, Dh, False, torch.float16, [30, 2])
    o, grads = tail_filled_against_reference(backend, q, k, v, mix, True, kv_lens, fill, 1e-2)
    for b, n in enumerate(kv_lens.tolist()):
        assert (grads[1][b, n:] == 0).all() and (grads[2][b, n:] == 0).all()
    assert (o[1, 0] == 0).all() and (grads[0][1, 0] == 0).all()  # query 0 of row 1 sees no key


# ---------------------------------------------------------------------------------------------
# Left padding: kv_start, each row's first valid key


def left_padded(t, kv_start, value):
    """A copy of ``t`` [B, S, ...] holding ``value`` at every key below kv_start[b]."""
    t = t.clone()
    for b, n in enumerate(kv_start.tolist()):
        t[b, :n] = value
    return t


def padded(t, kv_start, kv_lens, value):
    """``value`` outside each row's valid keys [kv_start[b], kv_lens[b]) (kv_lens None: to the end)."""
    t = left_padded(t, kv_start, value)
    return t if kv_lens is None else filled_past(t, kv_lens, value)


def blind_queries(T, start, end, causal):
    """The queries of a row with valid keys [start, end) that see none of them."""
    t_T = torch.arange(T)
    if causal:
        return (t_T + end - T < start).nonzero().view(-1).tolist()
    return list(range(T)) if end <= start else []


# B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens, kv_start
LEFT_CASES = [
    (3, 5, 37, 2, 4, 2, 16, True, False, None, [0, 37, 11]),      # kv_start 0, a fully padded row
    (3, 4, 19, 2, 2, 1, 64, True, True, [19, 12, 7], [3, 12, 0]),  # with kv_lens; kv_start == kv_len
    (2, 6, 21, 2, 4, 2, 16, False, True, [9, 21], [4, 17]),
    (2, 7, 33, 2, 3, 1, 16, False, False, None, [5, 0]),
    (2, 9, 9, 2, 4, 2, 16, True, False, [9, 5], [3, 5]),           # prefill: early queries see nothing
    (1, 17, 40, 4, 2, 1, 64, True, True, None, [9]),
    (2, 1, 600, 4, 4, 2, 64, True, False, [515, 600], [100, 333]),  # decoding: the split-KV path
    (2, 3, 300, 2, 2, 1, 16, True, True, None, [290, 17]),          # a few queries; split, one chunk
]


def _left_id(case):
    return _id(case[:10]) + f"-start{case[10]}"


def check_left_padded(backend, case, fill=GARBAGE, dtype=torch.float32, tol=1e-5):
    """``backend`` with the padding (below kv_start, past kv_lens) filled with ``fill`` times random
    values against the float64 reference on zero padding: the output and every gradient, the
    padding's gradients exactly 0, a query that sees no key zeros forward and backward."""
    B, T, S, E, H, Hkv, Dh, causal, expert_kv, kv_lens, kv_start = case
    q, k, v, mix, kv_lens = make_inputs(B, T, S, E, H, Hkv, Dh, expert_kv, dtype, kv_lens)
    kv_start = torch.tensor(kv_start)
    # The reference on zero padding; ours on garbage padding (fill times random values).
    k_pad, v_pad = padded(k, kv_start, kv_lens, 0.0), padded(v, kv_start, kv_lens, 0.0)
    ends = [S] * B if kv_lens is None else kv_lens.tolist()
    k_bad, v_bad = k_pad.clone(), v_pad.clone()
    for b, (lo, hi) in enumerate(zip(kv_start.tolist(), ends)):
        for t in (k_bad, v_bad):
            t[b, :lo] = torch.randn_like(t[b, :lo]) * fill
            t[b, hi:] = torch.randn_like(t[b, hi:]) * fill
    do = torch.randn(B, T, E, H, Dh)
    leaves = [t.detach().double().requires_grad_() for t in (q, k_pad, v_pad, mix)]
    o_ref = reference.moa_attention(*leaves, causal, None, kv_lens, kv_start)
    g_ref = torch.autograd.grad(o_ref, leaves, do.double())
    leaves = [t.detach().clone().requires_grad_() for t in (q, k_bad, v_bad, mix)]
    with bk.use_backend(backend):
        o = bk.moa_attention(*leaves, causal=causal, kv_lens=kv_lens, kv_start=kv_start)
    grads = torch.autograd.grad(o, leaves, do.to(o.dtype))
    assert o.dtype == dtype and o.shape == (B, T, E, H, Dh)
    for name, out, ref in zip(("out", "dq", "dk", "dv", "dmix"), (o, *grads), (o_ref, *g_ref)):
        assert out.shape == ref.shape
        err = rel(out, ref)
        assert err < tol, f"{name}: relative error {err:.2e}"
    for b, (lo, hi) in enumerate(zip(kv_start.tolist(), ends)):
        for g in grads[1:3]:
            assert (g[b, :lo] == 0).all() and (g[b, hi:] == 0).all()
        for t in blind_queries(T, lo, hi, causal):
            assert (o[b, t] == 0).all() and (grads[0][b, t] == 0).all() and (grads[3][b, t] == 0).all()
    return o, grads


@pytest.mark.parametrize("case", LEFT_CASES, ids=_left_id)
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_kv_start_matches_reference(backend, case):
    """Left padding: keys below kv_start hold 100x garbage and change nothing, on every backend."""
    check_left_padded(backend, case)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_kv_start_fp16(backend):
    check_left_padded(backend, (2, 5, 37, 2, 4, 2, 16, True, True, [37, 30], [6, 29]), fill=100.0,
                      dtype=torch.float16, tol=1e-2)


@pytest.mark.parametrize("causal", [True, False])
def test_torch_path_masked_kv_start(causal):
    """The torch path's CUDA branch (padding zeroed, then masked: no host sync), run here on the
    CPU through its ``_sdpa``, against the reference on the same inputs."""
    from bam_kernels._torch import attention as torch_path
    B, T, S, E, H, Hkv, Dh = 3, 5, 23, 2, 4, 2, 16
    q, k, v, mix, lens = make_inputs(B, T, S, E, H, Hkv, Dh, False, torch.float32, [23, 17, 9])
    start = torch.tensor([0, 6, 9])
    k, v = padded(k, start, lens, 0.0), padded(v, start, lens, 0.0)
    o = torch_path._sdpa(q, k, v, mix, causal, Dh ** -0.5, lens, start)
    ref = reference.moa_attention(*(t.double() for t in (q, k, v, mix)), causal, None, lens, start)
    assert rel(o, ref) < 1e-5
    assert (o[2] == 0).all()


@pytest.mark.parametrize("splits", [2, 3])
def test_kv_start_split_kv_forward(splits, monkeypatch):
    """The split-KV path, forced: the chunks split each row's valid keys; a row whose valid keys fit
    one chunk, one that starts mid-chunk, a fully padded one."""
    monkeypatch.setattr(kernels, "num_splits", lambda *a: splits)
    check_left_padded("triton", (4, 2, 700, 2, 2, 1, 16, True, False, [700, 600, 520, 700],
                                 [0, 299, 513, 700]))
    q, k, v, mix, _ = make_inputs(2, 3, 520, 2, 2, 2, 16, True, torch.float32)
    start = torch.tensor([5, 260], dtype=torch.int32)
    o_split, _, lse_split = kernels.forward(q, k, v, mix, None, True, 0.25, True, splits, kv_start=start)
    o_one, _, lse_one = kernels.forward(q, k, v, mix, None, True, 0.25, True, 1, kv_start=start)
    torch.testing.assert_close(o_split, o_one)
    torch.testing.assert_close(lse_split, lse_one)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
def test_left_padded_batch_equals_each_prompt_alone(backend, expert_kv):
    """Prompts of different lengths left-padded into one batch (as Hugging Face batches them), then
    decoded a few steps into a cache buffer with garbage past the end: each row is the prompt
    computed alone, without padding."""
    B, E, H, Hkv, Dh, steps, capacity = 3, 2, 4, 2, 16, 3, 20
    prompts = [5, 1, 12]
    P = max(prompts)
    q, k, v, mix, _ = make_inputs(B, capacity, capacity, E, H, Hkv, Dh, expert_kv, torch.float32)
    start = torch.tensor([P - p for p in prompts])
    k, v = left_padded(k, start, GARBAGE), left_padded(v, start, -GARBAGE)
    k[:, P + steps:], v[:, P + steps:] = float("nan"), float("nan")  # the cache past what is written
    with bk.use_backend(backend):
        alone = [bk.moa_attention(q[b:b + 1, s:P + steps], k[b:b + 1, s:P + steps], v[b:b + 1, s:P + steps],
                                  mix[b:b + 1, s:P + steps])[0] for b, s in enumerate(start.tolist())]
        prefill = bk.moa_attention(q[:, :P], k[:, :P], v[:, :P], mix[:, :P], kv_start=start)
        for b, s in enumerate(start.tolist()):
            torch.testing.assert_close(prefill[b, s:], alone[b][:P - s], rtol=1e-5, atol=1e-5)
            assert (prefill[b, :s] == 0).all()  # padding queries see no key
        for j in range(steps):
            o = bk.moa_attention(q[:, P + j:P + j + 1], k, v, mix[:, P + j:P + j + 1],
                                 kv_lens=torch.full((B,), P + j + 1), kv_start=start)
            for b, s in enumerate(start.tolist()):
                torch.testing.assert_close(o[b, 0], alone[b][P + j - s], rtol=1e-5, atol=1e-5)


def test_split_kv_forward_and_its_backward(monkeypatch):
    """The split-KV path, forced: chunks past kv_lens are empty, a chunk ends mid-tile."""
    monkeypatch.setattr(kernels, "num_splits", lambda *a: 3)
    case = (3, 2, 600, 2, 2, 1, 16, True, False, [600, 100, 300])
    check_against_reference("triton", case, torch.float32)
    q, k, v, mix, _ = make_inputs(1, 3, 520, 2, 2, 2, 16, True, torch.float32)
    o_split, _, lse_split = kernels.forward(q, k, v, mix, None, True, 0.25, True, splits=3)
    o_one, _, lse_one = kernels.forward(q, k, v, mix, None, True, 0.25, True, splits=1)
    torch.testing.assert_close(o_split, o_one)
    torch.testing.assert_close(lse_split, lse_one)


def test_decode_heuristic_splits_only_small_batches_of_long_caches():
    cpu = torch.device("cpu")
    assert kernels.num_splits(1, 2, 4, 4096, cpu) > 1
    assert kernels.num_splits(1, 2, 4, 200, cpu) == 1
    assert kernels.num_splits(8, 8, 4096, 4096, cpu) == 1


@pytest.mark.parametrize("expert_kv", [False, True])
def test_backward_is_bitwise_deterministic(expert_kv):
    q, k, v, mix, kv_lens = make_inputs(2, 19, 23, 2, 4, 2, 16, expert_kv, torch.float32, kv_lens=[23, 14])
    do = torch.randn(2, 19, 2, 4, 16)
    _, first = run_with_grads("triton", q, k, v, mix, True, kv_lens, do)
    _, second = run_with_grads("triton", q, k, v, mix, True, kv_lens, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_empty_inputs(backend):
    q, k, v, mix, _ = make_inputs(2, 0, 5, 2, 2, 1, 16, False, torch.float32)
    with bk.use_backend(backend):
        assert bk.moa_attention(q, k, v, mix).shape == (2, 0, 2, 2, 16)
    q, k, v, mix, _ = make_inputs(1, 3, 0, 2, 2, 1, 16, False, torch.float32)
    with bk.use_backend(backend):
        o = bk.moa_attention(q, k, v, mix, causal=False)
    assert o.shape == q.shape and (o == 0).all()


def test_bad_input_names_the_argument():
    q, k, v, mix, _ = make_inputs(2, 3, 4, 2, 4, 2, 16, False, torch.float32)
    call = bk.moa_attention
    with pytest.raises(ValueError, match="q must have 5 dimensions"):
        call(q[0], k, v, mix)
    with pytest.raises(ValueError, match="k has Hkv = 3"):
        call(q, torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16), mix)
    with pytest.raises(ValueError, match="k must have shape .*Dh = 16"):
        call(q, k[..., :8], v[..., :8], mix)
    with pytest.raises(ValueError, match="k must have shape"):
        call(q, k[0], v[0], mix)
    with pytest.raises(ValueError, match="k must have shape .*E = 2"):
        call(q, torch.randn(2, 4, 3, 2, 16), torch.randn(2, 4, 3, 2, 16), mix)
    with pytest.raises(ValueError, match="v must have shape"):
        call(q, k, v[:, :3], mix)
    with pytest.raises(ValueError, match="mix must have shape"):
        call(q, k, v, mix[:, :, :1])
    with pytest.raises(ValueError, match="mix must have 3 dimensions"):
        call(q, k, v, mix[0])
    with pytest.raises(ValueError, match="v has dtype"):
        call(q, k, v.half(), mix)
    with pytest.raises(ValueError, match="kv_lens must have shape"):
        call(q, k, v, mix, kv_lens=torch.tensor([4]))
    with pytest.raises(ValueError, match="kv_lens must be an integer"):
        call(q, k, v, mix, kv_lens=torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match="kv_lens must hold"):
        call(q, k, v, mix, kv_lens=torch.tensor([5, 2]))
    with pytest.raises(ValueError, match="causal must be a bool"):
        call(q, k, v, mix, causal=1)
    with pytest.raises(ValueError, match="kv_start must have shape"):
        call(q, k, v, mix, kv_start=torch.tensor([0]))
    with pytest.raises(ValueError, match="kv_start must have 1 dimensions"):
        call(q, k, v, mix, kv_start=torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match="kv_start must be an integer"):
        call(q, k, v, mix, kv_start=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="kv_start must be an integer"):
        call(q, k, v, mix, kv_start=torch.tensor([False, True]))
    with pytest.raises(ValueError, match="kv_start is on meta"):
        call(q, k, v, mix, kv_start=torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(ValueError, match="kv_start must hold .*row 1 has kv_start -1"):
        call(q, k, v, mix, kv_start=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="kv_start must hold .*row 0 has kv_start 5 and kv_len 4"):
        call(q, k, v, mix, kv_start=torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="kv_start must hold .*row 1 has kv_start 3 and kv_len 2"):
        call(q, k, v, mix, kv_lens=torch.tensor([4, 2]), kv_start=torch.tensor([4, 3]))
    # Empty rows are allowed: kv_start == kv_len (== S, or 0).
    o = call(q, k, v, mix, kv_lens=torch.tensor([0, 2]), kv_start=torch.tensor([0, 2]))
    assert (o == 0).all()
    assert (call(q, k, v, mix, kv_start=torch.tensor([4, 4])) == 0).all()
    with pytest.raises(ValueError, match="scale must be"):
        call(q, k, v, mix, scale="0.1")


PTX_SCRIPT = textwrap.dedent("""
    import itertools
    import json
    import sys
    from tests.support.sm90 import H100_SMEM_BYTES, compile_sm90, ptxas_report
    from bam_kernels._triton import attention as A

    def types_of(fn, dtype="*bf16"):
        types = {}
        for n in fn.arg_names:
            if n in ("kvlen_ptr", "kvstart_ptr"):
                types[n] = "*i32"
            elif n.endswith("_ptr"):
                types[n] = "*fp32" if n in ("mix_ptr", "lse_ptr", "wso_ptr", "wsl_ptr", "dp_ptr") else dtype
            else:
                types[n] = "fp32" if n in ("qk_scale", "sm_scale") else "i32"
        return types

    def aligned(fn):
        # As a launch specialises them: 16-byte aligned pointers, q/k/v strides (multiples of Dh).
        return tuple(n for n in fn.arg_names
                     if n.endswith("_ptr") or n.startswith(("stride_q", "stride_k", "stride_v")))

    base = dict(HEAD_DIM=128, CAUSAL=True, HAS_KVLEN=True, PRECISION="tf32", BLOCK_D=128)
    jobs = [("fwd", A._fwd, dict(base, SPLIT=False, SAVE=True), A._fwd_configs()),
            ("decode", A._fwd, dict(base, SPLIT=True, SAVE=True), A._decode_configs()),
            ("dkdv", A._bwd_dkdv, base, A._dkdv_configs()), ("dq", A._bwd_dq, base, A._dq_configs())]
    report = {}
    # Without left padding or with it (kv_start: a key loop that starts at a loaded value): one of the
    # two per process, the test runs both processes at once.
    has_start = sys.argv[1] == "1"
    for name, fn, const, cfgs in jobs:
        for c in cfgs:
            key = f"{name} kv_start={has_start} {c.kwargs} w{c.num_warps} s{c.num_stages}"
            const_c = dict(const, **c.kwargs, HAS_KVSTART=has_start)
            k = compile_sm90(fn, types_of(fn), const_c, c.num_warps, c.num_stages, aligned(fn))
            report[key] = (k, c.kwargs["BLOCK_M"] >= 64 or name == "dkdv")
    # float32 operands on their own tiles, without TF32 (FMA dots) and with it, head dims 64 and 128.
    fp32_jobs = [("fwd", A._fwd, dict(SPLIT=False, SAVE=True), A._fwd_configs(True)),
                 ("decode", A._fwd, dict(SPLIT=True, SAVE=True), A._decode_configs(True)),
                 ("dkdv", A._bwd_dkdv, {}, A._dkdv_configs(True)), ("dq", A._bwd_dq, {}, A._dq_configs(True))]
    for precision, dh in itertools.product(("ieee", "tf32"), (64, 128)):
        for name, fn, extra, cfgs in fp32_jobs:
            for c in cfgs:
                const = dict(base, **extra, **c.kwargs, HEAD_DIM=dh, BLOCK_D=dh, PRECISION=precision,
                             HAS_KVSTART=has_start)
                key = (f"fp32 {precision} Dh={dh} kv_start={has_start} {name} {c.kwargs} w{c.num_warps} "
                       f"s{c.num_stages}")
                report[key] = (compile_sm90(fn, types_of(fn, "*fp32"), const, c.num_warps, c.num_stages,
                                            aligned(fn)), False)
    if not has_start:
        combine_const = dict(HEAD_DIM=128, SAVE=True, BLOCK_M=32, BLOCK_D=128)
        report["combine"] = (compile_sm90(A._combine, types_of(A._combine), combine_const, 4, 1,
                                          aligned(A._combine)), False)
        report["bwd_pre"] = (compile_sm90(A._bwd_pre, types_of(A._bwd_pre),
                                          dict(HEAD_DIM=128, BLOCK_R=64, BLOCK_D=128),
                                          4, 1, aligned(A._bwd_pre)), False)
    out = {}
    for key, (k, needs_wgmma) in report.items():
        r = ptxas_report(k)
        out[key] = dict(wgmma="wgmma.mma_async" in k.asm["ptx"], needs_wgmma=needs_wgmma,
                        shared=k.metadata.shared, limit=H100_SMEM_BYTES,
                        spills=r["spill_stores"] + r["spill_loads"], registers=r["registers"])
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_kernels_compile_for_hopper_with_wgmma_and_no_spills():
    """Every autotune config, bf16, head dim 128, compiled for sm_90 offline (in a subprocess: this
    session runs triton's interpreter)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # Two processes, without and with kv_start, at once: the compiles are single-threaded and take
    # about 100 s each on one core of the 2-core CI machine.
    procs = [subprocess.Popen([sys.executable, "-c", PTX_SCRIPT, has_start], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for has_start in ("0", "1")]
    report = {}
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        report.update(json.loads(out.strip().splitlines()[-1]))
    assert sum("kv_start=True" in key for key in report) == sum("kv_start=False" in key for key in report) > 0
    for name, r in report.items():
        assert r["spills"] == 0, f"{name}: {r}"
        assert r["shared"] <= r["limit"], f"{name}: {r}"
        # Row tiles of 64 or more (and dkdv's 128-key tiles) run on Hopper's warpgroup MMA; 16-row
        # decode tiles (mma.sync) and the dot-free combine and preprocess kernels do not.
        if r["needs_wgmma"]:
            assert r["wgmma"], f"{name} does not use wgmma"


@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16),
                                           ("triton", torch.bfloat16)])
def test_autocast_runs_attention_in_its_dtype(backend, dtype):
    """fp32 q, k, v (RoPE's fp32 tables promote them) inside autocast: the op runs in its dtype
    and the fp32 leaves get gradients equal to the reference's on the cast values."""
    q, k, v, mix, lens = make_inputs(2, 9, 12, 2, 4, 2, 16, False, torch.float32, kv_lens=[12, 10])
    do = torch.randn(q.shape)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, mix)]
    with torch.autocast("cpu", dtype=dtype), bk.use_backend(backend):
        o = bk.moa_attention(*leaves, kv_lens=lens)
    assert o.dtype == dtype
    grads = torch.autograd.grad(o, leaves, do.to(dtype))
    cast = [t.to(dtype) for t in (q, k, v)] + [mix]
    ref, ref_grads = reference_with_grads(*cast, True, lens, do.to(dtype))
    assert rel(o, ref) < 2e-2
    for name, a, b in zip("q k v mix".split(), grads, ref_grads):
        assert a.dtype == torch.float32, name
        assert rel(a, b) < 2e-2, name


# ---------------------------------------------------------------------------------------------
# Custom op: opcheck and torch.compile


def test_opcheck_moa_attention():
    B, T, S, E, H, Hkv, Dh = 2, 5, 9, 2, 4, 2, 16
    q = torch.randn(B, T, E, H, Dh, requires_grad=True)
    k = torch.randn(B, S, Hkv, Dh, requires_grad=True)
    v = torch.randn(B, S, Hkv, Dh, requires_grad=True)
    mix = torch.softmax(torch.randn(B, T, E), -1).requires_grad_()
    kv_lens = torch.tensor([9, 6], dtype=torch.int32)
    kv_start = torch.tensor([2, 0], dtype=torch.int32)
    torch.library.opcheck(torch.ops.bam.moa_attention, (q, k, v, mix, kv_lens, None, True, Dh ** -0.5, True))
    torch.library.opcheck(torch.ops.bam.moa_attention, (q, k, v, mix, None, None, False, 0.3, True))
    torch.library.opcheck(torch.ops.bam.moa_attention, (q, k, v, mix, kv_lens, kv_start, True, 0.3, True))
    torch.library.opcheck(torch.ops.bam.moa_attention, (q, k, v, mix, None, kv_start, False, 0.3, True))


@pytest.mark.parametrize("shared_kv", [True, False])
def test_torch_compile_mixture_of_attention_one_graph(shared_kv):
    from bam_model.layers import MixtureOfAttention
    torch._dynamo.reset()
    moa = MixtureOfAttention(32, n_heads=4, n_kv_heads=2, num_experts=3, shared_kv=shared_kv)
    compiled = torch.compile(moa, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 7, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_eager = moa(x1)
    y_eager.sum().backward()
    y_comp = compiled(x2)
    y_comp.sum().backward()
    torch.testing.assert_close(y_comp, y_eager)
    torch.testing.assert_close(x2.grad, x1.grad)


# ---------------------------------------------------------------------------------------------
# Triton kernels in bf16 (tests/support/interpreter_bf16.py), NaN-fenced (tests/support/fenced.py),
# in reversed program order (tests/support/program_order.py), with the GPU's tiles
# (tests/support/gpu_tiles.py)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,splits",
                         [(33, 33, None, 1), (5, 70, [70, 23], 1), (1, 600, [600, 257], 3)])
def test_moa_attention_bf16(expert_kv, T, S, kv_lens, splits, monkeypatch):
    monkeypatch.setattr(kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = bf16_leaves(torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape))
    mix = torch.softmax(torch.randn(B, T, E), -1).requires_grad_()
    do = torch.randn(B, T, E, H, Dh).to(BF16)
    lens = None if kv_lens is None else torch.tensor(kv_lens)
    o = moa_matches_reference([q, k, v, mix], (q, k, v, mix), lens, do, do, tol=BF16_TOL)
    assert o.dtype == BF16


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,splits", [
    (33, 33, None, 1),            # prefill, causal
    (5, 70, [70, 23], 1),         # a few queries against a ragged cache
    (1, 600, [600, 257], 3),      # decoding, split-KV path
])
def test_moa_attention_fenced(expert_kv, T, S, kv_lens, splits, monkeypatch):
    monkeypatch.setattr(kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
    mix = torch.softmax(torch.randn(B, T, E), -1)
    do = torch.randn(B, T, E, H, Dh)
    lens = None if kv_lens is None else torch.tensor(kv_lens)
    if lens is not None:  # keys past a row's length: NaN too, as in a cache buffer
        for b, n in enumerate(kv_lens):
            k[b, n:], v[b, n:] = NAN, NAN
    leaves = [grad_leaf(fenced(t)) for t in (q, k, v, mix)]
    moa_matches_reference(leaves, (q, k, v, mix), lens, fenced(do), do)
    for name, leaf in zip(("k", "v"), leaves[1:3]):
        if lens is not None:  # keys past the length: zero gradient
            for bb, n in enumerate(kv_lens):
                assert torch.all(leaf.grad[bb, n:] == 0), name


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,kv_start,splits",
                         [(40, 40, None, None, 1), (1, 600, [600, 300], None, 3),
                          (40, 40, None, [0, 11], 1), (1, 600, [600, 300], [100, 300], 3)])
def test_moa_attention_in_any_program_order(reversed_programs, monkeypatch, expert_kv, T, S, kv_lens,
                                            kv_start, splits):
    """Whole prefill and split decode, with a ragged cache and with left padding (kv_start)."""
    monkeypatch.setattr(kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = [torch.randn(s, requires_grad=True) for s in ((B, T, E, H, Dh), kv_shape, kv_shape)]
    mix = torch.softmax(torch.randn(B, T, E), -1).requires_grad_()
    lens = None if kv_lens is None else torch.tensor(kv_lens)
    start = None if kv_start is None else torch.tensor(kv_start)

    def fn():
        with bk.use_backend("triton"):
            return grads(bk.moa_attention(q, k, v, mix, kv_lens=lens, kv_start=start), [q, k, v, mix])

    run_twice(fn, reversed_programs)


def _one_gpu_tile_each(fp32, i, monkeypatch):
    """Every attention kernel autotuned over one of the GPU's tile configurations (the i-th), with
    the GPU's merge and preamble blocks instead of the interpreter's."""
    fwd, dec, dkdv, dq = ([cfgs[i % len(cfgs)]] for cfgs in gpu_tiles.ATTENTION[fp32])
    monkeypatch.setattr(kernels, "fwd", gpu_tiles.one_config_each(kernels._fwd, fwd, kernels._KEY))
    monkeypatch.setattr(kernels, "fwd_decode", gpu_tiles.one_config_each(kernels._fwd, dec, kernels._KEY))
    monkeypatch.setattr(kernels, "bwd_dkdv",
                        gpu_tiles.one_config_each(kernels._bwd_dkdv, dkdv, kernels._BWD_KEY))
    monkeypatch.setattr(kernels, "bwd_dq", gpu_tiles.one_config_each(kernels._bwd_dq, dq, kernels._BWD_KEY))
    monkeypatch.setattr(kernels, "interpreting", lambda: False)  # the GPU's merge and preamble blocks


@pytest.mark.parametrize("fp32,i", gpu_tiles.ATTENTION_CASES)
@pytest.mark.parametrize("expert_kv", [False, True])
def test_moa_attention_with_gpu_tiles(fp32, i, expert_kv, monkeypatch):
    _one_gpu_tile_each(fp32, i, monkeypatch)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 64
    # Prefill (the last query tile partial), a few queries against a ragged cache, and a decoding
    # step whose keys are split over programs; smaller for the fp32 family's tiles of 16 and 32 rows.
    cases = (((40, 40, None, 1), (5, 150, [150, 70], 1), (1, 600, [600, 257], 3)) if fp32 else
             ((150, 150, None, 1), (5, 300, [300, 170], 1), (1, 700, [700, 257], 3)))
    for T, S, kv_lens, splits in cases:
        monkeypatch.setattr(kernels, "num_splits", lambda *a, n=splits: n)
        kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
        q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
        mix, do = torch.softmax(torch.randn(B, T, E), -1), torch.randn(B, T, E, H, Dh)
        lens = None if kv_lens is None else torch.tensor(kv_lens)
        with sanitizer.races():
            moa_matches_reference(gpu_tiles.leaves(q, k, v, mix), (q, k, v, mix), lens, do, do,
                                  label=f"T={T} S={S}")


# Left padding (kv_start) under the same conditions: NaN-fenced with NaN padding, in reversed
# program order, with the GPU's tiles.


def nan_padded(t, kv_start, kv_lens):
    """``t`` with NaN below kv_start[b] and past kv_lens[b]: padding that must never be read."""
    return padded(t, torch.tensor(kv_start), None if kv_lens is None else torch.tensor(kv_lens), NAN)


@pytest.mark.parametrize("expert_kv", [False, True])
@pytest.mark.parametrize("T,S,kv_lens,kv_start,splits", [
    (33, 33, None, [0, 13], 1),          # prefill, left padded: one row without padding
    (5, 70, [70, 23], [31, 23], 1),      # a few queries; a row with kv_start == kv_len
    (1, 600, [600, 400], [257, 0], 3),   # decoding, split-KV path
])
def test_moa_attention_left_padded_fenced(expert_kv, T, S, kv_lens, kv_start, splits, monkeypatch):
    monkeypatch.setattr(kernels, "num_splits", lambda *a: splits)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 16
    kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
    q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
    k, v = nan_padded(k, kv_start, kv_lens), nan_padded(v, kv_start, kv_lens)
    mix = torch.softmax(torch.randn(B, T, E), -1)
    do = torch.randn(B, T, E, H, Dh)
    lens = None if kv_lens is None else torch.tensor(kv_lens)
    leaves = [grad_leaf(fenced(t)) for t in (q, k, v, mix)]
    moa_matches_reference(leaves, (q, k, v, mix), lens, fenced(do), do, kv_start=torch.tensor(kv_start))
    ends = kv_lens or [S] * B
    for name, leaf in zip(("k", "v"), leaves[1:3]):
        for b, (lo, hi) in enumerate(zip(kv_start, ends)):
            assert torch.all(leaf.grad[b, :lo] == 0) and torch.all(leaf.grad[b, hi:] == 0), name


# Every tile configuration once, shared and expert KV alternating: where the padding starts does not
# depend on the KV layout (the other kv_start tests run both); this keeps the suite in CI's budget.
@pytest.mark.parametrize("fp32,i,expert_kv", [(fp32, i, i % 2 == 1) for fp32, i in gpu_tiles.ATTENTION_CASES])
def test_moa_attention_left_padded_with_gpu_tiles(fp32, i, expert_kv, monkeypatch):
    _one_gpu_tile_each(fp32, i, monkeypatch)
    B, E, H, Hkv, Dh = 2, 2, 4, 2, 64
    # Left-padded prefill (kv_start mid-tile), and a decoding step whose valid keys are split over
    # programs, with NaN padding; smaller for the fp32 family's tiles of 16 and 32 rows.
    cases = (((40, 40, None, [0, 13], 1), (1, 600, [600, 400], [0, 257], 3)) if fp32 else
             ((150, 150, None, [0, 70], 1), (1, 700, [700, 500], [0, 300], 3)))
    for T, S, kv_lens, kv_start, splits in cases:
        monkeypatch.setattr(kernels, "num_splits", lambda *a, n=splits: n)
        kv_shape = (B, S, E, Hkv, Dh) if expert_kv else (B, S, Hkv, Dh)
        q, k, v = torch.randn(B, T, E, H, Dh), torch.randn(kv_shape), torch.randn(kv_shape)
        k, v = nan_padded(k, kv_start, kv_lens), nan_padded(v, kv_start, kv_lens)
        mix, do = torch.softmax(torch.randn(B, T, E), -1), torch.randn(B, T, E, H, Dh)
        lens = None if kv_lens is None else torch.tensor(kv_lens)
        with sanitizer.races():
            moa_matches_reference(gpu_tiles.leaves(q, k, v, mix), (q, k, v, mix), lens, do, do,
                                  label=f"T={T} S={S}", kv_start=torch.tensor(kv_start))
