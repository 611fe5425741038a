import pytest
import torch

import bam_kernels as bk
from bam_model.cache import KVCache
from bam_model.layers import MixtureOfAttention
from bam_model.rope import apply_rope, rope_cos_sin, rope_cos_sin_range


def dense_llama_attention(x_BTD, wq, wk, wv, wo, n_heads, n_kv_heads, theta=10000.0):
    """Hugging Face Llama attention, written out: GQA, RoPE, causal softmax."""
    B, T, D = x_BTD.shape
    Dh = wq.shape[0] // n_heads
    q = (x_BTD @ wq.T).view(B, T, n_heads, Dh)
    k = (x_BTD @ wk.T).view(B, T, n_kv_heads, Dh)
    v = (x_BTD @ wv.T).view(B, T, n_kv_heads, Dh)
    cos, sin = rope_cos_sin(torch.arange(T), Dh, theta, dtype=x_BTD.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = n_heads // n_kv_heads
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / Dh ** 0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v)
    return o.reshape(B, T, -1) @ wo.T


def _dense_weights(D, H, Hkv, Dh, dtype=torch.float64):
    return (torch.randn(H * Dh, D, dtype=dtype) / D ** 0.5,
            torch.randn(Hkv * Dh, D, dtype=dtype) / D ** 0.5,
            torch.randn(Hkv * Dh, D, dtype=dtype) / D ** 0.5,
            torch.randn(D, H * Dh, dtype=dtype) / (H * Dh) ** 0.5)


@pytest.mark.parametrize("E,shared_kv,kv_init,top_k", [(1, True, "mean", None), (3, True, "mean", None),
                                                      (3, True, "seed", 2), (2, False, "mean", None),
                                                      (4, False, "mean", 1)])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_copies_of_one_dense_attention_equal_it_for_any_router(E, shared_kv, kv_init, top_k, backend):
    D, H, Hkv, Dh, B, T = 24, 4, 2, 8, 2, 9
    wq, wk, wv, wo = _dense_weights(D, H, Hkv, Dh)
    moa = MixtureOfAttention.from_dense([wq] * E, [wk] * E, [wv] * E, [wo] * E, H, Hkv, shared_kv=shared_kv,
                                        kv_init=kv_init, top_k=top_k)
    with torch.no_grad():
        moa.router.weight.normal_(0, 3.0)
    x = torch.randn(B, T, D, dtype=torch.float64)
    with bk.use_backend(backend):
        y = moa(x)
    torch.testing.assert_close(y, dense_llama_attention(x, wq, wk, wv, wo, H, Hkv))
    assert moa.router_logits.shape == (B * T, E)


def test_kv_init_seed_takes_the_first_experts_kv():
    D, H, Hkv, Dh = 16, 4, 2, 4
    experts = [_dense_weights(D, H, Hkv, Dh) for _ in range(3)]
    q, k, v, o = (list(w) for w in zip(*experts))
    seed = MixtureOfAttention.from_dense(q, k, v, o, H, Hkv, shared_kv=True, kv_init="seed")
    assert torch.equal(seed.k_proj.weight, k[0]) and torch.equal(seed.v_proj.weight, v[0])
    for bad in ("first", "last"):
        with pytest.raises(ValueError, match="kv_init must be 'mean' or 'seed'"):
            MixtureOfAttention.from_dense(q, k, v, o, H, Hkv, shared_kv=True, kv_init=bad)


def test_copies_equal_dense_on_triton_backend():
    D, H, Hkv, Dh, E, B, T = 16, 4, 1, 16, 2, 1, 7
    wq, wk, wv, wo = _dense_weights(D, H, Hkv, Dh, torch.float32)
    moa = MixtureOfAttention.from_dense([wq] * E, [wk] * E, [wv] * E, [wo] * E, H, Hkv)
    x = torch.randn(B, T, D)
    want = dense_llama_attention(x, wq, wk, wv, wo, H, Hkv)
    # This test failed once (1.6e-4 off, most elements) in a full run and never again: the other
    # backend and the shared RoPE table are checked too, so that a repeat says where it comes from.
    cos, sin = rope_cos_sin(torch.arange(T), Dh)
    table_cos, table_sin = rope_cos_sin_range(0, T, Dh)
    assert torch.equal(cos, table_cos) and torch.equal(sin, table_sin), "the shared RoPE table changed"
    for backend in ("torch", "triton"):
        with bk.use_backend(backend):
            y = moa(x)
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, backend=backend: f"backend {backend}: {m}")


@pytest.mark.parametrize("shared_kv", [True, False])
def test_distinct_experts_are_the_router_weighted_sum_of_dense_attentions(shared_kv):
    D, H, Hkv, Dh, E, B, T = 16, 4, 2, 8, 3, 2, 6
    experts = [_dense_weights(D, H, Hkv, Dh) for _ in range(E)]
    qs, ks, vs, os_ = (list(w) for w in zip(*experts))
    moa = MixtureOfAttention.from_dense(qs, ks, vs, os_, H, Hkv, shared_kv=shared_kv)
    x = torch.randn(B, T, D, dtype=torch.float64)
    g = torch.softmax(x @ moa.router.weight.T, -1)
    if shared_kv:
        ks = [torch.stack(ks).mean(0)] * E
        vs = [torch.stack(vs).mean(0)] * E
    want = sum(g[..., e, None] * dense_llama_attention(x, qs[e], ks[e], vs[e], os_[e], H, Hkv)
               for e in range(E))
    torch.testing.assert_close(moa(x), want)


@pytest.mark.parametrize("shared_kv", [True, False])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_decoding_with_the_cache_equals_the_full_forward(shared_kv, backend):
    D, H, Hkv, E, B, T, prompt = 32, 4, 2, 2, 2, 9, 4
    moa = MixtureOfAttention(D, H, Hkv, E, shared_kv=shared_kv, head_dim=16)
    x = torch.randn(B, T, D)
    with bk.use_backend(backend), torch.no_grad():
        full = moa(x)
        cache = KVCache(num_layers=1)
        steps = [moa(x[:, :prompt], cache=cache)]
        for t in range(prompt, T):
            steps.append(moa(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    k, v = cache.layer(0)
    kv_shape = (B, T, Hkv, 16) if shared_kv else (B, T, E, Hkv, 16)
    assert k.shape == v.shape == kv_shape and cache.length(0) == T


def test_shared_kv_cache_is_a_dense_layers_cache():
    D, H, Hkv, Dh, B, T = 16, 4, 2, 8, 1, 5
    wq, wk, wv, wo = _dense_weights(D, H, Hkv, Dh, torch.float32)
    moa = MixtureOfAttention.from_dense([wq] * 4, [wk] * 4, [wv] * 4, [wo] * 4, H, Hkv)
    cache = KVCache(num_layers=2, max_length=T)
    x = torch.randn(B, T, D)
    with torch.no_grad():
        moa(x, cache=cache)
    k, v = cache.layer(0)
    assert k.shape == v.shape == (B, T, Hkv, Dh)
    # What is cached is the dense layer's keys and values (the shared projections are the dense ones).
    cos, sin = rope_cos_sin(torch.arange(T), Dh)
    torch.testing.assert_close(k, apply_rope((x @ wk.T).view(B, T, Hkv, Dh), cos, sin))
    torch.testing.assert_close(v, (x @ wv.T).view(B, T, Hkv, Dh))
    with pytest.raises(ValueError, match="max_length"):
        moa(torch.randn(B, 1, D), cache=cache)


def test_state_dict_names_and_shapes():
    D, H, Hkv, E, Dh = 32, 4, 2, 3, 8
    shared = MixtureOfAttention(D, H, Hkv, E, shared_kv=True, head_dim=Dh)
    expert = MixtureOfAttention(D, H, Hkv, E, shared_kv=False, head_dim=Dh)
    assert {k: tuple(v.shape) for k, v in shared.state_dict().items()} == {
        "q_proj.weight": (E * H * Dh, D), "k_proj.weight": (Hkv * Dh, D), "v_proj.weight": (Hkv * Dh, D),
        "o_proj.weight": (D, E * H * Dh), "router.weight": (E, D)}
    assert tuple(expert.state_dict()["k_proj.weight"].shape) == (E * Hkv * Dh, D)
    assert tuple(expert.state_dict()["v_proj.weight"].shape) == (E * Hkv * Dh, D)


def test_top_k_mix_keeps_k_weights_summing_to_one():
    moa = MixtureOfAttention(16, 2, 1, 4, top_k=2)
    w = moa.mix(torch.randn(5, 7, 4))
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 7))


def test_position_ids_shift_rope():
    moa = MixtureOfAttention(16, 2, 2, 2, head_dim=8).double()
    x = torch.randn(1, 4, 16, dtype=torch.float64)
    # RoPE scores depend only on relative positions, so a constant shift changes nothing.
    torch.testing.assert_close(moa(x, position_ids=torch.arange(4) + 11), moa(x))


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_kv_heads"):
        MixtureOfAttention(16, 4, 3, 2)
    with pytest.raises(ValueError, match="head_dim"):
        MixtureOfAttention(16, 4, 2, 2, head_dim=5)
    with pytest.raises(ValueError, match="top_k"):
        MixtureOfAttention(16, 4, 2, 2, top_k=3)
    moa = MixtureOfAttention(16, 4, 2, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        moa(torch.randn(2, 3, 15))
    wq, wk, wv, wo = _dense_weights(16, 4, 2, 4)
    with pytest.raises(ValueError, match="kv_init"):
        MixtureOfAttention.from_dense([wq], [wk], [wv], [wo], 4, 2, kv_init="median")
    with pytest.raises(ValueError, match=r"k_weights\[1\]"):
        MixtureOfAttention.from_dense([wq, wq], [wk, wk[:4]], [wv, wv], [wo, wo], 4, 2)
    with pytest.raises(ValueError, match="lists of one length"):
        MixtureOfAttention.from_dense([wq, wq], [wk], [wv, wv], [wo, wo], 4, 2)
    cache = KVCache(1)
    cache.update(0, torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="k_new must have shape"):
        cache.update(0, torch.randn(1, 1, 3, 4), torch.randn(1, 1, 3, 4))
