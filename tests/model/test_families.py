"""The dense families bam reads beyond Llama: each imports exactly (transformers' own class, a random
tiny model built from its config, the same logits and greedy tokens), mixes into function-preserving
mixtures of every method with its features kept in the experts, and exports back to its own class
(and its mixtures to the matching MoE class)."""
import pytest
import torch
import transformers

import bam_model
from bam_model.upcycle import upcycle
from tests.support.oracle import rel

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_theta=1e6),
              dict(qkv_bias=True, qk_norm=None)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=12, rope_theta=1e6),
              dict(qkv_bias=False, qk_norm="head")),
}


def hf_model(family: str, seed: int = 0):
    config_class, model_class, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**COMMON, **extra)).eval()
    with torch.no_grad():  # every weight random, norms and biases too, so that a mix-up of any shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_a_family_imports_with_transformers_logits_and_tokens(family):
    name, hf, folder = family
    ours = bam_model.from_pretrained(str(folder))
    for key, value in FAMILIES[name][3].items():
        assert getattr(ours.config, key) == value, key
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        assert rel(ours(ids).logits, want) < 1e-5
        assert ours.generate(ids, 8).tolist() == hf.generate(ids, max_new_tokens=8, do_sample=False,
                                                                  pad_token_id=0).tolist()


@pytest.mark.parametrize("options", [
    dict(method="bam", attention="expert-kv", top_k=2),
    dict(method="bam", attention="shared-kv", top_k=1),
    dict(method="bam", attention="shared-kv", kv_init="seed", top_k=1),
    dict(method="bam", attention="expert-kv", attention_top_k=1, ffn_routing="straight-through"),
    dict(method="btx", top_k=2),
    dict(method="sparse", top_k=1),
])
def test_a_mixture_of_copies_computes_the_dense_model(family, options):
    name, _, folder = family
    seed = bam_model.from_pretrained(str(folder))
    mixture = upcycle(seed, [seed, seed], **options)
    for key, value in FAMILIES[name][3].items():
        assert getattr(mixture.config, key) == value, key
    attn = mixture.model.layers[0].self_attn
    if FAMILIES[name][3]["qkv_bias"]:
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    if FAMILIES[name][3]["qk_norm"]:
        assert hasattr(attn, "q_norm") and hasattr(attn, "k_norm")
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(mixture(ids).logits, seed(ids).logits) < 1e-5
        assert mixture.generate(ids, 6).tolist() == seed.generate(ids, 6).tolist()


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_attention_experts_keep_each_experts_biases_and_norms(family, attention, tmp_path):
    """Three different models: with the router's weight all on expert e, a layer's mixture of attention
    computes model e's attention, biases and query/key norms included (expert KV); with shared K/V
    the keys and values (their biases and key norm too) are the models' mean."""
    name, _, _ = family
    models = []
    for s in range(3):
        hf_model(name, seed=s).save_pretrained(tmp_path / str(s))
        models.append(bam_model.from_pretrained(str(tmp_path / str(s))))
    mixture = upcycle(models[0], models[1:], method="bam", attention=attention)
    moa = mixture.model.layers[1].self_attn
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(3))
    for e, model in enumerate(models):
        dense = model.model.layers[1].self_attn
        if attention == "shared-kv":
            kv = [key for key in dense.state_dict() if key.startswith(("k_", "v_"))]
            assert len(kv) == 2 + 2 * FAMILIES[name][3]["qkv_bias"] + bool(FAMILIES[name][3]["qk_norm"])
            for key in kv:
                mean = torch.stack([m.model.layers[1].self_attn.state_dict()[key] for m in models]).mean(0)
                assert rel(moa.state_dict()[key], mean) < 1e-6, key
            continue
        moa.mix = lambda logits, e=e: torch.nn.functional.one_hot(torch.full(logits.shape[:-1], e), 3).float()
        with torch.no_grad():
            assert rel(moa(x), dense(x)) < 1e-5, e


def test_a_family_exports_back_to_its_class(family, tmp_path):
    name, hf, folder = family
    ours = bam_model.from_pretrained(str(folder))
    assert bam_model.formats.export_hf(ours, str(tmp_path / "dense")) == type(hf).__name__
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert type(back).__name__ == type(hf).__name__
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert rel(back(ids).logits, hf(ids).logits) < 1e-5


MOE_CLASSES = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM"}


@pytest.mark.parametrize("options", [dict(method="btx", top_k=2), dict(method="sparse", top_k=1),
                                     dict(method="btx", top_k=2, ffn_routing="paper")])
def test_an_ffn_mixture_exports_as_the_familys_moe_class(family, options, tmp_path):
    """Different experts and a trained-looking router, so that routing and every expert's weights
    matter; the paper's routing (kept probabilities, not renormalised) is Qwen-MoE's norm_topk_prob=False."""
    name, _, folder = family
    seed = bam_model.from_pretrained(str(folder))
    others = []
    for s in (1, 2):
        hf_model(name, seed=s).save_pretrained(tmp_path / f"m{s}")
        others.append(bam_model.from_pretrained(str(tmp_path / f"m{s}")))
    mixture = upcycle(seed, others, **options)
    with torch.no_grad():
        for key, p in mixture.named_parameters():
            if key.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    assert bam_model.formats.export_hf(mixture, str(tmp_path / "moe")) == MOE_CLASSES[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(hf).__name__ == MOE_CLASSES[name]
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert rel(hf(ids).logits, mixture(ids).logits) < 1e-5


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_a_familys_mixture_generates_through_transformers_with_left_padding(family, attention, tmp_path):
    """The mixture's own folder (bam's format and its remote code) in transformers: a left-padded batch
    generates what each prompt generates alone, and the logits are bam's."""
    name, _, folder = family
    seed = bam_model.from_pretrained(str(folder))
    mixture = upcycle(seed, [seed, seed], method="bam", attention=attention, top_k=2)
    with torch.no_grad():
        for key, p in mixture.named_parameters():
            if key.endswith(("router.weight", "gate.weight")):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(7))
    mixture.save_pretrained(str(tmp_path / "mix"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mix", trust_remote_code=True).eval()
    prompts = [torch.randint(1, 97, (n,), generator=torch.Generator().manual_seed(n)) for n in (3, 8)]
    with torch.no_grad():
        assert rel(hf(input_ids=prompts[1][None]).logits, mixture(prompts[1][None]).logits) < 1e-5
        alone = [hf.generate(p[None], max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(p):]
                 for p in prompts]
        batch = torch.zeros(2, 8, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, p in enumerate(prompts):
            batch[i, 8 - len(p):], mask[i, 8 - len(p):] = p, 1
        out = hf.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert [row[8:].tolist() for row in out] == [a.tolist() for a in alone]
    assert alone[1].tolist() == mixture.generate(prompts[1][None], 5)[0, 8:].tolist()
