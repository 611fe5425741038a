"""BAM model, branch and upcycling: function preservation for every method and KV option, where each
weight goes, refusal of mismatched models, aux losses, KV cache, Mixtral export."""
import pytest
import torch
import transformers

import bam_model
from bam_model import BamConfig, BamLM, DenseConfig, DenseLM
from bam_model.formats import folder
from bam_model.layers import load_balancing_loss, router_z_loss
from bam_model.upcycle import branch, upcycle
from tests.support.models import randomize_norms


def tiny(block="sequential", tie=False, **changes) -> DenseLM:
    cfg = DenseConfig(vocab_size=97, dim=36, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=52,
                      rope_theta=3000.0, norm_eps=1e-6, max_seq_len=48, block=block, tie_embeddings=tie,
                      **changes)
    model = DenseLM(cfg)
    return randomize_norms(model)


def hf_written_llama(tmp_path, name="llama", tie=False):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=36, intermediate_size=52, num_hidden_layers=2,
                                   num_attention_heads=6, num_key_value_heads=2, rope_theta=3000.0,
                                   rms_norm_eps=1e-6, max_position_embeddings=48, tie_word_embeddings=tie)
    hf = transformers.LlamaForCausalLM(cfg)
    randomize_norms(hf)
    hf.save_pretrained(tmp_path / name)
    return str(tmp_path / name)


def ids(B=2, T=10):
    return torch.randint(0, 97, (B, T))


KINDS = [dict(method="bam", attention="expert-kv"), dict(method="bam", attention="shared-kv"),
         dict(method="bam", attention="shared-kv", kv_init="seed"), dict(method="bam", attention="expert-kv",
                                                                         attention_top_k=1),
         dict(method="btx"), dict(method="sparse")]
# Every method and KV option at every top-k, with its default FFN routing and with the renormalised one;
# the paper's routing keeps the function only at top-k = E.
CASES = [{**kind, "top_k": k, **routing} for kind in KINDS for k in (1, 2, 3)
         for routing in ({}, {"ffn_routing": "renormalized"})]
CASES += [dict(method="bam", top_k=3, ffn_routing="paper")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_identical_transformers_checkpoints_keep_their_function(tmp_path, case):
    path = hf_written_llama(tmp_path)
    dense = bam_model.load_dense(path)
    moe = upcycle(path, [path, path], **case)
    assert isinstance(moe, BamLM) and moe.config.num_experts == 3
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(moe.generate(x[:1, :4], 5), dense.generate(x[:1, :4], 5))


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_parallel_seed_stays_parallel_and_keeps_its_function(attention, top_k):
    dense = tiny(block="parallel", tie=True)
    moe = upcycle(dense, branch(dense, ["code", "law"]), attention=attention, top_k=top_k)
    assert moe.config.block == "parallel" and moe.config.expert_domains == [None, "code", "law"]
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, dense(x).logits, rtol=1e-5, atol=1e-5)


def test_bam_paper_routing_scales_the_ffn_by_the_kept_probability():
    dense = tiny()
    moe = upcycle(dense, [dense, dense], ffn_routing="paper")
    assert (moe.config.normalize, moe.config.straight_through) == (False, False)
    x_BTD = torch.randn(2, 5, 36)
    mlp = moe.model.layers[0].mlp
    with torch.no_grad():
        y = mlp(x_BTD)
        p_max = torch.softmax(mlp.router_logits.float(), dim=-1).max(dim=-1).values.reshape(2, 5, 1)
        torch.testing.assert_close(y, p_max * dense.model.layers[0].mlp(x_BTD), rtol=1e-5, atol=1e-6)
    assert (p_max < 0.99).all()


@pytest.mark.parametrize("top_k", [1, 2])
def test_straight_through_routing_has_renormalised_forward_and_the_papers_router_gradient(top_k):
    """bam's default: the forward equals renormalised routing bitwise, the router's gradient equals
    that of the paper's routing (the plain probabilities), which renormalised top-1 does not have."""
    dense = tiny()
    experts = [tiny(), tiny()]
    moes = {r: upcycle(dense, experts, top_k=top_k, ffn_routing=r)
            for r in ("straight-through", "renormalized", "paper")}
    assert upcycle(dense, experts).config.straight_through     # the default
    x_BTD = torch.randn(2, 5, 36)
    out, grads = {}, {}
    for name, moe in moes.items():
        mlp = moe.model.layers[0].mlp
        y = mlp(x_BTD)
        out[name] = y
        (g,) = torch.autograd.grad((y * torch.linspace(-1, 1, 36)).sum(), mlp.gate.weight)
        grads[name] = g
    assert torch.equal(out["straight-through"], out["renormalized"])
    # The paper's forward is p * y, so its router gradient is that of the unscaled output: compare
    # with the gradient of sum_k p_k <dy, FFN_k(x)> built by hand from the renormalised forward.
    mlp = moes["paper"].model.layers[0].mlp
    logits = mlp.gate(x_BTD.reshape(-1, 36))
    probs = torch.softmax(logits, dim=-1)
    w, idx = torch.topk(probs, top_k, dim=-1)
    ffn = torch.stack([m.model.layers[0].mlp(x_BTD.reshape(-1, 36)) for m in [dense] + experts],
                      dim=1)  # [T,E,D]
    picked = torch.gather(ffn, 1, idx[..., None].expand(-1, -1, 36))                    # [T, K, D]
    target = (w[..., None] * picked.detach() * torch.linspace(-1, 1, 36)).sum()
    (expected,) = torch.autograd.grad(target, mlp.gate.weight)
    torch.testing.assert_close(grads["straight-through"], expected, rtol=1e-4, atol=1e-6)
    if top_k == 1:
        assert torch.count_nonzero(grads["renormalized"]) == 0  # renormalised top-1: no LM gradient
    assert torch.count_nonzero(grads["straight-through"]) > 0


def test_each_weight_goes_where_the_table_says():
    seed, a, b = tiny(), tiny(), tiny()
    models = [seed, a, b]
    sd = [m.state_dict() for m in models]
    p = "model.layers.1."

    def mean(key):
        return torch.stack([s[key] for s in sd]).mean(0)

    bam = upcycle(seed, [a, b], attention="expert-kv").state_dict()
    D, H, Hkv, Dh = 36, 6, 2, 6
    for e in range(3):
        torch.testing.assert_close(bam[p + "mlp.experts.gate_up_proj"][e],
                                   torch.cat([sd[e][p + "mlp.gate_proj.weight"],
                                              sd[e][p + "mlp.up_proj.weight"]]))
        torch.testing.assert_close(bam[p + "mlp.experts.down_proj"][e], sd[e][p + "mlp.down_proj.weight"])
        torch.testing.assert_close(bam[p + "self_attn.q_proj.weight"][e * H * Dh:(e + 1) * H * Dh],
                                   sd[e][p + "self_attn.q_proj.weight"])
        torch.testing.assert_close(bam[p + "self_attn.k_proj.weight"][e * Hkv * Dh:(e + 1) * Hkv * Dh],
                                   sd[e][p + "self_attn.k_proj.weight"])
        torch.testing.assert_close(bam[p + "self_attn.o_proj.weight"][:, e * H * Dh:(e + 1) * H * Dh],
                                   sd[e][p + "self_attn.o_proj.weight"])
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                p + "input_layernorm.weight", p + "post_attention_layernorm.weight"):
        torch.testing.assert_close(bam[key], mean(key))
    assert bam[p + "self_attn.router.weight"].shape == (3, D) and bam[p + "mlp.gate.weight"].shape == (3, D)

    shared = upcycle(seed, [a, b], attention="shared-kv").state_dict()
    torch.testing.assert_close(shared[p + "self_attn.v_proj.weight"], mean(p + "self_attn.v_proj.weight"))
    first = upcycle(seed, [a, b], attention="shared-kv", kv_init="seed").state_dict()
    torch.testing.assert_close(first[p + "self_attn.k_proj.weight"], sd[0][p + "self_attn.k_proj.weight"])

    btx = upcycle(seed, [a, b], method="btx")
    assert (btx.config.top_k, btx.config.normalize, btx.config.attention) == (2, True, "dense")
    btx = btx.state_dict()
    torch.testing.assert_close(btx[p + "self_attn.q_proj.weight"], mean(p + "self_attn.q_proj.weight"))
    torch.testing.assert_close(btx[p + "mlp.experts.down_proj"][2], sd[2][p + "mlp.down_proj.weight"])

    sparse = upcycle(seed, [a, b], method="sparse").state_dict()
    for e in range(3):
        torch.testing.assert_close(sparse[p + "mlp.experts.down_proj"][e], sd[0][p + "mlp.down_proj.weight"])
    for key in ("model.embed_tokens.weight", p + "self_attn.o_proj.weight", p + "input_layernorm.weight"):
        torch.testing.assert_close(sparse[key], sd[0][key])


def test_routers_are_random_but_seeded():
    seed, a = tiny(), tiny()
    key = "model.layers.0.mlp.gate.weight"
    r0 = upcycle(seed, [a], router_seed=3).state_dict()
    r1 = upcycle(seed, [a], router_seed=3).state_dict()
    r2 = upcycle(seed, [a], router_seed=4).state_dict()
    assert torch.equal(r0[key], r1[key]) and not torch.equal(r0[key], r2[key])
    assert not torch.equal(r0[key], r0["model.layers.1.mlp.gate.weight"])
    assert not torch.equal(r0["model.layers.0.self_attn.router.weight"][:2], r0[key])


@pytest.mark.parametrize("changes, word", [
    (dict(n_kv_heads=3), "n_kv_heads"), (dict(block="parallel"), "block"), (dict(rope_theta=10000.0),
                                                                            "rope_theta"),
    (dict(tie=True), "tie_embeddings"), (dict(vocab_size=98), "vocab_size"), (dict(norm_eps=1e-5),
                                                                              "norm_eps")])
def test_mismatched_models_are_refused_by_name(changes, word):
    seed = tiny()
    base = dict(vocab_size=97, dim=36, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=52, rope_theta=3000.0,
                norm_eps=1e-6, max_seq_len=48)
    tie = changes.pop("tie", False)
    block = changes.pop("block", "sequential")
    other = DenseLM(DenseConfig(**{**base, **changes}, block=block, tie_embeddings=tie))
    with pytest.raises(ValueError, match=rf"experts\[1\] has {word}="):
        upcycle(seed, [seed, other])


@pytest.mark.parametrize("kwargs, word", [
    (dict(method="moe"), "method"), (dict(merge="median"), "merge"), (dict(attention="dense"), "attention"),
    (dict(method="btx", attention="shared-kv"), "attention"), (dict(top_k=4), "top_k"),
    (dict(kv_init="last"), "kv_init"), (dict(num_experts=5), "num_experts")])
def test_bad_upcycle_arguments(kwargs, word):
    seed = tiny()
    with pytest.raises(ValueError, match=word):
        upcycle(seed, [seed, seed], **kwargs)


def test_bad_models_and_branch_arguments(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        upcycle(42, [])
    with pytest.raises(ValueError, match="config.json"):
        upcycle(str(tmp_path), [])
    with pytest.raises(ValueError, match="distinct"):
        branch(tiny(), ["code", "code"])


def test_branch_copies_are_independent():
    seed = tiny()
    code, law = branch(seed, ["code", "law"])
    assert (code.config.domain, law.config.domain, seed.config.domain) == ("code", "law", None)
    with torch.no_grad():
        code.lm_head.weight.add_(1.0)
    assert not torch.equal(code.lm_head.weight, seed.lm_head.weight)
    assert torch.equal(law.lm_head.weight, seed.lm_head.weight)


@pytest.mark.parametrize("top_k", [1, 3])
def test_btx_with_more_experts_than_models_adds_copies_of_the_seeds_ffn(top_k):
    seed, a, b = tiny(), tiny(), tiny()
    a.config, b.config = a.config.replace(domain="code"), b.config.replace(domain="law")
    moe = upcycle(seed, [a, b], method="btx", num_experts=5, top_k=top_k, ffn_routing="straight-through")
    assert (moe.config.num_experts, moe.config.top_k) == (5, top_k)
    assert moe.config.expert_domains == [None, "code", "law", None, None]
    sd, states = moe.state_dict(), [m.state_dict() for m in (seed, a, b, seed, seed)]
    for i in range(2):
        p = f"model.layers.{i}."
        for e, state in enumerate(states):
            torch.testing.assert_close(sd[p + "mlp.experts.down_proj"][e], state[p + "mlp.down_proj.weight"])
    same = upcycle(seed, [seed, seed], method="btx", num_experts=5, top_k=top_k)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(same(x).logits, seed(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_experts=2 is fewer than the 3 models"):
        upcycle(seed, [a, b], method="btx", num_experts=2)


def test_sparse_upcycling_needs_only_the_seed():
    moe = upcycle(tiny(), [], method="sparse", num_experts=4)
    assert moe.config.num_experts == 4 and moe.config.top_k == 2


# --- the BAM model ------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv", "dense"])
def test_bam_loss_is_nll_plus_weighted_router_losses(attention):
    cfg = BamConfig(vocab_size=97, dim=36, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=52, num_experts=3,
                    top_k=2, attention=attention, load_balancing_alpha=0.05, z_loss_beta=0.02)
    model = BamLM(cfg)
    x = ids()
    out = model(x, labels=x)
    nll = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 97), x[:, 1:].reshape(-1))
    lb = z = 0
    for logits_TE in out.router_logits["ffn"]:
        assert logits_TE.shape == (20, 3)
        lb = lb + load_balancing_loss(logits_TE, torch.softmax(logits_TE, -1).topk(2, dim=-1).indices)
        z = z + router_z_loss(logits_TE)
    torch.testing.assert_close(out.nll, nll)
    torch.testing.assert_close(out.aux_loss, 0.05 * lb + 0.02 * z)
    torch.testing.assert_close(out.loss, nll + 0.05 * lb + 0.02 * z)
    assert ("attention" in out.router_logits) == (attention != "dense")
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    if attention != "dense":
        assert model.model.layers[0].self_attn.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention, block", [("expert-kv", "sequential"), ("shared-kv", "sequential"),
                                              ("expert-kv", "parallel")])
def test_bam_kv_cache_matches_full_forward_and_shared_kv_is_dense_sized(attention, block):
    dense = tiny(block=block)
    moe = upcycle(dense, [tiny(block=block), tiny(block=block)], attention=attention, top_k=2)
    x = ids(B=2, T=9)
    with torch.no_grad():
        full = moe(x).logits
        cache = moe.new_cache()
        steps = [moe(x[:, :5], cache=cache).logits] + [moe(x[:, t:t + 1],
                                                           cache=cache).logits for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
        dense_cache = dense.new_cache()
        dense(x, cache=dense_cache)
    k, _ = cache.layer(0)
    k_dense, _ = dense_cache.layer(0)
    assert k.numel() == (k_dense.numel() if attention == "shared-kv" else 3 * k_dense.numel())


def test_bam_checkpoint_round_trip(tmp_path):
    moe = upcycle(tiny(tie=True), [tiny(tie=True)], attention="shared-kv")
    moe.save_pretrained(str(tmp_path / "moe"))
    loaded = bam_model.from_pretrained(str(tmp_path / "moe"))
    assert loaded.config == moe.config
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, moe(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mixture"):
        bam_model.load_dense(str(tmp_path / "moe"))


# --- Mixtral export -----------------------------------------------------------------------------

@pytest.mark.parametrize("method, tie", [("btx", False), ("sparse", True)])
def test_mixtral_export_loads_in_transformers_with_the_same_logits(tmp_path, method, tie):
    paths = [hf_written_llama(tmp_path, f"m{i}", tie=tie) for i in range(3)]
    moe = upcycle(paths[0], paths[1:], method=method)
    bam_model.export_mixtral(moe, str(tmp_path / "mixtral"))
    hf = transformers.MixtralForCausalLM.from_pretrained(str(tmp_path / "mixtral")).eval()
    back = bam_model.from_pretrained(str(tmp_path / "mixtral"))
    assert (back.config.num_experts, back.config.top_k, back.config.normalize) == (3, 2, True)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, moe(x).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x).logits, moe(x).logits, rtol=0, atol=0)


def test_a_mixtral_written_by_transformers_loads_as_a_mixture(tmp_path):
    cfg = transformers.MixtralConfig(vocab_size=97, hidden_size=36, intermediate_size=52, num_hidden_layers=2,
                                     num_attention_heads=6, num_key_value_heads=2, num_local_experts=5,
                                     num_experts_per_tok=2, rope_theta=3000.0, max_position_embeddings=48)
    hf = transformers.MixtralForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "mx")
    ours = bam_model.from_pretrained(str(tmp_path / "mx"))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, hf(x).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="from_pretrained"):
        bam_model.load_dense(str(tmp_path / "mx"))
    tensors = folder.read_safetensors_folder(str(tmp_path / "mx"))
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    config_json = (tmp_path / "mx" / "config.json").read_text()
    folder.write_folder(str(tmp_path / "broken"), {"config.json": config_json}, tensors)
    with pytest.raises(ValueError,
                       match=r"missing tensor 'model.layers.1.block_sparse_moe.experts.3.w3.weight'"):
        bam_model.from_pretrained(str(tmp_path / "broken"))


def test_mixtral_export_refuses_attention_experts_and_unnormalised_routing(tmp_path):
    seed = tiny()
    with pytest.raises(ValueError, match="attention experts"):
        bam_model.export_mixtral(upcycle(seed, [seed]), str(tmp_path / "a"))
    with pytest.raises(ValueError, match="renormalises"):
        bam_model.export_mixtral(upcycle(seed, [seed, seed], method="btx", ffn_routing="paper"),
                                 str(tmp_path / "b"))
    with pytest.raises(ValueError, match="parallel"):
        bam_model.export_mixtral(upcycle(tiny(block="parallel"), [], method="sparse", num_experts=2),
                                 str(tmp_path / "c"))
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_bam_model_trains_under_autocast(attention, monkeypatch):
    """A training step inside bf16 autocast (what `bam train` does on CUDA) runs the experts and
    the attention in bf16 on fp32 parameters and the routers in fp32: same loss as float32 within
    bf16's precision, and fp32 gradients for every parameter."""
    import bam_kernels.moe as experts
    seen = []
    real = experts._moe_mlp_impl
    monkeypatch.setattr(experts, "_moe_mlp_impl", lambda x, *a: seen.append(x.dtype) or real(x, *a))
    seed = tiny(block="parallel")
    model = upcycle(seed, [tiny(block="parallel"), tiny(block="parallel")], attention=attention)
    x = torch.randint(0, seed.config.vocab_size, (2, 17))
    with torch.no_grad():
        loss32 = model(x, labels=x).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x)
    loss16 = out.loss
    loss16.backward()
    # Routers in float32 (selective precision): the logits equal the fp32 product exactly.
    for logits in out.router_logits["ffn"] + out.router_logits["attention"]:
        assert logits.dtype == torch.float32
    layer = model.model.layers[0]
    with torch.no_grad():
        h = layer.input_layernorm(model.model.embed_tokens(x)).reshape(-1, seed.config.dim)
        assert torch.equal(out.router_logits["ffn"][0], h @ layer.mlp.gate.weight.T)
    assert seen and set(seen[-seed.config.n_layers:]) == {torch.bfloat16}
    assert abs(loss16.item() - loss32.item()) < 2e-2 * loss32.item()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())
