"""Dense Llama-family model, configs and checkpoints: parity with transformers, KV cache, sampling,
atomic and sharded safetensors folders, Hugging Face and GGUF import."""
import json
import os

import pytest
import torch
import transformers

import bam_model
from bam_model.config import BamConfig, DenseConfig, config_from_dict
from bam_model.formats import folder, gguf
from bam_model.formats.folder import load_config
from bam_model.model import DenseLM, sample
from tests.support.models import randomize_norms
from tests.support.real_models import smollm2_gguf


def tiny_config(**changes) -> DenseConfig:
    base = dict(vocab_size=101, dim=40, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=72,
                rope_theta=5000.0, norm_eps=1e-6, max_seq_len=64)
    return DenseConfig(**{**base, **changes})


def ids(vocab, B=2, T=11):
    return torch.randint(0, vocab, (B, T))


# --- config ------------------------------------------------------------------------------------

def test_config_json_round_trip(tmp_path):
    dense = tiny_config(head_dim=12, tie_embeddings=True, block="parallel", domain="code", eos_token_id=3)
    assert config_from_dict(json.loads(dense.to_json())) == dense
    bam = BamConfig(**{**dense.__dict__, "num_experts": 3, "top_k": 2, "attention": "shared-kv",
                       "expert_domains": ["seed", "code", "law"]})
    assert config_from_dict(json.loads(bam.to_json())) == bam
    (tmp_path / "config.json").write_text(bam.to_json())
    assert load_config(str(tmp_path)) == bam
    assert bam.dense() == dense


@pytest.mark.parametrize("changes, word", [
    (dict(n_kv_heads=3), "n_kv_heads"), (dict(block="diagonal"), "block"), (dict(dim=42), "head_dim"),
    (dict(vocab_size=0), "vocab_size"), (dict(rope_theta=-1.0), "rope_theta"),
    (dict(eos_token_id=101), "eos_token_id"), (dict(head_dim=7), "head_dim")])
def test_dense_config_validation(changes, word):
    with pytest.raises(ValueError, match=word):
        tiny_config(**changes)


@pytest.mark.parametrize("changes, word", [
    (dict(top_k=4), "top_k"), (dict(attention="sparse-kv"), "attention"), (dict(method="moe"), "method"),
    (dict(load_balancing_alpha=-0.1), "load_balancing_alpha"), (dict(expert_domains=["a"]), "expert_domains"),
    (dict(attention="dense", attention_top_k=1), "attention_top_k")])
def test_bam_config_validation(changes, word):
    with pytest.raises(ValueError, match=word):
        BamConfig(**{**tiny_config().__dict__, "num_experts": 3, **changes})


def test_config_from_dict_refuses_unknown_and_missing_keys():
    d = tiny_config().to_dict()
    with pytest.raises(ValueError, match="colour"):
        config_from_dict({**d, "colour": "red"})
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        config_from_dict(d)
    with pytest.raises(ValueError, match="model_type"):
        config_from_dict({**tiny_config().to_dict(), "model_type": "gpt2"})


def test_config_json_uses_hugging_face_names():
    bam = BamConfig(**tiny_config().__dict__, num_experts=3, top_k=2)
    d = bam.to_dict()
    for key in ("hidden_size", "num_hidden_layers", "num_experts_per_tok", "num_local_experts",
                "router_aux_loss_coef", "max_position_embeddings"):
        assert key in d
    assert "top_k" not in d and "dim" not in d  # top_k is a generation setting in transformers
    assert config_from_dict(d) == bam
    hf_extra = {"architectures": ["BamMoeForCausalLM"], "auto_map": {}, "transformers_version": "5.0",
                "dtype": "float32", "use_cache": True, "hidden_act": "silu"}
    assert config_from_dict({**d, **hf_extra}) == bam
    with pytest.raises(ValueError, match=r"unknown bam-moe config keys: \['dim'\]"):  # hidden_size's field
        config_from_dict({**d, "dim": bam.dim})
    with pytest.raises(ValueError, match="hidden_act must be 'silu'"):
        config_from_dict({**d, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="^num_experts_per_tok must be an int"):  # the file's own name
        config_from_dict({**d, "num_experts_per_tok": 9})
    with pytest.raises(ValueError, match="got 'dim'$"):  # a value is quoted as it is, not renamed
        config_from_dict({**d, "block": "dim"})
    with pytest.raises(ValueError, match=r"unknown bam-dense config keys: \['num_local_experts'\]"):
        config_from_dict({**DenseConfig(**tiny_config().__dict__).to_dict(), "num_local_experts": 2})


# --- dense model -------------------------------------------------------------------------------

def hf():
    return transformers


def hf_llama(tmp_path, tie=False, cls_name="LlamaForCausalLM", **kw):
    transformers = hf()
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(vocab_size=101, hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=5000.0, rms_norm_eps=1e-6,
                  max_position_embeddings=64, tie_word_embeddings=tie, **kw)
    model = randomize_norms(getattr(transformers, cls_name)(cfg)).eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_llama_parity_with_transformers(tmp_path, tie):
    ref_model = hf_llama(tmp_path, tie=tie)
    ours = bam_model.load_dense(str(tmp_path))
    assert ours.config.tie_embeddings == tie and ours.config.rope_theta == 5000.0
    x = ids(101)
    labels = x.clone()
    labels[0, :3] = -100
    with torch.no_grad():
        ref = ref_model(x, labels=labels)
        out = ours(x, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    assert out.aux_loss is None and out.router_logits is None


def test_sharded_mistral_folder_loads(tmp_path):
    ref_model = hf_llama(tmp_path, cls_name="MistralForCausalLM", sliding_window=None)
    ref_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    ours = bam_model.load_dense(str(tmp_path / "sharded"))
    assert bam_model.from_pretrained(str(tmp_path / "sharded")).config == ours.config
    x = ids(101)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, ref_model(x).logits, rtol=1e-5, atol=1e-5)


def test_hf_features_we_do_not_model_are_refused(tmp_path):
    hf_llama(tmp_path, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE scaling"):
        bam_model.load_dense(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        bam_model.load_dense(str(tmp_path))


def test_parallel_block_is_gptj():
    model = randomize_norms(DenseLM(tiny_config(block="parallel", n_layers=1)))
    layer = model.model.layers[0]
    assert not hasattr(layer, "post_attention_layernorm")
    x_BTD = torch.randn(2, 7, 40)
    n = layer.input_layernorm(x_BTD)
    torch.testing.assert_close(layer(x_BTD), x_BTD + layer.self_attn(n) + layer.mlp(n))


@pytest.mark.parametrize("block", ["sequential", "parallel"])
def test_kv_cache_matches_full_forward(block):
    model = randomize_norms(DenseLM(tiny_config(block=block)))
    x = ids(101, B=3, T=13)
    with torch.no_grad():
        full = model(x).logits
        cache = model.new_cache(13)
        parts = [model(x[:, :6], cache=cache).logits, model(x[:, 6:9], cache=cache).logits]
        parts += [model(x[:, t:t + 1], cache=cache).logits for t in range(9, 13)]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_length"):
        model(x[:, :1], cache=cache)


def test_generate_greedy_matches_argmax_loop_and_sampling_is_seeded():
    model = DenseLM(tiny_config())
    prompt = ids(101, B=2, T=5)
    out = model.generate(prompt, max_new_tokens=6)
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    # A nucleus smaller than any one token is greedy decoding.
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_p=1e-6), seq)
    a = model.generate(prompt, 6, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(5))
    b = model.generate(prompt, 6, temperature=1.3, top_p=0.9, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == (2, 11)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, 3, top_p=0.0)


def test_generate_stops_rows_at_eos():
    model = DenseLM(tiny_config())
    prompt = ids(101, B=1, T=4)
    first = int(model.generate(prompt, 1)[0, -1])
    out = model.generate(prompt, 5, eos_token_id=first)
    assert out.shape == (1, 5) and int(out[0, -1]) == first


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([sample(logits, 1.0, 0.75, torch.Generator().manual_seed(s)) for s in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}


# --- checkpoints -------------------------------------------------------------------------------

@pytest.mark.parametrize("tie", [False, True])
def test_save_and_load_round_trip_sharded(tmp_path, tie):
    model = randomize_norms(DenseLM(tiny_config(tie_embeddings=tie, domain="law")))
    model.save_pretrained(str(tmp_path / "one"))
    model.save_pretrained(str(tmp_path / "many"), max_shard_bytes=20_000)
    assert sorted(os.listdir(tmp_path / "one")) == [
        "bam-manifest.json", "config.json", "configuration_bam.py", "model.safetensors", "modeling_bam.py"]
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    x = ids(101)
    for name in ("one", "many"):
        loaded = bam_model.from_pretrained(str(tmp_path / name))
        assert loaded.config == model.config
        assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
        with torch.no_grad():
            torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert isinstance(bam_model.load_dense(str(tmp_path / "many")), DenseLM)
    assert bam_model.from_pretrained(str(tmp_path / "one"), dtype=torch.bfloat16).dtype == torch.bfloat16


def test_save_replaces_a_checkpoint_and_never_leaves_half_of_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    first = DenseLM(tiny_config())
    first.save_pretrained(str(path))
    second = DenseLM(tiny_config())
    second.save_pretrained(str(path))
    torch.testing.assert_close(bam_model.from_pretrained(str(path)).lm_head.weight, second.lm_head.weight)

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(folder, "save_safetensors", crash)
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(str(path))
    with pytest.raises(OSError, match="disk full"):
        first.save_pretrained(str(tmp_path / "new"))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary folders, no half checkpoint
    torch.testing.assert_close(bam_model.from_pretrained(str(path)).lm_head.weight, second.lm_head.weight)


def test_save_refuses_to_overwrite_other_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        DenseLM(tiny_config()).save_pretrained(str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        bam_model.load_dense(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="config.json"):
        bam_model.load_dense(str(tmp_path))
    model = DenseLM(tiny_config())
    model.save_pretrained(str(tmp_path / "m"))
    tensors = folder.read_safetensors_folder(str(tmp_path / "m"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    folder.write_folder(str(tmp_path / "missing"), {"config.json": model.config.to_json()}, tensors)
    with pytest.raises(ValueError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        bam_model.from_pretrained(str(tmp_path / "missing"))
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.randn(72, 41)
    folder.write_folder(str(tmp_path / "shape"), {"config.json": model.config.to_json()}, tensors)
    with pytest.raises(ValueError, match=r"up_proj.weight' has shape \(72, 41\)"):
        bam_model.from_pretrained(str(tmp_path / "shape"))
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        folder.read_safetensors_folder(str(tmp_path / "pickle"))
    (tmp_path / "w.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="gguf"):
        bam_model.load_dense(str(tmp_path / "w.bin"))


# --- GGUF: the real SmolLM2-135M-Instruct ------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return bam_model.load_dense(smollm2_gguf())


def test_unpermute_inverts_llama_cpp_permute():
    n_heads, hd, d_in = 3, 8, 5
    w = torch.randn(n_heads * hd, d_in)
    # llama.cpp's convert_hf_to_gguf.py permute
    permuted = w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(w.shape)
    assert torch.equal(gguf.unpermute_gguf_qk(permuted, n_heads), w)


def test_smollm2_gguf_matches_transformers(smollm2):
    transformers = hf()
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    path = smollm2_gguf()
    hf_config = transformers.LlamaConfig(**load_gguf_checkpoint(path)["config"])
    ref_model = transformers.LlamaForCausalLM(hf_config).eval()
    hf_tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=ref_model)["tensors"]
    ours = smollm2.state_dict()
    for name, t in hf_tensors.items():  # transformers' own dequantisation and un-permutation
        assert torch.equal(ours[name], t), name
    ref_model.load_state_dict(hf_tensors, strict=False)
    ref_model.tie_weights()
    c = smollm2.config
    assert ((c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.rope_theta, c.tie_embeddings)
            == (30, 576, 9, 3, 1e5, True))
    x = torch.randint(0, c.vocab_size, (1, 17))
    with torch.no_grad():
        torch.testing.assert_close(smollm2(x).logits, ref_model(x).logits, rtol=1e-4, atol=1e-4)


def test_smollm2_upcycled_with_itself_keeps_its_function(smollm2):
    moe = bam_model.upcycle(smollm2, [smollm2], attention="shared-kv", top_k=2)
    x = torch.randint(0, smollm2.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, smollm2(x).logits, rtol=1e-4, atol=1e-4)


def test_smollm2_gguf_tokenizer_and_greedy_generation():
    from tokenizers import Tokenizer

    from bam_model.generate import generate_text, load_model_and_tokenizer
    model, tok = load_model_and_tokenizer(smollm2_gguf())  # what bam generate does
    text = "The capital of France is 12345 ok"
    # transformers' tokenizer for this GGUF gives these ids
    assert tok.encode(text) == [504, 3575, 282, 4649, 314, 216, 33, 34, 35, 36, 37, 10907]
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert generate_text(model, tok, "The capital of France is", max_new_tokens=3).startswith(
        "The capital of France is Paris")
    carried = Tokenizer.from_str(model.tokenizer.to_str())  # what bam branch / mix write beside a copy
    assert carried.encode(text).ids == tok.encode(text)
