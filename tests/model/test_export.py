"""bam export: every model that has a Hugging Face class goes back to it, with its tokenizer."""
import json

import torch
import transformers

import bam_model
from bam_model import DenseConfig, DenseLM
from bam_model.cli import main
from bam_model.upcycle import upcycle
from tests.support.models import randomize_norms


def tiny(block="sequential"):
    cfg = DenseConfig(vocab_size=8192, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                      max_seq_len=64, tie_embeddings=True, block=block, bos_token_id=None, eos_token_id=0)
    model = DenseLM(cfg)
    return randomize_norms(model)


def test_dense_exports_as_llama_with_its_tokenizer(tmp_path, capsys):
    model = tiny()
    model.save_pretrained(str(tmp_path / "seed"))
    assert main(["export", str(tmp_path / "seed"), "--out", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def main():\n    return fib(10)"
    ids = tok.encode(text)
    assert ids == bam_model.data.load_tokenizer().encode(text).ids
    assert tok.eos_token == "<|endoftext|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)
    assert hf.generate(x, max_new_tokens=6, do_sample=False).tolist() == model.generate(x, 6).tolist()
    # bf16 halves the size
    assert main(["export", str(tmp_path / "seed"), "--out", str(tmp_path / "hf16"),
                 "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "hf16" / "config.json").read_text())["dtype"] == "bfloat16"
    size = lambda p: (p / "model.safetensors").stat().st_size
    assert size(tmp_path / "hf16") < 0.55 * size(tmp_path / "hf")


def test_btx_exports_as_mixtral_and_bam_and_parallel_models_are_refused(tmp_path, capsys):
    seed = tiny()
    upcycle(seed, [seed, seed], method="btx").save_pretrained(str(tmp_path / "btx"))
    assert main(["export", str(tmp_path / "btx"), "--out", str(tmp_path / "hf")]) == 0
    assert "MixtralForCausalLM" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    x = torch.randint(0, 8192, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, seed(x).logits, rtol=1e-5, atol=1e-5)
    upcycle(seed, [seed, seed]).save_pretrained(str(tmp_path / "bam"))
    assert main(["export", str(tmp_path / "bam"), "--out", str(tmp_path / "x")]) == 2
    assert "attention experts" in capsys.readouterr().err
    tiny("parallel").save_pretrained(str(tmp_path / "par"))
    assert main(["export", str(tmp_path / "par"), "--out", str(tmp_path / "x")]) == 2
    assert "block='parallel'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_refuses_to_write_over_its_input(tmp_path, capsys):
    tiny().save_pretrained(str(tmp_path / "seed"))
    assert main(["export", str(tmp_path / "seed"), "--out", str(tmp_path / "seed")]) == 2
    assert "is the input MODEL" in capsys.readouterr().err
