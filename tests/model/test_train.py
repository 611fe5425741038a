import argparse
import json
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from bam_model import data as D
from bam_model.cli.eval import add_eval_args
from bam_model.cli.train import add_train_args
from bam_model.evaluate import evaluate
from bam_model.training import RunOptions, TrainConfig, lr_at, train

V = 8192


@dataclass
class Out:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    nll: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class TinyLM(nn.Module):
    """A one-token-context LM with dropout (so resuming must restore the RNG) and a small aux loss
    (so the trainer must log it); ``crash_at`` raises on that training forward call."""

    def __init__(self, dim=16, crash_at=None):
        super().__init__()
        self.embed = nn.Embedding(V, dim)
        self.drop = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, V)
        self.crash_at, self.calls = crash_at, 0

    def forward(self, input_ids, labels=None):
        if self.training:
            self.calls += 1
            if self.calls == self.crash_at:
                raise KeyboardInterrupt("simulated crash")
        logits = self.head(self.norm(self.drop(self.embed(input_ids))))
        if labels is None:
            return Out(logits)
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        aux = 1e-3 * self.embed.weight.square().mean()
        return Out(logits, nll + aux, nll, aux)


def _model(**kw):
    torch.manual_seed(1234)
    return TinyLM(**kw)


def _cfg(**kw):
    base = dict(steps=12, batch_size=4, seq_len=24, lr=3e-3, warmup=2, log_every=1, eval_windows=2, seed=0)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_loss_and_writes_metrics(tmp_path):
    model = _model()
    cfg = _cfg(steps=40, lr=2e-2, log_every=5, eval_every=20)
    records = train(model, RunOptions(data="scripture", out=tmp_path), cfg, progress=False)
    losses = [r["loss"] for r in records]
    assert losses[-1] < losses[0] - 1.0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30, 35, 40]
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens", "nll", "aux_loss"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["tokens"] == r["step"] * 4 * 24
        assert r["loss"] == pytest.approx(r["nll"] + r["aux_loss"], rel=1e-5)
    assert "eval" in records[3] and "eval" in records[-1] and "eval" not in records[0]
    ev0, ev1 = records[3]["eval"]["scripture"], records[-1]["eval"]["scripture"]
    assert ev1["loss"] < ev0["loss"] and ev1["ppl"] == pytest.approx(math.exp(ev1["loss"]))
    assert (tmp_path / "model" / "model.safetensors").is_file()
    [ckpt] = (tmp_path / "checkpoints").iterdir()
    assert ckpt.name == "step-0000040"
    assert sorted(p.name for p in ckpt.iterdir()) == ["model.safetensors", "trainer.json",
                                                      "trainer.safetensors"]
    state = json.loads((ckpt / "trainer.json").read_text())
    assert state["step"] == 40 and state["data"]["position"] == 40 * 4
    tensors = load_file(str(ckpt / "trainer.safetensors"))
    assert "rng.0.cpu" in tensors and any(k.endswith(".exp_avg_sq") for k in tensors)


def test_same_seed_gives_bitwise_same_losses(tmp_path):
    cfg = _cfg(steps=8, grad_accum=2)
    a = train(_model(), RunOptions(data="code:0.5,legal:0.5", out=tmp_path / "a"), cfg, progress=False)
    b = train(_model(), RunOptions(data="code:0.5,legal:0.5", out=tmp_path / "b"), cfg, progress=False)
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    c = train(_model(), RunOptions(data="code:0.5,legal:0.5", out=tmp_path / "c"),
              _cfg(steps=8, grad_accum=2, seed=1), progress=False)
    assert [r["loss"] for r in a] != [r["loss"] for r in c]


def test_resume_after_crash_matches_uninterrupted_run(tmp_path):
    cfg = _cfg(steps=12, save_every=4, grad_accum=2, keep_checkpoints=2)
    full_model = _model()
    full = train(full_model, RunOptions(data="math:0.5,drama:0.5", out=tmp_path / "full"), cfg,
                 progress=False)

    run = tmp_path / "run"
    crashing = _model(crash_at=2 * 10 + 1)      # dies in step 11, after the step-8 checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(crashing, RunOptions(data="math:0.5,drama:0.5", out=run), cfg, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 10
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')               # a torn line, as a crash mid-write leaves

    resumed_model = _model()
    resumed = train(resumed_model, RunOptions(data="math:0.5,drama:0.5", out=run, resume=True), cfg,
                    progress=False)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] == resumed
    for (k, p), q in zip(full_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(p, q), k
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_fresh_run_into_a_run_needs_overwrite_and_then_discards_old_checkpoints(tmp_path):
    train(_model(), RunOptions(data="code", out=tmp_path), _cfg(steps=3), progress=False)
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="holds a training run .checkpoint at step 3.; pass --resume"):
        train(_model(), RunOptions(data="code", out=tmp_path), _cfg(steps=2), progress=False)
    assert _snapshot(tmp_path) == before
    records = train(_model(), RunOptions(data="code", out=tmp_path, overwrite=True), _cfg(steps=2),
                    progress=False)
    assert [r["step"] for r in records] == [1, 2]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-0000002"]


def _snapshot(folder):
    """Every file under ``folder`` with its bytes (the lock file aside, whose holder line changes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".bam-lock"}


def test_lr_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, min_lr_ratio=0.1, warmup=10)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10] == 1.0
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert TrainConfig(steps=50).warmup_steps == 5 and TrainConfig(steps=5000).warmup_steps == 100


@pytest.mark.parametrize("kw, match", [
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=5, seq_len=1), "seq_len must be an int >= 2"),
    (dict(steps=5, batch_size=6, grad_accum=4), "batch_size=6 must be a multiple of grad_accum=4"),
    (dict(steps=5, lr=0.0), "lr must be a number"),
    (dict(steps=5, warmup=6), r"warmup must be None or an int in \[0, steps=5\]"),
    (dict(steps=5, min_lr_ratio=2.0), "min_lr_ratio must be a number in"),
    (dict(steps=5, save_every=-1), "save_every must be an int >= 0"),
])
def test_bad_train_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw)


class Uniform(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, labels=None):
        return Out(self.w * torch.ones(*input_ids.shape, V))


def test_evaluate_uniform_model_is_exact():
    res = evaluate(Uniform(), "code,legal", seq_len=32, batch_size=3, max_windows=7)
    tok = D.load_tokenizer()
    lengths = D.token_byte_lengths(tok)
    for name in ("code", "legal"):
        r = res[name]
        windows = D.eval_windows(D.tokens(D.Source(name), "heldout", tok), 32, 7)
        n_bytes = int(lengths[windows[:, 1:].numpy()].sum())
        assert r["tokens"] == 7 * 31 and r["bytes"] == n_bytes
        assert r["loss"] == pytest.approx(math.log(V))
        assert r["ppl"] == pytest.approx(V, rel=1e-5)
        assert r["bpb"] == pytest.approx(7 * 31 * math.log2(V) / n_bytes)
    assert res["avg"]["ppl"] == pytest.approx(V, rel=1e-5)
    with pytest.raises(ValueError, match="domains: 'code:0.5,math:0.5' is a mixture"):
        evaluate(Uniform(), ["code:0.5,math:0.5"])


def test_command_line_arguments(tmp_path, capsys):
    from bam_model.cli import build_parser, main

    args = build_parser().parse_args(["eval", "m", "--data", "code"])
    assert args.run.__name__ == "run_eval" and args.data == "code"
    import bam_model

    cfg = bam_model.DenseConfig(vocab_size=V, dim=8, n_layers=1, n_heads=1, n_kv_heads=1, ffn_dim=8)
    bam_model.DenseLM(cfg).save_pretrained(str(tmp_path / "seed"))
    assert main(["train", str(tmp_path / "seed"), "--data", "nope", "--steps", "1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "unknown domain 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    p = argparse.ArgumentParser()
    add_train_args(p)
    a = p.parse_args(["m", "--data", "code", "--steps", "5", "--out", "o", "--resume", "--save-every", "2"])
    got = (a.model, a.data, a.steps, a.out, a.resume, a.save_every, a.seq_len)
    assert got == ("m", "code", 5, "o", True, 2, 256)
    p = argparse.ArgumentParser()
    add_eval_args(p)
    a = p.parse_args(["m"])
    assert a.data == ",".join(D.DOMAINS)


def test_bam_train_and_eval_commands_on_a_dense_model(tmp_path):
    import bam_model
    from bam_model.cli.eval import run_eval
    from bam_model.cli.train import run_train

    torch.manual_seed(0)
    cfg = bam_model.DenseConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48,
                                tie_embeddings=True, eos_token_id=0)
    bam_model.DenseLM(cfg).save_pretrained(str(tmp_path / "seed"))
    p = argparse.ArgumentParser()
    add_train_args(p)
    argv = [str(tmp_path / "seed"), "--data", "code:0.5,math:0.5", "--steps", "6", "--out",
            str(tmp_path / "run"), "--batch-size", "4", "--seq-len", "32", "--save-every", "3",
            "--eval-windows", "2", "--no-progress"]
    full = run_train(p.parse_args(argv))
    assert [r["step"] for r in full] == [6] and set(full[-1]["eval"]) == {"code", "math", "avg"}
    # Resuming the finished run from its step-6 checkpoint changes nothing.
    again = run_train(p.parse_args(argv + ["--resume"]))
    assert again == full
    p = argparse.ArgumentParser()
    add_eval_args(p)
    res = run_eval(p.parse_args([str(tmp_path / "run" / "model"), "--data", "legal", "--max-windows", "2",
                                 "--seq-len", "32", "--json", str(tmp_path / "eval.json")]))
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["format"] == "bam-eval" and written["results"] == res and written["seq_len"] == 32
    model = bam_model.from_pretrained(str(tmp_path / "run" / "model"))
    small = bam_model.DenseLM(bam_model.DenseConfig(vocab_size=100, dim=8, n_layers=1, n_heads=1,
                                                    n_kv_heads=1, ffn_dim=8))
    with pytest.raises(ValueError,
                       match=r"carries no tokenizer and its vocabulary \(100 tokens\) is not the bundled"):
        train(small, RunOptions(data="code", out=tmp_path / "small"), _cfg(steps=1, warmup=0), progress=False)
    with pytest.raises(ValueError, match="the tokenizer has 8192 tokens but the model's vocabulary only 100"):
        train(small, RunOptions(data="code", out=tmp_path / "small"), _cfg(steps=1, warmup=0), progress=False,
              tokenizer=D.load_tokenizer())
    assert not (tmp_path / "small").exists()
    assert res["legal"]["loss"] == pytest.approx(evaluate(model, ["legal"], seq_len=32,
                                                          max_windows=2)["legal"]["loss"])


def test_final_model_dtype_and_what_a_run_folder_holds(tmp_path):
    """--dtype bfloat16 halves model/; checkpoints keep float32 weights and the optimizer state (resuming
    needs them), model/ holds no optimizer state and carries the tokenizer."""
    import bam_model
    from bam_model.cli import main

    cfg = bam_model.DenseConfig(vocab_size=V, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48,
                                tie_embeddings=True, eos_token_id=0)
    bam_model.DenseLM(cfg).save_pretrained(str(tmp_path / "seed"))
    base = ["train", str(tmp_path / "seed"), "--data", "code", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-windows", "1", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "f32")]) == 0
    assert main([*base, "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    size = {k: (tmp_path / k / "model" / "model.safetensors").stat().st_size for k in ("f32", "bf16")}
    assert size["bf16"] < 0.55 * size["f32"]
    model = bam_model.from_pretrained(str(tmp_path / "bf16" / "model"))
    assert model.dtype == torch.bfloat16 and model.tokenizer is not None
    assert sorted(p.name for p in (tmp_path / "bf16" / "model").iterdir()) == [
        "bam-manifest.json", "config.json", "configuration_bam.py", "model.safetensors", "modeling_bam.py",
        "tokenizer.json", "tokenizer_config.json"]
    ckpt = tmp_path / "bf16" / "checkpoints" / "step-0000002"
    assert {t.dtype for t in load_file(str(ckpt / "model.safetensors")).values()} == {torch.float32}
    assert any(k.startswith("optimizer.") for k in load_file(str(ckpt / "trainer.safetensors")))
