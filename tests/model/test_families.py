"""The dense families bam reads beyond Llama: each imports exactly (transformers' own class, a random
tiny model built from its config, the same logits and greedy tokens), mixes into function-preserving
mixtures of every method with its features kept in the experts, and exports back to its own class
(and its mixtures to the matching MoE class)."""
import pytest
import torch
import transformers

import bam_model
from bam_model.formats.gguf import ARCHITECTURES
from bam_model.upcycle import upcycle
from tests.support.oracle import rel

COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
              tie_word_embeddings=False)
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(rope_theta=1e6),
              dict(qkv_bias=True, qk_norm=None)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=12, rope_theta=1e6),
              dict(qkv_bias=False, qk_norm="head")),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(rope_theta=5e5),
              dict(qkv_bias=False, qk_norm="projection", block="post-norm", norm_in_float32=True)),
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                dict(no_rope_layers=[1, 0], use_sliding_window=False, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2), dict(nope_layers=[1])),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2,
                     logits_scaling=4.0),
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, attention_scale=0.2,
                     logits_scaling=4.0)),
    # Llama's computation with q/k/v and gate/up each one tensor: the family label brings it back as Phi-3
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(pad_token_id=0),
             dict(family="phi3")),
}


def hf_model(family: str, seed: int = 0, vocab_size: int = 97, **overrides):
    config_class, model_class, extra, _ = FAMILIES[family]
    torch.manual_seed(seed)
    settings = {k: v for k, v in {**extra, **overrides}.items() if v is not None}  # None: the class's default
    model = model_class(config_class(vocab_size=vocab_size, **COMMON, **settings)).eval()
    with torch.no_grad():  # every weight random, norms and biases too, so that a mix-up of any shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def other_models(name: str, tmp_path, seeds=(1, 2)) -> list:
    """Models of the family with other weights, through transformers' folders, as bam loads them."""
    models = []
    for s in seeds:
        hf_model(name, seed=s).save_pretrained(tmp_path / f"m{s}")
        models.append(bam_model.from_pretrained(str(tmp_path / f"m{s}")))
    return models


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    hf = hf_model(request.param)
    hf.save_pretrained(folder)
    return request.param, hf, folder


def test_a_family_imports_with_transformers_logits_and_tokens(family):
    name, hf, folder = family
    ours = bam_model.from_pretrained(str(folder))
    assert ours.config.family == name
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
    if FAMILIES[name][3].get("qkv_bias"):
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None
    if FAMILIES[name][3].get("qk_norm"):
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
            seeded = upcycle(models[0], models[1:], method="bam", attention=attention, kv_init="seed")
            kv = [key for key in dense.state_dict() if key.startswith(("k_", "v_"))]
            for key in kv:  # kv_init="seed": the seed's keys and values, biases and key norm included
                want = models[0].model.layers[1].self_attn.state_dict()[key]
                assert torch.equal(seeded.model.layers[1].self_attn.state_dict()[key], want), key
            features = FAMILIES[name][3]
            assert len(kv) == 2 + 2 * features.get("qkv_bias", False) + bool(features.get("qk_norm"))
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


# (for Llama-family mixtures with the paper's routing, which Mixtral would renormalise: Qwen2-MoE)
MOE_CLASSES = {"qwen2": "Qwen2MoeForCausalLM", "qwen3": "Qwen3MoeForCausalLM", "olmo2": None, "smollm3": None,
               "granite": None, "phi3": "MixtralForCausalLM"}


@pytest.mark.parametrize("options", [dict(method="btx", top_k=2), dict(method="sparse", top_k=1),
                                     dict(method="btx", top_k=2, ffn_routing="paper")])
def test_an_ffn_mixture_exports_as_the_familys_moe_class(family, options, tmp_path):
    """Different experts and a trained-looking router, so that routing and every expert's weights
    matter (sparse upcycling's experts are copies of the seed's FFN: there the test is the layout);
    the paper's routing (kept probabilities, not renormalised) is Qwen-MoE's norm_topk_prob=False."""
    name, _, folder = family
    seed, others = bam_model.from_pretrained(str(folder)), other_models(name, tmp_path)
    mixture = upcycle(seed, others, **options)
    with torch.no_grad():
        for key, p in mixture.named_parameters():
            if key.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0, generator=torch.Generator().manual_seed(5))
    if MOE_CLASSES[name] is None:  # no transformers MoE class computes the family's blocks
        with pytest.raises(ValueError, match=f"transformers has no MoE class of the {name} family"):
            bam_model.formats.export_hf(mixture, str(tmp_path / "moe"))
        assert not (tmp_path / "moe").exists()
        return
    want = MOE_CLASSES[name]
    if want == "MixtralForCausalLM" and options.get("ffn_routing") == "paper":
        want = "Qwen2MoeForCausalLM"
    assert bam_model.formats.export_hf(mixture, str(tmp_path / "moe")) == want
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert type(hf).__name__ == want
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    back = bam_model.from_pretrained(str(tmp_path / "moe"))  # and bam reads the folder back
    with torch.no_grad():
        assert rel(hf(ids).logits, mixture(ids).logits) < 1e-5
        assert rel(back(ids).logits, mixture(ids).logits) < 1e-5
    assert (back.config.normalize, back.config.top_k, back.config.attention) == \
        (mixture.config.normalize, mixture.config.top_k, "dense")


@pytest.mark.parametrize("attention", ["expert-kv", "shared-kv"])
def test_a_familys_mixture_generates_through_transformers_with_left_padding(family, attention, tmp_path):
    """The mixture's own folder (bam's format and its remote code) in transformers: a left-padded batch
    generates what each prompt generates alone, and the logits are bam's. Three different models, so
    that a slip in routing or mixing shows."""
    name, _, folder = family
    seed, others = bam_model.from_pretrained(str(folder)), other_models(name, tmp_path)
    mixture = upcycle(seed, others, method="bam", attention=attention, top_k=2)
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


GGUF_LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm"}
# Qwen2's split, then bytes: a digit is its own piece ("2025" is four), as Qwen2's tokenizer.json does
TOKENS = [chr(c) for c in range(ord("!"), ord("!") + 97)]


def write_gguf(hf, arch: str, path) -> None:
    """A float32 GGUF of ``hf`` as llama.cpp writes the architecture (its names and metadata keys; q/k
    rows as they are: llama.cpp permutes only the llama architecture's)."""
    import gguf

    c = hf.config
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(hf.model.layers[0].self_attn.head_dim)
    w.add_value_length(hf.model.layers[0].self_attn.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([1] * len(TOKENS))
    w.add_token_merges([])
    w.add_eos_token_id(0)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight":
            gname = "output.weight"
        elif name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        else:
            _, _, i, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gname = f"blk.{i}.{GGUF_LAYER.get(module, module)}.{leaf}"  # a name bam has no map for: as is
        w.add_tensor(gname, t.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_familys_gguf_loads_as_transformers_reads_it(family, tmp_path):
    """The family's model (Qwen3's with a head_dim that is not hidden_size / heads) from its GGUF gives its
    logits; a model of the default head_dim, which transformers' GGUF reader assumes, also loads in
    transformers from the same kind of file with the same logits: the file is what llama.cpp writes."""
    name, hf, _ = family
    if name not in ARCHITECTURES:
        with pytest.raises(ValueError, match=f"GGUF architecture '{name}' is not supported"):
            write_gguf(hf, name, tmp_path / "m.gguf")
            bam_model.from_pretrained(str(tmp_path / "m.gguf"))
        return
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(8))
    write_gguf(hf, name, tmp_path / "m.gguf")
    ours = bam_model.from_pretrained(str(tmp_path / "m.gguf"))
    for key, value in FAMILIES[name][3].items():
        assert getattr(ours.config, key) == value, key
    with torch.no_grad():
        assert rel(ours(ids).logits, hf(ids).logits) < 1e-5
    assert ours.tokenizer.encode("a2025b").tokens == ["a", "2", "0", "2", "5", "b"]
    plain = hf_model(name, seed=9, head_dim=None)
    write_gguf(plain, name, tmp_path / "plain" / "m.gguf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", gguf_file="m.gguf").eval()
    with torch.no_grad():
        want = plain(ids).logits
        assert rel(theirs(ids).logits, want) < 1e-5
        assert rel(bam_model.from_pretrained(str(tmp_path / "plain" / "m.gguf"))(ids).logits, want) < 1e-5


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_command_line_mixes_trains_evaluates_and_generates_a_familys_models(name, tmp_path, capsys):
    """A transformers folder of each family (the bundled tokenizer's vocabulary) through bam mix, train,
    eval and generate, as a user runs them."""
    from bam_model.cli import main

    hf_model(name, vocab_size=8192).save_pretrained(tmp_path / "seed")
    seed, mixed, run = str(tmp_path / "seed"), str(tmp_path / "mixed"), str(tmp_path / "run")
    assert main(["mix", "--base-model", seed, "--experts", seed, "--attention", "shared-kv", "--out", mixed,
                 "--no-progress"]) == 0
    assert bam_model.from_pretrained(mixed).config.family == name
    assert main(["train", mixed, "--data", "code", "--out", run, "--steps", "2", "--batch-size", "2",
                 "--seq-len", "16", "--eval-windows", "1", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["eval", f"{run}/model", "--data", "code", "--max-windows", "2", "--no-progress"]) == 0
    assert "code" in capsys.readouterr().out
    assert main(["generate", f"{run}/model", "--prompt", "def main():", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("def main():")


def test_a_sliding_window_is_kept_to_and_written_back(tmp_path):
    """A Mistral whose window (8) is shorter than its context: bam computes full attention, the same
    within the window, refuses longer inputs, and writes the window back, so the exported model slides
    past it as the original does; the bam folder's remote code refuses what bam cannot compute."""
    config = transformers.MistralConfig(**COMMON, vocab_size=97, sliding_window=8)
    torch.manual_seed(0)
    hf = transformers.MistralForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "mistral")
    ours = bam_model.from_pretrained(str(tmp_path / "mistral"))
    assert (ours.config.max_seq_len, ours.config.attention_window, ours.config.family) == (8, 8, "mistral")
    short, long = (torch.randint(0, 97, (1, n), generator=torch.Generator().manual_seed(n)) for n in (8, 20))
    with torch.no_grad():
        assert rel(ours(short).logits, hf(short).logits) < 1e-5
        with pytest.raises(ValueError, match="max_seq_len=8"):
            ours(long)
        assert bam_model.export_hf(ours, str(tmp_path / "back")) == "MistralForCausalLM"
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
        assert back.config.sliding_window == 8
        assert rel(back(long).logits, hf(long).logits) < 1e-5
        upcycle(ours, [ours], method="bam").save_pretrained(str(tmp_path / "mix"))
        remote = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mix", trust_remote_code=True)
        with pytest.raises(ValueError, match="sliding window of 8 tokens"):
            remote(input_ids=long)
    qwen = transformers.Qwen2Config(**COMMON, vocab_size=97, sliding_window=8)  # use_sliding_window: off
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(qwen).save_pretrained(tmp_path / "qwen")
    assert bam_model.from_pretrained(str(tmp_path / "qwen")).config.attention_window is None


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_key_left_out_takes_the_familys_default(name, tmp_path):
    """transformers 4 saved only what differed from a class's defaults: a config.json without them is
    read with the family's own, not Llama's (the logits of transformers' reading of the same folder)."""
    import json

    hf_model(name).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rms_norm_eps", "rope_theta", "rope_parameters", "attention_multiplier",
                "max_position_embeddings", "use_sliding_window", "sliding_window"):
        config.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = bam_model.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert rel(ours(ids).logits, theirs(ids).logits) < 1e-5


def test_mix_refuses_a_hugging_face_format_the_family_has_no_class_for_before_any_work(tmp_path, capsys):
    from bam_model.cli import main

    for name, fmt, message in (("olmo2", "hf", "transformers has no MoE class of the olmo2 family"),
                               ("qwen2", "mixtral", "computes as Qwen2MoeForCausalLM, not Mixtral")):
        hf_model(name).save_pretrained(tmp_path / name)
        seed, out = str(tmp_path / name), tmp_path / f"{name}-{fmt}"
        assert main(["mix", "--base-model", seed, "--experts", seed, "--method", "btx", "--format", fmt,
                     "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_a_qwen_moe_folder_with_what_bam_does_not_have_is_refused_by_its_key(tmp_path):
    import json

    common = dict(COMMON, vocab_size=97, moe_intermediate_size=48, num_experts=3, num_experts_per_tok=2)
    for config, message in ((transformers.Qwen2MoeConfig(**common, shared_expert_intermediate_size=16),
                             "shared_expert_intermediate_size > 0 is not supported"),
                            (transformers.Qwen3MoeConfig(**common, mlp_only_layers=[1]),
                             "mlp_only_layers / decoder_sparse_step > 1 are not supported")):
        folder = tmp_path / config.model_type
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config.to_dict()))
        with pytest.raises(ValueError, match=message):
            bam_model.from_pretrained(str(folder))


def test_the_norms_round_as_each_familys_do_in_bf16():
    """Llama's RMSNorm rounds the normalised value to bf16, then scales; OLMo 2's scales in float32 and
    rounds once: bam's norm equals each to the bit (its per-expert form too)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm

    from bam_model.norms import ExpertRMSNorm, RMSNorm

    torch.manual_seed(0)
    x = torch.randn(3, 5, 64).bfloat16() * 3
    weight = torch.rand(64).bfloat16() + 0.5
    for theirs_class, in_float32 in ((LlamaRMSNorm, False), (Olmo2RMSNorm, True)):
        theirs, ours = theirs_class(64, eps=1e-6).bfloat16(), RMSNorm(64, 1e-6, in_float32).bfloat16()
        experts = ExpertRMSNorm(2, 64, 1e-6, in_float32).bfloat16()
        with torch.no_grad():
            theirs.weight.copy_(weight)
            ours.weight.copy_(weight)
            experts.weight.copy_(weight.expand(2, 64))
            assert torch.equal(ours(x), theirs(x)), theirs_class.__name__
            assert torch.equal(experts(x.view(3, 5, 1, 64).expand(3, 5, 2, 64)[..., None, :])[:, :, 1, 0],
                               theirs(x)), theirs_class.__name__
    llama, olmo2 = RMSNorm(64, 1e-6, False).bfloat16(), RMSNorm(64, 1e-6, True).bfloat16()
    with torch.no_grad():
        llama.weight.copy_(weight)
        olmo2.weight.copy_(weight)
        assert not torch.equal(llama(x), olmo2(x))  # the two roundings differ on this input: the test tells
